//! The bounded, concurrent index of which endpoints hold which prompt blocks.
//!
//! # Layout
//! * A **registry** maps each endpoint key `K` to a small `u32` slot and holds, per slot, the
//!   endpoint's LRU (a doubly linked list threaded through a slab of 16-byte nodes with `u32`
//!   links, reusing the least recent node once full) behind its own mutex.
//! * The **reverse map** from block hash to holders is split into a power-of-two number of shards
//!   by (mixed) block hash, each a linear-probing table of 16-byte buckets behind a `parking_lot`
//!   `RwLock`. A block held by few endpoints has one `(hash, slot, node)` bucket per holder; a
//!   block held by many (32 on the way up, down to 16 on the way back) has one marker bucket
//!   naming a *holder set*: a bitset over endpoint slots plus the holders' LRU nodes in slot order
//!   (see `block_table`). Either way the reverse map names the endpoint slot and the block's node
//!   in that endpoint's LRU, so it doubles as the per-endpoint "do I hold this block?" map and no
//!   third structure is needed.
//!
//! # Operations
//! * `record(k, hashes)` locks endpoint `k`'s LRU and applies the prompt's blocks as a batch, with
//!   the result of applying them one by one (last block first): it looks every block up in its
//!   shard (the shards' read locks held together), then, on the LRU alone, touches the held
//!   blocks and gives each new block a node (evicting the least recent block), then removes the
//!   evicted pairs and inserts the new ones, each shard's write lock taken once. Capacity is
//!   enforced right there, on insert; nothing sweeps in the background. Batching is what makes a
//!   record cheap: each new block costs a cache miss at its bucket and one at the evicted
//!   block's, and the batch issues each kind of miss for all blocks at once, so that they overlap
//!   (see `record_blocks`).
//! * `longest_prefix_matches(hashes, scratch, out)` seeds candidates with the holders of the first
//!   block and, block by block, keeps those that also hold the next one; an endpoint leaves the
//!   candidate set with the number of leading blocks it holds, and the walk stops when the set is
//!   empty. While many candidates are left they are a bitset, narrowed by a word-wise AND with
//!   each block's holder set, and the candidates that drop out are `current & !next`; once fewer
//!   candidates than words remain (or a block with few holders is reached) they are a list checked
//!   against each block's pairs. The cost is `O(Σ over visited blocks of min(W, candidates) + probe
//!   run)` plus one step per reported endpoint, with `W = ⌈slots / 64⌉`, taking one shard read lock
//!   at a time. The candidates live in the caller's [`LookupScratch`], so a warm lookup allocates
//!   nothing and lookups on different threads share no buffer.
//! * `remove_endpoint(k)` unpublishes the key, drains the endpoint's pairs from the shards, then
//!   frees the slot for reuse.
//!
//! # Cost of popular blocks
//! A system prompt held by all of 1,000 endpoints is one marker bucket and a 16-word bitset per
//! block: a lookup narrows 1,000 candidates with 16 ANDs per block instead of scanning a probe run
//! of about 3,000 buckets, and other hashes no longer probe past such runs. Pair buckets are kept
//! for blocks with few holders (the common case for the tail of a prompt) because a bitset and
//! its bookkeeping only pay for themselves once spread over many holders; a block whose holders
//! are too sparse among the slots (a bitset of more than one word per holder) stays as pairs.

//! # Lock order and why it cannot deadlock
//! Locks are only ever taken in this order: **registry → endpoint LRU → shards in ascending
//! index**. A thread holds at most one endpoint LRU at any time, and never waits for an earlier
//! lock while holding a later one:
//! * `record` takes the registry briefly to resolve the slot and releases it before locking the LRU;
//!   with the LRU held it read-locks the shards its blocks fall in, in ascending order, and holds
//!   them together while it looks the blocks up (likewise to read the evicted blocks' buckets);
//!   it then write-locks those shards one after another, releasing each before the next.
//! * `remove_endpoint` takes the registry (write) to unpublish, releases it, drains under the LRU
//!   lock with one shard at a time, releases the LRU, then takes the registry again to free the slot.
//! * lookups hold the registry read lock for the whole call (so a slot cannot be freed and reused
//!   for another key while its pairs are being read) and take shard read locks one at a time; they
//!   never lock an LRU.
//! * a holder set lives inside its shard and is only touched under that shard's lock: switching a
//!   block between pairs and a set happens within one insert or removal, so it adds no lock.
//!
//! Since every wait is for a lock later in a fixed total order than all locks held (shards ordered
//! by index), no cycle of waiters can form. Lookups never block each other; they wait only for a shard writer inserting
//! or removing one pair, or for a registry writer adding or retiring an endpoint.
//!
//! # Memory
//! With `C` the capacity per endpoint, `n_e` the blocks held by endpoint `e`, `N = Σ n_e`, `S`
//! shards and `P` endpoint slots (peak number of endpoints alive at once):
//!
//! ```text
//! memory_bytes() <= F + S * (SHARD + 16 * 16 + 8 * 56) + P * ENDPOINT
//!                   + Σ_e 16 * min(C, max(8, 2 n_e)) + 32 * N
//! ```
//!
//! * 16 bytes per LRU node (hash + two `u32` links); the slab is exactly `C` nodes once full;
//! * a block with few holders: one 16-byte bucket per holder, with at most `2 * len` buckets per
//!   shard (at least 16), 0.64–0.8 load while the index grows: at most 32 bytes per holder;
//! * a block with `m >= 16` holders in a set: its marker bucket (at most 32 bytes), at most two
//!   56-byte entries of the shard's set vector (at least 8 entries), a bitset of `W <= m` words and
//!   at most `2 m` `u32` node indices: at most `144 + 16 m <= 32 m` bytes, i.e. at most 32 bytes
//!   per holder (about `8 + 8 W / m` once `m` is large: 8–9 bytes per holder for a block held by
//!   all of 1,000 endpoints);
//! * `F`, `SHARD` and `ENDPOINT` are small constants (struct sizes, registry entry, `Arc<Mutex<_>>`).
//!
//! So at full capacity each indexed (endpoint, block) pair costs **at most 48 bytes** (16 + 32), and
//! 36–41 bytes once the shards have grown to their steady size (less when blocks are shared by
//! many endpoints). [`PrefixIndex::memory_bytes`] measures allocated capacities;
//! [`PrefixIndex::memory_bound_bytes`] evaluates the right-hand side.

use std::collections::HashMap;
use std::hash::Hash;
use std::mem::size_of;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::block_table::{
    BUCKET_BYTES, BlockEntry, BlockTable, Holders, MAX_SLOTS, MIN_BUCKETS, MIN_SETS, PairSlots,
    SET_BYTES, SetBits, bit_is_set,
};
use crate::endpoint_lru::{EndpointLru, NODE_BYTES};
use crate::hash::mix64;

/// Cache lines read ahead per block by a record (see [`BlockTable::warm`]): at the table's load
/// a new pair usually lands, and a removal's backward shift usually ends, within this many.
const WARM_LINES: usize = 2;

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

/// The reusable buffers of a lookup ([`PrefixIndex::longest_prefix_matches`]).
///
/// A lookup allocates nothing once its scratch has grown to the pool size, which takes about
/// `4 * endpoints + 4.125 * slots` bytes (a candidate list, a bitset over endpoint slots and a
/// mark per slot). Keep one per thread (or per worker making decisions) and pass it to every
/// lookup. One scratch may serve several indexes; what it holds between lookups is meaningless.
#[derive(Debug, Default)]
pub struct LookupScratch {
    /// The candidates while few of them are left ([`Survivors::List`]).
    list: Vec<u32>,
    /// The candidates while many are left ([`Survivors::Bits`]): bit `s` set when slot `s` still
    /// matches.
    bits: Vec<u64>,
    marks: Marks,
}

/// `marks[slot] == stamp` when the slot holds the block being visited.
#[derive(Debug, Default)]
struct Marks {
    marks: Vec<u32>,
    stamp: u32,
}

impl Marks {
    /// Makes room for a mark per slot.
    fn fit(&mut self, slots: usize) {
        if self.marks.len() < slots {
            self.marks.resize(slots, 0);
        }
    }

    fn next_stamp(&mut self) -> u32 {
        if self.stamp == u32::MAX {
            self.marks.iter_mut().for_each(|m| *m = 0);
            self.stamp = 0;
        }
        self.stamp += 1;
        self.stamp
    }
}

/// Where a lookup reports each endpoint with the number of leading blocks it holds.
struct Report<'a, K> {
    slots: &'a [SlotState<K>],
    out: &'a mut Vec<(K, usize)>,
}

impl<K: Copy> Report<'_, K> {
    /// Reports the endpoint in `slot` as holding `depth` leading blocks; a slot that is no
    /// longer live (drained by `remove_endpoint`) is left out.
    fn slot(&mut self, slot: u32, depth: usize) {
        if let Some(SlotState::Live { key, .. }) = self.slots.get(slot as usize) {
            self.out.push((*key, depth));
        }
    }

    /// Reports the slots set in `word`, word `w` of a slot bitset, as holding `depth` blocks.
    ///
    /// Kept out of line so that the word-wise AND loops calling it keep their state in
    /// registers: inlined, it made a lookup of a prompt held by 1,000 endpoints about 17% slower.
    #[inline(never)]
    fn word(&mut self, w: usize, word: u64, depth: usize) {
        for slot in (SetBits { word, base: w * 64 }) {
            self.slot(slot, depth);
        }
    }
}

/// The endpoint slots that hold every block visited so far, kept in a [`LookupScratch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Survivors {
    /// Many: the slots set in `bits`, `live` of them.
    Bits { live: usize },
    /// Few: the slots in `list`.
    List,
}

impl Survivors {
    /// The holders of the first block: a bitset of `words` words if they are a set, else a list.
    fn seed(first: Holders<'_>, words: usize, scratch: &mut LookupScratch) -> Self {
        scratch.list.clear();
        match first {
            Holders::Set(holders) => {
                let bits = &mut scratch.bits;
                bits.clear();
                bits.extend((0..words).map(|w| holders.get(w).copied().unwrap_or(0)));
                Self::Bits { live: bits.iter().map(|w| w.count_ones() as usize).sum() }
            }
            Holders::Pairs(slots) => {
                scratch.list.extend(slots);
                Self::List
            }
        }
    }

    /// Turns a bitset into a list once fewer survivors than words are left, when a list is the
    /// cheaper to narrow.
    #[inline]
    fn settle(&mut self, words: usize, scratch: &mut LookupScratch) {
        if let Self::Bits { live } = *self
            && live <= words
        {
            scratch.list.clear();
            for (w, &word) in scratch.bits.iter().enumerate() {
                scratch.list.extend(SetBits { word, base: w * 64 });
            }
            *self = Self::List;
        }
    }

    /// Whether no endpoint holds every block visited so far, which ends the walk.
    #[inline]
    fn is_empty(self, scratch: &LookupScratch) -> bool {
        match self {
            Self::Bits { live } => live == 0,
            Self::List => scratch.list.is_empty(),
        }
    }

    /// Keeps the survivors that hold the next block, reporting the others as holding the
    /// `depth` blocks before it.
    fn narrow<K: Copy>(
        &mut self,
        next: Holders<'_>,
        depth: usize,
        scratch: &mut LookupScratch,
        report: &mut Report<'_, K>,
    ) {
        match next {
            Holders::Set(holders) => self.narrow_by_set(holders, depth, scratch, report),
            Holders::Pairs(slots) => self.narrow_by_pairs(slots, depth, scratch, report),
        }
    }

    /// Narrows by a block with many holders, given as a slot bitset.
    fn narrow_by_set<K: Copy>(
        &mut self,
        holders: &[u64],
        depth: usize,
        scratch: &mut LookupScratch,
        report: &mut Report<'_, K>,
    ) {
        match self {
            Self::Bits { live } => {
                for (w, word) in scratch.bits.iter_mut().enumerate() {
                    let kept = *word & holders.get(w).copied().unwrap_or(0);
                    let gone = *word & !kept;
                    if gone != 0 {
                        *live -= gone.count_ones() as usize;
                        report.word(w, gone, depth);
                    }
                    *word = kept;
                }
            }
            Self::List => scratch.list.retain(|&slot| {
                let held = bit_is_set(holders, slot);
                if !held {
                    report.slot(slot, depth);
                }
                held
            }),
        }
    }

    /// Narrows by a block with few holders, given as its pairs' slots.
    fn narrow_by_pairs<K: Copy>(
        &mut self,
        slots: PairSlots<'_>,
        depth: usize,
        scratch: &mut LookupScratch,
        report: &mut Report<'_, K>,
    ) {
        let LookupScratch { list, bits, marks } = scratch;
        match self {
            Self::Bits { .. } => {
                // The block's holders are the only survivors, so they become the list and every
                // other slot left in the bitset stops here.
                list.clear();
                for slot in slots {
                    if let Some(word) = bits.get_mut(slot as usize / 64) {
                        let bit = 1u64 << (slot % 64);
                        if *word & bit != 0 {
                            *word &= !bit;
                            list.push(slot);
                        }
                    }
                }
                for (w, &word) in bits.iter().enumerate() {
                    report.word(w, word, depth);
                }
                *self = Self::List;
            }
            Self::List => {
                let stamp = marks.next_stamp();
                for slot in slots {
                    if let Some(mark) = marks.marks.get_mut(slot as usize) {
                        *mark = stamp;
                    }
                }
                list.retain(|&slot| {
                    let held = marks.marks.get(slot as usize) == Some(&stamp);
                    if !held {
                        report.slot(slot, depth);
                    }
                    held
                });
            }
        }
    }

    /// Reports the survivors as holding all `depth` blocks of the prompt.
    fn report_rest<K: Copy>(
        self,
        depth: usize,
        scratch: &LookupScratch,
        report: &mut Report<'_, K>,
    ) {
        match self {
            Self::Bits { .. } => {
                for (w, &word) in scratch.bits.iter().enumerate() {
                    report.word(w, word, depth);
                }
            }
            Self::List => {
                for &slot in &scratch.list {
                    report.slot(slot, depth);
                }
            }
        }
    }
}

/// The blocks of one record, with the first occurrence of each (a prompt may repeat a block)
/// and a small open-addressing map from block to first occurrence.
struct RecordBlocks {
    /// `first[i]`: the first position holding the same block as position `i`.
    first: Vec<u32>,
    /// Position + 1 of each distinct block, at its mixed hash's slot (0: empty).
    table: Vec<u32>,
}

impl RecordBlocks {
    fn new(keys: &[u64]) -> Self {
        let size = (2 * keys.len()).next_power_of_two().max(2);
        let mut blocks = Self { first: Vec::with_capacity(keys.len()), table: vec![0; size] };
        for (i, &key) in keys.iter().enumerate() {
            let first = match blocks.find(keys, key) {
                Some(first) => first,
                None => {
                    let mut at = Self::home(key, size);
                    while blocks.table.get(at).is_some_and(|&e| e != 0) {
                        at = (at + 1) & (size - 1);
                    }
                    if let Some(entry) = blocks.table.get_mut(at) {
                        *entry = i as u32 + 1;
                    }
                    i
                }
            };
            blocks.first.push(first as u32);
        }
        blocks
    }

    fn home(key: u64, size: usize) -> usize {
        // The shards use the low bits and the tables the high ones; any bits of a mixed hash do.
        (key >> 20) as usize & (size - 1)
    }

    /// The first position of block `key` among `keys` (those the map was built from).
    fn find(&self, keys: &[u64], key: u64) -> Option<usize> {
        let size = self.table.len();
        let mut at = Self::home(key, size);
        loop {
            let position = (*self.table.get(at)? as usize).checked_sub(1)?;
            if keys.get(position) == Some(&key) {
                return Some(position);
            }
            at = (at + 1) & (size - 1);
        }
    }
}

/// `(shard << 32) | position` for each `(position, mixed hash)`, sorted: grouped by shard in
/// ascending order, positions in order within a shard.
fn by_shard(keys: impl Iterator<Item = (usize, u64)>, mask: u64) -> Vec<u64> {
    let mut entries: Vec<u64> = keys.map(|(i, key)| (key & mask) << 32 | i as u64).collect();
    entries.sort_unstable();
    entries
}

/// A reverse-map change decided by a record: insert `(key, slot, node)`, or remove
/// `(key, slot)` when `node` is [`PairChange::REMOVE`] (also "not held" in `record_blocks`).
#[derive(Debug, Clone, Copy)]
struct PairChange {
    key: u64,
    node: u32,
}

impl PairChange {
    /// Not a node index: LRU nodes stay below `u32::MAX` (see `endpoint_lru::MAX_CAPACITY`).
    const REMOVE: u32 = u32::MAX;
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

    /// The shard of a block, by its mixed hash (the key the shards store).
    fn shard(&self, block: u64) -> &RwLock<BlockTable> {
        let index = (block & self.shard_mask) as usize;
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
            self.record_blocks(slot, &mut lru, kept);
            return;
        }
    }

    /// Records `kept` (at most `capacity` blocks) for the endpoint in `slot`, whose LRU the
    /// caller holds, in three passes:
    ///
    /// 1. **find**: for every distinct block, under the read locks of its shards, whether the
    ///    endpoint already holds it (and in which LRU node);
    /// 2. **LRU**: with no shard lock, the blocks in recording order (last block first) touch
    ///    their node or take the least recent one, which yields the evicted blocks;
    /// 3. **apply**: the evicted blocks' buckets read under read locks, then, under each shard's
    ///    write lock once, the changes applied in the order pass 2 made them.
    ///
    /// The result is that of recording the blocks one by one: a block evicted by an earlier
    /// block of the same record is found as not held in pass 2 (it is one of the record's
    /// blocks, looked up among them), and is inserted again after its old pair is removed. A
    /// block inserted or touched by this record is never evicted by it, since at most
    /// `capacity` blocks are recorded and each becomes more recent than every other block.
    /// Only this endpoint's writer (holding `lru`) adds or removes pairs of `slot`, so what
    /// pass 1 found still holds in pass 3.
    ///
    /// Why: a record of new blocks into a full index costs a cache (and TLB) miss at the new
    /// block's bucket and one at the evicted block's bucket; that is the floor for an index that
    /// removes evicted pairs eagerly. One block at a time, those misses were taken one after
    /// another, with three lock round trips per block: about 1 µs per block. Here the buckets of
    /// all the blocks are first read in a loop without data-dependent branches
    /// ([`BlockTable::warm`]), under read locks held together, so that their misses overlap; the
    /// searches and updates that follow find them in cache; and each shard lock is taken once per
    /// pass instead of three times per block.
    ///
    /// Evicted pairs are still removed here rather than left to be validated by lookups: a
    /// stale pair would have to be checked against its endpoint's LRU node by every lookup that
    /// meets it (a miss per candidate per block on the latency-critical path, and no word-wise
    /// AND over holder sets), and the stale pairs would need a sweeper to stay within the memory
    /// bound.
    fn record_blocks(&self, slot: u32, lru: &mut EndpointLru, kept: &[u64]) {
        let mask = self.shard_mask;
        // Recording order: the last block first, so that the first ends up most recent.
        let keys: Vec<u64> = kept.iter().rev().map(|&hash| mix64(hash)).collect();
        let local = RecordBlocks::new(&keys);
        // `node[i]`, for the first occurrence `i` of a block: its node while the endpoint holds it.
        let mut node = vec![PairChange::REMOVE; keys.len()];

        // Pass 1: which blocks the endpoint already holds.
        {
            let distinct = by_shard(
                keys.iter().copied().enumerate().filter(|&(i, _)| local.first[i] as usize == i),
                mask,
            );
            let runs: Vec<&[u64]> = distinct.chunk_by(|a, b| a >> 32 == b >> 32).collect();
            let shards = self.read_shards(&runs);
            let mut warmed = 0;
            for (run, shard) in runs.iter().zip(&shards) {
                for &entry in *run {
                    warmed ^= shard.warm(keys[entry as u32 as usize], WARM_LINES);
                }
            }
            std::hint::black_box(warmed);
            for (run, shard) in runs.iter().zip(&shards) {
                for &entry in *run {
                    let i = entry as u32 as usize;
                    node[i] = shard.find(keys[i], slot).unwrap_or(PairChange::REMOVE);
                }
            }
        }

        // Pass 2: the LRU, in recording order, collecting the reverse-map changes.
        let mut changes: Vec<PairChange> = Vec::with_capacity(2 * keys.len());
        for (i, (&key, &hash)) in keys.iter().zip(kept.iter().rev()).enumerate() {
            let first = local.first[i] as usize;
            if node[first] != PairChange::REMOVE {
                lru.touch(node[first]);
                continue;
            }
            let Some((new_node, evicted)) = lru.insert(hash) else {
                break; // capacity zero, excluded by `record`; apply what was decided
            };
            node[first] = new_node;
            changes.push(PairChange { key, node: new_node });
            if let Some(old_hash) = evicted {
                let old = mix64(old_hash);
                changes.push(PairChange { key: old, node: PairChange::REMOVE });
                // A held block of this record, not yet recorded, is no longer held.
                if let Some(held) = local.find(&keys, old) {
                    node[held] = PairChange::REMOVE;
                }
            }
        }

        // Pass 3: per shard, the changes in the order pass 2 made them (so an evicted pair is
        // removed before the same block is inserted again). The evicted blocks' buckets are
        // cold: they are read first, all together under read locks, so that each shard's write
        // lock is then held only for work on cached buckets.
        let ordered = by_shard(changes.iter().map(|change| change.key).enumerate(), mask);
        let runs: Vec<&[u64]> = ordered.chunk_by(|a, b| a >> 32 == b >> 32).collect();
        {
            let shards = self.read_shards(&runs);
            let mut warmed = 0;
            for (run, shard) in runs.iter().zip(&shards) {
                for &entry in *run {
                    let change = changes[entry as u32 as usize];
                    if change.node == PairChange::REMOVE {
                        warmed ^= shard.warm(change.key, WARM_LINES);
                    }
                }
            }
            std::hint::black_box(warmed);
        }
        for run in runs {
            let Some(&first) = run.first() else { continue };
            let mut shard = self.shard_at(first >> 32).write();
            for &entry in run {
                let change = changes[entry as u32 as usize];
                if change.node == PairChange::REMOVE {
                    shard.remove(change.key, slot);
                } else {
                    shard.insert(BlockEntry { key: change.key, slot, node: change.node });
                }
            }
        }
    }

    /// The shard at `index` (below the shard count).
    fn shard_at(&self, index: u64) -> &RwLock<BlockTable> {
        self.shards.get(index as usize).unwrap_or(&self.shards[0])
    }

    /// Read locks on the shards of `runs` (entries made by [`by_shard`], one run per shard in
    /// ascending shard order), all held at once so that the loads made under them can overlap.
    ///
    /// Taking several shard locks is deadlock-free because every thread that does so takes
    /// them in ascending shard order and no thread holding a shard lock waits for another
    /// shard lock otherwise (see the [module docs](self)).
    fn read_shards(&self, runs: &[&[u64]]) -> Vec<parking_lot::RwLockReadGuard<'_, BlockTable>> {
        runs.iter().map(|run| self.shard_at(run.first().map_or(0, |e| e >> 32)).read()).collect()
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
                let slot =
                    u32::try_from(registry.slots.len()).ok().filter(|&slot| slot < MAX_SLOTS)?;
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
                let block = mix64(hash);
                self.shard(block).write().remove(block, slot);
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
    /// Allocates nothing once `out` and `scratch` have grown to the pool size.
    ///
    /// ```
    /// use prefix_cache::{LookupScratch, PrefixIndex};
    ///
    /// let index: PrefixIndex<&str> = PrefixIndex::default();
    /// index.record("a", &[1, 2, 3]);
    /// index.record("b", &[1, 2, 9]);
    /// let (mut scratch, mut out) = (LookupScratch::default(), Vec::new());
    /// index.longest_prefix_matches(&[1, 2, 3, 4], &mut scratch, &mut out);
    /// out.sort_unstable();
    /// assert_eq!(out, [("a", 3), ("b", 2)]);
    /// ```
    pub fn longest_prefix_matches(
        &self,
        hashes: &[u64],
        scratch: &mut LookupScratch,
        out: &mut Vec<(K, usize)>,
    ) {
        out.clear();
        let Some((&first, rest)) = hashes.split_first() else {
            return;
        };
        let registry = self.registry.read();
        let slots = registry.slots.as_slice();
        let words = slots.len().div_ceil(64);
        scratch.marks.fit(slots.len());
        let mut report = Report { slots, out };
        let first = mix64(first);
        let mut survivors =
            Survivors::seed(self.shard(first).read().holders(first), words, scratch);
        for (depth, &hash) in (1..).zip(rest) {
            survivors.settle(words, scratch);
            if survivors.is_empty(scratch) {
                return;
            }
            let block = mix64(hash);
            let shard = self.shard(block).read();
            survivors.narrow(shard.holders(block), depth, scratch, &mut report);
        }
        survivors.report_rest(hashes.len(), scratch, &mut report);
    }

    /// Number of indexed (endpoint, block) pairs.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    /// Number of blocks whose holders are kept as a slot bitset because many endpoints hold them
    /// (see the [module docs](self)).
    pub fn bitset_blocks(&self) -> usize {
        self.shards.iter().map(|s| s.read().set_count()).sum()
    }

    /// Whether no endpoint holds any block.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The endpoints the index holds blocks for, in no particular order. Allocates: meant for
    /// reconciling the index with a pool's membership, not for every request.
    pub fn endpoint_keys(&self) -> Vec<K> {
        self.registry.read().slot_of.keys().copied().collect()
    }

    /// Number of endpoints known to the index.
    pub fn endpoint_count(&self) -> usize {
        self.registry.read().slot_of.len()
    }

    /// Whether endpoint `key` holds block `hash`.
    pub fn contains(&self, key: K, hash: u64) -> bool {
        let slot = self.registry.read().slot_of.get(&key).copied();
        let block = mix64(hash);
        slot.is_some_and(|slot| self.shard(block).read().find(block, slot).is_some())
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

    /// Heap and inline bytes held by the index, from allocated capacities (excluding the
    /// callers' [`LookupScratch`]es, about `4 * endpoints + 4.125 * slots` bytes each).
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
        total
            + self.shards.len() * (MIN_BUCKETS * BUCKET_BYTES + MIN_SETS * SET_BYTES)
            + 2 * BUCKET_BYTES * blocks
    }

    /// Verifies that the reverse map and the per-endpoint LRUs describe the same pairs, that no
    /// endpoint exceeds its capacity and that every structure is within its size bound.
    ///
    /// Meant for tests: call it while no write is in progress, as a concurrent write may be
    /// reported as a violation.
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        let fail = |message: String| Err(InvariantViolation(message));
        let registry = self.registry.read();
        // slot -> (node -> mixed hash) snapshot, taken under each LRU lock (registry -> LRU -> shard).
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
                        let block = mix64(hash);
                        if self.shard(block).read().find(block, slot) != Some(node) {
                            return fail(format!("slot {slot} block {hash:#x} not in reverse map"));
                        }
                        nodes.insert(node, block);
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
                if (entry.key & self.shard_mask) as usize != index {
                    return fail(format!("block {:#x} in the wrong shard", entry.key));
                }
                let owner = held.get(&entry.slot).and_then(|nodes| nodes.get(&entry.node));
                if owner != Some(&entry.key) {
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
