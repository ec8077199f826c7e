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

pub mod body;
pub mod config;
pub mod cycle;
pub mod director;
pub mod dispatch_log;
pub mod endpoint;
pub mod flow;
pub mod hash;
pub mod plugin;
pub mod pool;
pub mod profile;
pub mod protocol;
pub mod registry;
pub mod request;
pub mod result;
pub mod scheduler;

pub use body::{ApiKind, BodyError, ParsedBody};
pub use config::{ConfigError, EndpointPickerConfig, PluginConfig, PluginRef, ProfileConfig};
pub use cycle::CycleState;
pub use director::{Director, DirectorBuildError, DirectorOptions, Rejection, Routed};
pub use dispatch_log::{DispatchLog, PendingDispatches};
pub use endpoint::{
    Endpoint, EndpointId, EndpointIdHasher, EndpointMap, EndpointMetrics, EndpointRole,
    EndpointState,
};
pub use plugin::{
    Candidates, Filter, Picker, PoolObserver, PreRequest, ProfileHandler, ResponseComplete, Scorer,
};
pub use pool::{PoolSnapshot, SharedPool};
pub use profile::{ProfileExplanation, SchedulerProfile, WeightedScorer};
pub use registry::{
    NoParameters, Plugin, PluginError, PluginFactory, PluginRegistry, PluginSpec, RegistryError,
};
pub use request::InferenceRequest;
pub use result::{
    CompletedRequest, CompletionGuard, Outcome, ProfileRun, SchedulingError, SchedulingResult,
};
pub use scheduler::{ScheduleOptions, Scheduler, SingleProfileHandler};
