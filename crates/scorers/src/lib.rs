//! The built-in filters, scorers and pickers of epp-rs, one small module each, registered
//! under their Gateway API Inference Extension (GIE) and llm-d type names.
//!
//! | type | role | module |
//! |---|---|---|
//! | `queue-scorer` | scorer | [`queue`] |
//! | `kv-cache-utilization-scorer` (alias `kv-cache-scorer`) | scorer | [`kv_cache`] |
//! | `lora-affinity-scorer` | scorer | [`lora_affinity`] |
//! | `active-request-scorer` | scorer + hooks | [`active_request`] |
//! | `prefix-cache-scorer` | scorer (+ data producer + hook with an index of its own) | [`prefix_cache`] |
//! | `approx-prefix-cache-producer` | data producer + hook (the prefix index) | [`prefix_cache::producer`] |
//! | `precise-prefix-cache-producer`, `precise-prefix-cache-scorer` (deprecated), `prefix-cache-scorer` with `mode: cache_tracking` | the index of the engines' KV-cache events (cargo feature `kv-events`) | [`precise_prefix`] |
//! | `load-aware-scorer` | scorer | [`load_aware`] |
//! | `running-requests-size-scorer` | scorer | [`running_requests`] |
//! | `token-load-scorer` | scorer (reads an `inflight-load-producer`) | [`token_load`] |
//! | `no-hit-lru-scorer` | scorer + hook | [`no_hit_lru`] |
//! | `context-length-aware` | scorer (+ filter with `enableFiltering`) | [`context_length`] |
//! | `label-selector-filter` (deprecated alias `by-label-selector`) | filter | [`label_selector`] |
//! | `by-label` (deprecated in llm-d) | filter | [`label_filter`] |
//! | `decode-filter`, `prefill-filter`, `encode-filter` | filter (`by-label` on `llm-d.ai/role`) | [`label_filter`] |
//! | `session-affinity-filter` (experimental) | filter (+ hook binding sessions with `session_id`) | [`session_affinity`] |
//! | `session-affinity-scorer` (experimental) | scorer (+ hook binding sessions with `session_id`) | [`session_affinity`] |
//! | `session-id-producer` | data producer (a request's session id, from a header or cookie) | [`session_id`] |
//! | `header-label-affinity-scorer` (experimental) | scorer | [`header_label_affinity`] |
//! | `endpoint-attribute-filter`, `endpoint-attribute-scorer` (experimental) | filter, scorer (a producer's endpoint attribute) | [`endpoint_attribute`] |
//! | `prefix-cache-affinity-filter` | filter (reads a prefix producer's matches) | [`prefix_affinity`] |
//! | `utilization-filter` (experimental) | filter (caps on in-flight and running requests, queue, KV usage) | [`utilization_filter`] |
//! | `inflight-load-producer` | hooks (requests and tokens in flight per endpoint) | [`inflight_load`] |
//! | `lora-affinity-filter` | filter | [`lora_filter`] |
//! | `multicluster-kv-cache-utilization-scorer`, `multicluster-queue-scorer` (experimental) | scorer (a peer cluster's pool averages) | [`multicluster`] |
//! | `multicluster-session-affinity-filter`, `multicluster-prefix-cache-scorer`, `multicluster-approx-prefix-cache-producer` (experimental) | as their single-cluster namesakes | [`multicluster`] |
//! | `request-attribute-reporter` | usage reporter (dynamic metadata from a CEL expression) | [`request_attribute`] |
//! | `max-score-picker`, `random-picker`, `weighted-random-picker` | picker | [`pickers`] |
//! | `single-profile-handler` | profile handler | (scheduler core) |
//! | `disagg-profile-handler`, `pd-profile-handler` (deprecated), `data-parallel-profile-handler` | profile handlers | [`disagg`] |
//! | `topology-extractor`, `topology-affinity-filter`, `topology-affinity-scorer` (experimental) | endpoint locality from labels; filter and scorer by closeness to the other stage's pick | [`topology`] |
//! | `header-profile-handler` (experimental) | profile handler (the profile a header names) | [`header_profile`] |
//! | `always-disagg-pd-decider`, `prefix-based-pd-decider`, `always-disagg-multimodal-decider` | deciders | [`disagg::deciders`] |
//! | `disagg-headers-handler`, `prefill-header-handler` (deprecated) | accepted, no effect | [`disagg`] |
//! | `utilization-detector` | saturation detector | (scheduler core, `flow`) |
//! | `concurrency-detector` | saturation detector + filter (reads an `inflight-load-producer`) | [`concurrency_detector`] |
//! | `destination-endpoint-served-verifier` | response headers (conformance tests: the served endpoint) | [`conformance`] |
//! | `disaggregatedset-rollout-screener` (experimental) | screener (one revision per request during a rollout) + response headers; its pod extractor observes the pool | [`disaggregated_set`] |
//! | `p2p-source-producer` (experimental) | request header: a peer caching more of the prompt, for a P2P KV pull | [`p2p_source`] |
//! | `header-based-testing-filter` | filter (conformance tests: the endpoints a header names) | [`conformance`] |
//!
//! The load scorers (`queue-scorer`, `kv-cache-utilization-scorer`) compensate for scrape lag by
//! default: they also count what this picker sent to each endpoint since its metrics were
//! scraped ([`lag_compensation`]), so a burst between two scrapes does not herd onto one endpoint.
//!
//! ```
//! use std::sync::Arc;
//! use scheduler_core::{
//!     Endpoint, EndpointMetrics, EndpointPickerConfig, EndpointState, InferenceRequest,
//!     PoolSnapshot,
//! };
//!
//! let config = EndpointPickerConfig::from_yaml(
//!     "plugins:\n- type: queue-scorer\n- type: max-score-picker\n",
//! )?;
//! let scheduler = config.build(&scorers::builtin_registry())?;
//! let endpoint = |port: u16, waiting_queue: u32| {
//!     EndpointState::new(Endpoint::new(([10, 0, 0, 1], port).into()))
//!         .with_metrics(EndpointMetrics { waiting_queue, ..Default::default() })
//! };
//! let pool = Arc::new(PoolSnapshot::new([endpoint(8000, 9), endpoint(8001, 0)]));
//! let result = scheduler.schedule(&InferenceRequest::new("llama", "Hi"), &pool)?;
//! assert_eq!(result.primary().endpoint.address.port(), 8001);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod active_request;
pub mod concurrency_detector;
pub mod conformance;
pub mod context_length;
pub mod disagg;
pub mod disaggregated_set;
pub mod endpoint_attribute;
pub mod header_label_affinity;
pub mod header_profile;
pub mod inflight_load;
pub mod kv_cache;
pub mod label_filter;
pub mod label_selector;
pub mod lag_compensation;
pub mod load_aware;
pub mod lora_affinity;
pub mod lora_filter;
pub mod multicluster;
pub mod no_hit_lru;
mod normalize;
pub mod p2p_source;
pub mod peer_load;
pub mod pickers;
pub mod precise_prefix;
pub mod prefix_affinity;
pub mod prefix_cache;
pub mod queue;
pub mod request_attribute;
pub mod running_requests;
pub mod session_affinity;
pub mod session_id;
pub mod token_load;
pub mod token_producer;
pub mod topology;
pub mod utilization_filter;

use std::sync::Arc;

use scheduler_core::{
    ConfigError, EndpointPickerConfig, NoParameters, Plugin, PluginError, PluginRegistry, Scheduler,
};

pub use active_request::{ActiveRequestParameters, ActiveRequestScorer};
pub use context_length::{ContextLengthAware, ContextLengthParameters};
pub use endpoint_attribute::{
    EndpointAttributeFilter, EndpointAttributeFilterParameters, EndpointAttributeScorer,
    EndpointAttributeScorerParameters,
};
pub use header_label_affinity::{HeaderLabelAffinityParameters, HeaderLabelAffinityScorer};
pub use header_profile::{HeaderProfileHandler, HeaderProfileParameters};
pub use inflight_load::{InFlightLoad, InFlightLoadParameters};
pub use kv_cache::KvCacheUtilizationScorer;
pub use label_filter::{ByLabelFilter, ByLabelParameters, RoleFilter};
pub use label_selector::{LabelSelectorFilter, LabelSelectorParameters};
pub use lag_compensation::LoadScorerParameters;
pub use load_aware::{LoadAwareParameters, LoadAwareScorer};
pub use lora_affinity::LoraAffinityScorer;
pub use lora_filter::{LoraAffinityFilter, LoraAffinityParameters};
pub use multicluster::ClusterScorer;
pub use no_hit_lru::{NoHitLruParameters, NoHitLruScorer};
pub use peer_load::{InFlightCounts, PeerInFlight, SharedInFlight, shared_in_flight};
pub use pickers::{MaxScorePicker, PickerParameters, RandomPicker, WeightedRandomPicker};
pub use prefix_affinity::{PrefixCacheAffinityFilter, PrefixCacheAffinityParameters};
pub use prefix_cache::{
    ApproxPrefixParameters, PrefixCacheParameters, PrefixCacheProducer, PrefixCacheScorer,
    PrefixSource, RecordSink, prefix_producers,
};
pub use queue::QueueScorer;
pub use request_attribute::{RequestAttributeReporter, RequestAttributeReporterParameters};
pub use running_requests::RunningRequestsSizeScorer;
pub use session_affinity::{
    SessionAffinityFilter, SessionAffinityParameters, SessionAffinityScorer, SessionIdConfig,
    SessionIdSource,
};
pub use session_id::{SessionIdParameters, SessionIdProducer};
pub use token_load::{TokenLoadParameters, TokenLoadScorer};
pub use topology::{TopologyAffinityFilter, TopologyAffinityScorer, TopologyLabels};
pub use utilization_filter::{UtilizationFilter, UtilizationFilterParameters};

/// Choices an embedder makes for every built-in plugin it builds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BuiltinOptions {
    /// When the approximate prefix indexes apply the records of picks: on a writer thread
    /// (the default, for servers), or when the scheduler is flushed (single-threaded
    /// embedders that flush after every decision, such as the simulator).
    pub prefix_records: prefix_cache::RecordApplication,
}

/// Registers every built-in plugin in `registry` under its type name (the core's own plugins,
/// the profile handler and the saturation detectors, come with [`PluginRegistry::new`]).
pub fn register_builtins(registry: &mut PluginRegistry) {
    register_builtins_with(registry, BuiltinOptions::default());
}

/// [`register_builtins`] with the embedder's `options`.
pub fn register_builtins_with(registry: &mut PluginRegistry, options: BuiltinOptions) {
    registry.register(queue::TYPE_NAME, |spec| {
        Ok(Plugin::scorer(QueueScorer::new(spec.parameters()?)))
    });
    for name in [kv_cache::TYPE_NAME, kv_cache::ALIAS_TYPE_NAME] {
        registry.register(name, |spec| {
            Ok(Plugin::scorer(KvCacheUtilizationScorer::new(spec.parameters()?)))
        });
    }
    registry.register(lora_affinity::TYPE_NAME, |spec| {
        spec.parameters::<NoParameters>()?;
        Ok(Plugin::scorer(LoraAffinityScorer))
    });
    registry.register(active_request::TYPE_NAME, |spec| {
        let scorer = Arc::new(ActiveRequestScorer::with_parameters(&spec.parameters()?));
        Ok(Plugin {
            scorer: Some(scorer.clone()),
            pre_request: Some(scorer.clone()),
            response_complete: Some(scorer.clone()),
            shared: Some(scorer),
            ..Plugin::default()
        })
    });
    fn prefix_cache_scorer(
        spec: &scheduler_core::PluginSpec<'_>,
        options: BuiltinOptions,
    ) -> Result<Plugin, PluginError> {
        // GIE's older form of the event-driven index: `mode: cache_tracking` with the precise
        // producer's parameters beside it.
        if let Some(serde_json::Value::Object(parameters)) = spec.parameters
            && let Some(mode) = parameters.get("mode")
        {
            match mode.as_str() {
                Some(precise_prefix::CACHE_TRACKING_MODE) => {
                    let mut rest = parameters.clone();
                    rest.remove("mode");
                    let rest = serde_json::Value::Object(rest);
                    let spec = scheduler_core::PluginSpec { parameters: Some(&rest), ..*spec };
                    return precise_prefix::construct_scorer(&spec);
                }
                Some("estimate") => {
                    let mut rest = parameters.clone();
                    rest.remove("mode");
                    let rest = serde_json::Value::Object(rest);
                    let spec = scheduler_core::PluginSpec { parameters: Some(&rest), ..*spec };
                    return prefix_cache_scorer(&spec, options);
                }
                _ => {
                    return Err(PluginError::InvalidParameters(format!(
                        "mode: {mode} is neither \"estimate\" nor \"{}\"",
                        precise_prefix::CACHE_TRACKING_MODE
                    )));
                }
            }
        }
        let scorer =
            Arc::new(PrefixCacheScorer::declared_with(spec.parameters()?, options.prefix_records)?);
        Ok(Plugin {
            scorer: Some(scorer.clone()),
            data_producer: Some(scorer.clone()),
            pre_request: Some(scorer.clone()),
            pool_observer: Some(scorer.clone()),
            shared: Some(scorer.source().clone()),
            binder: Some(scorer),
            ..Plugin::default()
        })
    }
    fn prefix_cache_producer(
        spec: &scheduler_core::PluginSpec<'_>,
        options: BuiltinOptions,
    ) -> Result<Plugin, PluginError> {
        let parameters: ApproxPrefixParameters = spec.parameters()?;
        let producer = Arc::new(PrefixCacheProducer::from_parameters_with(
            &parameters,
            options.prefix_records,
        )?);
        Ok(Plugin {
            data_producer: Some(producer.clone()),
            pre_request: Some(producer.clone()),
            pool_observer: Some(producer.clone()),
            shared: Some(Arc::new(PrefixSource::of_producer(producer))),
            ..Plugin::default()
        })
    }
    registry.register(prefix_cache::TYPE_NAME, move |spec| prefix_cache_scorer(spec, options));
    registry.register(prefix_cache::PRODUCER_TYPE_NAME, move |spec| {
        prefix_cache_producer(spec, options)
    });
    registry.register(precise_prefix::PRODUCER_TYPE_NAME, precise_prefix::construct_producer);
    registry.register(token_producer::TYPE_NAME, token_producer::construct);
    registry.register(token_producer::LEGACY_TYPE_NAME, token_producer::construct);
    registry
        .register(precise_prefix::DEPRECATED_SCORER_TYPE_NAME, precise_prefix::construct_scorer);
    registry.register_experimental(multicluster::PREFIX_CACHE_SCORER_TYPE_NAME, move |spec| {
        prefix_cache_scorer(spec, options)
    });
    registry.register_experimental(multicluster::PREFIX_CACHE_PRODUCER_TYPE_NAME, move |spec| {
        prefix_cache_producer(spec, options)
    });
    registry.register(load_aware::TYPE_NAME, |spec| {
        Ok(Plugin::scorer(LoadAwareScorer::new(spec.parameters()?)?))
    });
    registry.register(running_requests::TYPE_NAME, |spec| {
        spec.parameters::<NoParameters>()?;
        Ok(Plugin::scorer(RunningRequestsSizeScorer))
    });
    registry.register(token_load::TYPE_NAME, |spec| {
        let scorer = Arc::new(TokenLoadScorer::new(&spec.parameters()?)?);
        Ok(Plugin {
            scorer: Some(scorer.clone()),
            default_producers: scorer.default_producers(),
            binder: Some(scorer),
            ..Plugin::default()
        })
    });
    registry.register(no_hit_lru::TYPE_NAME, |spec| {
        let scorer = Arc::new(NoHitLruScorer::new(&spec.parameters()?)?);
        Ok(Plugin { scorer: Some(scorer.clone()), pre_request: Some(scorer), ..Plugin::default() })
    });
    registry.register(context_length::TYPE_NAME, |spec| {
        let plugin = Arc::new(ContextLengthAware::new(spec.parameters()?)?);
        // Without `enableFiltering` llm-d-router's filter passes every endpoint through;
        // not registering it as a filter is the same, minus a call per request.
        let filter = plugin.filters().then(|| plugin.clone() as Arc<dyn scheduler_core::Filter>);
        Ok(Plugin { scorer: Some(plugin), filter, ..Plugin::default() })
    });
    registry.register(label_filter::TYPE_NAME, |spec| {
        Ok(Plugin::filter(ByLabelFilter::new(spec.parameters()?)?))
    });
    for role in RoleFilter::ALL {
        registry.register(role.type_name(), move |spec| {
            spec.parameters::<scheduler_core::NoParameters>()?;
            Ok(Plugin::filter(ByLabelFilter::new(role.parameters())?))
        });
    }
    // Go registers the deprecated name with the same factory as the current one.
    for name in [label_selector::TYPE_NAME, label_selector::DEPRECATED_TYPE_NAME] {
        registry.register(name, |spec| {
            Ok(Plugin::filter(LabelSelectorFilter::new(spec.parameters()?)?))
        });
    }
    registry.register_experimental(endpoint_attribute::FILTER_TYPE_NAME, |spec| {
        let filter = Arc::new(EndpointAttributeFilter::new(spec.parameters()?)?);
        Ok(Plugin { filter: Some(filter.clone()), binder: Some(filter), ..Plugin::default() })
    });
    registry.register_experimental(endpoint_attribute::SCORER_TYPE_NAME, |spec| {
        let scorer = Arc::new(EndpointAttributeScorer::new(spec.parameters()?)?);
        Ok(Plugin { scorer: Some(scorer.clone()), binder: Some(scorer), ..Plugin::default() })
    });
    for name in
        [session_affinity::FILTER_TYPE_NAME, multicluster::SESSION_AFFINITY_FILTER_TYPE_NAME]
    {
        registry.register_experimental(name, |spec| {
            let filter = Arc::new(SessionAffinityFilter::new(spec.parameters()?)?);
            Ok(Plugin {
                filter: Some(filter.clone()),
                pre_request: Some(filter.clone()),
                response_headers: Some(filter),
                ..Plugin::default()
            })
        });
    }
    registry.register_experimental(multicluster::KV_CACHE_SCORER_TYPE_NAME, |spec| {
        spec.parameters::<NoParameters>()?;
        let scorer = Arc::new(ClusterScorer::kv_cache());
        Ok(Plugin { scorer: Some(scorer.clone()), binder: Some(scorer), ..Plugin::default() })
    });
    registry.register_experimental(multicluster::QUEUE_SCORER_TYPE_NAME, |spec| {
        spec.parameters::<NoParameters>()?;
        let scorer = Arc::new(ClusterScorer::queue());
        Ok(Plugin { scorer: Some(scorer.clone()), binder: Some(scorer), ..Plugin::default() })
    });
    registry.register_experimental(session_affinity::SCORER_TYPE_NAME, |spec| {
        let scorer = Arc::new(SessionAffinityScorer::new(spec.parameters()?)?);
        Ok(Plugin {
            scorer: Some(scorer.clone()),
            pre_request: Some(scorer.clone()),
            response_headers: Some(scorer),
            ..Plugin::default()
        })
    });
    registry.register(session_id::TYPE_NAME, |spec| {
        let producer = SessionIdProducer::new(spec.name, &spec.parameters()?)?;
        Ok(Plugin { data_producer: Some(Arc::new(producer)), ..Plugin::default() })
    });
    registry.register_experimental(header_label_affinity::TYPE_NAME, |spec| {
        Ok(Plugin::scorer(HeaderLabelAffinityScorer::new(spec.parameters()?)?))
    });
    registry.register_experimental(topology::EXTRACTOR_TYPE_NAME, |spec| {
        let labels = TopologyLabels::new(spec.parameters()?);
        Ok(Plugin { shared: Some(Arc::new(labels)), ..Plugin::default() })
    });
    registry.register_experimental(topology::FILTER_TYPE_NAME, |spec| {
        let filter = Arc::new(TopologyAffinityFilter::new(spec.parameters()?)?);
        Ok(Plugin { filter: Some(filter.clone()), binder: Some(filter), ..Plugin::default() })
    });
    registry.register_experimental(topology::SCORER_TYPE_NAME, |spec| {
        let scorer = Arc::new(TopologyAffinityScorer::new(spec.parameters()?));
        Ok(Plugin { scorer: Some(scorer.clone()), binder: Some(scorer), ..Plugin::default() })
    });
    registry.register_experimental(header_profile::TYPE_NAME, |spec| {
        Ok(Plugin::profile_handler(HeaderProfileHandler::new(&spec.parameters()?)?))
    });
    registry.register_experimental(utilization_filter::TYPE_NAME, |spec| {
        let filter = Arc::new(UtilizationFilter::new(spec.parameters()?)?);
        Ok(Plugin {
            filter: Some(filter.clone()),
            default_producers: filter.default_producers(),
            binder: Some(filter),
            ..Plugin::default()
        })
    });
    registry.register(inflight_load::TYPE_NAME, |spec| {
        let producer = Arc::new(InFlightLoad::new(&spec.parameters()?)?);
        Ok(Plugin {
            pre_request: Some(producer.clone()),
            response_complete: Some(producer.clone()),
            pool_observer: Some(producer.clone()),
            shared: Some(producer),
            ..Plugin::default()
        })
    });
    registry
        .register(scheduler_core::flow::CONCURRENCY_DETECTOR_TYPE, concurrency_detector::construct);
    registry.register(prefix_affinity::TYPE_NAME, |spec| {
        let filter = Arc::new(PrefixCacheAffinityFilter::new(spec.parameters()?)?);
        Ok(Plugin {
            filter: Some(filter.clone()),
            default_producers: filter.default_producers(),
            binder: Some(filter),
            ..Plugin::default()
        })
    });
    registry.register(lora_filter::TYPE_NAME, |spec| {
        Ok(Plugin::filter(LoraAffinityFilter::new(spec.parameters()?)?))
    });
    registry.register(request_attribute::TYPE_NAME, |spec| {
        let reporter = RequestAttributeReporter::new(spec.parameters()?)?;
        Ok(Plugin { usage_reporter: Some(Arc::new(reporter)), ..Plugin::default() })
    });
    registry.register(pickers::MAX_SCORE_TYPE_NAME, |spec| {
        Ok(Plugin::picker(MaxScorePicker::new(PickerParameters::from_spec(spec)?)))
    });
    registry.register(pickers::RANDOM_TYPE_NAME, |spec| {
        Ok(Plugin::picker(RandomPicker::new(PickerParameters::from_spec(spec)?)))
    });
    registry.register(pickers::WEIGHTED_RANDOM_TYPE_NAME, |spec| {
        Ok(Plugin::picker(WeightedRandomPicker::new(PickerParameters::from_spec(spec)?)))
    });
    registry.register(conformance::SERVED_VERIFIER_TYPE_NAME, |spec| {
        spec.parameters::<NoParameters>()?;
        let verifier = conformance::DestinationEndpointServedVerifier;
        Ok(Plugin { response_headers: Some(Arc::new(verifier)), ..Plugin::default() })
    });
    registry.register(conformance::HEADER_FILTER_TYPE_NAME, |spec| {
        spec.parameters::<NoParameters>()?;
        Ok(Plugin::filter(conformance::HeaderBasedTestingFilter))
    });
    registry.register_experimental(disaggregated_set::TYPE_NAME, |spec| {
        if matches!(spec.parameters, None | Some(serde_json::Value::Null)) {
            return Err(PluginError::InvalidParameters(format!(
                "{} requires parameters",
                disaggregated_set::TYPE_NAME
            )));
        }
        let screener = Arc::new(disaggregated_set::RolloutScreener::new(spec.parameters()?)?);
        let pool_observer = screener
            .extractor()
            .map(|extractor| extractor.clone() as Arc<dyn scheduler_core::PoolObserver>);
        Ok(Plugin {
            screener: Some(screener.clone()),
            response_headers: Some(screener),
            pool_observer,
            ..Plugin::default()
        })
    });
    registry.register_experimental(p2p_source::TYPE_NAME, |spec| {
        let producer = Arc::new(p2p_source::P2pSourceProducer::new(spec.parameters()?)?);
        Ok(Plugin {
            upstream_headers: Some(producer.clone()),
            default_producers: producer.default_producers(),
            binder: Some(producer),
            ..Plugin::default()
        })
    });
    disagg::register(registry);
}

/// A registry with the core's and every built-in plugin.
pub fn builtin_registry() -> PluginRegistry {
    builtin_registry_with(BuiltinOptions::default())
}

/// [`builtin_registry`] with the embedder's `options`.
pub fn builtin_registry_with(options: BuiltinOptions) -> PluginRegistry {
    let mut registry = PluginRegistry::new();
    register_builtins_with(&mut registry, options);
    registry
}

/// The scheduler GIE runs when no config is given.
pub fn default_scheduler() -> Result<Scheduler, ConfigError> {
    EndpointPickerConfig::gie_default().build(&builtin_registry())
}
