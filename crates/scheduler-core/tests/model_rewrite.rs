//! Model rewrites through the director: the target model, the rule reported, strict refusals.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use scheduler_core::rewrite::ModelRewrites;
use scheduler_core::{
    Candidates, CycleState, Director, DirectorOptions, Endpoint, EndpointState, Picker,
    PoolSnapshot, Rejection, Routed, Scheduler, SchedulerProfile, SharedPool, SingleProfileHandler,
};

#[derive(Debug)]
struct First;

impl Picker for First {
    fn pick(&self, _: &mut CycleState, _: Candidates<'_>, _: &[f64], picked: &mut Vec<u32>) {
        picked.push(0);
    }
}

fn director() -> Director {
    let profile = SchedulerProfile::new("default", "first", Arc::new(First));
    let scheduler = Scheduler::new(vec![profile], Arc::new(SingleProfileHandler));
    let pool = SharedPool::new(PoolSnapshot::new([EndpointState::new(Endpoint::new(
        "10.0.0.1:8000".parse().unwrap(),
    ))]));
    Director::new(Arc::new(scheduler), Arc::new(pool), DirectorOptions::default())
}

/// Without flow control a decision never waits, so one poll settles it.
fn decide(director: &Director, headers: &[(&str, &str)], body: &str) -> Result<Routed, Rejection> {
    let headers: Vec<(String, String)> =
        headers.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect();
    let mut decision = pin!(director.decide(&headers, body.as_bytes(), None));
    match decision.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(outcome) => outcome,
        Poll::Pending => panic!("a decision without flow control does not wait"),
    }
}

const REWRITES: &str = "\
kind: InferenceModelRewrite
metadata: {name: alias}
spec:
  rules:
  - matches: [{model: {value: small-segment-lora}}]
    targets: [{modelRewrite: small-segment-lora-v1}]
";

#[test]
fn a_matching_rule_sets_the_target_and_names_itself() {
    let director = director();
    director.set_model_rewrites(Some(Arc::new(ModelRewrites::from_yaml(REWRITES).unwrap())));
    let body = r#"{"model":"small-segment-lora","prompt":"hi"}"#;
    let routed = decide(&director, &[], body).expect("routed");
    assert_eq!(routed.request.model, "small-segment-lora", "what the client asked is kept");
    assert_eq!(routed.request.target_model, "small-segment-lora-v1");
    assert_eq!(routed.request.model_rewrite.as_deref(), Some("alias"));

    // A rule overrides the gateway's rewrite header; without a rule the header stands.
    let routed =
        decide(&director, &[("x-gateway-model-name-rewrite", "from-gateway")], body).unwrap();
    assert_eq!(routed.request.target_model, "small-segment-lora-v1");
    let other = r#"{"model":"llama","prompt":"hi"}"#;
    let routed =
        decide(&director, &[("x-llm-d-model-name-rewrite", "from-gateway")], other).unwrap();
    assert_eq!(routed.request.target_model, "from-gateway");
    assert_eq!(routed.request.model_rewrite, None);

    director.set_model_rewrites(None);
    let routed = decide(&director, &[], body).unwrap();
    assert_eq!(routed.request.target_model, "small-segment-lora", "rewrites removed");
}

#[test]
fn strict_rewrites_refuse_unknown_models_with_404() {
    let director = director();
    let strict = ModelRewrites::from_yaml(REWRITES).unwrap().strict(true);
    director.set_model_rewrites(Some(Arc::new(strict)));
    let refused = decide(&director, &[], r#"{"model":"llama","prompt":"hi"}"#)
        .expect_err("llama is not served");
    assert_eq!((refused.status(), refused.code()), (404, "model_not_found"));
    assert_eq!(refused.to_string(), "model 'llama' is not served by this pool");

    let long = "é".repeat(1_000);
    let refused = decide(&director, &[], &format!(r#"{{"model":"{long}","prompt":"hi"}}"#))
        .expect_err("unknown");
    let Rejection::UnknownModel { model } = refused else { panic!("{refused:?}") };
    assert!(model.len() <= scheduler_core::MAX_REPORTED_MODEL_BYTES && model.starts_with('é'));

    // Targets are served under their own names.
    let body = r#"{"model":"small-segment-lora-v1","prompt":"hi"}"#;
    assert_eq!(decide(&director, &[], body).unwrap().request.target_model, "small-segment-lora-v1");
}
