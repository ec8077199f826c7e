//! The scheduler end to end with the built-in plugins.

mod common;

use std::sync::Arc;

use common::pool;
use scheduler_core::{
    EndpointPickerConfig, InferenceRequest, Outcome, PoolSnapshot, ScheduleOptions, SchedulingError,
};
use scheduler_core::{Scheduler, SchedulerProfile, SingleProfileHandler};
use scorers::{ActiveRequestScorer, MaxScorePicker, builtin_registry};
use serde_json::json;

fn scheduler(yaml: &str) -> scheduler_core::Scheduler {
    EndpointPickerConfig::from_yaml(yaml).unwrap().build(&builtin_registry()).unwrap().with_seed(7)
}

/// GIE's load-only profile with the KV-cache scorer weighted 1 and three endpoints ranked.
fn queue_kv() -> Scheduler {
    EndpointPickerConfig::queue_kv()
        .with_weight("kv-cache-utilization-scorer", 1.0)
        .with_plugin_parameters("max-score-picker", json!({"maxNumOfEndpoints": 3}))
        .build(&builtin_registry())
        .unwrap()
        .with_seed(7)
}

#[test]
fn weighted_scores_choose_and_rank() {
    // totals: e0 = 2*1 + 0.1 = 2.1; e1 = 2*0.5 + 0.9 = 1.9; e2 = 2*0 + 1 = 1.0
    let pool = pool(&[(0, 0.9), (5, 0.1), (10, 0.0)]);
    let result = queue_kv()
        .schedule_with(
            &InferenceRequest::new("m", "p"),
            &pool,
            ScheduleOptions { explain: true, ..Default::default() },
        )
        .unwrap();
    let ranked: Vec<u16> = result.ranked().map(|e| e.endpoint.address.port()).collect();
    assert_eq!(ranked, vec![8000, 8001, 8002]);
    assert_eq!(result.fallbacks().count(), 2);
    assert_eq!(result.primary_profile(), "default");
    let explanation = &result.explanation().unwrap()[0];
    assert_eq!(explanation.scorers[0].2, vec![1.0, 0.5, 0.0]);
    let expected = [2.1, 1.9, 1.0];
    for (total, want) in explanation.totals.iter().zip(expected) {
        assert!((total - want).abs() < 1e-9, "{:?}", explanation.totals);
    }
}

#[test]
fn the_filter_that_removed_the_last_candidate_is_named() {
    let scheduler = scheduler(
        "plugins:
- name: gold-only
  type: by-label
  parameters: {label: tier, validValues: [gold]}
- type: queue-scorer
",
    );
    let error =
        scheduler.schedule(&InferenceRequest::new("m", "p"), &pool(&[(0, 0.0)])).unwrap_err();
    assert_eq!(
        error,
        SchedulingError::NoCandidates {
            profile: Arc::from("default"),
            filter: Arc::from("gold-only")
        }
    );
    assert_eq!(
        error.to_string(),
        "filter 'gold-only' of profile 'default' removed the last candidate endpoints"
    );
}

#[test]
fn empty_pool_and_subset_hints() {
    let scheduler = queue_kv();
    let request = InferenceRequest::new("m", "p");
    assert_eq!(
        scheduler.schedule(&request, &Arc::new(PoolSnapshot::default())).unwrap_err(),
        SchedulingError::EmptyPool
    );
    let pool = pool(&[(0, 0.0), (9, 0.9), (3, 0.2)]);
    let mut hinted = request.clone();
    hinted.endpoint_subset =
        Some(vec!["10.0.0.1:8001".parse().unwrap(), "10.0.0.1:8002".parse().unwrap()]);
    let result = scheduler.schedule(&hinted, &pool).unwrap();
    let ranked: Vec<u16> = result.ranked().map(|e| e.endpoint.address.port()).collect();
    assert_eq!(ranked, vec![8002, 8001], "only the hinted endpoints, best first");
    hinted.endpoint_subset = Some(vec!["192.0.2.1:80".parse().unwrap()]);
    assert_eq!(
        scheduler.schedule(&hinted, &pool).unwrap_err(),
        SchedulingError::EmptySubset { requested: 1 }
    );
}

#[test]
fn active_requests_spread_a_burst_and_return_to_zero() {
    let counter = Arc::new(ActiveRequestScorer::new());
    let profile =
        SchedulerProfile::new("default", "max-score-picker", Arc::new(MaxScorePicker::default()))
            .with_scorer("active-request-scorer", 1.0, counter.clone());
    let scheduler = Scheduler::new(vec![profile], Arc::new(SingleProfileHandler))
        .with_pre_request(counter.clone())
        .with_response_complete(counter.clone())
        .with_seed(3);
    let pool = pool(&[(0, 0.0), (0, 0.0), (0, 0.0)]);
    let request = InferenceRequest::new("m", "p");
    let mut guards = Vec::new();
    for _ in 0..3 {
        let mut result = scheduler.schedule(&request, &pool).unwrap();
        guards.push(result.take_completion().unwrap());
    }
    let mut used: Vec<_> = guards.iter().map(|g| g.request().unwrap().scheduled_endpoint).collect();
    used.sort_unstable();
    used.dedup();
    assert_eq!(used.len(), 3, "each in-flight request pushes the next elsewhere");
    assert_eq!(counter.total_in_flight(), 3);

    // A result whose guard is never taken completes (as cancelled) when dropped.
    drop(scheduler.schedule(&request, &pool).unwrap());
    assert_eq!(counter.total_in_flight(), 3);

    let first = guards.remove(0);
    let freed_endpoint = first.request().unwrap().scheduled_endpoint;
    first.finish(Outcome::Completed);
    assert_eq!(counter.in_flight(freed_endpoint), 0);
    let next = scheduler.schedule(&request, &pool).unwrap();
    assert_eq!(next.primary().id(), freed_endpoint, "the endpoint with nothing in flight wins");
    drop(next);
    drop(guards); // error and cancel paths: dropping the guards completes them
    assert_eq!(counter.total_in_flight(), 0);
}
