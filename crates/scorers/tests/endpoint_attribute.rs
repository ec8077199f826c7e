//! `endpoint-attribute-filter` and `endpoint-attribute-scorer` reading the attributes
//! `dcgm-extractor` publishes: llm-d's formulas, their parameter errors, and properties.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::pool;
use proptest::prelude::*;
use scheduler_core::{
    EndpointAttributes, EndpointPickerConfig, InferenceRequest, PoolSnapshot, ScheduleOptions,
    Scheduler,
};
use scorers::builtin_registry;

struct Built {
    scheduler: Scheduler,
    attributes: Arc<EndpointAttributes>,
}

/// A config with the DCGM source and extractor and `profile` (YAML list items) as the
/// profile's plugins, `declared` as further plugins.
fn build(declared: &str, profile: &str) -> Result<Built, String> {
    let yaml = format!(
        "plugins:
- {{type: dcgm-data-source, name: dcgm-source}}
- {{type: dcgm-extractor, name: dcgm-extractor}}
- type: max-score-picker
  parameters: {{maxNumOfEndpoints: 16}}
{declared}
dataLayer:
  sources:
  - pluginRef: dcgm-source
    extractors:
    - pluginRef: dcgm-extractor
schedulingProfiles:
- name: default
  plugins:
{profile}
  - pluginRef: max-score-picker
"
    );
    let mut registry = builtin_registry();
    registry.allow_experimental_plugins(true);
    let config = EndpointPickerConfig::from_yaml(&yaml).map_err(|e| e.to_string())?;
    let plugins = config.construct_plugins(&registry).map_err(|e| e.to_string())?;
    let scheduler = config.build_with(&plugins, &registry).map_err(|e| e.to_string())?;
    let shared = plugins.get("dcgm-extractor").unwrap().plugin.shared.clone().unwrap();
    let attributes = shared.downcast::<EndpointAttributes>().unwrap();
    Ok(Built { scheduler: scheduler.with_seed(3), attributes })
}

/// Publishes `values` (None: no value) for the pool's endpoints in order.
fn publish(built: &Built, pool: &PoolSnapshot, values: &[Option<f64>]) {
    let published: HashMap<_, _> = pool
        .endpoints()
        .iter()
        .zip(values)
        .filter_map(|(endpoint, value)| Some((endpoint.id(), (*value)?)))
        .collect();
    built.attributes.publish("GPUUtilization", published);
}

fn filter(parameters: &str) -> String {
    format!("- type: endpoint-attribute-filter\n  parameters: {parameters}")
}

fn scorer(parameters: &str) -> String {
    format!("- type: endpoint-attribute-scorer\n  parameters: {parameters}")
}

/// The ports of the endpoints ranked, by pool position.
fn kept(built: &Built, pool: &Arc<PoolSnapshot>) -> Option<Vec<u16>> {
    let result = built.scheduler.schedule(&InferenceRequest::new("m", "p"), pool).ok()?;
    let mut ranked: Vec<u16> = result.ranked().map(|e| e.endpoint.address.port() - 8000).collect();
    ranked.sort_unstable();
    Some(ranked)
}

fn scores(built: &Built, pool: &Arc<PoolSnapshot>) -> Vec<f64> {
    let options = ScheduleOptions { explain: true, ..Default::default() };
    let result = built.scheduler.schedule_with(&InferenceRequest::new("m", "p"), pool, options);
    result.unwrap().explanation().unwrap()[0].scorers[0].2.clone()
}

const GPU_FILTER: &str = "{attribute: GPUUtilization, producer: dcgm-extractor, algorithm: {type: threshold, threshold: {operator: LessThanOrEqual, value: 0.9}}";

#[test]
fn the_filter_keeps_values_within_the_threshold() {
    let pool = pool(&[(0, 0.0); 3]);
    let pass =
        build(&filter(&format!("{GPU_FILTER}}}")), "  - pluginRef: endpoint-attribute-filter")
            .unwrap();
    publish(&pass, &pool, &[Some(0.5), Some(0.95), None]);
    assert_eq!(kept(&pass, &pool), Some(vec![0, 2]), "missing values pass by default");

    let fail = build(
        &filter(&format!("{GPU_FILTER}, onMissing: Fail}}")),
        "  - pluginRef: endpoint-attribute-filter",
    )
    .unwrap();
    publish(&fail, &pool, &[Some(0.5), Some(0.95), None]);
    assert_eq!(kept(&fail, &pool), Some(vec![0]));

    // Nothing passes: refused, unless the filter falls back to every candidate.
    publish(&fail, &pool, &[Some(0.91), Some(0.95), None]);
    assert_eq!(kept(&fail, &pool), None);
    let fallback = build(
        &filter(&format!("{GPU_FILTER}, onMissing: Fail, fallbackOnEmpty: true}}")),
        "  - pluginRef: endpoint-attribute-filter",
    )
    .unwrap();
    publish(&fallback, &pool, &[Some(0.91), Some(0.95), None]);
    assert_eq!(kept(&fallback, &pool), Some(vec![0, 1, 2]));
}

#[test]
fn the_scorer_normalizes_linearly() {
    let pool = pool(&[(0, 0.0); 4]);
    let fixed = build(
        &scorer("{attributeKey: GPUUtilization, producer: dcgm-extractor, algorithm: {type: linear_lower_is_better, normalization: {fixedRange: {min: 0.0, max: 1.0}}}}"),
        "  - pluginRef: endpoint-attribute-scorer",
    )
    .unwrap();
    publish(&fixed, &pool, &[Some(0.25), Some(1.5), None, Some(-1.0)]);
    assert_eq!(scores(&fixed, &pool), vec![0.75, 0.0, 0.0, 1.0], "clamped, inverted, missing 0");

    let adaptive = build(
        &scorer("{attributeKey: GPUUtilization, producer: dcgm-extractor, algorithm: {type: linear_higher_is_better}}"),
        "  - pluginRef: endpoint-attribute-scorer",
    )
    .unwrap();
    publish(&adaptive, &pool, &[Some(2.0), Some(4.0), Some(6.0), None]);
    assert_eq!(scores(&adaptive, &pool), vec![0.0, 0.5, 1.0, 0.0]);
    publish(&adaptive, &pool, &[Some(3.0), Some(3.0), None, None]);
    assert_eq!(scores(&adaptive, &pool), vec![1.0, 1.0, 0.0, 0.0], "equal values are neutral");
    // Nothing published yet scores 0 everywhere.
    let fresh = build(
        &scorer("{attributeKey: GPUUtilization, producer: dcgm-extractor, algorithm: {type: linear_higher_is_better}}"),
        "  - pluginRef: endpoint-attribute-scorer",
    )
    .unwrap();
    assert_eq!(scores(&fresh, &pool), vec![0.0; 4]);
}

#[test]
fn bad_parameters_are_named() {
    for (plugin, named) in [
        (
            filter(
                "{producer: dcgm-extractor, algorithm: {type: threshold, threshold: {operator: Equal}}}",
            ),
            "non-empty attribute",
        ),
        (
            filter(
                "{attribute: GPUUtilization/dcgm-extractor, algorithm: {type: threshold, threshold: {operator: Equal}}}",
            ),
            "producer: 'dcgm-extractor'",
        ),
        (
            filter(
                "{attribute: A, producer: nowhere, algorithm: {type: threshold, threshold: {operator: Equal}}}",
            ),
            "'nowhere'",
        ),
        (
            filter(
                "{attribute: A, producer: max-score-picker, algorithm: {type: threshold, threshold: {operator: Equal}}}",
            ),
            "'max-score-picker'",
        ),
        (
            filter("{attribute: A, algorithm: {type: threshold, threshold: {operator: Around}}}"),
            "Around",
        ),
        (filter("{attribute: A, algorithm: {type: percentile}}"), "algorithm.type"),
        (filter("{attribute: A, algorithm: {type: threshold}}"), "algorithm.threshold"),
        (
            filter(
                "{attribute: A, onMissing: Drop, algorithm: {type: threshold, threshold: {operator: Equal}}}",
            ),
            "onMissing",
        ),
        (scorer("{attributeKey: A, algorithm: {type: cubic}}"), "algorithm.type"),
        (
            scorer(
                "{attributeKey: A, algorithm: {type: linear_lower_is_better, normalization: {fixedRange: {min: 1, max: 1}}}}",
            ),
            "min < max",
        ),
        (
            scorer(
                "{attributeKey: A, algorithm: {type: linear_lower_is_better, normalization: {fixedRange: {min: 0, max: 1}, adaptiveRange: {}}}}",
            ),
            "not both",
        ),
    ] {
        let error = build(&plugin, "").err().unwrap_or_else(|| panic!("{plugin} was accepted"));
        assert!(error.contains(named), "{plugin}: {error}");
    }
    // Without the experimental flag, refused by name.
    let error = EndpointPickerConfig::from_yaml("plugins:\n- type: endpoint-attribute-scorer\n")
        .unwrap()
        .build(&builtin_registry())
        .unwrap_err()
        .to_string();
    assert!(error.contains("--allow-experimental-plugins"), "{error}");
}

fn value() -> impl Strategy<Value = Option<f64>> {
    prop_oneof![Just(None), (-2.0f64..3.0).prop_map(Some)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn scores_stay_in_the_unit_interval_and_the_filter_only_removes(
        values in proptest::collection::vec(value(), 1..16),
        lower in any::<bool>(),
        fixed in any::<bool>(),
        threshold in -1.0f64..2.0,
        fallback in any::<bool>(),
    ) {
        let pool = pool(&vec![(0, 0.0); values.len()]);
        let kind = if lower { "linear_lower_is_better" } else { "linear_higher_is_better" };
        let normalization = if fixed { "{fixedRange: {min: 0.0, max: 1.0}}" } else { "{adaptiveRange: {}}" };
        let scored = build(
            &scorer(&format!("{{attributeKey: GPUUtilization, producer: dcgm-extractor, algorithm: {{type: {kind}, normalization: {normalization}}}}}")),
            "  - pluginRef: endpoint-attribute-scorer",
        ).unwrap();
        publish(&scored, &pool, &values);
        let scores = scores(&scored, &pool);
        prop_assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)), "{scores:?}");

        let filtered = build(
            &filter(&format!("{{attribute: GPUUtilization, producer: dcgm-extractor, onMissing: Fail, fallbackOnEmpty: {fallback}, algorithm: {{type: threshold, threshold: {{operator: LessThan, value: {threshold}}}}}}}")),
            "  - pluginRef: endpoint-attribute-filter",
        ).unwrap();
        publish(&filtered, &pool, &values);
        let expected: Vec<u16> = values.iter().enumerate()
            .filter(|(_, v)| v.is_some_and(|v| v < threshold))
            .map(|(i, _)| i as u16).collect();
        match kept(&filtered, &pool) {
            Some(kept) if expected.is_empty() => {
                prop_assert!(fallback);
                prop_assert_eq!(kept.len(), values.len());
            }
            Some(kept) => prop_assert_eq!(kept, expected),
            None => prop_assert!(expected.is_empty() && !fallback),
        }
    }
}
