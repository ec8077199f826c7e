//! `context-length-aware`: routes requests by prompt length to endpoints labelled with the
//! range of context lengths they are meant for. A scorer always, and a filter too when
//! `enableFiltering` is set, like llm-d-router's context-length-aware plugin.
//!
//! Each endpoint may carry the label named by `label` (default
//! `llm-d.ai/context-length-range`) with a value `"min-max"` in tokens, such as `"0-2048"`.
//! With n the request's length in tokens, an endpoint scores:
//! - without the label: 0.5 (neutral);
//! - with a malformed label: 0;
//! - in range (min <= n <= max), in (0.3, 1]: 1 when min = max, else
//!   0.3 + 0.7 * (0.7 * w + 0.3 * h) with w = 1 / (1 + (max - min) / 10000) (narrow ranges
//!   are specialists) and h = (max - n) / (max - min) (headroom left);
//! - out of range, in (0, 0.3): 0.3 / (1 + d / 1000) with d the distance to the nearest bound,
//!   so an in-range endpoint always wins and, failing one, the closest range does.
//!
//! As a filter it keeps the endpoints without the label and those whose range holds n, and
//! drops those with a malformed label. It can leave no endpoint: the scheduler then reports it.
//!
//! Like llm-d-router, n is the count of the config's `token-producer` when it tokenized the
//! prompt ([`crate::token_producer::prompt_tokens`]); otherwise it is estimated from the
//! prompt's characters ([`InferenceRequest::estimated_prompt_tokens`]).

use scheduler_core::{
    Candidates, CycleState, EndpointState, Filter, InferenceRequest, PluginError, PoolSnapshot,
    Scorer,
};
use serde::Deserialize;

/// llm-d type name.
pub const TYPE_NAME: &str = "context-length-aware";

/// llm-d-router's default label.
pub const DEFAULT_LABEL: &str = "llm-d.ai/context-length-range";

/// The ceiling of out-of-range scores and the floor of in-range ones.
const MAX_FALLBACK_SCORE: f64 = 0.3;

/// Parameters of [`ContextLengthAware`].
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct ContextLengthParameters {
    /// The endpoint label holding `"min-max"` (must not be empty).
    pub label: String,
    /// Also remove endpoints whose range does not hold the request (default false).
    pub enable_filtering: bool,
}

impl Default for ContextLengthParameters {
    fn default() -> Self {
        Self { label: DEFAULT_LABEL.to_owned(), enable_filtering: false }
    }
}

/// Scores (and optionally filters) endpoints by their labelled context-length range.
#[derive(Clone, Debug)]
pub struct ContextLengthAware {
    label: String,
    enable_filtering: bool,
}

impl ContextLengthAware {
    /// A plugin with `parameters`; `label` must not be empty.
    pub fn new(parameters: ContextLengthParameters) -> Result<Self, PluginError> {
        if parameters.label.is_empty() {
            return Err(PluginError::InvalidParameters("'label' must not be empty".into()));
        }
        Ok(Self { label: parameters.label, enable_filtering: parameters.enable_filtering })
    }

    /// Whether the plugin also filters.
    pub fn filters(&self) -> bool {
        self.enable_filtering
    }

    /// The endpoint's range: `None` without the label, `Some(None)` when it is malformed.
    fn range_of(&self, state: &EndpointState) -> Option<Option<(u64, u64)>> {
        state.endpoint.labels.get(&self.label).map(|value| parse_range(value))
    }
}

/// Parses `"min-max"` (integers, surrounding spaces allowed, min <= max).
pub fn parse_range(value: &str) -> Option<(u64, u64)> {
    let (min, max) = value.split_once('-')?;
    let min = min.trim().parse::<u64>().ok()?;
    let max = max.trim().parse::<u64>().ok()?;
    (min <= max).then_some((min, max))
}

/// The score of a range `(min, max)` for a request of `length` tokens (module doc).
pub fn range_score(length: u64, (min, max): (u64, u64)) -> f64 {
    if (min..=max).contains(&length) {
        let width = max - min;
        if width == 0 {
            return 1.0;
        }
        let width_score = 1.0 / (1.0 + width as f64 / 10_000.0);
        let headroom = (max - length) as f64 / width as f64;
        let raw = 0.7 * width_score + 0.3 * headroom;
        return MAX_FALLBACK_SCORE + raw * (1.0 - MAX_FALLBACK_SCORE);
    }
    let distance = if length > max { length - max } else { min - length };
    MAX_FALLBACK_SCORE / (1.0 + distance as f64 / 1_000.0)
}

impl Scorer for ContextLengthAware {
    fn score(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        candidates: Candidates<'_>,
        scores: &mut [f64],
    ) {
        let length = crate::token_producer::prompt_tokens(state, request);
        for (score, state) in scores.iter_mut().zip(candidates.iter()) {
            *score = match self.range_of(state) {
                None => 0.5,
                Some(None) => 0.0,
                Some(Some(range)) => range_score(length, range),
            };
        }
    }
}

impl Filter for ContextLengthAware {
    fn filter(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        pool: &PoolSnapshot,
        candidates: &mut Vec<u32>,
    ) {
        if !self.enable_filtering {
            return;
        }
        let length = crate::token_producer::prompt_tokens(state, request);
        candidates.retain(|&index| {
            pool.get(index).is_some_and(|state| match self.range_of(state) {
                None => true,
                Some(None) => false,
                Some(Some((min, max))) => (min..=max).contains(&length),
            })
        });
    }
}
