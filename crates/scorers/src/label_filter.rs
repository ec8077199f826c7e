//! `by-label`: keeps endpoints whose label has one of the allowed values.
//!
//! Parameters (llm-d): `label` (required), `validValues` (the allowed values) and
//! `allowsNoLabel` (whether endpoints without the label pass; default false).
//!
//! llm-d-router deprecates `by-label` (v0.9.0) in favour of `label-selector-filter`
//! ([`crate::label_selector`]); both stay registered, as in Go.
//!
//! The role filters of disaggregated pools are presets of it over the `llm-d.ai/role` label
//! ([`RoleFilter`]): `decode-filter`, `prefill-filter` and `encode-filter`. They take no
//! parameters. Only `decode-filter` lets endpoints without a role label through, so a pool
//! without roles serves every request from any endpoint.

use scheduler_core::{CycleState, Filter, InferenceRequest, PluginError, PoolSnapshot};
use serde::Deserialize;

/// llm-d type name.
pub const TYPE_NAME: &str = "by-label";

/// Parameters of [`ByLabelFilter`].
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ByLabelParameters {
    /// The label key.
    pub label: String,
    /// Allowed values.
    #[serde(default)]
    pub valid_values: Vec<String>,
    /// Whether endpoints without the label pass.
    #[serde(default)]
    pub allows_no_label: bool,
}

/// Keeps endpoints by label value.
#[derive(Clone, Debug)]
pub struct ByLabelFilter {
    parameters: ByLabelParameters,
}

impl ByLabelFilter {
    /// A filter with `parameters`; the label key must not be empty.
    pub fn new(parameters: ByLabelParameters) -> Result<Self, PluginError> {
        if parameters.label.trim().is_empty() {
            return Err(PluginError::InvalidParameters("'label' must name a label key".into()));
        }
        if parameters.valid_values.is_empty() && !parameters.allows_no_label {
            return Err(PluginError::InvalidParameters(
                "'validValues' is empty and 'allowsNoLabel' is false: no endpoint could pass"
                    .into(),
            ));
        }
        Ok(Self { parameters })
    }
}

impl Filter for ByLabelFilter {
    fn filter(
        &self,
        _state: &mut CycleState,
        _request: &InferenceRequest,
        pool: &PoolSnapshot,
        candidates: &mut Vec<u32>,
    ) {
        let ByLabelParameters { label, valid_values, allows_no_label } = &self.parameters;
        candidates.retain(|&index| {
            let Some(state) = pool.get(index) else { return false };
            match state.endpoint.labels.get(label) {
                Some(value) => valid_values.iter().any(|valid| valid == value),
                None => *allows_no_label,
            }
        });
    }
}

/// The label llm-d's role filters read.
pub const ROLE_LABEL: &str = "llm-d.ai/role";

/// A role filter of llm-d-router: which `llm-d.ai/role` values may serve the stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoleFilter {
    /// `decode-filter`: decode, prefill-decode, both, encode-prefill-decode, or no role.
    Decode,
    /// `prefill-filter`: prefill, encode-prefill, prefill-decode, both, encode-prefill-decode.
    Prefill,
    /// `encode-filter`: encode, encode-prefill, encode-prefill-decode.
    Encode,
}

impl RoleFilter {
    /// Every role filter.
    pub const ALL: [Self; 3] = [Self::Decode, Self::Prefill, Self::Encode];

    /// The plugin type name.
    pub const fn type_name(self) -> &'static str {
        match self {
            Self::Decode => "decode-filter",
            Self::Prefill => "prefill-filter",
            Self::Encode => "encode-filter",
        }
    }

    /// The `by-label` parameters it stands for.
    pub fn parameters(self) -> ByLabelParameters {
        let (roles, allows_no_label): (&[&str], bool) = match self {
            Self::Decode => (&["decode", "prefill-decode", "both", "encode-prefill-decode"], true),
            Self::Prefill => (
                &["prefill", "encode-prefill", "prefill-decode", "both", "encode-prefill-decode"],
                false,
            ),
            Self::Encode => (&["encode", "encode-prefill", "encode-prefill-decode"], false),
        };
        ByLabelParameters {
            label: ROLE_LABEL.to_owned(),
            valid_values: roles.iter().map(|role| (*role).to_owned()).collect(),
            allows_no_label,
        }
    }
}
