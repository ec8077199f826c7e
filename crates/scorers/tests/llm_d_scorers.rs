//! The llm-d-router scorers: load-aware, running-requests-size, token-load, no-hit LRU and
//! context-length-aware. Expected values are worked out by hand from llm-d-router's formulas.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use scheduler_core::{
    Candidates, CycleState, Endpoint, EndpointMetrics, EndpointPickerConfig, EndpointState, Filter,
    InferenceRequest, Plugin, PluginSpec, PoolSnapshot, Scheduler, SchedulerProfile, Scorer,
    SingleProfileHandler,
};
use scorers::{
    ContextLengthAware, ContextLengthParameters, LoadAwareScorer, MaxScorePicker,
    NoHitLruParameters, NoHitLruScorer, PrefixCacheParameters, PrefixCacheScorer,
    RunningRequestsSizeScorer, TokenLoadParameters, TokenLoadScorer, builtin_registry,
};
use serde_json::json;

fn state(i: u16, waiting_queue: u32, running: u32) -> EndpointState {
    EndpointState::new(Endpoint::new(([10, 0, 0, 1], 8000 + i).into())).with_metrics(
        EndpointMetrics {
            waiting_queue,
            running,
            updated_at: Some(Instant::now()),
            ..EndpointMetrics::default()
        },
    )
}

fn labelled(i: u16, range: Option<&str>) -> EndpointState {
    let mut state = state(i, 0, 0);
    if let Some(range) = range {
        state.endpoint = state.endpoint.with_label("llm-d.ai/context-length-range", range);
    }
    state
}

fn scores_of(scorer: &dyn Scorer, pool: &PoolSnapshot, request: &InferenceRequest) -> Vec<f64> {
    let indices: Vec<u32> = (0..pool.len() as u32).collect();
    let mut scores = vec![0.0; indices.len()];
    let mut cycle = CycleState::new(Instant::now(), 0);
    scorer.score(&mut cycle, request, Candidates::new(pool, &indices), &mut scores);
    scores
}

fn assert_close(actual: &[f64], expected: &[f64]) {
    assert_eq!(actual.len(), expected.len(), "{actual:?} vs {expected:?}");
    for (a, e) in actual.iter().zip(expected) {
        assert!((a - e).abs() < 1e-9, "{actual:?} vs {expected:?}");
    }
}

fn create(type_name: &str, parameters: serde_json::Value) -> Result<Plugin, String> {
    let spec = PluginSpec { name: type_name, type_name, parameters: Some(&parameters) };
    builtin_registry().create(&spec).map_err(|error| error.to_string())
}

fn refused(type_name: &str, parameters: serde_json::Value, parameter: &str) {
    match create(type_name, parameters.clone()) {
        Ok(_) => panic!("{type_name} accepted {parameters}"),
        Err(error) => assert!(error.contains(parameter), "{type_name}: {error}"),
    }
}

#[test]
fn load_aware_is_half_at_idle_and_falls_linearly_to_the_threshold() {
    // llm-d-router: 0.5 for an empty queue, else 0.5 * (1 - min(q, T) / T), T = 128.
    let pool =
        PoolSnapshot::new([state(0, 0, 0), state(1, 64, 0), state(2, 128, 0), state(3, 500, 0)]);
    let request = InferenceRequest::new("m", "p");
    assert_close(&scores_of(&LoadAwareScorer::default(), &pool, &request), &[0.5, 0.25, 0.0, 0.0]);
    let plugin = create("load-aware-scorer", json!({"threshold": 100})).unwrap();
    let scorer = plugin.scorer.unwrap();
    let pool = PoolSnapshot::new([state(0, 25, 0)]);
    assert_close(&scores_of(scorer.as_ref(), &pool, &request), &[0.375]); // 0.5 * (1 - 25/100)
}

#[test]
fn running_requests_are_min_max_inverted() {
    // llm-d-router: (max - r) / (max - min); all equal -> 1.
    let request = InferenceRequest::new("m", "p");
    let pool = PoolSnapshot::new([state(0, 0, 2), state(1, 9, 6), state(2, 0, 10)]);
    assert_close(&scores_of(&RunningRequestsSizeScorer, &pool, &request), &[1.0, 0.5, 0.0]);
    let pool = PoolSnapshot::new([state(0, 0, 4), state(1, 0, 4)]);
    assert_close(&scores_of(&RunningRequestsSizeScorer, &pool, &request), &[1.0, 1.0]);
}

#[test]
fn token_load_counts_picks_since_the_scrape_and_the_request_itself() {
    // llm-d-router: 1 - min(t, T) / T with t = in-flight tokens + the request's own tokens.
    let parameters = TokenLoadParameters { queue_threshold_tokens: 1000, ..Default::default() };
    let scorer = TokenLoadScorer::new(&parameters).unwrap();
    let scraped = Instant::now();
    let fresh = |i| {
        let mut state = state(i, 0, 0);
        state.metrics.updated_at = Some(scraped);
        state
    };
    let (idle, busy, full, seen) = (fresh(0), fresh(1), fresh(2), fresh(3));
    busy.endpoint.dispatches().record(scraped + Duration::from_millis(1), 400);
    full.endpoint.dispatches().record(scraped + Duration::from_millis(1), 2000);
    // Sent before the scrape: the scraped metrics already hold it, so it no longer counts.
    seen.endpoint.dispatches().record(scraped - Duration::from_millis(1), 400);
    let pool = PoolSnapshot::new([idle, busy, full, seen]);
    let request = InferenceRequest::new("m", "x".repeat(400)); // 100 tokens at 4 characters each
    assert_close(&scores_of(&scorer, &pool, &request), &[0.9, 0.5, 0.0, 0.9]);
    assert_eq!(scorer.score_of(0), 1.0);
}

#[test]
fn context_length_scores_by_range_fit_and_distance() {
    use scorers::context_length::{parse_range, range_score};
    // In range: 0.3 + 0.7 * (0.7 / (1 + 2048 / 10000) + 0.3 * 1048 / 2048).
    assert!((range_score(1000, (0, 2048)) - 0.814_167_447).abs() < 1e-8);
    assert_eq!(range_score(5, (5, 5)), 1.0);
    // Out of range: 0.3 / (1 + d / 1000); the nearer range wins.
    assert!((range_score(9000, (0, 8192)) - 0.3 / 1.808).abs() < 1e-12);
    assert!((range_score(9000, (0, 2048)) - 0.3 / 7.952).abs() < 1e-12);
    assert!((range_score(1, (10, 20)) - 0.3 / 1.009).abs() < 1e-12);
    assert_eq!(parse_range(" 0 - 2048 "), Some((0, 2048)));
    for bad in ["", "2048-0", "1-2-3", "-5-10", "a-b", "100"] {
        assert_eq!(parse_range(bad), None, "{bad:?}");
    }

    let pool = PoolSnapshot::new([
        labelled(0, None),
        labelled(1, Some("0-2048")),
        labelled(2, Some("4096-8192")),
        labelled(3, Some("junk")),
    ]);
    let request = InferenceRequest::new("m", "x".repeat(4000)); // 1000 tokens
    let scorer = ContextLengthAware::new(ContextLengthParameters::default()).unwrap();
    let scores = scores_of(&scorer, &pool, &request);
    assert_close(&scores, &[0.5, range_score(1000, (0, 2048)), 0.3 / 4.096, 0.0]);

    let mut candidates = vec![0, 1, 2, 3];
    let mut cycle = CycleState::new(Instant::now(), 0);
    scorer.filter(&mut cycle, &request, &pool, &mut candidates);
    assert_eq!(candidates, [0, 1, 2, 3], "filtering is off by default");
    let filtering = ContextLengthParameters { enable_filtering: true, ..Default::default() };
    ContextLengthAware::new(filtering).unwrap().filter(
        &mut cycle,
        &request,
        &pool,
        &mut candidates,
    );
    assert_eq!(candidates, [0, 1], "unlabelled and in-range endpoints stay");
}

#[test]
fn no_hit_lru_ranks_cold_requests_and_leaves_warm_ones_neutral() {
    let lru = Arc::new(NoHitLruScorer::new(&NoHitLruParameters::default()).unwrap());
    let prefix = PrefixCacheParameters { block_size: Some(4), ..Default::default() };
    let prefix = Arc::new(PrefixCacheScorer::new(prefix).unwrap());
    let picker = Arc::new(MaxScorePicker::new(1.try_into().unwrap()));
    let profile = SchedulerProfile::new("default", "max-score-picker", picker)
        .with_scorer("prefix-cache-scorer", 1.0, prefix.clone())
        .with_scorer("no-hit-lru-scorer", 1.0, lru.clone());
    let scheduler = Scheduler::new(vec![profile], Arc::new(SingleProfileHandler))
        .with_pre_request(prefix.clone())
        .with_pre_request(lru.clone());
    let pool = Arc::new(PoolSnapshot::new([state(0, 0, 0), state(1, 0, 0), state(2, 0, 0)]));
    let ids: Vec<_> = pool.endpoints().iter().map(EndpointState::id).collect();
    let schedule = |prompt: &str| {
        let picked = scheduler.schedule(&InferenceRequest::new("m", prompt), &pool).unwrap();
        scheduler.flush();
        picked.primary().id()
    };
    // Cold, nothing used: candidates in order score 1, 0.5, 0.
    assert_eq!(schedule("aaaabbbbccccdddd"), ids[0]);
    // Cold: never-used 1 and 2 score 1 and 0.5; 0 ranks 2 + 0 -> 1 - 2/2 = 0.
    assert_eq!(schedule("eeeeffffgggghhhh"), ids[1]);
    assert_eq!(schedule("iiiijjjjkkkkllll"), ids[2]);
    assert_eq!(lru.recently_used(), [ids[0], ids[1], ids[2]]);
    // Warm (endpoint 0 holds the prefix): the LRU scores 0.5 everywhere and is not updated.
    assert_eq!(schedule("aaaabbbbccccdddd"), ids[0]);
    assert_eq!(lru.recently_used(), [ids[0], ids[1], ids[2]]);
    // Cold again: 0 is now the least recently used.
    assert_eq!(schedule("mmmmnnnnoooopppp"), ids[0]);
    assert_eq!(lru.recently_used(), [ids[1], ids[2], ids[0]]);

    // Positions count every tracked endpoint, not only the candidates (llm-d-router ranks by
    // the whole LRU): candidates 1 and 2 sit at positions 0 and 1 of [1, 2, 0], n = 2.
    let indices = [1u32, 2];
    let mut scores = [0.0; 2];
    let mut cycle = CycleState::new(Instant::now(), 0);
    lru.score(
        &mut cycle,
        &InferenceRequest::new("m", "q"),
        Candidates::new(&pool, &indices),
        &mut scores,
    );
    assert_eq!(scores, [1.0, 0.0]);
    let mut lone = [0.0];
    lru.score(
        &mut cycle,
        &InferenceRequest::new("m", "q"),
        Candidates::new(&pool, &[2]),
        &mut lone,
    );
    assert_eq!(lone, [1.0]);
}

#[test]
fn no_hit_lru_forgets_the_least_recent_endpoint_when_full() {
    let lru = Arc::new(
        NoHitLruScorer::new(&NoHitLruParameters { lru_size: Some(2), ..Default::default() })
            .unwrap(),
    );
    let picker = Arc::new(MaxScorePicker::new(1.try_into().unwrap()));
    let profile = SchedulerProfile::new("default", "max-score-picker", picker).with_scorer(
        "no-hit-lru-scorer",
        1.0,
        lru.clone(),
    );
    let scheduler =
        Scheduler::new(vec![profile], Arc::new(SingleProfileHandler)).with_pre_request(lru.clone());
    let pool = Arc::new(PoolSnapshot::new([state(0, 0, 0), state(1, 0, 0), state(2, 0, 0)]));
    let ids: Vec<_> = pool.endpoints().iter().map(EndpointState::id).collect();
    for _ in 0..3 {
        scheduler.schedule(&InferenceRequest::new("m", "p"), &pool).unwrap();
    }
    assert_eq!(lru.recently_used(), [ids[1], ids[2]]);
}

#[test]
fn parameters_defaults_bad_values_and_unknown_names() {
    for type_name in [
        "load-aware-scorer",
        "running-requests-size-scorer",
        "token-load-scorer",
        "no-hit-lru-scorer",
        "context-length-aware",
    ] {
        let plugin = builtin_registry().create(&PluginSpec::of_type(type_name)).unwrap();
        assert!(plugin.scorer.is_some(), "{type_name}");
        refused(type_name, json!({"bogus": 1}), "bogus");
    }
    refused("load-aware-scorer", json!({"threshold": 0}), "threshold");
    refused("load-aware-scorer", json!({"threshold": -3}), "threshold");
    refused("load-aware-scorer", json!({"threshold": "many"}), "threshold");
    refused("token-load-scorer", json!({"queueThresholdTokens": 0}), "queueThresholdTokens");
    refused("no-hit-lru-scorer", json!({"lruSize": -1}), "lruSize");
    refused("no-hit-lru-scorer", json!({"lruSize": 0}), "lruSize");
    refused("context-length-aware", json!({"label": ""}), "label");
    refused("context-length-aware", json!({"enableFiltering": "yes"}), "enableFiltering");
    assert_eq!(TokenLoadParameters::default().queue_threshold_tokens, 4_194_304);
    assert_eq!(ContextLengthParameters::default().label, "llm-d.ai/context-length-range");
    assert!(!ContextLengthParameters::default().enable_filtering);
    // The filter role exists only when asked for.
    let plugin = create("context-length-aware", json!({"enableFiltering": true})).unwrap();
    assert!(plugin.filter.is_some() && plugin.scorer.is_some());
    assert!(
        builtin_registry()
            .create(&PluginSpec::of_type("context-length-aware"))
            .unwrap()
            .filter
            .is_none()
    );
    let plugin = create("no-hit-lru-scorer", json!({})).unwrap();
    assert!(plugin.pre_request.is_some(), "the LRU is updated after the pick");
}

#[test]
fn configs_from_the_llm_d_router_readmes_build() {
    // As each plugin's README shows them (load-aware's README nests its parameter under
    // `config:`; llm-d-router's loader, like this one, reads `parameters:`).
    let yaml = "
plugins:
- type: load-aware-scorer
  name: load-balancer
  parameters:
    threshold: 100
- type: running-requests-size-scorer
  name: running-requests
- type: token-load-scorer
  name: token-load
  parameters:
    queueThresholdTokens: 4194304
- type: prefix-cache-scorer
  name: cache-scorer
- type: no-hit-lru-scorer
  name: lru-scorer
  parameters:
    prefixPluginType: \"prefix-cache-scorer\"
    prefixPluginName: \"cache-scorer\"
    lruSize: 1024
- type: context-length-aware
  name: context-router
  parameters:
    label: \"llm-d.ai/context-length-range\"
    enableFiltering: true
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: context-router
    weight: 8
  - pluginRef: load-balancer
    weight: 5
  - pluginRef: running-requests
    weight: 1
  - pluginRef: token-load
    weight: 1
  - pluginRef: cache-scorer
    weight: 10
  - pluginRef: lru-scorer
    weight: 5
  - pluginRef: max-score-picker
";
    let scheduler =
        EndpointPickerConfig::from_yaml(yaml).unwrap().build(&builtin_registry()).unwrap();
    let profile = &scheduler.profiles()[0];
    assert_eq!(profile.scorers().len(), 6);
    assert_eq!(profile.filters().collect::<Vec<_>>(), ["context-router"]);
    let pool =
        Arc::new(PoolSnapshot::new([labelled(0, Some("0-10")), labelled(1, Some("0-2048"))]));
    let result = scheduler.schedule(&InferenceRequest::new("m", "x".repeat(400)), &pool).unwrap();
    assert_eq!(result.primary().id(), pool.endpoints()[1].id(), "only endpoint 1 fits 100 tokens");
}

fn arbitrary_pool() -> impl Strategy<Value = PoolSnapshot> {
    let endpoint = (any::<u32>(), any::<u32>(), prop::option::of("[0-9 a-]{0,12}"), 0u64..100_000);
    prop::collection::vec(endpoint, 1..8).prop_map(|endpoints| {
        PoolSnapshot::new(endpoints.into_iter().enumerate().map(
            |(i, (queue, running, label, tokens))| {
                let mut state = state(i as u16, queue, running);
                state.metrics.updated_at = None; // never scraped: every pick counts
                state.endpoint.dispatches().record(Instant::now(), tokens);
                if let Some(label) = label {
                    state.endpoint =
                        state.endpoint.with_label("llm-d.ai/context-length-range", label);
                }
                state
            },
        ))
    })
}

proptest! {
    #[test]
    fn scores_stay_in_the_unit_interval(
        pool in arbitrary_pool(),
        prompt_len in 0usize..100_000,
        threshold in 1i64..1_000_000,
        subset in prop::collection::vec(any::<bool>(), 8),
    ) {
        let request = InferenceRequest::new("m", "x".repeat(prompt_len));
        let load = create("load-aware-scorer", json!({"threshold": threshold})).unwrap();
        let tokens = create("token-load-scorer", json!({"queueThresholdTokens": threshold})).unwrap();
        let scorers: [Arc<dyn Scorer>; 5] = [
            load.scorer.unwrap(),
            Arc::new(RunningRequestsSizeScorer),
            tokens.scorer.unwrap(),
            Arc::new(NoHitLruScorer::new(&NoHitLruParameters::default()).unwrap()),
            Arc::new(ContextLengthAware::new(ContextLengthParameters::default()).unwrap()),
        ];
        for scorer in &scorers {
            for score in scores_of(scorer.as_ref(), &pool, &request) {
                prop_assert!((0.0..=1.0).contains(&score), "{scorer:?}: {score}");
            }
        }
        let filter = ContextLengthAware::new(ContextLengthParameters { enable_filtering: true, ..Default::default() }).unwrap();
        let before: Vec<u32> = (0..pool.len() as u32).filter(|&i| subset[i as usize]).collect();
        let mut after = before.clone();
        filter.filter(&mut CycleState::new(Instant::now(), 0), &request, &pool, &mut after);
        // Only removes, keeping the order of what stays.
        let mut rest = before.iter();
        prop_assert!(after.iter().all(|kept| rest.any(|candidate| candidate == kept)));
    }
}

// scorer/activerequest/active_request.go: idle (n <= idleThreshold) scores 1; busy scores
// (max - n) / max * maxBusyScore, max the largest count among the candidates.
#[test]
fn active_request_scores_idle_endpoints_1_and_busy_ones_below_max_busy_score() {
    use scorers::{ActiveRequestParameters, ActiveRequestScorer};
    let go_example = ActiveRequestScorer::with_parameters(&ActiveRequestParameters {
        idle_threshold: 2,
        max_busy_score: Some(0.5),
        ..Default::default()
    });
    assert_eq!(go_example.score_of(0, 8), 1.0);
    assert_eq!(go_example.score_of(2, 8), 1.0, "at the threshold: idle");
    assert_eq!(go_example.score_of(4, 8), 0.25);
    assert_eq!(go_example.score_of(8, 8), 0.0, "the busiest");
    let default = ActiveRequestScorer::new();
    assert_eq!(default.score_of(0, 0), 1.0);
    assert_eq!((default.score_of(1, 2), default.score_of(2, 2)), (0.5, 0.0));
    assert_eq!(default.score_of(3, 3), 0.0, "all equally busy: all 0, as in Go");
    // Out of range values fall back to the defaults, as Go's factory does.
    let lenient = ActiveRequestScorer::with_parameters(&ActiveRequestParameters {
        idle_threshold: -1,
        max_busy_score: Some(1.5),
        ..Default::default()
    });
    assert_eq!((lenient.score_of(0, 2), lenient.score_of(1, 2)), (1.0, 0.5));
    // The parameters of Go's README load, and the deprecated requestTimeout is accepted.
    let yaml = "plugins:\n- type: active-request-scorer\n  parameters: {idleThreshold: 2, maxBusyScore: 0.5, requestTimeout: 2m}\n";
    assert!(EndpointPickerConfig::from_yaml(yaml).unwrap().build(&builtin_registry()).is_ok());
    let yaml = "plugins:\n- type: active-request-scorer\n  parameters: {idle: 2}\n";
    assert!(EndpointPickerConfig::from_yaml(yaml).unwrap().build(&builtin_registry()).is_err());
}
