//! Invariants of scheduling with the built-in plugins, over generated pools and configs.

use std::sync::Arc;
use std::time::Instant;

use proptest::prelude::*;
use scheduler_core::DEFAULT_PICKER_TYPE;
use scheduler_core::{
    Endpoint, EndpointMetrics, EndpointPickerConfig, EndpointState, InferenceRequest, PoolSnapshot,
    ScheduleOptions, Scheduler,
};
use scorers::builtin_registry;
use serde_json::json;

#[derive(Clone, Debug)]
struct GeneratedEndpoint {
    waiting_queue: u32,
    kv_usage: f64,
    active_adapters: Vec<u8>,
    max_adapters: u32,
    gold: bool,
    kv_capacity_blocks: Option<u64>,
}

fn generated_endpoint() -> impl Strategy<Value = GeneratedEndpoint> {
    (
        0u32..200,
        prop_oneof![Just(0.0), Just(1.0), -0.5f64..1.5, Just(f64::NAN)],
        proptest::collection::vec(0u8..4, 0..3),
        0u32..4,
        any::<bool>(),
        prop_oneof![
            Just(None),
            Just(Some(0)),
            (1u64..100_000).prop_map(Some),
            Just(Some(u64::MAX))
        ],
    )
        .prop_map(
            |(waiting_queue, kv_usage, active_adapters, max_adapters, gold, kv_capacity_blocks)| {
                GeneratedEndpoint {
                    waiting_queue,
                    kv_usage,
                    active_adapters,
                    max_adapters,
                    gold,
                    kv_capacity_blocks,
                }
            },
        )
}

fn build_pool(endpoints: &[GeneratedEndpoint]) -> Arc<PoolSnapshot> {
    let now = Instant::now();
    Arc::new(PoolSnapshot::new(endpoints.iter().enumerate().map(|(i, g)| {
        let mut endpoint = Endpoint::new(([10, 1, (i / 250) as u8, (i % 250) as u8], 8000).into());
        if g.gold {
            endpoint = endpoint.with_label("tier", "gold");
        }
        EndpointState::new(endpoint).with_metrics(EndpointMetrics {
            waiting_queue: g.waiting_queue,
            running: 0,
            kv_usage: g.kv_usage,
            active_lora_adapters: g
                .active_adapters
                .iter()
                .map(|a| Arc::from(format!("lora-{a}")))
                .collect(),
            waiting_lora_adapters: Vec::new(),
            max_lora_adapters: g.max_adapters,
            kv_capacity_blocks: g.kv_capacity_blocks,
            updated_at: Some(now),
        })
    })))
}

/// GIE's default profile with generated weights (prefix-cache weighs as much as the queue),
/// LoRA affinity and in-flight requests added, a generated picker and fallback count, and
/// optionally a filter keeping the `gold` tier.
fn config(
    weights: [u32; 4],
    picker: &str,
    fallbacks: usize,
    filter_gold: bool,
) -> EndpointPickerConfig {
    let [queue, kv_cache, lora, active] = weights.map(f64::from);
    let config = EndpointPickerConfig::gie_default()
        .with_weight("queue-scorer", queue)
        .with_weight("kv-cache-utilization-scorer", kv_cache)
        .with_weight("prefix-cache-scorer", queue)
        .with_plugin_parameters("prefix-cache-scorer", json!({"blockSize": 8}))
        .with_profile_plugin("lora-affinity-scorer", lora)
        .with_profile_plugin("active-request-scorer", active)
        .without_plugin(DEFAULT_PICKER_TYPE)
        .with_profile_plugin(picker, 1.0)
        .with_plugin_parameters(picker, json!({"maxNumOfEndpoints": fallbacks}));
    if !filter_gold {
        return config;
    }
    config
        .with_profile_plugin("by-label", 1.0)
        .with_plugin_parameters("by-label", json!({"label": "tier", "validValues": ["gold"]}))
}

fn scheduler(config: &EndpointPickerConfig, seed: u64) -> Scheduler {
    config.build(&builtin_registry()).unwrap().with_seed(seed)
}

fn picker() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("max-score-picker"), Just("random-picker"), Just("weighted-random-picker")]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn picks_are_distinct_filtered_candidates(
        endpoints in proptest::collection::vec(generated_endpoint(), 1..40),
        weights in proptest::array::uniform4(0u32..5),
        picker in picker(),
        fallbacks in 1usize..6,
        filter_gold in any::<bool>(),
        seed in any::<u64>(),
        adapter in 0u8..5,
    ) {
        let pool = build_pool(&endpoints);
        let scheduler = scheduler(&config(weights, picker, fallbacks, filter_gold), seed);
        let request = InferenceRequest::new(format!("lora-{adapter}"), format!("a shared system prompt, then question {seed}"));
        match scheduler.schedule(&request, &pool) {
            Ok(result) => {
                let ranked: Vec<_> = result.ranked().map(|e| e.id()).collect();
                prop_assert!(!ranked.is_empty() && ranked.len() <= fallbacks.min(endpoints.len()));
                let mut unique = ranked.clone();
                unique.sort_unstable();
                unique.dedup();
                prop_assert_eq!(unique.len(), ranked.len(), "fallbacks never repeat the primary or each other");
                for id in &ranked {
                    let endpoint = pool.by_id(*id).unwrap();
                    prop_assert!(!filter_gold || endpoint.endpoint.labels.contains_key("tier"),
                        "a pick must have passed the filters");
                }
            }
            Err(error) => {
                prop_assert!(filter_gold && !endpoints.iter().any(|e| e.gold), "unexpected {error}");
            }
        }
    }

    #[test]
    fn scores_stay_in_unit_range_and_weights_scale_totals(
        endpoints in proptest::collection::vec(generated_endpoint(), 1..40),
        weights in proptest::array::uniform4(0u32..5),
        factor in 1u32..5,
        seed in any::<u64>(),
    ) {
        // A pool each: a decision is recorded on its pick, which the next decision's load
        // scorers would count.
        let explain = ScheduleOptions { explain: true, seed: Some(seed), ..Default::default() };
        let request = InferenceRequest::new("lora-1", "a shared system prompt with a question");
        let base = scheduler(&config(weights, "max-score-picker", 1, false), 1)
            .schedule_with(&request, &build_pool(&endpoints), explain).unwrap();
        let scaled = scheduler(&config(weights.map(|w| w * factor), "max-score-picker", 1, false), 1)
            .schedule_with(&request, &build_pool(&endpoints), explain).unwrap();
        let base = &base.explanation().unwrap()[0];
        let scaled = &scaled.explanation().unwrap()[0];
        for (_, _, scores) in &base.scorers {
            prop_assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)), "{scores:?}");
        }
        for (total, scaled_total) in base.totals.iter().zip(&scaled.totals) {
            prop_assert!((total * f64::from(factor) - scaled_total).abs() < 1e-9);
        }
    }

    #[test]
    fn same_seed_same_pick(
        endpoints in proptest::collection::vec(generated_endpoint(), 1..40),
        weights in proptest::array::uniform4(0u32..3),
        picker in picker(),
        seed in any::<u64>(),
    ) {
        let config = config(weights, picker, 3, false);
        let request = InferenceRequest::new("lora-0", "p");
        // The same pool state too: each run starts from a pool no decision has been sent to.
        let picks = |scheduler: Scheduler| -> Vec<Vec<_>> {
            let pool = build_pool(&endpoints);
            (0..4).map(|_| scheduler.schedule(&request, &pool).unwrap().ranked().map(|e| e.id()).collect()).collect()
        };
        prop_assert_eq!(picks(scheduler(&config, seed)), picks(scheduler(&config, seed)));
    }

    #[test]
    fn max_score_primary_has_the_highest_total(
        endpoints in proptest::collection::vec(generated_endpoint(), 1..40),
        weights in proptest::array::uniform4(0u32..5),
        seed in any::<u64>(),
    ) {
        let pool = build_pool(&endpoints);
        let explain = ScheduleOptions { explain: true, seed: Some(seed), ..Default::default() };
        let result = scheduler(&config(weights, "max-score-picker", 1, false), seed)
            .schedule_with(&InferenceRequest::new("lora-2", "p"), &pool, explain).unwrap();
        let explanation = &result.explanation().unwrap()[0];
        let best = explanation.totals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let primary = pool.index_of(result.primary().id()).unwrap();
        let position = explanation.candidates.iter().position(|&c| c == primary).unwrap();
        prop_assert_eq!(explanation.totals[position], best);
    }
}
