//! The parts of a model's `tokenizer_config.json` that prompt rendering needs.

use serde::Deserialize;
use serde_json::Value;

use crate::error::TokenizerError;

/// The chat template and special tokens of a `tokenizer_config.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenizerConfig {
    /// The default chat template, if the model has one.
    pub chat_template: Option<String>,
    /// The beginning-of-sequence token's text (empty when none).
    pub bos_token: String,
    /// The end-of-sequence token's text (empty when none).
    pub eos_token: String,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    chat_template: Option<Value>,
    #[serde(default)]
    bos_token: Option<Value>,
    #[serde(default)]
    eos_token: Option<Value>,
}

impl TokenizerConfig {
    /// Reads the JSON text of a `tokenizer_config.json`. `chat_template` is a string, or a
    /// list of `{name, template}` of which the one named `default` is used (as transformers
    /// does); a special token is a string or an added-token object with `content`.
    pub fn from_json(text: &str) -> Result<Self, TokenizerError> {
        let raw: RawConfig = serde_json::from_str(text)
            .map_err(|error| TokenizerError::Config(error.to_string()))?;
        let chat_template = match raw.chat_template {
            None | Some(Value::Null) => None,
            Some(Value::String(template)) => Some(template),
            Some(Value::Array(named)) => Some(default_of(&named)?),
            Some(other) => {
                return Err(TokenizerError::Config(format!(
                    "chat_template is {}, not a string or a list of named templates",
                    kind(&other)
                )));
            }
        };
        Ok(Self {
            chat_template,
            bos_token: token_text("bos_token", raw.bos_token)?,
            eos_token: token_text("eos_token", raw.eos_token)?,
        })
    }
}

/// The template named `default` in a list of `{name, template}`.
fn default_of(named: &[Value]) -> Result<String, TokenizerError> {
    for entry in named {
        let name = entry.get("name").and_then(Value::as_str);
        let template = entry.get("template").and_then(Value::as_str);
        match (name, template) {
            (Some("default"), Some(template)) => return Ok(template.to_owned()),
            (Some(_), Some(_)) => {}
            _ => {
                return Err(TokenizerError::Config(
                    "chat_template list entries need a string name and template".to_owned(),
                ));
            }
        }
    }
    Err(TokenizerError::Config("chat_template lists no template named default".to_owned()))
}

fn token_text(field: &str, value: Option<Value>) -> Result<String, TokenizerError> {
    match value {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(text)) => Ok(text),
        Some(Value::Object(token)) => match token.get("content") {
            Some(Value::String(text)) => Ok(text.clone()),
            _ => Err(TokenizerError::Config(format!("{field} has no string content"))),
        },
        Some(other) => Err(TokenizerError::Config(format!(
            "{field} is {}, not a string or an added token",
            kind(&other)
        ))),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_and_object_tokens_and_a_plain_template() {
        let config = TokenizerConfig::from_json(
            r#"{"chat_template": "{{ bos_token }}", "bos_token": "<s>",
                "eos_token": {"content": "</s>", "lstrip": false}, "model_max_length": 8192}"#,
        )
        .unwrap();
        assert_eq!(config.chat_template.as_deref(), Some("{{ bos_token }}"));
        assert_eq!((config.bos_token.as_str(), config.eos_token.as_str()), ("<s>", "</s>"));
    }

    #[test]
    fn the_default_of_named_templates_is_chosen() {
        let config = TokenizerConfig::from_json(
            r#"{"chat_template": [{"name": "tool_use", "template": "T"},
                                  {"name": "default", "template": "D"}]}"#,
        )
        .unwrap();
        assert_eq!(config.chat_template.as_deref(), Some("D"));
        assert_eq!(config.bos_token, "");
    }

    #[test]
    fn bad_shapes_are_named() {
        for (text, words) in [
            (r#"{"chat_template": 3}"#, "chat_template is a number"),
            (r#"{"chat_template": [{"name": "x", "template": "y"}]}"#, "no template named default"),
            (r#"{"bos_token": {"lstrip": true}}"#, "bos_token has no string content"),
            (r#"{"eos_token": []}"#, "eos_token is a list"),
            ("not json", "expected"),
        ] {
            let error = TokenizerConfig::from_json(text).unwrap_err().to_string();
            assert!(error.contains(words), "{text}: {error}");
        }
    }

    #[test]
    fn a_config_without_a_template_has_none() {
        assert_eq!(TokenizerConfig::from_json("{}").unwrap(), TokenizerConfig::default());
    }
}
