//! `queue-scorer`: prefers endpoints with shorter waiting queues.
//!
//! Score = (max_q - q) / (max_q - min_q) over the candidates, where q is the server's waiting
//! queue; when every candidate has the same queue, all score 1. Min-max normalisation (GIE's
//! formula) ranks relative load within the request's candidates, whatever the absolute depth.
//!
//! With lag compensation (the default), q also counts a quarter of each request this picker
//! sent to the server after its metrics were scraped (see [`scheduler_core::DispatchLog`]), so
//! consecutive decisions between two scrapes spread instead of all picking the same server.

use scheduler_core::{Candidates, CycleState, InferenceRequest, Scorer};

use crate::lag_compensation::{LoadScorerParameters, pending_since_scrape};

/// GIE type name.
pub const TYPE_NAME: &str = "queue-scorer";

/// How much of a waiting request a request sent since the scrape counts as. Most are admitted
/// into the running batch at once and never wait (vLLM admits while its token budget and KV
/// blocks allow), so a whole request each overstates the queue; under heavy load it then
/// outweighs prefix affinity; a quarter keeps the spreading between scrapes without the loss
/// of cache hits a whole request causes past saturation (measured in the simulator:
/// `docs/simulator.md`, lag compensation). Scale-free when no endpoint is queueing: min-max
/// normalisation then ranks by pending requests alone.
const PENDING_REQUEST_WEIGHT: f64 = 0.25;

/// Scores by waiting-queue depth, relative to the other candidates.
#[derive(Debug, Default, Clone, Copy)]
pub struct QueueScorer {
    parameters: LoadScorerParameters,
}

impl QueueScorer {
    /// A scorer with `parameters`.
    pub fn new(parameters: LoadScorerParameters) -> Self {
        Self { parameters }
    }
}

impl Scorer for QueueScorer {
    fn score(
        &self,
        _state: &mut CycleState,
        _request: &InferenceRequest,
        candidates: Candidates<'_>,
        scores: &mut [f64],
    ) {
        let compensate = self.parameters.lag_compensation;
        for (score, state) in scores.iter_mut().zip(candidates.iter()) {
            let pending = pending_since_scrape(state, compensate).requests;
            *score = f64::from(state.metrics.waiting_queue)
                + f64::from(pending) * PENDING_REQUEST_WEIGHT;
        }
        crate::normalize::min_max_inverted(scores);
    }
}
