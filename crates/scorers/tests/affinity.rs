//! The llm-d affinity plugins: `label-selector-filter`, `session-affinity-filter`,
//! `session-affinity-scorer`, `header-label-affinity-scorer`, and the llm-d parameters of
//! `prefix-cache-scorer`. Expected behaviour is taken from the llm-d-router Go sources named
//! at each test.

use std::sync::Arc;
use std::time::Instant;

use proptest::prelude::*;
use scheduler_core::{
    Candidates, CycleState, Endpoint, EndpointPickerConfig, EndpointState, Filter,
    InferenceRequest, PluginSpec, PoolSnapshot, Scorer,
};
use scorers::builtin_registry;
use scorers::session_affinity::session_token;
use serde_json::json;

/// Endpoint `i` named `pod-i`, with the given labels.
fn endpoint(i: u16, labels: &[(&str, &str)]) -> EndpointState {
    let mut endpoint =
        Endpoint::new(([10, 0, 0, 1], 8000 + i).into()).with_name(format!("pod-{i}"));
    for (key, value) in labels {
        endpoint = endpoint.with_label(*key, *value);
    }
    EndpointState::new(endpoint)
}

fn pool(endpoints: impl IntoIterator<Item = EndpointState>) -> Arc<PoolSnapshot> {
    Arc::new(PoolSnapshot::new(endpoints))
}

fn request(headers: &[(&str, &str)]) -> InferenceRequest {
    let mut request = InferenceRequest::new("llama", "hello");
    for (name, value) in headers {
        request.headers.insert(name.to_string(), value.to_string());
    }
    request
}

fn build(type_name: &str, parameters: serde_json::Value) -> Result<scheduler_core::Plugin, String> {
    let parameters = (!parameters.is_null()).then_some(parameters);
    let spec = PluginSpec { name: type_name, type_name, parameters: parameters.as_ref() };
    registry().create(&spec).map_err(|error| error.to_string())
}

/// The built-in plugins, the experimental ones (session and header-label affinity) allowed.
fn registry() -> scheduler_core::PluginRegistry {
    let mut registry = builtin_registry();
    registry.allow_experimental_plugins(true);
    registry
}

fn filter(plugin: &scheduler_core::Plugin) -> Arc<dyn Filter> {
    plugin.filter.clone().expect("a filter")
}

fn scorer(plugin: &scheduler_core::Plugin) -> Arc<dyn Scorer> {
    plugin.scorer.clone().expect("a scorer")
}

fn run_filter(filter: &dyn Filter, request: &InferenceRequest, pool: &PoolSnapshot) -> Vec<u32> {
    let mut candidates: Vec<u32> = (0..pool.len() as u32).collect();
    filter.filter(&mut CycleState::new(Instant::now(), 1), request, pool, &mut candidates);
    candidates
}

fn run_scorer(scorer: &dyn Scorer, request: &InferenceRequest, pool: &PoolSnapshot) -> Vec<f64> {
    let indices: Vec<u32> = (0..pool.len() as u32).collect();
    let mut scores = vec![0.0; indices.len()];
    let mut state = CycleState::new(Instant::now(), 1);
    scorer.score(&mut state, request, Candidates::new(pool, &indices), &mut scores);
    scores
}

fn labelled_pool() -> Arc<PoolSnapshot> {
    pool([
        endpoint(0, &[("role", "decode"), ("hw", "H100")]),
        endpoint(1, &[("role", "prefill"), ("hw", "H100")]),
        endpoint(2, &[("role", "decode")]),
        endpoint(3, &[]),
    ])
}

// bylabel/selector.go: metav1.LabelSelectorAsSelector semantics, requirements ANDed.
#[test]
fn label_selector_applies_match_labels_and_expressions() {
    let pool = labelled_pool();
    let keep = |parameters| {
        run_filter(
            &*filter(&build("label-selector-filter", parameters).unwrap()),
            &request(&[]),
            &pool,
        )
    };
    assert_eq!(keep(json!({"matchLabels": {"role": "decode", "hw": "H100"}})), [0]);
    let expression = |operator: &str, values: serde_json::Value| json!({"matchExpressions": [{"key": "hw", "operator": operator, "values": values}]});
    assert_eq!(keep(expression("In", json!(["H100", "A100"]))), [0, 1]);
    assert_eq!(keep(expression("NotIn", json!(["H100"]))), [2, 3], "absent label passes NotIn");
    assert_eq!(keep(expression("Exists", json!([]))), [0, 1]);
    assert_eq!(keep(expression("DoesNotExist", json!(null))), [2, 3]);
    assert_eq!(keep(json!(null)), [0, 1, 2, 3], "the empty selector selects everything");
}

#[test]
fn label_selector_parameters_are_checked_and_the_deprecated_name_works() {
    let expression = |operator: &str, values: serde_json::Value| json!({"matchExpressions": [{"key": "hw", "operator": operator, "values": values}]});
    let error = build("label-selector-filter", expression("In", json!([]))).unwrap_err();
    assert!(error.contains("matchExpressions[0].values"), "{error}");
    let error = build("label-selector-filter", expression("Exists", json!(["x"]))).unwrap_err();
    assert!(error.contains("matchExpressions[0].values"), "{error}");
    let error = build("label-selector-filter", expression("Gt", json!(["1"]))).unwrap_err();
    assert!(error.contains("matchExpressions[0].operator"), "{error}");
    let error = build("label-selector-filter", json!({"matchLabel": {}})).unwrap_err();
    assert!(error.contains("matchLabel"), "{error}");
    let deprecated =
        build("by-label-selector", json!({"matchLabels": {"role": "prefill"}})).unwrap();
    assert_eq!(run_filter(&*filter(&deprecated), &request(&[]), &labelled_pool()), [1]);
}

// headerlabelaffinity/plugin.go: 1 where labels[labelKey] == header, else 0.
#[test]
fn header_label_affinity_scores_matching_labels() {
    let plugin = build(
        "header-label-affinity-scorer",
        json!({"headerName": "X-Preferred-HW", "labelKey": "hw"}),
    )
    .unwrap();
    let pool = labelled_pool();
    let scores = run_scorer(&*scorer(&plugin), &request(&[("x-preferred-hw", "H100")]), &pool);
    assert_eq!(scores, [1.0, 1.0, 0.0, 0.0]);
    let scores = run_scorer(&*scorer(&plugin), &request(&[("x-preferred-hw", "")]), &pool);
    assert_eq!(scores, [0.0; 4], "an empty header is no preference");
    assert_eq!(run_scorer(&*scorer(&plugin), &request(&[]), &pool), [0.0; 4]);
}

#[test]
fn header_label_affinity_parameters_are_required() {
    let error = build("header-label-affinity-scorer", json!(null)).unwrap_err();
    assert!(error.contains("headerName"), "{error}");
    let error = build("header-label-affinity-scorer", json!({"headerName": "x"})).unwrap_err();
    assert!(error.contains("labelKey"), "{error}");
    let error =
        build("header-label-affinity-scorer", json!({"headerName": "x", "labelKey": "y", "z": 1}))
            .unwrap_err();
    assert!(error.contains('z'), "{error}");
}

// sessionaffinity (util/header.go): the token is base64.StdEncoding of the endpoint id.
#[test]
fn session_token_is_padded_standard_base64() {
    assert_eq!(session_token("default/pod-1"), "ZGVmYXVsdC9wb2QtMQ==");
    assert_eq!(session_token("pod-12"), "cG9kLTEy");
    assert_eq!(session_token("ab?>"), "YWI/Pg==", "the standard alphabet, not URL-safe");
}

// filter/sessionaffinity/encoded_endpoint_header.go and scorer/.../encoded_endpoint_header.go.
#[test]
fn session_affinity_pins_to_the_encoded_endpoint() {
    let pool = labelled_pool();
    let filter = filter(&build("session-affinity-filter", json!(null)).unwrap());
    let scorer = scorer(&build("session-affinity-scorer", json!(null)).unwrap());
    // Go's tokens name `namespace/name`; epp-rs's own name the endpoint.
    for token in [session_token("default/pod-2"), session_token("pod-2")] {
        let request = request(&[("x-session-token", &token)]);
        assert_eq!(run_filter(&*filter, &request, &pool), [2]);
        assert_eq!(run_scorer(&*scorer, &request, &pool), [0.0, 0.0, 1.0, 0.0]);
    }
    // No session, an unknown endpoint, or a token that does not decode: no preference.
    for token in
        [None, Some(session_token("pod-9")), Some("not base64!".into()), Some("cG9kLTI".into())]
    {
        let headers: Vec<(&str, &str)> =
            token.iter().map(|t| ("x-session-token", t.as_str())).collect();
        let request = request(&headers);
        assert_eq!(run_filter(&*filter, &request, &pool), [0, 1, 2, 3], "{token:?}");
        assert_eq!(run_scorer(&*scorer, &request, &pool), [0.0; 4], "{token:?}");
    }
    let oversized = "QUFB".repeat(200);
    assert_eq!(
        run_filter(&*filter, &request(&[("x-session-token", &oversized)]), &pool),
        [0, 1, 2, 3]
    );
}

#[test]
fn session_affinity_header_and_strategy_parameters() {
    let pool = labelled_pool();
    let parameters = json!({"encodedEndpointHeaderConfig": {"header": " X-Session-Token-Prefill "}, "profileName": "prefill"});
    let filter = filter(&build("session-affinity-filter", parameters).unwrap());
    let token = session_token("pod-1");
    assert_eq!(run_filter(&*filter, &request(&[("x-session-token-prefill", &token)]), &pool), [1]);
    assert_eq!(run_filter(&*filter, &request(&[("x-session-token", &token)]), &pool), [0, 1, 2, 3]);
    for name in ["session-affinity-filter", "session-affinity-scorer"] {
        assert!(build(name, json!({"strategy": "session_id"})).is_ok());
        let error = build(name, json!({"strategy": "sticky"})).unwrap_err();
        assert!(error.contains("strategy"), "{error}");
        let error = build(name, json!({"header": "x"})).unwrap_err();
        assert!(error.contains("header"), "{error}");
        assert!(build(name, json!({"strategy": "encoded_endpoint_header"})).is_ok());
    }
}

// approximateprefix/types.go + plugin.go resolveMaxBlocks, scorer/prefix/plugin.go.
#[test]
fn prefix_cache_scorer_accepts_the_llm_d_parameters() {
    let ok = |parameters| build("prefix-cache-scorer", parameters).map(|_| ());
    assert!(ok(json!({"blockSizeTokens": 16, "maxPrefixTokensToMatch": 16384, "lruCapacityPerServer": 31250, "autoTune": false})).is_ok());
    assert!(ok(json!({"matchLengthWeight": 0.5, "matchLengthScaleTokens": 4096})).is_ok());
    assert!(
        ok(json!({"maxPrefixTokensToMatch": 0, "maxPrefixBlocksToMatch": 4})).is_ok(),
        "0 defers to blocks"
    );
    let refused = |parameters, name: &str| {
        let error = ok(parameters).unwrap_err();
        assert!(error.contains(name), "{error}");
    };
    refused(json!({"blockSizeTokens": 16, "maxPrefixTokensToMatch": 8}), "maxPrefixTokensToMatch");
    refused(json!({"maxPrefixTokensToMatch": -1}), "maxPrefixTokensToMatch");
    refused(json!({"matchLengthWeight": 1.5}), "matchLengthWeight");
    refused(
        json!({"matchLengthWeight": 0.5, "matchLengthScaleTokens": 0}),
        "matchLengthScaleTokens",
    );
    refused(json!({"mode": "x"}), "mode");
}

#[test]
fn max_prefix_tokens_caps_the_matched_blocks() {
    use scheduler_core::{ScheduleOptions, SchedulingResult};
    // 4-token (16-character) blocks, capped at 8 tokens: 2 blocks, whatever the prompt. GIE's
    // formula (no load discount): the first pick is in flight on the chosen endpoint only.
    let yaml = "plugins:\n- type: prefix-cache-scorer\n  parameters: {blockSizeTokens: 4, maxPrefixTokensToMatch: 8, affinityLoadTolerance: 0}\n";
    let scheduler = EndpointPickerConfig::from_yaml(yaml).unwrap().build(&registry()).unwrap();
    let pool = pool([endpoint(0, &[]), endpoint(1, &[])]);
    let prompt = "a".repeat(16 * 6);
    let first = InferenceRequest::new("llama", prompt.clone());
    let chosen = scheduler.schedule(&first, &pool).unwrap().primary().endpoint.address.port();
    scheduler.flush();
    // Same first two blocks, different rest: a full match under the cap.
    let second = InferenceRequest::new("llama", format!("{}{}", &prompt[..32], "b".repeat(64)));
    let result: SchedulingResult = scheduler
        .schedule_with(&second, &pool, ScheduleOptions { explain: true, ..Default::default() })
        .unwrap();
    let scores = &result.explanation().unwrap()[0].scorers[0].2;
    let chosen_position = usize::from(chosen - 8000);
    assert_eq!(scores[chosen_position], 1.0);
    assert_eq!(scores[1 - chosen_position], 0.0);
}

// scorer/prefix/plugin.go: w * min(1, matched tokens / scale)^2 + (1 - w) * matched / total.
#[test]
fn match_length_weight_blends_length_and_ratio() {
    use scheduler_core::ScheduleOptions;
    let yaml = "plugins:\n- type: prefix-cache-scorer\n  parameters: {blockSizeTokens: 4, matchLengthWeight: 0.5, matchLengthScaleTokens: 8}\n";
    let scheduler = EndpointPickerConfig::from_yaml(yaml).unwrap().build(&registry()).unwrap();
    let pool = pool([endpoint(0, &[])]);
    scheduler.schedule(&InferenceRequest::new("llama", "a".repeat(16)), &pool).unwrap();
    scheduler.flush();
    // One of two 4-token blocks matched: ratio 1/2, length min(1, 4/8)^2 = 1/4.
    let second = InferenceRequest::new("llama", format!("{}{}", "a".repeat(16), "b".repeat(16)));
    let result = scheduler
        .schedule_with(&second, &pool, ScheduleOptions { explain: true, ..Default::default() })
        .unwrap();
    let scores = &result.explanation().unwrap()[0].scorers[0].2;
    assert!((scores[0] - (0.5 * 0.25 + 0.5 * 0.5)).abs() < 1e-12, "{scores:?}");
}

#[test]
fn go_readme_configs_build() {
    let yaml = r#"
plugins:
- type: label-selector-filter
  parameters:
    matchLabels:
      inference-role: decode
      hardware-type: H100
- type: by-label-selector
  parameters:
    matchExpressions:
    - {key: zone, operator: In, values: [a, b]}
- name: session-affinity-decode
  type: session-affinity-filter
  parameters:
    encodedEndpointHeaderConfig:
      header: x-session-token
- type: session-affinity-scorer
- type: header-label-affinity-scorer
  name: slice-affinity
  parameters:
    headerName: x-disagg-slice
    labelKey: disaggregatedset.x-k8s.io/slice
- type: prefix-cache-scorer
  parameters:
    blockSizeTokens: 16
    maxPrefixTokensToMatch: 16384
    lruCapacityPerServer: 31250
- type: prefix-cache-affinity-filter
  name: prefix-affinity
  parameters:
    affinityThreshold: 0.80
    explorationProbability: 0.01
    maxTTFTPenaltyMs: 5000
    ttftSource: prefillThroughput
- type: weighted-random-picker
  name: picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: label-selector-filter
  - pluginRef: session-affinity-decode
  - pluginRef: prefix-affinity
  - pluginRef: session-affinity-scorer
  - pluginRef: slice-affinity
    weight: 3
  - pluginRef: prefix-cache-scorer
  - pluginRef: picker
"#;
    let config = EndpointPickerConfig::from_yaml(yaml).unwrap();
    config.build(&registry()).unwrap();
}

fn arbitrary_pool() -> impl Strategy<Value = Vec<Vec<(u8, u8)>>> {
    prop::collection::vec(prop::collection::vec((0u8..3, 0u8..3), 0..3), 0..8)
}

fn labelled(labels: &[Vec<(u8, u8)>]) -> Arc<PoolSnapshot> {
    pool(labels.iter().enumerate().map(|(i, labels)| {
        let owned: Vec<(String, String)> =
            labels.iter().map(|(k, v)| (format!("k{k}"), format!("v{v}"))).collect();
        let borrowed: Vec<(&str, &str)> =
            owned.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        endpoint(i as u16, &borrowed)
    }))
}

proptest! {
    #[test]
    fn filters_only_remove_and_scores_stay_in_range(
        labels in arbitrary_pool(),
        key in 0u8..3,
        value in 0u8..3,
        token in prop_oneof![any::<String>(), (0u16..10).prop_map(|i| session_token(&format!("pod-{i}")))],
    ) {
        let pool = labelled(&labels);
        let request = request(&[("x-session-token", &token), ("x-h", &format!("v{value}"))]);
        let all: Vec<u32> = (0..pool.len() as u32).collect();
        let filters = [
            build("label-selector-filter", json!({"matchExpressions": [{"key": format!("k{key}"), "operator": "NotIn", "values": [format!("v{value}")]}]})),
            build("label-selector-filter", json!({"matchLabels": {format!("k{key}"): format!("v{value}")}})),
            build("session-affinity-filter", json!(null)),
            build("decode-filter", json!(null)),
            build("prefill-filter", json!(null)),
        ];
        for plugin in filters {
            let kept = run_filter(&*filter(&plugin.unwrap()), &request, &pool);
            prop_assert!(kept.iter().all(|index| all.contains(index)));
            prop_assert!(kept.windows(2).all(|pair| pair[0] < pair[1]), "order kept, no repeats");
        }
        let scorers = [
            build("session-affinity-scorer", json!(null)),
            build("header-label-affinity-scorer", json!({"headerName": "x-h", "labelKey": format!("k{key}")})),
        ];
        for plugin in scorers {
            let scores = run_scorer(&*scorer(&plugin.unwrap()), &request, &pool);
            prop_assert!(scores.iter().all(|score| (0.0..=1.0).contains(score)));
        }
    }
}

// bylabel/roles.go: the role filters are by-label on llm-d.ai/role; only decode passes
// endpoints without a role.
#[test]
fn role_filters_keep_the_roles_of_their_stage() {
    let roles = ["decode", "prefill", "both", "prefill-decode", "encode", "encode-prefill"];
    let mut endpoints: Vec<EndpointState> = roles
        .iter()
        .enumerate()
        .map(|(i, role)| endpoint(i as u16, &[("llm-d.ai/role", role)]))
        .collect();
    endpoints.push(endpoint(roles.len() as u16, &[]));
    let pool = pool(endpoints);
    let keep = |type_name| {
        run_filter(&*filter(&build(type_name, json!(null)).unwrap()), &request(&[]), &pool)
    };
    assert_eq!(keep("decode-filter"), [0, 2, 3, 6]);
    assert_eq!(keep("prefill-filter"), [1, 2, 3, 5]);
    assert_eq!(keep("encode-filter"), [4, 5]);
    let error = build("decode-filter", json!({"label": "x"})).unwrap_err();
    assert!(error.contains("unknown field `label`"), "{error}");
}

#[test]
fn the_alpha_affinity_plugins_need_experimental_plugins_allowed() {
    for type_name in
        ["session-affinity-filter", "session-affinity-scorer", "header-label-affinity-scorer"]
    {
        let spec = PluginSpec::of_type(type_name);
        let error = builtin_registry().create(&spec).unwrap_err().to_string();
        assert!(error.contains("is experimental"), "{type_name}: {error}");
    }
    assert!(builtin_registry().create(&PluginSpec::of_type("decode-filter")).is_ok());
}
