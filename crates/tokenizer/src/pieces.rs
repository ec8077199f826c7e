//! Tokenizing a rendered conversation piece by piece, with a cache of the pieces.
//!
//! Hugging Face's tokenizer first splits its input at the added tokens (`<|eot_id|>`,
//! `<|im_start|>`, ...) and tokenizes the text between them one piece at a time: normalizer,
//! pre-tokenizer and model never see across an added token (one exception below). A chat template writes such a
//! token between every two messages, so the ids of a conversation are the ids of its pieces
//! in order, and a piece seen before (the system prompt, every earlier turn of a conversation)
//! need not be tokenized again. Splitting here as the tokenizer does (leftmost-longest over the
//! added tokens' contents) gives the same ids by construction, which holds only when every
//! added token is matched on the raw text with no whitespace handling: a tokenizer with any
//! `lstrip`, `rstrip`, `single_word` or `normalized` added token is not split here. The
//! exception: a Metaspace pre-tokenizer with `prepend_scheme: first` marks only the piece at
//! the very start of the input, which a piece tokenized alone always is; so every tokenizer
//! is probed when it loads (text around its added tokens, split and whole), and one whose
//! ids differ is tokenized whole.

use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};
use lru::LruCache;
use parking_lot::Mutex;
use xxhash_rust::xxh3::xxh3_128;

use crate::error::TokenizerError;

/// Pieces shorter than this are tokenized every time: the lookup would cost about as much.
const MIN_CACHED_PIECE_BYTES: usize = 64;

/// The pieces' ids kept, in tokens (4 bytes each): 16 MiB of ids.
pub(crate) const DEFAULT_CACHED_TOKENS: usize = 4 << 20;

/// What one cached piece costs beyond its ids (map slot, list node, shared header), counted
/// against the bound in tokens so that many short pieces cannot outgrow it.
const ENTRY_OVERHEAD_TOKENS: usize = 32;

/// Splits text at added tokens and remembers the ids of recent pieces.
pub(crate) struct PieceEncoder {
    matcher: AhoCorasick,
    /// The id of each of the matcher's patterns.
    ids: Vec<u32>,
    cache: Mutex<PieceCache>,
}

struct PieceCache {
    /// Keyed by the piece's 128-bit hash: the text itself is not kept.
    pieces: LruCache<u128, Arc<[u32]>>,
    tokens: usize,
    capacity_tokens: usize,
}

impl PieceEncoder {
    /// A splitter for `tokenizer`'s added tokens, or none when the tokenizer's own split
    /// cannot be reproduced (see the module's documentation).
    pub(crate) fn new(tokenizer: &tokenizers::Tokenizer, capacity_tokens: usize) -> Option<Self> {
        let mut added: Vec<(String, u32)> = Vec::new();
        for (id, token) in tokenizer.get_added_tokens_decoder() {
            if token.lstrip || token.rstrip || token.single_word || token.normalized {
                return None;
            }
            if token.content.is_empty() {
                return None;
            }
            added.push((token.content, id));
        }
        if added.is_empty() {
            return None;
        }
        added.sort();
        let matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(added.iter().map(|(content, _)| content.as_str()))
            .ok()?;
        let probes: Vec<String> = added
            .iter()
            .take(4)
            .map(|(token, _)| format!("{token}x y{token}\nz{token} w{token}{token}. v"))
            .collect();
        let encoder = Self {
            matcher,
            ids: added.into_iter().map(|(_, id)| id).collect(),
            cache: Mutex::new(PieceCache {
                pieces: LruCache::unbounded(),
                tokens: 0,
                capacity_tokens,
            }),
        };
        encoder.agrees_with(tokenizer, &probes).then_some(encoder)
    }

    /// Whether splitting gives the tokenizer's own ids for every probe.
    fn agrees_with(&self, tokenizer: &tokenizers::Tokenizer, probes: &[String]) -> bool {
        probes.iter().all(|probe| {
            let (mut split, mut whole) = (Vec::new(), Vec::new());
            self.encode(tokenizer, probe, &mut split).is_ok()
                && encode_into(tokenizer, probe, false, &mut whole).is_ok()
                && split == whole
        })
    }

    /// The ids of `text` without the post-processor's special tokens, appended to `out`.
    pub(crate) fn encode(
        &self,
        tokenizer: &tokenizers::Tokenizer,
        text: &str,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        let mut start = 0;
        for found in self.matcher.find_iter(text) {
            self.encode_piece(tokenizer, &text[start..found.start()], out)?;
            out.push(self.ids[found.pattern().as_usize()]);
            start = found.end();
        }
        self.encode_piece(tokenizer, &text[start..], out)
    }

    fn encode_piece(
        &self,
        tokenizer: &tokenizers::Tokenizer,
        piece: &str,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        if piece.is_empty() {
            return Ok(());
        }
        if piece.len() < MIN_CACHED_PIECE_BYTES {
            return encode_into(tokenizer, piece, false, out);
        }
        let key = xxh3_128(piece.as_bytes());
        if let Some(ids) = self.cache.lock().pieces.get(&key).cloned() {
            out.extend_from_slice(&ids);
            return Ok(());
        }
        let before = out.len();
        encode_into(tokenizer, piece, false, out)?;
        if out.len() == before {
            return Ok(());
        }
        let ids: Arc<[u32]> = Arc::from(&out[before..]);
        let mut cache = self.cache.lock();
        if cost(&ids) <= cache.capacity_tokens {
            cache.tokens += cost(&ids);
            if let Some(old) = cache.pieces.put(key, ids) {
                cache.tokens -= cost(&old);
            }
            while cache.tokens > cache.capacity_tokens {
                match cache.pieces.pop_lru() {
                    Some((_, evicted)) => cache.tokens -= cost(&evicted),
                    None => break,
                }
            }
        }
        Ok(())
    }

    /// The pieces and tokens the cache holds.
    #[cfg(test)]
    pub(crate) fn cached(&self) -> (usize, usize) {
        let cache = self.cache.lock();
        (cache.pieces.len(), cache.tokens)
    }
}

/// What a cached piece counts against the bound.
fn cost(ids: &[u32]) -> usize {
    ids.len() + ENTRY_OVERHEAD_TOKENS
}

/// The ids of `text` as one input, with the post-processor's special tokens when
/// `add_special_tokens`, appended to `out`.
pub(crate) fn encode_into(
    tokenizer: &tokenizers::Tokenizer,
    text: &str,
    add_special_tokens: bool,
    out: &mut Vec<u32>,
) -> Result<(), TokenizerError> {
    // encode_fast skips the character offsets, which routing never reads.
    let encoding = tokenizer
        .encode_fast(text, add_special_tokens)
        .map_err(|error| TokenizerError::Encode(error.to_string()))?;
    out.extend_from_slice(encoding.get_ids());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_tokenizer() -> tokenizers::Tokenizer {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/tokenizer.json");
        tokenizers::Tokenizer::from_file(path).unwrap()
    }

    #[test]
    fn the_cache_never_holds_more_tokens_than_its_bound() {
        let tokenizer = fixture_tokenizer();
        let pieces = PieceEncoder::new(&tokenizer, 500).unwrap();
        let mut out = Vec::new();
        for n in 0..300 {
            let text = format!(
                "<|im_start|>user\nQuestion {n}: where do the blocks of this rather long prompt end up going?<|im_end|>"
            );
            out.clear();
            pieces.encode(&tokenizer, &text, &mut out).unwrap();
            let (held, tokens) = pieces.cached();
            assert!(tokens <= 500, "{tokens}");
            assert!(held >= 1);
        }
        // A piece longer than the whole bound is tokenized and not kept.
        let long = "word ".repeat(2_000);
        out.clear();
        pieces.encode(&tokenizer, &long, &mut out).unwrap();
        assert!(out.len() > 500);
        assert!(pieces.cached().1 <= 500);
    }

    #[test]
    fn added_tokens_split_the_text_leftmost_longest() {
        let tokenizer = fixture_tokenizer();
        let pieces = PieceEncoder::new(&tokenizer, 1_000).unwrap();
        let mut split = Vec::new();
        pieces.encode(&tokenizer, "a<s>b</s><|eot_id|><|eot_id|>c", &mut split).unwrap();
        let whole = tokenizer.encode_fast("a<s>b</s><|eot_id|><|eot_id|>c", false).unwrap();
        assert_eq!(split, whole.get_ids());
        let eot = tokenizer.token_to_id("<|eot_id|>").unwrap();
        assert_eq!(split.iter().filter(|&&id| id == eot).count(), 2);
    }
}
