//! Topology-aware disaggregation over real schedulers: the prefill pick stays near the decode
//! pick (and, prefill-first, the decode pick near the prefill pick), llm-d-router's
//! `deploy/config/pd-topology-epp-config.yaml` shape.

use std::sync::Arc;
use std::time::Instant;

use proptest::prelude::*;
use scheduler_core::{
    Candidates, CycleState, Endpoint, EndpointMetrics, EndpointPickerConfig, EndpointRole,
    EndpointState, InferenceRequest, PluginSpec, PoolSnapshot, Scheduler,
};
use scorers::disagg::PeerEndpoint;
use scorers::{builtin_registry, topology};

const HOST: &str = "kubernetes.io/hostname";
const ZONE: &str = "topology.kubernetes.io/zone";

fn build(yaml: &str) -> Scheduler {
    let config = EndpointPickerConfig::from_yaml(yaml).unwrap();
    let mut registry = builtin_registry();
    registry.allow_experimental_plugins(true);
    config.build(&registry).unwrap().with_seed(3)
}

/// An endpoint at 10.0.0.1:`port` in `role` on `host` in `zone`, with `waiting` queued.
fn endpoint(port: u16, role: EndpointRole, host: &str, zone: &str, waiting: u32) -> EndpointState {
    let mut endpoint = Endpoint::new(([10, 0, 0, 1], port).into()).with_role(role);
    for (key, value) in [(HOST, host), (ZONE, zone)] {
        if !value.is_empty() {
            endpoint.labels.insert(key.to_owned(), value.to_owned());
        }
    }
    EndpointState::new(endpoint).with_metrics(EndpointMetrics {
        waiting_queue: waiting,
        updated_at: Some(Instant::now()),
        ..EndpointMetrics::default()
    })
}

/// A P/D config whose prefill profile has `prefill_extra` beside the queue scorer.
fn config(order: &'static str, extractor: &str, prefill_extra: &str, decode_extra: &str) -> String {
    // Prefill-first takes no prefill decider: prefill always runs.
    let handler = match order {
        "prefill-first" => "{stageOrder: prefill-first}",
        _ => "{deciders: {prefill: always-disagg-pd-decider}}",
    };
    format!(
        "plugins:
- type: queue-scorer
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
{extractor}
- type: topology-affinity-filter
  parameters: {{minAffinity: zone}}
- type: topology-affinity-scorer
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters: {handler}
schedulingProfiles:
- name: prefill
  plugins: [{{pluginRef: prefill-filter}}, {{pluginRef: queue-scorer}}{prefill_extra}]
- name: decode
  plugins: [{{pluginRef: decode-filter}}, {{pluginRef: queue-scorer}}{decode_extra}]
"
    )
}

const WITH_EXTRACTOR: &str = "- type: topology-extractor";
const AFFINITY: &str =
    ", {pluginRef: topology-affinity-filter}, {pluginRef: topology-affinity-scorer, weight: 2}";

fn ports(scheduler: &Scheduler, pool: &Arc<PoolSnapshot>) -> (u16, Option<u16>) {
    let result = scheduler.schedule(&InferenceRequest::new("m", "hello"), pool).unwrap();
    (result.primary().endpoint.address.port(), result.prefill().map(|p| p.endpoint.address.port()))
}

#[test]
fn the_prefill_pick_prefers_the_decode_picks_host_over_a_shorter_queue() {
    let pool = Arc::new(PoolSnapshot::new([
        endpoint(1, EndpointRole::Decode, "node-a", "z1", 0),
        endpoint(2, EndpointRole::Prefill, "node-b", "z1", 0),
        endpoint(3, EndpointRole::Prefill, "node-a", "z1", 3),
        endpoint(4, EndpointRole::Prefill, "node-c", "z2", 0),
    ]));
    let near = build(&config("decode-first", WITH_EXTRACTOR, AFFINITY, ""));
    assert_eq!(ports(&near, &pool), (1, Some(3)), "same host beats an idle neighbour");

    // Without the extractor there is no topology: the queue alone decides, as in llm-d.
    let blind = build(&config("decode-first", "", AFFINITY, ""));
    assert!(matches!(ports(&blind, &pool), (1, Some(2 | 4))));
}

#[test]
fn the_filter_keeps_the_zone_and_gives_way_when_nothing_is_close() {
    // Only the filter: node-c's zone z2 is farther than minAffinity zone.
    let filter_only = ", {pluginRef: topology-affinity-filter}";
    let scheduler = build(&config("decode-first", WITH_EXTRACTOR, filter_only, ""));
    let pool = Arc::new(PoolSnapshot::new([
        endpoint(1, EndpointRole::Decode, "node-a", "z1", 0),
        endpoint(2, EndpointRole::Prefill, "node-b", "z1", 4),
        endpoint(3, EndpointRole::Prefill, "node-c", "z2", 0),
    ]));
    assert_eq!(ports(&scheduler, &pool), (1, Some(2)), "the idle prefill server is in z2");

    let far_only = Arc::new(PoolSnapshot::new([
        endpoint(1, EndpointRole::Decode, "node-a", "z1", 0),
        endpoint(3, EndpointRole::Prefill, "node-c", "z2", 0),
    ]));
    assert_eq!(ports(&scheduler, &far_only), (1, Some(3)), "affinity never fails a stage");
}

#[test]
fn prefill_first_the_decode_pick_follows_the_prefill_pick() {
    let scheduler = build(&config("prefill-first", WITH_EXTRACTOR, "", AFFINITY));
    let pool = Arc::new(PoolSnapshot::new([
        endpoint(1, EndpointRole::Prefill, "node-b", "z1", 0),
        endpoint(2, EndpointRole::Decode, "node-a", "z1", 0),
        endpoint(3, EndpointRole::Decode, "node-b", "z1", 2),
    ]));
    assert_eq!(ports(&scheduler, &pool), (3, Some(1)));
}

#[test]
fn the_published_llm_d_config_loads_and_routes_near() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/data/configs/llm-d-router-pd-topology-epp-config.yaml"
    ))
    .unwrap();
    let scheduler = build(&text);
    let pool = Arc::new(PoolSnapshot::new([
        endpoint(1, EndpointRole::Decode, "node-a", "z1", 0),
        endpoint(2, EndpointRole::Prefill, "node-b", "z1", 0),
        endpoint(3, EndpointRole::Prefill, "node-a", "z1", 1),
    ]));
    // A 200-token prompt is far above nonCachedTokens (16) with nothing cached yet.
    let prompt = "tokens ".repeat(120);
    let result = scheduler.schedule(&InferenceRequest::new("m", &prompt), &pool).unwrap();
    assert_eq!(result.primary().endpoint.address.port(), 1);
    assert_eq!(result.prefill().map(|p| p.endpoint.address.port()), Some(3));
}

fn labelled(hosts: &[u8]) -> Vec<EndpointState> {
    hosts
        .iter()
        .enumerate()
        .map(|(at, host)| {
            let host = if *host == 0 { String::new() } else { format!("node-{}", host % 3) };
            let zone = format!("z{}", host.len() % 2);
            endpoint(at as u16 + 1, EndpointRole::Prefill, &host, &zone, 0)
        })
        .collect()
}

proptest! {
    #[test]
    fn the_filter_only_removes_and_scores_stay_in_the_unit_interval(
        hosts in proptest::collection::vec(0u8..5, 1..12),
        peer in 0usize..12,
        keep in proptest::collection::vec(any::<bool>(), 12),
        level in prop_oneof![Just("host"), Just("rack"), Just("zone"), Just("region")],
    ) {
        let pool = PoolSnapshot::new(labelled(&hosts));
        let registry = {
            let mut registry = builtin_registry();
            registry.allow_experimental_plugins(true);
            registry
        };
        let yaml = format!(
            "plugins:\n- type: topology-extractor\n- type: topology-affinity-filter\n  parameters: {{minAffinity: {level}}}\n- type: topology-affinity-scorer\n- type: max-score-picker\nschedulingProfiles:\n- name: p\n  plugins: [{{pluginRef: topology-affinity-filter}}, {{pluginRef: topology-affinity-scorer}}]\n"
        );
        let plugins = EndpointPickerConfig::from_yaml(&yaml).unwrap().construct_plugins(&registry).unwrap();
        let filter = plugins.get("topology-affinity-filter").unwrap().plugin.filter.clone().unwrap();
        let scorer = plugins.get("topology-affinity-scorer").unwrap().plugin.scorer.clone().unwrap();
        let mut state = CycleState::new(Instant::now(), 1);
        PeerEndpoint::publish(&mut state, (peer % hosts.len()) as u32);
        let before: Vec<u32> = (0..hosts.len() as u32).filter(|at| keep[*at as usize]).collect();
        let mut after = before.clone();
        filter.filter(&mut state, &InferenceRequest::new("m", "p"), &pool, &mut after);
        prop_assert!(after.iter().all(|at| before.contains(at)), "only removes");
        prop_assert!(before.is_empty() || !after.is_empty(), "never empties");
        let mut scores = vec![0.0; after.len()];
        scorer.score(&mut state, &InferenceRequest::new("m", "p"), Candidates::new(&pool, &after), &mut scores);
        prop_assert!(scores.iter().all(|score| (0.0..=1.0).contains(score)));
    }
}

#[test]
fn plugins_are_alpha_and_bad_parameters_are_named() {
    let registry = builtin_registry();
    let spec = PluginSpec::of_type(topology::FILTER_TYPE_NAME);
    let refused = registry.create(&spec).unwrap_err().to_string();
    assert!(refused.contains("experimental"), "{refused}");
    let mut registry = builtin_registry();
    registry.allow_experimental_plugins(true);
    let bad = serde_json::json!({"minAffinity": "galaxy"});
    let spec =
        PluginSpec { parameters: Some(&bad), ..PluginSpec::of_type(topology::FILTER_TYPE_NAME) };
    let error = registry.create(&spec).unwrap_err().to_string();
    assert!(error.contains("minAffinity"), "{error}");
    let typo = serde_json::json!({"hostName": "x"});
    let spec = PluginSpec {
        parameters: Some(&typo),
        ..PluginSpec::of_type(topology::EXTRACTOR_TYPE_NAME)
    };
    assert!(registry.create(&spec).is_err(), "unknown parameters are refused");
}
