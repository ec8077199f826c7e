//! `inflight-load-producer` and its reader, `utilization-filter`'s `active-requests`.
//! Expected behaviour from llm-d-router's `dataproducer/inflightload/producer.go`,
//! `token_estimator.go` and `filter/utilization/filter.go` (ebab687).

use std::sync::Arc;
use std::time::Instant;

use proptest::prelude::*;
use scheduler_core::{
    CompletionGuard, CycleState, Endpoint, EndpointId, EndpointPickerConfig, EndpointState,
    InferenceRequest, Outcome, PoolSnapshot, ScheduleOptions, Scheduler,
};
use scorers::{InFlightLoad, InFlightLoadParameters};
use serde_json::json;

fn registry() -> scheduler_core::PluginRegistry {
    let mut registry = scorers::builtin_registry();
    registry.allow_experimental_plugins(true);
    registry
}

/// The scheduler of `yaml` and the in-flight producer named `producer` in it.
fn build(yaml: &str, producer: &str) -> (Scheduler, Arc<InFlightLoad>) {
    let config = EndpointPickerConfig::from_yaml(yaml).unwrap();
    let plugins = config.construct_plugins(&registry()).unwrap();
    let load = plugins
        .get(producer)
        .and_then(|declared| declared.plugin.shared.clone())
        .and_then(|shared| shared.downcast::<InFlightLoad>().ok())
        .expect("an in-flight producer");
    (config.build_with(&plugins, &registry()).unwrap(), load)
}

fn pool(n: u16) -> Arc<PoolSnapshot> {
    Arc::new(PoolSnapshot::new(
        (0..n).map(|i| EndpointState::new(Endpoint::new(([10, 0, 0, 1], 8000 + i).into()))),
    ))
}

fn id(port: u16) -> EndpointId {
    EndpointId::from_address(([10, 0, 0, 1], port).into())
}

fn request(id: &str, prompt_chars: usize) -> InferenceRequest {
    InferenceRequest::new("m", "x".repeat(prompt_chars)).with_request_id(id)
}

/// Schedules and keeps the request in flight: its port and completion guard.
fn send(
    scheduler: &Scheduler,
    request: &InferenceRequest,
    pool: &Arc<PoolSnapshot>,
    seed: u64,
) -> Option<(u16, CompletionGuard)> {
    let options = ScheduleOptions { seed: Some(seed), ..Default::default() };
    let mut result = scheduler.schedule_with(request, pool, options).ok()?;
    let port = result.primary().endpoint.address.port();
    Some((port, result.take_completion().unwrap()))
}

const AT_MOST_ONE_IN_FLIGHT: &str = "
plugins:
- type: utilization-filter
  parameters:
    conditions: [{metric: active-requests, maxValue: 1}]
- type: random-picker
";

#[test]
fn active_requests_caps_what_this_picker_has_in_flight() {
    // No producer declared: the default one is created, as Go creates it.
    let (scheduler, load) = build(AT_MOST_ONE_IN_FLIGHT, "inflight-load-producer");
    let pool = pool(2);
    let mut in_flight = Vec::new();
    for n in 0..4 {
        let (port, guard) = send(&scheduler, &request(&format!("r{n}"), 40), &pool, n).unwrap();
        in_flight.push((port, guard));
    }
    // Two each: a third would exceed the cap of one... after the second, both are at 2 > 1.
    let count = |port| in_flight.iter().filter(|(p, _)| *p == port).count();
    assert_eq!((count(8000), count(8001)), (2, 2));
    assert_eq!((load.requests(id(8000)), load.requests(id(8001))), (2, 2));
    assert!(send(&scheduler, &request("r9", 40), &pool, 9).is_none(), "every endpoint is over");
    // One ends on 8001: it is back to one in flight, within the cap.
    let at = in_flight.iter().position(|(port, _)| *port == 8001).unwrap();
    in_flight.swap_remove(at).1.finish(Outcome::Completed);
    assert_eq!(load.requests(id(8001)), 1);
    for seed in 10..20 {
        let (port, guard) = send(&scheduler, &request("again", 40), &pool, seed).unwrap();
        assert_eq!(port, 8001);
        drop(guard); // a cancelled request releases too
    }
    assert_eq!(load.requests(id(8001)), 1);
}

#[test]
fn a_named_producer_is_read_and_a_missing_one_refused() {
    let yaml = "
plugins:
- type: inflight-load-producer
  name: load
  parameters: {addEstimatedOutputTokens: true, outputRatio: 0.5}
- type: utilization-filter
  parameters:
    inFlightLoadProducerName: load
    conditions: [{metric: active-requests, maxValue: 0}]
- type: random-picker
";
    let (scheduler, load) = build(yaml, "load");
    let pool = pool(2);
    let (first, _kept) = send(&scheduler, &request("a", 40), &pool, 1).unwrap();
    // 40 characters are 10 prompt tokens, plus round(10 * 0.5) estimated output tokens.
    assert_eq!(load.tokens(id(first)), 15);
    for seed in 2..12 {
        let (port, _guard) = send(&scheduler, &request("b", 4), &pool, seed).unwrap();
        assert_ne!(port, first);
    }
    let config =
        EndpointPickerConfig::from_yaml(&yaml.replace("name: load", "name: other")).unwrap();
    let error = config.build(&registry()).unwrap_err().to_string();
    assert!(error.contains("no inflight-load-producer named 'load'"), "{error}");
    // A non-default name is never created by default.
    let plugins = config.construct_plugins(&registry());
    assert!(plugins.is_err());
}

#[test]
fn tokens_leave_when_the_response_starts_and_requests_when_it_ends() {
    let yaml = "plugins:\n- type: inflight-load-producer\n- type: random-picker\n";
    let (scheduler, load) = build(yaml, "inflight-load-producer");
    let pool = pool(1);
    let (_, mut guard) = send(&scheduler, &request("r", 400), &pool, 1).unwrap();
    assert_eq!((load.requests(id(8000)), load.tokens(id(8000))), (1, 100));
    guard.response_started();
    assert_eq!((load.requests(id(8000)), load.tokens(id(8000))), (1, 0), "prefill is over");
    guard.finish(Outcome::Completed);
    assert_eq!((load.requests(id(8000)), load.tokens(id(8000))), (0, 0));

    // With estimated output, the decode endpoint keeps its tokens until the end.
    let yaml = "plugins:\n- type: inflight-load-producer\n  parameters: {addEstimatedOutputTokens: true, maxEstimatedOutputTokens: 30}\n- type: random-picker\n";
    let (scheduler, load) = build(yaml, "inflight-load-producer");
    let (_, mut guard) = send(&scheduler, &request("r", 400), &pool, 1).unwrap();
    // 100 prompt tokens, round(100 * 1.5) = 150 output tokens capped at 30.
    assert_eq!(load.tokens(id(8000)), 130);
    guard.response_started();
    assert_eq!(load.tokens(id(8000)), 130);
    drop(guard);
    assert_eq!((load.requests(id(8000)), load.tokens(id(8000))), (0, 0));

    // Requests are told apart by decision, not request id: two without an id, and two with
    // the same id, each count once and each release only their own.
    let (scheduler, load) =
        build("plugins:\n- type: inflight-load-producer\n", "inflight-load-producer");
    let (_, anonymous) = send(&scheduler, &InferenceRequest::new("m", "hello"), &pool, 1).unwrap();
    let (_, other) = send(&scheduler, &InferenceRequest::new("m", "hello"), &pool, 2).unwrap();
    let (_, same_a) = send(&scheduler, &request("dup", 4), &pool, 3).unwrap();
    let (_, same_b) = send(&scheduler, &request("dup", 4), &pool, 4).unwrap();
    assert_eq!(load.requests(id(8000)), 4);
    drop(anonymous);
    drop(same_a);
    assert_eq!(load.requests(id(8000)), 2);
    drop((other, same_b));
    assert_eq!(load.requests(id(8000)), 0);
}

#[test]
fn output_estimates_and_parameters_follow_go() {
    let producer = |parameters: serde_json::Value| {
        let parameters: InFlightLoadParameters = serde_json::from_value(parameters).unwrap();
        InFlightLoad::new(&parameters).map_err(|error| error.to_string())
    };
    let default = producer(json!({})).unwrap();
    assert_eq!(default.estimated_output(0), 0);
    assert_eq!(default.estimated_output(3), 5, "round(4.5) is 5, half away from zero");
    assert_eq!(default.estimated_output(10), 15);
    let capped = producer(json!({"outputRatio": 2.0, "maxEstimatedOutputTokens": 7})).unwrap();
    assert_eq!((capped.estimated_output(3), capped.estimated_output(10)), (6, 7));
    assert_eq!(
        default.request_tokens(&request("r", 40)),
        10,
        "without addEstimatedOutputTokens, the prompt alone"
    );
    assert!(producer(json!({"outputRatio": -1})).unwrap_err().contains("outputRatio"));
    assert!(
        producer(json!({"maxEstimatedOutputTokens": -1})).unwrap_err().contains("maxEstimated")
    );
    assert!(
        producer(json!({"prefixMatchInfoProducerName": "p", "syncCrossReplicaState": false}))
            .is_ok()
    );
    assert!(serde_json::from_value::<InFlightLoadParameters>(json!({"ratio": 1})).is_err());
}

/// One step of the model check: send a request, or end the one in flight at a position.
#[derive(Clone, Debug)]
enum Step {
    Send(u64),
    End(usize),
}

proptest! {
    /// The filter keeps exactly the candidates whose in-flight count (per a plain model of the
    /// requests sent and not ended) is within the cap, in order, and removes nothing else.
    #[test]
    fn the_filter_only_removes_endpoints_over_the_modelled_cap(
        cap in 0u32..3,
        steps in proptest::collection::vec(
            prop_oneof![(0u64..1000).prop_map(Step::Send), (0usize..8).prop_map(Step::End)],
            1..40,
        ),
    ) {
        let yaml = format!("plugins:\n- type: inflight-load-producer\n- type: utilization-filter\n  parameters:\n    conditions: [{{metric: active-requests, maxValue: {cap}}}]\n    fallbackOnEmpty: true\n- type: random-picker\n");
        let config = EndpointPickerConfig::from_yaml(&yaml).unwrap();
        let plugins = config.construct_plugins(&registry()).unwrap();
        let filter = plugins.get("utilization-filter").unwrap().plugin.filter.clone().unwrap();
        let scheduler = config.build_with(&plugins, &registry()).unwrap();
        let pool = pool(4);
        let mut in_flight: Vec<(u16, CompletionGuard)> = Vec::new();
        for (n, step) in steps.into_iter().enumerate() {
            match step {
                Step::Send(seed) => {
                    let sent = send(&scheduler, &request(&format!("r{n}"), 8), &pool, seed);
                    in_flight.push(sent.expect("fallbackOnEmpty always routes"));
                }
                Step::End(at) if at < in_flight.len() => in_flight.swap_remove(at).1.finish(Outcome::Completed),
                Step::End(_) => {}
            }
            let mut candidates = vec![3, 1, 0, 2];
            let before = candidates.clone();
            filter.filter(&mut CycleState::new(Instant::now(), 0), &InferenceRequest::new("m", "p"), &pool, &mut candidates);
            let within: Vec<u32> = before.iter().copied().filter(|&i| {
                let port = 8000 + i as u16;
                in_flight.iter().filter(|(p, _)| *p == port).count() <= cap as usize
            }).collect();
            if within.is_empty() {
                prop_assert_eq!(&candidates, &before);
            } else {
                prop_assert_eq!(&candidates, &within);
            }
        }
    }
}

// scorer/tokenload/token_load.go: 1 - min(t, T) / T, t = the producer's in-flight tokens on
// the endpoint + the tokens the request would add there.
#[test]
fn token_load_reads_the_producers_tokens() {
    let yaml = "plugins:\n- type: token-load-scorer\n  parameters: {queueThresholdTokens: 1000}\n- type: max-score-picker\n";
    let (scheduler, load) = build(yaml, "inflight-load-producer");
    let pool = pool(2);
    let scores = |request: &InferenceRequest| {
        let options = ScheduleOptions { explain: true, seed: Some(1), ..Default::default() };
        let result = scheduler.schedule_with(request, &pool, options).unwrap();
        result.explanation().unwrap()[0].scorers[0].2.clone()
    };
    let (busy, mut guard) = send(&scheduler, &request("a", 400), &pool, 1).unwrap();
    assert_eq!(load.tokens(id(busy)), 100);
    let mut expected = [0.9, 0.9];
    expected[usize::from(busy - 8000)] = 0.8;
    let got = scores(&request("b", 400));
    assert!(got.iter().zip(expected).all(|(got, want)| (got - want).abs() < 1e-12), "{got:?}");
    // Its prefill over, the request's tokens no longer weigh.
    guard.response_started();
    let got = scores(&request("c", 400));
    assert!(got.iter().all(|score| (score - 0.9).abs() < 1e-12), "{got:?}");
    // A producer name the config does not declare is refused.
    let named =
        "plugins:\n- type: token-load-scorer\n  parameters: {inFlightLoadProducerName: mine}\n";
    let error = EndpointPickerConfig::from_yaml(named).unwrap().build(&registry()).unwrap_err();
    assert!(error.to_string().contains("no inflight-load-producer named 'mine'"), "{error}");
}

/// Cross-replica sync: the peers' counts are added to this replica's own, and the local
/// counts a syncer publishes are this replica's only.
#[test]
fn peer_counts_add_to_own_and_local_counts_exclude_them() {
    use scorers::{InFlightCounts, SharedInFlight, shared_in_flight};
    let (scheduler, load) = build(AT_MOST_ONE_IN_FLIGHT, "inflight-load-producer");
    let config = EndpointPickerConfig::from_yaml(AT_MOST_ONE_IN_FLIGHT).unwrap();
    let plugins = config.construct_plugins(&registry()).unwrap();
    assert_eq!(
        shared_in_flight(&plugins).into_iter().map(|(name, _)| name).collect::<Vec<_>>(),
        ["inflight-load-producer"]
    );
    let pool = pool(2);
    let mut peers = scheduler_core::EndpointMap::default();
    // A peer has 5 requests on 8000: the filter (max 1) leaves only 8001.
    peers.insert(id(8000), InFlightCounts { requests: 5, tokens: 50 });
    load.peers().replace(peers);
    assert_eq!(load.requests(id(8000)), 5);
    assert_eq!(load.tokens(id(8000)), 50);
    for n in 0..3 {
        let (port, _guard) = send(&scheduler, &request(&format!("p{n}"), 40), &pool, n).unwrap();
        assert_eq!(port, 8001, "a peer's load on 8000 must count");
    }
    let (_, guard) = send(&scheduler, &request("kept", 40), &pool, 9).unwrap();
    let mut local = Vec::new();
    load.local_in_flight(&mut local);
    assert_eq!(local, [(id(8001), InFlightCounts { requests: 1, tokens: 10 })]);
    drop(guard);
    load.peers().clear();
    assert_eq!(load.requests(id(8000)), 0);
}

#[test]
fn active_request_scorer_scores_own_plus_peer_counts() {
    use scorers::{ActiveRequestScorer, InFlightCounts, SharedInFlight};
    let scorer = ActiveRequestScorer::new();
    let pool = pool(2);
    let mut peers = scheduler_core::EndpointMap::default();
    peers.insert(id(8000), InFlightCounts { requests: 3, tokens: 0 });
    scorer.peers().replace(peers);
    let mut scores = [0.0; 2];
    let indices = [0, 1];
    scheduler_core::Scorer::score(
        &scorer,
        &mut CycleState::new(Instant::now(), 0),
        &request("r", 4),
        scheduler_core::Candidates::new(&pool, &indices),
        &mut scores,
    );
    let busy = pool.index_of(id(8000)).unwrap() as usize;
    assert_eq!(scores[busy], 0.0, "3 of a max of 3 in flight");
    assert_eq!(scores[1 - busy], 1.0, "idle");
}
