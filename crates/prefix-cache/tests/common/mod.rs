//! The reference model shared by the model-based tests: one `Vec` per endpoint in
//! most-recent-first order.

use std::collections::HashMap;
use std::hash::Hash;

use prefix_cache::{LookupScratch, PrefixIndex};

#[derive(Debug)]
pub(crate) struct Model<K> {
    pub(crate) capacity: usize,
    /// Most recent first.
    pub(crate) blocks: HashMap<K, Vec<u64>>,
}

impl<K: Copy + Eq + Hash + Ord + Send + Sync + std::fmt::Debug + 'static> Model<K> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self { capacity, blocks: HashMap::new() }
    }

    pub(crate) fn record(&mut self, key: K, hashes: &[u64]) {
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

    pub(crate) fn lookup(&self, hashes: &[u64]) -> Vec<(K, usize)> {
        let mut out: Vec<(K, usize)> = self
            .blocks
            .iter()
            .map(|(&key, held)| (key, hashes.iter().take_while(|h| held.contains(h)).count()))
            .filter(|&(_, depth)| depth > 0)
            .collect();
        out.sort_unstable();
        out
    }

    /// Why the index disagrees with the model, if it does: invariants, memory bound, counts and
    /// every key's blocks in recency order.
    pub(crate) fn disagreement(&self, index: &PrefixIndex<K>, keys: &[K]) -> Option<String> {
        if let Err(violation) = index.check_invariants() {
            return Some(violation.to_string());
        }
        if index.memory_bytes() > index.memory_bound_bytes() {
            return Some(format!(
                "memory {} over bound {}",
                index.memory_bytes(),
                index.memory_bound_bytes()
            ));
        }
        if index.endpoint_count() != self.blocks.len() {
            return Some("endpoint count differs".to_owned());
        }
        if index.len() != self.blocks.values().map(Vec::len).sum::<usize>() {
            return Some("pair count differs".to_owned());
        }
        for &key in keys {
            let expected = self.blocks.get(&key).cloned().unwrap_or_default();
            if expected.len() > self.capacity {
                return Some(format!("model over capacity for {key:?}"));
            }
            let actual = index.blocks_of(key);
            if actual != expected {
                return Some(format!("{key:?} holds {actual:?}, expected {expected:?}"));
            }
        }
        None
    }

    /// Runs a lookup on both and returns the index's answer if it differs from the model's.
    pub(crate) fn lookup_mismatch(
        &self,
        index: &PrefixIndex<K>,
        hashes: &[u64],
        scratch: &mut LookupScratch,
        out: &mut Vec<(K, usize)>,
    ) -> Option<String> {
        index.longest_prefix_matches(hashes, scratch, out);
        out.sort_unstable();
        let expected = self.lookup(hashes);
        (*out != expected).then(|| format!("lookup {hashes:?}: {out:?}, expected {expected:?}"))
    }
}
