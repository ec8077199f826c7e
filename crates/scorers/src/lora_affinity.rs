//! `lora-affinity-scorer`: prefers endpoints that already serve the request's LoRA adapter.
//!
//! Score (GIE): 1.0 when the adapter is active on the endpoint; 0.8 when it is not loaded but
//! the endpoint has a free adapter slot; 0.6 when the adapter is waiting to load there; 0
//! otherwise. The request's adapter is its target model name: requests for a base model find
//! it in no adapter list, so endpoints differ only by free slots.

use scheduler_core::{Candidates, CycleState, EndpointMetrics, InferenceRequest, Scorer};

/// GIE type name.
pub const TYPE_NAME: &str = "lora-affinity-scorer";

/// Scores by adapter residency.
#[derive(Debug, Default, Clone, Copy)]
pub struct LoraAffinityScorer;

/// The affinity of `metrics` for `adapter`, per the module's formula.
pub fn lora_affinity(metrics: &EndpointMetrics, adapter: &str) -> f64 {
    if metrics.has_active_adapter(adapter) {
        1.0
    } else if metrics.has_free_adapter_slot() {
        0.8
    } else if metrics.has_waiting_adapter(adapter) {
        0.6
    } else {
        0.0
    }
}

impl Scorer for LoraAffinityScorer {
    fn score(
        &self,
        _state: &mut CycleState,
        request: &InferenceRequest,
        candidates: Candidates<'_>,
        scores: &mut [f64],
    ) {
        for (score, state) in scores.iter_mut().zip(candidates.iter()) {
            *score = lora_affinity(&state.metrics, &request.target_model);
        }
    }
}
