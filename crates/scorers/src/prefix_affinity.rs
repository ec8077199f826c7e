//! `prefix-cache-affinity-filter`: narrows the candidates to the "sticky" endpoints, those
//! already holding most of the prompt, so that a spreading picker spreads among them only.
//!
//! Matches llm-d-router's `prefixcacheaffinity` filter. An endpoint is sticky when its prefix
//! match ratio (matched / prompt blocks) is at least `affinityThreshold` (default 0.80). The
//! candidates are left unchanged when there is at most one, when the threshold is 0 or
//! below, with probability `explorationProbability` (default 0; drawn from the decision's
//! seeded random source), or when no candidate is sticky. The filter never empties the set.
//!
//! The ratios come from a prefix producer ([`crate::prefix_cache`]): the
//! `approx-prefix-cache-producer` named by `prefixMatchInfoProducerName`, else the one declared
//! under that default name, else the index of the config's first `prefix-cache-scorer`. The
//! producer matches the prompt once per decision and leaves the result in the decision's
//! [`CycleState`]. Without any producer in the config the filter keeps everything, as Go's
//! does without `PrefixCacheMatchInfo`.
//!
//! Go's TTFT load gate breaks stickiness (keeps every candidate) when the best sticky
//! endpoint's TTFT exceeds the best other one's by more than `maxTTFTPenaltyMs` (default
//! 18000; 0 turns the gate off). With `ttftSource: prefillThroughput` (the default) an
//! endpoint's TTFT is its in-flight tokens / `peakPrefillThroughput` (default 15928 tokens a
//! second) in milliseconds, the tokens from the `inflight-load-producer` named
//! `inFlightLoadProducerName`, else the config's default one (created when not declared, as
//! Go creates it). With `ttftSource: latencyPredictor` it reads predicted TTFTs, which
//! epp-rs does not produce; Go then sees an unknown TTFT everywhere, which never opens the
//! gate, and neither does this filter.

use std::sync::{Arc, OnceLock};

use rand::Rng;
use scheduler_core::{
    BindPlugins, ConstructedPlugins, CycleState, Filter, InferenceRequest, PluginError,
    PoolSnapshot,
};
use serde::Deserialize;

use crate::inflight_load::{self, InFlightLoad};
use crate::prefix_cache::PrefixSource;
use crate::prefix_cache::producer::{
    PRODUCER_TYPE_NAME, declared_source, every_source, named_producer,
};

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
    /// The `approx-prefix-cache-producer` whose matches the filter reads.
    #[serde(default)]
    pub prefix_match_info_producer_name: Option<String>,
    /// Producer of the latency prediction (accepted, unused).
    #[serde(default)]
    pub latency_prediction_info_producer_name: Option<String>,
    /// Producer of the in-flight load the TTFT gate reads (default: `inflight-load-producer`).
    #[serde(default)]
    pub in_flight_load_producer_name: Option<String>,
}

/// Keeps the sticky endpoints when there are any.
#[derive(Debug)]
pub struct PrefixCacheAffinityFilter {
    affinity_threshold: f64,
    exploration_probability: f64,
    producer_name: Option<String>,
    /// Where the matches come from, found when the config is bound.
    source: OnceLock<Arc<PrefixSource>>,
    max_ttft_penalty_ms: f64,
    peak_prefill_throughput: f64,
    /// The in-flight producer the gate reads, named when the gate estimates TTFT from it.
    load_name: Option<String>,
    load: OnceLock<Arc<InFlightLoad>>,
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
        let throughput = match parameters.ttft_source.as_deref().unwrap_or(PREFILL_THROUGHPUT) {
            LATENCY_PREDICTOR => false,
            PREFILL_THROUGHPUT if max_ttft_penalty_ms > 0.0 && peak_prefill_throughput == 0.0 => {
                return invalid(
                    "'peakPrefillThroughput' must be > 0 when 'ttftSource' is prefillThroughput"
                        .into(),
                );
            }
            PREFILL_THROUGHPUT => true,
            other => {
                return invalid(format!(
                    "'ttftSource' must be '{PREFILL_THROUGHPUT}' or '{LATENCY_PREDICTOR}', got '{other}'"
                ));
            }
        };
        let load_name = (throughput && max_ttft_penalty_ms > 0.0).then(|| {
            match parameters.in_flight_load_producer_name.as_deref() {
                None | Some("") => inflight_load::TYPE_NAME.to_owned(),
                Some(name) => name.to_owned(),
            }
        });
        let producer_name = parameters.prefix_match_info_producer_name.filter(|n| !n.is_empty());
        Ok(Self {
            affinity_threshold,
            exploration_probability,
            producer_name,
            source: OnceLock::new(),
            max_ttft_penalty_ms,
            peak_prefill_throughput,
            load_name,
            load: OnceLock::new(),
        })
    }

    /// The default producer the TTFT gate needs created when the config declares none.
    pub fn default_producers(&self) -> Vec<&'static str> {
        match &self.load_name {
            Some(name) if name == inflight_load::TYPE_NAME => vec![inflight_load::TYPE_NAME],
            _ => Vec::new(),
        }
    }

    /// The estimated TTFT (ms) of the endpoint at `index`, from its in-flight tokens.
    fn ttft_ms(&self, load: &InFlightLoad, pool: &PoolSnapshot, index: u32) -> f64 {
        let tokens = pool.get(index).map_or(0, |state| load.tokens(state.id()));
        tokens as f64 / self.peak_prefill_throughput * 1000.0
    }

    /// Whether the sticky endpoints are so much slower to first token than the others that
    /// stickiness breaks (Go's TTFT load gate).
    fn gate_opens(
        &self,
        pool: &PoolSnapshot,
        candidates: &[u32],
        sticky: impl Fn(u32) -> bool,
    ) -> bool {
        let Some(load) = self.load.get() else { return false };
        let (mut best_sticky, mut best_other) = (f64::MAX, f64::MAX);
        for &index in candidates {
            let ttft = self.ttft_ms(load, pool, index);
            let best = if sticky(index) { &mut best_sticky } else { &mut best_other };
            *best = best.min(ttft);
        }
        best_other < f64::MAX && best_sticky - best_other > self.max_ttft_penalty_ms
    }

    /// A filter reading `source`'s matches (for schedulers assembled in code).
    pub fn with_source(mut self, source: Arc<PrefixSource>) -> Self {
        self.source = OnceLock::from(source);
        self
    }
}

impl BindPlugins for PrefixCacheAffinityFilter {
    fn bind(&self, plugins: &ConstructedPlugins) -> Result<(), PluginError> {
        let found = match &self.producer_name {
            Some(name) => Some(named_producer(plugins, name)?),
            None => declared_source(plugins, PRODUCER_TYPE_NAME)
                .or_else(|| every_source(plugins).next()),
        };
        if let Some(source) = found {
            let _ = self.source.set(source);
        }
        if let Some(name) = &self.load_name {
            let _ = self.load.set(inflight_load::named(plugins, name)?);
        }
        Ok(())
    }
}

impl Filter for PrefixCacheAffinityFilter {
    fn filter(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        pool: &PoolSnapshot,
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
        let Some(producer) = self.source.get().and_then(|source| source.producer()) else {
            return;
        };
        let Some(info) = producer.matches(state, request, pool) else { return };
        let sticky = |index: u32| info.ratio(index) >= self.affinity_threshold;
        if candidates.iter().any(|&index| sticky(index))
            && !self.gate_opens(pool, candidates, sticky)
        {
            candidates.retain(|&index| sticky(index));
        }
    }
}
