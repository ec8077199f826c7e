//! The index against a plain reference model (`common::Model`).

mod common;

use common::Model;
use prefix_cache::{IndexConfig, LookupScratch, PrefixIndex};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op<K> {
    Record(K, Vec<u64>),
    Lookup(Vec<u64>),
    Remove(K),
}

fn op() -> impl Strategy<Value = Op<u8>> {
    // Small hash and key ranges so that endpoints overlap, blocks repeat and evictions happen.
    let hashes = prop::collection::vec(0u64..12, 0..8);
    prop_oneof![
        4 => (0u8..5, hashes.clone()).prop_map(|(k, h)| Op::Record(k, h)),
        3 => hashes.prop_map(Op::Lookup),
        1 => (0u8..6).prop_map(Op::Remove),
    ]
}

/// Enough endpoints on few blocks that a block's holders pass the bitset threshold (32) and,
/// through evictions and removals, fall back below the lower one (16).
fn crowded_op() -> impl Strategy<Value = Op<u16>> {
    let hashes = prop::collection::vec(0u64..8, 1..5);
    prop_oneof![
        8 => (0u16..96, hashes.clone()).prop_map(|(k, h)| Op::Record(k, h)),
        2 => hashes.prop_map(Op::Lookup),
        1 => (0u16..96).prop_map(Op::Remove),
    ]
}

fn apply<K>(
    index: &PrefixIndex<K>,
    model: &mut Model<K>,
    op: Op<K>,
    scratch: &mut LookupScratch,
    out: &mut Vec<(K, usize)>,
) -> Result<(), TestCaseError>
where
    K: Copy + Eq + std::hash::Hash + Ord + Send + Sync + std::fmt::Debug + 'static,
{
    match op {
        Op::Record(key, hashes) => {
            index.record(key, &hashes);
            model.record(key, &hashes);
        }
        Op::Lookup(hashes) => {
            if let Some(mismatch) = model.lookup_mismatch(index, &hashes, scratch, out) {
                return Err(TestCaseError::fail(mismatch));
            }
        }
        Op::Remove(key) => {
            prop_assert_eq!(index.remove_endpoint(key), model.blocks.remove(&key).is_some());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn index_agrees_with_reference_model(
        capacity in 0usize..6,
        shards in 1usize..5,
        ops in prop::collection::vec(op(), 1..60),
    ) {
        let index = PrefixIndex::new(IndexConfig { capacity_per_endpoint: capacity, shards });
        let mut model = Model::new(capacity);
        let (mut scratch, mut out) = (LookupScratch::default(), Vec::new());
        let keys: Vec<u8> = (0..6).collect();
        for op in ops {
            apply(&index, &mut model, op, &mut scratch, &mut out)?;
            if let Some(problem) = model.disagreement(&index, &keys) {
                return Err(TestCaseError::fail(problem));
            }
        }
    }

    #[test]
    fn reverse_map_survives_heavy_churn(
        prompts in prop::collection::vec((0u8..40, prop::collection::vec(any::<u64>(), 1..40)), 1..80),
    ) {
        // Many endpoints and wide hashes: exercises table growth, shrinking and backward shifts.
        let index = PrefixIndex::new(IndexConfig { capacity_per_endpoint: 25, shards: 2 });
        let mut model = Model::new(25);
        let mut scratch = LookupScratch::default();
        for (i, (key, hashes)) in prompts.iter().enumerate() {
            index.record(*key, hashes);
            model.record(*key, hashes);
            if i % 7 == 6 {
                index.remove_endpoint(key / 2);
                model.blocks.remove(&(key / 2));
            }
            let mut out = Vec::new();
            if let Some(mismatch) = model.lookup_mismatch(&index, hashes, &mut scratch, &mut out) {
                return Err(TestCaseError::fail(mismatch));
            }
        }
        let keys: Vec<u8> = (0..40).collect();
        if let Some(problem) = model.disagreement(&index, &keys) {
            return Err(TestCaseError::fail(problem));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn holder_sets_switch_back_and_forth(
        capacity in 2usize..6,
        shards in 1usize..3,
        ops in prop::collection::vec(crowded_op(), 100..600),
    ) {
        let index = PrefixIndex::new(IndexConfig { capacity_per_endpoint: capacity, shards });
        let mut model = Model::new(capacity);
        let (mut scratch, mut out) = (LookupScratch::default(), Vec::new());
        let keys: Vec<u16> = (0..96).collect();
        for (step, op) in ops.into_iter().enumerate() {
            apply(&index, &mut model, op, &mut scratch, &mut out)?;
            // Invariants every step, the full comparison every few steps to keep cases quick.
            if let Err(violation) = index.check_invariants() {
                return Err(TestCaseError::fail(violation.to_string()));
            }
            if step % 16 == 0
                && let Some(problem) = model.disagreement(&index, &keys)
            {
                return Err(TestCaseError::fail(problem));
            }
            for hashes in [&[0u64, 1, 2, 3][..], &[1, 0], &[2, 3, 4, 5, 6, 7]] {
                let mismatch = model.lookup_mismatch(&index, hashes, &mut scratch, &mut out);
                if let Some(mismatch) = mismatch {
                    return Err(TestCaseError::fail(mismatch));
                }
            }
        }
        if let Some(problem) = model.disagreement(&index, &keys) {
            return Err(TestCaseError::fail(problem));
        }
    }
}

/// 600 endpoints share an 8-block system prompt; groups of them share deeper blocks, a few hold
/// the whole prompt, and endpoints that evicted part of the prefix or never saw it are mixed in.
#[test]
fn popular_prefix_lengths_match_the_model_for_every_endpoint() {
    const ENDPOINTS: u32 = 600;
    const CAPACITY: usize = 48;
    let index = PrefixIndex::new(IndexConfig { capacity_per_endpoint: CAPACITY, shards: 4 });
    let mut model = Model::new(CAPACITY);
    let query: Vec<u64> = (0..40).map(|i| 1_000 + i).collect();
    for endpoint in 0..ENDPOINTS {
        // Endpoint e holds the first 8 + (e % 33) blocks of the query (all 40 when e % 33 == 32).
        let depth = (8 + endpoint as usize % 33).min(query.len());
        let mut prompt = query[..depth].to_vec();
        prompt.push(1_000_000 + u64::from(endpoint));
        if endpoint % 7 == 3 {
            // A block inside the prefix evicted: record more unrelated blocks than fit.
            let noise: Vec<u64> =
                (0..CAPACITY as u64).map(|i| 2_000_000 + u64::from(endpoint) * 100 + i).collect();
            index.record(endpoint, &prompt);
            model.record(endpoint, &prompt);
            index.record(endpoint, &noise[..CAPACITY - depth / 2]);
            model.record(endpoint, &noise[..CAPACITY - depth / 2]);
            continue;
        }
        if endpoint % 11 == 5 {
            prompt = vec![3_000_000 + u64::from(endpoint)];
        }
        index.record(endpoint, &prompt);
        model.record(endpoint, &prompt);
    }
    assert!(index.bitset_blocks() >= 8, "{}", index.bitset_blocks());
    let keys: Vec<u32> = (0..ENDPOINTS).collect();
    assert_eq!(model.disagreement(&index, &keys), None);
    let (mut scratch, mut out) = (LookupScratch::default(), Vec::new());
    for len in [1, 8, 9, 20, 40] {
        assert_eq!(model.lookup_mismatch(&index, &query[..len], &mut scratch, &mut out), None);
    }
    let full = model.lookup(&query);
    assert!(full.len() > 400, "{}", full.len());
    assert!(full.iter().any(|&(_, depth)| depth == query.len()));

    // Retiring most endpoints shrinks the sets back into pairs; lookups stay exact throughout.
    for endpoint in (0..ENDPOINTS).filter(|e| e % 40 != 0) {
        assert!(index.remove_endpoint(endpoint));
        model.blocks.remove(&endpoint);
        if endpoint % 50 == 0 {
            assert_eq!(model.lookup_mismatch(&index, &query, &mut scratch, &mut out), None);
        }
    }
    assert_eq!(index.bitset_blocks(), 0);
    assert_eq!(model.disagreement(&index, &keys), None);
    assert_eq!(model.lookup_mismatch(&index, &query, &mut scratch, &mut out), None);
}

/// A scratch belongs to its caller, not to an index: one scratch alternating between a large
/// index (bitset candidates over 200 slots) and a small one (a list over 3) stays exact.
#[test]
fn one_scratch_serves_indexes_of_different_sizes() {
    let query: Vec<u64> = (0..12).map(|i| 500 + i).collect();
    let large = PrefixIndex::new(IndexConfig { capacity_per_endpoint: 16, shards: 4 });
    let mut large_model = Model::new(16);
    for endpoint in 0..200u32 {
        let depth = 4 + endpoint as usize % 9;
        large.record(endpoint, &query[..depth]);
        large_model.record(endpoint, &query[..depth]);
    }
    assert!(large.bitset_blocks() >= 4, "{}", large.bitset_blocks());
    let small = PrefixIndex::new(IndexConfig { capacity_per_endpoint: 16, shards: 2 });
    let mut small_model = Model::new(16);
    for (endpoint, depth) in [(7u32, 2), (8, 12), (9, 5)] {
        small.record(endpoint, &query[..depth]);
        small_model.record(endpoint, &query[..depth]);
    }
    let (mut scratch, mut out) = (LookupScratch::default(), Vec::new());
    for len in [12, 1, 6, 12, 3] {
        assert_eq!(
            large_model.lookup_mismatch(&large, &query[..len], &mut scratch, &mut out),
            None
        );
        assert_eq!(
            small_model.lookup_mismatch(&small, &query[..len], &mut scratch, &mut out),
            None
        );
    }
}
