//! The previous body parser (serde `untagged` enums), kept to check the current one against:
//! both must give the same result on every body (`body::tests::same_as_legacy`).

use std::borrow::Cow;

use serde::Deserialize;

use super::body::{ApiKind, BodyError, ParsedBody};

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

/// [`ParsedBody::parse`] as it was.
pub(super) fn parse(path: Option<&str>, body: &[u8]) -> Result<ParsedBody, BodyError> {
    {
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
        Ok(ParsedBody { model, prompt, api, stream: raw.stream.unwrap_or(false) })
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
