//! `token-load-scorer`: prefers endpoints with fewer prompt tokens in flight.
//!
//! Matches llm-d-router's token-load scorer: with t the tokens an endpoint is committed to
//! and T the `queueThresholdTokens` parameter (default 4,194,304: 128 requests of 32K
//! tokens), score = 1 - min(t, T) / T, so an idle endpoint scores 1 and one at or past T
//! scores 0. Counting tokens rather than requests tells a long prompt from a short one.
//!
//! In llm-d-router, t is the in-flight-load producer's token count for the endpoint (prompt
//! tokens of the requests sent there whose prefill has not finished) plus the tokens the
//! request being scheduled would add there (its uncached part). epp-rs has no such producer;
//! the closest signal it has is the endpoint's dispatch log: the estimated prompt tokens of
//! the requests this picker sent there since its metrics were last scraped, which are the
//! most recent and so the likeliest still in prefill. To these it adds the request's own
//! estimated prompt tokens ([`InferenceRequest::estimated_prompt_tokens`], about 4
//! characters a token), whole on every endpoint: what llm-d-router adds when no prefix-cache
//! information is available.
//!
//! `inFlightLoadProducerName` selects the producer in llm-d-router; it is accepted (so its
//! configs load unchanged) and has no effect here. A non-positive `queueThresholdTokens`,
//! which llm-d-router silently replaces by the default, is refused.

use scheduler_core::{Candidates, CycleState, InferenceRequest, PluginError, Scorer};
use serde::Deserialize;

/// llm-d type name.
pub const TYPE_NAME: &str = "token-load-scorer";

/// llm-d-router's default threshold: 128 requests of 32K tokens.
pub const DEFAULT_QUEUE_THRESHOLD_TOKENS: i64 = 4_194_304;

/// Parameters of [`TokenLoadScorer`].
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct TokenLoadParameters {
    /// In-flight tokens at which the score reaches 0 (default 4,194,304; must be positive).
    pub queue_threshold_tokens: i64,
    /// The llm-d-router producer of in-flight load; accepted and ignored (see module doc).
    pub in_flight_load_producer_name: Option<String>,
}

impl Default for TokenLoadParameters {
    fn default() -> Self {
        Self {
            queue_threshold_tokens: DEFAULT_QUEUE_THRESHOLD_TOKENS,
            in_flight_load_producer_name: None,
        }
    }
}

/// Scores by estimated prompt tokens in flight against a fixed threshold.
#[derive(Clone, Copy, Debug)]
pub struct TokenLoadScorer {
    threshold: f64,
}

impl TokenLoadScorer {
    /// A scorer with `parameters`; `queueThresholdTokens` must be positive.
    pub fn new(parameters: &TokenLoadParameters) -> Result<Self, PluginError> {
        if parameters.queue_threshold_tokens <= 0 {
            return Err(PluginError::InvalidParameters(format!(
                "'queueThresholdTokens' must be positive, got {}",
                parameters.queue_threshold_tokens
            )));
        }
        Ok(Self { threshold: parameters.queue_threshold_tokens as f64 })
    }

    /// The score of an endpoint with `tokens` in flight (the request's own included).
    pub fn score_of(&self, tokens: u64) -> f64 {
        1.0 - (tokens as f64).min(self.threshold) / self.threshold
    }
}

impl Default for TokenLoadScorer {
    fn default() -> Self {
        Self { threshold: DEFAULT_QUEUE_THRESHOLD_TOKENS as f64 }
    }
}

impl Scorer for TokenLoadScorer {
    fn score(
        &self,
        _state: &mut CycleState,
        request: &InferenceRequest,
        candidates: Candidates<'_>,
        scores: &mut [f64],
    ) {
        let own = request.estimated_prompt_tokens();
        for (score, state) in scores.iter_mut().zip(candidates.iter()) {
            // Always compensated: the picks since the scrape are the only in-flight signal.
            let pending = crate::lag_compensation::pending_since_scrape(state, true).tokens;
            *score = self.score_of(pending.saturating_add(own));
        }
    }
}
