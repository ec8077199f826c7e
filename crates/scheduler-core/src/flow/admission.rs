//! Admission: the one entry point adapters call, with or without the `flowControl` gate.
//!
//! Without the gate, [`Shedder`] decides on the spot: admit unless the pool is saturated and
//! the request is sheddable (priority < 0), in which case it is shed; a request with a
//! non-negative priority is never shed. With the gate, requests go through the [`FlowController`]'s queues.
//! [`Admission`] hides the difference: both return a [`Ticket`].

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use crate::config::{ConstructedPlugins, EndpointPickerConfig};
use crate::flow::config::{
    FLOW_CONTROL_FEATURE_GATE, FlowConfigError, configured_detector, resolve_policies,
};
use crate::flow::controller::{FlowController, FlowRequest, PassReport};
use crate::flow::metrics::{FlowMetrics, OutcomeReason};
use crate::flow::objective::ObjectiveResolver;
use crate::flow::outcome::{Admitted, FlowOutcome, NotAdmitted};
use crate::flow::saturation::SaturationDetector;
use crate::flow::ticket::Ticket;
use crate::pool::{PoolSnapshot, SharedPool};
use crate::request::InferenceRequest;
use crate::scheduling::plugin::ResponseComplete;
use crate::scheduling::result::CompletedRequest;

/// Admission without queues: shed sheddable requests while the pool is saturated.
#[derive(Clone, Debug)]
pub struct Shedder {
    detector: Arc<dyn SaturationDetector>,
    metrics: Arc<FlowMetrics>,
}

impl Shedder {
    /// A shedder asking `detector`, counting into `metrics`.
    pub fn new(detector: Arc<dyn SaturationDetector>, metrics: Arc<FlowMetrics>) -> Self {
        Self { detector, metrics }
    }

    /// Admits, or sheds a request with `priority` < 0 when the pool is saturated at `now`.
    pub fn admit(&self, priority: i32, pool: &PoolSnapshot, now: Instant) -> FlowOutcome {
        // Only sheddable requests pay for the saturation check: the others are admitted anyway.
        if priority < 0 && self.detector.is_saturated(pool, now) {
            self.metrics.record_outcome(OutcomeReason::Shed);
            return Err(NotAdmitted::Shed { priority });
        }
        self.detector.on_admit();
        self.metrics.record_outcome(OutcomeReason::Admitted);
        Ok(Admitted { waited: std::time::Duration::ZERO, dispatch_seq: 0 })
    }
}

/// How requests are admitted.
#[derive(Clone, Debug)]
pub enum AdmissionMode {
    /// No queues (gate off): admit or shed at once.
    Shed(Shedder),
    /// Queued flow control (gate on).
    Queue(FlowController),
}

/// Objective resolution plus admission: what an adapter holds.
#[derive(Clone, Debug)]
pub struct Admission {
    objectives: ObjectiveResolver,
    mode: AdmissionMode,
}

impl Admission {
    /// Builds admission from a whole config: the detector named by `saturationDetector` /
    /// `flowControl.saturationDetector` (see [`configured_detector`]), taken from `plugins`,
    /// the plugins constructed for the scheduler, so that a detector with hooks (such as the
    /// concurrency detector) is the instance the scheduler informs; queues when the
    /// `flowControl` feature gate is on, with the policies its bands and
    /// `usageLimitPolicyPluginRef` name resolved against `plugins` ([`resolve_policies`]).
    /// Metrics are shared with `objectives`.
    pub fn from_config(
        config: &EndpointPickerConfig,
        plugins: &ConstructedPlugins,
        objectives: ObjectiveResolver,
    ) -> Result<Self, FlowConfigError> {
        let detector = configured_detector(config, plugins)?;
        let metrics = Arc::clone(objectives.metrics());
        let mode = if config.feature_enabled(FLOW_CONTROL_FEATURE_GATE) {
            let mut flow_config = config.flow_control.clone().unwrap_or_default();
            resolve_policies(&mut flow_config, plugins)?;
            AdmissionMode::Queue(FlowController::new(flow_config, detector, metrics))
        } else {
            AdmissionMode::Shed(Shedder::new(detector, metrics))
        };
        Ok(Self { objectives, mode })
    }

    /// Admission with an explicit `mode` (for custom detectors).
    pub fn new(objectives: ObjectiveResolver, mode: AdmissionMode) -> Self {
        Self { objectives, mode }
    }

    /// Resolves the request's priority from its objective (stored into `request.priority`),
    /// then admits, sheds or queues it. `size_bytes` counts against the byte caps.
    pub fn submit(
        &self,
        request: &mut InferenceRequest,
        size_bytes: u64,
        pool: &PoolSnapshot,
        now: Instant,
    ) -> Ticket {
        let priority = self.objectives.apply(request);
        match &self.mode {
            AdmissionMode::Shed(shedder) => Ticket::resolved(shedder.admit(priority, pool, now)),
            AdmissionMode::Queue(controller) => controller.enqueue(
                FlowRequest::from_inference_request(request, size_bytes),
                pool,
                now,
            ),
        }
    }

    /// Expires and dispatches queued requests (no-op without queues). Call periodically.
    pub fn tick(&self, pool: &PoolSnapshot, now: Instant) -> PassReport {
        match &self.mode {
            AdmissionMode::Shed(_) => PassReport::default(),
            AdmissionMode::Queue(controller) => controller.tick(pool, now),
        }
    }

    /// Backpressure for callers that can wait before taking a request: `Pending` while the
    /// flow controller's queues are at their global request cap (the task is woken when a
    /// place frees), `Ready` otherwise and always when shedding (no queue to fill).
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        match &self.mode {
            AdmissionMode::Shed(_) => Poll::Ready(()),
            AdmissionMode::Queue(controller) => controller.poll_capacity(cx),
        }
    }

    /// Call when an admitted request completes (no-op without queues).
    pub fn release(&self, pool: &PoolSnapshot, now: Instant) -> PassReport {
        self.tick(pool, now)
    }

    /// The admission mode.
    pub fn mode(&self) -> &AdmissionMode {
        &self.mode
    }

    /// The objective resolver.
    pub fn objectives(&self) -> &ObjectiveResolver {
        &self.objectives
    }

    /// The flow controller, when the gate is on.
    pub fn controller(&self) -> Option<&FlowController> {
        match &self.mode {
            AdmissionMode::Queue(controller) => Some(controller),
            AdmissionMode::Shed(_) => None,
        }
    }
}

/// The adapter's clock, injected so the core never reads time itself.
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// A `ResponseComplete` hook that runs a dispatch pass when a request finishes, so queued
/// requests go out as soon as capacity frees. Register it after any hook that updates
/// saturation state (such as [`ConcurrencyDetector`](crate::flow::ConcurrencyDetector)), so
/// the pass sees the freed capacity.
#[derive(Clone)]
pub struct ReleaseOnComplete {
    controller: FlowController,
    pool: Arc<SharedPool>,
    clock: Clock,
}

impl ReleaseOnComplete {
    /// A hook releasing into `controller`, reading the pool from `pool` and time from `clock`.
    pub fn new(controller: FlowController, pool: Arc<SharedPool>, clock: Clock) -> Self {
        Self { controller, pool, clock }
    }
}

impl fmt::Debug for ReleaseOnComplete {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReleaseOnComplete")
            .field("controller", &self.controller)
            .finish_non_exhaustive()
    }
}

impl ResponseComplete for ReleaseOnComplete {
    fn response_complete(&self, _completed: &CompletedRequest) {
        let now = (self.clock)();
        self.controller.release(&self.pool.load(), now);
    }
}
