//! The flow controller: bounded priority-band queues in front of the scheduler.
//!
//! Algorithm. A request is submitted with a priority, a flow (fairness) id, a size and an
//! optional TTL. If nothing of its priority or higher is queued and the detector reports room,
//! it is admitted on arrival without touching the queues. Otherwise it is rejected at once if
//! queueing it would exceed a cap (band or global, requests or bytes). Otherwise it is queued in its band and the controller dispatches: while
//! some band holds requests and the saturation detector reports room, it takes the next request
//! of the highest non-empty band (strict priority across bands), choosing the flow by the band's
//! fairness policy (round-robin: flows take turns, so a flow with a queued request waits at most
//! `flows - 1` dispatches of its band; global-strict: the best head across flows) and the
//! request within the flow by its ordering policy (FCFS or EDF). Expired requests are removed
//! before every dispatch pass. Passes run on submit, on [`FlowController::tick`] (saturation may
//! have lifted) and on [`FlowController::release`] (a request finished).
//!
//! Gating. A band may dispatch while the detector reports room and the usage limit policy
//! (`usageLimitPolicyPluginRef`) allows it: with a threshold below 1, the band is also blocked
//! once the detector's saturation level reaches the threshold; with a soft reflective ceiling,
//! once it reaches the ceiling of the band's rank among the known bands; with a priority
//! holdback, once it reaches the band's ceiling by rank or priority value. When the top band
//! is blocked and eviction is on (`enableEviction`), one sheddable request in flight of lower
//! priority is evicted (see [`InFlightRequests`]); its end releases capacity and triggers the
//! next pass.
//!
//! TTL. A request's queue TTL is its own, else its band's, else `defaultRequestTTL`. With
//! `noEndpointRequestTTL` set, the budget follows the pool's regime as in the Go EPP: while the
//! pool has no endpoints a queued request may wait `noEndpointRequestTTL`, otherwise its TTL,
//! each measured from when the current regime began (or from arrival, if later), and never
//! longer in total than the longer of the two. Each pass then scans the queued requests.
//!
//! Guarantees. Every submitted request gets exactly one outcome, written once into its ticket
//! under the controller lock: admitted, rejected (capacity), expired or cancelled (its ticket
//! was dropped). Caps are checked before insertion, so queued counts never exceed them. All
//! mutation happens under one parking_lot mutex; wakers run after it is released.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::flow::config::FlowControlConfig;
use crate::flow::eviction::InFlightRequests;
use crate::flow::holdback::BandPlace;
use crate::flow::metrics::{FlowMetrics, OutcomeReason};
use crate::flow::outcome::{Admitted, CapacityLimit, FlowOutcome, NotAdmitted};
use crate::flow::queue::{BandStats, Entry, QueueState, Regime, SlotKey};
use crate::flow::saturation::SaturationDetector;
use crate::flow::ticket::{Ticket, TicketCell};
use crate::pool::PoolSnapshot;
use crate::request::InferenceRequest;

/// What the controller needs to know about a request to queue it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowRequest<'a> {
    /// Priority: higher is dispatched first.
    pub priority: i32,
    /// Fairness flow (tenant); requests without one share the flow `""`.
    pub flow_id: &'a str,
    /// Size counted against the byte caps (usually the request body length).
    pub size_bytes: u64,
    /// Queue TTL of this request; `None` uses the band's, then the global default. Zero means
    /// no TTL.
    pub ttl: Option<Duration>,
    /// The request's time-to-first-token objective (`x-llm-d-slo-ttft-ms`), which orders it
    /// under `slo-deadline-ordering-policy`; `None` sorts after every request with one.
    pub slo_ttft: Option<Duration>,
}

impl<'a> FlowRequest<'a> {
    /// The flow-control view of `request` (its priority and fairness id) of `size_bytes`.
    pub fn from_inference_request(request: &'a InferenceRequest, size_bytes: u64) -> Self {
        Self {
            priority: request.priority,
            flow_id: request.fairness_id.as_deref().unwrap_or(""),
            size_bytes,
            ttl: None,
            slo_ttft: slo_ttft(request),
        }
    }

    /// Sets a per-request TTL.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
}

/// The request header carrying the time-to-first-token objective in milliseconds.
pub const SLO_TTFT_HEADER: &str = "x-llm-d-slo-ttft-ms";
/// The older name of [`SLO_TTFT_HEADER`], still read when the new one is absent.
pub const OLD_SLO_TTFT_HEADER: &str = "x-slo-ttft-ms";

/// The time-to-first-token objective of `request`: its [`SLO_TTFT_HEADER`] (else
/// [`OLD_SLO_TTFT_HEADER`]) as whole milliseconds. Missing, empty, negative, unparsable or too
/// large values (beyond what Go's nanosecond durations hold) give `None`, as in llm-d-router.
pub fn slo_ttft(request: &InferenceRequest) -> Option<Duration> {
    let value = request.header(SLO_TTFT_HEADER).or_else(|| request.header(OLD_SLO_TTFT_HEADER))?;
    let millis: i64 = value.trim().parse().ok()?;
    let millis = u64::try_from(millis).ok()?;
    (millis <= i64::MAX as u64 / 1_000_000).then(|| Duration::from_millis(millis))
}

/// What one dispatch pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Requests admitted.
    pub admitted: u64,
    /// Requests expired.
    pub expired: u64,
}

struct Shared {
    state: Mutex<QueueState>,
    config: FlowControlConfig,
    detector: Arc<dyn SaturationDetector>,
    metrics: Arc<FlowMetrics>,
    /// Requests in flight that may be evicted; `Some` when `enableEviction` is set.
    in_flight: Option<InFlightRequests>,
}

/// Priority-band queues with fair dispatch. Cheap to clone: clones share the queues.
#[derive(Clone)]
pub struct FlowController {
    shared: Arc<Shared>,
}

impl fmt::Debug for FlowController {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowController")
            .field("config", &self.shared.config)
            .field("detector", &self.shared.detector)
            .finish_non_exhaustive()
    }
}

/// Removes a queued request when its ticket is dropped.
pub(crate) struct Cancel {
    shared: Arc<Shared>,
    slot: SlotKey,
}

impl fmt::Debug for Cancel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cancel").field("slot", &self.slot).finish()
    }
}

impl Cancel {
    pub(crate) fn run(self) {
        let mut capacity_wakers = Vec::new();
        let removed = {
            let mut state = self.shared.state.lock();
            let removed = state.remove(self.slot);
            take_capacity_waiters(&self.shared.config, &mut state, &mut capacity_wakers);
            removed
        };
        wake_all(capacity_wakers);
        // A miss means the request already left (dispatched or expired) and has its outcome.
        if let Some(entry) = removed {
            let waker =
                entry.cell.resolve(Err(NotAdmitted::Cancelled { priority: entry.priority }));
            self.shared.metrics.record_outcome(OutcomeReason::Cancelled);
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

impl FlowController {
    /// A controller with `config`, asking `detector` for room and counting into `metrics`.
    pub fn new(
        config: FlowControlConfig,
        detector: Arc<dyn SaturationDetector>,
        metrics: Arc<FlowMetrics>,
    ) -> Self {
        let mut state = QueueState::default();
        for band in &config.bands {
            let band = band.clone();
            state.band_index(band.priority, || band.clone());
        }
        let in_flight = config.enable_eviction.then(|| InFlightRequests::new(Arc::clone(&metrics)));
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                config,
                detector,
                metrics,
                in_flight,
            }),
        }
    }

    /// The requests in flight eviction may end, when `enableEviction` is set: adapters track
    /// every routed request here and end it when it is evicted.
    pub fn in_flight(&self) -> Option<&InFlightRequests> {
        self.shared.in_flight.as_ref()
    }

    /// Whether band `band_index` of `priority` may not dispatch now: the detector reports no
    /// room, or the usage limit policy's ceiling for the band is reached. The band's rank among
    /// the known bands (highest first) matters to policies that gate by rank.
    fn blocked(
        &self,
        state: &QueueState,
        band_index: usize,
        priority: i32,
        pool: &PoolSnapshot,
        now: Instant,
    ) -> bool {
        let detector = &self.shared.detector;
        let limit = &self.shared.config.usage_limit;
        if detector.is_saturated(pool, now) {
            return true;
        }
        // The level is only read when the policy gates below full saturation: the default
        // policy then costs nothing beyond the saturated check.
        if !limit.gates_below_saturation() {
            return false;
        }
        let priority_of = |index: Option<&usize>| {
            index
                .and_then(|&index| state.bands.get(index))
                .map_or(priority, |band| band.config.priority)
        };
        let place = BandPlace {
            priority,
            rank: state.order.iter().position(|&index| index == band_index).unwrap_or(0),
            bands: state.order.len(),
            highest_priority: priority_of(state.order.first()),
            lowest_priority: priority_of(state.order.last()),
        };
        limit.blocks(place, detector.saturation(pool, now))
    }

    /// The configuration in use.
    pub fn config(&self) -> &FlowControlConfig {
        &self.shared.config
    }

    /// The saturation detector in use.
    pub fn detector(&self) -> &Arc<dyn SaturationDetector> {
        &self.shared.detector
    }

    /// The metrics counters.
    pub fn metrics(&self) -> &Arc<FlowMetrics> {
        &self.shared.metrics
    }

    /// Submits a request; returns its ticket, which may already hold the outcome (admitted at
    /// once, or rejected for capacity). Runs a dispatch pass at `now`.
    pub fn enqueue(&self, request: FlowRequest<'_>, pool: &PoolSnapshot, now: Instant) -> Ticket {
        let shared = &self.shared;
        let mut wakers = Vec::new();
        let mut state = shared.state.lock();
        let band_index =
            state.band_index(request.priority, || shared.config.band_for(request.priority));
        // Expire first so requests past their TTL do not hold places a newcomer could take.
        let mut report = PassReport::default();
        self.expire(&mut state, pool, now, &mut wakers, &mut report);
        // Fast path: nothing queued that would go first and room now, so queueing then
        // dispatching would admit this very request. It never occupies the queue, so it skips
        // the caps as well as the queue structures.
        if !state.has_queued_at_or_above(request.priority)
            && !self.blocked(&state, band_index, request.priority, pool, now)
        {
            shared.detector.on_admit();
            let dispatch_seq = state.next_dispatch_seq();
            // Lower bands may be waiting for a pass that saturation allows.
            self.dispatch(&mut state, pool, now, &mut wakers, &mut report);
            take_capacity_waiters(&shared.config, &mut state, &mut wakers);
            drop(state);
            wake_all(wakers);
            shared.metrics.record_wait(Duration::ZERO);
            shared.metrics.record_outcome(OutcomeReason::Admitted);
            return Ticket::resolved(Ok(Admitted { waited: Duration::ZERO, dispatch_seq }));
        }
        if let Some(limit) = self.exceeded_cap(&state, band_index, request.size_bytes) {
            take_capacity_waiters(&shared.config, &mut state, &mut wakers);
            drop(state);
            wake_all(wakers);
            shared.metrics.record_outcome(OutcomeReason::RejectedCapacity);
            return Ticket::resolved(Err(NotAdmitted::QueueFull {
                priority: request.priority,
                limit,
            }));
        }
        let ttl = request
            .ttl
            .or_else(|| {
                state.bands.get(band_index).and_then(|band| band.config.default_request_ttl)
            })
            .unwrap_or(shared.config.default_request_ttl);
        // With a no-endpoint budget, the heap holds the longest wait either regime allows (none
        // when either has no TTL); the regime budgets are checked on each pass.
        let bound = match shared.config.no_endpoint_request_ttl {
            None => ttl,
            Some(no_endpoint) if ttl.is_zero() || no_endpoint.is_zero() => Duration::ZERO,
            Some(no_endpoint) => ttl.max(no_endpoint),
        };
        let cell = Arc::new(TicketCell::default());
        let slot = state.push_with_bound(
            band_index,
            request.flow_id,
            request.size_bytes,
            ttl_option(ttl),
            ttl_option(bound),
            request.slo_ttft,
            now,
            Arc::clone(&cell),
        );
        let Some(slot) = slot else {
            take_capacity_waiters(&shared.config, &mut state, &mut wakers);
            drop(state);
            wake_all(wakers);
            shared.metrics.record_outcome(OutcomeReason::RejectedCapacity);
            let limit = CapacityLimit::TotalRequests(u64::from(u32::MAX));
            return Ticket::resolved(Err(NotAdmitted::QueueFull {
                priority: request.priority,
                limit,
            }));
        };
        self.dispatch(&mut state, pool, now, &mut wakers, &mut report);
        take_capacity_waiters(&shared.config, &mut state, &mut wakers);
        drop(state);
        wake_all(wakers);
        Ticket::queued(cell, Cancel { shared: Arc::clone(shared), slot })
    }

    /// Submits `request` (its priority and fairness id) of `size_bytes`.
    pub fn enqueue_request(
        &self,
        request: &InferenceRequest,
        size_bytes: u64,
        pool: &PoolSnapshot,
        now: Instant,
    ) -> Ticket {
        self.enqueue(FlowRequest::from_inference_request(request, size_bytes), pool, now)
    }

    /// Expires requests past their TTL and dispatches while the pool has room. Call it
    /// periodically (saturation can lift without any request finishing, when metrics refresh).
    pub fn tick(&self, pool: &PoolSnapshot, now: Instant) -> PassReport {
        let mut wakers = Vec::new();
        let mut report = PassReport::default();
        let mut state = self.shared.state.lock();
        self.expire(&mut state, pool, now, &mut wakers, &mut report);
        self.dispatch(&mut state, pool, now, &mut wakers, &mut report);
        take_capacity_waiters(&self.shared.config, &mut state, &mut wakers);
        drop(state);
        wake_all(wakers);
        report
    }

    /// Call when an admitted request finishes: capacity may have freed, so this runs a pass.
    pub fn release(&self, pool: &PoolSnapshot, now: Instant) -> PassReport {
        self.tick(pool, now)
    }

    /// Ready while the queues can take one more request under the global request cap
    /// (`maxRequests`; always ready without one). Otherwise registers the task, which is woken
    /// when a queued request leaves (dispatched, expired or cancelled), and returns `Pending`.
    ///
    /// This is backpressure for callers that can wait before accepting work (tower's
    /// `poll_ready`). It reserves nothing: a request submitted after `Ready` may still be
    /// rejected by a band cap, a byte cap, or a concurrent submitter taking the last place.
    pub fn poll_capacity(&self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(cap) = self.shared.config.max_requests else {
            return Poll::Ready(());
        };
        let mut state = self.shared.state.lock();
        if state.queued < cap {
            return Poll::Ready(());
        }
        // One entry per task: a task polling again must not grow the list.
        if !state.capacity_waiters.iter().any(|waiter| waiter.will_wake(cx.waker())) {
            state.capacity_waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Queued requests and bytes per band, highest priority first.
    pub fn band_stats(&self) -> Vec<BandStats> {
        let state = self.shared.state.lock();
        state
            .order
            .iter()
            .filter_map(|&index| state.bands.get(index))
            .map(|band| band.stats())
            .collect()
    }

    /// Requests queued across bands.
    pub fn queued_requests(&self) -> u64 {
        self.shared.state.lock().queued
    }

    /// Bytes queued across bands.
    pub fn queued_bytes(&self) -> u64 {
        self.shared.state.lock().bytes
    }

    fn exceeded_cap(
        &self,
        state: &QueueState,
        band_index: usize,
        bytes: u64,
    ) -> Option<CapacityLimit> {
        let config = &self.shared.config;
        let band = state.bands.get(band_index)?;
        let over = |cap: Option<u64>, current: u64, adding: u64| {
            cap.filter(|cap| current.saturating_add(adding) > *cap)
        };
        over(band.config.max_requests, band.queued, 1)
            .map(CapacityLimit::BandRequests)
            .or_else(|| {
                over(band.config.max_bytes, band.bytes, bytes).map(CapacityLimit::BandBytes)
            })
            .or_else(|| {
                over(config.max_requests, state.queued, 1).map(CapacityLimit::TotalRequests)
            })
            .or_else(|| over(config.max_bytes, state.bytes, bytes).map(CapacityLimit::TotalBytes))
    }

    fn expire(
        &self,
        state: &mut QueueState,
        pool: &PoolSnapshot,
        now: Instant,
        wakers: &mut Vec<Waker>,
        report: &mut PassReport,
    ) {
        let mut expired: Vec<Entry> = Vec::new();
        state.pop_expired(now, &mut expired);
        // With the regimes split, a request that runs out of time while the pool is empty is
        // reported as unavailability (503), not backpressure.
        let mut unavailable = false;
        if let Some(no_endpoint) = self.shared.config.no_endpoint_request_ttl {
            unavailable = pool.endpoints().is_empty();
            expire_by_regime(state, unavailable, no_endpoint, now, &mut expired);
        }
        for entry in expired {
            let waited = now.saturating_duration_since(entry.enqueued_at);
            let priority = entry.priority;
            let outcome = Err(if unavailable {
                NotAdmitted::NoEndpoints { priority, waited }
            } else {
                NotAdmitted::Expired { priority, waited }
            });
            self.finish(entry, outcome, wakers);
            report.expired += 1;
        }
    }

    fn dispatch(
        &self,
        state: &mut QueueState,
        pool: &PoolSnapshot,
        now: Instant,
        wakers: &mut Vec<Waker>,
        report: &mut PassReport,
    ) {
        let detector = &self.shared.detector;
        while let Some(band_index) = state.top_band() {
            let priority = state.bands.get(band_index).map_or(0, |band| band.config.priority);
            if self.blocked(state, band_index, priority, pool, now) {
                // Strict priority: lower bands do not go ahead of a blocked higher one. Room
                // for it may be made by ending a sheddable request in flight.
                if let Some(in_flight) = &self.shared.in_flight {
                    in_flight.evict_for(priority);
                }
                break;
            }
            let Some(entry) = state.pop_band(band_index, now) else {
                break;
            };
            detector.on_admit();
            let waited = now.saturating_duration_since(entry.enqueued_at);
            let dispatch_seq = state.next_dispatch_seq();
            self.shared.metrics.record_wait(waited);
            self.finish(entry, Ok(Admitted { waited, dispatch_seq }), wakers);
            report.admitted += 1;
        }
    }

    fn finish(&self, entry: Entry, outcome: FlowOutcome, wakers: &mut Vec<Waker>) {
        let reason = match &outcome {
            Ok(_) => OutcomeReason::Admitted,
            Err(rejection) => rejection.reason(),
        };
        self.shared.metrics.record_outcome(reason);
        if let Some(waker) = entry.cell.resolve(outcome) {
            wakers.push(waker);
        }
    }
}

/// Records the pool's regime at `now` and moves into `expired` every queued request that has
/// spent its budget for the current regime: `no_endpoint` while the pool is `empty`, its own
/// TTL otherwise, counted from the later of its arrival and the regime's start. Zero budgets
/// never expire.
fn expire_by_regime(
    state: &mut QueueState,
    empty: bool,
    no_endpoint: Duration,
    now: Instant,
    expired: &mut Vec<Entry>,
) {
    let regime = match state.regime {
        Some(regime) if regime.empty == empty => regime,
        _ => Regime { empty, since: now },
    };
    state.regime = Some(regime);
    let spent: Vec<SlotKey> = state
        .queued_entries()
        .filter(|(_, entry)| {
            let budget = if empty { Some(no_endpoint) } else { entry.ttl };
            let Some(budget) = budget.filter(|budget| !budget.is_zero()) else {
                return false;
            };
            let start = entry.enqueued_at.max(regime.since);
            now.saturating_duration_since(start) >= budget
        })
        .map(|(slot, _)| slot)
        .collect();
    for slot in spent {
        if let Some(entry) = state.remove(slot) {
            expired.push(entry);
        }
    }
}

fn ttl_option(ttl: Duration) -> Option<Duration> {
    (!ttl.is_zero()).then_some(ttl)
}

/// Moves the tasks waiting for queue room into `wakers` when there is room.
fn take_capacity_waiters(
    config: &FlowControlConfig,
    state: &mut QueueState,
    wakers: &mut Vec<Waker>,
) {
    let has_room = config.max_requests.is_none_or(|cap| state.queued < cap);
    if has_room && !state.capacity_waiters.is_empty() {
        wakers.append(&mut state.capacity_waiters);
    }
}

fn wake_all(wakers: Vec<Waker>) {
    for waker in wakers {
        waker.wake();
    }
}
