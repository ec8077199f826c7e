//! The precise prefix index: which llm-d block keys each endpoint's engine really holds, learned
//! from its KV-cache events only.
//!
//! # Layout
//! The endpoints are an immutable map behind an [`ArcSwap`] (membership changes copy it; a
//! reader loads it without a lock). Each endpoint owns its state behind its own
//! `parking_lot::RwLock`, so the index is sharded by endpoint: one endpoint's events (one
//! subscriber, applied in order) never wait for another's, and lookups take read locks one
//! endpoint at a time. No lock is held across an await: every method is synchronous.
//!
//! An endpoint's state is a bounded LRU of its blocks keyed by **engine block hash**, each node
//! carrying the llm-d **key** computed from the block's tokens ([`crate::keys`]) and a bit per
//! medium (GPU, CPU, disk, other) holding it, plus a count per key. So the map from engine hash
//! to key is learned from `BlockStored` (which carries the tokens), and it is per endpoint:
//! `BlockRemoved` and `AllBlocksCleared` touch only the publishing endpoint.
//!
//! # Events
//! * `BlockStored` with tokens: the chain continues from the parent's key (looked up by the
//!   parent's engine hash; an unknown parent skips the event, as llm-d does) or starts at the
//!   root of the LoRA name, else the model name. Keys are computed over `blockSizeTokens`
//!   chunks of the event's tokens whatever the engine's block size, as llm-d does, and paired
//!   with the engine's hashes proportionally: equal sizes one to one; smaller engine blocks
//!   several to a key (the key is held while any of them is); a larger engine block carries
//!   several keys, the last under its hash (a child's parent) and the others under hashes
//!   derived from it, removed with it. Tokens short of a whole block are dropped. An event
//!   whose token count is not its hash count times its block size, that yields no whole block,
//!   or whose engine block spans more than 64 blocks is skipped and counted.
//! * `BlockStored` without tokens: a copy of held blocks to another medium.
//! * `BlockRemoved`: takes the medium away from each block; a block held by no medium is
//!   forgotten.
//! * `AllBlocksCleared`: forgets all of the endpoint's blocks and trusts it again.
//! * Events of a KV-cache group whose attention kind is not prefix-indexable (sliding window,
//!   Mamba, ...) are skipped, as llm-d does: the group's kind is learned from its stores.
//!
//! # Sequence numbers and trust
//! Every ZMQ message carries the publisher's sequence number. For each endpoint:
//! * the next number (`last + 1`) or the first message seen: applied;
//! * a number not above the last one: numbers only grow within one publisher, so the
//!   publisher, hence the engine, restarted, with an empty cache. The endpoint's blocks are
//!   forgotten, it is trusted, and the batch is applied. Trust is safe even when the first
//!   messages of the new publisher were missed (a subscription races the publisher's start):
//!   every block the index learns from then on was stored after the restart, and a removal
//!   missed before the first message seen can only concern a block never learned;
//! * any other number (a gap: messages lost, e.g. to the PUB socket's high-water mark), or a
//!   payload that does not decode: events were lost, so what the index holds may name blocks
//!   since evicted. The endpoint's blocks are forgotten and it becomes **untrusted**: lookups
//!   report [`EndpointMatch::Untrusted`] for it, and a scorer falls back to the approximate
//!   index. Later batches are still applied, so the index rebuilds from new stores.
//!
//! An untrusted endpoint is trusted again on `AllBlocksCleared`, on a sequence restart,
//! or when [`PreciseIndex::mark_rebuilt`] says its state was rebuilt (e.g. after replaying
//! the missed batches from the engine's replay socket).
//!
//! # Memory
//! With `C` the capacity per endpoint (blocks) and `B(n)` the buckets behind a map of `n`
//! entries (a power of two at most 7/8 full: `B(n) < 2.29 n`), one endpoint holding `n <= C`
//! blocks costs at most
//!
//! ```text
//! 32 * n_slab + 17 * (B(n) + B(k)) + ENDPOINT    (k <= n distinct keys)
//! ```
//!
//! bytes: a 32-byte slab node per block (the slab keeps its high-water mark, at most `C`)
//! and a 16-byte entry plus a control byte per bucket of each of the two maps (engine hash
//! to node, key to count). At capacity that is at most `32 + 2 * 17 * 2.29 ≈ 110` bytes per
//! block and about 70 once the maps have settled, against at most 48 for the approximate
//! index, whose reverse map is shared between endpoints. [`PreciseIndex::memory_bytes`]
//! measures the allocated capacities and [`PreciseIndex::memory_bound_bytes`] evaluates the
//! bound at capacity for every endpoint.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use parking_lot::RwLock;

use crate::event::{BlockRemoved, BlockStored, Event, EventBatch};
use crate::keys::TokenProcessor;
use crate::lru::{BUCKET_BYTES, BlockLru, NODE_BYTES, Stored, buckets};
use crate::{DecodeError, decode_batch};

/// Default capacity per endpoint, in blocks: about 1M tokens at 16 tokens per block, more
/// than the KV cache of most single-node engines.
pub const DEFAULT_CAPACITY_PER_ENDPOINT: usize = 65_536;

/// Sizing of a [`PreciseIndex`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexConfig {
    /// Most blocks remembered per endpoint; the least recently stored are forgotten beyond
    /// it. At least 1.
    pub capacity_per_endpoint: usize,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self { capacity_per_endpoint: DEFAULT_CAPACITY_PER_ENDPOINT }
    }
}

/// What a lookup found for one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EndpointMatch {
    /// The endpoint is not subscribed.
    #[default]
    Unknown,
    /// Events were lost for this endpoint: its state cannot be trusted.
    Untrusted,
    /// The number of leading request blocks the endpoint holds.
    Blocks(usize),
}

impl EndpointMatch {
    /// `matched / total` for a trusted endpoint (0 when `total` is 0), `None` otherwise.
    pub fn score(self, total: usize) -> Option<f64> {
        match self {
            EndpointMatch::Blocks(n) if total > 0 => Some(n as f64 / total as f64),
            EndpointMatch::Blocks(_) => Some(0.0),
            _ => None,
        }
    }
}

/// What happened to one ZMQ message ([`PreciseIndex::ingest`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqOutcome {
    /// The expected number (or the first one seen).
    InOrder,
    /// Numbering went back (the publisher restarted): the endpoint's blocks were forgotten.
    Restarted,
    /// Messages were lost: the endpoint is untrusted.
    Gap {
        /// The number expected.
        expected: u64,
        /// The number received.
        got: u64,
    },
}

/// Why [`PreciseIndex::ingest`] did not apply a message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IngestError {
    /// The endpoint is not subscribed (it left the pool).
    #[error("endpoint is not in the index")]
    UnknownEndpoint,
    /// The payload does not decode; the endpoint is untrusted.
    #[error("undecodable payload: {0}")]
    Decode(#[from] DecodeError),
}

/// Counters of the index, all monotonic.
#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    blocks_stored: AtomicU64,
    blocks_removed: AtomicU64,
    clears: AtomicU64,
    gaps: AtomicU64,
    restarts: AtomicU64,
    decode_errors: AtomicU64,
    skipped_unknown_parent: AtomicU64,
    skipped_block_size: AtomicU64,
    skipped_group: AtomicU64,
    evicted_at_capacity: AtomicU64,
    unknown_endpoint: AtomicU64,
}

/// A snapshot of the index's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IndexStats {
    /// Batches applied.
    pub batches: u64,
    /// Blocks stored (new or refreshed).
    pub blocks_stored: u64,
    /// Block removals applied to a held block.
    pub blocks_removed: u64,
    /// `AllBlocksCleared` events.
    pub clears: u64,
    /// Sequence gaps (endpoint made untrusted).
    pub gaps: u64,
    /// Sequence restarts (numbers going back).
    pub restarts: u64,
    /// Payloads that did not decode (endpoint made untrusted).
    pub decode_errors: u64,
    /// `BlockStored` events skipped because their parent block is not held.
    pub skipped_unknown_parent: u64,
    /// `BlockStored` events skipped because their token count does not fit their block size
    /// and hash count, or yields no whole block of `blockSizeTokens`.
    pub skipped_block_size: u64,
    /// Events skipped because their KV-cache group is not prefix-indexable.
    pub skipped_group: u64,
    /// Blocks forgotten to respect the per-endpoint capacity.
    pub evicted_at_capacity: u64,
    /// Messages for endpoints not in the index.
    pub unknown_endpoint: u64,
}

/// What the index holds now, over all endpoints ([`PreciseIndex::summary`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IndexSummary {
    /// Endpoints tracked.
    pub endpoints: usize,
    /// Of those, the ones untrusted since events were lost.
    pub untrusted: usize,
    /// Blocks held, summed over the endpoints.
    pub blocks: usize,
}

#[derive(Debug)]
struct EndpointState {
    blocks: BlockLru,
    trusted: bool,
    last_seq: Option<u64>,
    /// Bit `g` set when KV-cache group `g` (< 64) is known not to be prefix-indexable.
    skip_groups: u64,
    /// Most keys one engine block has carried (engine blocks larger than `blockSizeTokens`):
    /// how many derived hashes a removal or a medium copy visits.
    fanout: usize,
}

#[derive(Debug)]
struct Endpoint {
    state: RwLock<EndpointState>,
}

/// llm-d's prefix-indexable attention kinds (`isPrefixIndexableSpecKind`).
fn indexable_kind(kind: &str) -> bool {
    matches!(kind, "full_attention" | "mla_attention" | "sink_full_attention")
}

/// The bit of a medium: `None` and `"gpu"` are the GPU (llm-d's default tier).
fn medium_bit(medium: Option<&str>) -> u8 {
    match medium {
        None => 1,
        Some(m) if m.eq_ignore_ascii_case("gpu") => 1,
        Some(m) if m.eq_ignore_ascii_case("cpu") => 2,
        Some(m) if m.eq_ignore_ascii_case("disk") => 4,
        Some(_) => 8,
    }
}

/// Most keys one engine block may carry (engine block size over `blockSizeTokens`); events
/// beyond it are skipped as a block-size mismatch.
const MAX_FANOUT: usize = 64;

/// The hash under which the `j`-th (not last) key of an engine block larger than
/// `blockSizeTokens` is stored: a bijective mix of the engine hash and `j`, so distinct pairs
/// never collide with each other (a collision with another engine hash is as unlikely as
/// between two engine hashes).
fn sub_hash(engine: u64, j: usize) -> u64 {
    let mut x = engine ^ (j as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The extra keys of block `c` of `blocks` at `blockSizeTokens`, from the engine's per-block
/// ones (`engines` of them), as llm-d realigns them: an engine block's keys are copied to every
/// block it spans, and the keys of the engine blocks a block spans are joined.
fn canonical_extra(
    extra: Option<&[Option<Vec<String>>]>,
    c: usize,
    engines: usize,
    blocks: usize,
) -> std::borrow::Cow<'_, [String]> {
    use std::borrow::Cow;
    let Some(extra) = extra else { return Cow::Borrowed(&[]) };
    let of = |e: usize| extra.get(e).and_then(|k| k.as_deref()).unwrap_or(&[]);
    if engines <= blocks {
        return Cow::Borrowed(of(c * engines / blocks));
    }
    let spanned = (0..engines).filter(|e| e * blocks / engines == c);
    let mut joined = Vec::new();
    for e in spanned {
        joined.extend_from_slice(of(e));
    }
    Cow::Owned(joined)
}

fn group_bit(group: u32) -> u64 {
    if group < 64 { 1 << group } else { 0 }
}

/// The precise prefix index. `K` is the endpoint key (any small `Copy` id).
///
/// See the [module documentation](self) for the rules it applies.
#[derive(Debug)]
pub struct PreciseIndex<K> {
    processor: TokenProcessor,
    config: IndexConfig,
    endpoints: ArcSwap<HashMap<K, Arc<Endpoint>>>,
    counters: Counters,
}

impl<K: Copy + Eq + Hash> PreciseIndex<K> {
    /// An empty index computing keys with `processor`.
    pub fn new(processor: TokenProcessor, config: IndexConfig) -> Self {
        Self {
            processor,
            config: IndexConfig { capacity_per_endpoint: config.capacity_per_endpoint.max(1) },
            endpoints: ArcSwap::from_pointee(HashMap::new()),
            counters: Counters::default(),
        }
    }

    /// The key computation this index uses (requests must use the same).
    pub fn processor(&self) -> &TokenProcessor {
        &self.processor
    }

    /// The sizing.
    pub fn config(&self) -> IndexConfig {
        self.config
    }

    /// Starts tracking an endpoint (trusted, empty). False if it was already tracked.
    pub fn add_endpoint(&self, key: K) -> bool {
        let mut added = false;
        self.endpoints.rcu(|map| {
            added = !map.contains_key(&key);
            if !added {
                return Arc::clone(map);
            }
            let mut next = HashMap::clone(map);
            next.insert(key, Arc::new(self.new_endpoint()));
            Arc::new(next)
        });
        added
    }

    /// Stops tracking an endpoint and frees its blocks. False if it was not tracked.
    pub fn remove_endpoint(&self, key: K) -> bool {
        let mut removed = false;
        self.endpoints.rcu(|map| {
            removed = map.contains_key(&key);
            if !removed {
                return Arc::clone(map);
            }
            let mut next = HashMap::clone(map);
            next.remove(&key);
            Arc::new(next)
        });
        removed
    }

    /// The tracked endpoints, in no particular order.
    pub fn endpoint_keys(&self) -> Vec<K> {
        self.endpoints.load().keys().copied().collect()
    }

    fn new_endpoint(&self) -> Endpoint {
        Endpoint {
            state: RwLock::new(EndpointState {
                blocks: BlockLru::new(self.config.capacity_per_endpoint),
                trusted: true,
                last_seq: None,
                skip_groups: 0,
                fanout: 1,
            }),
        }
    }

    fn endpoint(&self, key: &K) -> Option<Arc<Endpoint>> {
        self.endpoints.load().get(key).cloned()
    }

    /// Applies one ZMQ message: checks its sequence number, decodes the payload and applies
    /// its events. `model` is the model the publisher serves (the chain's root when a block
    /// has no parent and no LoRA name).
    pub fn ingest(
        &self,
        key: K,
        seq: u64,
        model: &str,
        payload: &[u8],
    ) -> Result<SeqOutcome, IngestError> {
        let Some(ep) = self.endpoint(&key) else {
            self.counters.unknown_endpoint.fetch_add(1, Ordering::Relaxed);
            return Err(IngestError::UnknownEndpoint);
        };
        let outcome = self.observe_seq(&ep, seq);
        match decode_batch(payload) {
            Ok(batch) => {
                self.apply_to(&ep, model, &batch);
                Ok(outcome)
            }
            Err(e) => {
                self.counters.decode_errors.fetch_add(1, Ordering::Relaxed);
                let mut st = ep.state.write();
                st.blocks.clear();
                st.trusted = false;
                Err(IngestError::Decode(e))
            }
        }
    }

    fn observe_seq(&self, ep: &Endpoint, seq: u64) -> SeqOutcome {
        let mut st = ep.state.write();
        let outcome = match st.last_seq {
            None => SeqOutcome::InOrder,
            Some(last) if seq == last.wrapping_add(1) => SeqOutcome::InOrder,
            Some(last) if seq <= last => {
                self.counters.restarts.fetch_add(1, Ordering::Relaxed);
                st.blocks.clear();
                st.trusted = true;
                st.skip_groups = 0;
                SeqOutcome::Restarted
            }
            Some(last) => {
                self.counters.gaps.fetch_add(1, Ordering::Relaxed);
                st.blocks.clear();
                st.trusted = false;
                SeqOutcome::Gap { expected: last.wrapping_add(1), got: seq }
            }
        };
        st.last_seq = Some(seq);
        outcome
    }

    /// The sequence number the endpoint's next message should carry, once one was seen.
    pub fn expected_seq(&self, key: K) -> Option<u64> {
        self.endpoint(&key).and_then(|ep| ep.state.read().last_seq.map(|s| s.wrapping_add(1)))
    }

    /// Marks an endpoint untrusted, e.g. when its subscription was interrupted. False if it is
    /// not tracked.
    pub fn mark_gap(&self, key: K) -> bool {
        let Some(ep) = self.endpoint(&key) else { return false };
        let mut st = ep.state.write();
        st.blocks.clear();
        st.trusted = false;
        self.counters.gaps.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Trusts an endpoint again once its state has been rebuilt (e.g. from the replay socket).
    pub fn mark_rebuilt(&self, key: K) -> bool {
        let Some(ep) = self.endpoint(&key) else { return false };
        ep.state.write().trusted = true;
        true
    }

    /// Forgets the last sequence number of an endpoint, so that its next message is taken as
    /// the first (for a new subscription that has already marked the gap).
    pub fn reset_sequence(&self, key: K) {
        if let Some(ep) = self.endpoint(&key) {
            ep.state.write().last_seq = None;
        }
    }

    /// Whether an endpoint is tracked and trusted.
    pub fn is_trusted(&self, key: K) -> Option<bool> {
        self.endpoint(&key).map(|ep| ep.state.read().trusted)
    }

    /// Applies a decoded batch to an endpoint (no sequence check). False if it is not tracked.
    pub fn apply_batch(&self, key: K, model: &str, batch: &EventBatch) -> bool {
        let Some(ep) = self.endpoint(&key) else {
            self.counters.unknown_endpoint.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        self.apply_to(&ep, model, batch);
        true
    }

    fn apply_to(&self, ep: &Endpoint, model: &str, batch: &EventBatch) {
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        for event in &batch.events {
            // One event per lock hold: a long batch never blocks lookups for long.
            let mut st = ep.state.write();
            match event {
                Event::BlockStored(ev) => self.stored(&mut st, model, ev),
                Event::BlockRemoved(ev) => self.removed(&mut st, ev),
                Event::AllBlocksCleared => {
                    self.counters.clears.fetch_add(1, Ordering::Relaxed);
                    st.blocks.clear();
                    st.trusted = true;
                }
            }
        }
    }

    fn stored(&self, st: &mut EndpointState, model: &str, ev: &BlockStored) {
        if let Some(g) = ev.group_idx {
            let skip = match ev.kv_cache_spec_kind.as_deref() {
                Some(kind) if indexable_kind(kind) => {
                    st.skip_groups &= !group_bit(g);
                    false
                }
                Some(_) => {
                    st.skip_groups |= group_bit(g);
                    true
                }
                None => st.skip_groups & group_bit(g) != 0,
            };
            if skip {
                self.counters.skipped_group.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let media = medium_bit(ev.medium.as_deref());
        if ev.token_ids.is_empty() {
            for &h in &ev.block_hashes {
                st.blocks.add_media(h, media);
                for j in 0..st.fanout.saturating_sub(1) {
                    st.blocks.add_media(sub_hash(h, j), media);
                }
            }
            return;
        }
        let bs = self.processor.block_size();
        let engine_bs = ev.block_size as usize;
        let engines = ev.block_hashes.len();
        let blocks = ev.token_ids.len() / bs;
        if engine_bs == 0
            || engines == 0
            || ev.token_ids.len() != engines * engine_bs
            || blocks == 0
            || blocks.div_ceil(engines) > MAX_FANOUT
        {
            self.counters.skipped_block_size.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut parent = match ev.parent_block_hash {
            Some(p) if p != 0 => match st.blocks.key_of(p) {
                Some(k) => k,
                None => {
                    self.counters.skipped_unknown_parent.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            },
            _ => {
                let root_model = match ev.lora_name.as_deref() {
                    Some(lora) if !lora.is_empty() => lora,
                    _ => model,
                };
                self.processor.root(root_model)
            }
        };
        // Keys are computed at blockSizeTokens whatever the engine's block size (trailing
        // tokens short of a block are dropped), then paired with the engine's hashes by
        // llm-d's proportional mapping: block `i * blocks / n` goes with engine block
        // `i * engines / n`, `n` the larger count.
        let mut keys = Vec::with_capacity(blocks);
        for (c, chunk) in ev.token_ids.chunks_exact(bs).enumerate() {
            let extra = canonical_extra(ev.extra_keys.as_deref(), c, engines, blocks);
            parent = self.processor.block_key(parent, chunk, &extra);
            keys.push(parent);
        }
        st.fanout = st.fanout.max(blocks.div_ceil(engines));
        let n = engines.max(blocks);
        let mut evicted = 0;
        let mut sub = 0;
        for i in 0..n {
            let e = i * engines / n;
            let engine = ev.block_hashes[e];
            let key = keys[i * blocks / n];
            // The last key of an engine block goes under its own hash (what a child's parent
            // lookup finds, as llm-d's GetRequestKey returns the last); the others under hashes
            // derived from it, so that its removal finds them.
            let last = i + 1 == n || (i + 1) * engines / n != e;
            let node = if last { engine } else { sub_hash(engine, sub) };
            sub = if last { 0 } else { sub + 1 };
            if st.blocks.store(node, key, media) == Stored::Evicted {
                evicted += 1;
            }
        }
        self.counters.blocks_stored.fetch_add(n as u64, Ordering::Relaxed);
        if evicted > 0 {
            self.counters.evicted_at_capacity.fetch_add(evicted, Ordering::Relaxed);
        }
    }

    fn removed(&self, st: &mut EndpointState, ev: &BlockRemoved) {
        if let Some(g) = ev.group_idx
            && st.skip_groups & group_bit(g) != 0
        {
            self.counters.skipped_group.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let media = medium_bit(ev.medium.as_deref());
        let mut removed = 0;
        for &h in &ev.block_hashes {
            removed += u64::from(st.blocks.remove(h, media));
            for j in 0..st.fanout.saturating_sub(1) {
                removed += u64::from(st.blocks.remove(sub_hash(h, j), media));
            }
        }
        self.counters.blocks_removed.fetch_add(removed, Ordering::Relaxed);
    }

    /// The number of leading `keys` an endpoint holds, or why that cannot be said.
    pub fn longest_prefix(&self, key: K, keys: &[u64]) -> EndpointMatch {
        match self.endpoint(&key) {
            None => EndpointMatch::Unknown,
            Some(ep) => Self::match_one(&ep, keys),
        }
    }

    fn match_one(ep: &Endpoint, keys: &[u64]) -> EndpointMatch {
        let st = ep.state.read();
        if !st.trusted {
            return EndpointMatch::Untrusted;
        }
        EndpointMatch::Blocks(keys.iter().take_while(|&&k| st.blocks.holds_key(k)).count())
    }

    /// Writes, for each endpoint of `endpoints`, what it holds of `keys` into `out` (same
    /// length; extra slots are left alone). Loads the membership once; allocates nothing.
    pub fn match_endpoints(&self, keys: &[u64], endpoints: &[K], out: &mut [EndpointMatch]) {
        let map = self.endpoints.load();
        for (slot, key) in out.iter_mut().zip(endpoints) {
            *slot = match map.get(key) {
                None => EndpointMatch::Unknown,
                Some(ep) => Self::match_one(ep, keys),
            };
        }
    }

    /// The blocks an endpoint holds (0 if it is not tracked).
    pub fn blocks_held(&self, key: K) -> usize {
        self.endpoint(&key).map_or(0, |ep| ep.state.read().blocks.len())
    }

    /// Whether an endpoint holds the block with this llm-d key (ignoring trust).
    pub fn holds_key(&self, key: K, block_key: u64) -> bool {
        self.endpoint(&key).is_some_and(|ep| ep.state.read().blocks.holds_key(block_key))
    }

    /// The llm-d key an endpoint's engine hash maps to.
    pub fn key_of(&self, key: K, engine_hash: u64) -> Option<u64> {
        self.endpoint(&key).and_then(|ep| ep.state.read().blocks.key_of(engine_hash))
    }

    /// The endpoints, how many are untrusted and the blocks they hold, one endpoint locked at
    /// a time (so the figures may mix instants under concurrent ingestion).
    pub fn summary(&self) -> IndexSummary {
        let map = self.endpoints.load();
        let mut summary = IndexSummary { endpoints: map.len(), ..IndexSummary::default() };
        for ep in map.values() {
            let st = ep.state.read();
            summary.untrusted += usize::from(!st.trusted);
            summary.blocks += st.blocks.len();
        }
        summary
    }

    /// Bytes allocated by all endpoints' blocks (capacities, not lengths).
    pub fn memory_bytes(&self) -> usize {
        let map = self.endpoints.load();
        map.values().map(|ep| ep.state.read().blocks.memory_bytes()).sum::<usize>()
            + map.len() * std::mem::size_of::<Endpoint>()
    }

    /// The documented bound on [`memory_bytes`](Self::memory_bytes) with every endpoint at
    /// capacity.
    pub fn memory_bound_bytes(&self) -> usize {
        let c = self.config.capacity_per_endpoint;
        let per = c * NODE_BYTES + 2 * buckets(c) * BUCKET_BYTES + std::mem::size_of::<Endpoint>();
        self.endpoints.load().len() * per
    }

    /// The counters so far.
    pub fn stats(&self) -> IndexStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        IndexStats {
            batches: get(&c.batches),
            blocks_stored: get(&c.blocks_stored),
            blocks_removed: get(&c.blocks_removed),
            clears: get(&c.clears),
            gaps: get(&c.gaps),
            restarts: get(&c.restarts),
            decode_errors: get(&c.decode_errors),
            skipped_unknown_parent: get(&c.skipped_unknown_parent),
            skipped_block_size: get(&c.skipped_block_size),
            skipped_group: get(&c.skipped_group),
            evicted_at_capacity: get(&c.evicted_at_capacity),
            unknown_endpoint: get(&c.unknown_endpoint),
        }
    }

    /// Checks every endpoint's internal links and counts (tests).
    #[cfg(test)]
    pub(crate) fn check(&self) -> Result<(), String> {
        for ep in self.endpoints.load().values() {
            ep.state.read().blocks.check()?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "index_tests.rs"]
mod tests;
