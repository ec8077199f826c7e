//! The index against a plain reference model: one `Vec` per endpoint in most-recent-first order.

use std::collections::HashMap;

use prefix_cache::{IndexConfig, PrefixIndex};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Record(u8, Vec<u64>),
    Lookup(Vec<u64>),
    Remove(u8),
}

#[derive(Debug, Default)]
struct Model {
    capacity: usize,
    /// Most recent first.
    blocks: HashMap<u8, Vec<u64>>,
}

impl Model {
    fn record(&mut self, key: u8, hashes: &[u64]) {
        if self.capacity == 0 || hashes.is_empty() {
            return;
        }
        let held = self.blocks.entry(key).or_default();
        for &hash in hashes[..hashes.len().min(self.capacity)].iter().rev() {
            if let Some(position) = held.iter().position(|&h| h == hash) {
                held.remove(position);
            }
            held.insert(0, hash);
            held.truncate(self.capacity);
        }
    }

    fn lookup(&self, hashes: &[u64]) -> Vec<(u8, usize)> {
        let mut out: Vec<(u8, usize)> = self
            .blocks
            .iter()
            .map(|(&key, held)| (key, hashes.iter().take_while(|h| held.contains(h)).count()))
            .filter(|&(_, depth)| depth > 0)
            .collect();
        out.sort_unstable();
        out
    }
}

fn op() -> impl Strategy<Value = Op> {
    // Small hash and key ranges so that endpoints overlap, blocks repeat and evictions happen.
    let hashes = prop::collection::vec(0u64..12, 0..8);
    prop_oneof![
        4 => (0u8..5, hashes.clone()).prop_map(|(k, h)| Op::Record(k, h)),
        3 => hashes.prop_map(Op::Lookup),
        1 => (0u8..6).prop_map(Op::Remove),
    ]
}

fn check_agrees(index: &PrefixIndex<u8>, model: &Model) -> Result<(), TestCaseError> {
    if let Err(violation) = index.check_invariants() {
        return Err(TestCaseError::fail(violation.to_string()));
    }
    prop_assert!(index.memory_bytes() <= index.memory_bound_bytes());
    prop_assert_eq!(index.endpoint_count(), model.blocks.len());
    prop_assert_eq!(index.len(), model.blocks.values().map(Vec::len).sum::<usize>());
    for key in 0u8..6 {
        let expected = model.blocks.get(&key).cloned().unwrap_or_default();
        prop_assert!(expected.len() <= model.capacity);
        prop_assert_eq!(index.blocks_of(key), expected);
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
        let mut model = Model { capacity, ..Model::default() };
        let mut out = Vec::new();
        for op in ops {
            match op {
                Op::Record(key, hashes) => {
                    index.record(key, &hashes);
                    model.record(key, &hashes);
                }
                Op::Lookup(hashes) => {
                    index.longest_prefix_matches(&hashes, &mut out);
                    out.sort_unstable();
                    prop_assert_eq!(&out, &model.lookup(&hashes));
                }
                Op::Remove(key) => {
                    prop_assert_eq!(index.remove_endpoint(key), model.blocks.remove(&key).is_some());
                }
            }
            check_agrees(&index, &model)?;
        }
    }

    #[test]
    fn reverse_map_survives_heavy_churn(
        prompts in prop::collection::vec((0u8..40, prop::collection::vec(any::<u64>(), 1..40)), 1..80),
    ) {
        // Many endpoints and wide hashes: exercises table growth, shrinking and backward shifts.
        let index = PrefixIndex::new(IndexConfig { capacity_per_endpoint: 25, shards: 2 });
        let mut model = Model { capacity: 25, ..Model::default() };
        for (i, (key, hashes)) in prompts.iter().enumerate() {
            index.record(*key, hashes);
            model.record(*key, hashes);
            if i % 7 == 6 {
                index.remove_endpoint(key / 2);
                model.blocks.remove(&(key / 2));
            }
            let mut out = Vec::new();
            index.longest_prefix_matches(hashes, &mut out);
            out.sort_unstable();
            prop_assert_eq!(out, model.lookup(hashes));
        }
        let mut keys: Vec<u8> = model.blocks.keys().copied().collect();
        keys.sort_unstable();
        for key in keys {
            prop_assert_eq!(index.blocks_of(key), model.blocks[&key].clone());
        }
        if let Err(violation) = index.check_invariants() {
            return Err(TestCaseError::fail(violation.to_string()));
        }
        prop_assert!(index.memory_bytes() <= index.memory_bound_bytes());
    }
}
