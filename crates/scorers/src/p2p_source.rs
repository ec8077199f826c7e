//! `p2p-source-producer` (experimental): names a peer holding more of the prompt's KV cache, so
//! the routing sidecar can pull those blocks over the P2P connector instead of recomputing.
//!
//! Matches llm-d-router's `requestcontrol/dataproducer/p2psource`. With c the cached prompt
//! tokens of an endpoint (its matched blocks × the producer's block size in tokens) read from a
//! prefix-cache producer, and M the largest c in the pool:
//! - the sources are the endpoints with c > 0 and c + one block ≥ M; one is sampled with
//!   probability proportional to 1 / (1 + waiting queue), the sampling coordinate being the
//!   32-bit FNV-1a hash of the request id over 2³² (so one request always draws the same
//!   source, and requests spread over equally good sources);
//! - the computing endpoint is the first pick of the profile named `prefillProfileName`
//!   (default `prefill`) when it ran, else the primary pick;
//! - `x-kv-cache-source-host-port` is set to the source when it is not the computing endpoint
//!   and its c exceeds the computing endpoint's by at least `minCachedTokenDelta` (default 1,
//!   at least 1). A client's own value of the header is always removed.
//!
//! The producer read is the prefix producer named `prefixMatchInfoProducerName`: an
//! `approx-prefix-cache-producer`, or a `precise-prefix-cache-producer`, whose matches are what
//! the engines reported holding; without a name, the `approx-prefix-cache-producer` declared
//! under its type name (created with default parameters when the config declares none, as Go's
//! loader creates a consumed producer).
//!
//! Differences from Go: the producers have no per-tier data, so every cached block counts, as
//! Go does for producers without tiers. The approximate producer's cached tokens are its
//! characters over 4. The source is chosen among the whole pool after scheduling,
//! rather than among the request's candidates before it (the same set unless the proxy sent a
//! subset hint). The header is stripped from client requests even when this plugin is not
//! configured, as the picker's other routing headers are.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use scheduler_core::protocol::KV_CACHE_SOURCE_HEADER;
use scheduler_core::{
    BindPlugins, CHARACTERS_PER_TOKEN, ConstructedPlugins, CycleState, InferenceRequest,
    PluginError, SchedulingResult, UpstreamHeaders,
};
use serde::Deserialize;

use crate::prefix_cache::producer::{declared_source, named_producer};
use crate::prefix_cache::{PRODUCER_TYPE_NAME, PrefixSource};

/// llm-d type name.
pub const TYPE_NAME: &str = "p2p-source-producer";
/// Default `prefillProfileName`.
pub const DEFAULT_PREFILL_PROFILE: &str = "prefill";

/// Parameters of [`P2pSourceProducer`] (llm-d-router's names).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct P2pSourceParameters {
    /// `prefixMatchInfoProducerName`: the prefix producer read (empty: the default one).
    pub prefix_match_info_producer_name: String,
    /// `minCachedTokenDelta`: cached tokens the source must hold beyond the computing
    /// endpoint (at least 1).
    pub min_cached_token_delta: i64,
    /// `prefillProfileName`: the profile whose pick computes the prefix under P/D.
    pub prefill_profile_name: String,
}

impl Default for P2pSourceParameters {
    fn default() -> Self {
        Self {
            prefix_match_info_producer_name: String::new(),
            min_cached_token_delta: 1,
            prefill_profile_name: String::new(),
        }
    }
}

/// Sets the KV-cache source header from a prefix producer's matches.
#[derive(Debug)]
pub struct P2pSourceProducer {
    producer_name: Option<String>,
    min_cached_token_delta: i64,
    prefill_profile: String,
    source: OnceLock<Arc<PrefixSource>>,
}

/// A position in [0, 1) derived from the request id (32-bit FNV-1a over 2³²).
pub fn spread_fraction(request_id: &str) -> f64 {
    let hash = request_id
        .bytes()
        .fold(0x811c_9dc5_u32, |hash, byte| (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193));
    f64::from(hash) / 4_294_967_296.0
}

/// The entry of `weights` that `fraction` of their total falls in (the last on rounding).
fn sample(weights: &[f64], fraction: f64) -> Option<usize> {
    let total: f64 = weights.iter().sum();
    let mut target = fraction * total;
    for (position, &weight) in weights.iter().enumerate() {
        if target < weight {
            return Some(position);
        }
        target -= weight;
    }
    weights.len().checked_sub(1)
}

impl P2pSourceProducer {
    /// A producer for `parameters`; refuses a `minCachedTokenDelta` below 1 as Go does.
    pub fn new(parameters: P2pSourceParameters) -> Result<Self, PluginError> {
        if parameters.min_cached_token_delta < 1 {
            return Err(PluginError::InvalidParameters(format!(
                "{TYPE_NAME}: minCachedTokenDelta must be >= 1, got {}",
                parameters.min_cached_token_delta
            )));
        }
        let prefill_profile = if parameters.prefill_profile_name.is_empty() {
            DEFAULT_PREFILL_PROFILE.to_owned()
        } else {
            parameters.prefill_profile_name
        };
        let producer_name =
            Some(parameters.prefix_match_info_producer_name).filter(|name| !name.is_empty());
        Ok(Self {
            producer_name,
            min_cached_token_delta: parameters.min_cached_token_delta,
            prefill_profile,
            source: OnceLock::new(),
        })
    }

    /// The default producer needed when none is named.
    pub fn default_producers(&self) -> Vec<&'static str> {
        if self.producer_name.is_none() { vec![PRODUCER_TYPE_NAME] } else { Vec::new() }
    }

    /// The source endpoint and its cached tokens for `cached` (tokens by pool position) and
    /// `waiting` (queues by pool position), drawn at `fraction`.
    pub fn choose_source(
        cached: &[i64],
        block: i64,
        waiting: &[u32],
        fraction: f64,
    ) -> Option<(usize, i64)> {
        let most = cached.iter().copied().max().filter(|&most| most > 0)?;
        let band: Vec<usize> =
            (0..cached.len()).filter(|&at| cached[at] > 0 && cached[at] + block >= most).collect();
        let weights: Vec<f64> = band
            .iter()
            .map(|&at| 1.0 / (1.0 + f64::from(waiting.get(at).copied().unwrap_or(0))))
            .collect();
        let chosen = band[sample(&weights, fraction)?];
        Some((chosen, cached[chosen]))
    }
}

impl BindPlugins for P2pSourceProducer {
    fn bind(&self, plugins: &ConstructedPlugins) -> Result<(), PluginError> {
        let source = match &self.producer_name {
            Some(name) => named_producer(plugins, name)?,
            None => declared_source(plugins, PRODUCER_TYPE_NAME).ok_or_else(|| {
                PluginError::InvalidParameters(format!(
                    "no {PRODUCER_TYPE_NAME} is declared for prefixMatchInfoProducerName"
                ))
            })?,
        };
        let _ = self.source.set(source);
        Ok(())
    }
}

impl UpstreamHeaders for P2pSourceProducer {
    fn upstream_headers(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        result: &SchedulingResult,
        headers: &mut Vec<(&'static str, String)>,
    ) {
        let Some(producer) = self.source.get().and_then(|source| source.producer()) else {
            return;
        };
        let pool = result.pool();
        let block = (producer.block_size() / CHARACTERS_PER_TOKEN).max(1) as i64;
        let Some(info) = producer.matches(state, request, pool) else { return };
        let cached: Vec<i64> = (0..pool.len() as u32)
            .map(|at| i64::try_from(info.matched(at)).unwrap_or(i64::MAX).saturating_mul(block))
            .collect();
        let waiting: Vec<u32> = pool.endpoints().iter().map(|s| s.metrics.waiting_queue).collect();
        let fraction = spread_fraction(&request.request_id);
        let Some((source, source_cached)) = Self::choose_source(&cached, block, &waiting, fraction)
        else {
            return;
        };
        let runs = result.profile_runs();
        let prefill = runs.iter().find(|run| &*run.profile == self.prefill_profile.as_str());
        let computing = prefill
            .and_then(|run| run.picks.first())
            .copied()
            .unwrap_or_else(|| pool.index_of(result.primary().id()).unwrap_or(0));
        let address = |at: usize| -> Option<SocketAddr> {
            pool.endpoints().get(at).map(|state| state.endpoint.address)
        };
        if address(source) == address(computing as usize) {
            return;
        }
        let computing_cached = cached.get(computing as usize).copied().unwrap_or(0);
        if source_cached - computing_cached < self.min_cached_token_delta {
            return;
        }
        if let Some(source) = address(source) {
            headers.push((KV_CACHE_SOURCE_HEADER, source.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use scheduler_core::{
        Endpoint, EndpointMetrics, EndpointPickerConfig, EndpointState, PoolSnapshot,
    };

    use super::*;
    use crate::conformance::ENDPOINT_SELECTION_HEADER;

    #[test]
    fn the_request_id_hash_is_fnv_1a() {
        assert_eq!(spread_fraction(""), 2_166_136_261.0 / 4_294_967_296.0);
        assert_eq!(spread_fraction("a"), f64::from(0xe40c_292c_u32) / 4_294_967_296.0);
        assert_eq!(spread_fraction("req-1"), spread_fraction("req-1"));
    }

    #[test]
    fn the_source_is_drawn_within_one_block_of_the_best_by_queue() {
        // Block 16: 64 and 50 are in the band of 64, 40 is not, 0 never.
        let cached = [64, 50, 40, 0];
        let waiting = [0, 1, 0, 0];
        // Weights 1 and 1/2: the first two thirds go to 0, the rest to 1.
        assert_eq!(P2pSourceProducer::choose_source(&cached, 16, &waiting, 0.0), Some((0, 64)));
        assert_eq!(P2pSourceProducer::choose_source(&cached, 16, &waiting, 0.66), Some((0, 64)));
        assert_eq!(P2pSourceProducer::choose_source(&cached, 16, &waiting, 0.67), Some((1, 50)));
        assert_eq!(P2pSourceProducer::choose_source(&cached, 16, &waiting, 0.999), Some((1, 50)));
        assert_eq!(P2pSourceProducer::choose_source(&[0, 0], 16, &[0, 0], 0.5), None);
    }

    #[test]
    fn parameters_are_checked_as_in_go() {
        let error = P2pSourceProducer::new(P2pSourceParameters {
            min_cached_token_delta: 0,
            ..P2pSourceParameters::default()
        })
        .expect_err("refused");
        assert_eq!(
            error.to_string(),
            "invalid parameters: p2p-source-producer: minCachedTokenDelta must be >= 1, got 0"
        );
    }

    const CONFIG: &str = "plugins:
- type: approx-prefix-cache-producer
  parameters: {blockSizeTokens: 64}
- type: p2p-source-producer
  parameters:
    prefixMatchInfoProducerName: approx-prefix-cache-producer
    prefillProfileName: prefill
    minCachedTokenDelta: 1
- type: header-based-testing-filter
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: header-based-testing-filter
  - pluginRef: max-score-picker
";

    fn pool() -> Arc<PoolSnapshot> {
        Arc::new(PoolSnapshot::new([1, 2, 3].map(|host| {
            EndpointState::new(Endpoint::new(([10, 0, 0, host], 8000).into()))
                .with_metrics(EndpointMetrics::default())
        })))
    }

    #[test]
    fn the_peer_holding_the_prompt_is_named_upstream() {
        let mut registry = crate::builtin_registry();
        registry.allow_experimental_plugins(true);
        let scheduler = EndpointPickerConfig::from_yaml(CONFIG)
            .expect("config")
            .build(&registry)
            .expect("scheduler");
        let pool = pool();
        let prompt = "a long shared system prompt ".repeat(100);
        let to = |host: &str| {
            InferenceRequest::new("m", prompt.as_str())
                .with_request_id("req-1")
                .with_header(ENDPOINT_SELECTION_HEADER, host)
        };
        let first = scheduler.schedule(&to("10.0.0.1"), &pool).expect("a pick");
        assert!(first.upstream_headers().is_empty(), "nothing cached anywhere yet");
        drop(first);
        scheduler.flush();
        let second = scheduler.schedule(&to("10.0.0.2"), &pool).expect("a pick");
        assert_eq!(second.primary().endpoint.address.to_string(), "10.0.0.2:8000");
        assert_eq!(
            second.upstream_headers(),
            [(KV_CACHE_SOURCE_HEADER, "10.0.0.1:8000".to_owned())],
            "10.0.0.1 caches the prompt, 10.0.0.2 computes it"
        );
        // Sent where the cache already is, no pull is named.
        let third = scheduler.schedule(&to("10.0.0.1"), &pool).expect("a pick");
        assert!(third.upstream_headers().is_empty());

        let missing = CONFIG.replace(
            "prefixMatchInfoProducerName: approx-prefix-cache-producer",
            "prefixMatchInfoProducerName: nope",
        );
        let error = EndpointPickerConfig::from_yaml(&missing)
            .expect("config")
            .build(&registry)
            .expect_err("refused");
        assert!(
            error.to_string().contains("no approx-prefix-cache-producer named 'nope'"),
            "{error}"
        );
        let unknown = CONFIG.replace("minCachedTokenDelta: 1", "minCachedTokens: 1");
        let error = EndpointPickerConfig::from_yaml(&unknown)
            .expect("config")
            .build(&registry)
            .expect_err("refused");
        assert!(error.to_string().contains("unknown field `minCachedTokens`"), "{error}");
    }

    #[test]
    fn without_a_name_the_default_producer_is_created() {
        let mut registry = crate::builtin_registry();
        registry.allow_experimental_plugins(true);
        let config = EndpointPickerConfig::from_yaml(
            "plugins:\n- type: p2p-source-producer\n- type: max-score-picker\n",
        )
        .expect("config");
        let plugins = config.construct_plugins(&registry).expect("plugins");
        assert!(plugins.get(PRODUCER_TYPE_NAME).is_some());
        let error = config.build(&crate::builtin_registry()).expect_err("experimental");
        assert!(error.to_string().contains("is experimental"), "{error}");
    }
}
