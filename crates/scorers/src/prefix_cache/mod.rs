//! `prefix-cache-scorer`: prefers endpoints that already hold the longest leading run of the
//! prompt's blocks in their KV cache, so the shared prefix is not prefilled again.
//!
//! Score = matched leading blocks / prompt blocks (GIE); with llm-d's `matchLengthWeight`
//! `w` above 0 it becomes `w * min(1, matched length / matchLengthScaleTokens)^2 + (1 - w) *
//! ratio`, so long matches count for more than short ones of the same ratio. By default the
//! score then fades as its endpoint gets busier than the least-loaded candidate
//! (`affinityLoadTolerance`, `affinityLoadRatio`, [`load_aware`]), so one hot prefix cannot pin the whole load on
//! the endpoint that holds it; `affinityLoadTolerance: 0` keeps GIE's formula. Every version's
//! parameter names are accepted ([`PrefixCacheParameters`]). The prompt is cut into blocks of
//! `blockSize` characters (about 4 characters a token; GIE's default 64 characters = 16
//! tokens), hashed as a chain seeded by the model name, at most `maxPrefixBlocksToMatch`
//! blocks. Which endpoint holds which block is not observed but inferred: the pre-request
//! hook records the chosen endpoint as holding every block of the prompt, in a per-endpoint
//! LRU of `lruCapacityPerServer` blocks that approximates the server's cache. Endpoints that
//! leave the pool are forgotten when the pool's writer publishes the change (the scorer is a
//! [`PoolObserver`]), so memory is bounded by the live pool, not by every endpoint ever seen.
//!
//! The index, the hashing and the recording belong to a [`PrefixCacheProducer`]. llm-d
//! declares it as a plugin of its own (`approx-prefix-cache-producer`, [`producer`]), named by
//! the scorer's `prefixMatchInfoProducerName`; a bare scorer uses the producer declared under
//! the default name `approx-prefix-cache-producer` when there is one. Otherwise (GIE's
//! configs, or any index parameter given to the scorer) the scorer builds a producer of its
//! own from its parameters and plays its roles: data producer before the profiles, pre-request
//! hook and pool observer.
//!
//! The prompt is hashed and matched once per decision per producer; hashes and matches live in
//! the decision's [`CycleState`], where the scorer, the hook and
//! `prefix-cache-affinity-filter` read them. The record is not made on the decision's path:
//! the hook queues the hashes on the producer's [`RecordWriter`](prefix_cache::RecordWriter),
//! whose thread applies them a moment later (batched, a repeated prompt recorded once). A
//! decision never waits for the writer; when it falls behind a record is dropped and counted
//! rather than queued without bound.
//! [`Scheduler::flush`](scheduler_core::Scheduler::flush) waits for the queued records.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use scheduler_core::{
    BindPlugins, Candidates, ConstructedPlugins, CycleState, DataProducer, InferenceRequest,
    PluginError, PoolObserver, PoolSnapshot, PreRequest, SchedulingResult, Scorer,
};

pub mod load_aware;
use load_aware::LoadTolerance;
pub(crate) mod matches;
mod parameters;
pub mod producer;

pub use parameters::PrefixCacheParameters;
use parameters::Resolved;
pub use producer::{
    ApproxPrefixParameters, PRODUCER_TYPE_NAME, PrefixCacheProducer, PrefixSource,
    ProducerSettings, RecordApplication, RecordSink, prefix_producers,
};

/// GIE type name.
pub const TYPE_NAME: &str = "prefix-cache-scorer";

/// How a scorer finds its producer when the config is bound.
#[derive(Debug)]
enum Binding {
    /// Built with its own producer.
    Own,
    /// `prefixMatchInfoProducerName`: that declared producer, or an error.
    Named(String),
    /// The producer declared under the default name, else one of its own with `Resolved`.
    DefaultOr(Resolved),
}

/// Scores by cached prefix length and records picks.
#[derive(Debug)]
pub struct PrefixCacheScorer {
    source: Arc<PrefixSource>,
    binding: Binding,
    /// Whether the producer is the scorer's own, whose roles the scorer then plays.
    owns_producer: AtomicBool,
    /// `(matchLengthWeight, matchLengthScaleTokens in characters)`; weight 0 scores by ratio.
    match_length: (f64, f64),
    /// How far a prefix's endpoint may be busier than the lightest candidate; off scores
    /// cached prefixes whatever the load (GIE).
    load_tolerance: LoadTolerance,
}

impl PrefixCacheScorer {
    /// A scorer with a producer of its own, configured by GIE's parameters.
    pub fn new(parameters: PrefixCacheParameters) -> Result<Self, PluginError> {
        let resolved = parameters.resolve()?;
        let scorer = Self::unbound(Binding::Own, &resolved);
        scorer.own(resolved);
        Ok(scorer)
    }

    /// A scorer reading `producer`'s matches; `producer` records the picks itself, as a
    /// pre-request hook of the scheduler.
    pub fn with_producer(
        producer: Arc<PrefixCacheProducer>,
        parameters: PrefixCacheParameters,
    ) -> Result<Self, PluginError> {
        let resolved = parameters.resolve()?;
        let scorer = Self::unbound(Binding::Own, &resolved);
        scorer.source.set(producer);
        Ok(scorer)
    }

    /// A scorer as a config declares it: bound to its producer by [`BindPlugins::bind`].
    pub fn declared(parameters: PrefixCacheParameters) -> Result<Self, PluginError> {
        Self::declared_with(parameters, RecordApplication::default())
    }

    /// A declared scorer whose own producer, should it build one, applies records `records`.
    pub fn declared_with(
        parameters: PrefixCacheParameters,
        records: RecordApplication,
    ) -> Result<Self, PluginError> {
        let resolved = Resolved { records, ..parameters.resolve()? };
        let sets_index = parameters.sets_index();
        let named = parameters.prefix_match_info_producer_name.filter(|name| !name.is_empty());
        let scorer = match named {
            Some(name) if sets_index => {
                return Err(PluginError::InvalidParameters(format!(
                    "the index parameters belong to the producer '{name}' named by \
                     prefixMatchInfoProducerName, not to the scorer"
                )));
            }
            Some(name) => Self::unbound(Binding::Named(name), &resolved),
            None if sets_index => {
                let scorer = Self::unbound(Binding::Own, &resolved);
                scorer.own(resolved);
                scorer
            }
            None => Self::unbound(Binding::DefaultOr(resolved), &resolved),
        };
        Ok(scorer)
    }

    fn unbound(binding: Binding, resolved: &Resolved) -> Self {
        Self {
            source: Arc::new(PrefixSource::default()),
            binding,
            owns_producer: AtomicBool::new(false),
            match_length: resolved.match_length,
            load_tolerance: resolved.load_tolerance,
        }
    }

    fn own(&self, resolved: Resolved) {
        let producer = PrefixCacheProducer::new(ProducerSettings {
            block_size: resolved.block_size,
            max_blocks: resolved.max_blocks,
            capacity: resolved.capacity,
            records: resolved.records,
        });
        if self.source.set(Arc::new(producer)) {
            self.owns_producer.store(true, Ordering::Release);
        }
    }

    /// The producer whose matches the scorer reads (none before a declared scorer is bound).
    pub fn producer(&self) -> Option<&Arc<PrefixCacheProducer>> {
        self.source.producer()
    }

    /// What the scorer offers `prefix-cache-affinity-filter` ([`scheduler_core::Plugin::shared`]).
    pub fn source(&self) -> &Arc<PrefixSource> {
        &self.source
    }

    /// The producer when it is the scorer's own, so that its hooks run once.
    fn own_producer(&self) -> Option<&Arc<PrefixCacheProducer>> {
        if self.owns_producer.load(Ordering::Acquire) { self.producer() } else { None }
    }

    /// llm-d's score: `w * min(1, matched length / scale)^2 + (1 - w) * matched / total`,
    /// lengths in characters here where llm-d counts tokens (the same ratio).
    fn blend(&self, matched: usize, total: f64, block_size: usize) -> f64 {
        let ratio = matched as f64 / total;
        let (weight, scale) = self.match_length;
        if weight <= 0.0 {
            return ratio;
        }
        let length = (matched as f64 * block_size as f64 / scale).min(1.0);
        weight * length * length + (1.0 - weight) * ratio
    }
}

impl BindPlugins for PrefixCacheScorer {
    fn bind(&self, plugins: &ConstructedPlugins) -> Result<(), PluginError> {
        match &self.binding {
            Binding::Own => {}
            Binding::Named(name) => {
                let named = producer::named_producer(plugins, name)?;
                if let Some(found) = named.producer() {
                    self.source.set(Arc::clone(found));
                }
            }
            Binding::DefaultOr(resolved) => {
                match producer::declared_source(plugins, PRODUCER_TYPE_NAME)
                    .and_then(|source| source.producer().cloned())
                {
                    Some(found) => {
                        self.source.set(found);
                    }
                    None => self.own(*resolved),
                }
            }
        }
        Ok(())
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
        let Some(producer) = self.producer() else { return };
        let block_size = producer.block_size();
        let Some(info) = producer.matches(state, request, candidates.pool()) else { return };
        if info.total_blocks == 0 {
            return; // scores arrive zeroed: a prompt shorter than a block matches nowhere
        }
        let total = info.total_blocks as f64;
        let mut any_hit = false;
        for (score, &index) in scores.iter_mut().zip(candidates.indices()) {
            let matched = info.matched(index);
            if matched > 0 {
                *score = self.blend(matched, total, block_size);
                any_hit = true;
            }
        }
        if any_hit && !self.load_tolerance.is_off() {
            self.load_tolerance.discount(state, candidates, scores);
        }
    }
}

impl DataProducer for PrefixCacheScorer {
    fn produce(&self, state: &mut CycleState, request: &InferenceRequest, pool: &PoolSnapshot) {
        if let Some(producer) = self.own_producer() {
            producer.produce(state, request, pool);
        }
    }
}

impl PreRequest for PrefixCacheScorer {
    fn pre_request(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        result: &SchedulingResult,
    ) {
        if let Some(producer) = self.own_producer() {
            producer.pre_request(state, request, result);
        }
    }

    fn flush(&self) {
        if let Some(producer) = self.own_producer() {
            producer.flush();
        }
    }

    fn dropped_deferred(&self) -> u64 {
        self.own_producer().map_or(0, |producer| producer.dropped_deferred())
    }
}

impl PoolObserver for PrefixCacheScorer {
    fn membership_changed(&self, pool: &PoolSnapshot) {
        if let Some(producer) = self.own_producer() {
            producer.membership_changed(pool);
        }
    }
}
