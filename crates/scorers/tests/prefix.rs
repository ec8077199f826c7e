//! The prefix-cache scorer: picks record their prompt's blocks; later prompts sharing a prefix
//! score by how much of it an endpoint holds.

mod common;

use common::pool;
use scheduler_core::{
    EndpointPickerConfig, InferenceRequest, PreRequest, ScheduleOptions, Scheduler,
};
use scorers::builtin_registry;

/// GIE's formula: these tests check exact match ratios, and each pick stays in flight on its
/// endpoint, which the default load-aware affinity would count (`load_aware.rs` tests that).
fn scheduler() -> Scheduler {
    EndpointPickerConfig::from_yaml(
        "plugins:\n- type: prefix-cache-scorer\n  parameters: {blockSize: 4, maxPrefixBlocksToMatch: 8, affinityLoadTolerance: 0}\n",
    )
    .unwrap()
    .build(&builtin_registry())
    .unwrap()
    .with_seed(5)
}

fn prefix_scores(
    scheduler: &Scheduler,
    pool: &std::sync::Arc<scheduler_core::PoolSnapshot>,
    request: &InferenceRequest,
) -> (u16, Vec<f64>) {
    let result = scheduler
        .schedule_with(request, pool, ScheduleOptions { explain: true, ..Default::default() })
        .unwrap();
    // The pick's record is applied by the scorer's writer thread; wait for it, so that the
    // next decision sees it.
    scheduler.flush();
    let scores = result.explanation().unwrap()[0].scorers[0].2.clone();
    (result.primary().endpoint.address.port(), scores)
}

#[test]
fn a_recorded_prompt_scores_by_its_matched_prefix() {
    let scheduler = scheduler();
    let pool = pool(&[(0, 0.0), (0, 0.0), (0, 0.0)]);
    // 8 blocks of 4 characters.
    let prompt = "aaaabbbbccccddddeeeeffffgggghhhh";
    let (first_port, first_scores) =
        prefix_scores(&scheduler, &pool, &InferenceRequest::new("m", prompt));
    assert_eq!(first_scores, vec![0.0; 3], "nothing cached yet");
    let first = (first_port - 8000) as usize;

    let (port, scores) = prefix_scores(&scheduler, &pool, &InferenceRequest::new("m", prompt));
    assert_eq!(port, first_port, "the endpoint holding the whole prompt wins");
    assert_eq!(scores[first], 1.0);
    assert_eq!(scores.iter().filter(|&&s| s == 0.0).count(), 2);

    // Same first four blocks, different rest: half matched.
    let (_, scores) = prefix_scores(
        &scheduler,
        &pool,
        &InferenceRequest::new("m", "aaaabbbbccccddddXXXXYYYYZZZZWWWW"),
    );
    assert_eq!(scores[first], 0.5);

    // Another model never shares blocks.
    let (_, scores) = prefix_scores(&scheduler, &pool, &InferenceRequest::new("other", prompt));
    assert_eq!(scores, vec![0.0; 3]);
}

#[test]
fn prompts_shorter_than_a_block_score_zero() {
    let scheduler = scheduler();
    let pool = pool(&[(0, 0.0), (0, 0.0)]);
    for _ in 0..2 {
        let (_, scores) = prefix_scores(&scheduler, &pool, &InferenceRequest::new("m", "abc"));
        assert_eq!(scores, vec![0.0, 0.0]);
    }
}

#[test]
fn only_the_first_blocks_up_to_the_limit_count() {
    let scheduler = scheduler();
    let pool = pool(&[(0, 0.0), (0, 0.0)]);
    let long = "x".repeat(4 * 20);
    let (port, _) = prefix_scores(&scheduler, &pool, &InferenceRequest::new("m", long.as_str()));
    // A prompt agreeing on the first 8 blocks (the limit) and differing later matches fully.
    let variant = format!("{}{}", "x".repeat(4 * 8), "y".repeat(4 * 12));
    let (_, scores) =
        prefix_scores(&scheduler, &pool, &InferenceRequest::new("m", variant.as_str()));
    assert_eq!(scores[(port - 8000) as usize], 1.0);
}

#[test]
fn endpoints_that_leave_the_pool_are_forgotten_by_the_writer() {
    use std::sync::Arc;

    use scheduler_core::{SchedulerProfile, SharedPool, SingleProfileHandler};
    use scorers::{MaxScorePicker, PrefixCacheParameters, PrefixCacheScorer};

    let parameters = PrefixCacheParameters { block_size: Some(4), ..Default::default() };
    let scorer = Arc::new(PrefixCacheScorer::new(parameters).unwrap());
    let picker = Arc::new(MaxScorePicker::new(1.try_into().unwrap()));
    let profile = SchedulerProfile::new("default", "max-score-picker", picker).with_scorer(
        "prefix-cache-scorer",
        1.0,
        scorer.clone(),
    );
    let scheduler = Scheduler::new(vec![profile], Arc::new(SingleProfileHandler))
        .with_pre_request(scorer.clone())
        .with_pool_observer(scorer.clone());
    let shared = SharedPool::new(pool(&[(0, 0.0), (0, 0.0), (0, 0.0)]).as_ref().clone());
    let request = InferenceRequest::new("m", "aaaabbbbccccdddd");

    let first = scheduler.schedule(&request, &shared.load()).unwrap().primary().id();
    scheduler.flush();
    // Scoring does no housekeeping: without a subscription the index keeps a departed endpoint.
    shared.update(|pool| {
        pool.remove(first);
    });
    let second = scheduler.schedule(&request, &shared.load()).unwrap().primary().id();
    scorer.flush();
    assert_ne!(second, first);
    let mut indexed = scorer.producer().unwrap().index().endpoint_keys();
    indexed.sort();
    let mut expected = vec![first, second];
    expected.sort();
    assert_eq!(indexed, expected, "scoring and recording never look at pool membership");

    // Subscribed, the writer's next membership change reconciles the index at once, on the
    // writer's thread; the endpoint that left earlier goes too.
    scheduler.observe_pool(&shared);
    shared.update(|pool| {
        pool.remove(second);
    });
    assert!(
        scorer.producer().unwrap().index().endpoint_keys().is_empty(),
        "{:?}",
        scorer.producer().unwrap().index().endpoint_keys()
    );
    assert!(scorer.producer().unwrap().index().blocks_of(first).is_empty());
    assert!(scorer.producer().unwrap().index().blocks_of(second).is_empty());
}

#[test]
fn configs_wire_the_prefix_scorer_as_a_pool_observer() {
    use scheduler_core::{Director, DirectorOptions, SharedPool};
    use std::sync::Arc;

    let shared = Arc::new(SharedPool::new(pool(&[(0, 0.0), (0, 0.0)]).as_ref().clone()));
    let scheduler = Arc::new(scheduler());
    // The director subscribes the scheduler's pool observers to its pool.
    let _director =
        Director::new(Arc::clone(&scheduler), Arc::clone(&shared), DirectorOptions::default());
    let request = InferenceRequest::new("m", "aaaabbbbccccdddd");
    let (port, _) = prefix_scores(&scheduler, &shared.load(), &request);
    let (_, scores) = prefix_scores(&scheduler, &shared.load(), &request);
    assert!(scores.contains(&1.0), "the pick recorded its blocks: {scores:?}");
    let picked = common::endpoint(port - 8000, 0, 0.0);
    shared.update(|pool| {
        pool.remove(picked.id());
    });
    shared.update(|pool| pool.upsert(picked.clone()));
    let (_, scores) = prefix_scores(&scheduler, &shared.load(), &request);
    assert_eq!(scores, vec![0.0, 0.0], "an endpoint that left and came back starts cold");
}

/// The pick's record is queued, not applied, by the decision: the writer thread applies it,
/// and `Scheduler::flush` is the point after which the next decision is sure to see it.
#[test]
fn a_pick_is_recorded_off_the_decision_path_and_seen_after_a_flush() {
    use std::sync::Arc;

    use scheduler_core::{SchedulerProfile, SingleProfileHandler};
    use scorers::{MaxScorePicker, PrefixCacheParameters, PrefixCacheScorer};

    let parameters = PrefixCacheParameters { block_size: Some(4), ..Default::default() };
    let scorer = Arc::new(PrefixCacheScorer::new(parameters).unwrap());
    let picker = Arc::new(MaxScorePicker::new(1.try_into().unwrap()));
    let profile = SchedulerProfile::new("default", "max-score-picker", picker).with_scorer(
        "prefix-cache-scorer",
        1.0,
        scorer.clone(),
    );
    let scheduler = Scheduler::new(vec![profile], Arc::new(SingleProfileHandler))
        .with_pre_request(scorer.clone())
        .with_seed(3);
    let pool = pool(&[(0, 0.0), (0, 0.0), (0, 0.0), (0, 0.0)]);
    let turn = InferenceRequest::new("m", "aaaabbbbccccdddd");
    let first = scheduler.schedule(&turn, &pool).unwrap().primary().id();
    scheduler.flush();
    assert_eq!(scorer.producer().unwrap().index().blocks_of(first).len(), 4);
    // The next turn extends the conversation: it goes where the first turn's blocks are.
    let next = InferenceRequest::new("m", "aaaabbbbccccddddeeeeffff");
    for _ in 0..5 {
        assert_eq!(scheduler.schedule(&next, &pool).unwrap().primary().id(), first);
        scheduler.flush();
    }
    assert_eq!(scorer.producer().unwrap().index().blocks_of(first).len(), 6);
    let writer = scorer.producer().unwrap().writer();
    assert_eq!(writer.applied() + writer.coalesced(), 6);
    assert_eq!(scorer.dropped_deferred(), 0);
}
