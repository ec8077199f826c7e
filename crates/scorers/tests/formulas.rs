//! Each scorer's formula at its edges, each filter's and picker's contract.

mod common;

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Instant;

use common::{endpoint, pool};
use scheduler_core::{
    Candidates, CycleState, EndpointMetrics, Filter, InferenceRequest, Picker, PoolSnapshot, Scorer,
};
use scorers::{
    ByLabelFilter, ByLabelParameters, KvCacheUtilizationScorer, LoraAffinityFilter,
    LoraAffinityParameters, LoraAffinityScorer, MaxScorePicker, QueueScorer, RandomPicker,
    WeightedRandomPicker,
};

fn all(pool: &PoolSnapshot) -> Vec<u32> {
    (0..pool.len() as u32).collect()
}

fn scores_of(scorer: &dyn Scorer, pool: &PoolSnapshot, request: &InferenceRequest) -> Vec<f64> {
    let indices = all(pool);
    let mut scores = vec![0.0; indices.len()];
    let mut state = CycleState::new(Instant::now(), 0);
    scorer.score(&mut state, request, Candidates::new(pool, &indices), &mut scores);
    scores
}

fn request() -> InferenceRequest {
    InferenceRequest::new("base", "prompt")
}

#[test]
fn queue_scorer_is_min_max_inverted() {
    let pool = pool(&[(0, 0.0), (5, 0.0), (10, 0.0)]);
    assert_eq!(scores_of(&QueueScorer::default(), &pool, &request()), vec![1.0, 0.5, 0.0]);
}

#[test]
fn queue_scorer_all_equal_scores_one() {
    let pool = pool(&[(7, 0.0), (7, 0.0)]);
    assert_eq!(scores_of(&QueueScorer::default(), &pool, &request()), vec![1.0, 1.0]);
    let single = common::pool(&[(42, 0.0)]);
    assert_eq!(scores_of(&QueueScorer::default(), &single, &request()), vec![1.0]);
}

#[test]
fn kv_cache_scorer_edges() {
    let pool = pool(&[(0, 0.0), (0, 1.0), (0, 0.25), (0, 1.3), (0, -0.2), (0, f64::NAN)]);
    assert_eq!(
        scores_of(&KvCacheUtilizationScorer::default(), &pool, &request()),
        vec![1.0, 0.0, 0.75, 0.0, 1.0, 0.0]
    );
}

fn lora_endpoint(
    i: u16,
    active: &[&str],
    waiting: &[&str],
    max: u32,
) -> scheduler_core::EndpointState {
    endpoint(i, 0, 0.0).with_metrics(EndpointMetrics {
        active_lora_adapters: active.iter().map(|&a| Arc::from(a)).collect(),
        waiting_lora_adapters: waiting.iter().map(|&a| Arc::from(a)).collect(),
        max_lora_adapters: max,
        updated_at: Some(Instant::now()),
        ..EndpointMetrics::default()
    })
}

#[test]
fn lora_affinity_scorer_levels() {
    let pool = PoolSnapshot::new([
        lora_endpoint(0, &["sql"], &[], 1),          // active: 1.0
        lora_endpoint(1, &["chat"], &[], 2),         // free slot: 0.8
        lora_endpoint(2, &["chat"], &["sql"], 1),    // waiting, slots full: 0.6
        lora_endpoint(3, &["chat", "code"], &[], 2), // slots full: 0
        lora_endpoint(4, &[], &[], 0),               // LoRA off: 0
    ]);
    let request = InferenceRequest::new("sql", "q");
    assert_eq!(scores_of(&LoraAffinityScorer, &pool, &request), vec![1.0, 0.8, 0.6, 0.0, 0.0]);
}

#[test]
fn lora_affinity_filter_prefers_affinity_then_free_slots() {
    let pool = PoolSnapshot::new([
        lora_endpoint(0, &["chat"], &[], 1),
        lora_endpoint(1, &["sql"], &[], 1),
        lora_endpoint(2, &[], &[], 4),
    ]);
    let filter = |threshold: f64, model: &str| {
        let filter = LoraAffinityFilter::new(LoraAffinityParameters { threshold }).unwrap();
        let mut candidates = all(&pool);
        let mut state = CycleState::new(Instant::now(), 9);
        filter.filter(&mut state, &InferenceRequest::new(model, ""), &pool, &mut candidates);
        candidates
    };
    assert_eq!(filter(1.0, "sql"), vec![1], "affinity kept when threshold is 1");
    assert_eq!(filter(0.0, "sql"), vec![2], "free slots when threshold is 0");
    assert_eq!(filter(1.0, "new-adapter"), vec![2], "no affinity: free slots");
    let full =
        PoolSnapshot::new([lora_endpoint(0, &["a"], &[], 1), lora_endpoint(1, &["b"], &[], 1)]);
    let mut candidates = all(&full);
    let instance = LoraAffinityFilter::new(LoraAffinityParameters::default()).unwrap();
    instance.filter(
        &mut CycleState::new(Instant::now(), 0),
        &InferenceRequest::new("c", ""),
        &full,
        &mut candidates,
    );
    assert_eq!(candidates, vec![0, 1], "nothing removed when no endpoint has affinity or a slot");
    assert!(LoraAffinityFilter::new(LoraAffinityParameters { threshold: 1.5 }).is_err());
}

#[test]
fn by_label_filter_keeps_valid_values() {
    let pool = PoolSnapshot::new([
        endpoint(0, 0, 0.0).with_metrics(EndpointMetrics::default()),
        {
            let mut e = endpoint(1, 0, 0.0);
            e.endpoint.labels.insert("tier".into(), "gold".into());
            e
        },
        {
            let mut e = endpoint(2, 0, 0.0);
            e.endpoint.labels.insert("tier".into(), "bronze".into());
            e
        },
    ]);
    let run = |allows_no_label: bool| {
        let filter = ByLabelFilter::new(ByLabelParameters {
            label: "tier".into(),
            valid_values: vec!["gold".into()],
            allows_no_label,
        })
        .unwrap();
        let mut candidates = all(&pool);
        filter.filter(&mut CycleState::new(Instant::now(), 0), &request(), &pool, &mut candidates);
        candidates
    };
    assert_eq!(run(false), vec![1]);
    assert_eq!(run(true), vec![0, 1]);
    assert!(ByLabelFilter::new(ByLabelParameters::default()).is_err(), "empty label key");
}

fn pick(picker: &dyn Picker, scores: &[f64], seed: u64) -> Vec<u32> {
    let pool = pool(&vec![(0, 0.0); scores.len()]);
    let indices = all(&pool);
    let mut picked = Vec::new();
    picker.pick(
        &mut CycleState::new(Instant::now(), seed),
        Candidates::new(&pool, &indices),
        scores,
        &mut picked,
    );
    picked
}

fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap()
}

#[test]
fn max_score_picker_picks_the_best_and_ranks_fallbacks() {
    let scores = [0.2, 0.9, 0.5, 0.7];
    assert_eq!(pick(&MaxScorePicker::default(), &scores, 1), vec![1]);
    assert_eq!(pick(&MaxScorePicker::new(nz(3)), &scores, 1), vec![1, 3, 2]);
    assert_eq!(pick(&MaxScorePicker::new(nz(10)), &scores, 1), vec![1, 3, 2, 0]);
}

#[test]
fn max_score_picker_breaks_ties_by_seed() {
    let scores = [1.0, 0.0, 1.0, 1.0];
    let firsts: std::collections::BTreeSet<u32> =
        (0..64).map(|seed| pick(&MaxScorePicker::default(), &scores, seed)[0]).collect();
    assert_eq!(firsts.into_iter().collect::<Vec<_>>(), vec![0, 2, 3], "every tied one can win");
    for seed in 0..8 {
        assert_eq!(
            pick(&MaxScorePicker::default(), &scores, seed),
            pick(&MaxScorePicker::default(), &scores, seed)
        );
        let ranked = pick(&MaxScorePicker::new(nz(4)), &scores, seed);
        assert_eq!(ranked[3], 1, "the lowest score ranks last");
    }
}

#[test]
fn random_picker_returns_distinct_candidates() {
    for seed in 0..16 {
        let mut picked = pick(&RandomPicker::new(nz(3)), &[0.0; 5], seed);
        assert_eq!(picked.len(), 3);
        picked.sort_unstable();
        picked.dedup();
        assert_eq!(picked.len(), 3);
    }
}

#[test]
fn weighted_random_picker_never_picks_zero_weight_first() {
    for seed in 0..64 {
        let picked = pick(&WeightedRandomPicker::new(nz(2)), &[0.0, 1.0, 0.0, 0.5], seed);
        assert!(picked[0] == 1 || picked[0] == 3, "{picked:?}");
        assert_ne!(picked[0], picked[1]);
    }
    let uniform = pick(&WeightedRandomPicker::new(nz(3)), &[0.0; 3], 5);
    assert_eq!(uniform.len(), 3, "all-zero scores fall back to uniform");
}
