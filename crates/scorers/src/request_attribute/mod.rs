//! `request-attribute-reporter`: reports a number computed from each response's token usage
//! back to the proxy, as dynamic metadata on the response's last body message.
//!
//! Matches llm-d-router's `requestattributereporter` plugin: exactly one attribute, with a
//! `key` (`namespace`, default `envoy.lb`, and a required `name`), a required CEL
//! `expression` over the variable `usage`, and an optional CEL `condition` that must be
//! `true` for the value to be computed. `usage` is the usage the model server reported, shaped
//! as llm-d-router shapes it: `prompt_tokens`, `completion_tokens` and `total_tokens` always
//! present (0 when not reported), `prompt_tokens_details.cached_tokens` when reported; its
//! numbers are doubles, as in a `google.protobuf.Struct`. The result, a double or an int, is
//! truncated to an integer; 0 is not reported, nor is -1 (which llm-d-router treats as its
//! own failure marker), nor anything when the condition is false or either expression fails.
//!
//! The expressions are written in the CEL subset of [`cel`]; one outside it is refused when
//! the config loads. llm-d-router calls the hook on every response chunk with the usage known
//! so far (zero until the last chunk carries it); here it runs once, when the response ends,
//! which reports the same value.

pub mod cel;

use scheduler_core::{PluginError, ReportedAttribute, ResponseUsage, UsageReporter};
use serde::Deserialize;
use serde_json::{Value as Json, json};

use cel::{Program, Value};

/// llm-d type name.
pub const TYPE_NAME: &str = "request-attribute-reporter";

/// The dynamic-metadata namespace used when an attribute names none.
pub const DEFAULT_NAMESPACE: &str = "envoy.lb";

/// Parameters of [`RequestAttributeReporter`].
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RequestAttributeReporterParameters {
    /// The attributes to report; exactly one.
    #[serde(default)]
    pub attributes: Vec<AttributeParameters>,
}

/// One reported attribute.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AttributeParameters {
    /// Where in the dynamic metadata the value goes.
    #[serde(default)]
    pub key: AttributeKey,
    /// CEL expression computing the value (a number).
    #[serde(default)]
    pub expression: String,
    /// Optional CEL expression (a bool) that must hold for the value to be reported.
    #[serde(default)]
    pub condition: String,
}

/// Where in the dynamic metadata an attribute goes.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AttributeKey {
    /// The top-level key; [`DEFAULT_NAMESPACE`] when empty.
    #[serde(default)]
    pub namespace: String,
    /// The field within the namespace (required).
    #[serde(default)]
    pub name: String,
}

/// The name of the one variable expressions read.
const USAGE_VARIABLE: &str = "usage";

/// Computes one attribute from each response's usage.
#[derive(Clone, Debug)]
pub struct RequestAttributeReporter {
    namespace: String,
    name: String,
    expression: Program,
    condition: Option<Program>,
}

impl RequestAttributeReporter {
    /// A reporter for `parameters`; refuses anything but exactly one attribute with a name and
    /// an expression, and expressions that do not compile.
    pub fn new(parameters: RequestAttributeReporterParameters) -> Result<Self, PluginError> {
        let invalid = |message: String| PluginError::InvalidParameters(message);
        let [attribute] = <[AttributeParameters; 1]>::try_from(parameters.attributes)
            .map_err(|_| invalid("'attributes' must contain exactly one entry".into()))?;
        if attribute.key.name.is_empty() {
            return Err(invalid("'attributes[0].key.name' is required".into()));
        }
        if attribute.expression.trim().is_empty() {
            return Err(invalid("'attributes[0].expression' is required".into()));
        }
        let expression = Program::compile(&attribute.expression, &[USAGE_VARIABLE])
            .map_err(|error| invalid(format!("'attributes[0].expression': {error}")))?;
        let condition = match attribute.condition.trim() {
            "" => None,
            source => Some(
                Program::compile(source, &[USAGE_VARIABLE])
                    .map_err(|error| invalid(format!("'attributes[0].condition': {error}")))?,
            ),
        };
        let namespace = match attribute.key.namespace.as_str() {
            "" => DEFAULT_NAMESPACE.to_owned(),
            namespace => namespace.to_owned(),
        };
        Ok(Self { namespace, name: attribute.key.name, expression, condition })
    }

    /// The value reported for `usage`, if any.
    pub fn value(&self, usage: &ResponseUsage) -> Option<i64> {
        let bindings = [usage_json(usage)];
        if let Some(condition) = &self.condition {
            // A condition that fails, or is not a bool, counts as false, as in llm-d-router.
            if !matches!(condition.eval(&bindings), Ok(Value::Bool(true))) {
                return None;
            }
        }
        let value = match self.expression.eval(&bindings) {
            // Truncation toward zero, saturating, as llm-d-router converts its result.
            Ok(Value::Double(value)) => value as i64,
            Ok(Value::Int(value)) => value,
            Ok(Value::Uint(value)) => i64::try_from(value).unwrap_or(i64::MAX),
            // Not a number, or the expression failed on this usage: nothing to report.
            Ok(_) | Err(_) => return None,
        };
        (value != 0 && value != -1).then_some(value)
    }
}

/// `usage` as llm-d-router's expressions see it.
fn usage_json(usage: &ResponseUsage) -> Json {
    let mut value = json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    });
    if let (Some(cached), Json::Object(map)) = (usage.cached_tokens, &mut value) {
        map.insert("prompt_tokens_details".into(), json!({ "cached_tokens": cached }));
    }
    value
}

impl UsageReporter for RequestAttributeReporter {
    fn report(&self, usage: &ResponseUsage, out: &mut Vec<ReportedAttribute>) {
        if let Some(value) = self.value(usage) {
            out.push(ReportedAttribute {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                value: value as f64,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reporter(expression: &str, condition: &str) -> RequestAttributeReporter {
        RequestAttributeReporter::new(RequestAttributeReporterParameters {
            attributes: vec![AttributeParameters {
                key: AttributeKey { namespace: String::new(), name: "cost".into() },
                expression: expression.into(),
                condition: condition.into(),
            }],
        })
        .unwrap()
    }

    fn usage(prompt: u64, completion: u64) -> ResponseUsage {
        ResponseUsage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            cached_tokens: None,
        }
    }

    #[test]
    fn reports_the_expression_under_the_default_namespace() {
        let reporter = reporter(
            "usage.prompt_tokens + usage.completion_tokens",
            "has(usage.prompt_tokens) && has(usage.completion_tokens)",
        );
        let mut out = Vec::new();
        reporter.report(&usage(10, 20), &mut out);
        assert_eq!(
            out,
            [ReportedAttribute { namespace: "envoy.lb".into(), name: "cost".into(), value: 30.0 }]
        );
    }

    #[test]
    fn zero_minus_one_false_conditions_and_failures_report_nothing() {
        assert_eq!(reporter("usage.completion_tokens", "").value(&usage(5, 0)), None);
        assert_eq!(reporter("usage.completion_tokens - 1.0", "").value(&usage(5, 0)), None);
        assert_eq!(
            reporter("usage.prompt_tokens", "usage.prompt_tokens > 9.0").value(&usage(5, 1)),
            None
        );
        assert_eq!(
            reporter("usage.prompt_tokens", "usage.prompt_tokens").value(&usage(5, 1)),
            None
        );
        assert_eq!(reporter("usage.prompt_tokens + 1", "").value(&usage(5, 1)), None);
        assert_eq!(reporter("'five'", "").value(&usage(5, 1)), None);
    }

    #[test]
    fn doubles_truncate_and_cached_tokens_appear_when_reported() {
        assert_eq!(reporter("usage.prompt_tokens / 2.0", "").value(&usage(5, 1)), Some(2));
        assert_eq!(reporter("-usage.prompt_tokens / 2.0", "").value(&usage(5, 1)), Some(-2));
        let cached =
            "has(usage.prompt_tokens_details) ? usage.prompt_tokens_details.cached_tokens : 7.0";
        assert_eq!(reporter(cached, "").value(&usage(5, 1)), Some(7));
        let with_cache = ResponseUsage { cached_tokens: Some(4), ..usage(5, 1) };
        assert_eq!(reporter(cached, "").value(&with_cache), Some(4));
    }

    #[test]
    fn bad_parameters_are_refused_by_name() {
        let error = |parameters: RequestAttributeReporterParameters| {
            RequestAttributeReporter::new(parameters).unwrap_err().to_string()
        };
        assert!(error(Default::default()).contains("exactly one"));
        let attribute = AttributeParameters {
            key: AttributeKey { namespace: String::new(), name: "cost".into() },
            expression: "usage.prompt_tokens".into(),
            condition: String::new(),
        };
        let two = RequestAttributeReporterParameters { attributes: vec![attribute.clone(); 2] };
        assert!(error(two).contains("exactly one"));
        let unnamed = AttributeParameters { key: AttributeKey::default(), ..attribute.clone() };
        let message = error(RequestAttributeReporterParameters { attributes: vec![unnamed] });
        assert!(message.contains("key.name"), "{message}");
        let empty = AttributeParameters { expression: " ".into(), ..attribute.clone() };
        let message = error(RequestAttributeReporterParameters { attributes: vec![empty] });
        assert!(message.contains("expression"), "{message}");
        let broken = AttributeParameters { condition: "has(".into(), ..attribute };
        let message = error(RequestAttributeReporterParameters { attributes: vec![broken] });
        assert!(message.contains("attributes[0].condition"), "{message}");
    }
}
