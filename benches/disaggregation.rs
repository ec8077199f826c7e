//! P/D decision latency: one `schedule` call with llm-d-router's P/D config (decode profile,
//! then the `prefix-based-pd-decider` over the decode pick's prefix match, then the prefill
//! profile when it says so), over pools of 10, 100 and 1,000 endpoints, half prefill and half
//! decode, with
//! - a 16K-character prompt nobody caches: both stages run (prefill apart),
//! - the same prompt once its decode endpoint caches it: decode only, the decider says no.
//!
//! Compare with `decision`'s `gie_default_16k_prompt`, which runs one profile over the same
//! prompt length.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use epp_rs::core::{
    Endpoint, EndpointMetrics, EndpointPickerConfig, EndpointRole, EndpointState, InferenceRequest,
    PoolSnapshot,
};

/// llm-d-router's `deploy/config/pd-epp-config.yaml`.
const PD_CONFIG: &str = "
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
  parameters:
    maxPrefixTokensToMatch: 16384
    lruCapacityPerServer: 31250
- type: prefix-cache-scorer
- type: queue-scorer
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: disagg-profile-handler
  parameters:
    deciders:
      prefill: prefix-based-pd-decider
- type: prefix-based-pd-decider
  parameters:
    nonCachedTokens: 16
schedulingProfiles:
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: max-score-picker
  - pluginRef: prefix-cache-scorer
    weight: 2
  - pluginRef: queue-scorer
    weight: 1
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: max-score-picker
  - pluginRef: prefix-cache-scorer
    weight: 2
  - pluginRef: queue-scorer
    weight: 1
";

/// `size` endpoints, even positions prefill and odd ones decode, with varied queues.
fn pool(size: usize) -> Arc<PoolSnapshot> {
    let now = Instant::now();
    Arc::new(PoolSnapshot::new((0..size).map(|i| {
        let address = ([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8000).into();
        let role = if i % 2 == 0 { EndpointRole::Prefill } else { EndpointRole::Decode };
        EndpointState::new(Endpoint::new(address).with_role(role)).with_metrics(EndpointMetrics {
            waiting_queue: (i * 7 % 13) as u32,
            updated_at: Some(now),
            ..EndpointMetrics::default()
        })
    })))
}

fn disaggregation(c: &mut Criterion) {
    let registry = epp_rs::scorers::builtin_registry();
    let config = EndpointPickerConfig::from_yaml(PD_CONFIG).expect("bench config");
    let prompt: String =
        "Summarise the incident report in three lines. ".repeat(360)[..16 * 1024].to_owned();
    let cold = InferenceRequest::new("llama", prompt.clone()).with_request_id("bench");
    let mut group = c.benchmark_group("disaggregation");
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    for size in [10, 100, 1_000] {
        let pool = pool(size);
        // Every pick is recorded (off the decision's path), so each iteration's prompt gets a
        // head of its own: block hashes chain from the first block, so nothing ever matches.
        let scheduler = config.build(&registry).expect("bench config");
        let mut turn = 0u64;
        group.bench_with_input(
            BenchmarkId::new("prefill_apart_16k_prompt", size),
            &pool,
            |b, pool| {
                b.iter(|| {
                    turn += 1;
                    let mut request = cold.clone();
                    request.prompt.replace_range(..20, &format!("{turn:020}"));
                    let result = scheduler.schedule(black_box(&request), pool).expect("decided");
                    debug_assert!(result.prefill().is_some());
                    black_box(result)
                })
            },
        );

        let scheduler = config.build(&registry).expect("bench config");
        drop(scheduler.schedule(&cold, &pool));
        scheduler.flush();
        let warm = scheduler.schedule(&cold, &pool).expect("decided");
        assert!(warm.prefill().is_none(), "the cached prompt is served decode-only");
        drop(warm);
        group.bench_with_input(
            BenchmarkId::new("decode_only_cached_16k_prompt", size),
            &pool,
            |b, pool| b.iter(|| black_box(scheduler.schedule(black_box(&cold), pool))),
        );
    }
    group.finish();
}

criterion_group!(benches, disaggregation);
criterion_main!(benches);
