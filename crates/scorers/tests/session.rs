//! `session-id-producer` and the `session_id` strategy of `session-affinity-filter` and
//! `session-affinity-scorer`, through a scheduler built from config. Expected behaviour from
//! llm-d-router's `dataproducer/sessionid/producer.go` and
//! `scheduling/util/sessionaffinity/session_id.go` (ebab687).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use scheduler_core::{
    Endpoint, EndpointMetrics, EndpointPickerConfig, EndpointState, InferenceRequest, PoolSnapshot,
    ScheduleOptions, Scheduler,
};

fn scheduler(yaml: &str) -> Scheduler {
    let mut registry = scorers::builtin_registry();
    registry.allow_experimental_plugins(true);
    EndpointPickerConfig::from_yaml(yaml).unwrap().build(&registry).unwrap()
}

fn address(port: u16) -> SocketAddr {
    ([10, 0, 0, 1], port).into()
}

fn pool(queues: &[u32]) -> Arc<PoolSnapshot> {
    Arc::new(PoolSnapshot::new(queues.iter().enumerate().map(|(i, &waiting_queue)| {
        EndpointState::new(Endpoint::new(address(8000 + i as u16)).with_name(format!("pod-{i}")))
            .with_metrics(EndpointMetrics { waiting_queue, ..Default::default() })
    })))
}

fn with_cookie(session: &str) -> InferenceRequest {
    InferenceRequest::new("m", "hi").with_header("cookie", format!("theme=dark; sid={session}"))
}

/// Schedules `request` at `now` with `seed` and returns the primary's port.
fn pick(
    scheduler: &Scheduler,
    request: &InferenceRequest,
    pool: &Arc<PoolSnapshot>,
    now: Instant,
    seed: u64,
) -> u16 {
    let options = ScheduleOptions { now: Some(now), seed: Some(seed), explain: false };
    scheduler.schedule_with(request, pool, options).unwrap().primary().endpoint.address.port()
}

const FILTER_FROM_COOKIE: &str = "
plugins:
- type: session-id-producer
  name: sid
  parameters: {cookieName: sid}
- type: session-affinity-filter
  parameters:
    strategy: session_id
    sessionIdConfig:
      sources: [{attribute: SessionIDDataKey, producer: sid}]
      evictionTtlSeconds: 60
- type: random-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: sid
  - pluginRef: session-affinity-filter
  - pluginRef: random-picker
";

#[test]
fn a_session_sticks_to_its_first_endpoint_and_moves_only_when_it_is_gone() {
    let scheduler = scheduler(FILTER_FROM_COOKIE);
    let pool = pool(&[0, 0, 0, 0]);
    let now = Instant::now();
    let first = pick(&scheduler, &with_cookie("s1"), &pool, now, 1);
    // Whatever the random picker would draw, the filter leaves the bound endpoint alone.
    for seed in 2..40 {
        assert_eq!(pick(&scheduler, &with_cookie("s1"), &pool, now, seed), first, "seed {seed}");
    }
    // Another session is free; without a session id there is no preference either.
    let others: std::collections::BTreeSet<u16> = (0..40)
        .map(|seed| pick(&scheduler, &with_cookie(&format!("n{seed}")), &pool, now, seed))
        .collect();
    assert!(others.len() > 1, "unbound sessions spread: {others:?}");
    let anonymous = InferenceRequest::new("m", "hi");
    let spread: std::collections::BTreeSet<u16> =
        (0..40).map(|seed| pick(&scheduler, &anonymous, &pool, now, seed)).collect();
    assert!(spread.len() > 1);

    // The bound endpoint out of the candidates (the proxy's subset hint leaves it out): no
    // preference, and the session moves to where it was sent.
    let mut elsewhere = with_cookie("s1");
    elsewhere.endpoint_subset =
        Some((8000..8004).filter(|&port| port != first).map(address).collect());
    let moved = pick(&scheduler, &elsewhere, &pool, now, 7);
    assert_ne!(moved, first);
    for seed in 40..60 {
        assert_eq!(pick(&scheduler, &with_cookie("s1"), &pool, now, seed), moved, "seed {seed}");
    }
}

#[test]
fn bindings_expire_after_the_ttl_unused_and_live_on_when_used() {
    let scheduler = scheduler(FILTER_FROM_COOKIE);
    let pool = pool(&[0, 0, 0, 0]);
    let start = Instant::now();
    let first = pick(&scheduler, &with_cookie("s"), &pool, start, 1);
    // Used every 50 s, the 60 s binding lasts.
    for step in 1..6u64 {
        let at = start + Duration::from_secs(50 * step);
        assert_eq!(pick(&scheduler, &with_cookie("s"), &pool, at, step), first);
    }
    // Unused for more than 60 s: forgotten, so the next pick is free (and rebinds).
    let mut moved = 0;
    for seed in 0..30 {
        let session = format!("s-{seed}");
        let bound = pick(&scheduler, &with_cookie(&session), &pool, start, seed);
        let kept = start + Duration::from_secs(59);
        assert_eq!(pick(&scheduler, &with_cookie(&session), &pool, kept, seed + 100), bound);
        let idle = kept + Duration::from_secs(61);
        let free = pick(&scheduler, &with_cookie(&session), &pool, idle, seed + 200);
        moved += usize::from(free != bound);
        assert_eq!(pick(&scheduler, &with_cookie(&session), &pool, idle, seed + 300), free);
    }
    assert!(moved > 0, "expired bindings express no preference");
}

#[test]
fn the_scorer_prefers_the_bound_endpoint_without_moving_it_when_outweighed() {
    // Header source, the default (`x-session-id`) left implicit.
    let yaml = "
plugins:
- type: session-affinity-scorer
  parameters: {strategy: session_id}
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: session-affinity-scorer
    weight: 1
  - pluginRef: queue-scorer
    weight: 3
";
    let scheduler = scheduler(yaml);
    let now = Instant::now();
    let session = InferenceRequest::new("m", "hi").with_header("X-Session-Id", "abc");
    // Endpoint 1 has the shortest queue and is bound.
    let first = pick(&scheduler, &session, &pool(&[4, 0, 4]), now, 1);
    assert_eq!(first, 8001);
    // Queues even: the binding decides.
    assert_eq!(pick(&scheduler, &session, &pool(&[0, 0, 0]), now, 2), 8001);
    // Endpoint 1 loaded: the queue outweighs the affinity and endpoint 0 is picked, but the
    // bound endpoint was a candidate, so the binding stays.
    assert_eq!(pick(&scheduler, &session, &pool(&[0, 10, 10]), now, 3), 8000);
    assert_eq!(pick(&scheduler, &session, &pool(&[0, 0, 0]), now, 4), 8001);
}

#[test]
fn session_id_parameters_are_checked_as_go_checks_them() {
    let error = |parameters: &str| {
        let yaml =
            format!("plugins:\n- type: session-affinity-filter\n  parameters: {parameters}\n");
        let mut registry = scorers::builtin_registry();
        registry.allow_experimental_plugins(true);
        EndpointPickerConfig::from_yaml(&yaml).unwrap().build(&registry).unwrap_err().to_string()
    };
    let refused =
        error("{strategy: session_id, sessionIdConfig: {sources: [{header: h, attribute: a}]}}");
    assert!(refused.contains("sources[0]: exactly one of header or attribute"), "{refused}");
    assert!(
        error("{strategy: session_id, sessionIdConfig: {sources: [{}]}}").contains("exactly one")
    );
    assert!(
        error("{strategy: session_id, sessionIdConfig: {evictionTtlSeconds: -1}}")
            .contains("evictionTtlSeconds")
    );
    assert!(
        error("{strategy: session_id, sessionIdConfig: {evictionSweepSeconds: -1}}")
            .contains("evictionSweepSeconds")
    );
    assert!(error("{strategy: session_id, sessionIdConfig: {ttl: 5}}").contains("ttl"));
    let producer = |parameters: &str| {
        let yaml = format!("plugins:\n- type: session-id-producer\n  parameters: {parameters}\n");
        EndpointPickerConfig::from_yaml(&yaml)
            .unwrap()
            .build(&scorers::builtin_registry())
            .map(|_| ())
    };
    assert!(producer("{headerName: x-session-id}").is_ok(), "beta: no experimental flag needed");
    assert!(producer("{}").unwrap_err().to_string().contains("exactly one"));
    assert!(
        producer("{headerName: h, cookieName: c}").unwrap_err().to_string().contains("not both")
    );
}

proptest::proptest! {
    /// Whatever the sessions, bindings and candidate subsets, the `session_id` filter only
    /// removes candidates (leaving one or all) and the scorer scores in [0, 1] with at most
    /// one endpoint at 1.
    #[test]
    fn the_filter_only_removes_and_the_scorer_stays_in_range(
        steps in proptest::collection::vec((0u8..4, proptest::collection::vec(proptest::bool::ANY, 4), 0u64..1000), 1..30),
    ) {
        use scheduler_core::{Candidates, CycleState};
        let registry = {
            let mut registry = scorers::builtin_registry();
            registry.allow_experimental_plugins(true);
            registry
        };
        let yaml = "plugins:\n- type: session-affinity-filter\n  parameters: {strategy: session_id}\n- type: session-affinity-scorer\n  parameters: {strategy: session_id}\n- type: random-picker\n";
        let config = EndpointPickerConfig::from_yaml(yaml).unwrap();
        let plugins = config.construct_plugins(&registry).unwrap();
        let filter = plugins.get("session-affinity-filter").unwrap().plugin.filter.clone().unwrap();
        let scorer = plugins.get("session-affinity-scorer").unwrap().plugin.scorer.clone().unwrap();
        let scheduler = config.build_with(&plugins, &registry).unwrap();
        let pool = pool(&[0, 0, 0, 0]);
        let now = Instant::now();
        for (session, subset, seed) in steps {
            let mut request = InferenceRequest::new("m", "hi").with_header("x-session-id", format!("s{session}"));
            let candidates: Vec<u32> = (0..4).filter(|&i| subset[i as usize]).collect();
            let mut state = CycleState::new(now, seed);
            let mut kept = candidates.clone();
            filter.filter(&mut state, &request, &pool, &mut kept);
            proptest::prop_assert!(kept == candidates || (kept.len() == 1 && candidates.contains(&kept[0])));
            let mut scores = vec![0.0; candidates.len()];
            scorer.score(&mut state, &request, Candidates::new(&pool, &candidates), &mut scores);
            proptest::prop_assert!(scores.iter().all(|score| (0.0..=1.0).contains(score)));
            proptest::prop_assert!(scores.iter().filter(|&&score| score == 1.0).count() <= 1);
            if !candidates.is_empty() {
                request.endpoint_subset = Some(candidates.iter().map(|&i| address(8000 + i as u16)).collect());
                pick(&scheduler, &request, &pool, now, seed);
            }
        }
    }
}
