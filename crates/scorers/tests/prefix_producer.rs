//! `approx-prefix-cache-producer`: llm-d's parameters and defaults, and the scorers and filters
//! that read a declared producer's matches (`prefixMatchInfoProducerName`).

mod common;

use std::sync::Arc;

use common::pool;
use scheduler_core::{
    ConstructedPlugins, EndpointPickerConfig, InferenceRequest, PoolSnapshot, ScheduleOptions,
    Scheduler,
};
use scorers::{ApproxPrefixParameters, PrefixSource, builtin_registry};

/// llm-d's smallest block: 64 tokens, 256 characters here.
const BLOCK: usize = 256;

fn settings(parameters: serde_json::Value) -> Result<(usize, usize, usize), String> {
    let parameters: ApproxPrefixParameters =
        serde_json::from_value(parameters).map_err(|e| e.to_string())?;
    let resolved = parameters.resolve().map_err(|e| e.to_string())?;
    Ok((resolved.block_size, resolved.max_blocks, resolved.capacity))
}

#[test]
fn parameters_follow_llm_d_defaults_and_floor() {
    // blockSizeTokens 16 raised to 64 tokens; 131072 tokens / 64 = 2048 blocks.
    assert_eq!(settings(serde_json::json!({})).unwrap(), (BLOCK, 2048, 31_250));
    assert_eq!(settings(serde_json::json!({"blockSizeTokens": 16})).unwrap().0, BLOCK);
    assert_eq!(
        settings(serde_json::json!({"blockSizeTokens": 128, "lruCapacityPerServer": 7})).unwrap(),
        (512, 1024, 7)
    );
    // The token cap wins over the block cap; with it at 0 the block cap applies.
    assert_eq!(
        settings(serde_json::json!({"maxPrefixTokensToMatch": 16384, "maxPrefixBlocksToMatch": 3}))
            .unwrap()
            .1,
        256
    );
    assert_eq!(
        settings(serde_json::json!({"maxPrefixTokensToMatch": 0, "maxPrefixBlocksToMatch": 3}))
            .unwrap()
            .1,
        3
    );
    // Both caps 0: the whole prompt.
    let whole =
        settings(serde_json::json!({"maxPrefixTokensToMatch": 0, "maxPrefixBlocksToMatch": 0}))
            .unwrap()
            .1;
    assert!(whole >= 1 << 20, "{whole}");
    // The deprecated character-free `blockSize` fills in a default `blockSizeTokens` only.
    assert_eq!(settings(serde_json::json!({"blockSize": 100})).unwrap().0, 400);
    assert_eq!(
        settings(serde_json::json!({"blockSize": 100, "blockSizeTokens": 80})).unwrap().0,
        320
    );
    // `autoTune` is accepted.
    assert!(settings(serde_json::json!({"autoTune": false})).is_ok());
}

#[test]
fn bad_parameters_are_named() {
    for (parameters, named) in [
        (serde_json::json!({"blockSizeTokens": 0}), "blockSizeTokens"),
        (serde_json::json!({"lruCapacityPerServer": 0}), "lruCapacityPerServer"),
        (serde_json::json!({"maxPrefixTokensToMatch": 10}), "maxPrefixTokensToMatch"),
        (serde_json::json!({"hashBlockSize": 4}), "hashBlockSize"),
    ] {
        let error = settings(parameters.clone()).unwrap_err();
        assert!(error.contains(named), "{parameters}: {error}");
    }
}

struct Built {
    scheduler: Scheduler,
    plugins: ConstructedPlugins,
}

fn build(yaml: &str) -> Result<Built, String> {
    let registry = builtin_registry();
    let config = EndpointPickerConfig::from_yaml(yaml).map_err(|e| e.to_string())?;
    let plugins = config.construct_plugins(&registry).map_err(|e| e.to_string())?;
    let scheduler = config.build_with(&plugins, &registry).map_err(|e| e.to_string())?;
    Ok(Built { scheduler: scheduler.with_seed(11), plugins })
}

fn source(built: &Built, name: &str) -> Arc<PrefixSource> {
    let shared = built.plugins.get(name).unwrap().plugin.shared.clone().unwrap();
    shared.downcast::<PrefixSource>().unwrap()
}

/// `blocks` blocks of distinct text.
fn prompt(blocks: usize, seed: char) -> String {
    (0..blocks).map(|i| format!("{seed}{i:0>width$}", width = BLOCK - 1)).collect()
}

/// The pick and the scores of the profile's first scorer.
fn decide(built: &Built, pool: &Arc<PoolSnapshot>, prompt: &str) -> (usize, Vec<f64>) {
    let request = InferenceRequest::new("m", prompt);
    let options = ScheduleOptions { explain: true, ..Default::default() };
    let result = built.scheduler.schedule_with(&request, pool, options).unwrap();
    built.scheduler.flush();
    let scores = result.explanation().unwrap()[0].scorers[0].2.clone();
    (usize::from(result.primary().endpoint.address.port() - 8000), scores)
}

/// llm-d-router's `deploy/config/sim-epp-config.yaml`, scorer declared before the producer.
/// The tests below check exact match ratios while earlier picks are still in flight, so the
/// scorers use GIE's formula (`affinityLoadTolerance: 0`, no load discount).
const SIM_EPP: &str = "
plugins:
- type: prefix-cache-scorer
  parameters: {affinityLoadTolerance: 0}
- type: approx-prefix-cache-producer
  parameters:
    maxPrefixTokensToMatch: 16384
    lruCapacityPerServer: 31250
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
    weight: 2
  - pluginRef: max-score-picker
";

#[test]
fn a_bare_scorer_reads_the_producer_declared_under_the_default_name() {
    let built = build(SIM_EPP).unwrap();
    let pool = pool(&[(0, 0.0), (0, 0.0), (0, 0.0)]);
    let text = prompt(4, 'a');
    let (first, scores) = decide(&built, &pool, &text);
    assert_eq!(scores, vec![0.0; 3]);

    let producer = source(&built, "approx-prefix-cache-producer").producer().unwrap().clone();
    let scorer = source(&built, "prefix-cache-scorer");
    assert!(Arc::ptr_eq(scorer.producer().unwrap(), &producer), "the scorer shares the index");
    let endpoint = pool.get(first as u32).unwrap().id();
    assert_eq!(producer.index().blocks_of(endpoint).len(), 4);
    // Recorded once, by the producer: the scorer does not record the same pick again.
    assert_eq!(producer.writer().applied() + producer.writer().coalesced(), 1);

    // Half the prompt shared: half the score, on the endpoint that holds it.
    let half = format!("{}{}", &text[..2 * BLOCK], prompt(2, 'z'));
    let (pick, scores) = decide(&built, &pool, &half);
    assert_eq!(pick, first);
    assert_eq!(scores[first], 0.5);
}

#[test]
fn named_producers_keep_separate_indexes() {
    let yaml = "
plugins:
- name: gpu
  type: approx-prefix-cache-producer
- name: cpu
  type: approx-prefix-cache-producer
  parameters: {blockSizeTokens: 128}
- name: gpu-scorer
  type: prefix-cache-scorer
  parameters: {prefixMatchInfoProducerName: gpu, affinityLoadTolerance: 0}
- name: cpu-scorer
  type: prefix-cache-scorer
  parameters: {prefixMatchInfoProducerName: cpu, affinityLoadTolerance: 0}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: gpu-scorer
  - pluginRef: cpu-scorer
  - pluginRef: max-score-picker
";
    let built = build(yaml).unwrap();
    let pool = pool(&[(0, 0.0), (0, 0.0)]);
    let text = prompt(4, 'q');
    let (first, _) = decide(&built, &pool, &text);
    let endpoint = pool.get(first as u32).unwrap().id();
    let gpu = source(&built, "gpu").producer().unwrap().clone();
    let cpu = source(&built, "cpu").producer().unwrap().clone();
    assert!(!Arc::ptr_eq(&gpu, &cpu));
    assert_eq!(gpu.index().blocks_of(endpoint).len(), 4, "256-character blocks");
    assert_eq!(cpu.index().blocks_of(endpoint).len(), 2, "512-character blocks");
    assert!(Arc::ptr_eq(source(&built, "gpu-scorer").producer().unwrap(), &gpu));
    assert!(Arc::ptr_eq(source(&built, "cpu-scorer").producer().unwrap(), &cpu));

    // Three of four small blocks match, one of two large ones: each scorer reads its own.
    let partial = format!("{}{}", &text[..3 * BLOCK], prompt(1, 'r'));
    let request = InferenceRequest::new("m", partial.as_str());
    let options = ScheduleOptions { explain: true, ..Default::default() };
    let result = built.scheduler.schedule_with(&request, &pool, options).unwrap();
    let scorers = &result.explanation().unwrap()[0].scorers;
    assert_eq!(scorers[0].2[first], 0.75);
    assert_eq!(scorers[1].2[first], 0.5);
}

#[test]
fn the_affinity_filter_reads_the_named_producer() {
    let yaml = "
plugins:
- name: warm
  type: approx-prefix-cache-producer
- type: prefix-cache-affinity-filter
  parameters: {prefixMatchInfoProducerName: warm, affinityThreshold: 0.5}
- type: random-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-affinity-filter
  - pluginRef: random-picker
";
    let built = build(yaml).unwrap();
    let pool = pool(&[(0, 0.0), (0, 0.0), (0, 0.0), (0, 0.0)]);
    let text = prompt(2, 'w');
    let request = InferenceRequest::new("m", text.as_str());
    let first = built.scheduler.schedule(&request, &pool).unwrap().primary().id();
    built.scheduler.flush();
    // A random picker would wander; the filter keeps only the endpoint holding the prompt.
    for _ in 0..20 {
        assert_eq!(built.scheduler.schedule(&request, &pool).unwrap().primary().id(), first);
    }
}

#[test]
fn broken_producer_references_are_refused_by_name() {
    let missing = "
plugins:
- type: prefix-cache-scorer
  parameters: {prefixMatchInfoProducerName: nowhere}
";
    let error = build(missing).err().unwrap();
    assert!(error.contains("prefixMatchInfoProducerName") && error.contains("nowhere"), "{error}");

    let not_a_producer = "
plugins:
- type: queue-scorer
- type: prefix-cache-affinity-filter
  parameters: {prefixMatchInfoProducerName: queue-scorer}
";
    let error = build(not_a_producer).err().unwrap();
    assert!(error.contains("queue-scorer"), "{error}");

    let both = "
plugins:
- type: approx-prefix-cache-producer
- type: prefix-cache-scorer
  parameters: {prefixMatchInfoProducerName: approx-prefix-cache-producer, blockSize: 64}
";
    let error = build(both).err().unwrap();
    assert!(error.contains("belong to the producer"), "{error}");
}

#[test]
fn a_scorer_with_index_parameters_keeps_an_index_of_its_own() {
    let yaml = "
plugins:
- type: approx-prefix-cache-producer
- type: prefix-cache-scorer
  parameters: {blockSize: 64}
";
    let built = build(yaml).unwrap();
    let producer = source(&built, "approx-prefix-cache-producer").producer().unwrap().clone();
    let own = source(&built, "prefix-cache-scorer").producer().unwrap().clone();
    assert!(!Arc::ptr_eq(&producer, &own));
    assert_eq!(own.block_size(), 64);
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    const LINKED: &str = "
plugins:
- type: approx-prefix-cache-producer
  parameters: {maxPrefixTokensToMatch: 512}
- type: prefix-cache-scorer
  parameters: {matchLengthWeight: 0.5, matchLengthScaleTokens: 128}
- type: prefix-cache-affinity-filter
  parameters: {affinityThreshold: 0.3}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-affinity-filter
  - pluginRef: prefix-cache-scorer
  - pluginRef: max-score-picker
";

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Over any sequence of prompts sharing prefixes, the linked scorer's scores stay in
        /// [0, 1] and the pick is one of the pool's endpoints.
        #[test]
        fn linked_scores_stay_in_the_unit_interval(
            endpoints in 1usize..8,
            prompts in proptest::collection::vec((0usize..3, 0usize..6), 1..12),
        ) {
            let built = build(LINKED).unwrap();
            let pool = pool(&vec![(0, 0.0); endpoints]);
            let options = ScheduleOptions { explain: true, ..Default::default() };
            for (prefix, blocks) in prompts {
                let text = format!("{}{}", prompt(prefix + 1, 'p'), prompt(blocks, 's'));
                let request = InferenceRequest::new("m", text.as_str());
                let result = built.scheduler.schedule_with(&request, &pool, options).unwrap();
                built.scheduler.flush();
                prop_assert!(pool.index_of(result.primary().id()).is_some());
                for (_, _, scores) in &result.explanation().unwrap()[0].scorers {
                    prop_assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)), "{scores:?}");
                }
            }
        }
    }
}

/// Cross-replica sync hooks: a decision's record reaches the sink; a remote record reaches
/// the index without reaching the sink; every distinct index is listed once.
#[test]
fn record_sink_sees_local_records_and_remote_ones_are_indexed() {
    use parking_lot::Mutex;
    use scheduler_core::EndpointId;

    #[derive(Debug, Default)]
    struct Seen(Mutex<Vec<(EndpointId, usize)>>);
    impl scorers::RecordSink for Seen {
        fn recorded(&self, endpoint: EndpointId, hashes: &[u64]) {
            self.0.lock().push((endpoint, hashes.len()));
        }
    }

    let yaml = "
plugins:
- type: approx-prefix-cache-producer
- name: prefix
  type: prefix-cache-scorer
  parameters: {prefixMatchInfoProducerName: approx-prefix-cache-producer}
- type: max-score-picker
";
    let registry = builtin_registry();
    let config = EndpointPickerConfig::from_yaml(yaml).unwrap();
    let plugins = config.construct_plugins(&registry).unwrap();
    let producers = scorers::prefix_producers(&plugins);
    assert_eq!(producers.len(), 1, "the scorer shares the declared producer");
    let (name, producer) = &producers[0];
    assert_eq!(name, "approx-prefix-cache-producer");
    let seen = Arc::new(Seen::default());
    assert!(producer.set_record_sink(seen.clone()));
    assert!(!producer.set_record_sink(seen.clone()), "one sink");
    let scheduler = config.build_with(&plugins, &registry).unwrap();
    let pool = pool(&[(0, 0.0), (0, 0.0), (0, 0.0)]);
    let prompt = "z".repeat(3 * BLOCK);
    let result = scheduler
        .schedule_with(&InferenceRequest::new("m", prompt), &pool, ScheduleOptions::default())
        .unwrap();
    assert_eq!(*seen.0.lock(), [(result.primary().id(), 3)]);
    // A peer's record: indexed, not echoed to the sink.
    let other = pool.endpoints().iter().map(|s| s.id()).find(|&id| id != result.primary().id());
    let other = other.unwrap();
    assert!(producer.apply_remote(other, &[11, 12]));
    producer.writer().flush();
    assert!(producer.index().contains(other, 11));
    assert_eq!(seen.0.lock().len(), 1);
}
