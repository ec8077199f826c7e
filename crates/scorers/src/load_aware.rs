//! `load-aware-scorer`: prefers endpoints with shorter waiting queues, on an absolute scale.
//!
//! Matches llm-d-router's load-aware scorer: with q the endpoint's waiting queue and T the
//! `threshold` parameter (default 128), score = 0.5 when q = 0, else 0.5 * (1 - min(q, T) / T).
//! Unlike `queue-scorer` the scale does not depend on the other candidates, and its ceiling is
//! 0.5, not 1: an empty queue is the best load signal the metrics give, but it says nothing
//! about spare capacity, so llm-d-router leaves the upper half unused (raise the weight to
//! compensate).
//!
//! llm-d-router replaces a non-positive `threshold` by the default and logs it; here it is
//! refused when the config is loaded, so a mistyped threshold cannot go unnoticed.

use scheduler_core::{Candidates, CycleState, InferenceRequest, PluginError, Scorer};
use serde::Deserialize;

/// llm-d type name.
pub const TYPE_NAME: &str = "load-aware-scorer";

/// llm-d-router's default queue threshold.
pub const DEFAULT_THRESHOLD: i64 = 128;

/// The score of an endpoint with an empty queue (the scorer's ceiling).
const IDLE_SCORE: f64 = 0.5;

/// Parameters of [`LoadAwareScorer`].
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadAwareParameters {
    /// Waiting-queue depth at which the score reaches 0 (default 128; must be positive).
    pub threshold: i64,
}

impl Default for LoadAwareParameters {
    fn default() -> Self {
        Self { threshold: DEFAULT_THRESHOLD }
    }
}

/// Scores by waiting-queue depth against a fixed threshold.
#[derive(Clone, Copy, Debug)]
pub struct LoadAwareScorer {
    threshold: f64,
}

impl LoadAwareScorer {
    /// A scorer with `parameters`; `threshold` must be positive.
    pub fn new(parameters: LoadAwareParameters) -> Result<Self, PluginError> {
        if parameters.threshold <= 0 {
            return Err(PluginError::InvalidParameters(format!(
                "'threshold' must be positive, got {}",
                parameters.threshold
            )));
        }
        Ok(Self { threshold: parameters.threshold as f64 })
    }
}

impl Default for LoadAwareScorer {
    fn default() -> Self {
        Self { threshold: DEFAULT_THRESHOLD as f64 }
    }
}

impl Scorer for LoadAwareScorer {
    fn score(
        &self,
        _state: &mut CycleState,
        _request: &InferenceRequest,
        candidates: Candidates<'_>,
        scores: &mut [f64],
    ) {
        for (score, state) in scores.iter_mut().zip(candidates.iter()) {
            let waiting = f64::from(state.metrics.waiting_queue).min(self.threshold);
            *score = IDLE_SCORE * (1.0 - waiting / self.threshold);
        }
    }
}
