//! `approx-prefix-cache-producer`: the approximate prefix index as a plugin of its own, as
//! llm-d-router splits it from `prefix-cache-scorer`. It hashes the prompt once per decision,
//! matches it against the index before the profiles run, and records the pick after them;
//! the scorers and filters that name it (`prefixMatchInfoProducerName`) read its matches.
//!
//! A `prefix-cache-scorer` declared without a producer builds one of its own from its
//! (GIE-era) parameters, so older configs keep working unchanged.
//!
//! Cross-replica sync: a [`RecordSink`] set with [`PrefixCacheProducer::set_record_sink`] is
//! told of every record a decision makes (after it is queued, without waiting), and
//! [`PrefixCacheProducer::apply_remote`] queues a record another replica made. Neither waits
//! for the index or the network.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use prefix_cache::{
    BlockHasher, BlockHasherConfig, IndexConfig, LookupScratch, PrefixIndex, RecordWriter,
    WriterConfig,
};
use scheduler_core::{
    CHARACTERS_PER_TOKEN, CycleState, DataProducer, EndpointId, InferenceRequest, PluginError,
    PoolObserver, PoolSnapshot, PreRequest, SchedulingResult,
};
use serde::Deserialize;

use super::matches::{PrefixMatchInfo, PrefixMatches};

/// llm-d type name.
pub const PRODUCER_TYPE_NAME: &str = "approx-prefix-cache-producer";

/// llm-d's `defaultBlockSizeTokens` (vLLM's block size).
const DEFAULT_BLOCK_SIZE_TOKENS: usize = 16;
/// llm-d's floor on the block size in tokens (llm-d-router#1158): smaller blocks multiply the
/// index's entries without improving the match signal much.
const MIN_BLOCK_SIZE_TOKENS: usize = 64;
/// llm-d's `defaultMaxPrefixBlocks`.
const DEFAULT_MAX_PREFIX_BLOCKS: usize = 2048;
/// llm-d's `defaultMaxPrefixTokens` (a 128K context window).
const DEFAULT_MAX_PREFIX_TOKENS: usize = 131_072;
/// The block cap when both caps are 0 ("the whole prompt"): a prompt is bounded by the body
/// limit long before this many blocks.
const UNLIMITED_BLOCKS: usize = 1 << 24;

/// Parameters of `approx-prefix-cache-producer`, with llm-d's names and defaults.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApproxPrefixParameters {
    /// llm-d's metric-driven tuning of block size and capacity; accepted, without effect
    /// (the configured values are used).
    #[serde(default)]
    pub auto_tune: Option<bool>,
    /// Block size in tokens (default 16, raised to llm-d's floor of 64).
    #[serde(default)]
    pub block_size_tokens: Option<usize>,
    /// Deprecated spelling of `blockSizeTokens`, used when that is left at its default.
    #[serde(default)]
    pub block_size: Option<usize>,
    /// Block cap, used only when `maxPrefixTokensToMatch` is 0 (default 2048).
    #[serde(default)]
    pub max_prefix_blocks_to_match: Option<usize>,
    /// Token cap (default 131072); both caps 0 match the whole prompt.
    #[serde(default)]
    pub max_prefix_tokens_to_match: Option<usize>,
    /// Blocks remembered per endpoint (default 31,250).
    #[serde(default)]
    pub lru_capacity_per_server: Option<usize>,
}

/// The producer's settings in the index's units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProducerSettings {
    /// Block size in characters.
    pub block_size: usize,
    /// Most blocks hashed and matched.
    pub max_blocks: usize,
    /// Blocks remembered per endpoint.
    pub capacity: usize,
    /// When the records of picks reach the index.
    pub records: RecordApplication,
}

/// When a producer's records of picks reach its index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RecordApplication {
    /// On a writer thread of the producer's own, off the decision's path: what a server wants.
    #[default]
    Background,
    /// When the scheduler is flushed, on the flushing thread. For single-threaded embedders
    /// that flush after every decision (a simulation): the same index, without handing every
    /// record to another thread and waiting for it.
    OnFlush,
}

impl ApproxPrefixParameters {
    /// The settings llm-d derives from these parameters, or the first one out of range.
    pub fn resolve(&self) -> Result<ProducerSettings, PluginError> {
        let invalid = |message: String| Err(PluginError::InvalidParameters(message));
        let mut tokens = self.block_size_tokens.unwrap_or(DEFAULT_BLOCK_SIZE_TOKENS);
        if let Some(legacy) = self.block_size.filter(|&size| size > 0)
            && tokens == DEFAULT_BLOCK_SIZE_TOKENS
        {
            tokens = legacy;
        }
        if tokens == 0 {
            return invalid("'blockSizeTokens' must be at least 1".into());
        }
        let tokens = tokens.max(MIN_BLOCK_SIZE_TOKENS);
        let token_cap = self.max_prefix_tokens_to_match.unwrap_or(DEFAULT_MAX_PREFIX_TOKENS);
        let max_blocks = if token_cap > 0 {
            let blocks = token_cap / tokens;
            if blocks == 0 {
                return invalid(format!(
                    "'maxPrefixTokensToMatch' ({token_cap}) is shorter than one block of {tokens} tokens"
                ));
            }
            blocks
        } else {
            match self.max_prefix_blocks_to_match.unwrap_or(DEFAULT_MAX_PREFIX_BLOCKS) {
                0 => UNLIMITED_BLOCKS,
                blocks => blocks,
            }
        };
        let capacity = self
            .lru_capacity_per_server
            .unwrap_or(prefix_cache::index::DEFAULT_CAPACITY_PER_ENDPOINT);
        if capacity == 0 {
            return invalid("'lruCapacityPerServer' must be at least 1".into());
        }
        Ok(ProducerSettings {
            block_size: tokens.saturating_mul(CHARACTERS_PER_TOKEN),
            max_blocks,
            capacity,
            records: RecordApplication::default(),
        })
    }
}

/// The prompt's block hashes and the lookup's buffers, kept in the decision's [`CycleState`]
/// and reused from one decision to the next.
#[derive(Debug, Default)]
struct PromptScratch {
    /// The decision and block configuration the hashes were computed for.
    hashed_for: Option<(u64, BlockHasherConfig)>,
    hashes: Vec<u64>,
    lookup: LookupScratch,
    matches: Vec<(EndpointId, usize)>,
}

/// Told of each record a decision makes on a [`PrefixCacheProducer`]: a cross-replica syncer
/// publishes them. Called on the decision's path: an implementation queues and returns.
pub trait RecordSink: Send + Sync + std::fmt::Debug {
    /// Endpoint `endpoint` was recorded as holding `hashes` (leading block hashes).
    fn recorded(&self, endpoint: EndpointId, hashes: &[u64]);
}

/// Tells producers apart in a decision's [`CycleState`].
static NEXT_PRODUCER_ID: AtomicU64 = AtomicU64::new(1);

/// The approximate prefix index of one producer: which endpoint was last sent which prompt
/// blocks, and the per-decision matches against it.
///
/// Records are not made on the decision's path: the pre-request hook queues the hashes on a
/// [`RecordWriter`], whose thread applies them a moment later. When the writer falls behind a
/// record is dropped and counted rather than queued without bound.
#[derive(Debug)]
pub struct PrefixCacheProducer {
    id: u64,
    hasher: BlockHasher,
    index: Arc<PrefixIndex<EndpointId>>,
    writer: RecordWriter<EndpointId>,
    sink: OnceLock<Arc<dyn RecordSink>>,
}

impl PrefixCacheProducer {
    /// A producer with `settings`.
    pub fn new(settings: ProducerSettings) -> Self {
        let index = Arc::new(PrefixIndex::new(IndexConfig {
            capacity_per_endpoint: settings.capacity,
            ..IndexConfig::default()
        }));
        Self {
            id: NEXT_PRODUCER_ID.fetch_add(1, Ordering::Relaxed),
            hasher: BlockHasher::new(BlockHasherConfig {
                block_size: settings.block_size,
                max_blocks: settings.max_blocks,
            }),
            writer: match settings.records {
                RecordApplication::Background => {
                    RecordWriter::new(Arc::clone(&index), WriterConfig::default())
                }
                RecordApplication::OnFlush => {
                    RecordWriter::without_thread(Arc::clone(&index), WriterConfig::default())
                }
            },
            index,
            sink: OnceLock::new(),
        }
    }

    /// Tells `sink` of every record decisions make from now on; `false` (and no change) when
    /// a sink is already set.
    pub fn set_record_sink(&self, sink: Arc<dyn RecordSink>) -> bool {
        self.sink.set(sink).is_ok()
    }

    /// Queues a record another replica made ("`endpoint` holds `hashes`"), without telling
    /// the sink. Returns `false` when the writer's queue is full and the record was dropped
    /// (counted with the local drops).
    pub fn apply_remote(&self, endpoint: EndpointId, hashes: &[u64]) -> bool {
        self.writer.submit(endpoint, hashes)
    }

    /// A producer configured by llm-d's parameters.
    pub fn from_parameters(parameters: &ApproxPrefixParameters) -> Result<Self, PluginError> {
        Self::from_parameters_with(parameters, RecordApplication::default())
    }

    /// A producer configured by llm-d's parameters whose records reach the index `records`.
    pub fn from_parameters_with(
        parameters: &ApproxPrefixParameters,
        records: RecordApplication,
    ) -> Result<Self, PluginError> {
        Ok(Self::new(ProducerSettings { records, ..parameters.resolve()? }))
    }

    /// Tells this producer's matches apart from other producers' in a decision's state.
    #[cfg_attr(not(feature = "kv-events"), allow(dead_code))]
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The block index.
    pub fn index(&self) -> &Arc<PrefixIndex<EndpointId>> {
        &self.index
    }

    /// The writer applying the picks' records (counters: applied, coalesced, dropped).
    pub fn writer(&self) -> &RecordWriter<EndpointId> {
        &self.writer
    }

    /// Characters a block.
    pub fn block_size(&self) -> usize {
        self.hasher.config().block_size
    }

    /// Fills this producer's matches for the decision, unless already filled.
    pub(crate) fn match_prompt(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        pool: &PoolSnapshot,
    ) {
        let stamp = state.decision_stamp();
        if state.scratch::<PrefixMatches>().of(self.id, stamp).is_some() {
            return;
        }
        // Taken out and put back (buffers and all) so that the prompt scratch can be borrowed
        // from the same state meanwhile.
        let mut matches = std::mem::take(state.scratch::<PrefixMatches>());
        let info = matches.slot(self.id);
        let PromptScratch { hashes, lookup, matches: found, .. } =
            self.hashed_prompt(state, request);
        info.total_blocks = hashes.len();
        info.matched_blocks.clear();
        info.matched_blocks.resize(pool.len(), 0);
        if !hashes.is_empty() {
            self.index.longest_prefix_matches(hashes, lookup, found);
            for &(endpoint, blocks) in found.iter() {
                let slot =
                    pool.index_of(endpoint).and_then(|i| info.matched_blocks.get_mut(i as usize));
                if let Some(slot) = slot {
                    *slot = blocks;
                }
            }
        }
        info.produced_for = Some(stamp);
        *state.scratch::<PrefixMatches>() = matches;
    }

    /// This producer's matches for the current decision, matching first if needed.
    pub(crate) fn matches<'s>(
        &self,
        state: &'s mut CycleState,
        request: &InferenceRequest,
        pool: &PoolSnapshot,
    ) -> Option<&'s PrefixMatchInfo> {
        self.match_prompt(state, request, pool);
        let stamp = state.decision_stamp();
        state.scratch::<PrefixMatches>().of(self.id, stamp)
    }

    fn hashed_prompt<'s>(
        &self,
        state: &'s mut CycleState,
        request: &InferenceRequest,
    ) -> &'s mut PromptScratch {
        let key = (state.decision_stamp(), self.hasher.config());
        let scratch = state.scratch::<PromptScratch>();
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

impl DataProducer for PrefixCacheProducer {
    fn produce(&self, state: &mut CycleState, request: &InferenceRequest, pool: &PoolSnapshot) {
        self.match_prompt(state, request, pool);
    }
}

impl PreRequest for PrefixCacheProducer {
    fn pre_request(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        result: &SchedulingResult,
    ) {
        let endpoint = result.primary().id();
        let prefill = result.prefill().map(|prefill| prefill.id());
        let hashes = &self.hashed_prompt(state, request).hashes;
        // Queued, not applied: a full queue drops the record (counted) rather than waiting.
        self.writer.submit(endpoint, hashes);
        let sink = self.sink.get();
        if let Some(sink) = sink {
            sink.recorded(endpoint, hashes);
        }
        // A disaggregated request's prefill endpoint computed the prompt's KV cache too (as
        // llm-d records it).
        if let Some(prefill) = prefill.filter(|&prefill| prefill != endpoint) {
            self.writer.submit(prefill, hashes);
            if let Some(sink) = sink {
                sink.recorded(prefill, hashes);
            }
        }
    }

    fn flush(&self) {
        self.writer.flush();
    }

    fn dropped_deferred(&self) -> u64 {
        self.writer.dropped()
    }
}

/// Forgets the endpoints that left the pool, so that the index's memory follows the pool
/// rather than every endpoint ever seen. The whole index is reconciled with the pool: a
/// decision taken on an older snapshot may have recorded a departed endpoint again, and such
/// an endpoint goes at the next change.
impl PoolObserver for PrefixCacheProducer {
    fn membership_changed(&self, pool: &PoolSnapshot) {
        for id in self.index.endpoint_keys() {
            if pool.index_of(id).is_none() {
                self.index.remove_endpoint(id);
            }
        }
    }
}

/// What a plugin holding a prefix index offers others ([`scheduler_core::Plugin::shared`]):
/// the producer, set once it exists (a scorer without a producer of its own builds one when
/// the config is bound).
#[derive(Debug, Default)]
pub struct PrefixSource {
    producer: OnceLock<Arc<PrefixCacheProducer>>,
    /// Whether this is an `approx-prefix-cache-producer` (the only thing
    /// `prefixMatchInfoProducerName` may name) rather than a scorer's own index.
    declared_producer: bool,
    /// The plugin behind the source when it is more than a prefix index (the precise
    /// producer, whose event index the binary reports on).
    owner: OnceLock<Arc<dyn std::any::Any + Send + Sync>>,
}

impl PrefixSource {
    /// The source of a declared producer.
    pub fn of_producer(producer: Arc<PrefixCacheProducer>) -> Self {
        Self { producer: OnceLock::from(producer), declared_producer: true, owner: OnceLock::new() }
    }

    /// The source with the plugin that owns it.
    pub fn with_owner(self, owner: Arc<dyn std::any::Any + Send + Sync>) -> Self {
        self.set_owner(owner);
        self
    }

    /// Records the plugin that owns the source; `false` when one was already recorded.
    pub fn set_owner(&self, owner: Arc<dyn std::any::Any + Send + Sync>) -> bool {
        self.owner.set(owner).is_ok()
    }

    /// The plugin that owns the source, when one was recorded.
    pub fn owner(&self) -> Option<&Arc<dyn std::any::Any + Send + Sync>> {
        self.owner.get()
    }

    /// The producer, once there is one.
    pub fn producer(&self) -> Option<&Arc<PrefixCacheProducer>> {
        self.producer.get()
    }

    /// Sets the producer of a scorer's source; `false` when it was already set.
    pub(crate) fn set(&self, producer: Arc<PrefixCacheProducer>) -> bool {
        self.producer.set(producer).is_ok()
    }

    /// Whether this is a declared `approx-prefix-cache-producer`.
    pub fn is_declared_producer(&self) -> bool {
        self.declared_producer
    }
}

/// The source named `name` among `plugins`: it must be a prefix producer (an
/// `approx-prefix-cache-producer` or a `precise-prefix-cache-producer`).
pub(crate) fn named_producer(
    plugins: &scheduler_core::ConstructedPlugins,
    name: &str,
) -> Result<Arc<PrefixSource>, PluginError> {
    declared_source(plugins, name).ok_or_else(|| {
        PluginError::InvalidParameters(format!(
            "prefixMatchInfoProducerName: no {PRODUCER_TYPE_NAME} named '{name}' is declared"
        ))
    })
}

/// The declared producer named `name`, if there is one.
pub(crate) fn declared_source(
    plugins: &scheduler_core::ConstructedPlugins,
    name: &str,
) -> Option<Arc<PrefixSource>> {
    let shared = plugins.get(name)?.plugin.shared.clone()?;
    let source = shared.downcast::<PrefixSource>().ok()?;
    source.is_declared_producer().then_some(source)
}

/// Every plugin's prefix source, declared producers and scorers' own indexes alike, in
/// declaration order.
pub(crate) fn every_source(
    plugins: &scheduler_core::ConstructedPlugins,
) -> impl Iterator<Item = Arc<PrefixSource>> + '_ {
    plugins
        .iter()
        .filter_map(|declared| declared.plugin.shared.clone()?.downcast::<PrefixSource>().ok())
}

/// Every distinct prefix index of `plugins` (declared producers and scorers' own ones), each
/// under the name of the first plugin holding it, in declaration order. A syncer keys shared
/// records by this name, the same on every replica running the same config.
pub fn prefix_producers(
    plugins: &scheduler_core::ConstructedPlugins,
) -> Vec<(String, Arc<PrefixCacheProducer>)> {
    let mut found: Vec<(String, Arc<PrefixCacheProducer>)> = Vec::new();
    for declared in plugins.iter() {
        let Some(shared) = declared.plugin.shared.clone() else { continue };
        let Ok(source) = shared.downcast::<PrefixSource>() else { continue };
        let Some(producer) = source.producer() else { continue };
        if !found.iter().any(|(_, known)| Arc::ptr_eq(known, producer)) {
            found.push((declared.name.clone(), Arc::clone(producer)));
        }
    }
    found
}
