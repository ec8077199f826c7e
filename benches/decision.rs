//! Decision latency: one `schedule` call over pools of 10, 100 and 1,000 endpoints with the
//! default profile (queue and KV-cache scorers, max-score picker), plus the same with the
//! active-request scorer and three fallbacks.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use epp_rs::core::{
    Endpoint, EndpointMetrics, EndpointPickerConfig, EndpointState, InferenceRequest, PoolSnapshot,
};

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
    let default = EndpointPickerConfig::gie_default().build(&registry).expect("default config");
    let full = EndpointPickerConfig::from_yaml(FULL)
        .and_then(|config| config.build(&registry))
        .expect("bench config");
    let request = InferenceRequest::new("llama", "Hello").with_request_id("bench");
    let mut group = c.benchmark_group("decision");
    for size in [10, 100, 1_000] {
        let pool = pool(size);
        group.bench_with_input(BenchmarkId::new("default_profile", size), &pool, |b, pool| {
            b.iter(|| black_box(default.schedule(black_box(&request), pool)))
        });
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
