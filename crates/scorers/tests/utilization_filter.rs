//! `utilization-filter`: the caps of llm-d-router's filter tests, its parameter checks, and a
//! property: it only removes candidates, in order, and keeps exactly those within every cap.

use std::sync::Arc;

use proptest::prelude::*;
use scheduler_core::{
    CycleState, Endpoint, EndpointMetrics, EndpointState, Filter, InferenceRequest, PoolSnapshot,
};
use scorers::{UtilizationFilter, UtilizationFilterParameters};
use serde_json::json;

fn filter(parameters: serde_json::Value) -> Result<UtilizationFilter, String> {
    let parameters: UtilizationFilterParameters =
        serde_json::from_value(parameters).map_err(|error| error.to_string())?;
    UtilizationFilter::new(parameters).map_err(|error| error.to_string())
}

fn endpoint(i: u16, running: u32, waiting_queue: u32, kv_usage: f64) -> EndpointState {
    EndpointState::new(Endpoint::new(([10, 0, 0, 1], 8000 + i).into())).with_metrics(
        EndpointMetrics { running, waiting_queue, kv_usage, ..EndpointMetrics::default() },
    )
}

fn kept(filter: &UtilizationFilter, pool: &PoolSnapshot) -> Vec<u32> {
    let mut candidates: Vec<u32> = (0..pool.len() as u32).collect();
    filter.filter(
        &mut CycleState::new(std::time::Instant::now(), 0),
        &InferenceRequest::new("m", "p"),
        pool,
        &mut candidates,
    );
    candidates
}

#[test]
fn an_endpoint_over_any_cap_is_dropped() {
    let filter = filter(json!({"conditions": [
        {"metric": "running-requests", "maxValue": 40},
        {"metric": "waiting-queue", "maxValue": 0},
        {"metric": "kv-cache-utilization", "maxValue": 0.8},
    ]}))
    .unwrap();
    let pool = PoolSnapshot::new([
        endpoint(0, 40, 0, 0.8), // at every cap: kept
        endpoint(1, 41, 0, 0.1), // too many running
        endpoint(2, 1, 1, 0.1),  // a queue
        endpoint(3, 1, 0, 0.81), // KV too full
        endpoint(4, 0, 0, 0.0),
    ]);
    assert_eq!(kept(&filter, &pool), [0, 4]);
}

#[test]
fn fallback_on_empty_keeps_everything_only_when_nothing_passes() {
    let pool = PoolSnapshot::new([endpoint(0, 5, 3, 0.1), endpoint(1, 9, 2, 0.1)]);
    let strict = json!({"conditions": [{"metric": "waiting-queue", "maxValue": 1}]});
    assert!(kept(&filter(strict.clone()).unwrap(), &pool).is_empty());
    let mut fallback = strict;
    fallback["fallbackOnEmpty"] = json!(true);
    assert_eq!(kept(&filter(fallback.clone()).unwrap(), &pool), [0, 1]);
    fallback["conditions"][0]["maxValue"] = json!(2);
    assert_eq!(kept(&filter(fallback).unwrap(), &pool), [1]);
}

#[test]
fn bad_parameters_are_refused_by_name() {
    let error = |parameters| filter(parameters).unwrap_err();
    assert!(error(json!({})).contains("'conditions'"));
    assert!(
        error(json!({"conditions": [{"metric": "gpu", "maxValue": 1}]}))
            .contains("conditions[0].metric")
    );
    assert!(
        error(json!({"conditions": [{"metric": "waiting-queue"}]}))
            .contains("conditions[0].maxValue")
    );
    assert!(
        error(json!({"conditions": [{"metric": "waiting-queue", "maxValue": -1}]}))
            .contains("non-negative")
    );
    assert!(
        error(json!({"conditions": [{"metric": "kv-cache-utilization", "maxValue": 1.5}]}))
            .contains("at most 1")
    );
    assert!(
        error(json!({"conditions": [{"metric": "active-requests", "maxValue": -3}]}))
            .contains("non-negative")
    );
    assert!(
        error(json!({"conditions": [{"metric": "waiting-queue", "maxValue": 1, "max": 2}]}))
            .contains("max")
    );
    assert!(
        error(
            json!({"conditions": [{"metric": "waiting-queue", "maxValue": 1}], "fallback": true})
        )
        .contains("fallback")
    );
}

proptest! {
    #[test]
    fn only_removes_and_keeps_exactly_those_within_caps(
        metrics in proptest::collection::vec((0u32..50, 0u32..10, 0.0f64..1.0), 0..30),
        max_running in 0.0f64..50.0,
        max_queue in 0.0f64..10.0,
        max_kv in 0.0f64..1.0,
        fallback in any::<bool>(),
        start in 0usize..30,
    ) {
        let filter = filter(json!({"fallbackOnEmpty": fallback, "conditions": [
            {"metric": "running-requests", "maxValue": max_running},
            {"metric": "waiting-queue", "maxValue": max_queue},
            {"metric": "kv-cache-utilization", "maxValue": max_kv},
        ]})).unwrap();
        let pool = Arc::new(PoolSnapshot::new(metrics.iter().enumerate().map(
            |(i, &(running, queue, kv))| endpoint(i as u16, running, queue, kv),
        )));
        // A rotated candidate list, to check that order is kept.
        let mut candidates: Vec<u32> = (0..metrics.len() as u32).collect();
        candidates.rotate_left(start.min(metrics.len()));
        let before = candidates.clone();
        filter.filter(&mut CycleState::new(std::time::Instant::now(), 0), &InferenceRequest::new("m", "p"), &pool, &mut candidates);
        let within: Vec<u32> = before.iter().copied().filter(|&i| {
            let (running, queue, kv) = metrics[i as usize];
            f64::from(running) <= max_running && f64::from(queue) <= max_queue && kv <= max_kv
        }).collect();
        if within.is_empty() && fallback {
            prop_assert_eq!(candidates, before);
        } else {
            prop_assert_eq!(candidates, within);
        }
    }
}
