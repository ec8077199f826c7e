//! The plugin registry: GIE plugin type names mapped to typed constructors.
//!
//! Each constructor parses its own parameters (serde into a config struct that denies unknown
//! fields), so no string matching on parameters or type names happens anywhere else. The core
//! registers its own plugins (`single-profile-handler`, the saturation detectors
//! `utilization-detector` and `concurrency-detector`, and the data-layer plugins); other crates (and users) add theirs with
//! [`PluginRegistry::register`].

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::admitter::{
    Admitter, PROBABILISTIC_ADMITTER_TYPE, ProbabilisticAdmitter, ProbabilisticAdmitterParameters,
};
use crate::config::data_layer::DataLayerPlugin;
use crate::flow::policy::register_policies;
use crate::flow::{
    CONCURRENCY_DETECTOR_TYPE, ConcurrencyDetector, ConcurrencyParameters, FlowPolicy,
    LocalInFlight, SaturationDetector, UTILIZATION_DETECTOR_TYPE, UtilizationDetector,
    UtilizationThresholds,
};
use crate::request::parser::RequestParser;
use crate::request_header::{AGENT_IDENTITY_TYPE, AgentIdentity, RequestHeaderProcessor};
use crate::scheduling::plugin::{
    DataProducer, Filter, Picker, PoolObserver, PreRequest, ProfileHandler, ResponseComplete,
    ResponseHeaders, Scorer, Screener, UpstreamHeaders, UsageReporter,
};
use crate::scheduling::scheduler::{SINGLE_PROFILE_HANDLER, SingleProfileHandler};

/// A plugin declaration as the constructor sees it.
#[derive(Clone, Copy, Debug)]
pub struct PluginSpec<'a> {
    /// The plugin's name in the config (its type name when no name was given).
    pub name: &'a str,
    /// The plugin's type name.
    pub type_name: &'a str,
    /// The `parameters` mapping, if any.
    pub parameters: Option<&'a serde_json::Value>,
}

impl<'a> PluginSpec<'a> {
    /// A spec for `type_name` named after its type, without parameters.
    pub fn of_type(type_name: &'a str) -> Self {
        Self { name: type_name, type_name, parameters: None }
    }

    /// Deserialises the parameters into `T`; absent or null parameters give `T::default()`.
    /// Errors start with the path of the offending parameter (`blockSize: ...`).
    pub fn parameters<T: DeserializeOwned + Default>(&self) -> Result<T, PluginError> {
        match self.parameters {
            None | Some(serde_json::Value::Null) => Ok(T::default()),
            Some(value) => serde_path_to_error::deserialize(value).map_err(|error| {
                let path = error.path().to_string();
                let error = error.into_inner();
                PluginError::InvalidParameters(if path == "." {
                    error.to_string()
                } else {
                    format!("{path}: {error}")
                })
            }),
        }
    }
}

/// Why a plugin could not be constructed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    /// A parameter is unknown, missing, of the wrong type or out of range.
    #[error("invalid parameters: {0}")]
    InvalidParameters(String),
    /// The type is known but this build cannot construct it (a cargo feature is off); the
    /// text says which build has it.
    #[error("not available in this build: {0}")]
    Unavailable(String),
}

/// The roles one constructed plugin plays. A plugin may play several (one value shared).
#[derive(Clone, Default)]
pub struct Plugin {
    /// As a filter.
    pub filter: Option<Arc<dyn Filter>>,
    /// As a scorer.
    pub scorer: Option<Arc<dyn Scorer>>,
    /// As a picker.
    pub picker: Option<Arc<dyn Picker>>,
    /// As a profile handler.
    pub profile_handler: Option<Arc<dyn ProfileHandler>>,
    /// As a screener of every profile's candidates, run once per request before the profiles.
    pub screener: Option<Arc<dyn Screener>>,
    /// As a producer of per-decision data, run before the profiles.
    pub data_producer: Option<Arc<dyn DataProducer>>,
    /// As a pre-request hook.
    pub pre_request: Option<Arc<dyn PreRequest>>,
    /// As a completion hook.
    pub response_complete: Option<Arc<dyn ResponseComplete>>,
    /// As an observer of the pool's membership.
    pub pool_observer: Option<Arc<dyn PoolObserver>>,
    /// As a saturation detector, for flow control (named by `saturationDetector.pluginRef`).
    pub saturation_detector: Option<Arc<dyn SaturationDetector>>,
    /// As a writer of headers on the request sent upstream.
    pub upstream_headers: Option<Arc<dyn UpstreamHeaders>>,
    /// As a writer of response headers.
    pub response_headers: Option<Arc<dyn ResponseHeaders>>,
    /// As a reporter of values computed from each response's token usage.
    pub usage_reporter: Option<Arc<dyn UsageReporter>>,
    /// As a request parser (named by `requestHandler.parsers[].pluginRef`).
    pub request_parser: Option<RequestParser>,
    /// As a flow-control policy (named by `fairnessPolicyRef`, `orderingPolicyRef` or
    /// `usageLimitPolicyPluginRef`).
    pub flow_policy: Option<FlowPolicy>,
    /// As a data-layer source, extractor or discovery (named from `dataLayer`).
    pub data_layer: Option<Arc<DataLayerPlugin>>,
    /// As an admission plugin, consulted after flow control and before scheduling.
    pub admitter: Option<Arc<dyn Admitter>>,
    /// As a request-header processor, run on each parsed request before flow control.
    pub request_header: Option<Arc<dyn RequestHeaderProcessor>>,
    /// State this plugin offers to the plugins that bind to it (downcast by its reader): how
    /// `prefix-cache-scorer` finds the index of an `approx-prefix-cache-producer`.
    pub shared: Option<Arc<dyn Any + Send + Sync>>,
    /// Binds this plugin to others once every declared plugin is constructed.
    pub binder: Option<Arc<dyn BindPlugins>>,
    /// Producers this plugin needs, by type name: when the config declares no plugin named
    /// after the type, one is constructed with default parameters under that name (Go's
    /// default producers, created for a data key that is consumed and not produced).
    pub default_producers: Vec<&'static str>,
}

/// A plugin that reads state another plugin of the same config offers
/// ([`Plugin::shared`]). Go's plugins find such producers through the data keys they consume;
/// here the config calls [`Self::bind`] once every declared plugin exists, so the order of
/// the declarations does not matter.
pub trait BindPlugins: Send + Sync {
    /// Finds what this plugin reads among `plugins`, or says which reference is broken.
    fn bind(&self, plugins: &crate::config::ConstructedPlugins) -> Result<(), PluginError>;
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin")
            .field("filter", &self.filter.is_some())
            .field("scorer", &self.scorer.is_some())
            .field("picker", &self.picker.is_some())
            .field("profile_handler", &self.profile_handler.is_some())
            .field("screener", &self.screener.is_some())
            .field("data_producer", &self.data_producer.is_some())
            .field("pre_request", &self.pre_request.is_some())
            .field("response_complete", &self.response_complete.is_some())
            .field("pool_observer", &self.pool_observer.is_some())
            .field("saturation_detector", &self.saturation_detector.is_some())
            .field("upstream_headers", &self.upstream_headers.is_some())
            .field("response_headers", &self.response_headers.is_some())
            .field("usage_reporter", &self.usage_reporter.is_some())
            .field("request_parser", &self.request_parser)
            .field("flow_policy", &self.flow_policy)
            .field("data_layer", &self.data_layer)
            .field("admitter", &self.admitter.is_some())
            .field("request_header", &self.request_header.is_some())
            .field("shared", &self.shared.is_some())
            .field("binder", &self.binder.is_some())
            .field("default_producers", &self.default_producers)
            .finish()
    }
}

impl Plugin {
    /// A filter.
    pub fn filter(filter: impl Filter + 'static) -> Self {
        Self { filter: Some(Arc::new(filter)), ..Self::default() }
    }

    /// A scorer.
    pub fn scorer(scorer: impl Scorer + 'static) -> Self {
        Self { scorer: Some(Arc::new(scorer)), ..Self::default() }
    }

    /// A picker.
    pub fn picker(picker: impl Picker + 'static) -> Self {
        Self { picker: Some(Arc::new(picker)), ..Self::default() }
    }

    /// A profile handler.
    pub fn profile_handler(handler: impl ProfileHandler + 'static) -> Self {
        Self { profile_handler: Some(Arc::new(handler)), ..Self::default() }
    }

    /// A saturation detector.
    pub fn saturation_detector(detector: impl SaturationDetector + 'static) -> Self {
        Self { saturation_detector: Some(Arc::new(detector)), ..Self::default() }
    }

    /// Whether the plugin can stand in a scheduling profile.
    pub fn is_profile_plugin(&self) -> bool {
        self.filter.is_some() || self.scorer.is_some() || self.picker.is_some()
    }
}

/// Constructs a plugin from its declaration.
pub type PluginFactory = Arc<dyn Fn(&PluginSpec<'_>) -> Result<Plugin, PluginError> + Send + Sync>;

/// Why the registry could not construct a plugin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// No constructor is registered for the type.
    #[error("unknown plugin type '{type_name}' (known types: {})", known.join(", "))]
    UnknownType {
        /// The type asked for.
        type_name: String,
        /// Every registered type, sorted.
        known: Vec<String>,
    },
    /// The type is experimental (alpha in llm-d-router) and experimental plugins are not
    /// allowed.
    #[error(
        "plugin type '{type_name}' is experimental (alpha in llm-d-router); allow experimental plugins (epp --allow-experimental-plugins) to use it"
    )]
    Experimental {
        /// The type asked for.
        type_name: String,
    },
    /// The constructor refused the declaration.
    #[error(transparent)]
    Plugin(#[from] PluginError),
}

/// Plugin constructors by GIE type name.
#[derive(Clone)]
pub struct PluginRegistry {
    factories: BTreeMap<String, PluginFactory>,
    /// Types registered as experimental.
    experimental: BTreeSet<String>,
    /// Whether experimental types may be constructed (off by default, as in the Go EPP).
    allow_experimental: bool,
}

impl fmt::Debug for PluginRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.factories.keys()).finish()
    }
}

impl Default for PluginRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl PluginRegistry {
    /// A registry holding the core's plugins: `single-profile-handler`, the saturation
    /// detectors `utilization-detector` (parameters: [`UtilizationThresholds`]) and
    /// `concurrency-detector` (parameters: [`ConcurrencyParameters`]; a filter too, and here,
    /// without an in-flight producer, it counts requests in flight with its own hooks), the request parsers
    /// ([`RequestParser`]: `openai-parser`, `anthropic-parser`, `vllmhttp-parser`,
    /// `passthrough-parser`, `vllmgrpc-parser`, `sglanghttp-parser`, `vertexai-parser`), the
    /// flow-control policies
    /// `global-strict-fairness-policy`, `round-robin-fairness-policy`, `fcfs-ordering-policy`,
    /// `edf-ordering-policy`, `static-usage-limit-policy` (parameters: `threshold`),
    /// `program-aware-fairness`, the experimental `soft-reflective-ceiling-policy`,
    /// `priority-holdback-policy`, `sheddable-eviction-filter` and
    /// `priority-then-time-eviction-order-policy` (see [`crate::flow::SheddableEvictionFilter`]), the
    /// admission plugin `probabilistic-admitter` (see [`crate::admitter`]), the request-header
    /// processor `agent-identity` (see [`crate::request_header`]), and the
    /// data-layer plugins (see [`data_layer`](crate::data_layer)).
    pub fn new() -> Self {
        let mut registry = Self {
            factories: BTreeMap::new(),
            experimental: BTreeSet::new(),
            allow_experimental: false,
        };
        registry.register(SINGLE_PROFILE_HANDLER, |spec| {
            spec.parameters::<NoParameters>()?;
            Ok(Plugin::profile_handler(SingleProfileHandler))
        });
        registry.register(UTILIZATION_DETECTOR_TYPE, |spec| {
            let thresholds: UtilizationThresholds = spec.parameters()?;
            Ok(Plugin::saturation_detector(UtilizationDetector::new(thresholds)))
        });
        for parser in RequestParser::ALL {
            registry.register(parser.type_name(), move |spec| {
                spec.parameters::<NoParameters>()?;
                Ok(Plugin { request_parser: Some(parser), ..Plugin::default() })
            });
        }
        // The built-in plugins replace this with a detector reading `inflight-load-producer`;
        // alone, the core has no producer, so the plugin keeps its own counts.
        registry.register(CONCURRENCY_DETECTOR_TYPE, |spec| {
            let parameters: ConcurrencyParameters = spec.parameters()?;
            let counts = Arc::new(LocalInFlight::default());
            let detector = ConcurrencyDetector::with_source(parameters, counts.clone())
                .map_err(PluginError::InvalidParameters)?;
            let detector = Arc::new(detector);
            Ok(Plugin {
                saturation_detector: Some(detector.clone()),
                filter: Some(detector),
                pre_request: Some(counts.clone()),
                response_complete: Some(counts),
                ..Plugin::default()
            })
        });
        register_policies(&mut registry);
        crate::config::data_layer::plugins::register(&mut registry);
        registry.register_experimental(AGENT_IDENTITY_TYPE, |spec| {
            let processor = AgentIdentity::new(&spec.parameters()?)?;
            Ok(Plugin { request_header: Some(Arc::new(processor)), ..Plugin::default() })
        });
        registry.register(PROBABILISTIC_ADMITTER_TYPE, |spec| {
            let parameters: ProbabilisticAdmitterParameters = spec.parameters()?;
            let admitter = ProbabilisticAdmitter::new(&parameters)?;
            Ok(Plugin { admitter: Some(Arc::new(admitter)), ..Plugin::default() })
        });
        registry
    }

    /// Registers (or replaces) the constructor of `type_name`.
    pub fn register(
        &mut self,
        type_name: impl Into<String>,
        factory: impl Fn(&PluginSpec<'_>) -> Result<Plugin, PluginError> + Send + Sync + 'static,
    ) {
        self.factories.insert(type_name.into(), Arc::new(factory));
    }

    /// Registers (or replaces) the constructor of an experimental type: one llm-d-router
    /// ranks alpha, constructed only once [`Self::allow_experimental_plugins`] says so.
    pub fn register_experimental(
        &mut self,
        type_name: impl Into<String>,
        factory: impl Fn(&PluginSpec<'_>) -> Result<Plugin, PluginError> + Send + Sync + 'static,
    ) {
        let type_name = type_name.into();
        self.experimental.insert(type_name.clone());
        self.register(type_name, factory);
    }

    /// Allows (or forbids) constructing experimental types, as the Go EPP's
    /// `--allow-experimental-plugins` does.
    pub fn allow_experimental_plugins(&mut self, allow: bool) -> &mut Self {
        self.allow_experimental = allow;
        self
    }

    /// Whether `type_name` is registered as experimental.
    pub fn is_experimental(&self, type_name: &str) -> bool {
        self.experimental.contains(type_name)
    }

    /// Whether `type_name` is registered.
    pub fn contains(&self, type_name: &str) -> bool {
        self.factories.contains_key(type_name)
    }

    /// Every registered type name, sorted.
    pub fn known_types(&self) -> impl Iterator<Item = &str> {
        self.factories.keys().map(String::as_str)
    }

    /// Constructs the plugin `spec` declares.
    pub fn create(&self, spec: &PluginSpec<'_>) -> Result<Plugin, RegistryError> {
        let factory =
            self.factories.get(spec.type_name).ok_or_else(|| RegistryError::UnknownType {
                type_name: spec.type_name.to_owned(),
                known: self.factories.keys().cloned().collect(),
            })?;
        if !self.allow_experimental && self.is_experimental(spec.type_name) {
            return Err(RegistryError::Experimental { type_name: spec.type_name.to_owned() });
        }
        Ok(factory(spec)?)
    }
}

/// Parameters of a plugin that takes none: any key is an error.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParameters {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_types_list_the_known_ones() {
        let registry = PluginRegistry::new();
        let error = registry.create(&PluginSpec::of_type("magic-scorer")).unwrap_err();
        let text = error.to_string();
        let known = text
            .strip_prefix("unknown plugin type 'magic-scorer' (known types: ")
            .and_then(|rest| rest.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{text}"));
        let known: Vec<&str> = known.split(", ").collect();
        let mut sorted = known.clone();
        sorted.sort_unstable();
        assert_eq!(known, sorted, "listed in order");
        for expected in [
            "anthropic-parser",
            "concurrency-detector",
            "metrics-data-source",
            "single-profile-handler",
            "static-usage-limit-policy",
            "probabilistic-admitter",
            "program-aware-fairness",
            "vllmgrpc-parser",
            "dcgm-data-source",
            "model-server-protocol-metrics",
        ] {
            assert!(known.contains(&expected), "{expected} in {known:?}");
        }
        assert_eq!(known.len(), registry.known_types().count());
    }

    #[test]
    fn detectors_are_plugins_with_typed_parameters() {
        let registry = PluginRegistry::new();
        let value = serde_json::json!({"maxConcurrency": 3});
        let spec = PluginSpec {
            parameters: Some(&value),
            ..PluginSpec::of_type(CONCURRENCY_DETECTOR_TYPE)
        };
        let plugin = registry.create(&spec).unwrap();
        let (Some(detector), Some(filter), Some(pre_request), Some(response_complete)) = (
            &plugin.saturation_detector,
            &plugin.filter,
            &plugin.pre_request,
            &plugin.response_complete,
        ) else {
            panic!("the concurrency detector plays four roles: {plugin:?}");
        };
        assert_eq!(
            Arc::as_ptr(detector).cast::<()>(),
            Arc::as_ptr(filter).cast::<()>(),
            "one detector behind both of its roles"
        );
        assert_eq!(
            Arc::as_ptr(pre_request).cast::<()>(),
            Arc::as_ptr(response_complete).cast::<()>(),
            "one set of counts behind both hooks"
        );
        assert!(plugin.is_profile_plugin(), "as a filter, as in Go");

        let value = serde_json::json!({"kvCacheUtilThreshold": 1.5});
        let spec = PluginSpec {
            parameters: Some(&value),
            ..PluginSpec::of_type(UTILIZATION_DETECTOR_TYPE)
        };
        assert_eq!(
            registry.create(&spec).unwrap_err().to_string(),
            "invalid parameters: kvCacheUtilThreshold: 1.5 is not a number in (0, 1]"
        );
        let value = serde_json::json!({"maxConcurency": 3});
        let spec = PluginSpec {
            parameters: Some(&value),
            ..PluginSpec::of_type(CONCURRENCY_DETECTOR_TYPE)
        };
        assert_eq!(
            registry.create(&spec).unwrap_err().to_string(),
            "invalid parameters: maxConcurency: unknown field `maxConcurency`, expected one of `maxConcurrency`, `maxTokenConcurrency`, `headroom`, `concurrencyMode`, `inFlightLoadProducerName`"
        );
    }

    #[test]
    fn experimental_types_need_permission() {
        let mut registry = PluginRegistry::new();
        registry.register_experimental("alpha-filter", |_| Ok(Plugin::default()));
        assert!(registry.is_experimental("alpha-filter") && !registry.is_experimental("x"));
        let error = registry.create(&PluginSpec::of_type("alpha-filter")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "plugin type 'alpha-filter' is experimental (alpha in llm-d-router); allow experimental plugins (epp --allow-experimental-plugins) to use it"
        );
        registry.allow_experimental_plugins(true);
        assert!(registry.create(&PluginSpec::of_type("alpha-filter")).is_ok());
    }

    #[test]
    fn parameters_are_typed() {
        #[derive(Debug, Default, serde::Deserialize, PartialEq)]
        #[serde(deny_unknown_fields, rename_all = "camelCase")]
        struct Params {
            max_num_of_endpoints: usize,
        }
        let value = serde_json::json!({"maxNumOfEndpoints": 3});
        let spec = PluginSpec { parameters: Some(&value), ..PluginSpec::of_type("p") };
        assert_eq!(spec.parameters::<Params>().unwrap(), Params { max_num_of_endpoints: 3 });
        let value = serde_json::json!({"bogus": 1});
        let spec = PluginSpec { parameters: Some(&value), ..PluginSpec::of_type("p") };
        let error = spec.parameters::<Params>().unwrap_err().to_string();
        assert_eq!(
            error,
            "invalid parameters: bogus: unknown field `bogus`, expected `maxNumOfEndpoints`"
        );
        assert!(PluginSpec::of_type("p").parameters::<Params>().is_ok());
    }
}
