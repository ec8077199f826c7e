//! `precise-prefix-cache-producer` (llm-d's current name), the deprecated
//! `precise-prefix-cache-scorer`, and `prefix-cache-scorer` with `mode: cache_tracking`: prefix
//! matching against what the engines report holding in their KV-cache events rather than
//! against where prompts were sent.
//!
//! The event index and the ZMQ subscriptions live in the `epp-kv-events` crate and are built
//! only with this crate's `kv-events` cargo feature (the `epp` binary's feature of the same
//! name), so that a default build carries no ZMQ code. Without it, a config naming any of
//! these forms fails to load with a message that names the feature. The parameters are parsed
//! either way, with llm-d's names, so a typo is reported as such.
//!
//! With the feature, the producer subscribes to every endpoint's publisher at
//! `tcp://<endpoint IP>:<socketPort>` (`kvEventsConfig.podDiscoveryConfig.socketPort`, vLLM's
//! default 5557), following pool membership, and keeps the precise index of
//! [`kv_events::PreciseIndex`] with `tokenProcessorConfig`'s block size, hash seed and hash
//! algorithm. Its keys are computed from token ids, which a request has today when it came
//! pre-tokenized (vLLM's `token_ids`, SGLang's `input_ids`, a token-array `prompt`: the parser
//! writes those as decimal words, read back by [`token_ids_of`]) or when the config's
//! `token-producer` tokenized it ([`crate::token_producer`], with the model's tokenizer and chat
//! template). Any other text request is matched by the documented approximation: an
//! approximate index of its own with blocks of `blockSizeTokens` tokens at four characters per
//! token, which is also what an endpoint whose event stream had a gap falls back to.
//! `prefix-cache-scorer` reads the matches when `prefixMatchInfoProducerName` names the
//! producer.

use serde::Deserialize;

/// llm-d type name of the data producer.
pub const PRODUCER_TYPE_NAME: &str = "precise-prefix-cache-producer";
/// llm-d's deprecated scorer that holds its own precise index.
pub const DEPRECATED_SCORER_TYPE_NAME: &str = "precise-prefix-cache-scorer";
/// `prefix-cache-scorer`'s `mode` selecting the event-driven index (GIE's older form).
pub const CACHE_TRACKING_MODE: &str = "cache_tracking";

/// What a build without the `kv-events` feature says about these plugins.
pub const FEATURE_MISSING: &str = "precise prefix-cache routing (KV-cache events) is not \
     built into this binary: rebuild epp with `--features kv-events`";

/// Parameters of `precise-prefix-cache-producer` and `precise-prefix-cache-scorer`, with
/// llm-d's names. The nested llm-d structures are read as llm-d reads them (unknown keys
/// ignored); the names below are the ones used.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PrecisePrefixParameters {
    /// How token ids become block keys (current placement).
    #[serde(default)]
    pub token_processor_config: Option<TokenProcessorParameters>,
    /// The indexer: `kvBlockIndexConfig`, and `tokenProcessorConfig` (older placement).
    #[serde(default)]
    pub indexer_config: Option<IndexerParameters>,
    /// Where the events come from.
    #[serde(default)]
    pub kv_events_config: Option<KvEventsParameters>,
    /// Whether a pick's prompt counts as held by the picked endpoint until its events arrive
    /// (or `speculativeTTL` passes), so that the next request with the same prefix finds it.
    #[serde(default)]
    pub speculative_indexing: Option<bool>,
    /// Lifetime of speculative entries (a Go duration, default `2s`).
    #[serde(default, rename = "speculativeTTL")]
    pub speculative_ttl: Option<String>,
}

/// llm-d's `tokenProcessorConfig`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TokenProcessorParameters {
    /// Deprecated spelling of `blockSizeTokens`.
    #[serde(default)]
    pub block_size: Option<i64>,
    /// Tokens per block of the keys (default 16); the engines' `--block-size` may differ (their
    /// events are re-chunked).
    #[serde(default)]
    pub block_size_tokens: Option<i64>,
    /// Must equal the engines' `PYTHONHASHSEED`.
    #[serde(default)]
    pub hash_seed: Option<String>,
    /// `cbor-fnv` (default) or `xxh64`.
    #[serde(default)]
    pub hash_algorithm: Option<String>,
}

/// llm-d's `indexerConfig`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IndexerParameters {
    /// Older placement of `tokenProcessorConfig`.
    #[serde(default)]
    pub token_processor_config: Option<TokenProcessorParameters>,
    /// The block index: `inMemoryConfig.size` caps the blocks held per endpoint here.
    #[serde(default)]
    pub kv_block_index_config: Option<serde_json::Value>,
}

/// llm-d's `kvEventsConfig`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct KvEventsParameters {
    /// A central socket to bind (`tcp://*:5557`) that the engines connect to and publish on
    /// with topics `kv@<pod>@<model>` (llm-d's global socket mode); besides the per-endpoint
    /// subscriptions unless `discoverPods` is false.
    #[serde(default, rename = "zmqEndpoint")]
    pub zmq_endpoint: Option<String>,
    /// Whether to subscribe to each endpoint's own publisher (default true, as in llm-d).
    #[serde(default)]
    pub discover_pods: Option<bool>,
    /// ZMQ subscription prefix (llm-d's default `kv@`).
    #[serde(default)]
    pub topic_filter: Option<String>,
    /// `vllm` (default); other engines are refused.
    #[serde(default)]
    pub engine_type: Option<String>,
    /// Per-endpoint subscriptions.
    #[serde(default)]
    pub pod_discovery_config: Option<PodDiscoveryParameters>,
}

/// llm-d's `podDiscoveryConfig`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodDiscoveryParameters {
    /// The engines' PUB port (default 5557).
    #[serde(default)]
    pub socket_port: Option<u16>,
    /// The engines' replay (ROUTER) port; unset or 0 disables replay after a gap.
    #[serde(default)]
    pub replay_socket_port: Option<i64>,
}

/// The parameters in the index's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreciseSettings {
    /// Tokens per block.
    pub block_size_tokens: u32,
    /// `hashSeed`.
    pub hash_seed: String,
    /// Whether `hashAlgorithm` is `xxh64` (else `cbor-fnv`).
    pub xxh64: bool,
    /// Blocks remembered per endpoint, when configured.
    pub capacity_per_endpoint: Option<usize>,
    /// The subscription prefix.
    pub topic_filter: String,
    /// The engines' PUB port.
    pub socket_port: u16,
    /// The engines' replay port, when replay is on.
    pub replay_port: Option<u16>,
    /// The central socket to bind (`zmqEndpoint`), when set.
    pub zmq_endpoint: Option<String>,
    /// Whether each endpoint's publisher is subscribed to (`discoverPods`).
    pub discover_pods: bool,
    /// How long a pick's speculative entries live (`speculativeIndexing: true`, with
    /// `speculativeTTL`, default 2 s); `None` when speculative indexing is off.
    pub speculative_ttl: Option<std::time::Duration>,
}

/// llm-d's default `topicFilter`.
const DEFAULT_TOPIC_FILTER: &str = "kv@";
/// llm-d's default `speculativeTTL`.
const DEFAULT_SPECULATIVE_TTL: std::time::Duration = std::time::Duration::from_secs(2);
/// vLLM's default KV-event port.
const DEFAULT_SOCKET_PORT: u16 = 5557;

impl PrecisePrefixParameters {
    /// The settings, or the first parameter out of range.
    pub fn resolve(&self) -> Result<PreciseSettings, scheduler_core::PluginError> {
        let invalid = |m: String| Err(scheduler_core::PluginError::InvalidParameters(m));
        let tokens = self
            .token_processor_config
            .as_ref()
            .or(self.indexer_config.as_ref().and_then(|i| i.token_processor_config.as_ref()))
            .cloned()
            .unwrap_or_default();
        // llm-d: blockSizeTokens wins, the deprecated blockSize fills in, 0 means the default.
        let block = match (tokens.block_size_tokens.unwrap_or(0), tokens.block_size.unwrap_or(0)) {
            (0, 0) => 16,
            (0, legacy) => legacy,
            (current, _) => current,
        };
        let Ok(block_size_tokens) = u32::try_from(block) else {
            return invalid(format!("blockSizeTokens must be greater than 0, got {block}"));
        };
        if block_size_tokens == 0 {
            return invalid(format!("blockSizeTokens must be greater than 0, got {block}"));
        }
        let xxh64 = match tokens.hash_algorithm.as_deref().unwrap_or("") {
            "" | "cbor-fnv" => false,
            "xxh64" => true,
            other => {
                return invalid(format!(
                    "unsupported hashAlgorithm \"{other}\": accepted values are \"cbor-fnv\" and \"xxh64\""
                ));
            }
        };
        let capacity_per_endpoint = self
            .indexer_config
            .as_ref()
            .and_then(|i| i.kv_block_index_config.as_ref())
            .and_then(|c| c.pointer("/inMemoryConfig/size"))
            .and_then(serde_json::Value::as_u64)
            .filter(|&size| size > 0)
            .map(|size| usize::try_from(size).unwrap_or(usize::MAX));
        let events = self.kv_events_config.clone().unwrap_or_default();
        if let Some(engine) =
            events.engine_type.as_deref().filter(|e| !e.is_empty() && *e != "vllm")
        {
            return invalid(format!(
                "kvEventsConfig.engineType \"{engine}\" is not supported (vllm)"
            ));
        }
        let speculative_ttl = match self.speculative_indexing {
            Some(true) => Some(match self.speculative_ttl.as_deref() {
                None | Some("") => DEFAULT_SPECULATIVE_TTL,
                Some(text) => match scheduler_core::flow::parse_go_duration(text) {
                    Ok(ttl) if !ttl.is_zero() => ttl,
                    Ok(_) => return invalid("speculativeTTL must be positive, got 0".to_owned()),
                    Err(error) => {
                        return invalid(format!("invalid speculativeTTL \"{text}\": {error}"));
                    }
                },
            }),
            _ => None,
        };
        let zmq_endpoint = events.zmq_endpoint.clone().filter(|e| !e.trim().is_empty());
        if let Some(endpoint) = &zmq_endpoint {
            let valid = endpoint
                .strip_prefix("tcp://")
                .and_then(|rest| rest.rsplit_once(':'))
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                return invalid(format!(
                    "kvEventsConfig.zmqEndpoint \"{endpoint}\" is not tcp://<host>:<port>"
                ));
            }
        }
        Ok(PreciseSettings {
            zmq_endpoint,
            discover_pods: events.discover_pods.unwrap_or(true),
            speculative_ttl,
            block_size_tokens,
            hash_seed: tokens.hash_seed.unwrap_or_default(),
            xxh64,
            capacity_per_endpoint,
            topic_filter: events.topic_filter.unwrap_or_else(|| DEFAULT_TOPIC_FILTER.to_owned()),
            socket_port: events
                .pod_discovery_config
                .as_ref()
                .and_then(|p| p.socket_port)
                .filter(|&port| port > 0)
                .unwrap_or(DEFAULT_SOCKET_PORT),
            replay_port: events
                .pod_discovery_config
                .and_then(|p| p.replay_socket_port)
                .and_then(|port| u16::try_from(port).ok())
                .filter(|&port| port > 0),
        })
    }
}

/// The error a build without the `kv-events` feature gives for these plugins, after checking
/// the parameters.
#[cfg(not(feature = "kv-events"))]
pub(crate) fn unavailable(
    spec: &scheduler_core::PluginSpec<'_>,
) -> Result<scheduler_core::Plugin, scheduler_core::PluginError> {
    let parameters: PrecisePrefixParameters = spec.parameters()?;
    parameters.resolve()?;
    Err(scheduler_core::PluginError::InvalidParameters(format!(
        "{}: {FEATURE_MISSING}",
        spec.type_name
    )))
}

pub use crate::token_producer::token_ids_of;
#[cfg(feature = "kv-events-index")]
pub use matching::{EventFedProducer, PreciseMatcher};

#[cfg(feature = "kv-events")]
pub use enabled::{PrecisePrefixProducer, precise_producers};

/// The matching half of the producer: the precise index and the approximate fallback, without
/// any transport, so that events arriving by other means (a simulator, another bus) can feed it.
#[cfg(feature = "kv-events-index")]
mod matching {
    use std::collections::{HashMap, VecDeque};
    use std::sync::{Arc, OnceLock};
    use std::time::{Duration, Instant};

    use kv_events::{
        EndpointMatch, HashAlgorithm, IndexConfig, PreciseIndex, TokenProcessor,
        TokenProcessorConfig,
    };
    use parking_lot::Mutex;
    use scheduler_core::{
        BindPlugins, CHARACTERS_PER_TOKEN, ConstructedPlugins, CycleState, DataProducer,
        EndpointId, InferenceRequest, Plugin, PluginError, PluginSpec, PoolObserver, PoolSnapshot,
        PreRequest, SchedulingResult,
    };

    use super::{PrecisePrefixParameters, PreciseSettings};
    use crate::prefix_cache::matches::PrefixMatches;
    use crate::prefix_cache::{
        PrefixCacheProducer, PrefixSource, ProducerSettings, RecordApplication,
    };
    use crate::token_producer::{self, TokenProducer, token_ids_of};

    /// The llm-d token cap the fallback index matches up to (a 128K context window).
    const MAX_PREFIX_TOKENS: usize = 131_072;

    /// Most speculative entries kept at once (about 48 MiB); the oldest go first.
    const MAX_SPECULATIVE_ENTRIES: usize = 1 << 20;

    /// The block keys of recent picks, counted as held by the picked endpoint until they
    /// expire (llm-d's speculative indexing): a prompt's blocks exist on the engine only once
    /// it has computed them, and its events follow, so without these the next request with
    /// the same prefix would not know where it is going.
    #[derive(Debug)]
    struct Speculation {
        ttl: Duration,
        entries: Mutex<SpeculativeEntries>,
    }

    #[derive(Debug, Default)]
    struct SpeculativeEntries {
        /// Expiry of each (endpoint, key).
        live: HashMap<(EndpointId, u64), Instant>,
        /// Every entry made, in order of expiry (the TTL is fixed).
        made: VecDeque<(Instant, EndpointId, u64)>,
    }

    impl Speculation {
        fn record(&self, endpoint: EndpointId, keys: &[u64], now: Instant) {
            let expiry = now + self.ttl;
            let mut entries = self.entries.lock();
            for &key in keys {
                entries.live.insert((endpoint, key), expiry);
                entries.made.push_back((expiry, endpoint, key));
            }
            while let Some(&(at, endpoint, key)) = entries.made.front() {
                if at > now && entries.made.len() <= MAX_SPECULATIVE_ENTRIES {
                    break;
                }
                entries.made.pop_front();
                // A later pick of the same prefix renewed the entry: keep it.
                if entries.live.get(&(endpoint, key)) == Some(&at) {
                    entries.live.remove(&(endpoint, key));
                }
            }
        }

        /// `from` extended by the leading keys after it that `endpoint` holds speculatively.
        fn extend(&self, endpoint: EndpointId, keys: &[u64], from: usize, now: Instant) -> usize {
            let entries = self.entries.lock();
            if entries.live.is_empty() {
                return from;
            }
            let mut held = from;
            while held < keys.len()
                && entries.live.get(&(endpoint, keys[held])).is_some_and(|&expiry| expiry > now)
            {
                held += 1;
            }
            held
        }
    }

    /// The precise index and the approximate index requests without token ids (and endpoints
    /// whose event stream had a gap) are matched against.
    #[derive(Debug)]
    pub struct PreciseMatcher {
        index: Arc<PreciseIndex<EndpointId>>,
        fallback: Arc<PrefixCacheProducer>,
        speculation: Option<Speculation>,
        /// The config's `token-producer`, which turns text prompts into the engine's ids.
        tokenizer: OnceLock<Arc<TokenProducer>>,
    }

    impl PreciseMatcher {
        /// An empty index with `settings`' block size, hash seed, algorithm and capacity; the
        /// fallback applies its records as `records` says.
        pub fn new(settings: &PreciseSettings, records: RecordApplication) -> Self {
            let processor = TokenProcessor::new(&TokenProcessorConfig {
                block_size_tokens: settings.block_size_tokens,
                hash_seed: settings.hash_seed.clone(),
                algorithm: if settings.xxh64 {
                    HashAlgorithm::Xxh64
                } else {
                    HashAlgorithm::CborFnv
                },
            });
            let mut config = IndexConfig::default();
            if let Some(capacity) = settings.capacity_per_endpoint {
                config.capacity_per_endpoint = capacity;
            }
            let tokens = settings.block_size_tokens as usize;
            let fallback = Arc::new(PrefixCacheProducer::new(ProducerSettings {
                block_size: tokens * CHARACTERS_PER_TOKEN,
                max_blocks: (MAX_PREFIX_TOKENS / tokens).max(1),
                capacity: prefix_cache::index::DEFAULT_CAPACITY_PER_ENDPOINT,
                records,
            }));
            let speculation = settings
                .speculative_ttl
                .map(|ttl| Speculation { ttl, entries: Mutex::new(SpeculativeEntries::default()) });
            Self {
                index: Arc::new(PreciseIndex::new(processor, config)),
                fallback,
                speculation,
                tokenizer: OnceLock::new(),
            }
        }

        /// The event index.
        pub fn index(&self) -> &Arc<PreciseIndex<EndpointId>> {
            &self.index
        }

        /// The approximate index requests are matched against until they carry token ids.
        pub fn fallback(&self) -> &Arc<PrefixCacheProducer> {
            &self.fallback
        }
    }

    /// The precise matches of one decision: the request's token ids (when it has them) and
    /// their keys, kept in the decision's state and reused.
    #[derive(Debug, Default)]
    struct PreciseScratch {
        tokens: Vec<u32>,
        keys: Vec<u64>,
        /// The decision `keys` were computed for.
        keys_for: Option<u64>,
    }

    /// Matches every request against the approximate index, then, for a request with token
    /// ids, replaces each trusted endpoint's match with what its engine reported holding. An
    /// untrusted endpoint (its event stream had a gap) keeps its approximate match.
    impl DataProducer for PreciseMatcher {
        fn produce(&self, state: &mut CycleState, request: &InferenceRequest, pool: &PoolSnapshot) {
            self.fallback.match_prompt(state, request, pool);
            let mut scratch = std::mem::take(state.scratch::<PreciseScratch>());
            let processor = self.index.processor();
            let max_blocks = MAX_PREFIX_TOKENS / processor.block_size();
            let model = &request.target_model;
            // The token producer's ids are read where they are, not copied.
            let has_tokens = match self.tokenizer.get().and_then(|t| t.tokens(state, request)) {
                Some(ids) => {
                    processor.request_keys(model, ids, max_blocks, &mut scratch.keys);
                    true
                }
                None if token_ids_of(&request.prompt, &mut scratch.tokens) => {
                    processor.request_keys(model, &scratch.tokens, max_blocks, &mut scratch.keys);
                    true
                }
                None => false,
            };
            if has_tokens && !scratch.keys.is_empty() {
                let stamp = state.decision_stamp();
                let now = state.now();
                scratch.keys_for = Some(stamp);
                let total = scratch.keys.len();
                let matches = state.scratch::<PrefixMatches>();
                let info = matches.slot(self.fallback.id());
                if info.produced_for == Some(stamp) {
                    info.total_blocks = total;
                    for (endpoint, matched) in pool.endpoints().iter().zip(&mut info.matched_blocks)
                    {
                        *matched = match self.index.longest_prefix(endpoint.id(), &scratch.keys) {
                            EndpointMatch::Blocks(n) => match &self.speculation {
                                Some(speculation) => {
                                    speculation.extend(endpoint.id(), &scratch.keys, n, now)
                                }
                                None => n,
                            },
                            // The approximate match, in blocks of about the same size.
                            _ => (*matched).min(total),
                        };
                    }
                }
            }
            *state.scratch::<PreciseScratch>() = scratch;
        }
    }

    /// Finds the config's `token-producer`, if it declares one.
    impl BindPlugins for PreciseMatcher {
        fn bind(&self, plugins: &ConstructedPlugins) -> Result<(), PluginError> {
            if let Some(tokenizer) = token_producer::find(plugins) {
                // A second binding (the same config built twice) finds the same producer.
                let _ = self.tokenizer.set(tokenizer);
            }
            Ok(())
        }
    }

    /// The fallback's record of each pick and, with speculative indexing, the pick's keys as
    /// held by the endpoints it went to (decode and prefill).
    impl PreRequest for PreciseMatcher {
        fn pre_request(
            &self,
            state: &mut CycleState,
            request: &InferenceRequest,
            result: &SchedulingResult,
        ) {
            self.fallback.pre_request(state, request, result);
            let Some(speculation) = &self.speculation else { return };
            let stamp = state.decision_stamp();
            let now = state.now();
            let scratch = state.scratch::<PreciseScratch>();
            if scratch.keys_for != Some(stamp) || scratch.keys.is_empty() {
                return;
            }
            speculation.record(result.primary().id(), &scratch.keys, now);
            if let Some(prefill) = result.prefill() {
                speculation.record(prefill.id(), &scratch.keys, now);
            }
        }

        fn flush(&self) {
            self.fallback.flush();
        }

        fn dropped_deferred(&self) -> u64 {
            self.fallback.dropped_deferred()
        }
    }

    /// `precise-prefix-cache-producer` without subscriptions: whoever builds it feeds its
    /// index ([`Self::index`]: `ingest` for vLLM's payloads, `apply_batch` for decoded ones).
    /// The index tracks the pool's endpoints as the pool changes.
    #[derive(Debug)]
    pub struct EventFedProducer {
        matcher: Arc<PreciseMatcher>,
    }

    impl EventFedProducer {
        /// A producer configured by llm-d's parameters, and the plugin that carries it (a
        /// data producer, the fallback's record hook, a pool observer, and the prefix source
        /// `prefix-cache-scorer` binds to by name).
        pub fn plugin(
            spec: &PluginSpec<'_>,
            records: RecordApplication,
        ) -> Result<(Plugin, Arc<Self>), PluginError> {
            let parameters: PrecisePrefixParameters = spec.parameters()?;
            let matcher = Arc::new(PreciseMatcher::new(&parameters.resolve()?, records));
            let producer = Arc::new(Self { matcher: Arc::clone(&matcher) });
            let fallback = Arc::clone(matcher.fallback());
            let plugin = Plugin {
                data_producer: Some(matcher.clone()),
                pre_request: Some(matcher),
                pool_observer: Some(producer.clone()),
                binder: Some(producer.matcher.clone()),
                shared: Some(Arc::new(PrefixSource::of_producer(fallback))),
                ..Plugin::default()
            };
            Ok((plugin, producer))
        }

        /// The event index to feed.
        pub fn index(&self) -> &Arc<PreciseIndex<EndpointId>> {
            self.matcher.index()
        }
    }

    impl PoolObserver for EventFedProducer {
        fn membership_changed(&self, pool: &PoolSnapshot) {
            let index = self.matcher.index();
            for endpoint in pool.endpoints() {
                index.add_endpoint(endpoint.id());
            }
            for known in index.endpoint_keys() {
                if pool.index_of(known).is_none() {
                    index.remove_endpoint(known);
                }
            }
            self.matcher.fallback().membership_changed(pool);
        }
    }
}

#[cfg(feature = "kv-events")]
mod enabled {
    use std::fmt::Write as _;
    use std::sync::Arc;

    use kv_events::PreciseIndex;
    use kv_events::central::{CentralConfig, CentralSubscriber};
    use kv_events::subscriber::{SubscriberConfig, Subscribers};
    use scheduler_core::{
        ConstructedPlugins, CycleState, DataProducer, EndpointId, InferenceRequest, Plugin,
        PluginError, PluginSpec, PoolObserver, PoolSnapshot,
    };

    use super::matching::PreciseMatcher;
    use super::{PrecisePrefixParameters, PreciseSettings};
    use crate::prefix_cache::{
        PrefixCacheParameters, PrefixCacheProducer, PrefixCacheScorer, PrefixSource,
        RecordApplication,
    };

    /// The precise index, its subscriptions, and the approximate index requests without token
    /// ids are matched against.
    #[derive(Debug)]
    pub struct PrecisePrefixProducer {
        matcher: Arc<PreciseMatcher>,
        subscribers: Subscribers<EndpointId>,
        central: Option<CentralSubscriber<EndpointId>>,
        discover_pods: bool,
        socket_port: u16,
    }

    impl PrecisePrefixProducer {
        /// A producer with `settings`, its subscriptions spawned on the current tokio runtime
        /// (and its central socket, with `zmqEndpoint`, bound now).
        pub fn new(settings: &PreciseSettings) -> Result<Self, PluginError> {
            let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
                PluginError::InvalidParameters(
                    "the KV-event subscriptions need a tokio runtime".to_owned(),
                )
            })?;
            let matcher = Arc::new(PreciseMatcher::new(settings, RecordApplication::Background));
            let central = match &settings.zmq_endpoint {
                None => None,
                Some(endpoint) => Some(
                    CentralSubscriber::bind(
                        Arc::clone(matcher.index()),
                        CentralConfig {
                            endpoint: endpoint.clone(),
                            topic_filter: settings.topic_filter.clone(),
                            default_model: String::new(),
                        },
                        &runtime,
                    )
                    .map_err(|error| {
                        PluginError::InvalidParameters(format!("kvEventsConfig.{error}"))
                    })?,
                ),
            };
            let subscribers = Subscribers::new(
                Arc::clone(matcher.index()),
                SubscriberConfig {
                    topic_filter: settings.topic_filter.clone(),
                    replay_port: settings.replay_port,
                    ..SubscriberConfig::default()
                },
                runtime,
            );
            Ok(Self {
                matcher,
                subscribers,
                central,
                discover_pods: settings.discover_pods,
                socket_port: settings.socket_port,
            })
        }

        /// The event index.
        pub fn index(&self) -> &Arc<PreciseIndex<EndpointId>> {
            self.matcher.index()
        }

        /// The matching (and, with speculative indexing, the pick hook).
        pub fn matcher(&self) -> &Arc<PreciseMatcher> {
            &self.matcher
        }

        /// The per-endpoint subscriptions (none when `discoverPods` is false).
        pub fn subscribers(&self) -> &Subscribers<EndpointId> {
            &self.subscribers
        }

        /// The central socket, with `zmqEndpoint`.
        pub fn central(&self) -> Option<&CentralSubscriber<EndpointId>> {
            self.central.as_ref()
        }

        /// The approximate index requests are matched against until they carry token ids.
        pub fn fallback(&self) -> &Arc<PrefixCacheProducer> {
            self.matcher.fallback()
        }

        /// Appends the index's and the subscriptions' metrics, in the Prometheus text format,
        /// labelled with the plugin's name.
        pub fn render_metrics(&self, plugin: &str, out: &mut String) {
            let plugin = escape_label(plugin);
            let stats = self.index().stats();
            let summary = self.index().summary();
            let subs = self.subscribers.stats();
            let central = self.central.as_ref().map(CentralSubscriber::stats).unwrap_or_default();
            let family = |out: &mut String, name: &str, kind: &str, help: &str| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            };
            let sample = |out: &mut String, name: &str, labels: &str, value: u64| {
                let _ = writeln!(out, "{name}{{plugin=\"{plugin}\"{labels}}} {value}");
            };
            let counter = |out: &mut String, name: &str, help: &str, value: u64| {
                family(out, name, "counter", help);
                sample(out, name, "", value);
            };
            let gauge = |out: &mut String, name: &str, help: &str, value: usize| {
                family(out, name, "gauge", help);
                sample(out, name, "", value as u64);
            };
            counter(
                out,
                "llm_d_epp_kv_cache_events_messages_received_total",
                "KV-event messages received, from the endpoints' publishers and the central socket.",
                subs.messages + central.messages,
            );
            counter(
                out,
                "llm_d_epp_kv_cache_events_batches_total",
                "KV-event batches applied to the precise index.",
                stats.batches,
            );
            counter(
                out,
                "llm_d_epp_kv_cache_index_admissions_total",
                "Blocks stored in the precise index.",
                stats.blocks_stored,
            );
            family(
                out,
                "llm_d_epp_kv_cache_index_evictions_total",
                "counter",
                "Blocks dropped from the precise index, by reason.",
            );
            for (reason, value) in
                [("removed", stats.blocks_removed), ("capacity", stats.evicted_at_capacity)]
            {
                let labels = format!(",reason=\"{reason}\"");
                sample(out, "llm_d_epp_kv_cache_index_evictions_total", &labels, value);
            }
            counter(
                out,
                "llm_d_epp_kv_cache_events_all_blocks_cleared_total",
                "AllBlocksCleared events applied.",
                stats.clears,
            );
            counter(
                out,
                "llm_d_epp_kv_cache_events_sequence_gaps_total",
                "Sequence gaps and interrupted streams, each making an endpoint untrusted.",
                stats.gaps,
            );
            counter(
                out,
                "llm_d_epp_kv_cache_events_sequence_restarts_total",
                "Publishers whose numbering went back (restarted engines).",
                stats.restarts,
            );
            counter(
                out,
                "llm_d_epp_kv_cache_events_decode_errors_total",
                "Payloads that did not decode, each making an endpoint untrusted.",
                stats.decode_errors,
            );
            counter(
                out,
                "llm_d_epp_kv_cache_events_malformed_messages_total",
                "Messages not of the form [topic, 8-byte sequence, payload].",
                subs.malformed_messages + central.malformed_messages,
            );
            family(
                out,
                "llm_d_epp_kv_cache_events_skipped_total",
                "counter",
                "Events not applied to the precise index, by reason.",
            );
            for (reason, value) in [
                ("unknown_parent", stats.skipped_unknown_parent),
                ("non_dense_block_span", stats.skipped_block_size),
                ("unsupported_cache_kind", stats.skipped_group),
            ] {
                let labels = format!(",reason=\"{reason}\"");
                sample(out, "llm_d_epp_kv_cache_events_skipped_total", &labels, value);
            }
            family(
                out,
                "llm_d_epp_kv_cache_events_unknown_endpoint_messages_total",
                "counter",
                "Messages dropped because no endpoint of the pool is theirs: on the central \
                 socket, a topic naming no routed pod; otherwise an endpoint that left the pool.",
            );
            for (source, value) in
                [("central", central.unknown_publishers), ("endpoint", stats.unknown_endpoint)]
            {
                let labels = format!(",source=\"{source}\"");
                sample(
                    out,
                    "llm_d_epp_kv_cache_events_unknown_endpoint_messages_total",
                    &labels,
                    value,
                );
            }
            counter(
                out,
                "llm_d_epp_kv_cache_events_replays_total",
                "Replays requested from the engines' replay sockets after a gap.",
                subs.replays,
            );
            gauge(
                out,
                "llm_d_epp_kv_cache_events_active_subscribers",
                "Per-endpoint subscriptions, including those retrying a failed connection.",
                self.subscribers.endpoints().len(),
            );
            gauge(
                out,
                "llm_d_epp_kv_cache_index_blocks",
                "Blocks held in the precise index, over all endpoints.",
                summary.blocks,
            );
            family(
                out,
                "llm_d_epp_kv_cache_index_endpoints",
                "gauge",
                "Endpoints tracked by the precise index, by whether their event stream is trusted.",
            );
            for (state, value) in [
                ("trusted", summary.endpoints - summary.untrusted),
                ("untrusted", summary.untrusted),
            ] {
                let labels = format!(",state=\"{state}\"");
                sample(out, "llm_d_epp_kv_cache_index_endpoints", &labels, value as u64);
            }
        }
    }

    /// A label value in the text format: backslash, double quote and newline escaped.
    fn escape_label(value: &str) -> String {
        let mut out = String::with_capacity(value.len());
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out
    }

    /// The precise producers among `plugins`, with their names (for the binary's metrics).
    pub fn precise_producers(
        plugins: &ConstructedPlugins,
    ) -> Vec<(String, Arc<PrecisePrefixProducer>)> {
        plugins
            .iter()
            .filter_map(|constructed| {
                let source = constructed.plugin.shared.clone()?.downcast::<PrefixSource>().ok()?;
                let owner = source.owner()?.clone().downcast::<PrecisePrefixProducer>().ok()?;
                Some((constructed.name.clone(), owner))
            })
            .collect()
    }

    impl DataProducer for PrecisePrefixProducer {
        fn produce(&self, state: &mut CycleState, request: &InferenceRequest, pool: &PoolSnapshot) {
            self.matcher.produce(state, request, pool);
        }
    }

    /// Subscriptions follow the pool: `tcp://<endpoint IP>:<socketPort>` per endpoint (with
    /// `discoverPods`), and the central socket's topics route to the endpoints by `ip:port`,
    /// IP or name.
    impl PoolObserver for PrecisePrefixProducer {
        fn membership_changed(&self, pool: &PoolSnapshot) {
            if self.discover_pods {
                let port = self.socket_port;
                self.subscribers.set_endpoints(pool.endpoints().iter().map(|e| {
                    let ip = e.endpoint.address.ip();
                    let host = if ip.is_ipv6() { format!("[{ip}]") } else { ip.to_string() };
                    (e.id(), format!("tcp://{host}:{port}"))
                }));
            } else {
                let index = self.index();
                for endpoint in pool.endpoints() {
                    index.add_endpoint(endpoint.id());
                }
                for known in index.endpoint_keys() {
                    if pool.index_of(known).is_none() {
                        index.remove_endpoint(known);
                    }
                }
            }
            if let Some(central) = &self.central {
                central.set_routes(pool.endpoints().iter().map(|e| {
                    let address = e.endpoint.address;
                    let names = [
                        address.to_string(),
                        address.ip().to_string(),
                        e.endpoint.name.to_string(),
                    ];
                    (e.id(), names)
                }));
            }
            self.fallback().membership_changed(pool);
        }
    }

    fn producer(spec: &PluginSpec<'_>) -> Result<Arc<PrecisePrefixProducer>, PluginError> {
        let parameters: PrecisePrefixParameters = spec.parameters()?;
        Ok(Arc::new(PrecisePrefixProducer::new(&parameters.resolve()?)?))
    }

    /// `precise-prefix-cache-producer`: matches for `prefix-cache-scorer` and the filters.
    pub(crate) fn construct_producer(spec: &PluginSpec<'_>) -> Result<Plugin, PluginError> {
        let producer = producer(spec)?;
        let fallback = Arc::clone(producer.fallback());
        Ok(Plugin {
            data_producer: Some(producer.clone()),
            pre_request: Some(producer.matcher().clone()),
            pool_observer: Some(producer.clone()),
            binder: Some(producer.matcher().clone()),
            shared: Some(Arc::new(PrefixSource::of_producer(fallback).with_owner(producer))),
            ..Plugin::default()
        })
    }

    /// `precise-prefix-cache-scorer` and `prefix-cache-scorer {mode: cache_tracking}`: the
    /// producer and a scorer reading it, in one plugin.
    pub(crate) fn construct_scorer(spec: &PluginSpec<'_>) -> Result<Plugin, PluginError> {
        let producer = producer(spec)?;
        let fallback = Arc::clone(producer.fallback());
        let scorer = Arc::new(PrefixCacheScorer::with_producer(
            Arc::clone(&fallback),
            PrefixCacheParameters::default(),
        )?);
        scorer.source().set_owner(producer.clone());
        Ok(Plugin {
            scorer: Some(scorer.clone()),
            data_producer: Some(producer.clone()),
            pre_request: Some(producer.matcher().clone()),
            binder: Some(producer.matcher().clone()),
            pool_observer: Some(producer),
            shared: Some(scorer.source().clone()),
            ..Plugin::default()
        })
    }
}

#[cfg(feature = "kv-events")]
pub(crate) use enabled::{construct_producer, construct_scorer};

/// `precise-prefix-cache-producer` in a build without the feature.
#[cfg(not(feature = "kv-events"))]
pub(crate) fn construct_producer(
    spec: &scheduler_core::PluginSpec<'_>,
) -> Result<scheduler_core::Plugin, scheduler_core::PluginError> {
    unavailable(spec)
}

/// `precise-prefix-cache-scorer` in a build without the feature.
#[cfg(not(feature = "kv-events"))]
pub(crate) fn construct_scorer(
    spec: &scheduler_core::PluginSpec<'_>,
) -> Result<scheduler_core::Plugin, scheduler_core::PluginError> {
    unavailable(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llm_d_sample_parameters_resolve() {
        let params: PrecisePrefixParameters = serde_json::from_value(serde_json::json!({
            "tokenProcessorConfig": {"blockSize": 64, "hashSeed": "42"},
            "indexerConfig": {"kvBlockIndexConfig": {"enableMetrics": true, "inMemoryConfig": {"size": 1000}}},
            "kvEventsConfig": {"zmqEndpoint": "tcp://*:5557", "topicFilter": "kv@", "concurrency": 4,
                                "podDiscoveryConfig": {"socketPort": 6000, "replaySocketPort": 6001, "podLabelSelector": "app=vllm"}},
            "speculativeIndexing": true,
            "speculativeTTL": "2s"
        }))
        .unwrap();
        let s = params.resolve().unwrap();
        assert_eq!(
            s,
            PreciseSettings {
                block_size_tokens: 64,
                hash_seed: "42".into(),
                xxh64: false,
                capacity_per_endpoint: Some(1000),
                topic_filter: "kv@".into(),
                socket_port: 6000,
                replay_port: Some(6001),
                zmq_endpoint: Some("tcp://*:5557".into()),
                discover_pods: true,
                speculative_ttl: Some(std::time::Duration::from_secs(2)),
            }
        );
        // The older placement under indexerConfig, and the defaults.
        let params: PrecisePrefixParameters = serde_json::from_value(serde_json::json!({
            "indexerConfig": {"tokenProcessorConfig": {"blockSizeTokens": 32, "blockSize": 8, "hashAlgorithm": "xxh64"}}
        }))
        .unwrap();
        let s = params.resolve().unwrap();
        assert_eq!(
            (s.block_size_tokens, s.xxh64, s.socket_port, s.replay_port),
            (32, true, 5557, None)
        );
        let defaults = PrecisePrefixParameters::default().resolve().unwrap();
        assert_eq!(defaults.block_size_tokens, 16);
        assert_eq!((defaults.zmq_endpoint, defaults.discover_pods), (None, true));
        let params: PrecisePrefixParameters = serde_json::from_value(serde_json::json!({
            "kvEventsConfig": {"zmqEndpoint": "tcp://0.0.0.0:5557", "discoverPods": false}
        }))
        .unwrap();
        let s = params.resolve().unwrap();
        assert_eq!(s.zmq_endpoint.as_deref(), Some("tcp://0.0.0.0:5557"));
        assert!(!s.discover_pods);
    }

    #[test]
    fn bad_parameters_name_the_field() {
        let bad = |v: serde_json::Value| {
            let p: PrecisePrefixParameters = serde_json::from_value(v).unwrap();
            p.resolve().unwrap_err().to_string()
        };
        assert!(
            bad(serde_json::json!({"tokenProcessorConfig": {"blockSizeTokens": -1}}))
                .contains("-1")
        );
        assert!(
            bad(serde_json::json!({"tokenProcessorConfig": {"hashAlgorithm": "md5"}}))
                .contains("md5")
        );
        assert!(
            bad(serde_json::json!({"kvEventsConfig": {"engineType": "sglang"}})).contains("sglang")
        );
        for endpoint in ["ipc:///tmp/kv", "tcp://:5557", "tcp://epp", "tcp://epp:http"] {
            let error = bad(serde_json::json!({"kvEventsConfig": {"zmqEndpoint": endpoint}}));
            assert!(error.contains("zmqEndpoint") && error.contains(endpoint), "{error}");
        }
        assert!(
            bad(serde_json::json!({"speculativeIndexing": true, "speculativeTTL": "soon"}))
                .contains("soon")
        );
        assert!(
            bad(serde_json::json!({"speculativeIndexing": true, "speculativeTTL": "0s"}))
                .contains("positive")
        );
        let ttl = |v: serde_json::Value| {
            let p: PrecisePrefixParameters = serde_json::from_value(v).unwrap();
            p.resolve().unwrap().speculative_ttl
        };
        assert_eq!(ttl(serde_json::json!({"speculativeTTL": "5s"})), None, "off unless asked");
        assert_eq!(
            ttl(serde_json::json!({"speculativeIndexing": true, "speculativeTTL": "500ms"})),
            Some(std::time::Duration::from_millis(500))
        );
        assert!(
            serde_json::from_value::<PrecisePrefixParameters>(
                serde_json::json!({"tokenProcesorConfig": {}})
            )
            .is_err()
        );
    }
}
