//! Prompt block hashing.
//!
//! # Algorithm
//! The prompt bytes are cut into fixed-size blocks (default 64 bytes, about 16 tokens of English
//! text, the Gateway API Inference Extension default for untokenized prompts). Block `i` hashes to
//! `h[i] = xxh3_64_with_seed(block_i, h[i - 1])`, and the chain starts from
//! `h[-1] = xxh3_64(model name)`. Chaining makes a block hash stand for the whole prefix that ends
//! with it, so two prompts share `h[i]` only if they share the first `i + 1` blocks; seeding with
//! the model name keeps two models from ever sharing blocks, since their KV caches are disjoint.
//!
//! # Bounds
//! At most [`BlockHasherConfig::max_blocks`] hashes are produced (default 256), so the work per
//! request is bounded whatever the prompt length. A trailing partial block is not hashed: its
//! content may still grow, and a model server only reuses whole cached blocks. Prompts shorter
//! than one block therefore hash to nothing. Hashing writes into a caller-provided buffer so a
//! request handler can reuse one allocation across requests.
//!
//! # Mixing
//! [`mix64`] is the output function of SplitMix64 (Steele, Lea and Flood, "Fast splittable
//! pseudorandom number generators", OOPSLA 2014; Java's `SplittableRandom.mix64`): two
//! xor-shift-multiply rounds and a final xor-shift, a bijection on `u64` in which every input bit
//! affects every output bit. The index passes block hashes through it before choosing a shard
//! and a bucket, so that callers indexing small or structured integers still spread evenly.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Default block size in bytes: 16 tokens at roughly four characters per token.
pub const DEFAULT_BLOCK_SIZE: usize = 64;
/// Default cap on the number of hashed blocks (GIE's `maxPrefixBlocksToMatch`).
pub const DEFAULT_MAX_BLOCKS: usize = 256;

/// How prompts are cut into blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHasherConfig {
    /// Block size in bytes (characters for ASCII prompts). A block size of zero hashes nothing.
    pub block_size: usize,
    /// Maximum number of leading blocks hashed; later blocks are ignored.
    pub max_blocks: usize,
}

impl Default for BlockHasherConfig {
    fn default() -> Self {
        Self { block_size: DEFAULT_BLOCK_SIZE, max_blocks: DEFAULT_MAX_BLOCKS }
    }
}

/// The SplitMix64 finaliser: a bijection on `u64` (xor-shifts and odd multipliers, each
/// invertible) that spreads any change of the input over all output bits.
///
/// [`PrefixIndex`](crate::PrefixIndex) applies it to block hashes to spread them over shards (low
/// bits) and buckets (high bits); being a bijection, the mixed value names a block as well as the
/// hash does. A SplitMix64 random stream is `state += 0x9e37_79b9_7f4a_7c15; mix64(state)`:
///
/// ```
/// use prefix_cache::mix64;
///
/// // The first output of SplitMix64 seeded with 0.
/// assert_eq!(mix64(0x9e37_79b9_7f4a_7c15), 0xe220_a839_7b1d_cdaf);
/// assert_eq!(mix64(0), 0); // zero stays zero: not a source of randomness by itself
/// ```
#[inline]
pub fn mix64(hash: u64) -> u64 {
    let mut x = hash ^ (hash >> 30);
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Turns a (model, prompt) pair into its chain of block hashes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockHasher {
    config: BlockHasherConfig,
}

impl BlockHasher {
    /// Creates a hasher with the given block layout.
    pub fn new(config: BlockHasherConfig) -> Self {
        Self { config }
    }

    /// The block layout this hasher uses.
    pub fn config(&self) -> BlockHasherConfig {
        self.config
    }

    /// The seed of the hash chain for `model`: the parent hash of the first block.
    pub fn model_seed(model: &str) -> u64 {
        xxh3_64(model.as_bytes())
    }

    /// Number of hashes [`hash_prompt`](Self::hash_prompt) yields for a prompt of `prompt_len` bytes.
    pub fn block_count(&self, prompt_len: usize) -> usize {
        prompt_len.checked_div(self.config.block_size).unwrap_or(0).min(self.config.max_blocks)
    }

    /// Clears `out` and fills it with the chained hashes of the prompt's whole blocks.
    ///
    /// `out` only allocates when its capacity is below [`block_count`](Self::block_count).
    pub fn hash_prompt(&self, model: &str, prompt: &[u8], out: &mut Vec<u64>) {
        out.clear();
        let blocks = self.block_count(prompt.len());
        if blocks == 0 {
            return;
        }
        out.reserve(blocks);
        let mut parent = Self::model_seed(model);
        for block in prompt.chunks_exact(self.config.block_size).take(blocks) {
            parent = xxh3_64_with_seed(block, parent);
            out.push(parent);
        }
    }
}
