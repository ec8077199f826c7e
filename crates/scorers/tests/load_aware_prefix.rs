//! Load-aware prefix affinity (the prefix-cache scorer's default): a cached prefix's score
//! fades as its endpoint gets busier than the least-loaded candidate, so one hot prefix cannot
//! pin the whole load on the endpoint that holds it.

mod common;

use std::sync::Arc;
use std::time::Instant;

use proptest::prelude::*;
use scheduler_core::{
    Endpoint, EndpointMetrics, EndpointPickerConfig, EndpointState, InferenceRequest, PoolSnapshot,
    ScheduleOptions, Scheduler,
};
use scorers::builtin_registry;

fn scheduler(parameters: &str) -> Scheduler {
    let yaml = format!(
        "plugins:\n- type: prefix-cache-scorer\n  parameters: {{blockSize: 4{parameters}}}\n"
    );
    EndpointPickerConfig::from_yaml(&yaml).unwrap().build(&builtin_registry()).unwrap()
}

fn endpoint(i: u16, running: u32, waiting_queue: u32) -> EndpointState {
    EndpointState::new(Endpoint::new(([10, 0, 0, 1], 8000 + i).into())).with_metrics(
        EndpointMetrics {
            running,
            waiting_queue,
            updated_at: Some(Instant::now()),
            ..EndpointMetrics::default()
        },
    )
}

fn pool(loads: &[(u32, u32)]) -> Arc<PoolSnapshot> {
    Arc::new(PoolSnapshot::new(
        loads
            .iter()
            .enumerate()
            .map(|(i, &(running, waiting))| endpoint(i as u16, running, waiting)),
    ))
}

const PROMPT: &str = "aaaabbbbccccdddd";

/// Records `PROMPT` on endpoint 0 alone (a pool holding only it), then returns the prefix
/// scores of a second request for the same prompt on `loads` (endpoint 0 first).
fn scores_after_recording(scheduler: &Scheduler, loads: &[(u32, u32)]) -> Vec<f64> {
    let request = InferenceRequest::new("m", PROMPT);
    let holder_only = Arc::new(PoolSnapshot::new([endpoint(0, 0, 0)]));
    scheduler.schedule(&request, &holder_only).unwrap();
    scheduler.flush();
    let pool = pool(loads);
    let result = scheduler
        .schedule_with(&request, &pool, ScheduleOptions { explain: true, ..Default::default() })
        .unwrap();
    result.explanation().unwrap()[0].scorers[0].2.clone()
}

#[test]
fn equal_loads_keep_gies_score() {
    let scores = scores_after_recording(&scheduler(""), &[(10, 2), (10, 2), (10, 2)]);
    assert_eq!(scores, vec![1.0, 0.0, 0.0]);
}

#[test]
fn affinity_fades_linearly_with_the_holders_excess_load() {
    let scheduler = scheduler(", affinityLoadTolerance: 64");
    // Endpoint 0: 32 running over the lightest (0): half the affinity. (The pool is scraped
    // after the recording pick, so that pick is not counted on top.)
    let scores = scores_after_recording(&scheduler, &[(32, 0), (0, 0)]);
    assert_eq!(scores, vec![0.5, 0.0]);
}

#[test]
fn a_waiting_request_counts_for_several_running_ones() {
    let scheduler =
        scheduler(", affinityLoadTolerance: 64, affinityLoadRatio: 0, waitingRequestFactor: 4");
    // 8 running + 4 waiting x 4 = 16 over the lightest (8 running): 1 - 16/64.
    let scores = scores_after_recording(&scheduler, &[(8, 4), (8, 0)]);
    assert_eq!(scores, vec![0.75, 0.0]);
}

#[test]
fn a_holder_past_the_tolerance_loses_its_affinity_and_the_pick() {
    let scheduler = scheduler(", affinityLoadTolerance: 64, affinityLoadRatio: 0");
    let scores = scores_after_recording(&scheduler, &[(200, 10), (100, 0)]);
    assert_eq!(scores, vec![0.0, 0.0]);
}

#[test]
fn the_tolerance_grows_with_the_lightest_load() {
    let scheduler = scheduler(", affinityLoadTolerance: 64, affinityLoadRatio: 2");
    // Idle pool: 32 over a lightest of 0 against 64 + 2 x 0.
    assert_eq!(scores_after_recording(&scheduler, &[(32, 0), (0, 0)]), vec![0.5, 0.0]);
    // Busy pool: 128 over a lightest of 96 against 64 + 2 x 96 = 256.
    assert_eq!(scores_after_recording(&scheduler, &[(224, 0), (96, 0)]), vec![0.5, 0.0]);
    // Gone at (1 + ratio) x lightest + tolerance: 3 x 96 + 64 = 352.
    assert_eq!(scores_after_recording(&scheduler, &[(352, 0), (96, 0)]), vec![0.0, 0.0]);
}

#[test]
fn the_default_keeps_a_busy_holder_that_an_absolute_tolerance_would_drop() {
    // Every server busy (a saturated pool of conversations): the holder, 80 requests over
    // the lightest, keeps most of its affinity by default, none with the absolute tolerance.
    let busy = [(180, 0), (100, 0), (120, 0)];
    let default = scores_after_recording(&scheduler(""), &busy);
    let absolute = scores_after_recording(&scheduler(", affinityLoadRatio: 0"), &busy);
    assert_eq!(default[0], 1.0 - 80.0 / 264.0);
    assert_eq!(absolute[0], 0.0);
}

#[test]
fn requests_sent_since_the_scrape_count_as_load() {
    let scheduler = scheduler(", affinityLoadTolerance: 64");
    let request = InferenceRequest::new("m", PROMPT);
    let pool = pool(&[(0, 0), (0, 0)]);
    // Scraped before any pick: every pick below is pending on its endpoint.
    let first = scheduler.schedule(&request, &pool).unwrap().primary().endpoint.address.port();
    scheduler.flush();
    let result = scheduler
        .schedule_with(&request, &pool, ScheduleOptions { explain: true, ..Default::default() })
        .unwrap();
    let scores = &result.explanation().unwrap()[0].scorers[0].2;
    let holder = usize::from(first - 8000);
    assert_eq!(scores[holder], 1.0 - 1.0 / 64.0, "one pending pick: {scores:?}");
}

#[test]
fn tolerance_zero_is_gies_formula() {
    let scheduler = scheduler(", affinityLoadTolerance: 0");
    let scores = scores_after_recording(&scheduler, &[(200, 50), (0, 0)]);
    assert_eq!(scores, vec![1.0, 0.0], "affinity whatever the load");
}

#[test]
fn bad_parameters_are_refused_by_name() {
    for (parameters, name) in [
        (", affinityLoadTolerance: -1", "affinityLoadTolerance"),
        (", affinityLoadTolerance: .nan", "affinityLoadTolerance"),
        (", waitingRequestFactor: -2", "waitingRequestFactor"),
        (", affinityLoadRatio: -0.5", "affinityLoadRatio"),
        (", affinityLoadRatio: .inf", "affinityLoadRatio"),
    ] {
        let yaml = format!(
            "plugins:\n- type: prefix-cache-scorer\n  parameters: {{blockSize: 4{parameters}}}\n"
        );
        let error = EndpointPickerConfig::from_yaml(&yaml)
            .map_err(|e| e.to_string())
            .and_then(|config| config.build(&builtin_registry()).map_err(|e| e.to_string()))
            .unwrap_err();
        assert!(error.contains(name), "{parameters}: {error}");
    }
}

/// The default profile, with one prompt held by endpoint 0: once endpoint 0 is far busier than
/// the rest, the next request for that prompt goes elsewhere (GIE's weights alone keep it on
/// endpoint 0: prefix 3 outweighs queue 2 whatever the queue).
#[test]
fn the_default_profile_spills_a_hot_prefix_off_its_overloaded_holder() {
    let request = InferenceRequest::new("m", "s".repeat(4096));
    let route = |config: EndpointPickerConfig| {
        let scheduler = config.build(&builtin_registry()).unwrap();
        let holder_only = Arc::new(PoolSnapshot::new([endpoint(0, 0, 0)]));
        scheduler.schedule(&request, &holder_only).unwrap();
        scheduler.flush();
        let busy = pool(&[(256, 40), (0, 0), (0, 0)]);
        scheduler.schedule(&request, &busy).unwrap().primary().endpoint.address.port()
    };
    assert_ne!(route(EndpointPickerConfig::gie_default()), 8000);
    let gie_exact = EndpointPickerConfig::gie_default().with_plugin_parameters(
        "prefix-cache-scorer",
        serde_json::json!({"affinityLoadTolerance": 0}),
    );
    assert_eq!(route(gie_exact), 8000, "GIE's formula keeps the hot prefix on its holder");
}

proptest! {
    #[test]
    fn discounted_scores_stay_in_unit_range_and_never_exceed_gies(
        loads in prop::collection::vec((0u32..400, 0u32..100), 1..8),
        tolerance in 0.0f64..200.0,
        ratio in 0.0f64..8.0,
        factor in 0.0f64..10.0,
    ) {
        let discounted = scheduler(&format!(
            ", affinityLoadTolerance: {tolerance}, affinityLoadRatio: {ratio}, \
             waitingRequestFactor: {factor}"
        ));
        let exact = scheduler(", affinityLoadTolerance: 0");
        let with = scores_after_recording(&discounted, &loads);
        let without = scores_after_recording(&exact, &loads);
        for (score, gie) in with.iter().zip(&without) {
            prop_assert!((0.0..=1.0).contains(score), "{with:?}");
            prop_assert!(score <= gie, "{with:?} vs {without:?}");
        }
    }
}
