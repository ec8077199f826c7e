//! The scheduling core of epp-rs: endpoint and request types, the plugin traits, scheduling
//! profiles, the plugin registry and the `EndpointPickerConfig` loader.
//!
//! The core is runtime-agnostic (no async runtime) and allocation-lean on the hot path:
//! plugins are dispatched once per request, scorers fill caller-provided buffers, and pool
//! state is read from an immutable [`PoolSnapshot`] published through [`SharedPool`].
//!
//! ```
//! use std::sync::Arc;
//! use scheduler_core::{
//!     Candidates, CycleState, Endpoint, EndpointState, InferenceRequest, Picker, PoolSnapshot,
//!     Scheduler, SchedulerProfile, SingleProfileHandler,
//! };
//!
//! /// Picks the first candidate: the smallest possible picker.
//! #[derive(Debug)]
//! struct First;
//! impl Picker for First {
//!     fn pick(&self, _: &mut CycleState, _: Candidates<'_>, _: &[f64], picked: &mut Vec<u32>) {
//!         picked.push(0);
//!     }
//! }
//!
//! let profile = SchedulerProfile::new("default", "first", Arc::new(First));
//! let scheduler = Scheduler::new(vec![profile], Arc::new(SingleProfileHandler));
//! let pool = Arc::new(PoolSnapshot::new([EndpointState::new(Endpoint::new(
//!     "10.0.0.7:8000".parse().unwrap(),
//! ))]));
//! let result = scheduler.schedule(&InferenceRequest::new("llama", "Hello"), &pool).unwrap();
//! assert_eq!(result.primary().endpoint.address.to_string(), "10.0.0.7:8000");
//! ```

// The tree follows a request: `request` (parsing, the protocol's names) -> `flow` (admission:
// priority, saturation, shedding, queues) -> `scheduling` (filters -> scorers -> picker ->
// hooks, over the `pool` snapshot) -> `director` (the whole path, for adapters); `config`
// builds the scheduling side from an EndpointPickerConfig. Everything is re-exported here
// once; `flow`, `protocol` and `hash` are namespaces of their own.
pub mod admitter;
mod config;
mod director;
pub mod flow;
pub mod hash;
mod pool;
pub mod protocol;
mod request;
pub mod request_header;
pub mod rewrite;
mod scheduling;

pub use config::data_layer;
pub use config::gates::{GateError, KNOWN_GATES, KnownGate};
pub use config::registry::{
    BindPlugins, NoParameters, Plugin, PluginError, PluginFactory, PluginRegistry, PluginSpec,
    RegistryError,
};
pub use config::{
    ACCEPTED_API_VERSIONS, CONFIG_KIND, ConfigError, ConstructedPlugin, ConstructedPlugins,
    DEFAULT_CONFIG_YAML, DEFAULT_PICKER_TYPE, DEFAULT_PROFILE_NAME, EndpointPickerConfig,
    PluginConfig, PluginRef, ProfileConfig,
};
pub use director::{
    Director, DirectorBuildError, DirectorOptions, MAX_REPORTED_MODEL_BYTES, Rejection, Routed,
};
pub use pool::attributes::{AttributeHandle, AttributeValues, EndpointAttributes};
pub use pool::dispatch_log::{DISPATCH_RING_SLOTS, DispatchLog, PendingDispatches};
pub use pool::endpoint::{
    Endpoint, EndpointId, EndpointIdHasher, EndpointMap, EndpointMetrics, EndpointRole,
    EndpointState, ROLE_LABEL,
};
pub use pool::staleness::{
    AllStale, DEFAULT_METRICS_STALENESS_THRESHOLD, StalenessPolicy, last_known_load,
};
pub use pool::{PoolSnapshot, SharedPool};
pub use request::body::{ApiKind, BodyError, ParsedBody};
pub use request::model_field::{self, ModelField, ModelFieldError};
pub use request::parser::{ParserTable, RequestParser};
pub use request::{CHARACTERS_PER_TOKEN, InferenceRequest};
pub use scheduling::cycle::CycleState;
pub use scheduling::plugin::{
    Candidates, DataProducer, Filter, Picker, PoolObserver, PreRequest, ProfileHandler,
    ProfileProgress, ReportedAttribute, ResponseComplete, ResponseHeaders, ResponseUsage, Scorer,
    Screener, ServedReport, UpstreamHeaders, UsageReporter,
};
pub use scheduling::profile::{ProfileExplanation, SchedulerProfile, WeightedScorer};
pub use scheduling::result::{
    CompletedRequest, CompletionGuard, Outcome, PrefillCompleted, ProfileRun, ResponseStarted,
    SchedulingError, SchedulingResult, StageRuns,
};
pub use scheduling::scheduler::{
    ALL_STALE_MAX_PICKS, SINGLE_PROFILE_HANDLER, ScheduleOptions, Scheduler, SingleProfileHandler,
};
