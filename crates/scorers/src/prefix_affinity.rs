//! `prefix-cache-affinity-filter`: narrows the candidates to the "sticky" endpoints, those
//! already holding most of the prompt, so that a spreading picker spreads among them only.
//!
//! Matches llm-d-router's `prefixcacheaffinity` filter. An endpoint is sticky when its prefix
//! match ratio (matched / prompt blocks) is at least `affinityThreshold` (default 0.80). The
//! candidates are left unchanged when there is at most one, when the threshold is 0 or
//! below, with probability `explorationProbability` (default 0; drawn from the decision's
//! seeded random source), or when no candidate is sticky. The filter never empties the set.
//!
//! The ratios are the ones `prefix-cache-scorer` computes: as a data producer it matches the
//! prompt once, before the profiles run, and leaves the result in the decision's
//! [`CycleState`] ([`crate::prefix_cache`]). Without a `prefix-cache-scorer` in the config no
//! ratio is produced and the filter keeps everything, as Go's does without
//! `PrefixCacheMatchInfo`.
//!
//! Go's TTFT load gate (`maxTTFTPenaltyMs`, `ttftSource`, `peakPrefillThroughput`) breaks
//! stickiness when the best sticky endpoint's TTFT exceeds the best other one's by more than
//! the penalty. It reads per-endpoint in-flight tokens or predicted TTFT, which epp-rs does
//! not produce; Go treats those as absent (zero tokens, or an unknown TTFT on every endpoint),
//! which never breaks stickiness. The parameters are accepted and validated as in Go and the
//! gate behaves as Go's does without its producers: it never opens.

use rand::Rng;
use scheduler_core::{CycleState, Filter, InferenceRequest, PluginError, PoolSnapshot};
use serde::Deserialize;

use crate::prefix_cache::PrefixMatchInfo;

/// llm-d type name.
pub const TYPE_NAME: &str = "prefix-cache-affinity-filter";

const PREFILL_THROUGHPUT: &str = "prefillThroughput";
const LATENCY_PREDICTOR: &str = "latencyPredictor";

/// Parameters of [`PrefixCacheAffinityFilter`] (Go `Config`); defaults as Go's `DefaultConfig`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PrefixCacheAffinityParameters {
    /// Match ratio from which an endpoint is sticky, at most 1 (default 0.80).
    #[serde(default)]
    pub affinity_threshold: Option<f64>,
    /// Probability of keeping every candidate, in `[0, 1]` (default 0).
    #[serde(default)]
    pub exploration_probability: Option<f64>,
    /// TTFT penalty (ms) beyond which stickiness breaks, at least 0 (default 18000).
    #[serde(default, rename = "maxTTFTPenaltyMs")]
    pub max_ttft_penalty_ms: Option<f64>,
    /// `prefillThroughput` (default) or `latencyPredictor`.
    #[serde(default, rename = "ttftSource")]
    pub ttft_source: Option<String>,
    /// Peak prefill throughput in tokens a second, at least 0 (default 15928).
    #[serde(default)]
    pub peak_prefill_throughput: Option<f64>,
    /// Producer of the prefix match info (one producer here: accepted, unused).
    #[serde(default)]
    pub prefix_match_info_producer_name: Option<String>,
    /// Producer of the latency prediction (accepted, unused).
    #[serde(default)]
    pub latency_prediction_info_producer_name: Option<String>,
    /// Producer of the in-flight load (accepted, unused).
    #[serde(default)]
    pub in_flight_load_producer_name: Option<String>,
}

/// Keeps the sticky endpoints when there are any.
#[derive(Clone, Debug)]
pub struct PrefixCacheAffinityFilter {
    affinity_threshold: f64,
    exploration_probability: f64,
}

impl PrefixCacheAffinityFilter {
    /// A filter for `parameters`, validated as Go's `Config.validate`.
    pub fn new(parameters: PrefixCacheAffinityParameters) -> Result<Self, PluginError> {
        let invalid = |message: String| Err(PluginError::InvalidParameters(message));
        let affinity_threshold = parameters.affinity_threshold.unwrap_or(0.80);
        if affinity_threshold > 1.0 {
            return invalid(format!("'affinityThreshold' must be <= 1, got {affinity_threshold}"));
        }
        let exploration_probability = parameters.exploration_probability.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&exploration_probability) {
            return invalid(format!(
                "'explorationProbability' must be in [0, 1], got {exploration_probability}"
            ));
        }
        let max_ttft_penalty_ms = parameters.max_ttft_penalty_ms.unwrap_or(18000.0);
        if max_ttft_penalty_ms < 0.0 {
            return invalid(format!("'maxTTFTPenaltyMs' must be >= 0, got {max_ttft_penalty_ms}"));
        }
        let peak_prefill_throughput = parameters.peak_prefill_throughput.unwrap_or(15928.0);
        if peak_prefill_throughput < 0.0 {
            return invalid(format!(
                "'peakPrefillThroughput' must be >= 0, got {peak_prefill_throughput}"
            ));
        }
        match parameters.ttft_source.as_deref().unwrap_or(PREFILL_THROUGHPUT) {
            LATENCY_PREDICTOR => {}
            PREFILL_THROUGHPUT if max_ttft_penalty_ms > 0.0 && peak_prefill_throughput == 0.0 => {
                return invalid(
                    "'peakPrefillThroughput' must be > 0 when 'ttftSource' is prefillThroughput"
                        .into(),
                );
            }
            PREFILL_THROUGHPUT => {}
            other => {
                return invalid(format!(
                    "'ttftSource' must be '{PREFILL_THROUGHPUT}' or '{LATENCY_PREDICTOR}', got '{other}'"
                ));
            }
        }
        Ok(Self { affinity_threshold, exploration_probability })
    }
}

impl Filter for PrefixCacheAffinityFilter {
    fn filter(
        &self,
        state: &mut CycleState,
        _request: &InferenceRequest,
        _pool: &PoolSnapshot,
        candidates: &mut Vec<u32>,
    ) {
        if candidates.len() <= 1 || self.affinity_threshold <= 0.0 {
            return;
        }
        // Drawn only when exploring is possible, so that the decision's other draws do not
        // depend on whether this filter is configured with the default.
        if self.exploration_probability > 0.0
            && state.rng().random::<f64>() < self.exploration_probability
        {
            return;
        }
        let decision = state.decision_stamp();
        let info = state.scratch::<PrefixMatchInfo>();
        let sticky = |index: u32| info.ratio(decision, index) >= self.affinity_threshold;
        if candidates.iter().any(|&index| sticky(index)) {
            candidates.retain(|&index| sticky(index));
        }
    }
}
