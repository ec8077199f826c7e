//! When the prefix index applies the records of picks: on a writer thread by default, or when
//! the scheduler is flushed (`BuiltinOptions::prefix_records`), for single-threaded embedders.

use std::sync::Arc;
use std::time::Instant;

use scheduler_core::{
    Endpoint, EndpointMetrics, EndpointPickerConfig, EndpointState, InferenceRequest, PoolSnapshot,
    ScheduleOptions, Scheduler,
};
use scorers::prefix_cache::RecordApplication;
use scorers::{BuiltinOptions, builtin_registry_with};

const CONFIG: &str = "\
plugins:
- type: prefix-cache-scorer
  parameters: {affinityLoadTolerance: 0}
";

const DECLARED_PRODUCER: &str = "\
plugins:
- type: prefix-cache-scorer
  parameters: {affinityLoadTolerance: 0}
- type: approx-prefix-cache-producer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
  - pluginRef: max-score-picker
";

/// Four blocks of GIE's and llm-d's default size (64 characters).
const PROMPT: &str = concat!(
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
    "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc",
    "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd",
);

fn scheduler(yaml: &str, records: RecordApplication) -> Scheduler {
    EndpointPickerConfig::from_yaml(yaml)
        .unwrap()
        .build(&builtin_registry_with(BuiltinOptions { prefix_records: records }))
        .unwrap()
}

fn pool() -> Arc<PoolSnapshot> {
    Arc::new(PoolSnapshot::new((0..3u16).map(|i| {
        EndpointState::new(Endpoint::new(([10, 0, 0, 1], 8000 + i).into())).with_metrics(
            EndpointMetrics { updated_at: Some(Instant::now()), ..EndpointMetrics::default() },
        )
    })))
}

/// The prefix scores of `request` on `pool`, one per endpoint.
fn prefix_scores(
    scheduler: &Scheduler,
    request: &InferenceRequest,
    pool: &Arc<PoolSnapshot>,
) -> Vec<f64> {
    let result = scheduler
        .schedule_with(request, pool, ScheduleOptions { explain: true, ..Default::default() })
        .unwrap();
    let explanation = result.explanation().unwrap();
    explanation[0].scorers.iter().find(|(name, ..)| name.contains("prefix")).unwrap().2.clone()
}

#[test]
fn on_flush_records_wait_for_the_flush_and_then_match() {
    for yaml in [CONFIG, DECLARED_PRODUCER] {
        let scheduler = scheduler(yaml, RecordApplication::OnFlush);
        let pool = pool();
        let request = InferenceRequest::new("m", PROMPT);
        let first = scheduler.schedule(&request, &pool).unwrap().primary().endpoint.address.port();
        // Not applied yet: no thread applies it behind the caller's back.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let before = prefix_scores(&scheduler, &request, &pool);
        assert!(before.iter().all(|&score| score == 0.0), "{yaml}: {before:?}");
        scheduler.flush();
        let after = prefix_scores(&scheduler, &request, &pool);
        let holder = usize::from(first - 8000);
        assert!(after[holder] > 0.0, "{yaml}: the pick's endpoint holds the prompt: {after:?}");
    }
}

#[test]
fn background_records_match_after_a_flush_too() {
    let scheduler = scheduler(CONFIG, RecordApplication::Background);
    let pool = pool();
    let request = InferenceRequest::new("m", PROMPT);
    let first = scheduler.schedule(&request, &pool).unwrap().primary().endpoint.address.port();
    scheduler.flush();
    let after = prefix_scores(&scheduler, &request, &pool);
    assert_eq!(after[usize::from(first - 8000)], 1.0, "{after:?}");
}
