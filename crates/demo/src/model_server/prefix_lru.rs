//! The prefix cache of one simulated server: an LRU set of prompt block hashes with a
//! capacity in blocks, matched from the prompt's first block like vLLM's automatic prefix
//! caching. Insert and lookup are O(blocks · log capacity); eviction happens on insert.

use std::collections::{BTreeMap, HashMap};

/// An LRU set of block hashes with a capacity: the prefix cache of one server.
#[derive(Debug)]
pub struct PrefixLru {
    capacity: usize,
    stamps: HashMap<u64, u64>,
    order: BTreeMap<u64, u64>,
    clock: u64,
}

impl PrefixLru {
    /// An empty cache holding at most `capacity` blocks.
    pub fn new(capacity: usize) -> Self {
        Self { capacity, stamps: HashMap::new(), order: BTreeMap::new(), clock: 0 }
    }

    /// Counts the prompt's leading blocks already cached, then caches every block of it.
    /// Returns the hit count.
    pub fn lookup_and_insert(&mut self, blocks: &[u64]) -> usize {
        let hits = blocks.iter().take_while(|hash| self.stamps.contains_key(hash)).count();
        // Touch the tail first so the prompt's first blocks are the most recent: eviction then
        // takes tails before heads, and a shared head (system prompt) survives longest, as in
        // vLLM's block manager.
        for &hash in blocks.iter().rev() {
            self.clock += 1;
            if let Some(old) = self.stamps.insert(hash, self.clock) {
                self.order.remove(&old);
            }
            self.order.insert(self.clock, hash);
        }
        while self.stamps.len() > self.capacity {
            let Some((_, hash)) = self.order.pop_first() else { break };
            self.stamps.remove(&hash);
        }
        hits
    }

    /// Blocks cached.
    pub fn len(&self) -> usize {
        self.stamps.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.stamps.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_matches_leading_blocks_and_evicts_tails_first() {
        let mut cache = PrefixLru::new(3);
        assert_eq!(cache.lookup_and_insert(&[1, 2, 3]), 0);
        assert_eq!(cache.lookup_and_insert(&[1, 2, 9]), 2, "a miss ends the matched run");
        // Capacity 3 held 1, 2 and 9 (3 was evicted as the oldest tail); now 4 evicts 9.
        assert_eq!(cache.lookup_and_insert(&[4]), 0);
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.lookup_and_insert(&[1, 2, 9]), 2);
        assert_eq!(cache.lookup_and_insert(&[2]), 1);
    }
}
