//! Flow controller behaviour with an injected clock: ordering, fairness, caps, TTL,
//! cancellation, and awaiting tickets without an async runtime.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use scheduler_core::PoolSnapshot;
use scheduler_core::flow::{
    BandConfig, CapacityLimit, FairnessPolicy, FlowControlConfig, FlowController, FlowMetrics,
    FlowOutcome, FlowRequest, NotAdmitted, OrderingPolicy, OutcomeReason, PermitDetector, Ticket,
};

struct Harness {
    controller: FlowController,
    permits: Arc<PermitDetector>,
    pool: PoolSnapshot,
    start: Instant,
}

impl Harness {
    fn new(config: FlowControlConfig) -> Self {
        let permits = Arc::new(PermitDetector::new(0));
        let controller = FlowController::new(config, permits.clone(), Arc::new(FlowMetrics::new()));
        Self { controller, permits, pool: PoolSnapshot::default(), start: Instant::now() }
    }

    fn at(&self, millis: u64) -> Instant {
        self.start + Duration::from_millis(millis)
    }

    fn enqueue(&self, priority: i32, flow: &str, millis: u64) -> Ticket {
        let request =
            FlowRequest { priority, flow_id: flow, size_bytes: 100, ttl: None, slo_ttft: None };
        self.controller.enqueue(request, &self.pool, self.at(millis))
    }

    /// Frees `count` slots and lets the controller dispatch at `millis`.
    fn free(&self, count: i64, millis: u64) {
        self.permits.adjust(count);
        self.controller.release(&self.pool, self.at(millis));
    }
}

fn band(priority: i32, fairness: FairnessPolicy) -> BandConfig {
    BandConfig { priority, fairness, ..BandConfig::default() }
}

fn seq(ticket: &Ticket) -> u64 {
    match ticket.try_outcome() {
        Some(Ok(admitted)) => admitted.dispatch_seq,
        other => panic!("expected an admission, got {other:?}"),
    }
}

#[test]
fn higher_bands_go_first_then_fcfs() {
    let harness = Harness::new(FlowControlConfig::default());
    let low = harness.enqueue(-1, "a", 0);
    let mid_first = harness.enqueue(0, "a", 1);
    let high = harness.enqueue(5, "b", 2);
    let mid_second = harness.enqueue(0, "b", 3);
    assert!(low.try_outcome().is_none());
    harness.free(4, 10);
    assert_eq!(
        [seq(&high), seq(&mid_first), seq(&mid_second), seq(&low)],
        [1, 2, 3, 4],
        "strict priority across bands, global-strict FCFS within"
    );
    match high.try_outcome() {
        Some(Ok(admitted)) => assert_eq!(admitted.waited, Duration::from_millis(8)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn round_robin_alternates_flows() {
    let config = FlowControlConfig {
        default_band: band(0, FairnessPolicy::RoundRobin),
        ..FlowControlConfig::default()
    };
    let harness = Harness::new(config);
    let heavy: Vec<Ticket> = (0..4).map(|i| harness.enqueue(0, "heavy", i)).collect();
    let light: Vec<Ticket> = (0..2).map(|i| harness.enqueue(0, "light", 10 + i)).collect();
    harness.free(6, 20);
    let heavy_seqs: Vec<u64> = heavy.iter().map(seq).collect();
    let light_seqs: Vec<u64> = light.iter().map(seq).collect();
    assert_eq!(heavy_seqs, [1, 3, 5, 6]);
    assert_eq!(light_seqs, [2, 4]);
}

#[test]
fn edf_orders_a_flow_by_deadline() {
    let config = FlowControlConfig {
        default_band: BandConfig { ordering: OrderingPolicy::Edf, ..BandConfig::default() },
        ..FlowControlConfig::default()
    };
    let harness = Harness::new(config);
    let request = |ttl_ms| FlowRequest {
        priority: 0,
        flow_id: "a",
        size_bytes: 1,
        ttl: Some(Duration::from_millis(ttl_ms)),
        slo_ttft: None,
    };
    let late = harness.controller.enqueue(request(500), &harness.pool, harness.at(0));
    let soon = harness.controller.enqueue(request(100), &harness.pool, harness.at(1));
    let never = harness.controller.enqueue(
        FlowRequest { ttl: Some(Duration::ZERO), ..request(0) },
        &harness.pool,
        harness.at(2),
    );
    harness.free(3, 5);
    assert_eq!([seq(&soon), seq(&late), seq(&never)], [1, 2, 3]);
}

#[test]
fn slo_deadline_orders_by_arrival_plus_ttft_objective() {
    let config = FlowControlConfig {
        default_band: BandConfig { ordering: OrderingPolicy::SloDeadline, ..BandConfig::default() },
        ..FlowControlConfig::default()
    };
    let harness = Harness::new(config);
    let submit = |slo_ms: Option<u64>, ttl_ms: u64, at: u64| {
        let request = FlowRequest {
            priority: 0,
            flow_id: "a",
            size_bytes: 1,
            // The TTL plays no part in this order (it does under EDF).
            ttl: Some(Duration::from_millis(ttl_ms)),
            slo_ttft: slo_ms.map(Duration::from_millis),
        };
        harness.controller.enqueue(request, &harness.pool, harness.at(at))
    };
    let unbound = submit(None, 10_000, 0);
    let loose = submit(Some(500), 1_000, 1); // deadline 501
    let tight = submit(Some(100), 10_000, 2); // deadline 102
    let late_tight = submit(Some(99), 10_000, 3); // deadline 102, arrived later
    let unbound_later = submit(None, 20, 4);
    harness.free(5, 10);
    assert_eq!(
        [seq(&tight), seq(&late_tight), seq(&loose), seq(&unbound), seq(&unbound_later)],
        [1, 2, 3, 4, 5],
        "earliest deadline first, FCFS among equals, no objective last"
    );
}

#[test]
fn the_slo_ttft_header_is_read_as_go_reads_it() {
    use scheduler_core::InferenceRequest;
    use scheduler_core::flow::slo_ttft;
    let with = |headers: &[(&str, &str)]| {
        let mut request = InferenceRequest::new("m", "p");
        for (name, value) in headers {
            request.headers.insert((*name).to_owned(), (*value).to_owned());
        }
        slo_ttft(&request)
    };
    assert_eq!(with(&[("x-llm-d-slo-ttft-ms", "250")]), Some(Duration::from_millis(250)));
    assert_eq!(with(&[("x-llm-d-slo-ttft-ms", " 7 ")]), Some(Duration::from_millis(7)));
    assert_eq!(with(&[("x-slo-ttft-ms", "40")]), Some(Duration::from_millis(40)), "older name");
    assert_eq!(
        with(&[("x-llm-d-slo-ttft-ms", "10"), ("x-slo-ttft-ms", "40")]),
        Some(Duration::from_millis(10)),
        "the current name wins"
    );
    assert_eq!(
        with(&[("x-llm-d-slo-ttft-ms", ""), ("x-slo-ttft-ms", "40")]),
        None,
        "an empty current header is invalid, not a fallback"
    );
    assert_eq!(with(&[("x-llm-d-slo-ttft-ms", "0")]), Some(Duration::ZERO));
    for invalid in ["-1", "1.5", "soon", "9223372036855"] {
        assert_eq!(with(&[("x-llm-d-slo-ttft-ms", invalid)]), None, "{invalid}");
    }
    assert_eq!(
        with(&[("x-llm-d-slo-ttft-ms", "9223372036854")]),
        Some(Duration::from_millis(9_223_372_036_854)),
        "the largest value Go's nanosecond durations hold"
    );
    assert_eq!(with(&[]), None);
}

#[test]
fn ttl_expires_exactly_at_the_deadline() {
    let config = FlowControlConfig {
        default_request_ttl: Duration::from_millis(100),
        ..FlowControlConfig::default()
    };
    let harness = Harness::new(config);
    let ticket = harness.enqueue(0, "a", 0);
    let report = harness.controller.tick(&harness.pool, harness.at(99));
    assert_eq!(report.expired, 0);
    assert!(ticket.try_outcome().is_none());
    let report = harness.controller.tick(&harness.pool, harness.at(100));
    assert_eq!(report.expired, 1);
    assert_eq!(
        ticket.try_outcome(),
        Some(Err(NotAdmitted::Expired { priority: 0, waited: Duration::from_millis(100) }))
    );
    assert_eq!(harness.controller.queued_requests(), 0);
    assert_eq!(harness.controller.metrics().outcome(OutcomeReason::Expired), 1);
    harness.free(1, 200);
    assert_eq!(harness.permits.available(), 1, "an expired request is never admitted");
}

#[test]
fn per_request_and_band_ttls_override_the_default() {
    let config = FlowControlConfig {
        default_request_ttl: Duration::from_secs(60),
        bands: vec![BandConfig {
            priority: 1,
            default_request_ttl: Some(Duration::from_millis(50)),
            ..BandConfig::default()
        }],
        ..FlowControlConfig::default()
    };
    let harness = Harness::new(config);
    let banded = harness.enqueue(1, "a", 0);
    let plain = harness.enqueue(0, "a", 0);
    let own = harness.controller.enqueue(
        FlowRequest {
            priority: 0,
            flow_id: "a",
            size_bytes: 1,
            ttl: Some(Duration::from_millis(10)),
            slo_ttft: None,
        },
        &harness.pool,
        harness.at(0),
    );
    harness.controller.tick(&harness.pool, harness.at(20));
    assert!(matches!(own.try_outcome(), Some(Err(NotAdmitted::Expired { .. }))));
    assert!(banded.try_outcome().is_none());
    harness.controller.tick(&harness.pool, harness.at(50));
    assert!(matches!(banded.try_outcome(), Some(Err(NotAdmitted::Expired { .. }))));
    assert!(plain.try_outcome().is_none());
}

#[test]
fn zero_ttl_means_no_expiry() {
    let config =
        FlowControlConfig { default_request_ttl: Duration::ZERO, ..FlowControlConfig::default() };
    let harness = Harness::new(config);
    let ticket = harness.enqueue(0, "a", 0);
    harness.controller.tick(&harness.pool, harness.at(10_000_000));
    assert!(ticket.try_outcome().is_none());
}

#[test]
fn dropping_a_ticket_cancels_and_frees_its_place() {
    let config = FlowControlConfig { max_requests: Some(1), ..FlowControlConfig::default() };
    let harness = Harness::new(config);
    let first = harness.enqueue(0, "a", 0);
    let refused = harness.enqueue(0, "a", 1);
    assert_eq!(
        refused.try_outcome(),
        Some(Err(NotAdmitted::QueueFull { priority: 0, limit: CapacityLimit::TotalRequests(1) }))
    );
    drop(first);
    assert_eq!(harness.controller.queued_requests(), 0);
    assert_eq!(harness.controller.metrics().outcome(OutcomeReason::Cancelled), 1);
    let second = harness.enqueue(0, "a", 2);
    assert!(second.try_outcome().is_none(), "the freed place is taken");
    assert_eq!(second.cancel(), Err(NotAdmitted::Cancelled { priority: 0 }));
    harness.free(1, 3);
    assert_eq!(harness.permits.available(), 1, "cancelled requests are never admitted");
}

#[test]
fn cancelling_after_admission_keeps_the_admission() {
    let harness = Harness::new(FlowControlConfig::default());
    let ticket = harness.enqueue(0, "a", 0);
    harness.free(1, 1);
    assert!(ticket.cancel().is_ok());
    assert_eq!(harness.controller.metrics().outcome(OutcomeReason::Cancelled), 0);
}

#[test]
fn band_and_byte_caps_reject_with_the_limit_named() {
    let config = FlowControlConfig {
        max_bytes: Some(350),
        bands: vec![BandConfig { priority: 0, max_requests: Some(2), ..BandConfig::default() }],
        default_band: BandConfig { max_bytes: Some(150), ..BandConfig::default() },
        ..FlowControlConfig::default()
    };
    let harness = Harness::new(config);
    let _a = harness.enqueue(0, "a", 0);
    let _b = harness.enqueue(0, "a", 0);
    let over_band = harness.enqueue(0, "a", 0);
    assert_eq!(
        over_band.try_outcome(),
        Some(Err(NotAdmitted::QueueFull { priority: 0, limit: CapacityLimit::BandRequests(2) }))
    );
    let _c = harness.enqueue(1, "a", 0);
    let over_band_bytes = harness.enqueue(1, "a", 0);
    assert_eq!(
        over_band_bytes.try_outcome(),
        Some(Err(NotAdmitted::QueueFull { priority: 1, limit: CapacityLimit::BandBytes(150) }))
    );
    let over_total = harness.enqueue(2, "a", 0);
    assert_eq!(
        over_total.try_outcome(),
        Some(Err(NotAdmitted::QueueFull { priority: 2, limit: CapacityLimit::TotalBytes(350) }))
    );
    let stats = harness.controller.band_stats();
    let queued: Vec<(i32, u64, u64)> =
        stats.iter().map(|band| (band.priority, band.queued_requests, band.queued_bytes)).collect();
    assert_eq!(queued, [(2, 0, 0), (1, 1, 100), (0, 2, 200)]);
    assert_eq!(harness.controller.metrics().outcome(OutcomeReason::RejectedCapacity), 3);
}

#[test]
fn admitted_on_arrival_when_there_is_room() {
    let harness = Harness::new(FlowControlConfig::default());
    harness.permits.adjust(1);
    let ticket = harness.enqueue(-3, "a", 0);
    assert_eq!(seq(&ticket), 1);
    assert_eq!(harness.permits.available(), 0, "the admission took the permit");
}

/// Counts wake-ups; the executor parks on nothing and just re-polls when woken.
struct CountingWaker(AtomicUsize);

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Polls `future` once with `waker`.
fn poll_once<F: Future>(future: std::pin::Pin<&mut F>, waker: &Waker) -> Poll<F::Output> {
    future.poll(&mut Context::from_waker(waker))
}

#[test]
fn awaiting_a_ticket_wakes_on_dispatch() {
    let harness = Harness::new(FlowControlConfig::default());
    let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
    let waker = Waker::from(counter.clone());
    let mut ticket = pin!(harness.enqueue(0, "a", 0));
    assert!(poll_once(ticket.as_mut(), &waker).is_pending());
    assert!(poll_once(ticket.as_mut(), &waker).is_pending(), "re-polling is fine");
    assert_eq!(counter.0.load(Ordering::SeqCst), 0);
    harness.free(1, 7);
    assert_eq!(counter.0.load(Ordering::SeqCst), 1, "woken exactly once");
    let outcome: FlowOutcome = match poll_once(ticket.as_mut(), &waker) {
        Poll::Ready(outcome) => outcome,
        Poll::Pending => panic!("woken but not ready"),
    };
    assert_eq!(outcome.map(|admitted| admitted.waited), Ok(Duration::from_millis(7)));
}

#[test]
fn awaiting_a_ticket_from_another_thread() {
    /// Unparks the blocked executor thread.
    struct ThreadWaker(std::thread::Thread);
    impl Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    /// The smallest blocking executor: poll, park until woken, repeat.
    fn block_on<F: Future>(future: F) -> F::Output {
        let mut future = pin!(future);
        let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
        loop {
            if let Poll::Ready(output) = poll_once(future.as_mut(), &waker) {
                return output;
            }
            std::thread::park();
        }
    }

    let harness = Arc::new(Harness::new(FlowControlConfig::default()));
    let ticket = harness.enqueue(2, "a", 0);
    let releaser = {
        let harness = Arc::clone(&harness);
        std::thread::spawn(move || harness.free(1, 3))
    };
    let outcome = block_on(ticket);
    assert!(releaser.join().is_ok());
    assert_eq!(outcome.map(|admitted| admitted.dispatch_seq), Ok(1));
}

#[test]
fn tickets_and_controllers_cross_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Ticket>();
    assert_send_sync::<FlowController>();
}

#[test]
fn release_on_complete_dispatches_with_the_injected_clock() {
    use scheduler_core::flow::ReleaseOnComplete;
    use scheduler_core::{CompletedRequest, EndpointId, Outcome, ResponseComplete, SharedPool};

    let harness = Harness::new(FlowControlConfig::default());
    let ticket = harness.enqueue(0, "a", 0);
    let clock_at = harness.at(42);
    let hook = ReleaseOnComplete::new(
        harness.controller.clone(),
        Arc::new(SharedPool::default()),
        Arc::new(move || clock_at),
    );
    harness.permits.adjust(1);
    hook.response_complete(&CompletedRequest {
        request_id: "r".into(),
        target_model: "m".into(),
        scheduled_endpoint: EndpointId(1),
        served_endpoint: None,
        prompt_tokens: None,
        completion_tokens: None,
        outcome: Outcome::Completed,
        fairness_id: None,
        decision_id: 0,
    });
    assert_eq!(
        ticket.try_outcome().map(|outcome| outcome.map(|a| a.waited)),
        Some(Ok(Duration::from_millis(42)))
    );
}

#[test]
fn concurrent_submitters_cancellers_and_releasers_keep_one_outcome_each() {
    const THREADS: usize = 4;
    const PER_THREAD: usize = 400;
    let config = FlowControlConfig {
        max_requests: Some(64),
        default_band: band(0, FairnessPolicy::RoundRobin),
        ..FlowControlConfig::default()
    };
    let harness = Arc::new(Harness::new(config));
    let submitters: Vec<_> = (0..THREADS)
        .map(|thread| {
            let harness = Arc::clone(&harness);
            std::thread::spawn(move || {
                let flows = ["a", "b", "c"];
                let mut kept = Vec::new();
                for index in 0..PER_THREAD {
                    let priority = (index % 3) as i32 - 1;
                    let ticket = harness.enqueue(priority, flows[(index + thread) % 3], 1);
                    if index % 4 == 0 {
                        drop(ticket);
                    } else {
                        kept.push(ticket);
                    }
                    if index % 2 == 0 {
                        harness.free(1, 2);
                    }
                }
                kept
            })
        })
        .collect();
    let mut kept = Vec::new();
    for submitter in submitters {
        kept.extend(submitter.join().unwrap_or_default());
    }
    harness.free(1_000_000, 3);
    assert!(kept.iter().all(Ticket::is_resolved), "every kept ticket has an outcome");
    let metrics = harness.controller.metrics().snapshot();
    let total: u64 = metrics.outcomes.iter().sum();
    assert_eq!(total, (THREADS * PER_THREAD) as u64, "one outcome per request, none twice");
    let admitted = metrics.outcome(OutcomeReason::Admitted);
    let granted = (THREADS * PER_THREAD / 2) as i64 + 1_000_000;
    assert_eq!(granted - harness.permits.available(), admitted as i64);
    assert_eq!(harness.controller.queued_requests(), 0);
}

#[test]
fn a_request_admitted_on_arrival_ignores_full_queues() {
    let config = FlowControlConfig { max_requests: Some(1), ..FlowControlConfig::default() };
    let harness = Harness::new(config);
    let _queued = harness.enqueue(0, "a", 0);
    // Room appears but no pass has run yet: the higher-priority newcomer goes straight out.
    harness.permits.adjust(1);
    let urgent = harness.enqueue(1, "b", 1);
    assert_eq!(seq(&urgent), 1);
    assert_eq!(harness.controller.queued_requests(), 1);
}

#[test]
fn capacity_is_pending_while_the_queue_is_full_and_wakes_when_a_place_frees() {
    let config = FlowControlConfig {
        max_requests: Some(2),
        default_request_ttl: Duration::from_millis(100),
        ..FlowControlConfig::default()
    };
    let harness = Harness::new(config);
    let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
    let waker = Waker::from(counter.clone());
    let mut cx = Context::from_waker(&waker);
    let woken = || counter.0.load(Ordering::SeqCst);

    let first = harness.enqueue(0, "a", 0);
    assert!(harness.controller.poll_capacity(&mut cx).is_ready(), "one place left");
    let second = harness.enqueue(0, "a", 50);
    assert!(harness.controller.poll_capacity(&mut cx).is_pending());
    assert!(harness.controller.poll_capacity(&mut cx).is_pending(), "re-polling registers once");

    // Leaving by cancellation wakes the waiter once.
    drop(first);
    assert_eq!(woken(), 1);
    assert!(harness.controller.poll_capacity(&mut cx).is_ready());

    // By dispatch.
    let third = harness.enqueue(0, "a", 60);
    assert!(harness.controller.poll_capacity(&mut cx).is_pending());
    harness.free(1, 70);
    assert!(matches!(second.try_outcome(), Some(Ok(_))));
    assert_eq!(woken(), 2);

    // By expiry, found on a tick.
    let fourth = harness.enqueue(0, "a", 80);
    assert!(harness.controller.poll_capacity(&mut cx).is_pending());
    harness.controller.tick(&harness.pool, harness.at(160));
    assert!(matches!(third.try_outcome(), Some(Err(NotAdmitted::Expired { .. }))));
    assert_eq!(woken(), 3);
    assert!(harness.controller.poll_capacity(&mut cx).is_ready());
    drop(fourth);
}

#[test]
fn capacity_is_always_ready_without_a_global_request_cap() {
    let harness = Harness::new(FlowControlConfig::default());
    let _queued: Vec<Ticket> = (0..100).map(|i| harness.enqueue(0, "a", i)).collect();
    let waker = Waker::noop();
    assert!(harness.controller.poll_capacity(&mut Context::from_waker(waker)).is_ready());
}
