//! A `prefix-cache-scorer` for registries that lack one, built on [`prefix_cache::PrefixIndex`].
//!
//! GIE semantics: a candidate's score is the number of leading prompt blocks the index believes
//! it holds divided by the prompt's block count (at most `maxPrefixBlocksToMatch`); after each
//! decision the primary endpoint is recorded as holding the prompt's blocks. The index is the
//! EPP's approximation (what it sent where, bounded per server by `lruCapacityPerServer`), not
//! the servers' true caches. [`crate::registry`] uses the built-in plugin of that name when the
//! scorers crate provides one, and this one otherwise.

use std::sync::Arc;

use prefix_cache::{BlockHasher, BlockHasherConfig, IndexConfig, PrefixIndex};
use scheduler_core::{
    Candidates, CycleState, EndpointId, InferenceRequest, Plugin, PluginError, PluginSpec,
    PreRequest, SchedulingResult, Scorer,
};
use serde::Deserialize;

/// GIE type name.
pub const TYPE_NAME: &str = "prefix-cache-scorer";

/// Parameters, under every name GIE versions used for the block size.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Parameters {
    /// Block size in characters (v0.5-v1.0).
    hash_block_size: Option<usize>,
    /// Block size in characters (v1.1-v1.3).
    block_size: Option<usize>,
    /// Block size in tokens (v1.4+), four characters each.
    block_size_tokens: Option<usize>,
    max_prefix_blocks_to_match: Option<usize>,
    lru_capacity_per_server: Option<usize>,
}

/// The prompt's block hashes, computed once per decision and shared by score and record.
struct PromptBlocks(Vec<u64>);

/// Scores candidates by the share of the prompt's leading blocks they are believed to hold.
#[derive(Debug)]
pub struct PrefixCacheScorer {
    hasher: BlockHasher,
    index: PrefixIndex<EndpointId>,
}

impl PrefixCacheScorer {
    fn blocks<'s>(&self, state: &'s mut CycleState, request: &InferenceRequest) -> &'s [u64] {
        let hasher = self.hasher;
        &state
            .get_or_insert_with(|| {
                let mut hashes = Vec::new();
                hasher.hash_prompt(&request.target_model, request.prompt.as_bytes(), &mut hashes);
                PromptBlocks(hashes)
            })
            .0
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
        let blocks = self.blocks(state, request);
        if blocks.is_empty() {
            return;
        }
        let mut matches = Vec::new();
        self.index.longest_prefix_matches(blocks, &mut matches);
        let total = blocks.len() as f64;
        for (score, endpoint) in scores.iter_mut().zip(candidates.iter()) {
            if let Some((_, matched)) = matches.iter().find(|(id, _)| *id == endpoint.id()) {
                *score = *matched as f64 / total;
            }
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
        let endpoint = result.primary().id();
        let blocks = self.blocks(state, request);
        self.index.record(endpoint, blocks);
    }
}

/// Builds the plugin from its configuration entry.
pub(crate) fn create(spec: &PluginSpec<'_>) -> Result<Plugin, PluginError> {
    let parameters: Parameters = spec.parameters()?;
    let block_size = parameters
        .block_size_tokens
        .map(|tokens| tokens * crate::hashing::CHARS_PER_TOKEN)
        .or(parameters.block_size)
        .or(parameters.hash_block_size)
        .unwrap_or(crate::hashing::BLOCK_CHARS);
    if block_size == 0 {
        return Err(PluginError::InvalidParameters("the block size must be positive".to_owned()));
    }
    let scorer = Arc::new(PrefixCacheScorer {
        hasher: BlockHasher::new(BlockHasherConfig {
            block_size,
            max_blocks: parameters.max_prefix_blocks_to_match.unwrap_or(256),
        }),
        index: PrefixIndex::new(IndexConfig {
            capacity_per_endpoint: parameters.lru_capacity_per_server.unwrap_or(31_250),
            shards: 4,
        }),
    });
    Ok(Plugin { scorer: Some(scorer.clone()), pre_request: Some(scorer), ..Plugin::default() })
}
