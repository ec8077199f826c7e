//! The complete `flowControl` section: `noEndpointRequestTTL`, `enableEviction`,
//! `defaultNegativePriorityBand`, `usageLimitPolicyPluginRef`, the policy plugins bands refer
//! to, and the `featureGates` `gate=false` syntax; each checked by what admission then does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use scheduler_core::flow::{
    Admission, AdmissionMode, FairnessPolicy, FlowMetrics, InferenceObjectiveConfig, NotAdmitted,
    ObjectiveResolver, OrderingPolicy, OutcomeReason, resolve_policies,
};
use scheduler_core::{
    Candidates, CycleState, Endpoint, EndpointMetrics, EndpointPickerConfig, EndpointState,
    InferenceRequest, Picker, Plugin, PluginRegistry, PoolSnapshot,
};

fn config(yaml: &str) -> EndpointPickerConfig {
    EndpointPickerConfig::from_yaml(yaml).expect("valid EndpointPickerConfig")
}

#[derive(Debug)]
struct First;

impl Picker for First {
    fn pick(&self, _: &mut CycleState, _: Candidates<'_>, _: &[f64], picked: &mut Vec<u32>) {
        picked.push(0);
    }
}

fn registry() -> PluginRegistry {
    let mut registry = PluginRegistry::new();
    registry.register("first-picker", |_| Ok(Plugin::picker(First)));
    registry.register("queue-scorer", |_| Ok(Plugin::default()));
    registry
}

fn objectives() -> ObjectiveResolver {
    ObjectiveResolver::new(
        [
            InferenceObjectiveConfig { name: "batch".into(), priority: -1 },
            InferenceObjectiveConfig { name: "chat".into(), priority: 2 },
        ],
        Arc::new(FlowMetrics::new()),
    )
    .expect("valid objectives")
}

fn admission(config: &EndpointPickerConfig) -> Result<Admission, String> {
    let plugins = config.construct_plugins(&registry()).map_err(|error| error.to_string())?;
    Admission::from_config(config, &plugins, objectives()).map_err(|error| error.to_string())
}

fn request(objective: &str) -> InferenceRequest {
    let mut request = InferenceRequest::new("m", "p");
    request.objective = Some(objective.to_owned());
    request
}

/// One endpoint with `waiting` requests queued (the utilization detector's queue threshold is 5).
fn pool(waiting: u32, now: Instant) -> PoolSnapshot {
    let metrics =
        EndpointMetrics { waiting_queue: waiting, updated_at: Some(now), ..Default::default() };
    PoolSnapshot::new([
        EndpointState::new(Endpoint::new(([10, 0, 0, 1], 8000).into())).with_metrics(metrics)
    ])
}

#[test]
fn the_new_keys_parse_with_their_defaults() {
    let parsed = config(
        "flowControl:
  noEndpointRequestTTL: 5m
  enableEviction: true
  usageLimitPolicyPluginRef: static-usage-limit-policy
  defaultPriorityBand: {maxRequests: 100}
  defaultNegativePriorityBand: {maxRequests: 2}
  priorityBands:
  - {priority: -1, maxRequests: 7}
",
    )
    .flow_control
    .expect("a section");
    assert_eq!(parsed.no_endpoint_request_ttl, Some(Duration::from_secs(300)));
    assert!(parsed.enable_eviction);
    assert_eq!(parsed.usage_limit_ref.as_deref(), Some("static-usage-limit-policy"));
    assert_eq!(parsed.band_for(-3).max_requests, Some(2), "unlisted negative: negative template");
    assert_eq!(parsed.band_for(-3).priority, -3);
    assert_eq!(parsed.band_for(-1).max_requests, Some(7), "a listed band wins");
    assert_eq!(parsed.band_for(0).max_requests, Some(100), "zero is not negative");
    let defaults = config("flowControl: {defaultPriorityBand: {maxRequests: 100}}\n")
        .flow_control
        .expect("a section");
    assert_eq!(defaults.band_for(-3).max_requests, Some(100), "no negative template: default");
    assert_eq!(defaults.no_endpoint_request_ttl, None);
    assert!(!defaults.enable_eviction);
    assert_eq!(defaults.usage_limit.as_static().map(|l| l.threshold()), Some(1.0));
}

const POLICY_PLUGINS: &str = "plugins:
- type: first-picker
- {name: take-turns, type: round-robin-fairness-policy}
- {name: deadline, type: edf-ordering-policy}
- {name: headroom, type: static-usage-limit-policy, parameters: {threshold: 0.5}}
";

#[test]
fn references_resolve_to_declared_plugins_and_to_bare_type_names() {
    let config = config(&format!(
        "{POLICY_PLUGINS}flowControl:
  usageLimitPolicyPluginRef: headroom
  defaultPriorityBand: {{fairnessPolicyRef: take-turns}}
  defaultNegativePriorityBand: {{orderingPolicyRef: deadline}}
  priorityBands:
  - {{priority: 1, fairnessPolicyRef: round-robin-fairness-policy, orderingPolicyRef: edf-ordering-policy}}
  - {{priority: 2, fairnessPolicyRef: global-strict-fairness-policy}}
"
    ));
    let plugins = config.construct_plugins(&registry()).expect("plugins construct");
    let mut flow = config.flow_control.clone().expect("a section");
    resolve_policies(&mut flow, &plugins).expect("references resolve");
    assert_eq!(
        flow.usage_limit.as_static().map(|l| l.threshold()),
        Some(0.5),
        "the declared plugin's parameters"
    );
    assert_eq!(flow.default_band.fairness, FairnessPolicy::RoundRobin);
    assert_eq!(flow.band_for(-4).ordering, OrderingPolicy::Edf);
    assert_eq!(flow.band_for(-4).fairness, FairnessPolicy::GlobalStrict, "the default");
    assert_eq!(flow.bands[0].fairness, FairnessPolicy::RoundRobin, "undeclared type names work");
    assert_eq!(flow.bands[0].ordering, OrderingPolicy::Edf);
    assert_eq!(flow.bands[1].fairness, FairnessPolicy::GlobalStrict);
    // Policies stand in no profile: the implied default profile holds the picker alone.
    let scheduler = config.build_with(&plugins, &registry()).expect("a scheduler");
    assert_eq!(format!("{scheduler:?}").matches("take-turns").count(), 0);
}

#[test]
fn a_config_of_policies_alone_has_an_empty_default_profile() {
    let config =
        config("plugins:\n- type: fcfs-ordering-policy\n- type: static-usage-limit-policy\n");
    let mut with_default_picker = registry();
    with_default_picker.register("max-score-picker", |_| Ok(Plugin::picker(First)));
    let scheduler = config.build(&with_default_picker).expect("the Go EPP's empty profile");
    let profile = &scheduler.profiles()[0];
    assert_eq!((profile.filters().count(), profile.scorers().len()), (0, 0));
    assert_eq!(profile.picker_name(), "max-score-picker");
    let referenced = self::config(
        "plugins:\n- type: first-picker\n- type: fcfs-ordering-policy\nschedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: fcfs-ordering-policy\n",
    );
    // Listed in a profile, a policy is ignored there as the Go loader ignores it.
    let scheduler = referenced.build(&registry()).expect("a policy in a profile is ignored");
    let profile = &scheduler.profiles()[0];
    assert_eq!((profile.filters().count(), profile.scorers().len()), (0, 0));
    assert_eq!(profile.picker_name(), "first-picker");
}

#[test]
fn bad_references_name_the_field() {
    let error = |tail: &str| {
        let config = config(&format!(
            "featureGates: [flowControl]\n{POLICY_PLUGINS}- type: queue-scorer\n{tail}"
        ));
        admission(&config).expect_err("refused")
    };
    assert_eq!(
        error("flowControl: {priorityBands: [{priority: 1, fairnessPolicyRef: lottery}]}\n"),
        "flowControl.priorityBands[0].fairnessPolicyRef: 'lottery' names no declared plugin and no fairness policy type"
    );
    assert_eq!(
        error("flowControl: {defaultNegativePriorityBand: {orderingPolicyRef: take-turns}}\n"),
        "flowControl.defaultNegativePriorityBand.orderingPolicyRef: 'take-turns' (type 'round-robin-fairness-policy') is not a ordering policy"
    );
    assert_eq!(
        error("flowControl: {usageLimitPolicyPluginRef: queue-scorer}\n"),
        "flowControl.usageLimitPolicyPluginRef: 'queue-scorer' (type 'queue-scorer') is not a usage limit policy"
    );
    assert_eq!(
        error("flowControl: {defaultPriorityBand: {orderingPolicyRef: lifo}}\n"),
        "flowControl.defaultPriorityBand.orderingPolicyRef: 'lifo' names no declared plugin and no ordering policy type"
    );
    let bad_threshold = EndpointPickerConfig::from_yaml(
        "plugins:\n- {type: static-usage-limit-policy, parameters: {threshold: 0}}\n",
    )
    .expect("parses")
    .construct_plugins(&registry())
    .expect_err("threshold 0 refused");
    assert!(bad_threshold.to_string().contains("threshold 0 must be in (0, 1]"), "{bad_threshold}");
}

#[test]
fn feature_gates_take_explicit_values() {
    let mode = |gates: &str| {
        let config = config(&format!("featureGates: {gates}\nplugins:\n- type: first-picker\n"));
        matches!(admission(&config).expect("valid").mode(), AdmissionMode::Queue(_))
    };
    assert!(mode("[flowControl]"));
    assert!(mode("[flowControl=true]"));
    assert!(!mode("[flowControl=false]"));
    assert!(!mode("[flowControl, flowControl=false]"), "the last entry wins");
    assert!(!mode("[]"));
    let unknown = EndpointPickerConfig::from_yaml("featureGates: [flowControl, warpDrive]\n")
        .expect_err("unknown gate");
    assert!(
        unknown.to_string().starts_with("featureGates[1]: feature gate 'warpDrive' is unknown"),
        "{unknown}"
    );
    let bad = EndpointPickerConfig::from_yaml("featureGates: [flowControl=sometimes]\n")
        .expect_err("bad value");
    assert!(bad.to_string().contains("'sometimes' is not a valid value"), "{bad}");
}

#[test]
fn the_usage_limit_holds_requests_below_full_saturation() {
    let gated = config(&format!(
        "featureGates: [flowControl]\n{POLICY_PLUGINS}flowControl: {{usageLimitPolicyPluginRef: headroom}}\n"
    ));
    let open = config("featureGates: [flowControl]\nplugins:\n- type: first-picker\n");
    let gated = admission(&gated).expect("valid");
    let open = admission(&open).expect("valid");
    let now = Instant::now();
    // 3 of 5 waiting: saturation 0.6, under the detector's limit but over the 0.5 ceiling.
    let busy = pool(3, now);
    let held = gated.submit(&mut request("chat"), 10, &busy, now);
    assert!(held.try_outcome().is_none(), "held at 0.6 by the 0.5 ceiling");
    assert!(
        matches!(open.submit(&mut request("chat"), 10, &busy, now).try_outcome(), Some(Ok(_))),
        "the default ceiling of 1 admits"
    );
    assert_eq!(gated.tick(&pool(2, now), now).admitted, 1, "0.4 is under the ceiling");
    assert!(matches!(held.try_outcome(), Some(Ok(_))));
}

fn no_endpoint_admission(ttl: &str) -> Admission {
    let config = config(&format!(
        "featureGates: [flowControl]\nplugins:\n- type: first-picker\nflowControl: {{defaultRequestTTL: {ttl}, noEndpointRequestTTL: 1s}}\n"
    ));
    admission(&config).expect("valid")
}

#[test]
fn while_the_pool_is_empty_requests_wait_the_no_endpoint_ttl() {
    let admission = no_endpoint_admission("60s");
    let now = Instant::now();
    let empty = PoolSnapshot::default();
    let waiting = admission.submit(&mut request("chat"), 10, &empty, now);
    let at = |millis| now + Duration::from_millis(millis);
    assert_eq!(admission.tick(&empty, at(900)).expired, 0);
    assert_eq!(admission.tick(&empty, at(1000)).expired, 1, "1 s without endpoints");
    let outcome = waiting.try_outcome();
    let Some(Err(rejection)) = outcome else { panic!("{outcome:?}") };
    assert_eq!(rejection, NotAdmitted::NoEndpoints { priority: 2, waited: Duration::from_secs(1) });
    assert_eq!(rejection.http_status(), 503, "unavailability, not backpressure");
}

#[test]
fn a_regime_change_moves_queued_requests_to_the_other_budget() {
    let admission = no_endpoint_admission("60s");
    let now = Instant::now();
    let at = |millis| now + Duration::from_millis(millis);
    let empty = PoolSnapshot::default();
    let waiting = admission.submit(&mut request("chat"), 10, &empty, now);
    // Endpoints appear (saturated) before the 1 s budget is spent: the 60 s budget applies.
    assert_eq!(admission.tick(&pool(9, at(500)), at(500)).expired, 0);
    assert_eq!(admission.tick(&pool(9, at(1500)), at(1500)).expired, 0);
    assert!(waiting.try_outcome().is_none(), "on defaultRequestTTL now");
    // They vanish again: a fresh 1 s budget from then.
    assert_eq!(admission.tick(&empty, at(2000)).expired, 0);
    assert_eq!(admission.tick(&empty, at(2900)).expired, 0);
    assert_eq!(admission.tick(&empty, at(3000)).expired, 1);
}

#[test]
fn total_wait_is_bounded_by_the_longer_budget() {
    let admission = no_endpoint_admission("2s");
    let now = Instant::now();
    let at = |millis| now + Duration::from_millis(millis);
    let waiting = admission.submit(&mut request("chat"), 10, &pool(9, now), now);
    let empty = PoolSnapshot::default();
    // Empty from 1.5 s: its fresh 1 s budget would run to 2.5 s, but 2 s is the bound.
    assert_eq!(admission.tick(&empty, at(1500)).expired, 0);
    assert_eq!(admission.tick(&empty, at(2000)).expired, 1);
    assert!(matches!(waiting.try_outcome(), Some(Err(NotAdmitted::NoEndpoints { .. }))));
    // Expiring while the pool has endpoints is backpressure (429).
    let saturated = admission.submit(&mut request("chat"), 10, &pool(9, at(2000)), at(2000));
    assert_eq!(admission.tick(&pool(9, at(4000)), at(4000)).expired, 1);
    assert!(matches!(saturated.try_outcome(), Some(Err(NotAdmitted::Expired { .. }))));
}

#[test]
fn a_waiting_request_evicts_a_sheddable_one_in_flight() {
    let config = config(
        "featureGates: [flowControl]\nplugins:\n- type: first-picker\nflowControl: {enableEviction: true}\n",
    );
    let admission = admission(&config).expect("valid");
    let controller = admission.controller().expect("queues");
    let in_flight = controller.in_flight().expect("eviction on");
    let now = Instant::now();
    let mut batch = request("batch");
    assert!(matches!(
        admission.submit(&mut batch, 10, &pool(0, now), now).try_outcome(),
        Some(Ok(_))
    ));
    let batch_guard = in_flight.track(batch.priority);
    let critical_guard = in_flight.track(0);
    // The pool fills; a priority-2 request waits and the batch request makes room.
    let waiting = admission.submit(&mut request("chat"), 10, &pool(9, now), now);
    assert!(waiting.try_outcome().is_none());
    assert!(batch_guard.is_evicted(), "the sheddable request in flight is evicted");
    assert!(!critical_guard.is_evicted(), "priority 0 is never evicted");
    assert_eq!(controller.metrics().outcome(OutcomeReason::Evicted), 1);
    assert_eq!(admission.tick(&pool(9, now), now).admitted, 0);
    assert!(!critical_guard.is_evicted(), "still not, on later passes");
    drop(batch_guard);
    assert_eq!(admission.release(&pool(0, now), now).admitted, 1, "its room goes to the waiter");
    assert!(matches!(waiting.try_outcome(), Some(Ok(_))));
}

#[test]
fn without_eviction_nothing_is_tracked() {
    let config = config("featureGates: [flowControl]\nplugins:\n- type: first-picker\n");
    let admission = admission(&config).expect("valid");
    assert!(admission.controller().expect("queues").in_flight().is_none());
}
