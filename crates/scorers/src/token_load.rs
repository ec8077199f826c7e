//! `token-load-scorer`: prefers endpoints with fewer prompt tokens in flight.
//!
//! Matches llm-d-router's token-load scorer: with t the tokens an endpoint is committed to
//! and T the `queueThresholdTokens` parameter (default 4,194,304: 128 requests of 32K
//! tokens), score = 1 - min(t, T) / T, so an idle endpoint scores 1 and one at or past T
//! scores 0. Counting tokens rather than requests tells a long prompt from a short one.
//!
//! As in llm-d-router, t is an in-flight-load producer's token count for the endpoint
//! ([`crate::inflight_load`]: the tokens of the requests sent there whose prefill has not
//! finished) plus the tokens the request being scheduled would add there. The producer is the
//! one named `inFlightLoadProducerName`, else the config's `inflight-load-producer`, created
//! with default parameters when not declared; a name the config does not declare is refused.
//!
//! A scorer built directly ([`TokenLoadScorer::new`]) without a producer bound falls back on
//! the endpoint's dispatch log: the estimated prompt tokens of the requests this picker sent
//! there since its metrics were last scraped, plus the request's own estimated prompt tokens
//! ([`InferenceRequest::estimated_prompt_tokens`]). A non-positive `queueThresholdTokens`,
//! which llm-d-router silently replaces by the default, is refused.

use std::sync::{Arc, OnceLock};

use scheduler_core::{
    BindPlugins, Candidates, ConstructedPlugins, CycleState, InferenceRequest, PluginError, Scorer,
};
use serde::Deserialize;

use crate::inflight_load::{self, InFlightLoad};

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
    /// The in-flight load producer read (default: `inflight-load-producer`).
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
#[derive(Debug)]
pub struct TokenLoadScorer {
    threshold: f64,
    producer_name: String,
    producer: OnceLock<Arc<InFlightLoad>>,
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
        let producer_name = match parameters.in_flight_load_producer_name.as_deref() {
            None | Some("") => inflight_load::TYPE_NAME.to_owned(),
            Some(name) => name.to_owned(),
        };
        Ok(Self {
            threshold: parameters.queue_threshold_tokens as f64,
            producer_name,
            producer: OnceLock::new(),
        })
    }

    /// The default producer this scorer needs created when the config declares none.
    pub fn default_producers(&self) -> Vec<&'static str> {
        if self.producer_name == inflight_load::TYPE_NAME {
            vec![inflight_load::TYPE_NAME]
        } else {
            Vec::new()
        }
    }

    /// The score of an endpoint with `tokens` in flight (the request's own included).
    pub fn score_of(&self, tokens: u64) -> f64 {
        1.0 - (tokens as f64).min(self.threshold) / self.threshold
    }
}

impl Default for TokenLoadScorer {
    fn default() -> Self {
        Self {
            threshold: DEFAULT_QUEUE_THRESHOLD_TOKENS as f64,
            producer_name: inflight_load::TYPE_NAME.to_owned(),
            producer: OnceLock::new(),
        }
    }
}

impl BindPlugins for TokenLoadScorer {
    fn bind(&self, plugins: &ConstructedPlugins) -> Result<(), PluginError> {
        let _ = self.producer.set(inflight_load::named(plugins, &self.producer_name)?);
        Ok(())
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
        if let Some(producer) = self.producer.get() {
            // Without a prefix discount the request adds the same tokens everywhere.
            let own = producer.request_tokens(request);
            for (score, state) in scores.iter_mut().zip(candidates.iter()) {
                let tokens = producer.tokens(state.id()).saturating_add(own).max(0);
                *score = self.score_of(tokens as u64);
            }
            return;
        }
        let own = request.estimated_prompt_tokens();
        for (score, state) in scores.iter_mut().zip(candidates.iter()) {
            // Always compensated: the picks since the scrape are the only in-flight signal.
            let pending = crate::lag_compensation::pending_since_scrape(state, true).tokens;
            *score = self.score_of(pending.saturating_add(own));
        }
    }
}
