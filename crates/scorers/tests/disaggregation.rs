//! Disaggregated serving with the built-in plugins: the disaggregating profile handler, its
//! deciders and the role filters, over real schedulers built from configs.

use std::sync::Arc;
use std::time::Instant;

use proptest::prelude::*;
use scheduler_core::{
    Endpoint, EndpointMetrics, EndpointPickerConfig, EndpointRole, EndpointState, InferenceRequest,
    Outcome, PoolSnapshot, ROLE_LABEL, Scheduler, SchedulingError,
};
use scorers::{ActiveRequestScorer, RoleFilter, builtin_registry};

fn build(yaml: &str) -> Result<Scheduler, String> {
    let config = EndpointPickerConfig::from_yaml(yaml).map_err(|error| error.to_string())?;
    config.build(&builtin_registry()).map_err(|error| error.to_string())
}

fn endpoint(port: u16, role: EndpointRole, waiting_queue: u32) -> EndpointState {
    let endpoint = Endpoint::new(([10, 0, 0, 1], port).into()).with_role(role);
    EndpointState::new(endpoint).with_metrics(EndpointMetrics {
        waiting_queue,
        updated_at: Some(Instant::now()),
        ..EndpointMetrics::default()
    })
}

/// A P/D config: `decider` gates prefill; `handler` is the handler's declaration.
fn pd_config(handler: &str, decider: &str) -> String {
    format!(
        "plugins:
- type: queue-scorer
- type: active-request-scorer
- type: prefill-filter
- type: decode-filter
- type: encode-filter
- type: max-score-picker
- {decider}
- {handler}
schedulingProfiles:
- name: prefill
  plugins: [{{pluginRef: prefill-filter}}, {{pluginRef: queue-scorer}}, {{pluginRef: active-request-scorer}}]
- name: decode
  plugins: [{{pluginRef: decode-filter}}, {{pluginRef: queue-scorer}}, {{pluginRef: active-request-scorer}}]
"
    )
}

const ALWAYS: &str = "type: always-disagg-pd-decider";
const DISAGG: &str =
    "type: disagg-profile-handler\n  parameters: {deciders: {prefill: always-disagg-pd-decider}}";

fn ports(result: &scheduler_core::SchedulingResult) -> (u16, Option<u16>) {
    (result.primary().endpoint.address.port(), result.prefill().map(|p| p.endpoint.address.port()))
}

#[test]
fn decode_runs_first_and_is_primary_and_the_least_loaded_prefill_endpoint_prefills() {
    let scheduler = build(&pd_config(DISAGG, ALWAYS)).unwrap().with_seed(1);
    let pool = Arc::new(PoolSnapshot::new([
        endpoint(1, EndpointRole::Prefill, 5),
        endpoint(2, EndpointRole::Decode, 0),
        endpoint(3, EndpointRole::Prefill, 0),
        endpoint(4, EndpointRole::Decode, 9),
    ]));
    let result = scheduler.schedule(&InferenceRequest::new("m", "hello"), &pool).unwrap();
    assert_eq!(ports(&result), (2, Some(3)));
    assert_eq!(result.primary_profile(), "decode");
    let order: Vec<&str> = result.profile_runs().iter().map(|run| &*run.profile).collect();
    assert_eq!(order, ["decode", "prefill"]);
}

#[test]
fn without_a_prefill_endpoint_the_request_is_decode_only_and_without_decode_it_fails() {
    let scheduler = build(&pd_config(DISAGG, ALWAYS)).unwrap();
    let decode_only = Arc::new(PoolSnapshot::new([endpoint(1, EndpointRole::Decode, 0)]));
    let result = scheduler.schedule(&InferenceRequest::new("m", "hello"), &decode_only).unwrap();
    assert_eq!(ports(&result), (1, None));

    let prefill_only = Arc::new(PoolSnapshot::new([endpoint(1, EndpointRole::Prefill, 0)]));
    let error =
        scheduler.schedule(&InferenceRequest::new("m", "hello"), &prefill_only).unwrap_err();
    assert_eq!(
        error,
        SchedulingError::NoCandidates { profile: "decode".into(), filter: "decode-filter".into() }
    );
}

#[test]
fn with_every_metric_stale_the_stage_filters_still_hold() {
    use scheduler_core::StalenessPolicy;
    let scheduler = build(&pd_config(DISAGG, ALWAYS)).unwrap().with_seed(5);
    let stale = |port: u16, role: EndpointRole, waiting_queue: u32| {
        let endpoint = Endpoint::new(([10, 0, 0, 1], port).into()).with_role(role);
        // Metrics an hour old: past any threshold, so the pool fails open on last known load.
        let updated_at = Instant::now().checked_sub(std::time::Duration::from_secs(3600));
        EndpointState::new(endpoint).with_metrics(EndpointMetrics {
            waiting_queue,
            updated_at,
            ..EndpointMetrics::default()
        })
    };
    let pool = Arc::new(
        PoolSnapshot::new([
            stale(1, EndpointRole::Prefill, 0),
            stale(2, EndpointRole::Decode, 7),
            stale(3, EndpointRole::Prefill, 0),
            stale(4, EndpointRole::Decode, 3),
        ])
        .with_staleness(Some(StalenessPolicy::new(std::time::Duration::from_secs(1)))),
    );
    let first = scheduler.schedule(&InferenceRequest::new("m", "hello"), &pool).unwrap();
    // The idle prefill-only endpoints are not candidates; the less loaded decode one is.
    assert_eq!(first.primary().endpoint.address.port(), 4);
    assert_eq!(first.primary_profile(), "decode");
    for _ in 0..8 {
        // Picks since the last scrape count as load, so later picks spread; never to prefill.
        let result = scheduler.schedule(&InferenceRequest::new("m", "hello"), &pool).unwrap();
        assert!(matches!(result.primary().endpoint.address.port(), 2 | 4));
    }
}

#[test]
fn the_prefill_first_order_runs_prefill_before_decode() {
    let handler = "type: disagg-profile-handler\n  parameters: {stageOrder: prefill-first}";
    let scheduler = build(&pd_config(handler, ALWAYS)).unwrap();
    let pool = Arc::new(PoolSnapshot::new([
        endpoint(1, EndpointRole::Prefill, 0),
        endpoint(2, EndpointRole::Decode, 0),
    ]));
    let result = scheduler.schedule(&InferenceRequest::new("m", "hello"), &pool).unwrap();
    let order: Vec<&str> = result.profile_runs().iter().map(|run| &*run.profile).collect();
    assert_eq!(order, ["prefill", "decode"]);
    assert_eq!(ports(&result), (2, Some(1)));
}

#[test]
fn the_deprecated_spellings_still_disaggregate() {
    let flat = "type: disagg-profile-handler\n  parameters: {prefillDeciderPluginName: always-disagg-pd-decider}";
    let pd =
        "type: pd-profile-handler\n  parameters: {deciderPluginName: always-disagg-pd-decider}";
    let pool = Arc::new(PoolSnapshot::new([
        endpoint(1, EndpointRole::Prefill, 0),
        endpoint(2, EndpointRole::Decode, 0),
    ]));
    for handler in [flat, pd] {
        let scheduler = build(&pd_config(handler, ALWAYS)).unwrap();
        let result = scheduler.schedule(&InferenceRequest::new("m", "hello"), &pool).unwrap();
        assert_eq!(ports(&result), (2, Some(1)), "{handler}");
    }
    // The old header handlers are accepted (they do nothing: the headers come with the stages).
    let headers = "type: prefill-header-handler\n  parameters: {prefillProfile: prefill}";
    let config = pd_config(DISAGG, ALWAYS) + "";
    let config = config.replacen(
        "- type: queue-scorer\n",
        &format!("- type: queue-scorer\n- {headers}\n"),
        1,
    );
    assert!(build(&config).is_ok());
}

#[test]
fn the_multimodal_decider_encodes_apart_only_requests_with_media() {
    let config = "plugins:
- type: encode-filter
- type: decode-filter
- type: always-disagg-multimodal-decider
- type: disagg-profile-handler
  parameters: {deciders: {encode: always-disagg-multimodal-decider}}
schedulingProfiles:
- {name: encode, plugins: [{pluginRef: encode-filter}]}
- {name: decode, plugins: [{pluginRef: decode-filter}]}
";
    let scheduler = build(config).unwrap();
    let pool = Arc::new(PoolSnapshot::new([
        endpoint(1, EndpointRole::Encode, 0),
        endpoint(2, EndpointRole::Decode, 0),
    ]));
    let text = InferenceRequest::new("m", "hello");
    let result = scheduler.schedule(&text, &pool).unwrap();
    assert_eq!(result.encoders().count(), 0);
    let media = InferenceRequest { multimodal: true, ..text };
    let result = scheduler.schedule(&media, &pool).unwrap();
    let encoders: Vec<u16> = result.encoders().map(|e| e.endpoint.address.port()).collect();
    assert_eq!((result.primary().endpoint.address.port(), encoders), (2, vec![1]));
}

#[test]
fn both_picks_count_in_flight_and_the_prefill_is_released_when_the_response_starts() {
    let active = Arc::new(ActiveRequestScorer::new());
    let scheduler = build(&pd_config(DISAGG, ALWAYS))
        .unwrap()
        .with_pre_request(active.clone())
        .with_response_complete(active.clone());
    let pool = Arc::new(PoolSnapshot::new([
        endpoint(1, EndpointRole::Prefill, 0),
        endpoint(2, EndpointRole::Decode, 0),
    ]));
    let mut result = scheduler.schedule(&InferenceRequest::new("m", "hello"), &pool).unwrap();
    let (decode, prefill) = (result.primary().id(), result.prefill().unwrap().id());
    assert_eq!((active.in_flight(decode), active.in_flight(prefill)), (1, 1));
    let mut guard = result.take_completion().unwrap();
    assert_eq!(guard.pending_prefill(), Some(prefill));
    guard.prefill_done();
    guard.prefill_done();
    assert_eq!((active.in_flight(decode), active.in_flight(prefill)), (1, 0), "once only");
    guard.finish(Outcome::Completed);
    assert_eq!((active.in_flight(decode), active.in_flight(prefill)), (0, 0));

    // A request that ends before its response started releases both.
    let mut result = scheduler.schedule(&InferenceRequest::new("m", "hello"), &pool).unwrap();
    drop(result.take_completion());
    assert_eq!(active.total_in_flight(), 0);
}

#[test]
fn bad_parameters_and_unknown_stages_are_refused_by_name() {
    let cases = [
        (
            "type: disagg-profile-handler\n  parameters: {stageOrder: sideways}",
            "stageOrder: invalid stage order 'sideways', must be 'decode-first' or 'prefill-first'",
        ),
        (
            "type: disagg-profile-handler\n  parameters: {profiles: {decoder: d}}",
            "profiles.decoder: unknown field `decoder`",
        ),
        (
            "type: disagg-profile-handler\n  parameters: {profiles: {decode: d}}",
            "profiles.decode names the profile 'd', which is not declared (declared: 'prefill', 'decode')",
        ),
        (
            "type: disagg-profile-handler\n  parameters: {deciders: {prefill: nowhere}}",
            "deciders.prefill: no plugin named 'nowhere' is declared",
        ),
        (
            "type: disagg-profile-handler\n  parameters: {deciders: {prefill: queue-scorer}}",
            "deciders.prefill: plugin 'queue-scorer' (type queue-scorer) is not a decider",
        ),
        (
            "type: disagg-profile-handler\n  parameters: {stageOrder: prefill-first, deciders: {prefill: always-disagg-pd-decider}}",
            "deciders.prefill: a prefill decider is not supported in the prefill-first stage order",
        ),
        (
            "type: disagg-profile-handler\n  parameters: {deciders: {encode: always-disagg-pd-decider}}",
            "profiles.encode names the profile 'encode', which is not declared",
        ),
        (
            "type: pd-profile-handler\n  parameters: {primaryPort: 70000, deciderPluginName: always-disagg-pd-decider}",
            "primaryPort: must be between 1 and 65535, got 70000",
        ),
        (
            "type: pd-profile-handler\n  parameters: {deciderPluginName: prefix-based-pd-decider}",
            "deciderPluginName: no plugin named 'prefix-based-pd-decider' is declared",
        ),
    ];
    for (handler, expected) in cases {
        let error = build(&pd_config(handler, ALWAYS)).err().unwrap_or_default();
        assert!(error.contains(expected), "{handler}:\n  {error}\n  wanted: {expected}");
    }
    let decider = "type: prefix-based-pd-decider\n  parameters: {nonCachedTokens: -3}";
    let error = build(&pd_config(DISAGG, decider)).err().unwrap_or_default();
    assert!(error.contains("nonCachedTokens: cannot be negative, got -3"), "{error}");
    let error = build(&pd_config(DISAGG, "type: always-disagg-pd-decider\n  parameters: {x: 1}"));
    assert!(error.err().unwrap_or_default().contains("x: unknown field `x`"));
}

#[test]
fn the_role_filters_keep_exactly_the_roles_that_serve_their_stage() {
    // The filters read the label; the typed role must agree with them for every value.
    let labels = [
        "prefill",
        "decode",
        "encode",
        "prefill-decode",
        "both",
        "encode-prefill",
        "encode-prefill-decode",
        "unknown-role",
    ];
    for value in labels.iter().map(|v| Some(*v)).chain([None]) {
        let role = EndpointRole::from_label(value);
        for filter in RoleFilter::ALL {
            let parameters = filter.parameters();
            let kept = match value {
                Some(value) => parameters.valid_values.iter().any(|valid| valid == value),
                None => parameters.allows_no_label,
            };
            let serves = match filter {
                RoleFilter::Decode => role.serves_decode(),
                RoleFilter::Prefill => role.serves_prefill(),
                RoleFilter::Encode => role.serves_encode(),
            };
            assert_eq!(kept, serves, "{filter:?} on {value:?}");
        }
    }
}

fn any_role() -> impl Strategy<Value = Option<&'static str>> {
    prop_oneof![
        Just(None),
        Just(Some("prefill")),
        Just(Some("decode")),
        Just(Some("encode")),
        Just(Some("prefill-decode")),
        Just(Some("both")),
        Just(Some("encode-prefill")),
        Just(Some("encode-prefill-decode")),
        Just(Some("gpu")),
    ]
}

proptest! {
    #[test]
    fn prefill_picks_can_prefill_and_decode_picks_can_decode(
        endpoints in prop::collection::vec((any_role(), 0u32..20), 1..8),
        seed in any::<u64>(),
    ) {
        let scheduler = build(&pd_config(DISAGG, ALWAYS)).unwrap().with_seed(seed);
        let states: Vec<EndpointState> = endpoints
            .iter()
            .enumerate()
            .map(|(i, (role, queue))| {
                let mut endpoint = Endpoint::new(([10, 0, 0, 1], i as u16 + 1).into());
                if let Some(role) = role {
                    endpoint = endpoint.with_label(ROLE_LABEL, *role);
                }
                EndpointState::new(endpoint).with_metrics(EndpointMetrics {
                    waiting_queue: *queue,
                    updated_at: Some(Instant::now()),
                    ..EndpointMetrics::default()
                })
            })
            .collect();
        let any_decode = states.iter().any(|s| s.endpoint.role().serves_decode());
        let any_prefill = states.iter().any(|s| s.endpoint.role().serves_prefill());
        let pool = Arc::new(PoolSnapshot::new(states));
        match scheduler.schedule(&InferenceRequest::new("m", "hello"), &pool) {
            Ok(result) => {
                prop_assert!(result.primary().endpoint.role().serves_decode());
                prop_assert!(result.ranked().all(|e| e.endpoint.role().serves_decode()));
                match result.prefill() {
                    Some(prefill) => prop_assert!(prefill.endpoint.role().serves_prefill()),
                    None => prop_assert!(!any_prefill, "a prefill endpoint was there"),
                }
            }
            Err(error) => prop_assert!(!any_decode, "refused with a decode endpoint: {error}"),
        }
    }
}

#[test]
fn the_prefix_decider_prefills_apart_only_what_the_decode_endpoint_lacks() {
    let decider =
        "type: prefix-based-pd-decider\n  parameters: {nonCachedTokens: 100, promptTokens: 50}";
    let handler = "type: disagg-profile-handler\n  parameters: {deciders: {prefill: prefix-based-pd-decider}}";
    let config = pd_config(handler, decider).replacen(
        "- type: queue-scorer\n",
        "- type: queue-scorer\n- type: prefix-cache-scorer\n  parameters: {blockSize: 64}\n",
        1,
    );
    let config = config.replace(
        "{pluginRef: decode-filter}, ",
        "{pluginRef: decode-filter}, {pluginRef: prefix-cache-scorer, weight: 5}, ",
    );
    let scheduler = build(&config).unwrap().with_seed(3);
    let pool = Arc::new(PoolSnapshot::new([
        endpoint(1, EndpointRole::Prefill, 0),
        endpoint(2, EndpointRole::Decode, 0),
        endpoint(3, EndpointRole::Decode, 0),
    ]));
    // 1024 characters: 256 tokens, 16 blocks of 64 characters.
    let long: String = (0..1024).map(|i| char::from(b'a' + (i * 11 % 26) as u8)).collect();
    let request = InferenceRequest::new("m", long.clone());
    let first = scheduler.schedule(&request, &pool).unwrap();
    assert!(first.prefill().is_some(), "nothing cached: 256 tokens to compute");
    let decode = first.primary().id();
    drop(first);
    scheduler.flush();

    let again = scheduler.schedule(&request, &pool).unwrap();
    assert_eq!((again.primary().id(), again.prefill().map(|p| p.id())), (decode, None));

    // A different tail of 128 characters (32 tokens) is not worth a prefill endpoint; a new
    // half (512 characters, 128 tokens) is.
    let short_tail = format!("{}{}", &long[..896], "z".repeat(128));
    let result = scheduler.schedule(&InferenceRequest::new("m", short_tail), &pool).unwrap();
    assert_eq!(result.prefill().map(|p| p.id()), None);
    let long_tail = format!("{}{}", &long[..512], "y".repeat(512));
    let result = scheduler.schedule(&InferenceRequest::new("m", long_tail), &pool).unwrap();
    assert!(result.prefill().is_some());
    // A prompt under promptTokens stays whole, however little of it is cached.
    let floor = config.replace("promptTokens: 50", "promptTokens: 300");
    let scheduler = build(&floor).unwrap();
    let result = scheduler.schedule(&request, &pool).unwrap();
    assert_eq!(result.prefill().map(|p| p.id()), None, "256 tokens < promptTokens 300");
}

#[test]
fn the_prefill_endpoint_is_recorded_as_holding_the_prompt_too() {
    let config = pd_config(DISAGG, ALWAYS)
        .replacen(
            "- type: queue-scorer\n",
            "- type: queue-scorer\n- type: prefix-cache-scorer\n  parameters: {blockSize: 64}\n",
            1,
        )
        .replace(
            "{pluginRef: prefill-filter}, ",
            "{pluginRef: prefill-filter}, {pluginRef: prefix-cache-scorer, weight: 5}, ",
        );
    let pool = Arc::new(PoolSnapshot::new([
        endpoint(1, EndpointRole::Prefill, 0),
        endpoint(2, EndpointRole::Prefill, 0),
        endpoint(3, EndpointRole::Decode, 0),
    ]));
    let request = InferenceRequest::new("m", "z".repeat(1024));
    for seed in 0..8 {
        let scheduler = build(&config).unwrap().with_seed(seed);
        let first = scheduler.schedule(&request, &pool).unwrap().prefill().unwrap().id();
        scheduler.flush();
        // Equal load: only the recorded prompt breaks the tie, every time.
        for _ in 0..4 {
            let again = scheduler.schedule(&request, &pool).unwrap();
            assert_eq!(again.prefill().map(|p| p.id()), Some(first), "seed {seed}");
        }
    }
}

/// A P/D config in the shape of llm-d-inference-scheduler's first releases: the prefix-cache
/// scorer in both profiles and `pd-profile-handler` with `parameters`, no decider declared.
fn first_release_config(parameters: &str) -> String {
    format!(
        "plugins:
- type: prefix-cache-scorer
  parameters: {{hashBlockSize: 10, lruCapacityPerServer: 256}}
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: pd-profile-handler
  parameters: {parameters}
schedulingProfiles:
- name: prefill
  plugins: [{{pluginRef: prefill-filter}}, {{pluginRef: prefix-cache-scorer, weight: 2}}]
- name: decode
  plugins: [{{pluginRef: decode-filter}}, {{pluginRef: prefix-cache-scorer, weight: 2}}]
"
    )
}

fn small_pd_pool() -> Arc<PoolSnapshot> {
    Arc::new(PoolSnapshot::new([
        endpoint(1, EndpointRole::Prefill, 0),
        endpoint(2, EndpointRole::Decode, 0),
    ]))
}

#[test]
fn first_release_pd_handler_parameters_keep_their_meaning() {
    let pool = small_pd_pool();
    let prefilled = |scheduler: &Scheduler, prompt: &str| {
        let result = scheduler.schedule(&InferenceRequest::new("m", prompt), &pool).unwrap();
        assert_eq!(result.primary().endpoint.address.port(), 2);
        result.prefill().is_some()
    };
    // threshold 0 (and the old default, no parameters at all): every request prefilled apart.
    for parameters in ["{threshold: 0, hashBlockSize: 5}", "{}"] {
        let scheduler = build(&first_release_config(parameters)).unwrap();
        assert!(prefilled(&scheduler, "hi"), "{parameters}");
    }
    // threshold N: only when at least N prompt characters are not cached on the decode pick.
    let scheduler = build(&first_release_config("{threshold: 400}")).unwrap();
    assert!(!prefilled(&scheduler, "a short question"));
    let document = "a long document nobody has sent before ".repeat(40);
    assert!(prefilled(&scheduler, &document), "1,600 new characters");
    scheduler.flush();
    // The same document again: the decode endpoint now holds it, so it stays whole.
    assert!(!prefilled(&scheduler, &document), "cached on the decode pick");
}

#[test]
fn first_release_parameters_give_way_to_a_named_decider_and_bad_values_are_named() {
    let error = build(&first_release_config("{threshold: -1}")).unwrap_err();
    assert!(error.contains("threshold: cannot be negative"), "{error}");
    // A declared decider wins over threshold: never-disaggregate beats threshold 0.
    let yaml = first_release_config("{threshold: 0, deciderPluginName: never}").replace(
        "- type: max-score-picker\n",
        "- type: max-score-picker\n- name: never\n  type: prefix-based-pd-decider\n  parameters: {nonCachedTokens: 0}\n",
    );
    let scheduler = build(&yaml).unwrap();
    let result = scheduler.schedule(&InferenceRequest::new("m", "hi"), &small_pd_pool()).unwrap();
    assert_eq!(result.prefill().map(|p| p.endpoint.address.port()), None);
    // Naming a decider that is not declared is still an error.
    let error = build(&first_release_config("{deciderPluginName: missing}")).unwrap_err();
    assert!(error.contains("no plugin named 'missing'"), "{error}");
}
