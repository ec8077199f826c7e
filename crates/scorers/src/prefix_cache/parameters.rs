//! The `prefix-cache-scorer` parameters of every GIE and llm-d version, resolved to one block
//! size in characters, one block cap and one per-endpoint capacity.
//!
//! epp-rs hashes characters, not tokens; where a version counts tokens the value is converted
//! at [`CHARACTERS_PER_TOKEN`] (4) characters a token:
//!
//! | parameter | unit | versions |
//! |---|---|---|
//! | `hashBlockSize` | characters | GIE v0.5-v1.0 |
//! | `blockSize` | characters | GIE v1.1-v1.3 (deprecated in llm-d) |
//! | `blockSizeTokens` | tokens (x4) | GIE v1.4+, llm-d |
//! | `maxPrefixBlocksToMatch` | blocks | all (deprecated in llm-d) |
//! | `maxPrefixTokensToMatch` | tokens | llm-d; when > 0 it wins: blocks = tokens / block size in tokens |
//! | `lruCapacityPerServer` | blocks | all |
//! | `autoTune` | bool | llm-d; accepted, no effect (see below) |
//! | `matchLengthWeight`, `matchLengthScaleTokens` | weight, tokens | llm-d scorer |
//! | `affinityLoadTolerance`, `affinityLoadRatio`, `waitingRequestFactor` | requests, ratio, ratio | epp-rs: load-aware affinity (defaults 64, 2 and 4; tolerance 0 = GIE) |
//!
//! llm-d's `autoTune` reads the block size and cache capacity from the servers' metrics;
//! epp-rs keeps the configured values, so the parameter is accepted for compatibility and
//! has no effect. The defaults stay GIE's (64-character blocks, 256 blocks), not llm-d's.
//! A value is refused rather than clamped, naming the parameter: zero sizes, a token cap
//! shorter than one block, a weight outside `[0, 1]`, a zero scale with a positive weight.

use scheduler_core::{CHARACTERS_PER_TOKEN, PluginError};

use super::load_aware::{
    DEFAULT_AFFINITY_LOAD_RATIO, DEFAULT_AFFINITY_LOAD_TOLERANCE, DEFAULT_WAITING_REQUEST_FACTOR,
    LoadTolerance,
};
use super::producer::RecordApplication;
use serde::Deserialize;

/// llm-d's `defaultMatchLengthScaleTokens`.
const DEFAULT_MATCH_LENGTH_SCALE_TOKENS: usize = 8192;

/// Parameters, with every name GIE and llm-d versions used.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PrefixCacheParameters {
    /// The `approx-prefix-cache-producer` whose matches the scorer reads (llm-d); without it
    /// the one declared under that default name, else an index of the scorer's own.
    #[serde(default)]
    pub prefix_match_info_producer_name: Option<String>,
    /// Block size in characters (GIE v1.1-v1.3).
    #[serde(default)]
    pub block_size: Option<usize>,
    /// Block size in characters (GIE v0.5-v1.0).
    #[serde(default)]
    pub hash_block_size: Option<usize>,
    /// Block size in tokens (GIE v1.4+).
    #[serde(default)]
    pub block_size_tokens: Option<usize>,
    /// Most blocks of a prompt hashed and matched (default 256).
    #[serde(default)]
    pub max_prefix_blocks_to_match: Option<usize>,
    /// Most tokens of a prompt matched (llm-d); when above 0 it overrides
    /// `maxPrefixBlocksToMatch`.
    #[serde(default)]
    pub max_prefix_tokens_to_match: Option<usize>,
    /// Blocks remembered per endpoint (default 31,250).
    #[serde(default)]
    pub lru_capacity_per_server: Option<usize>,
    /// llm-d's metric-driven tuning; accepted, without effect.
    #[serde(default)]
    pub auto_tune: Option<bool>,
    /// Weight of the matched length against the matched ratio, in `[0, 1]` (default 0).
    #[serde(default)]
    pub match_length_weight: Option<f64>,
    /// Matched length, in tokens, that earns the full length score (default 8192).
    #[serde(default)]
    pub match_length_scale_tokens: Option<usize>,
    /// Requests by which a prefix's endpoint may be busier than the least-loaded candidate
    /// before its affinity is gone: the prefix score fades linearly over that excess (see
    /// `load_aware`). Default 64; 0 scores as GIE (affinity whatever the load).
    #[serde(default)]
    pub affinity_load_tolerance: Option<f64>,
    /// How much that tolerance grows per request of the least-loaded candidate's load, so a
    /// busy pool keeps affinity until the imbalance is large in proportion (default 2; 0
    /// keeps the tolerance absolute).
    #[serde(default)]
    pub affinity_load_ratio: Option<f64>,
    /// Running requests that one waiting request counts for in that load (default 4).
    #[serde(default)]
    pub waiting_request_factor: Option<f64>,
}

/// The parameters resolved into the scorer's units.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Resolved {
    /// Characters a block.
    pub(super) block_size: usize,
    pub(super) max_blocks: usize,
    pub(super) capacity: usize,
    /// `(weight, scale in characters)`.
    pub(super) match_length: (f64, f64),
    /// How far a prefix's endpoint may be busier than the lightest candidate.
    pub(super) load_tolerance: LoadTolerance,
    /// When an own producer's records reach its index (not a config parameter: the
    /// embedder's choice).
    pub(super) records: RecordApplication,
}

fn invalid<T>(message: String) -> Result<T, PluginError> {
    Err(PluginError::InvalidParameters(message))
}

/// A number that must be finite and not negative.
fn non_negative(name: &str, value: Option<f64>, default: f64) -> Result<f64, PluginError> {
    let number = value.unwrap_or(default);
    if number >= 0.0 && number.is_finite() {
        Ok(number)
    } else {
        invalid(format!("'{name}' must be a finite number, 0 or more, got {number}"))
    }
}

impl PrefixCacheParameters {
    fn block_size_characters(&self) -> Result<usize, PluginError> {
        // Each spelling with the characters one of its units stands for.
        let given = [
            ("blockSize", self.block_size, 1),
            ("hashBlockSize", self.hash_block_size, 1),
            ("blockSizeTokens", self.block_size_tokens, CHARACTERS_PER_TOKEN),
        ];
        let mut chosen = None;
        for (name, value, characters_per_unit) in given {
            let Some(value) = value else { continue };
            if value == 0 {
                return invalid(format!("'{name}' must be at least 1"));
            }
            // Saturates rather than overflows; such a block never fills and hashes nothing.
            let size = value.saturating_mul(characters_per_unit);
            if chosen.is_some_and(|other| other != size) {
                return invalid(
                    "blockSize, hashBlockSize and blockSizeTokens disagree; give one".into(),
                );
            }
            chosen = Some(size);
        }
        Ok(chosen.unwrap_or(prefix_cache::hash::DEFAULT_BLOCK_SIZE))
    }

    /// Whether any parameter of the index itself (block size, caps, capacity) is given.
    pub(super) fn sets_index(&self) -> bool {
        self.block_size.is_some()
            || self.hash_block_size.is_some()
            || self.block_size_tokens.is_some()
            || self.max_prefix_blocks_to_match.is_some()
            || self.max_prefix_tokens_to_match.is_some()
            || self.lru_capacity_per_server.is_some()
    }

    /// The scorer's settings, or the first parameter out of range.
    pub(super) fn resolve(&self) -> Result<Resolved, PluginError> {
        let block_size = self.block_size_characters()?;
        let max_blocks = match self.max_prefix_tokens_to_match.filter(|&tokens| tokens > 0) {
            // llm-d: maxBlocks = maxPrefixTokensToMatch / blockSizeTokens.
            Some(tokens) => {
                let blocks = tokens.saturating_mul(CHARACTERS_PER_TOKEN) / block_size;
                if blocks == 0 {
                    return invalid(format!(
                        "'maxPrefixTokensToMatch' ({tokens}) is shorter than one block"
                    ));
                }
                blocks
            }
            None => {
                let blocks = self
                    .max_prefix_blocks_to_match
                    .unwrap_or(prefix_cache::hash::DEFAULT_MAX_BLOCKS);
                if blocks == 0 {
                    return invalid("'maxPrefixBlocksToMatch' must be at least 1".into());
                }
                blocks
            }
        };
        let capacity = self
            .lru_capacity_per_server
            .unwrap_or(prefix_cache::index::DEFAULT_CAPACITY_PER_ENDPOINT);
        if capacity == 0 {
            return invalid("'lruCapacityPerServer' must be at least 1".into());
        }
        let weight = self.match_length_weight.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&weight) {
            return invalid(format!("'matchLengthWeight' must be between 0 and 1, got {weight}"));
        }
        let scale = self.match_length_scale_tokens.unwrap_or(DEFAULT_MATCH_LENGTH_SCALE_TOKENS);
        if weight > 0.0 && scale == 0 {
            return invalid(
                "'matchLengthScaleTokens' must be above 0 when 'matchLengthWeight' is".into(),
            );
        }
        let scale_characters = scale.saturating_mul(CHARACTERS_PER_TOKEN) as f64;
        let load_tolerance = LoadTolerance {
            requests: non_negative(
                "affinityLoadTolerance",
                self.affinity_load_tolerance,
                DEFAULT_AFFINITY_LOAD_TOLERANCE,
            )?,
            ratio: non_negative(
                "affinityLoadRatio",
                self.affinity_load_ratio,
                DEFAULT_AFFINITY_LOAD_RATIO,
            )?,
            waiting_factor: non_negative(
                "waitingRequestFactor",
                self.waiting_request_factor,
                DEFAULT_WAITING_REQUEST_FACTOR,
            )?,
        };
        Ok(Resolved {
            block_size,
            max_blocks,
            capacity,
            match_length: (weight, scale_characters),
            load_tolerance,
            records: RecordApplication::default(),
        })
    }
}
