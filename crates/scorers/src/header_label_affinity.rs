//! `header-label-affinity-scorer`: a soft preference for endpoints whose label equals a
//! request header.
//!
//! Matches llm-d-router's `headerlabelaffinity` scorer: an endpoint whose label `labelKey`
//! equals the value of request header `headerName` scores 1, every other endpoint 0 and stays
//! eligible. A missing or empty header gives every endpoint 0. Both parameters are required;
//! the header name is compared case-insensitively (request headers arrive lowercased). One
//! instance per header-to-label mapping, so that each gets its own profile weight.

use scheduler_core::{Candidates, CycleState, InferenceRequest, PluginError, Scorer};
use serde::Deserialize;

/// llm-d type name.
pub const TYPE_NAME: &str = "header-label-affinity-scorer";

/// Parameters of [`HeaderLabelAffinityScorer`].
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderLabelAffinityParameters {
    /// The request header holding the preferred label value (required).
    #[serde(default)]
    pub header_name: String,
    /// The endpoint label compared with the header (required).
    #[serde(default)]
    pub label_key: String,
}

/// Scores 1 where the endpoint's label equals the request header, else 0.
#[derive(Clone, Debug)]
pub struct HeaderLabelAffinityScorer {
    /// Lowercased, as request header names are.
    header_name: String,
    label_key: String,
}

impl HeaderLabelAffinityScorer {
    /// A scorer for `parameters`; `headerName` and `labelKey` must both be given.
    pub fn new(parameters: HeaderLabelAffinityParameters) -> Result<Self, PluginError> {
        if parameters.header_name.is_empty() {
            return Err(PluginError::InvalidParameters("'headerName' is required".into()));
        }
        if parameters.label_key.is_empty() {
            return Err(PluginError::InvalidParameters("'labelKey' is required".into()));
        }
        Ok(Self {
            header_name: parameters.header_name.to_ascii_lowercase(),
            label_key: parameters.label_key,
        })
    }
}

impl Scorer for HeaderLabelAffinityScorer {
    fn score(
        &self,
        _state: &mut CycleState,
        request: &InferenceRequest,
        candidates: Candidates<'_>,
        scores: &mut [f64],
    ) {
        let Some(wanted) = request.header(&self.header_name).filter(|value| !value.is_empty())
        else {
            return; // scores arrive zeroed: no header, no preference
        };
        for (score, state) in scores.iter_mut().zip(candidates.iter()) {
            if state.endpoint.labels.get(&self.label_key).is_some_and(|value| value == wanted) {
                *score = 1.0;
            }
        }
    }
}
