//! `prefix-cache-scorer`: prefers endpoints that already hold the longest leading run of the
//! prompt's blocks in their KV cache, so the shared prefix is not prefilled again.
//!
//! Score = matched leading blocks / prompt blocks (GIE); with llm-d's `matchLengthWeight`
//! `w` above 0 it becomes `w * min(1, matched length / matchLengthScaleTokens)^2 + (1 - w) *
//! ratio`, so long matches count for more than short ones of the same ratio. Every version's
//! parameter names are accepted ([`PrefixCacheParameters`]). The prompt is cut into blocks of
//! `blockSize` characters (about 4 characters a token; GIE's default 64 characters = 16
//! tokens), hashed as a chain seeded by the model name, at most `maxPrefixBlocksToMatch`
//! blocks. Which endpoint holds which block is not observed but inferred: the pre-request
//! hook records the chosen endpoint as holding every block of the prompt, in a per-endpoint
//! LRU of `lruCapacityPerServer` blocks that approximates the server's cache. Endpoints that
//! leave the pool are forgotten when the pool's writer publishes the change (the scorer is a
//! [`PoolObserver`]), so memory is bounded by the live pool, not by every endpoint ever seen.
//!
//! The prompt is hashed and matched once per decision, by the scorer acting as a
//! [`DataProducer`] before the profiles run; hashes and matches live in the decision's
//! [`CycleState`], where the scorer, the hook and `prefix-cache-affinity-filter` read them.
//!
//! The record is not made on the decision's path: the hook queues the hashes on the scorer's
//! [`RecordWriter`], whose thread applies them a moment later (batched, a repeated prompt
//! recorded once). The next turn of a conversation, arriving milliseconds later, finds its
//! blocks; a decision never waits for the writer, and when the writer falls behind a record
//! is dropped and counted ([`PrefixCacheScorer::dropped_records`]) rather than queued without
//! bound. [`Scheduler::flush`](scheduler_core::Scheduler::flush) waits for the queued records.

use std::sync::Arc;

use prefix_cache::{
    BlockHasher, BlockHasherConfig, IndexConfig, LookupScratch, PrefixIndex, RecordWriter,
    WriterConfig,
};
use scheduler_core::{
    Candidates, CycleState, DataProducer, EndpointId, InferenceRequest, PluginError, PoolObserver,
    PoolSnapshot, PreRequest, SchedulingResult, Scorer,
};

mod matches;
mod parameters;

pub(crate) use matches::PrefixMatchInfo;
pub use parameters::PrefixCacheParameters;
use parameters::Resolved;

/// GIE type name.
pub const TYPE_NAME: &str = "prefix-cache-scorer";

/// The prefix scorer's per-decision scratch, kept in the decision's [`CycleState`]: the
/// prompt's block hashes (computed once, read again by the pre-request hook) and the
/// lookup's buffers, reused from one decision to the next.
#[derive(Debug, Default)]
struct PrefixScratch {
    /// The decision and block configuration the hashes were computed for.
    hashed_for: Option<(u64, BlockHasherConfig)>,
    hashes: Vec<u64>,
    /// The index lookup's buffers.
    lookup: LookupScratch,
    /// Matched leading blocks by endpoint.
    matches: Vec<(EndpointId, usize)>,
}

/// Scores by cached prefix length and records picks.
#[derive(Debug)]
pub struct PrefixCacheScorer {
    hasher: BlockHasher,
    index: Arc<PrefixIndex<EndpointId>>,
    /// Applies the picks' records off the decision path; its thread ends with the scorer.
    writer: RecordWriter<EndpointId>,
    /// `(matchLengthWeight, matchLengthScaleTokens in characters)`; weight 0 scores by ratio.
    match_length: (f64, f64),
}

impl PrefixCacheScorer {
    /// A scorer configured by GIE's parameters.
    pub fn new(parameters: PrefixCacheParameters) -> Result<Self, PluginError> {
        let Resolved { block_size, max_blocks, capacity, match_length } = parameters.resolve()?;
        let index = Arc::new(PrefixIndex::new(IndexConfig {
            capacity_per_endpoint: capacity,
            ..IndexConfig::default()
        }));
        Ok(Self {
            hasher: BlockHasher::new(BlockHasherConfig { block_size, max_blocks }),
            match_length,
            writer: RecordWriter::new(Arc::clone(&index), WriterConfig::default()),
            index,
        })
    }

    /// The block index (for inspection and for other components sharing it).
    pub fn index(&self) -> &Arc<PrefixIndex<EndpointId>> {
        &self.index
    }

    /// Waits until the records of every decision made so far are in the index.
    pub fn flush_records(&self) {
        self.writer.flush();
    }

    /// Records dropped because the writer had fallen behind (a counter for the server's
    /// metrics: each one is a pick whose prompt later requests will not find).
    pub fn dropped_records(&self) -> u64 {
        self.writer.dropped()
    }

    /// The writer applying the picks' records (counters: applied, coalesced, dropped).
    pub fn writer(&self) -> &RecordWriter<EndpointId> {
        &self.writer
    }

    /// llm-d's score: `w * min(1, matched length / scale)^2 + (1 - w) * matched / total`,
    /// lengths in characters here where llm-d counts tokens (the same ratio).
    fn blend(&self, matched: usize, total: f64) -> f64 {
        let ratio = matched as f64 / total;
        let (weight, scale) = self.match_length;
        if weight <= 0.0 {
            return ratio;
        }
        let length = (matched as f64 * self.hasher.config().block_size as f64 / scale).min(1.0);
        weight * length * length + (1.0 - weight) * ratio
    }

    /// Fills the decision's [`PrefixMatchInfo`] unless already filled for this decision and
    /// block configuration.
    fn match_prompt(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        pool: &PoolSnapshot,
    ) {
        let key = (state.decision_stamp(), self.hasher.config());
        if state.scratch::<PrefixMatchInfo>().produced_for == Some(key) {
            return;
        }
        // Taken out and put back (buffers and all) so that the prompt scratch can be borrowed
        // from the same state meanwhile.
        let mut info = std::mem::take(state.scratch::<PrefixMatchInfo>());
        let PrefixScratch { hashes, lookup, matches, .. } = self.hashed_prompt(state, request);
        info.total_blocks = hashes.len();
        info.matched_blocks.clear();
        info.matched_blocks.resize(pool.len(), 0);
        if !hashes.is_empty() {
            self.index.longest_prefix_matches(hashes, lookup, matches);
            for &(endpoint, blocks) in matches.iter() {
                let slot =
                    pool.index_of(endpoint).and_then(|i| info.matched_blocks.get_mut(i as usize));
                if let Some(slot) = slot {
                    *slot = blocks;
                }
            }
        }
        info.produced_for = Some(key);
        *state.scratch::<PrefixMatchInfo>() = info;
    }

    /// The decision's scratch, with the prompt's block hashes computed for this decision.
    fn hashed_prompt<'s>(
        &self,
        state: &'s mut CycleState,
        request: &InferenceRequest,
    ) -> &'s mut PrefixScratch {
        let key = (state.decision_stamp(), self.hasher.config());
        let scratch = state.scratch::<PrefixScratch>();
        if scratch.hashed_for != Some(key) {
            self.hasher.hash_prompt(
                &request.target_model,
                request.prompt.as_bytes(),
                &mut scratch.hashes,
            );
            scratch.hashed_for = Some(key);
        }
        scratch
    }
}

/// Whether the prefix scorer found a cached prefix on any candidate of a decision: what
/// `no-hit-lru-scorer` reads to tell cold requests from warm ones (llm-d-router passes the
/// same fact between the two plugins as per-endpoint prefix match information).
#[derive(Debug, Default)]
pub(crate) struct PrefixHit {
    /// The decision the record was made for, and whether some candidate matched.
    recorded: Option<(u64, bool)>,
}

impl PrefixHit {
    /// Whether this decision's prefix scoring found a hit; `None` when no prefix scorer has
    /// run in this decision.
    pub(crate) fn of_decision(state: &mut CycleState) -> Option<bool> {
        let stamp = state.decision_stamp();
        match state.scratch::<PrefixHit>().recorded {
            Some((recorded, hit)) if recorded == stamp => Some(hit),
            _ => None,
        }
    }
}

impl Scorer for PrefixCacheScorer {
    fn score(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        candidates: Candidates<'_>,
        scores: &mut [f64],
    ) {
        self.score_prefix(state, request, candidates, scores);
        // Scores arrive zeroed and are positive exactly where a prefix matched.
        let hit = scores.iter().any(|&score| score > 0.0);
        let stamp = state.decision_stamp();
        state.scratch::<PrefixHit>().recorded = Some((stamp, hit));
    }
}

impl PrefixCacheScorer {
    fn score_prefix(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        candidates: Candidates<'_>,
        scores: &mut [f64],
    ) {
        self.match_prompt(state, request, candidates.pool());
        let info = state.scratch::<PrefixMatchInfo>();
        if info.total_blocks == 0 {
            return; // scores arrive zeroed: a prompt shorter than a block matches nowhere
        }
        let total = info.total_blocks as f64;
        for (score, &index) in scores.iter_mut().zip(candidates.indices()) {
            let matched = info.matched_blocks.get(index as usize).copied().unwrap_or(0);
            if matched > 0 {
                *score = self.blend(matched, total);
            }
        }
    }
}

impl DataProducer for PrefixCacheScorer {
    fn produce(&self, state: &mut CycleState, request: &InferenceRequest, pool: &PoolSnapshot) {
        self.match_prompt(state, request, pool);
    }
}

impl PreRequest for PrefixCacheScorer {
    fn pre_request(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        result: &SchedulingResult,
    ) {
        let endpoint = result.primary().id();
        let hashes = &self.hashed_prompt(state, request).hashes;
        // Queued, not applied: a full queue drops the record (counted) rather than waiting.
        self.writer.submit(endpoint, hashes);
    }

    fn flush(&self) {
        self.writer.flush();
    }

    fn dropped_deferred(&self) -> u64 {
        self.writer.dropped()
    }
}

/// Forgets the endpoints that left the pool, so that the index's memory follows the pool
/// rather than every endpoint ever seen (pods come and go). Runs on the thread that published
/// the change. The whole index is reconciled with the pool, not just the departed endpoints:
/// a decision taken on an older snapshot may have recorded a departed endpoint again, and
/// such an endpoint goes at the next change.
impl PoolObserver for PrefixCacheScorer {
    fn membership_changed(&self, pool: &PoolSnapshot) {
        for id in self.index.endpoint_keys() {
            if pool.index_of(id).is_none() {
                self.index.remove_endpoint(id);
            }
        }
    }
}
