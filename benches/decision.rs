//! Decision latency: one `schedule` call over pools of 10, 100 and 1,000 endpoints with
//! - the default profile minus prefix (queue and KV-cache scorers, max-score picker), with
//!   and without lag compensation (the pool is never re-scraped, so after warm-up every
//!   endpoint's ring of picks is full and newer than its metrics: the compensation's worst case),
//! - the GIE default profile (plus the prefix-cache scorer) with a short prompt, and with a
//!   16K-character prompt (256 blocks) whose system-prompt half is cached on a tenth of the
//!   pool (hashing and lookup included, and queueing the pick's record: the record itself is
//!   applied by the scorer's writer thread, off the decision's path), and the same without
//!   load-aware affinity (`affinityLoadTolerance: 0`, GIE's prefix formula) to price it,
//! - queue, KV-cache and active-request scorers with three fallbacks.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use epp_rs::core::{
    Endpoint, EndpointMetrics, EndpointPickerConfig, EndpointState, InferenceRequest, PoolSnapshot,
};
use serde_json::json;

fn pool(size: usize) -> Arc<PoolSnapshot> {
    let now = Instant::now();
    Arc::new(PoolSnapshot::new((0..size).map(|i| {
        let address = ([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8000).into();
        EndpointState::new(Endpoint::new(address)).with_metrics(EndpointMetrics {
            waiting_queue: (i * 7 % 13) as u32,
            running: (i % 5) as u32,
            kv_usage: (i * 37 % 100) as f64 / 100.0,
            updated_at: Some(now),
            ..EndpointMetrics::default()
        })
    })))
}

const FULL: &str = "plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: active-request-scorer
- type: max-score-picker
  parameters: {maxNumOfEndpoints: 4}
";

fn decision(c: &mut Criterion) {
    let registry = epp_rs::scorers::builtin_registry();
    let build = |config: &EndpointPickerConfig| config.build(&registry).expect("bench config");
    let no_prefix = build(&EndpointPickerConfig::queue_kv());
    // The same profile scoring exactly as GIE does.
    let gie_exact = EndpointPickerConfig::queue_kv()
        .with_plugin_parameters("queue-scorer", json!({"lagCompensation": false}))
        .with_plugin_parameters("kv-cache-utilization-scorer", json!({"lagCompensation": false}));
    let no_lag = build(&gie_exact);
    let full = build(&EndpointPickerConfig::from_yaml(FULL).expect("bench config"));
    let request = InferenceRequest::new("llama", "Hello").with_request_id("bench");
    let system_prompt = "You are a careful assistant. ".repeat(8 * 1024 / 29 + 1);
    let long_request = InferenceRequest::new(
        "llama",
        format!(
            "{}{}",
            &system_prompt[..8 * 1024],
            "Question: what changed? ".repeat(8 * 1024 / 24 + 1)
        )[..16 * 1024]
            .to_owned(),
    )
    .with_request_id("bench");
    let mut group = c.benchmark_group("decision");
    for size in [10, 100, 1_000] {
        let pool = pool(size);
        group.bench_with_input(BenchmarkId::new("default_minus_prefix", size), &pool, |b, pool| {
            b.iter(|| black_box(no_prefix.schedule(black_box(&request), pool)))
        });
        group.bench_with_input(
            BenchmarkId::new("default_minus_prefix_no_lag_compensation", size),
            &pool,
            |b, pool| b.iter(|| black_box(no_lag.schedule(black_box(&request), pool))),
        );
        let default = build(&EndpointPickerConfig::gie_default());
        group.bench_with_input(
            BenchmarkId::new("gie_default_short_prompt", size),
            &pool,
            |b, pool| b.iter(|| black_box(default.schedule(black_box(&request), pool))),
        );
        // Warm the index: a tenth of the pool holds the shared system prompt.
        let warm = |scheduler: &epp_rs::core::Scheduler| {
            for i in 0..size.div_ceil(10) {
                let mut hinted =
                    InferenceRequest::new("llama", format!("{}{i}", &system_prompt[..8 * 1024]));
                hinted.endpoint_subset =
                    Some(vec![pool.endpoints()[i * 10 % size].endpoint.address]);
                drop(scheduler.schedule(&hinted, &pool));
            }
            scheduler.flush();
        };
        let default = build(&EndpointPickerConfig::gie_default());
        warm(&default);
        group.bench_with_input(
            BenchmarkId::new("gie_default_16k_prompt", size),
            &pool,
            |b, pool| b.iter(|| black_box(default.schedule(black_box(&long_request), pool))),
        );
        // The same without load-aware affinity (GIE's prefix formula), to price the discount.
        let gie_prefix = build(
            &EndpointPickerConfig::gie_default()
                .with_plugin_parameters("prefix-cache-scorer", json!({"affinityLoadTolerance": 0})),
        );
        warm(&gie_prefix);
        group.bench_with_input(
            BenchmarkId::new("gie_default_16k_prompt_gie_prefix_formula", size),
            &pool,
            |b, pool| b.iter(|| black_box(gie_prefix.schedule(black_box(&long_request), pool))),
        );
        group.bench_with_input(
            BenchmarkId::new("with_active_requests_and_fallbacks", size),
            &pool,
            |b, pool| b.iter(|| black_box(full.schedule(black_box(&request), pool))),
        );
    }
    group.finish();
}

criterion_group!(benches, decision);
criterion_main!(benches);
