//! The multi-cluster scorers over the pool averages `multicluster-metrics-extractor`
//! publishes: llm-d's formulas, unscored clusters, the load-time check for the extractor,
//! and the unit-interval property.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::pool;
use proptest::prelude::*;
use scheduler_core::data_layer::plugins::{
    MULTICLUSTER_KV_CACHE_UTILIZATION_ATTRIBUTE, MULTICLUSTER_QUEUE_SIZE_ATTRIBUTE,
};
use scheduler_core::{
    EndpointAttributes, EndpointPickerConfig, InferenceRequest, PoolSnapshot, ScheduleOptions,
    Scheduler,
};
use scorers::builtin_registry;

/// A scheduler whose only scorer is `scorer`, and the extractor's attributes it reads.
fn build(scorer: &str) -> (Scheduler, Arc<EndpointAttributes>) {
    let yaml = format!(
        "plugins:
- {{type: multicluster-metrics-data-source, name: peers}}
- {{type: multicluster-metrics-extractor, name: averages}}
- {{type: {scorer}, name: scorer}}
- {{type: max-score-picker, parameters: {{maxNumOfEndpoints: 16}}}}
dataLayer:
  sources:
  - pluginRef: peers
    extractors: [{{pluginRef: averages}}]
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: scorer
  - pluginRef: max-score-picker
"
    );
    let mut registry = builtin_registry();
    registry.allow_experimental_plugins(true);
    let config = EndpointPickerConfig::from_yaml(&yaml).unwrap();
    let plugins = config.construct_plugins(&registry).unwrap();
    let scheduler = config.build_with(&plugins, &registry).unwrap();
    let shared = plugins.get("averages").unwrap().plugin.shared.clone().unwrap();
    (scheduler.with_seed(5), shared.downcast::<EndpointAttributes>().unwrap())
}

fn publish(
    attributes: &EndpointAttributes,
    name: &str,
    pool: &PoolSnapshot,
    values: &[Option<f64>],
) {
    let published: HashMap<_, _> = pool
        .endpoints()
        .iter()
        .zip(values)
        .filter_map(|(endpoint, value)| Some((endpoint.id(), (*value)?)))
        .collect();
    attributes.publish(name, published);
}

fn scores(scheduler: &Scheduler, pool: &Arc<PoolSnapshot>) -> Vec<f64> {
    let options = ScheduleOptions { explain: true, ..Default::default() };
    let result = scheduler.schedule_with(&InferenceRequest::new("m", "p"), pool, options);
    result.unwrap().explanation().unwrap()[0].scorers[0].2.clone()
}

#[test]
fn kv_cache_scores_one_minus_utilization_and_leaves_unknown_clusters_unscored() {
    let (scheduler, attributes) = build("multicluster-kv-cache-utilization-scorer");
    let pool = pool(&[(0, 0.0); 4]);
    assert_eq!(scores(&scheduler, &pool), vec![0.0; 4], "nothing published yet");
    let values = [Some(0.25), Some(0.9), None, Some(0.0)];
    publish(&attributes, MULTICLUSTER_KV_CACHE_UTILIZATION_ATTRIBUTE, &pool, &values);
    assert_eq!(scores(&scheduler, &pool), vec![0.75, 1.0 - 0.9, 0.0, 1.0]);
    // The scrape's own KV figure is not what it reads.
    let busy_pods = common::pool(&[(0, 1.0); 4]);
    publish(&attributes, MULTICLUSTER_KV_CACHE_UTILIZATION_ATTRIBUTE, &busy_pods, &values);
    assert_eq!(scores(&scheduler, &busy_pods)[0], 0.75);
}

#[test]
fn queue_scores_are_min_max_inverted_and_equal_queues_score_one() {
    let (scheduler, attributes) = build("multicluster-queue-scorer");
    let pool = pool(&[(0, 0.0); 4]);
    let values = [Some(2.0), Some(10.0), None, Some(6.0)];
    publish(&attributes, MULTICLUSTER_QUEUE_SIZE_ATTRIBUTE, &pool, &values);
    assert_eq!(scores(&scheduler, &pool), vec![1.0, 0.0, 0.0, 0.5]);
    publish(
        &attributes,
        MULTICLUSTER_QUEUE_SIZE_ATTRIBUTE,
        &pool,
        &[Some(3.0), Some(3.0), None, None],
    );
    assert_eq!(scores(&scheduler, &pool), vec![1.0, 1.0, 0.0, 0.0]);
}

#[test]
fn parameters_are_refused_and_the_extractor_is_required() {
    let mut registry = builtin_registry();
    registry.allow_experimental_plugins(true);
    for scorer in ["multicluster-queue-scorer", "multicluster-kv-cache-utilization-scorer"] {
        let yaml = format!("plugins:\n- {{type: {scorer}, parameters: {{weight: 2}}}}\n");
        let error = EndpointPickerConfig::from_yaml(&yaml)
            .unwrap()
            .construct_plugins(&registry)
            .unwrap_err()
            .to_string();
        assert!(error.contains("weight"), "{error}");
        let yaml = format!("plugins:\n- {{type: {scorer}}}\n- {{type: max-score-picker}}\n");
        let error = EndpointPickerConfig::from_yaml(&yaml)
            .unwrap()
            .construct_plugins(&registry)
            .unwrap_err()
            .to_string();
        assert!(error.contains("multicluster-metrics-extractor"), "{error}");
    }
    let error = EndpointPickerConfig::from_yaml("plugins:\n- {type: multicluster-queue-scorer}\n")
        .unwrap()
        .build(&builtin_registry())
        .unwrap_err()
        .to_string();
    assert!(error.contains("--allow-experimental-plugins"), "{error}");
}

fn value() -> impl Strategy<Value = Option<f64>> {
    prop_oneof![Just(None), (-5.0f64..50.0).prop_map(Some)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn scores_stay_in_the_unit_interval_and_the_shortest_queue_scores_one(
        queues in proptest::collection::vec(value(), 1..16),
        utilizations in proptest::collection::vec(value(), 16),
    ) {
        let pool = pool(&vec![(0, 0.0); queues.len()]);
        let (queue_scheduler, queue_attributes) = build("multicluster-queue-scorer");
        publish(&queue_attributes, MULTICLUSTER_QUEUE_SIZE_ATTRIBUTE, &pool, &queues);
        let queue_scores = scores(&queue_scheduler, &pool);
        prop_assert!(queue_scores.iter().all(|s| (0.0..=1.0).contains(s)), "{queue_scores:?}");
        let shortest = queues.iter().flatten().copied().fold(f64::INFINITY, f64::min);
        for (score, queue) in queue_scores.iter().zip(&queues) {
            match queue {
                None => prop_assert_eq!(*score, 0.0),
                Some(queue) if *queue == shortest => prop_assert_eq!(*score, 1.0),
                Some(_) => {}
            }
        }

        let (kv_scheduler, kv_attributes) = build("multicluster-kv-cache-utilization-scorer");
        publish(&kv_attributes, MULTICLUSTER_KV_CACHE_UTILIZATION_ATTRIBUTE, &pool, &utilizations);
        let kv_scores = scores(&kv_scheduler, &pool);
        prop_assert!(kv_scores.iter().all(|s| (0.0..=1.0).contains(s)), "{kv_scores:?}");
    }
}
