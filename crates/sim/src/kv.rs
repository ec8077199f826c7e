//! The KV-cache block pool of one simulated server, with vLLM-style automatic prefix caching.
//!
//! Model (after vLLM v1's `KVCacheManager`/`BlockPool`): the cache holds a fixed number of
//! blocks. A block is either free, private to one sequence (partly filled, or not yet named), or
//! named by its block hash and shared by every sequence whose prefix covers it. Named blocks
//! nobody references stay cached and are evicted least-recently-released first, only when a
//! free block is needed. A sequence's blocks are released last block first, so a prompt's tail
//! is evicted before its head (vLLM frees in reverse for the same reason).
//!
//! Bounds: memory is one 24-byte slot per named block plus the hash index; capacity is enforced
//! on allocation, never by a sweeper. Two sequences that compute the same block at the same time
//! keep one copy (vLLM may briefly keep two): a small under-count of usage.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

const NIL: u32 = u32::MAX;

/// Block hashes are already uniformly spread: pass them through instead of rehashing.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = scheduler_core::hash::fnv1a(self.0, bytes);
    }

    fn write_u64(&mut self, value: u64) {
        self.0 ^= value;
    }
}

/// A change to the set of cached blocks, as vLLM reports it in its KV-cache events
/// (`BlockStored` when a block is first named, `BlockRemoved` when it is evicted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvChange {
    /// A block was computed and cached.
    Stored {
        /// Its hash.
        hash: u64,
        /// The hash of the block before it, `None` for a prompt's first block.
        parent: Option<u64>,
        /// The LoRA adapter of the sequence that computed it.
        adapter: Option<u16>,
    },
    /// A cached block was evicted.
    Removed {
        /// Its hash.
        hash: u64,
    },
}

#[derive(Clone, Copy, Debug)]
struct NamedBlock {
    hash: u64,
    refs: u32,
    /// Links in the eviction list, meaningful only while `refs == 0`.
    older: u32,
    newer: u32,
}

/// The block pool: free, private and named blocks, and the eviction order of idle named ones.
#[derive(Debug)]
pub(crate) struct KvBlocks {
    capacity: u32,
    private: u32,
    slots: Vec<NamedBlock>,
    vacant_slots: Vec<u32>,
    index: HashMap<u64, u32, BuildHasherDefault<PassThroughHasher>>,
    oldest_idle: u32,
    newest_idle: u32,
    idle: u32,
    /// Changes since the last drain, when someone listens for them.
    changes: Option<Vec<KvChange>>,
}

impl KvBlocks {
    pub(crate) fn new(capacity: u32) -> Self {
        Self {
            capacity,
            private: 0,
            slots: Vec::new(),
            vacant_slots: Vec::new(),
            index: HashMap::default(),
            oldest_idle: NIL,
            newest_idle: NIL,
            idle: 0,
            changes: None,
        }
    }

    /// Starts keeping a list of [`KvChange`]s for [`Self::drain_changes`].
    pub(crate) fn record_changes(&mut self) {
        self.changes.get_or_insert_with(Vec::new);
    }

    /// Moves the changes since the last drain to `out`, oldest first.
    pub(crate) fn drain_changes(&mut self, out: &mut Vec<KvChange>) {
        if let Some(changes) = &mut self.changes {
            out.append(changes);
        }
    }

    pub(crate) fn capacity(&self) -> u32 {
        self.capacity
    }

    fn named(&self) -> u32 {
        self.index.len() as u32
    }

    fn free(&self) -> u32 {
        self.capacity - self.private - self.named()
    }

    /// Blocks that could be handed out now: free ones plus idle cached ones.
    pub(crate) fn allocatable(&self) -> u32 {
        self.free() + self.idle
    }

    /// Blocks held by sequences (what vLLM reports as KV-cache usage).
    pub(crate) fn in_use(&self) -> u32 {
        self.private + self.named() - self.idle
    }

    /// How many leading `hashes` are cached, and how many of those are idle (unreferenced).
    pub(crate) fn match_prefix(&self, hashes: &[u64]) -> (u32, u32) {
        let mut matched = 0;
        let mut idle = 0;
        for hash in hashes {
            match self.index.get(hash) {
                Some(&slot) => {
                    matched += 1;
                    idle += u32::from(self.slots[slot as usize].refs == 0);
                }
                None => break,
            }
        }
        (matched, idle)
    }

    /// Takes a reference on each of `hashes`, all of which must be cached, appending their
    /// slots to `slots` (what [`Self::release`] later takes back).
    pub(crate) fn acquire_prefix(&mut self, hashes: &[u64], slots: &mut Vec<u32>) {
        for hash in hashes {
            if let Some(&slot) = self.index.get(hash) {
                self.acquire(slot);
                slots.push(slot);
            }
        }
    }

    fn acquire(&mut self, slot: u32) {
        if self.slots[slot as usize].refs == 0 {
            self.unlink(slot);
            self.idle -= 1;
        }
        self.slots[slot as usize].refs += 1;
    }

    /// Hands out `count` private blocks, evicting idle cached blocks as needed; `false` (and
    /// nothing changed) when there are not enough.
    pub(crate) fn allocate(&mut self, count: u32) -> bool {
        if count > self.allocatable() {
            return false;
        }
        while self.free() < count {
            self.evict_oldest_idle();
        }
        self.private += count;
        true
    }

    /// Names one of the caller's private blocks `hash`: it becomes shared and cacheable. When
    /// the block is already cached, the caller's copy is freed and it shares the cached one.
    /// Returns the block's slot. `parent` and `adapter` describe the block for listeners.
    pub(crate) fn name_private_block(
        &mut self,
        hash: u64,
        parent: Option<u64>,
        adapter: Option<u16>,
    ) -> u32 {
        self.private -= 1;
        let next_slot = self.vacant_slots.last().copied().unwrap_or(self.slots.len() as u32);
        // One probe of the index whether the block is already cached or not.
        let slot = *self.index.entry(hash).or_insert(next_slot);
        if slot != next_slot {
            self.acquire(slot);
            return slot;
        }
        if let Some(changes) = &mut self.changes {
            changes.push(KvChange::Stored { hash, parent, adapter });
        }
        let block = NamedBlock { hash, refs: 1, older: NIL, newer: NIL };
        match self.vacant_slots.pop() {
            Some(vacant) => self.slots[vacant as usize] = block,
            None => self.slots.push(block),
        }
        slot
    }

    /// Drops a sequence's references on its named blocks' `slots` (released last first) and
    /// frees its `private` blocks.
    pub(crate) fn release(&mut self, slots: &[u32], private: u32) {
        self.private -= private;
        for &slot in slots.iter().rev() {
            let block = &mut self.slots[slot as usize];
            block.refs -= 1;
            if block.refs == 0 {
                self.link_newest(slot);
                self.idle += 1;
            }
        }
    }

    fn evict_oldest_idle(&mut self) {
        let slot = self.oldest_idle;
        if slot == NIL {
            return;
        }
        self.unlink(slot);
        self.idle -= 1;
        let hash = self.slots[slot as usize].hash;
        self.index.remove(&hash);
        if let Some(changes) = &mut self.changes {
            changes.push(KvChange::Removed { hash });
        }
        self.vacant_slots.push(slot);
    }

    fn unlink(&mut self, slot: u32) {
        let NamedBlock { older, newer, .. } = self.slots[slot as usize];
        match older {
            NIL => self.oldest_idle = newer,
            older => self.slots[older as usize].newer = newer,
        }
        match newer {
            NIL => self.newest_idle = older,
            newer => self.slots[newer as usize].older = older,
        }
        let block = &mut self.slots[slot as usize];
        block.older = NIL;
        block.newer = NIL;
    }

    fn link_newest(&mut self, slot: u32) {
        let previous = self.newest_idle;
        {
            let block = &mut self.slots[slot as usize];
            block.older = previous;
            block.newer = NIL;
        }
        match previous {
            NIL => self.oldest_idle = slot,
            previous => self.slots[previous as usize].newer = slot,
        }
        self.newest_idle = slot;
    }

    /// Whether every block is accounted for once (for tests).
    #[cfg(test)]
    pub(crate) fn is_consistent(&self) -> bool {
        let referenced = self.slots.iter().enumerate().filter(|(slot, block)| {
            self.index.get(&block.hash) == Some(&(*slot as u32)) && block.refs > 0
        });
        let mut idle_walk = 0;
        let mut cursor = self.oldest_idle;
        while cursor != NIL {
            idle_walk += 1;
            cursor = self.slots[cursor as usize].newer;
        }
        idle_walk == self.idle
            && referenced.count() as u32 + self.idle == self.named()
            && self.private + self.named() <= self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_blocks_are_reused_then_evicted_oldest_first() {
        let mut kv = KvBlocks::new(4);
        assert!(kv.allocate(3));
        kv.record_changes();
        let slots: Vec<u32> =
            [1, 2, 3].map(|hash| kv.name_private_block(hash, None, None)).to_vec();
        kv.release(&slots, 0);
        assert_eq!((kv.in_use(), kv.allocatable()), (0, 4));
        assert_eq!(kv.match_prefix(&[1, 2, 9]), (2, 2));
        // Released last first: 3 is the oldest idle block, so it goes first.
        assert!(kv.allocate(2));
        assert_eq!(kv.match_prefix(&[1, 2, 3]), (2, 2));
        let mut changes = Vec::new();
        kv.drain_changes(&mut changes);
        let stored = |hash| KvChange::Stored { hash, parent: None, adapter: None };
        assert_eq!(changes, [stored(1), stored(2), stored(3), KvChange::Removed { hash: 3 }]);
        let mut held = Vec::new();
        kv.acquire_prefix(&[1, 2], &mut held);
        assert_eq!(held.len(), 2);
        assert_eq!(kv.in_use(), 4);
        assert!(!kv.allocate(1), "everything is referenced");
        assert!(kv.is_consistent());
    }
}
