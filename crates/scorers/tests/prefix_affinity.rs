//! `prefix-cache-affinity-filter` over the matches `prefix-cache-scorer` produces
//! (llm-d-router `filter/prefixcacheaffinity/plugin.go`).

mod common;

use std::sync::Arc;

use proptest::prelude::*;
use scheduler_core::{
    EndpointPickerConfig, InferenceRequest, PluginSpec, PoolSnapshot, ScheduleOptions, Scheduler,
};
use scorers::builtin_registry;
use serde_json::json;

/// 4-character blocks; the filter and the prefix scorer in one profile, random picks.
/// The scorer's load discount is off so its scores are the raw match ratios the filter
/// compares with its threshold (pending picks would otherwise lower them).
fn scheduler(filter_parameters: &str) -> Scheduler {
    let yaml = format!(
        "plugins:
- type: prefix-cache-scorer
  parameters: {{blockSize: 4, affinityLoadTolerance: 0}}
- type: prefix-cache-affinity-filter
  parameters: {filter_parameters}
- type: random-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-affinity-filter
  - pluginRef: prefix-cache-scorer
  - pluginRef: random-picker
"
    );
    EndpointPickerConfig::from_yaml(&yaml).unwrap().build(&builtin_registry()).unwrap()
}

/// Schedules `prompt` with `seed`; returns the candidates left by the filter, the prefix
/// scores of those candidates, and the picked pool position. Waits for the pick's record.
fn decide(
    scheduler: &Scheduler,
    pool: &Arc<PoolSnapshot>,
    prompt: &str,
    seed: u64,
) -> (Vec<u32>, Vec<f64>, u16) {
    let options = ScheduleOptions { explain: true, seed: Some(seed), ..Default::default() };
    let result =
        scheduler.schedule_with(&InferenceRequest::new("llama", prompt), pool, options).unwrap();
    scheduler.flush();
    let profile = &result.explanation().unwrap()[0];
    let port = result.primary().endpoint.address.port() - 8000;
    (profile.candidates.clone(), profile.scorers[0].2.clone(), port)
}

#[test]
fn keeps_only_sticky_endpoints_once_one_holds_the_prompt() {
    let scheduler = scheduler("{}");
    let pool = common::pool(&[(0, 0.0); 4]);
    let prompt = "aaaabbbbccccdddd";
    let (candidates, _, first) = decide(&scheduler, &pool, prompt, 1);
    assert_eq!(candidates, [0, 1, 2, 3], "nothing cached: no endpoint is sticky, all kept");
    for seed in 2..12 {
        let (candidates, scores, picked) = decide(&scheduler, &pool, prompt, seed);
        assert_eq!(candidates, [u32::from(first)], "seed {seed}");
        assert_eq!((scores, picked), (vec![1.0], first));
    }
    // 3 of 5 blocks (0.6) is below the default 0.80: every endpoint stays.
    let (candidates, _, _) = decide(&scheduler, &pool, "aaaabbbbcccczzzzyyyy", 20);
    assert_eq!(candidates.len(), 4);
}

#[test]
fn threshold_zero_and_full_exploration_keep_everything() {
    let pool = common::pool(&[(0, 0.0); 3]);
    for parameters in ["{affinityThreshold: 0}", "{explorationProbability: 1.0}"] {
        let scheduler = scheduler(parameters);
        decide(&scheduler, &pool, "aaaabbbb", 1);
        let (candidates, _, _) = decide(&scheduler, &pool, "aaaabbbb", 2);
        assert_eq!(candidates, [0, 1, 2], "{parameters}");
    }
    // A lower threshold makes a partial match sticky: 2 of 4 blocks.
    let scheduler = scheduler("{affinityThreshold: 0.5}");
    let (_, _, first) = decide(&scheduler, &pool, "aaaabbbb", 1);
    let (candidates, _, _) = decide(&scheduler, &pool, "aaaabbbbzzzzyyyy", 2);
    assert_eq!(candidates, [u32::from(first)]);
}

// plugin.go's TTFT load gate: TTFT = in-flight tokens / peakPrefillThroughput * 1000 ms; the
// sticky endpoints are dropped from consideration no more when the best of them is slower
// than the best other one by more than maxTTFTPenaltyMs.
#[test]
fn the_ttft_gate_breaks_stickiness_when_the_sticky_endpoint_is_loaded() {
    // 1000 tokens a second: an endpoint's TTFT in ms is its in-flight token count.
    let scheduler = scheduler("{maxTTFTPenaltyMs: 1000, peakPrefillThroughput: 1000}");
    let pool = common::pool(&[(0, 0.0); 3]);
    let prompt = "aaaabbbbccccdddd";
    let (_, _, first) = decide(&scheduler, &pool, prompt, 1);
    // A 4000-character prompt (1000 tokens) in flight on the sticky endpoint: 1000 ms more
    // than an idle one, not more than the penalty; stickiness holds.
    let on_first = |chars: usize, seed: u64| {
        let request = InferenceRequest::new("llama", format!("{prompt}{}", "x".repeat(chars)))
            .with_request_id("load");
        let mut result = scheduler
            .schedule_with(
                &request,
                &pool,
                ScheduleOptions { seed: Some(seed), ..Default::default() },
            )
            .unwrap();
        assert_eq!(result.primary().endpoint.address.port() - 8000, first, "sticky");
        result.take_completion().unwrap()
    };
    let held = on_first(4000 - prompt.len(), 2);
    scheduler.flush();
    let (candidates, _, _) = decide(&scheduler, &pool, prompt, 3);
    assert_eq!(candidates, [u32::from(first)]);
    // One token more and the gate opens: every endpoint is a candidate.
    let more = on_first(4, 4);
    scheduler.flush();
    let (candidates, _, spread_to) = decide(&scheduler, &pool, prompt, 5);
    assert_eq!(candidates, [0, 1, 2]);
    // Their prefill over, the load no longer counts.
    drop((held, more));
    // (The pick made while the gate was open holds the prompt too.)
    let mut sticky = vec![u32::from(first), u32::from(spread_to)];
    sticky.sort_unstable();
    sticky.dedup();
    let (candidates, _, _) = decide(&scheduler, &pool, prompt, 6);
    assert_eq!(candidates, sticky);
    // A penalty of 0 turns the gate off, and then no in-flight producer is needed.
    let yaml = "plugins:\n- type: prefix-cache-affinity-filter\n  parameters: {maxTTFTPenaltyMs: 0, inFlightLoadProducerName: none}\n";
    assert!(EndpointPickerConfig::from_yaml(yaml).unwrap().build(&builtin_registry()).is_ok());
    let yaml = "plugins:\n- type: prefix-cache-affinity-filter\n  parameters: {inFlightLoadProducerName: none}\n";
    assert!(EndpointPickerConfig::from_yaml(yaml).unwrap().build(&builtin_registry()).is_err());
}

#[test]
fn without_a_prefix_scorer_the_filter_keeps_everything() {
    let yaml = "plugins:\n- type: prefix-cache-affinity-filter\n- type: random-picker\n";
    let scheduler =
        EndpointPickerConfig::from_yaml(yaml).unwrap().build(&builtin_registry()).unwrap();
    let pool = common::pool(&[(0, 0.0); 3]);
    for seed in 0..3 {
        let options = ScheduleOptions { explain: true, seed: Some(seed), ..Default::default() };
        let result = scheduler
            .schedule_with(&InferenceRequest::new("llama", "aaaabbbb"), &pool, options)
            .unwrap();
        assert_eq!(result.explanation().unwrap()[0].candidates, [0, 1, 2]);
    }
}

#[test]
fn parameters_are_validated_as_in_go() {
    let build = |parameters: serde_json::Value| {
        let spec = PluginSpec {
            name: "f",
            type_name: "prefix-cache-affinity-filter",
            parameters: Some(&parameters),
        };
        builtin_registry().create(&spec).map(|_| ()).map_err(|error| error.to_string())
    };
    assert!(build(json!({})).is_ok());
    assert!(
        build(json!({"affinityThreshold": 0.8, "explorationProbability": 0.01, "maxTTFTPenaltyMs": 5000, "ttftSource": "prefillThroughput"}))
            .is_ok()
    );
    assert!(build(json!({"ttftSource": "latencyPredictor", "peakPrefillThroughput": 0})).is_ok());
    assert!(build(json!({"maxTTFTPenaltyMs": 0, "peakPrefillThroughput": 0})).is_ok());
    for (parameters, name) in [
        (json!({"affinityThreshold": 1.5}), "affinityThreshold"),
        (json!({"explorationProbability": -0.1}), "explorationProbability"),
        (json!({"explorationProbability": 2}), "explorationProbability"),
        (json!({"maxTTFTPenaltyMs": -1}), "maxTTFTPenaltyMs"),
        (json!({"peakPrefillThroughput": -1}), "peakPrefillThroughput"),
        (json!({"peakPrefillThroughput": 0}), "peakPrefillThroughput"),
        (json!({"ttftSource": "guess"}), "ttftSource"),
        (json!({"threshold": 0.5}), "threshold"),
    ] {
        let error = build(parameters).unwrap_err();
        assert!(error.contains(name), "{name}: {error}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    #[test]
    fn filter_only_removes_and_keeps_exactly_the_sticky(
        prompts in prop::collection::vec(prop::collection::vec(0u8..3, 1..6), 1..8),
        threshold in 0.1f64..1.0,
    ) {
        let scheduler = scheduler(&format!("{{affinityThreshold: {threshold}}}"));
        let pool = common::pool(&[(0, 0.0); 4]);
        for (seed, blocks) in prompts.iter().enumerate() {
            // Each symbol is one 4-character block.
            let prompt: String = blocks.iter().map(|&b| ["aaaa", "bbbb", "cccc"][b as usize]).collect();
            let (candidates, scores, picked) = decide(&scheduler, &pool, &prompt, seed as u64);
            prop_assert!(!candidates.is_empty());
            prop_assert!(candidates.windows(2).all(|pair| pair[0] < pair[1]));
            prop_assert!(candidates.iter().all(|&index| index < 4));
            prop_assert!(candidates.contains(&u32::from(picked)));
            prop_assert!(scores.iter().all(|score| (0.0..=1.0).contains(score)));
            // Narrowed means every kept candidate is sticky.
            if candidates.len() < 4 {
                prop_assert!(scores.iter().all(|&score| score >= threshold));
            }
        }
    }
}
