//! The top-level `model` field of a JSON request body, found without parsing the rest.
//!
//! A model rewrite changes one string in a body that may be megabytes of prompt, and a
//! body-based router needs only the model name; both scan the top-level object once, skipping
//! every other value by its delimiters (strings by their closing quote, found with `memchr`),
//! and never build the prompt. The scan checks structure only as far as it needs to find its
//! way: it is meant for bodies the caller will also hand to a real parser (or to a model server
//! that will), not as a validator.

use std::borrow::Cow;
use std::ops::Range;

/// Why a body has no usable `model` field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModelFieldError {
    /// The body is not a JSON object (or ends before its top-level object does).
    #[error("request body is not a JSON object ({0})")]
    NotAnObject(&'static str),
    /// `model` is present but not a string.
    #[error("`model` must be a string")]
    NotAString,
    /// `model` holds an escape that is not valid JSON.
    #[error("`model` is not a valid JSON string")]
    BadString,
}

/// Where the `model` string stands in a body, and its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelField<'a> {
    /// The bytes of the JSON string, quotes included.
    pub span: Range<usize>,
    /// The decoded model name (borrowed unless it held escapes).
    pub value: Cow<'a, str>,
}

/// The first top-level `model` field of `body`, if the object has one.
pub fn find_model(body: &[u8]) -> Result<Option<ModelField<'_>>, ModelFieldError> {
    let mut scanner = Scanner { body, at: 0 };
    scanner.skip_whitespace();
    if scanner.next() != Some(b'{') {
        return Err(ModelFieldError::NotAnObject("it does not start with `{`"));
    }
    scanner.skip_whitespace();
    if scanner.peek() == Some(b'}') {
        return Ok(None);
    }
    loop {
        scanner.skip_whitespace();
        let key = scanner.string().ok_or(ModelFieldError::NotAnObject("a key is not a string"))?;
        scanner.skip_whitespace();
        if scanner.next() != Some(b':') {
            return Err(ModelFieldError::NotAnObject("a key is not followed by `:`"));
        }
        scanner.skip_whitespace();
        if key_is_model(&body[key.clone()]) {
            if scanner.peek() != Some(b'"') {
                return Err(ModelFieldError::NotAString);
            }
            let span = scanner.string().ok_or(ModelFieldError::BadString)?;
            let value = decode_string(&body[span.clone()]).ok_or(ModelFieldError::BadString)?;
            return Ok(Some(ModelField { span, value }));
        }
        scanner.skip_value().ok_or(ModelFieldError::NotAnObject("a value is cut short"))?;
        scanner.skip_whitespace();
        match scanner.next() {
            Some(b',') => continue,
            Some(b'}') => return Ok(None),
            _ => return Err(ModelFieldError::NotAnObject("members are not separated by `,`")),
        }
    }
}

/// `body` with its top-level `model` set to `model`, or `None` when the body has no `model`
/// string to replace (a body the caller should not have tried to rewrite). The rest of the
/// body is kept byte for byte; the new name is written as a JSON string (escaped as needed).
pub fn rewrite_model(body: &[u8], model: &str) -> Result<Option<Vec<u8>>, ModelFieldError> {
    let Some(field) = find_model(body)? else { return Ok(None) };
    let quoted = serde_json::to_string(model).expect("a str always serialises");
    let mut rewritten = Vec::with_capacity(body.len() - field.span.len() + quoted.len());
    rewritten.extend_from_slice(&body[..field.span.start]);
    rewritten.extend_from_slice(quoted.as_bytes());
    rewritten.extend_from_slice(&body[field.span.end..]);
    Ok(Some(rewritten))
}

/// Whether a JSON string (quotes included) spells `model`, escapes decoded.
fn key_is_model(quoted: &[u8]) -> bool {
    if quoted == b"\"model\"" {
        return true;
    }
    // An escaped key (`"mod\u0065l"`) is rare but means the same member to a JSON parser.
    quoted.contains(&b'\\') && decode_string(quoted).is_some_and(|key| key == "model")
}

fn decode_string(quoted: &[u8]) -> Option<Cow<'_, str>> {
    let inner = &quoted[1..quoted.len() - 1];
    if !inner.contains(&b'\\') {
        return std::str::from_utf8(inner).ok().map(Cow::Borrowed);
    }
    serde_json::from_slice::<String>(quoted).ok().map(Cow::Owned)
}

struct Scanner<'a> {
    body: &'a [u8],
    at: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.body.get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.at += 1;
        Some(byte)
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    /// Consumes a string starting at the cursor; its span, quotes included.
    fn string(&mut self) -> Option<Range<usize>> {
        let start = self.at;
        if self.next()? != b'"' {
            return None;
        }
        loop {
            let offset = memchr::memchr2(b'"', b'\\', &self.body[self.at..])?;
            self.at += offset;
            if self.next()? == b'"' {
                return Some(start..self.at);
            }
            // An escape: whatever follows the backslash cannot close the string.
            self.next()?;
        }
    }

    /// Consumes one value of any kind. Nested objects and arrays are skipped by counting
    /// brackets outside strings, without recursion, so depth costs nothing.
    fn skip_value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => {
                self.string()?;
            }
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => depth -= 1,
                        _ => {}
                    }
                    self.at += 1;
                    if depth == 0 {
                        break;
                    }
                }
            }
            _ => {
                // A number or literal: everything up to the next delimiter.
                let start = self.at;
                while !matches!(
                    self.peek(),
                    None | Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
                ) {
                    self.at += 1;
                }
                if self.at == start {
                    return None;
                }
            }
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn model_of(body: &str) -> Result<Option<String>, ModelFieldError> {
        find_model(body.as_bytes()).map(|field| field.map(|field| field.value.into_owned()))
    }

    #[test]
    fn finds_the_top_level_model_past_other_members() {
        let body = r#"{"messages":[{"role":"user","content":"say \"model\": \"x\""}],
            "n": 1, "nested": {"model": "inner"}, "model" : "llama", "stream": true}"#;
        assert_eq!(model_of(body), Ok(Some("llama".into())));
        let field = find_model(body.as_bytes()).unwrap().unwrap();
        assert_eq!(&body[field.span], "\"llama\"");
    }

    #[test]
    fn absent_wrong_type_and_broken_bodies() {
        assert_eq!(model_of(r#"{"prompt":"hi"}"#), Ok(None));
        assert_eq!(model_of("{}"), Ok(None));
        assert_eq!(model_of(r#"{"model":7}"#), Err(ModelFieldError::NotAString));
        assert_eq!(model_of(r#"{"model":null}"#), Err(ModelFieldError::NotAString));
        assert!(matches!(model_of("[1]"), Err(ModelFieldError::NotAnObject(_))));
        assert!(matches!(model_of(""), Err(ModelFieldError::NotAnObject(_))));
        assert!(model_of(r#"{"prompt":"unterminated"#).is_err());
        assert!(model_of(r#"{"prompt":"x" "model":"m"}"#).is_err());
        assert_eq!(model_of(r#"{"model":"bad \q"}"#), Err(ModelFieldError::BadString));
    }

    #[test]
    fn escaped_names_and_keys_are_decoded() {
        assert_eq!(model_of(r#"{"model":"a\"b\u00e9"}"#), Ok(Some("a\"bé".into())));
        assert_eq!(model_of(r#"{"mod\u0065l":"m"}"#), Ok(Some("m".into())));
        assert_eq!(model_of(r#"{"models":"no","model":"yes"}"#), Ok(Some("yes".into())));
    }

    #[test]
    fn rewrite_replaces_only_the_model() {
        let body = br#"{"model":"tweet-summary","prompt":"keep \"model\":\"tweet-summary\""}"#;
        let rewritten = rewrite_model(body, "tweet-summary-v2").unwrap().unwrap();
        let value: serde_json::Value = serde_json::from_slice(&rewritten).unwrap();
        assert_eq!(value["model"], "tweet-summary-v2");
        assert_eq!(value["prompt"], "keep \"model\":\"tweet-summary\"");
        let odd = rewrite_model(body, "quote\"and\\slash").unwrap().unwrap();
        let value: serde_json::Value = serde_json::from_slice(&odd).unwrap();
        assert_eq!(value["model"], "quote\"and\\slash");
        assert_eq!(rewrite_model(br#"{"prompt":"x"}"#, "m"), Ok(None));
    }

    proptest! {
        /// On any JSON object serde_json writes, the scan finds what serde_json reads, and a
        /// rewrite changes exactly that member.
        #[test]
        fn agrees_with_serde_json(
            members in proptest::collection::btree_map("[a-z\"\\\\ ]{0,8}", any::<(u8, String, bool)>(), 0..6),
            model in proptest::option::of(".{0,12}"),
            new_model in ".{0,12}",
        ) {
            let mut object = serde_json::Map::new();
            for (key, (kind, text, flag)) in members {
                let value = match kind % 4 {
                    0 => serde_json::json!(text),
                    1 => serde_json::json!([text, {"model": text, "deep": [[flag]]}]),
                    2 => serde_json::json!({"model": flag, "x": [text]}),
                    _ => serde_json::json!(kind),
                };
                object.insert(key, value);
            }
            if let Some(model) = &model {
                object.insert("model".into(), serde_json::json!(model));
            }
            let body = serde_json::to_vec_pretty(&serde_json::Value::Object(object.clone())).unwrap();
            let found = find_model(&body).unwrap().map(|field| field.value.into_owned());
            prop_assert_eq!(&found, &model);
            let rewritten = rewrite_model(&body, &new_model).unwrap();
            if model.is_some() {
                let mut expected = object;
                expected.insert("model".into(), serde_json::json!(new_model));
                let parsed: serde_json::Value = serde_json::from_slice(&rewritten.unwrap()).unwrap();
                prop_assert_eq!(parsed, serde_json::Value::Object(expected));
            } else {
                prop_assert!(rewritten.is_none());
            }
        }

        /// Arbitrary bytes never panic the scan.
        #[test]
        fn never_panics(body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = find_model(&body);
        }
    }
}
