//! A decision allocates a fixed, small number of times whatever the pool size: nothing per
//! endpoint. Counted with a counting global allocator, not timed.

use std::sync::Arc;
use std::time::Instant;

use epp_rs::core::{
    Endpoint, EndpointMetrics, EndpointPickerConfig, EndpointState, InferenceRequest, PoolSnapshot,
};

fn pool(size: usize) -> Arc<PoolSnapshot> {
    let now = Instant::now();
    Arc::new(PoolSnapshot::new((0..size).map(|i| {
        let address = ([10, 0, (i >> 8) as u8, i as u8], 8000).into();
        EndpointState::new(Endpoint::new(address)).with_metrics(EndpointMetrics {
            waiting_queue: (i % 9) as u32,
            kv_usage: (i % 10) as f64 / 10.0,
            updated_at: Some(now),
            ..EndpointMetrics::default()
        })
    })))
}

fn allocations_per_decision(config: &str, size: usize, prompt: &str) -> u64 {
    let scheduler = EndpointPickerConfig::from_yaml(config)
        .and_then(|config| config.build(&epp_rs::scorers::builtin_registry()))
        .unwrap()
        .with_seed(11);
    let pool = pool(size);
    let request = InferenceRequest::new("llama", prompt).with_request_id("r");
    // The first decision on a thread sizes its reusable buffers; the first request to an
    // endpoint creates its in-flight counter. Neither recurs, so take the least of a few.
    drop(scheduler.schedule(&request, &pool).unwrap());
    (0..8)
        .map(|_| {
            allocation_counter::measure(|| {
                drop(scheduler.schedule(&request, &pool).unwrap());
            })
            .count_total
        })
        .min()
        .unwrap_or(u64::MAX)
}

#[test]
fn decisions_allocate_nothing_per_endpoint() {
    for config in [
        scheduler_core_default(),
        "plugins:\n- type: queue-scorer\n- type: active-request-scorer\n- type: max-score-picker\n  parameters: {maxNumOfEndpoints: 4}\n",
    ] {
        for prompt in ["Hello", LONG_PROMPT] {
            let small = allocations_per_decision(config, 10, prompt);
            let large = allocations_per_decision(config, 1_000, prompt);
            assert_eq!(small, large, "allocations grew with the pool:\n{config}");
            // The result's pick list and profile-run list, the completion record's two strings,
            // and, with prefix scoring, the shared prompt-hash scratch (its slot, its box and
            // its hash buffer).
            assert!(small <= 7, "{small} allocations per decision:\n{config}");
        }
    }
}

const LONG_PROMPT: &str = "You are a helpful assistant. Answer briefly and cite your sources. \
    The user asks about the history of the printing press and its effect on literacy in Europe, \
    and wants three bullet points with dates.";

fn scheduler_core_default() -> &'static str {
    epp_rs::core::DEFAULT_CONFIG_YAML
}
