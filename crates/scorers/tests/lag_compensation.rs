//! Lag compensation: the load scorers count the requests sent since an endpoint's metrics were
//! scraped, so decisions between two scrapes spread, and a new scrape resets the count.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use scheduler_core::{
    Candidates, CycleState, EndpointMetrics, EndpointPickerConfig, InferenceRequest, PoolSnapshot,
    ScheduleOptions, Scheduler, Scorer,
};
use scorers::{KvCacheUtilizationScorer, LoadScorerParameters, QueueScorer, builtin_registry};
use serde_json::json;

/// GIE's load-only profile without the KV-cache scorer: the queue scorer alone.
fn queue_only(lag_compensation: bool) -> Scheduler {
    EndpointPickerConfig::queue_kv()
        .without_plugin("kv-cache-utilization-scorer")
        .with_plugin_parameters("queue-scorer", json!({"lagCompensation": lag_compensation}))
        .build(&builtin_registry())
        .unwrap()
}

/// How many of `decisions` requests, all decided after the pool's scrape, each endpoint gets.
fn spread(scheduler: &Scheduler, pool: &Arc<PoolSnapshot>, decisions: usize) -> Vec<usize> {
    let mut counts = vec![0; pool.len()];
    let request = InferenceRequest::new("m", "a prompt of forty characters, give or ta");
    for i in 0..decisions {
        let options = ScheduleOptions { seed: Some(i as u64), ..ScheduleOptions::default() };
        let result = scheduler.schedule_with(&request, pool, options).unwrap();
        counts[pool.index_of(result.primary().id()).unwrap() as usize] += 1;
    }
    counts
}

#[test]
fn a_burst_between_scrapes_spreads_over_the_endpoints() {
    // Equal scraped queues: each pick goes to an endpoint with the fewest picks so far.
    let idle = [(0, 0.0), (0, 0.0), (0, 0.0)];
    assert_eq!(spread(&queue_only(true), &common::pool(&idle), 12), [4, 4, 4]);
    // The first endpoint looks least loaded: a pick counts as a quarter of a waiting request,
    // so it takes four picks before the others are as attractive.
    let queues = [(0, 0.0), (1, 0.0), (1, 0.0)];
    let counts = spread(&queue_only(true), &common::pool(&queues), 12);
    assert!((5..=8).contains(&counts[0]) && counts[1] + counts[2] >= 4, "spread: {counts:?}");
    let herded = spread(&queue_only(false), &common::pool(&queues), 12);
    assert_eq!(herded, [12, 0, 0], "without compensation the burst herds");
}

#[test]
fn a_new_scrape_replaces_the_count() {
    let pool = common::pool(&[(0, 0.0), (0, 0.0)]);
    let scheduler = queue_only(true);
    let first = spread(&scheduler, &pool, 1);
    let picked = first.iter().position(|&n| n == 1).unwrap();
    let scorer = QueueScorer::default();
    let request = InferenceRequest::new("m", "p");
    assert_eq!(scores(&scorer, &pool, &request)[picked], 0.0, "the pick counts as queued");
    // A later scrape of the picked endpoint includes the request (here: it already ran).
    let rescraped = Arc::new(PoolSnapshot::new(pool.endpoints().iter().map(|state| {
        state.clone().with_metrics(EndpointMetrics {
            updated_at: Some(Instant::now() + Duration::from_millis(1)),
            ..state.metrics.clone()
        })
    })));
    assert_eq!(scores(&scorer, &rescraped, &request), vec![1.0, 1.0]);
}

#[test]
fn kv_usage_counts_sent_prompt_tokens_when_capacity_is_known() {
    let scrape = Instant::now();
    let with_capacity = |capacity| {
        Arc::new(PoolSnapshot::new([common::endpoint(0, 0, 0.5).with_metrics(EndpointMetrics {
            kv_usage: 0.5,
            kv_capacity_blocks: capacity,
            updated_at: Some(scrape),
            ..EndpointMetrics::default()
        })]))
    };
    let known = with_capacity(Some(100));
    let unknown = with_capacity(None);
    let huge = with_capacity(Some(u64::MAX));
    for pool in [&known, &unknown, &huge] {
        pool.endpoints()[0].endpoint.dispatches().record(scrape + Duration::from_millis(1), 400);
        pool.endpoints()[0].endpoint.dispatches().record(scrape + Duration::from_millis(2), 400);
    }
    let request = InferenceRequest::new("m", "p");
    let scorer = KvCacheUtilizationScorer::default();
    // 800 tokens = 50 blocks = half the capacity, on top of the scraped half.
    assert_eq!(scores(&scorer, &known, &request), vec![0.0]);
    assert_eq!(scores(&scorer, &unknown, &request), vec![0.5], "no capacity, no adjustment");
    assert_eq!(scores(&scorer, &huge, &request), vec![0.5], "any capacity, no overflow");
    let plain = KvCacheUtilizationScorer::new(LoadScorerParameters { lag_compensation: false });
    assert_eq!(scores(&plain, &known, &request), vec![0.5]);
}

#[test]
fn the_parameter_is_checked() {
    let yaml = "plugins:\n- type: queue-scorer\n  parameters: {lagCompensaton: false}\n";
    let error = EndpointPickerConfig::from_yaml(yaml).unwrap().build(&builtin_registry());
    let message = error.expect_err("a misspelt key is refused").to_string();
    assert!(message.contains("lagCompensaton"), "{message}");
}

fn scores(scorer: &dyn Scorer, pool: &PoolSnapshot, request: &InferenceRequest) -> Vec<f64> {
    let indices: Vec<u32> = (0..pool.len() as u32).collect();
    let mut scores = vec![0.0; indices.len()];
    let mut state = CycleState::new(Instant::now() + Duration::from_millis(10), 0);
    scorer.score(&mut state, request, Candidates::new(pool, &indices), &mut scores);
    scores
}
