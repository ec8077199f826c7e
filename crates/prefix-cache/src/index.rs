//! The bounded, concurrent index of which endpoints hold which prompt blocks.
//!
//! # Layout
//! * A **registry** maps each endpoint key `K` to a small `u32` slot and holds, per slot, the
//!   endpoint's LRU (a doubly linked list threaded through a slab of 16-byte nodes with `u32`
//!   links, reusing the least recent node once full) behind its own mutex.
//! * The **reverse map** from block hash to holders is split into a power-of-two number of shards
//!   by (mixed) block hash, each a linear-probing multimap of 16-byte `(hash, slot, node)` entries
//!   behind a `parking_lot` `RwLock`. An entry names the endpoint slot and the block's node in that
//!   endpoint's LRU, so the reverse map doubles as the per-endpoint "do I hold this block?" map and
//!   no third structure is needed.
//!
//! # Operations
//! * `record(k, hashes)` locks endpoint `k`'s LRU, then, block by block, looks the pair up in its
//!   shard (read lock), touches it if present, otherwise takes a node from the LRU (evicting the
//!   least recent block, whose pair is removed from *its* shard) and inserts the pair. Capacity is
//!   enforced right there, on insert; nothing sweeps in the background.
//! * `longest_prefix_matches(hashes)` seeds candidates with the holders of the first block and,
//!   block by block, keeps those that also hold the next one; an endpoint leaves the candidate set
//!   with the number of leading blocks it holds, and the walk stops when the set is empty. The cost
//!   is `O(sum over visited blocks of the block's probe run)`, with one shard read lock at a time.
//! * `remove_endpoint(k)` unpublishes the key, drains the endpoint's pairs from the shards, then
//!   frees the slot for reuse.
//!
//! # Cost of popular blocks
//! All pairs of one block hash share a probe run, so a block held by `m` endpoints is a run of
//! about `m / (1 - load)` buckets: a lookup visiting it scans that run (a system prompt held by
//! all of 1,000 endpoints costs about 10 µs per block), and other hashes whose home falls inside
//! it probe further. Keeping a separate holder list for hashes with many holders would bound
//! that; the single table was kept for its 16-byte entries.
//!
//! # Lock order and why it cannot deadlock
//! Locks are only ever taken in this order: **registry → endpoint LRU → one shard**. A thread holds
//! at most one endpoint LRU and at most one shard at any time, and never waits for an earlier lock
//! while holding a later one:
//! * `record` takes the registry briefly to resolve the slot and releases it before locking the LRU;
//!   with the LRU held it locks shards one after another, releasing each before the next.
//! * `remove_endpoint` takes the registry (write) to unpublish, releases it, drains under the LRU
//!   lock with one shard at a time, releases the LRU, then takes the registry again to free the slot.
//! * lookups hold the registry read lock for the whole call (so a slot cannot be freed and reused
//!   for another key while its pairs are being read) and take shard read locks one at a time; they
//!   never lock an LRU.
//!
//! Since every wait is for a lock later in a fixed total order than all locks held, no cycle of
//! waiters can form. Lookups never block each other; they wait only for a shard writer inserting
//! or removing one pair, or for a registry writer adding or retiring an endpoint.
//!
//! # Memory
//! With `C` the capacity per endpoint, `n_e` the blocks held by endpoint `e`, `N = Σ n_e`, `S`
//! shards and `P` endpoint slots (peak number of endpoints alive at once):
//!
//! ```text
//! memory_bytes() <= F + S * (SHARD + 16 * 16) + P * ENDPOINT + Σ_e 16 * min(C, max(8, 2 n_e)) + 32 * N
//! ```
//!
//! * 16 bytes per LRU node (hash + two `u32` links); the slab is exactly `C` nodes once full;
//! * 16 bytes per reverse-map bucket, with at most `2 * len` buckets per shard (at least 16),
//!   0.64–0.8 load while the index grows;
//! * `F`, `SHARD` and `ENDPOINT` are small constants (struct sizes, registry entry, `Arc<Mutex<_>>`).
//!
//! So at full capacity each indexed (endpoint, block) pair costs **at most 48 bytes** (16 + 32), and
//! 36–41 bytes once the shards have grown to their steady size. [`PrefixIndex::memory_bytes`]
//! measures allocated capacities; [`PrefixIndex::memory_bound_bytes`] evaluates the right-hand side.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::Hash;
use std::mem::size_of;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock, RwLockReadGuard};

use crate::block_table::{BUCKET_BYTES, BlockEntry, BlockTable, MIN_BUCKETS, mix};
use crate::endpoint_lru::{EndpointLru, NODE_BYTES};

/// Default capacity per endpoint, in blocks (GIE's `lruCapacityPerServer`).
pub const DEFAULT_CAPACITY_PER_ENDPOINT: usize = 31_250;
/// Default number of reverse-map shards.
pub const DEFAULT_SHARDS: usize = 64;
/// Bytes per indexed (endpoint, block) pair at full capacity, not counting per-endpoint and
/// per-shard constants: a 16-byte LRU node plus at most two 16-byte reverse-map buckets.
pub const MAX_BYTES_PER_BLOCK_AT_CAPACITY: usize = NODE_BYTES + 2 * BUCKET_BYTES;

/// Sizing of a [`PrefixIndex`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexConfig {
    /// Most blocks one endpoint may hold; the least recently recorded are evicted beyond it.
    /// Capped at `u32::MAX - 1`.
    pub capacity_per_endpoint: usize,
    /// Number of reverse-map shards, rounded up to a power of two (at least 1, at most 65,536).
    pub shards: usize,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self { capacity_per_endpoint: DEFAULT_CAPACITY_PER_ENDPOINT, shards: DEFAULT_SHARDS }
    }
}

/// A broken internal invariant, found by [`PrefixIndex::check_invariants`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("prefix index invariant violated: {0}")]
pub struct InvariantViolation(String);

type SharedLru = Arc<Mutex<EndpointLru>>;

#[derive(Debug)]
enum SlotState<K> {
    Free,
    Live {
        key: K,
        lru: SharedLru,
    },
    /// Unpublished by `remove_endpoint`, pairs still being drained: not reused, not reported.
    Draining,
}

#[derive(Debug)]
struct Registry<K> {
    slot_of: HashMap<K, u32>,
    slots: Vec<SlotState<K>>,
    free: Vec<u32>,
}

/// Per-thread lookup scratch, kept so a lookup allocates nothing once warm.
#[derive(Debug, Default)]
struct LookupScratch {
    candidates: Vec<u32>,
    /// `marks[slot] == stamp` when the slot holds the block being visited.
    marks: Vec<u32>,
    stamp: u32,
}

impl LookupScratch {
    fn next_stamp(&mut self) -> u32 {
        if self.stamp == u32::MAX {
            self.marks.iter_mut().for_each(|m| *m = 0);
            self.stamp = 0;
        }
        self.stamp += 1;
        self.stamp
    }
}

thread_local! {
    static SCRATCH: RefCell<LookupScratch> = RefCell::new(LookupScratch::default());
}

/// Which endpoints hold which prompt blocks, with a bounded LRU per endpoint.
///
/// All methods take `&self`; see the [module docs](self) for the locking scheme and the memory
/// formula.
#[derive(Debug)]
pub struct PrefixIndex<K> {
    capacity: usize,
    shard_mask: u64,
    shards: Box<[RwLock<BlockTable>]>,
    registry: RwLock<Registry<K>>,
}

impl<K> Default for PrefixIndex<K>
where
    K: Copy + Eq + Hash + Send + Sync + 'static,
{
    fn default() -> Self {
        Self::new(IndexConfig::default())
    }
}

impl<K> PrefixIndex<K>
where
    K: Copy + Eq + Hash + Send + Sync + 'static,
{
    /// Creates an empty index. Shards start without buckets, so an empty index is tiny.
    pub fn new(config: IndexConfig) -> Self {
        let shard_count = config.shards.clamp(1, 1 << 16).next_power_of_two();
        Self {
            capacity: config.capacity_per_endpoint.min(crate::endpoint_lru::MAX_CAPACITY),
            shard_mask: shard_count as u64 - 1,
            shards: (0..shard_count).map(|_| RwLock::default()).collect(),
            registry: RwLock::new(Registry {
                slot_of: HashMap::new(),
                slots: Vec::new(),
                free: Vec::new(),
            }),
        }
    }

    /// The effective configuration (capacity capped, shard count rounded).
    pub fn config(&self) -> IndexConfig {
        IndexConfig { capacity_per_endpoint: self.capacity, shards: self.shards.len() }
    }

    fn shard(&self, hash: u64) -> &RwLock<BlockTable> {
        let index = (mix(hash) & self.shard_mask) as usize;
        // The mask keeps the index in range; the fallback only satisfies the no-panic rule.
        self.shards.get(index).unwrap_or(&self.shards[0])
    }

    /// Records that endpoint `key` now holds the blocks `hashes` (a prompt's chain, first block
    /// first), adding the endpoint if it is new.
    ///
    /// Held blocks become the most recent; new ones are inserted, evicting the endpoint's least
    /// recent blocks beyond its capacity. The leading block ends up most recent, so that when a
    /// prompt alone overflows the capacity it is the deepest blocks that go, never the prefix
    /// that makes the rest reachable; for the same reason only the first `capacity` blocks count.
    pub fn record(&self, key: K, hashes: &[u64]) {
        if self.capacity == 0 || hashes.is_empty() {
            return;
        }
        let kept = &hashes[..hashes.len().min(self.capacity)];
        // A concurrent `remove_endpoint` may retire the LRU between resolving and locking it;
        // resolving again then registers the key afresh. Two rounds cover one such race; losing
        // a further race drops this record, which only costs a future cache-hit estimate.
        for _ in 0..3 {
            let Some((slot, lru)) = self.live_slot(key) else {
                return;
            };
            let mut lru = lru.lock();
            if lru.retired {
                continue;
            }
            for &hash in kept.iter().rev() {
                self.record_block(slot, &mut lru, hash);
            }
            return;
        }
    }

    fn record_block(&self, slot: u32, lru: &mut EndpointLru, hash: u64) {
        let shard = self.shard(hash);
        // Only this endpoint's writer, which holds `lru`, adds or removes pairs of `slot`, so the
        // answer cannot change between this read and the insert below.
        let held = shard.read().find(hash, slot);
        if let Some(node) = held {
            lru.touch(node);
            return;
        }
        let Some((node, evicted)) = lru.insert(hash) else {
            return;
        };
        if let Some(old_hash) = evicted {
            self.shard(old_hash).write().remove(old_hash, slot);
        }
        shard.write().insert(BlockEntry { hash, slot, node });
    }

    /// Resolves `key` to its slot and LRU, registering it if unknown. `None` only when all
    /// `u32` slots are in use.
    fn live_slot(&self, key: K) -> Option<(u32, SharedLru)> {
        {
            let registry = self.registry.read();
            if let Some(found) = Self::live_of(&registry, key) {
                return Some(found);
            }
        }
        let mut registry = self.registry.write();
        if let Some(found) = Self::live_of(&registry, key) {
            return Some(found);
        }
        let lru: SharedLru = Arc::new(Mutex::new(EndpointLru::new(self.capacity)));
        let state = SlotState::Live { key, lru: Arc::clone(&lru) };
        let slot = match registry.free.pop() {
            Some(slot) => {
                *registry.slots.get_mut(slot as usize)? = state;
                slot
            }
            None => {
                let slot = u32::try_from(registry.slots.len()).ok()?;
                registry.slots.push(state);
                slot
            }
        };
        registry.slot_of.insert(key, slot);
        Some((slot, lru))
    }

    fn live_of(registry: &Registry<K>, key: K) -> Option<(u32, SharedLru)> {
        let slot = *registry.slot_of.get(&key)?;
        match registry.slots.get(slot as usize) {
            Some(SlotState::Live { lru, .. }) => Some((slot, Arc::clone(lru))),
            _ => None,
        }
    }

    /// Forgets endpoint `key` and all its blocks. Returns whether it was known.
    pub fn remove_endpoint(&self, key: K) -> bool {
        let (slot, lru) = {
            let mut registry = self.registry.write();
            let Some(slot) = registry.slot_of.remove(&key) else {
                return false;
            };
            let Some(state) = registry.slots.get_mut(slot as usize) else {
                return false;
            };
            match std::mem::replace(state, SlotState::Draining) {
                SlotState::Live { lru, .. } => (slot, lru),
                other => {
                    *state = other;
                    return false;
                }
            }
        };
        {
            let mut lru = lru.lock();
            lru.retired = true;
            for hash in lru.slab_hashes() {
                self.shard(hash).write().remove(hash, slot);
            }
            lru.clear();
        }
        let mut registry = self.registry.write();
        if let Some(state) = registry.slots.get_mut(slot as usize) {
            *state = SlotState::Free;
            registry.free.push(slot);
        }
        true
    }

    /// Writes into `out` (cleared first), for each endpoint holding `hashes[0]`, the number of
    /// leading blocks of `hashes` it holds. Endpoints holding no leading block are left out; the
    /// order is unspecified.
    ///
    /// Allocates nothing once `out` and this thread's scratch have grown to the pool size.
    pub fn longest_prefix_matches(&self, hashes: &[u64], out: &mut Vec<(K, usize)>) {
        out.clear();
        let Some(&first) = hashes.first() else {
            return;
        };
        let registry = self.registry.read();
        SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut scratch) => self.walk_prefix(&registry, hashes, first, &mut scratch, out),
            // Only reachable through reentrancy, which lookups do not do; stay correct anyway.
            Err(_) => {
                self.walk_prefix(&registry, hashes, first, &mut LookupScratch::default(), out)
            }
        });
    }

    fn walk_prefix(
        &self,
        registry: &RwLockReadGuard<'_, Registry<K>>,
        hashes: &[u64],
        first: u64,
        scratch: &mut LookupScratch,
        out: &mut Vec<(K, usize)>,
    ) {
        let emit = |out: &mut Vec<(K, usize)>, slot: u32, depth: usize| {
            if let Some(SlotState::Live { key, .. }) = registry.slots.get(slot as usize) {
                out.push((*key, depth));
            }
        };
        scratch.candidates.clear();
        self.shard(first).read().for_each_holder(first, |slot| scratch.candidates.push(slot));
        if scratch.candidates.is_empty() {
            return;
        }
        if scratch.marks.len() < registry.slots.len() {
            scratch.marks.resize(registry.slots.len(), 0);
        }
        for (depth, &hash) in hashes.iter().enumerate().skip(1) {
            let stamp = scratch.next_stamp();
            let LookupScratch { candidates, marks, .. } = &mut *scratch;
            self.shard(hash).read().for_each_holder(hash, |slot| {
                if let Some(mark) = marks.get_mut(slot as usize) {
                    *mark = stamp;
                }
            });
            candidates.retain(|&slot| {
                let still_matching = marks.get(slot as usize) == Some(&stamp);
                if !still_matching {
                    emit(out, slot, depth);
                }
                still_matching
            });
            if candidates.is_empty() {
                return;
            }
        }
        for &slot in &scratch.candidates {
            emit(out, slot, hashes.len());
        }
    }

    /// Number of indexed (endpoint, block) pairs.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    /// Whether no endpoint holds any block.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of endpoints known to the index.
    pub fn endpoint_count(&self) -> usize {
        self.registry.read().slot_of.len()
    }

    /// Whether endpoint `key` holds block `hash`.
    pub fn contains(&self, key: K, hash: u64) -> bool {
        let slot = self.registry.read().slot_of.get(&key).copied();
        slot.is_some_and(|slot| self.shard(hash).read().find(hash, slot).is_some())
    }

    /// The blocks endpoint `key` holds, most recent first (empty if unknown). Allocates: meant
    /// for tests and debugging.
    pub fn blocks_of(&self, key: K) -> Vec<u64> {
        let lru = Self::live_of(&self.registry.read(), key);
        lru.map(|(_, lru)| lru.lock().iter_newest_first().map(|(_, h)| h).collect())
            .unwrap_or_default()
    }

    fn endpoint_overhead_bytes() -> usize {
        // Arc header (two counters) + the mutex-wrapped LRU it points to.
        2 * size_of::<usize>() + size_of::<Mutex<EndpointLru>>()
    }

    fn fixed_bytes(&self) -> usize {
        size_of::<Self>() + self.shards.len() * size_of::<RwLock<BlockTable>>()
    }

    fn slot_map_bytes(capacity: usize) -> usize {
        // hashbrown: `capacity` is 7/8 of a power-of-two bucket count (one less below 8 buckets),
        // each bucket holding one `(K, u32)` and a control byte, plus one trailing control group.
        let buckets = match capacity {
            0 => return 0,
            c if c < 7 => c + 1,
            c => c / 7 * 8,
        };
        buckets * (size_of::<(K, u32)>() + 1) + 16
    }

    /// Heap and inline bytes held by the index, from allocated capacities (excluding each
    /// thread's lookup scratch of `4 * (endpoints + slots)` bytes).
    pub fn memory_bytes(&self) -> usize {
        let registry = self.registry.read();
        let mut total = self.fixed_bytes()
            + Self::slot_map_bytes(registry.slot_of.capacity())
            + registry.slots.capacity() * size_of::<SlotState<K>>()
            + registry.free.capacity() * size_of::<u32>();
        for state in &registry.slots {
            if let SlotState::Live { lru, .. } = state {
                total += Self::endpoint_overhead_bytes() + lru.lock().heap_bytes();
            }
        }
        drop(registry);
        total + self.shards.iter().map(|s| s.read().heap_bytes()).sum::<usize>()
    }

    /// The documented memory bound (see the [module docs](self)) evaluated for the current
    /// contents: `memory_bytes()` never exceeds it when no write is in progress.
    pub fn memory_bound_bytes(&self) -> usize {
        let registry = self.registry.read();
        let slots = registry.slots.len();
        // Vec doubling keeps `slots` and `free` within max(4, 2 * slots) elements; the key map
        // never needed more than `slots` entries, hence at most 3 * slots + 8 buckets.
        let vec_elems = (2 * slots).max(4);
        let registry_bytes = vec_elems * (size_of::<SlotState<K>>() + size_of::<u32>())
            + (3 * slots + 8) * (size_of::<(K, u32)>() + 1)
            + 16;
        let mut total = self.fixed_bytes() + registry_bytes;
        let mut blocks = 0;
        for state in &registry.slots {
            if let SlotState::Live { lru, .. } = state {
                let held = lru.lock().len();
                blocks += held;
                total += Self::endpoint_overhead_bytes()
                    + NODE_BYTES * EndpointLru::slab_bound(held, self.capacity);
            }
        }
        total + self.shards.len() * MIN_BUCKETS * BUCKET_BYTES + 2 * BUCKET_BYTES * blocks
    }

    /// Verifies that the reverse map and the per-endpoint LRUs describe the same pairs, that no
    /// endpoint exceeds its capacity and that every structure is within its size bound.
    ///
    /// Meant for tests: call it while no write is in progress, as a concurrent write may be
    /// reported as a violation.
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        let fail = |message: String| Err(InvariantViolation(message));
        let registry = self.registry.read();
        // slot -> (node -> hash) snapshot, taken under each LRU lock (registry -> LRU -> shard).
        let mut held: HashMap<u32, HashMap<u32, u64>> = HashMap::new();
        let mut live = 0;
        for (slot, state) in registry.slots.iter().enumerate() {
            let slot = slot as u32;
            match state {
                SlotState::Free => {
                    if !registry.free.contains(&slot) {
                        return fail(format!("free slot {slot} missing from the free list"));
                    }
                }
                SlotState::Draining => return fail(format!("slot {slot} still draining")),
                SlotState::Live { key, lru } => {
                    live += 1;
                    if registry.slot_of.get(key) != Some(&slot) {
                        return fail(format!("slot {slot} not registered under its key"));
                    }
                    let lru = lru.lock();
                    if let Err(message) = lru.check() {
                        return fail(format!("endpoint slot {slot}: {message}"));
                    }
                    let mut nodes = HashMap::new();
                    let mut hashes = std::collections::HashSet::new();
                    for (node, hash) in lru.iter_newest_first() {
                        if !hashes.insert(hash) {
                            return fail(format!("slot {slot} holds block {hash:#x} twice"));
                        }
                        if self.shard(hash).read().find(hash, slot) != Some(node) {
                            return fail(format!("slot {slot} block {hash:#x} not in reverse map"));
                        }
                        nodes.insert(node, hash);
                    }
                    held.insert(slot, nodes);
                }
            }
        }
        if live != registry.slot_of.len() || registry.free.len() + live != registry.slots.len() {
            return fail("registry map, slots and free list disagree".to_owned());
        }
        let mut pairs = 0;
        for (index, shard) in self.shards.iter().enumerate() {
            let shard = shard.read();
            if let Err(message) = shard.check() {
                return fail(format!("shard {index}: {message}"));
            }
            for entry in shard.entries() {
                pairs += 1;
                if (mix(entry.hash) & self.shard_mask) as usize != index {
                    return fail(format!("block {:#x} in the wrong shard", entry.hash));
                }
                let owner = held.get(&entry.slot).and_then(|nodes| nodes.get(&entry.node));
                if owner != Some(&entry.hash) {
                    return fail(format!("reverse entry {entry:?} has no matching LRU node"));
                }
            }
        }
        let lru_pairs: usize = held.values().map(HashMap::len).sum();
        if pairs != lru_pairs {
            return fail(format!("{pairs} reverse entries but {lru_pairs} LRU nodes"));
        }
        Ok(())
    }
}
