//! Parsing of OpenAI-style request bodies (`/v1/completions`, `/v1/chat/completions`,
//! `/v1/responses`, `/v1/embeddings`) into the model name and the prompt text.
//!
//! Only the fields scheduling needs are read; every other field is skipped without being
//! materialised. Chat messages are flattened to `role: text` lines in order, so that two
//! conversations sharing leading messages share a leading prompt prefix.

use std::borrow::Cow;

use serde::Deserialize;

/// Which OpenAI API a body was written for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ApiKind {
    /// `/v1/completions`: a `prompt`.
    #[default]
    Completions,
    /// `/v1/chat/completions`: `messages`.
    ChatCompletions,
    /// `/v1/responses`: `input`.
    Responses,
    /// `/v1/embeddings`: `input`.
    Embeddings,
}

impl ApiKind {
    /// The API an HTTP path names, ignoring any query string.
    pub fn from_path(path: &str) -> Option<Self> {
        let path = path.split('?').next().unwrap_or(path).trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            Some(Self::ChatCompletions)
        } else if path.ends_with("/completions") {
            Some(Self::Completions)
        } else if path.ends_with("/responses") {
            Some(Self::Responses)
        } else if path.ends_with("/embeddings") {
            Some(Self::Embeddings)
        } else {
            None
        }
    }
}

/// Why a request body could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    /// The body is empty.
    #[error("request body is empty")]
    Empty,
    /// The body is not valid JSON, or a field has the wrong type.
    #[error("request body is not valid JSON: {message} (line {line}, column {column})")]
    InvalidJson {
        /// The parser's description.
        message: String,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
    },
    /// The body has no `model` field, or it is empty.
    #[error("request body has no \"model\" field")]
    MissingModel,
    /// The body carries no prompt in any form the named API accepts.
    #[error("request body has no {expected} field for {api:?}")]
    MissingPrompt {
        /// The API the body was read as.
        api: ApiKind,
        /// The field that was expected.
        expected: &'static str,
    },
}

/// The scheduling-relevant content of a request body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedBody {
    /// The `model` field.
    pub model: String,
    /// The prompt text, flattened.
    pub prompt: String,
    /// The API the body was read as.
    pub api: ApiKind,
    /// The `stream` field.
    pub stream: bool,
}

#[derive(Deserialize)]
struct RawBody<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    prompt: Option<TextOrTokens>,
    #[serde(default)]
    messages: Option<Vec<Message>>,
    #[serde(default)]
    input: Option<InputField>,
    #[serde(default)]
    stream: Option<bool>,
}

/// `prompt` / embeddings `input`: a string, strings, token ids, or batches of token ids.
#[derive(Deserialize)]
#[serde(untagged)]
enum TextOrTokens {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenBatches(Vec<Vec<i64>>),
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(default)]
    text: Option<String>,
}

/// `input` of `/v1/responses` and `/v1/embeddings`.
#[derive(Deserialize)]
#[serde(untagged)]
enum InputField {
    Plain(TextOrTokens),
    Items(Vec<Message>),
}

impl ParsedBody {
    /// Parses `body`; `path`, when given, says which API it targets.
    pub fn parse(path: Option<&str>, body: &[u8]) -> Result<Self, BodyError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(BodyError::Empty);
        }
        let raw: RawBody<'_> =
            serde_json::from_slice(body).map_err(|error| BodyError::InvalidJson {
                message: strip_position(&error.to_string()),
                line: error.line(),
                column: error.column(),
            })?;
        let model = match raw.model {
            Some(model) if !model.trim().is_empty() => model.into_owned(),
            _ => return Err(BodyError::MissingModel),
        };
        let api = path.and_then(ApiKind::from_path).unwrap_or(if raw.messages.is_some() {
            ApiKind::ChatCompletions
        } else if raw.prompt.is_some() {
            ApiKind::Completions
        } else {
            ApiKind::Responses
        });
        let mut prompt = String::new();
        match api {
            ApiKind::ChatCompletions => {
                let messages = raw
                    .messages
                    .ok_or(BodyError::MissingPrompt { api, expected: "\"messages\"" })?;
                flatten_messages(&messages, &mut prompt);
            }
            ApiKind::Completions => {
                let text =
                    raw.prompt.ok_or(BodyError::MissingPrompt { api, expected: "\"prompt\"" })?;
                flatten_text(&text, &mut prompt);
            }
            ApiKind::Responses | ApiKind::Embeddings => {
                match raw.input.ok_or(BodyError::MissingPrompt { api, expected: "\"input\"" })? {
                    InputField::Plain(text) => flatten_text(&text, &mut prompt),
                    InputField::Items(items) => flatten_messages(&items, &mut prompt),
                }
            }
        }
        Ok(Self { model, prompt, api, stream: raw.stream.unwrap_or(false) })
    }
}

/// serde_json appends " at line L column C"; the error carries those as fields already.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message.to_owned(),
    }
}

fn flatten_text(text: &TextOrTokens, out: &mut String) {
    use std::fmt::Write;
    match text {
        TextOrTokens::Text(text) => out.push_str(text),
        TextOrTokens::Texts(texts) => {
            for text in texts {
                out.push_str(text);
                out.push('\n');
            }
        }
        // Token ids stand for text we cannot decode here; their decimal form keeps equal
        // token prefixes equal, which is all prefix matching needs.
        TextOrTokens::Tokens(tokens) => {
            for token in tokens {
                let _ = write!(out, "{token} ");
            }
        }
        TextOrTokens::TokenBatches(batches) => {
            for token in batches.iter().flatten() {
                let _ = write!(out, "{token} ");
            }
        }
    }
}

fn flatten_messages(messages: &[Message], out: &mut String) {
    for message in messages {
        out.push_str(message.role.as_deref().unwrap_or(""));
        out.push_str(": ");
        match &message.content {
            Some(Content::Text(text)) => out.push_str(text),
            Some(Content::Parts(parts)) => {
                for text in parts.iter().filter_map(|part| part.text.as_deref()) {
                    out.push_str(text);
                }
            }
            None => {}
        }
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(path: &str, body: &str) -> Result<ParsedBody, BodyError> {
        ParsedBody::parse(Some(path), body.as_bytes())
    }

    #[test]
    fn completions_prompt_is_the_text() {
        let body = parse("/v1/completions", r#"{"model":"m","prompt":"Hello","stream":true}"#);
        let body = body.unwrap();
        assert_eq!(
            (body.model.as_str(), body.prompt.as_str(), body.api, body.stream),
            ("m", "Hello", ApiKind::Completions, true)
        );
    }

    #[test]
    fn chat_messages_flatten_in_order_with_content_parts() {
        let body = parse(
            "/v1/chat/completions",
            r#"{"model":"m","messages":[
                {"role":"system","content":"Be brief."},
                {"role":"user","content":[{"type":"text","text":"Hi "},
                  {"type":"image_url","image_url":{"url":"x"}},{"type":"text","text":"there"}]},
                {"role":"assistant","content":null,"tool_calls":[]}]}"#,
        )
        .unwrap();
        assert_eq!(body.prompt, "system: Be brief.\nuser: Hi there\nassistant: \n");
        assert_eq!(body.api, ApiKind::ChatCompletions);
    }

    #[test]
    fn shared_leading_messages_give_a_shared_prefix() {
        let first = parse(
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"system","content":"S"},{"role":"user","content":"a"}]}"#,
        )
        .unwrap();
        let second = parse(
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"system","content":"S"},{"role":"user","content":"b"}]}"#,
        )
        .unwrap();
        assert!(first.prompt.starts_with("system: S\nuser: "));
        assert!(second.prompt.starts_with("system: S\nuser: "));
    }

    #[test]
    fn api_is_inferred_from_fields_without_a_path() {
        let chat = ParsedBody::parse(None, br#"{"model":"m","messages":[]}"#).unwrap();
        assert_eq!(chat.api, ApiKind::ChatCompletions);
        let input = ParsedBody::parse(None, br#"{"model":"m","input":"x"}"#).unwrap();
        assert_eq!((input.api, input.prompt.as_str()), (ApiKind::Responses, "x"));
    }

    #[test]
    fn token_prompts_and_string_arrays_are_accepted() {
        let tokens = parse("/v1/completions", r#"{"model":"m","prompt":[1,2,3]}"#).unwrap();
        assert_eq!(tokens.prompt, "1 2 3 ");
        let texts = parse("/v1/completions", r#"{"model":"m","prompt":["a","b"]}"#).unwrap();
        assert_eq!(texts.prompt, "a\nb\n");
        let embeddings = parse("/v1/embeddings", r#"{"model":"m","input":["a"]}"#).unwrap();
        assert_eq!(embeddings.prompt, "a\n");
    }

    #[test]
    fn errors_name_what_is_wrong() {
        assert_eq!(parse("/v1/completions", "  "), Err(BodyError::Empty));
        assert_eq!(parse("/v1/completions", r#"{"prompt":"x"}"#), Err(BodyError::MissingModel));
        assert_eq!(
            parse("/v1/completions", r#"{"model":" ","prompt":"x"}"#),
            Err(BodyError::MissingModel)
        );
        assert_eq!(
            parse("/v1/chat/completions", r#"{"model":"m","prompt":"x"}"#),
            Err(BodyError::MissingPrompt {
                api: ApiKind::ChatCompletions,
                expected: "\"messages\""
            })
        );
        let Err(BodyError::InvalidJson { line, column, message }) =
            parse("/v1/completions", "{\"model\":\n 3}")
        else {
            panic!("a number for model must be rejected");
        };
        assert_eq!((line, column), (2, 2));
        assert!(message.contains("invalid type"), "{message}");
        let error = parse("/v1/completions", "{not json").unwrap_err();
        assert!(error.to_string().contains("line 1"), "{error}");
    }

    #[test]
    fn api_from_path_ignores_query_and_prefixes() {
        assert_eq!(
            ApiKind::from_path("/openai/v1/chat/completions?x=1"),
            Some(ApiKind::ChatCompletions)
        );
        assert_eq!(ApiKind::from_path("/v1/completions/"), Some(ApiKind::Completions));
        assert_eq!(ApiKind::from_path("/health"), None);
    }
}
