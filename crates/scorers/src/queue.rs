//! `queue-scorer`: prefers endpoints with shorter waiting queues.
//!
//! Score = (max_q - q) / (max_q - min_q) over the candidates, where q is the server's waiting
//! queue; when every candidate has the same queue, all score 1. Min-max normalisation (GIE's
//! formula) ranks relative load within the request's candidates, whatever the absolute depth.

use scheduler_core::{Candidates, CycleState, InferenceRequest, Scorer};

/// GIE type name.
pub const TYPE_NAME: &str = "queue-scorer";

/// Scores by waiting-queue depth, relative to the other candidates.
#[derive(Debug, Default, Clone, Copy)]
pub struct QueueScorer;

impl Scorer for QueueScorer {
    fn score(
        &self,
        _state: &mut CycleState,
        _request: &InferenceRequest,
        candidates: Candidates<'_>,
        scores: &mut [f64],
    ) {
        for (score, state) in scores.iter_mut().zip(candidates.iter()) {
            *score = f64::from(state.metrics.waiting_queue);
        }
        crate::normalize::min_max_inverted(scores);
    }
}
