//! Prompt block hashing, shared by the simulated servers' prefix caches and the oracle.
//!
//! Text is cut into 64-byte blocks (about 16 tokens at 4 characters per token, the block size
//! GIE's `prefix-cache-scorer` assumes for untokenized prompts). Each full block's hash is xxh3
//! of the block seeded with the previous block's hash, and the first block is seeded with a hash
//! of the model name, so a hash identifies the whole prefix up to its block for one model (as
//! vLLM's block hashes do, and as the EPP's approximate prefix index does). A trailing partial
//! block is never hashed.
//!
//! This is the scheme of [`prefix_cache::BlockHasher`] (the EPP's prefix index) without its cap
//! on the number of blocks, since a server caches every block of a long prompt, and with
//! incremental extension for conversations; a test pins the two to the same hashes.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Characters (bytes) per hashed block.
pub const BLOCK_CHARS: usize = 64;
/// Tokens per KV-cache block, as in vLLM's default `--block-size 16`.
pub const BLOCK_TOKENS: u32 = 16;
/// Characters per token: the approximation used throughout (and by GIE for untokenized text).
pub const CHARS_PER_TOKEN: usize = 4;

/// The hash chain's root for `model`.
pub fn model_seed(model: &str) -> u64 {
    prefix_cache::BlockHasher::model_seed(model)
}

/// Extends `hashes`, which holds the chained hashes of the first `hashes.len()` full blocks of
/// `text`, with the hashes of the remaining full blocks.
///
/// Lets a conversation hash only the text a new turn appends.
pub fn extend_block_hashes(seed: u64, text: &str, hashes: &mut Vec<u64>) {
    let start = hashes.len() * BLOCK_CHARS;
    let Some(rest) = text.as_bytes().get(start..) else { return };
    let mut parent = hashes.last().copied().unwrap_or(seed);
    for block in rest.chunks_exact(BLOCK_CHARS) {
        parent = xxh3_64_with_seed(block, parent);
        hashes.push(parent);
    }
}

/// The chained hashes of every full block of `text` for `model`.
pub fn block_hashes(model: &str, text: &str) -> Vec<u64> {
    let mut hashes = Vec::with_capacity(text.len() / BLOCK_CHARS);
    extend_block_hashes(model_seed(model), text, &mut hashes);
    hashes
}

/// Tokens in `chars` characters of text (at least one).
pub fn tokens_for_chars(chars: usize) -> u32 {
    u32::try_from(chars.div_ceil(CHARS_PER_TOKEN).max(1)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefixes_share_hashes_and_models_do_not() {
        let base = "x".repeat(200);
        let longer = format!("{base}{}", "y".repeat(100));
        let a = block_hashes("m", &base);
        let b = block_hashes("m", &longer);
        assert_eq!(a.len(), 3);
        assert_eq!(b.len(), 4);
        assert_eq!(a[..], b[..3]);
        assert_ne!(block_hashes("other", &base), a);
        let mut extended = a.clone();
        extend_block_hashes(model_seed("m"), &longer, &mut extended);
        assert_eq!(extended, b);
    }

    #[test]
    fn hashes_match_the_epp_prefix_index() {
        let text: String = (0..1000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
        let hasher = prefix_cache::BlockHasher::new(prefix_cache::BlockHasherConfig {
            block_size: BLOCK_CHARS,
            max_blocks: 1024,
        });
        let mut expected = Vec::new();
        hasher.hash_prompt("llama", text.as_bytes(), &mut expected);
        assert_eq!(block_hashes("llama", &text), expected);
    }

    #[test]
    fn token_counts_round_up() {
        assert_eq!(tokens_for_chars(0), 1);
        assert_eq!(tokens_for_chars(4), 1);
        assert_eq!(tokens_for_chars(5), 2);
    }
}
