//! `kv-cache-utilization-scorer`: prefers endpoints with free KV-cache space.
//!
//! Score = 1 - kv_usage, with usage clamped to `[0, 1]` (servers report slightly above 1 while
//! preempting). Absolute, not relative: a pool where every server is full scores all near 0.
//!
//! With lag compensation (the default) and a known KV capacity, usage also counts the prompt
//! tokens (at 16 tokens per block) this picker sent after the metrics were scraped.

use scheduler_core::{Candidates, CycleState, InferenceRequest, Scorer};

use crate::lag_compensation::{LoadScorerParameters, TOKENS_PER_KV_BLOCK, pending_since_scrape};

/// GIE type name.
pub const TYPE_NAME: &str = "kv-cache-utilization-scorer";
/// The name later GIE and llm-d configs use for the same scorer.
pub const ALIAS_TYPE_NAME: &str = "kv-cache-scorer";

/// Scores by free KV-cache fraction.
#[derive(Debug, Default, Clone, Copy)]
pub struct KvCacheUtilizationScorer {
    parameters: LoadScorerParameters,
}

impl KvCacheUtilizationScorer {
    /// A scorer with `parameters`.
    pub fn new(parameters: LoadScorerParameters) -> Self {
        Self { parameters }
    }
}

impl Scorer for KvCacheUtilizationScorer {
    fn score(
        &self,
        _state: &mut CycleState,
        _request: &InferenceRequest,
        candidates: Candidates<'_>,
        scores: &mut [f64],
    ) {
        let compensate = self.parameters.lag_compensation;
        for (score, state) in scores.iter_mut().zip(candidates.iter()) {
            let mut usage = state.metrics.kv_usage;
            // Checked first: without compensation the division below is skipped per endpoint.
            if compensate
                && let Some(capacity) = state.metrics.kv_capacity_blocks.filter(|c| *c > 0)
            {
                let pending = pending_since_scrape(state, compensate);
                // In floating point: a host may report any capacity, up to u64::MAX.
                usage += pending.tokens as f64 / (capacity as f64 * TOKENS_PER_KV_BLOCK as f64);
            }
            *score = if usage.is_nan() { 0.0 } else { 1.0 - usage.clamp(0.0, 1.0) };
        }
    }
}
