//! `kv-cache-utilization-scorer`: prefers endpoints with free KV-cache space.
//!
//! Score = 1 - kv_usage, with usage clamped to `[0, 1]` (servers report slightly above 1 while
//! preempting). Absolute, not relative: a pool where every server is full scores all near 0.

use scheduler_core::{Candidates, CycleState, InferenceRequest, Scorer};

/// GIE type name.
pub const TYPE_NAME: &str = "kv-cache-utilization-scorer";
/// The name later GIE and llm-d configs use for the same scorer.
pub const ALIAS_TYPE_NAME: &str = "kv-cache-scorer";

/// Scores by free KV-cache fraction.
#[derive(Debug, Default, Clone, Copy)]
pub struct KvCacheUtilizationScorer;

impl Scorer for KvCacheUtilizationScorer {
    fn score(
        &self,
        _state: &mut CycleState,
        _request: &InferenceRequest,
        candidates: Candidates<'_>,
        scores: &mut [f64],
    ) {
        for (score, state) in scores.iter_mut().zip(candidates.iter()) {
            let usage = state.metrics.kv_usage;
            *score = if usage.is_nan() { 0.0 } else { 1.0 - usage.clamp(0.0, 1.0) };
        }
    }
}
