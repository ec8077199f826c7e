//! The staleness policy on the routing path: fresh endpoints are preferred, an all-stale pool
//! routes to the least-loaded endpoints (fail open) or is refused (fail closed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use scheduler_core::{
    ALL_STALE_MAX_PICKS, AllStale, Candidates, CycleState, Endpoint, EndpointMetrics,
    EndpointState, InferenceRequest, Picker, PoolSnapshot, ScheduleOptions, Scheduler,
    SchedulerProfile, SchedulingError, SingleProfileHandler, StalenessPolicy,
};

/// Picks the first candidate: which endpoints reach the picker is what is under test.
#[derive(Debug)]
struct First;

impl Picker for First {
    fn pick(&self, _: &mut CycleState, _: Candidates<'_>, _: &[f64], picked: &mut Vec<u32>) {
        picked.push(0);
    }
}

fn scheduler() -> Scheduler {
    let profile = SchedulerProfile::new("default", "first", Arc::new(First));
    Scheduler::new(vec![profile], Arc::new(SingleProfileHandler)).with_seed(7)
}

fn endpoint(port: u16, waiting: u32, running: u32, updated_at: Instant) -> EndpointState {
    EndpointState::new(Endpoint::new(([10, 0, 0, 1], port).into())).with_metrics(EndpointMetrics {
        waiting_queue: waiting,
        running,
        updated_at: Some(updated_at),
        ..Default::default()
    })
}

fn ports(scheduler: &Scheduler, pool: &Arc<PoolSnapshot>, now: Instant) -> Vec<u16> {
    let options = ScheduleOptions { now: Some(now), seed: Some(1), explain: false };
    let request = InferenceRequest::new("m", "hello");
    let result = scheduler.schedule_with(&request, pool, options).unwrap();
    result.ranked().map(|state| state.endpoint.address.port()).collect()
}

#[test]
fn fresh_then_some_stale_then_all_stale() {
    let scheduler = scheduler();
    let start = Instant::now();
    let policy = StalenessPolicy::new(Duration::from_secs(2));
    let later = start + Duration::from_secs(10);
    // Port 1 scraped long ago (and idle), the others just now.
    let pool = Arc::new(
        PoolSnapshot::new([
            endpoint(1, 0, 0, start),
            endpoint(2, 4, 4, later),
            endpoint(3, 1, 1, later),
        ])
        .with_staleness(Some(policy)),
    );
    assert_eq!(ports(&scheduler, &pool, start), vec![1], "all fresh: the first endpoint");
    assert_eq!(ports(&scheduler, &pool, later), vec![2], "some stale: the stale one is skipped");

    // All stale, failing open: least loaded by queue + running first, every candidate ranked
    // up to the cap.
    let much_later = later + Duration::from_secs(10);
    assert_eq!(ports(&scheduler, &pool, much_later), vec![1, 3, 2]);

    // All stale, failing closed: refused with the reason.
    let closed = Arc::new(
        PoolSnapshot::clone(&pool)
            .with_staleness(Some(policy.when_all_stale(AllStale::FailClosed))),
    );
    let request = InferenceRequest::new("m", "hello");
    let options = ScheduleOptions { now: Some(much_later), ..ScheduleOptions::default() };
    let error = scheduler.schedule_with(&request, &closed, options).unwrap_err();
    assert_eq!(error, SchedulingError::AllStale { candidates: 3, threshold: policy.threshold });
    assert_eq!(ports(&scheduler, &closed, later), vec![2], "fail closed still routes to fresh");

    // No policy: staleness is ignored.
    let untracked = Arc::new(PoolSnapshot::clone(&pool).with_staleness(None));
    assert_eq!(ports(&scheduler, &untracked, much_later), vec![1]);
}

#[test]
fn fail_open_counts_picks_since_the_scrape_and_caps_the_list() {
    let scheduler = scheduler();
    let start = Instant::now();
    let policy = StalenessPolicy::new(Duration::from_secs(1));
    let states: Vec<EndpointState> = (1..=6).map(|port| endpoint(port, 2, 0, start)).collect();
    // Port 4 got two picks since its scrape: it ranks last among equals.
    states[3].endpoint.dispatches().record(start + Duration::from_millis(1), 1);
    states[3].endpoint.dispatches().record(start + Duration::from_millis(2), 1);
    let pool = Arc::new(PoolSnapshot::new(states).with_staleness(Some(policy)));
    let ranked = ports(&scheduler, &pool, start + Duration::from_secs(5));
    assert_eq!(ranked.len(), ALL_STALE_MAX_PICKS);
    assert!(!ranked.contains(&4), "{ranked:?}");
    // The pick counts against the endpoint chosen: the next decision goes elsewhere.
    let next = ports(&scheduler, &pool, start + Duration::from_secs(5));
    assert_ne!(next[0], ranked[0], "{next:?} after {ranked:?}");
}
