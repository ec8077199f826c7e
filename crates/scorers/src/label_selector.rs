//! `label-selector-filter`: keeps endpoints whose labels satisfy a Kubernetes label selector.
//!
//! Matches llm-d-router's `bylabel.Selector` (`label-selector-filter`, also registered under
//! its deprecated name `by-label-selector`). The parameters are a `metav1.LabelSelector`:
//! `matchLabels` (every pair must match) and `matchExpressions` (`key`, `operator`, `values`),
//! all requirements ANDed, as `metav1.LabelSelectorAsSelector` builds them:
//!
//! | operator | keeps an endpoint when |
//! |---|---|
//! | `In` | the label is present and its value is one of `values` |
//! | `NotIn` | the label is absent or its value is none of `values` |
//! | `Exists` | the label is present |
//! | `DoesNotExist` | the label is absent |
//!
//! `In`/`NotIn` need at least one value, `Exists`/`DoesNotExist` none; any other operator is
//! refused. An empty selector keeps every endpoint. Unlike Go, label key syntax is not
//! checked beyond being non-empty: a key that is not a valid label name simply never matches.
//!
//! The older `by-label` filter ([`crate::label_filter`]) has its own parameters (one label,
//! `validValues`, `allowsNoLabel`); Go deprecates it in favour of this one.

use std::collections::BTreeMap;

use scheduler_core::{CycleState, Filter, InferenceRequest, PluginError, PoolSnapshot};
use serde::Deserialize;

/// llm-d type name.
pub const TYPE_NAME: &str = "label-selector-filter";
/// The deprecated llm-d type name of the same filter (deprecated in llm-d-router v0.9.0).
pub const DEPRECATED_TYPE_NAME: &str = "by-label-selector";

/// Parameters of [`LabelSelectorFilter`]: a Kubernetes `LabelSelector`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelectorParameters {
    /// Labels that must all be present with exactly these values.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    /// Further requirements, all of which must hold.
    #[serde(default)]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LabelSelectorRequirement {
    /// The label key.
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: String,
    /// The values `In` and `NotIn` compare with (`null` reads as none, as in Go).
    #[serde(default)]
    pub values: Option<Vec<String>>,
}

/// A parsed requirement.
#[derive(Clone, Debug, PartialEq)]
enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Self::In(key, values) => labels.get(key).is_some_and(|value| values.contains(value)),
            Self::NotIn(key, values) => labels.get(key).is_none_or(|value| !values.contains(value)),
            Self::Exists(key) => labels.contains_key(key),
            Self::DoesNotExist(key) => !labels.contains_key(key),
        }
    }
}

/// Keeps the endpoints matching a label selector.
#[derive(Clone, Debug)]
pub struct LabelSelectorFilter {
    requirements: Vec<Requirement>,
}

impl LabelSelectorFilter {
    /// A filter for the selector in `parameters`; refuses an unknown operator, or values that
    /// do not suit the operator, naming the offending `matchExpressions` entry.
    pub fn new(parameters: LabelSelectorParameters) -> Result<Self, PluginError> {
        let invalid = |message: String| Err(PluginError::InvalidParameters(message));
        let mut requirements = Vec::new();
        for (key, value) in parameters.match_labels {
            if key.is_empty() {
                return invalid("matchLabels: a label key must not be empty".into());
            }
            requirements.push(Requirement::In(key, vec![value]));
        }
        for (position, expression) in parameters.match_expressions.into_iter().enumerate() {
            let LabelSelectorRequirement { key, operator, values } = expression;
            let values = values.unwrap_or_default();
            let at = format!("matchExpressions[{position}]");
            if key.is_empty() {
                return invalid(format!("{at}.key: must not be empty"));
            }
            let requirement = match operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return invalid(format!("{at}.values: must be non-empty for '{operator}'"));
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return invalid(format!("{at}.values: must be empty for '{operator}'"));
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                _ => {
                    return invalid(format!(
                        "{at}.operator: '{operator}' is not one of In, NotIn, Exists, DoesNotExist"
                    ));
                }
            };
            requirements.push(requirement);
        }
        Ok(Self { requirements })
    }

    /// Whether an endpoint with `labels` passes.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|requirement| requirement.matches(labels))
    }
}

impl Filter for LabelSelectorFilter {
    fn filter(
        &self,
        _state: &mut CycleState,
        _request: &InferenceRequest,
        pool: &PoolSnapshot,
        candidates: &mut Vec<u32>,
    ) {
        if self.requirements.is_empty() {
            return; // the empty selector selects everything
        }
        candidates.retain(|&index| {
            pool.get(index).is_some_and(|state| self.matches(&state.endpoint.labels))
        });
    }
}
