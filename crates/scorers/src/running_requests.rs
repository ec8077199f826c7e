//! `running-requests-size-scorer`: prefers endpoints running fewer requests.
//!
//! Matches llm-d-router's running-requests-size scorer: with r the endpoint's running-batch
//! size (the server's running-requests metric), score = (max_r - r) / (max_r - min_r) over the
//! candidates, and 1 for every candidate when all run the same number. The queue scorer ranks
//! by requests waiting; this one by requests already admitted, which is where decode time is
//! shared. It takes no parameters.

use scheduler_core::{Candidates, CycleState, InferenceRequest, Scorer};

/// llm-d type name.
pub const TYPE_NAME: &str = "running-requests-size-scorer";

/// Scores by running-batch size, relative to the other candidates.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunningRequestsSizeScorer;

impl Scorer for RunningRequestsSizeScorer {
    fn score(
        &self,
        _state: &mut CycleState,
        _request: &InferenceRequest,
        candidates: Candidates<'_>,
        scores: &mut [f64],
    ) {
        for (score, state) in scores.iter_mut().zip(candidates.iter()) {
            *score = f64::from(state.metrics.running);
        }
        crate::normalize::min_max_inverted(scores);
    }
}
