//! The llm-d-router policy plugins seen through flow control and the director:
//! `soft-reflective-ceiling-policy` (usage limit by band rank), `priority-holdback-policy`
//! (fixed ceilings by band), `program-aware-fairness`
//! (least attained service first) and `probabilistic-admitter` (sheds sheddable requests).

use std::sync::Arc;
use std::time::{Duration, Instant};

use scheduler_core::admitter::{ProbabilisticAdmitter, ProbabilisticAdmitterParameters};
use scheduler_core::flow::{
    Admission, BandConfig, FairnessPolicy, FlowControlConfig, FlowController, FlowMetrics,
    FlowRequest, InferenceObjectiveConfig, ObjectiveResolver, PermitDetector, ProgramAwareFairness,
    ProgramAwareParameters, UsageLimitPolicy,
};
use scheduler_core::{
    Candidates, CompletedRequest, CycleState, Director, DirectorOptions, Endpoint, EndpointId,
    EndpointMetrics, EndpointPickerConfig, EndpointState, InferenceRequest, Outcome, Picker,
    Plugin, PluginRegistry, PoolSnapshot, Rejection, ResponseComplete, Scheduler, SchedulerProfile,
    SharedPool, SingleProfileHandler,
};

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
    registry.allow_experimental_plugins(true);
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

fn request(objective: &str) -> InferenceRequest {
    let mut request = InferenceRequest::new("m", "p");
    request.objective = Some(objective.to_owned());
    request
}

/// One endpoint whose KV-cache use gives utilization saturation `saturation` (threshold 0.8).
fn pool_at(saturation: f64, now: Instant) -> PoolSnapshot {
    let metrics =
        EndpointMetrics { kv_usage: saturation * 0.8, updated_at: Some(now), ..Default::default() };
    PoolSnapshot::new([
        EndpointState::new(Endpoint::new(([10, 0, 0, 1], 8000).into())).with_metrics(metrics)
    ])
}

#[test]
fn the_soft_reflective_ceiling_lets_a_gated_band_through_one_cycle_in_period() {
    let config = EndpointPickerConfig::from_yaml(
        "featureGates: [flowControl]
plugins:
- type: first-picker
- type: soft-reflective-ceiling-policy
flowControl:
  usageLimitPolicyPluginRef: soft-reflective-ceiling-policy
",
    )
    .expect("valid");
    let plugins = config.construct_plugins(&registry()).expect("plugins");
    let admission = Admission::from_config(&config, &plugins, objectives()).expect("valid");
    let controller = admission.controller().expect("flow control is on");
    assert!(matches!(controller.config().usage_limit, UsageLimitPolicy::SoftReflective(_)));
    let now = Instant::now();
    let pool = pool_at(0.75, now);
    // The top band dispatches below saturation 1.
    let chat = admission.submit(&mut request("chat"), 10, &pool, now);
    assert!(matches!(chat.try_outcome(), Some(Ok(_))));
    // The second of two bands has reflective ceiling 0.25, reached at 0.75: it alternates
    // with period round(0.75 / 0.25) = 3, open on every third dispatch cycle. Submitting
    // takes two cycles (the admit-at-once check, then the pass over the queue), both closed.
    let batch = admission.submit(&mut request("batch"), 10, &pool, now);
    assert!(batch.try_outcome().is_none(), "held on the closed cycles");
    assert_eq!(admission.tick(&pool, now).admitted, 1, "let through on the open cycle");
    assert!(matches!(batch.try_outcome(), Some(Ok(_))));
    // Below its reflective ceiling the band is simply open.
    let calm = pool_at(0.2, now);
    assert!(matches!(
        admission.submit(&mut request("batch"), 10, &calm, now).try_outcome(),
        Some(Ok(_))
    ));
}

#[test]
fn the_soft_reflective_ceiling_is_experimental_and_must_be_declared() {
    let config = EndpointPickerConfig::from_yaml(
        "featureGates: [flowControl]
plugins:
- type: first-picker
- type: soft-reflective-ceiling-policy
",
    )
    .expect("valid");
    let mut strict = registry();
    strict.allow_experimental_plugins(false);
    let error = config.construct_plugins(&strict).unwrap_err().to_string();
    assert!(error.contains("is experimental"), "{error}");
    let undeclared = EndpointPickerConfig::from_yaml(
        "featureGates: [flowControl]
plugins:
- type: first-picker
flowControl:
  usageLimitPolicyPluginRef: soft-reflective-ceiling-policy
",
    )
    .expect("valid");
    let plugins = undeclared.construct_plugins(&registry()).expect("plugins");
    let error = Admission::from_config(&undeclared, &plugins, objectives()).unwrap_err();
    assert!(error.to_string().contains("names no declared plugin"), "{error}");
}

#[test]
fn priority_holdback_holds_the_lower_band_from_its_min_ceiling() {
    // The README's example: ceilings 0.9 for the higher band (chat), 0.4 for the lower (batch).
    let config = EndpointPickerConfig::from_yaml(
        "featureGates: [flowControl]
plugins:
- type: first-picker
- type: priority-holdback-policy
  name: my-holdback-policy
  parameters: {shape: linear, domain: rank, minCeiling: 0.4, maxCeiling: 0.9}
flowControl:
  usageLimitPolicyPluginRef: my-holdback-policy
  priorityBands:
  - priority: 2
  - priority: -1
",
    )
    .expect("valid");
    let plugins = config.construct_plugins(&registry()).expect("plugins");
    let admission = Admission::from_config(&config, &plugins, objectives()).expect("valid");
    let controller = admission.controller().expect("flow control is on");
    assert!(matches!(controller.config().usage_limit, UsageLimitPolicy::Holdback(_)));
    let now = Instant::now();
    let below = pool_at(0.39, now);
    assert!(matches!(
        admission.submit(&mut request("batch"), 10, &below, now).try_outcome(),
        Some(Ok(_))
    ));
    let busy = pool_at(0.5, now);
    let batch = admission.submit(&mut request("batch"), 10, &busy, now);
    assert!(batch.try_outcome().is_none(), "held back at 0.5, past its ceiling 0.4");
    let chat = admission.submit(&mut request("chat"), 10, &busy, now);
    assert!(matches!(chat.try_outcome(), Some(Ok(_))), "the higher band flows up to 0.9");
    let nearly_full = pool_at(0.9, now);
    let chat = admission.submit(&mut request("chat"), 10, &nearly_full, now);
    assert!(chat.try_outcome().is_none(), "held at its own ceiling 0.9");
    assert_eq!(admission.tick(&pool_at(0.45, now), now).admitted, 1, "chat goes first");
    assert!(matches!(chat.try_outcome(), Some(Ok(_))));
    assert!(batch.try_outcome().is_none());
    assert_eq!(admission.tick(&pool_at(0.3, now), now).admitted, 1);
    assert!(matches!(batch.try_outcome(), Some(Ok(_))));
}

#[test]
fn priority_holdback_is_experimental_and_needs_min_ceiling() {
    let declared = |parameters: &str| {
        EndpointPickerConfig::from_yaml(&format!(
            "plugins:
- type: first-picker
- type: priority-holdback-policy
  parameters: {parameters}
"
        ))
        .expect("valid yaml")
    };
    let mut strict = registry();
    strict.allow_experimental_plugins(false);
    let error = declared("{minCeiling: 0.5}").construct_plugins(&strict).unwrap_err().to_string();
    assert!(error.contains("is experimental"), "{error}");
    let error = declared("{domain: value}").construct_plugins(&registry()).unwrap_err().to_string();
    assert!(error.contains("minCeiling is required"), "{error}");
    let error = declared("{minCeiling: 0.5, steps: 3}")
        .construct_plugins(&registry())
        .unwrap_err()
        .to_string();
    assert!(error.contains("unknown field `steps`"), "{error}");
}

fn completed(fairness_id: &str, prompt: u64, completion: u64) -> CompletedRequest {
    CompletedRequest {
        request_id: String::new(),
        target_model: String::new(),
        scheduled_endpoint: EndpointId(1),
        served_endpoint: None,
        prompt_tokens: Some(prompt),
        completion_tokens: Some(completion),
        outcome: Outcome::Completed,
        fairness_id: Some(fairness_id.to_owned()),
        decision_id: 0,
    }
}

#[test]
fn program_aware_fairness_serves_the_least_served_program_first() {
    let fairness = Arc::new(ProgramAwareFairness::default());
    // "heavy" has consumed a lot; "light" a little (completion hooks account it).
    fairness.record_dispatched("heavy", Instant::now());
    fairness.response_complete(&completed("heavy", 4000, 2000));
    fairness.record_dispatched("light", Instant::now());
    fairness.response_complete(&completed("light", 10, 10));
    let config = FlowControlConfig {
        default_band: BandConfig {
            fairness: FairnessPolicy::ProgramAware(Arc::clone(&fairness)),
            ..BandConfig::default()
        },
        ..FlowControlConfig::default()
    };
    let permits = Arc::new(PermitDetector::new(0));
    let controller = FlowController::new(config, permits.clone(), Arc::new(FlowMetrics::new()));
    let pool = PoolSnapshot::default();
    let now = Instant::now();
    let submit = |flow_id| {
        controller.enqueue(
            FlowRequest { priority: 0, flow_id, size_bytes: 1, ttl: None, slo_ttft: None },
            &pool,
            now,
        )
    };
    // "heavy" queues first, so it also has the older head.
    let heavy = [submit("heavy"), submit("heavy")];
    let light = [submit("light"), submit("light")];
    let mut order = Vec::new();
    for step in 1..=4u64 {
        permits.return_permit();
        let at = now + Duration::from_millis(step);
        controller.release(&pool, at);
        for (name, tickets) in [("heavy", &heavy), ("light", &light)] {
            let done = tickets.iter().filter(|t| t.try_outcome().is_some()).count();
            let seen = order.iter().filter(|n| **n == name).count();
            if done > seen {
                order.push(name);
            }
        }
    }
    assert_eq!(order, ["light", "light", "heavy", "heavy"]);
    assert!(fairness.fairness_index() > 0.0 && fairness.fairness_index() <= 1.0);
}

#[test]
fn program_aware_fairness_parses_from_config_and_plays_its_hooks() {
    let config = EndpointPickerConfig::from_yaml(
        "featureGates: [flowControl]
plugins:
- type: first-picker
- type: program-aware-fairness
  parameters: {lasWeightService: 0.5, lasWeightHeadWait: 0.5, lasHalfLifeSeconds: 0}
flowControl:
  defaultPriorityBand:
    fairnessPolicyRef: program-aware-fairness
",
    )
    .expect("valid");
    let plugins = config.construct_plugins(&registry()).expect("plugins");
    let declared = plugins.get("program-aware-fairness").expect("declared");
    assert!(declared.plugin.pre_request.is_some() && declared.plugin.response_complete.is_some());
    let admission = Admission::from_config(&config, &plugins, objectives()).expect("valid");
    let controller = admission.controller().expect("flow control is on");
    assert!(matches!(controller.config().default_band.fairness, FairnessPolicy::ProgramAware(_)));

    let bad = EndpointPickerConfig::from_yaml(
        "plugins:
- type: program-aware-fairness
  parameters: {evictionSweepSeconds: 0}
",
    )
    .expect("valid yaml");
    let error = bad.construct_plugins(&registry()).unwrap_err().to_string();
    assert!(error.contains("evictionSweepSeconds: must be a finite number > 0"), "{error}");
    let parameters = ProgramAwareParameters { strategy: "fifo".into(), ..Default::default() };
    assert!(ProgramAwareFairness::new(&parameters).is_err());
}

fn director_with(admitter: ProbabilisticAdmitter, waiting: u32) -> Director {
    let profile = SchedulerProfile::new("default", "first-picker", Arc::new(First));
    let scheduler = Scheduler::new(vec![profile], Arc::new(SingleProfileHandler));
    let metrics = EndpointMetrics {
        waiting_queue: waiting,
        updated_at: Some(Instant::now()),
        ..Default::default()
    };
    let pool = SharedPool::new(PoolSnapshot::new([EndpointState::new(Endpoint::new(
        ([10, 0, 0, 1], 8000).into(),
    ))
    .with_metrics(metrics)]));
    Director::new(Arc::new(scheduler), Arc::new(pool), DirectorOptions::default())
        .with_admitter(Arc::new(admitter))
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    loop {
        if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
    }
}

#[test]
fn the_director_consults_the_admitter_before_scheduling() {
    let admitter = |seed| {
        ProbabilisticAdmitter::seeded(&ProbabilisticAdmitterParameters::default(), seed)
            .expect("defaults")
    };
    // 5 waiting of a threshold of 5: saturation 1, so every sheddable request is shed.
    let director = director_with(admitter(1), 5);
    let mut sheddable = InferenceRequest::new("m", "p");
    sheddable.priority = -1;
    let Err(rejection) = block_on(director.decide_parsed(sheddable, 10, None)) else {
        panic!("a sheddable request at saturation 1 is shed");
    };
    assert!(matches!(rejection, Rejection::AdmissionDenied(_)));
    assert_eq!(rejection.status(), 500, "as the Go EPP reports a denial");
    assert_eq!(rejection.code(), "admission_denied");
    assert_eq!(rejection.dropped_reason(), None);
    assert!(
        rejection.to_string().starts_with("request cannot be admitted: probabilistic-admitter")
    );
    // Protected traffic goes through at any load.
    let protected = InferenceRequest::new("m", "p");
    assert!(block_on(director.decide_parsed(protected, 10, None)).is_ok());
    // An idle pool sheds nothing.
    let idle = director_with(admitter(2), 0);
    let mut sheddable = InferenceRequest::new("m", "p");
    sheddable.priority = -1;
    assert!(block_on(idle.decide_parsed(sheddable, 10, None)).is_ok());
}
