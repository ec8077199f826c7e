//! Bodies of SGLang's native `/generate` API, read by `sglanghttp-parser`: one pre-tokenized
//! prompt in `input_ids` (a non-empty array of token ids), optionally `extra_key` (a string
//! SGLang mixes into its prefix cache keys), `sampling_params` and `stream`. Other fields are
//! ignored. The body names no model.
//!
//! As llm-d-router's parser: `input_ids` absent or `null` is a missing prompt, an empty or
//! non-integer list is refused, and so is an `extra_key` that is not a string. The prompt is
//! the token ids written as the other token-id APIs write them, so equal token prefixes give
//! equal prompt prefixes. `extra_key` (Go's cache salt) is checked and not used: epp-rs's
//! prefix hashing takes no salt.

use serde::Deserialize;

use crate::request::body::{ApiKind, BodyError, ParsedBody};
use crate::request::grpc_body::write_tokens;

/// The fields read.
#[derive(Deserialize)]
struct Generate {
    #[serde(default)]
    input_ids: Option<Vec<u32>>,
    #[serde(default)]
    extra_key: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
}

/// Reads an SGLang `/generate` body.
pub(crate) fn parse(body: &[u8]) -> Result<ParsedBody, BodyError> {
    const API: ApiKind = ApiKind::SglangGenerate;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(BodyError::Empty);
    }
    let request: Generate = serde_json::from_slice(body).map_err(|error| {
        let message = error.to_string();
        let message = message.rfind(" at line ").map_or(&message[..], |at| &message[..at]);
        BodyError::InvalidJson {
            message: message.to_owned(),
            line: error.line(),
            column: error.column(),
        }
    })?;
    let _salt = request.extra_key;
    let tokens = request.input_ids.unwrap_or_default();
    if tokens.is_empty() {
        return Err(BodyError::MissingPrompt { api: API, expected: "non-empty \"input_ids\"" });
    }
    let mut prompt = String::new();
    write_tokens(&tokens, &mut prompt);
    Ok(ParsedBody {
        model: String::new(),
        prompt,
        api: API,
        stream: request.stream.unwrap_or(false),
        message_ends: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generate_body_is_its_token_ids() {
        let body = br#"{"input_ids":[128000,9906,1917],"sampling_params":{"max_new_tokens":64,"temperature":0},"stream":true,"extra_key":"tenant-a","rid":"r1"}"#;
        let parsed = parse(body).unwrap();
        assert_eq!(parsed.prompt, "128000 9906 1917 ");
        assert_eq!(
            (parsed.model.as_str(), parsed.stream, parsed.api),
            ("", true, ApiKind::SglangGenerate)
        );
        assert!(!parse(br#"{"input_ids":[1],"stream":null}"#).unwrap().stream);
    }

    #[test]
    fn bodies_go_refuses_are_refused() {
        let missing = || BodyError::MissingPrompt {
            api: ApiKind::SglangGenerate,
            expected: "non-empty \"input_ids\"",
        };
        for body in [&br#"{"text":"hello"}"#[..], br#"{"input_ids":null}"#, br#"{"input_ids":[]}"#]
        {
            assert_eq!(parse(body), Err(missing()), "{}", String::from_utf8_lossy(body));
        }
        for body in [
            &br#"{"input_ids":"hello"}"#[..],
            br#"{"input_ids":[-1]}"#,
            br#"{"input_ids":[1.5]}"#,
            br#"{"input_ids":[[1,2],[3]]}"#,
            br#"{"input_ids":[1],"extra_key":7}"#,
            br#"{"input_ids":[1],"stream":"yes"}"#,
            b"{",
        ] {
            assert!(
                matches!(parse(body), Err(BodyError::InvalidJson { .. })),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(parse(b"  "), Err(BodyError::Empty));
    }
}
