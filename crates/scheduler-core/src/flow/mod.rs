//! Flow control: request priority, saturation detection, and admission (shed or queue).
//!
//! The path of a request, as an adapter drives it:
//! 1. [`ObjectiveResolver`] maps the `x-llm-d-inference-objective` header (or its older name
//!    `x-gateway-inference-objective`), or failing that the model, to a priority.
//! 2. A [`SaturationDetector`] says whether the pool has room ([`UtilizationDetector`], GIE's
//!    default; [`ConcurrencyDetector`]; [`PermitDetector`]). The config names it with
//!    `saturationDetector.pluginRef` (a plugin playing the saturation detector role), or gives
//!    the utilization detector's thresholds.
//! 3. Without the `flowControl` gate, [`Shedder`] admits, or sheds a sheddable request
//!    (priority < 0) while the pool is saturated. With it, [`FlowController`] queues requests in
//!    bounded priority bands and dispatches them by priority, fairness and order as room frees.
//! 4. Either way the adapter holds a [`Ticket`]: await it (or poll [`Ticket::try_outcome`]),
//!    then schedule on admission or answer 429 on a [`NotAdmitted`]; drop it to cancel.
//! 5. On completion the adapter calls [`FlowController::release`] (or registers
//!    [`ReleaseOnComplete`]), and calls [`FlowController::tick`] periodically.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Instant;
//! use scheduler_core::flow::{
//!     FlowControlConfig, FlowController, FlowMetrics, FlowRequest, PermitDetector,
//! };
//! use scheduler_core::PoolSnapshot;
//!
//! let permits = Arc::new(PermitDetector::new(1));
//! let controller = FlowController::new(
//!     FlowControlConfig::default(),
//!     permits.clone(),
//!     Arc::new(FlowMetrics::new()),
//! );
//! let pool = PoolSnapshot::default();
//! let now = Instant::now();
//! let request = |priority| FlowRequest {
//!     priority, flow_id: "tenant-a", size_bytes: 10, ttl: None, slo_ttft: None,
//! };
//! let first = controller.enqueue(request(0), &pool, now);
//! let second = controller.enqueue(request(0), &pool, now);
//! assert!(matches!(first.try_outcome(), Some(Ok(_))), "room for one: admitted at once");
//! assert!(second.try_outcome().is_none(), "the second waits");
//! permits.return_permit(); // the first request completed
//! controller.release(&pool, now);
//! assert!(matches!(second.try_outcome(), Some(Ok(_))));
//! ```

mod admission;
mod concurrency;
mod config;
mod controller;
mod eviction;
pub(crate) mod eviction_policy;
mod holdback;
mod metrics;
mod objective;
mod outcome;
pub(crate) mod policy;
mod program_aware;
mod queue;
mod saturation;
mod ticket;
pub(crate) mod units;

pub use units::parse_go_duration;

pub use admission::{Admission, AdmissionMode, Clock, ReleaseOnComplete, Shedder};
pub use concurrency::{
    CONCURRENCY_DETECTOR_TYPE, ConcurrencyDetector, ConcurrencyMode, ConcurrencyParameters,
    DEFAULT_IN_FLIGHT_PRODUCER, DEFAULT_MAX_CONCURRENCY, DEFAULT_MAX_TOKEN_CONCURRENCY, InFlight,
    InFlightSource, LocalInFlight,
};
pub use config::{
    BandConfig, DEFAULT_REQUEST_TTL, FLOW_CONTROL_FEATURE_GATE, FairnessPolicy, FlowConfigError,
    FlowControlConfig, OrderingPolicy, SaturationDetectorSection, configured_detector,
    configured_metrics_staleness, resolve_policies,
};
pub use controller::{
    FlowController, FlowRequest, OLD_SLO_TTFT_HEADER, PassReport, SLO_TTFT_HEADER, slo_ttft,
};
pub use eviction::{Evicted, EvictedFuture, InFlightGuard, InFlightRequests, is_evictable};
pub use eviction_policy::{
    EvictionCandidate, PRIORITY_THEN_TIME_EVICTION_ORDER_TYPE, PriorityThenTimeEvictionOrder,
    SHEDDABLE_EVICTION_FILTER_TYPE, SheddableEvictionFilter,
};
pub use holdback::{
    BandPlace, HoldbackDomain, InvalidHoldback, PRIORITY_HOLDBACK_TYPE, PriorityHoldback,
    PriorityHoldbackParameters,
};
pub use metrics::{FlowMetrics, FlowMetricsSnapshot, OutcomeReason, WAIT_BUCKET_BOUNDS};
pub use objective::{
    Criticality, DEFAULT_PRIORITY, EntryPosition, InferenceObjectiveConfig, LegacyModelConfig,
    ObjectiveError, ObjectiveResolver,
};
pub use outcome::{
    Admitted, CLIENT_CLOSED_REQUEST, CapacityLimit, FlowOutcome, NotAdmitted, outcome_reason,
};
pub use policy::{
    EDF_ORDERING_TYPE, FCFS_ORDERING_TYPE, FlowPolicy, GLOBAL_STRICT_FAIRNESS_TYPE,
    InvalidThreshold, ROUND_ROBIN_FAIRNESS_TYPE, SLO_DEADLINE_ORDERING_TYPE,
    SOFT_REFLECTIVE_CEILING_TYPE, STATIC_USAGE_LIMIT_TYPE, SoftReflectiveCeiling, StaticUsageLimit,
    StaticUsageLimitParameters, UsageLimitPolicy, fairness_by_type, ordering_by_type,
    usage_limit_by_type,
};
pub use program_aware::{
    FlowHead, PROGRAM_AWARE_FAIRNESS_TYPE, ProgramAwareFairness, ProgramAwareParameters,
};
pub use queue::{BandStats, IDLE_FLOWS_KEPT};
pub use saturation::{
    DEFAULT_KV_CACHE_UTIL_THRESHOLD, DEFAULT_METRICS_STALENESS_THRESHOLD,
    DEFAULT_QUEUE_DEPTH_THRESHOLD, NeverSaturated, PermitDetector, SaturationDetector,
    UTILIZATION_DETECTOR_TYPE, UtilizationDetector, UtilizationThresholds,
};
pub use ticket::Ticket;
