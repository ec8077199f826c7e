//! Block keys computed from token ids, bit for bit as llm-d computes them.
//!
//! # Algorithm (llm-d-router `pkg/kvcache/kvblock/token_processor.go`, `chunkedTokenDatabase`)
//! The tokens are cut into whole blocks of `blockSizeTokens` (a trailing partial block gets no
//! key). Keys form a chain: `key[i] = H(key[i-1], block_i, extra_i)`, so a key stands for the
//! whole prefix that ends with its block. The chain starts from the model's root
//! `key[-1] = H(init, none, model)`, where `init` hashes `hashSeed` alone and `model` is the
//! LoRA adapter's name when the blocks were computed with one, the base model's name otherwise
//! (llm-d's `effectiveModelName`). A stored block whose parent is known continues the chain
//! from the parent's key instead.
//!
//! `H` is one of llm-d's two `hashAlgorithm`s:
//! * **`cbor-fnv`** (the default): 64-bit FNV-1a over the canonical CBOR encoding of the
//!   three-element array `[parent, tokens, extra]`: `parent` an unsigned integer, `tokens` an
//!   array of unsigned integers (CBOR `null` for the root, Go encoding a nil slice as null),
//!   `extra` the model name (a text string) for the root, `null` for a block without extra
//!   keys, or an array of one-entry maps `{"Hash": id}` for a block with multimodal
//!   identifiers. `init` is FNV-1a of the seed's bytes.
//! * **`xxh64`**: one XXH64 (seed 0) over `parent` as 8 little-endian bytes, each token as 4
//!   little-endian bytes, then each extra string (the model name for the root) preceded by its
//!   length as 8 little-endian bytes. `init` is XXH64 of the seed's bytes.
//!
//! Both stream their input into the hash: no buffer, no allocation per block.
//!
//! # Bounds
//! Work is linear in the number of tokens; [`TokenProcessor::request_keys`] writes into a
//! caller-provided vector and stops after `max_blocks` keys.

use xxhash_rust::xxh64::Xxh64;

/// vLLM's and llm-d's default block size in tokens.
pub const DEFAULT_BLOCK_SIZE_TOKENS: u32 = 16;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The hash that chains block keys (llm-d's `hashAlgorithm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HashAlgorithm {
    /// `cbor-fnv`: FNV-1a over canonical CBOR `[parent, tokens, extra]` (llm-d's default).
    #[default]
    CborFnv,
    /// `xxh64`: XXH64 over little-endian parent, tokens and length-prefixed extras.
    Xxh64,
}

impl HashAlgorithm {
    /// Parses llm-d's name for it (`""` or `"cbor-fnv"`, `"xxh64"`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "" | "cbor-fnv" => Some(Self::CborFnv),
            "xxh64" => Some(Self::Xxh64),
            _ => None,
        }
    }
}

/// How token ids become block keys (llm-d's `tokenProcessorConfig`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenProcessorConfig {
    /// Tokens per block (`blockSizeTokens`, or the deprecated `blockSize`). Must match the
    /// engines' `--block-size` for their events to be indexed.
    pub block_size_tokens: u32,
    /// `hashSeed`: must equal the engines' `PYTHONHASHSEED` deployment-wide.
    pub hash_seed: String,
    /// `hashAlgorithm`.
    pub algorithm: HashAlgorithm,
}

impl Default for TokenProcessorConfig {
    fn default() -> Self {
        Self {
            block_size_tokens: DEFAULT_BLOCK_SIZE_TOKENS,
            hash_seed: String::new(),
            algorithm: HashAlgorithm::CborFnv,
        }
    }
}

/// Computes llm-d block keys. Cheap to clone; immutable.
#[derive(Debug, Clone)]
pub struct TokenProcessor {
    block_size: usize,
    algorithm: HashAlgorithm,
    init: u64,
}

/// Feeds FNV-1a byte by byte.
struct Fnv(u64);

impl Fnv {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(FNV_PRIME);
        }
    }

    /// A CBOR head (major type in the top three bits) with the shortest argument encoding.
    #[inline]
    fn head(&mut self, major: u8, arg: u64) {
        let m = major << 5;
        if arg < 24 {
            self.write(&[m | arg as u8]);
        } else if arg <= 0xff {
            self.write(&[m | 24, arg as u8]);
        } else if arg <= 0xffff {
            self.write(&[m | 25]);
            self.write(&(arg as u16).to_be_bytes());
        } else if arg <= 0xffff_ffff {
            self.write(&[m | 26]);
            self.write(&(arg as u32).to_be_bytes());
        } else {
            self.write(&[m | 27]);
            self.write(&arg.to_be_bytes());
        }
    }

    #[inline]
    fn text(&mut self, s: &str) {
        self.head(3, s.len() as u64);
        self.write(s.as_bytes());
    }
}

const CBOR_NULL: u8 = 0xf6;

impl TokenProcessor {
    /// A processor for `config`; a block size of 0 takes the default (16), as llm-d does.
    pub fn new(config: &TokenProcessorConfig) -> Self {
        let block_size = match config.block_size_tokens {
            0 => DEFAULT_BLOCK_SIZE_TOKENS,
            n => n,
        } as usize;
        let init = match config.algorithm {
            HashAlgorithm::CborFnv => {
                let mut h = Fnv(FNV_OFFSET);
                h.write(config.hash_seed.as_bytes());
                h.0
            }
            HashAlgorithm::Xxh64 => xxhash_rust::xxh64::xxh64(config.hash_seed.as_bytes(), 0),
        };
        Self { block_size, algorithm: config.algorithm, init }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The chain's start for a model (or LoRA adapter) name: the parent of its first block.
    pub fn root(&self, model: &str) -> u64 {
        match self.algorithm {
            HashAlgorithm::CborFnv => {
                let mut h = Fnv(FNV_OFFSET);
                h.head(4, 3);
                h.head(0, self.init);
                h.write(&[CBOR_NULL]);
                h.text(model);
                h.0
            }
            HashAlgorithm::Xxh64 => {
                let mut h = Xxh64::new(0);
                h.update(&self.init.to_le_bytes());
                h.update(&(model.len() as u64).to_le_bytes());
                h.update(model.as_bytes());
                h.digest()
            }
        }
    }

    /// The key of one block given its parent's key and its extra identifiers (multimodal
    /// hashes; empty for a text block).
    pub fn block_key<S: AsRef<str>>(&self, parent: u64, tokens: &[u32], extra: &[S]) -> u64 {
        match self.algorithm {
            HashAlgorithm::CborFnv => {
                let mut h = Fnv(FNV_OFFSET);
                h.head(4, 3);
                h.head(0, parent);
                h.head(4, tokens.len() as u64);
                for &t in tokens {
                    h.head(0, u64::from(t));
                }
                if extra.is_empty() {
                    h.write(&[CBOR_NULL]);
                } else {
                    h.head(4, extra.len() as u64);
                    for id in extra {
                        h.head(5, 1);
                        h.text("Hash");
                        h.text(id.as_ref());
                    }
                }
                h.0
            }
            HashAlgorithm::Xxh64 => {
                let mut h = Xxh64::new(0);
                h.update(&parent.to_le_bytes());
                let mut buf = [0u8; 256];
                for chunk in tokens.chunks(64) {
                    for (i, &t) in chunk.iter().enumerate() {
                        buf[i * 4..i * 4 + 4].copy_from_slice(&t.to_le_bytes());
                    }
                    h.update(&buf[..chunk.len() * 4]);
                }
                for id in extra {
                    let id = id.as_ref();
                    h.update(&(id.len() as u64).to_le_bytes());
                    h.update(id.as_bytes());
                }
                h.digest()
            }
        }
    }

    /// Clears `out` and fills it with the keys of the whole blocks of a request's tokens for
    /// `model`, at most `max_blocks` of them. Text only: a request's multimodal identifiers
    /// are not known without a tokenizer.
    pub fn request_keys(&self, model: &str, tokens: &[u32], max_blocks: usize, out: &mut Vec<u64>) {
        out.clear();
        let blocks = (tokens.len() / self.block_size).min(max_blocks);
        if blocks == 0 {
            return;
        }
        out.reserve(blocks);
        let mut parent = self.root(model);
        for chunk in tokens.chunks_exact(self.block_size).take(blocks) {
            parent = self.block_key::<&str>(parent, chunk, &[]);
            out.push(parent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FNV-1a of a CBOR document written out by hand.
    fn fnv(bytes: &[u8]) -> u64 {
        let mut h = Fnv(FNV_OFFSET);
        h.write(bytes);
        h.0
    }

    #[test]
    fn fnv1a_matches_published_vectors() {
        // FNV-1a 64 test vectors (Fowler, Noll, Vo; draft-eastlake-fnv).
        assert_eq!(fnv(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn cbor_root_and_block_bytes_are_canonical() {
        let p = TokenProcessor::new(&TokenProcessorConfig::default());
        let init = fnv(b"");
        // [init (uint64, 0x1b + 8 bytes), null, "m"]
        let mut doc = vec![0x83, 0x1b];
        doc.extend_from_slice(&init.to_be_bytes());
        doc.extend_from_slice(&[0xf6, 0x61, b'm']);
        assert_eq!(p.root("m"), fnv(&doc));
        // [5, [1, 24, 256], null]: shortest heads for each integer size.
        let doc = [0x83, 0x05, 0x83, 0x01, 0x18, 24, 0x19, 0x01, 0x00, 0xf6];
        assert_eq!(p.block_key::<&str>(5, &[1, 24, 256], &[]), fnv(&doc));
        // [0, [], [{"Hash": "x"}]]
        let doc = [0x83, 0x00, 0x80, 0x81, 0xa1, 0x64, b'H', b'a', b's', b'h', 0x61, b'x'];
        assert_eq!(p.block_key(0, &[], &["x"]), fnv(&doc));
    }

    #[test]
    fn xxh64_layout_is_little_endian_and_length_prefixed() {
        let cfg = TokenProcessorConfig {
            hash_seed: "s".into(),
            algorithm: HashAlgorithm::Xxh64,
            ..TokenProcessorConfig::default()
        };
        let p = TokenProcessor::new(&cfg);
        let init = xxhash_rust::xxh64::xxh64(b"s", 0);
        let mut bytes = init.to_le_bytes().to_vec();
        bytes.extend_from_slice(&2u64.to_le_bytes());
        bytes.extend_from_slice(b"md");
        assert_eq!(p.root("md"), xxhash_rust::xxh64::xxh64(&bytes, 0));
        let tokens: Vec<u32> = (0..100).collect();
        let mut bytes = 7u64.to_le_bytes().to_vec();
        for t in &tokens {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        assert_eq!(p.block_key::<&str>(7, &tokens, &[]), xxhash_rust::xxh64::xxh64(&bytes, 0));
    }

    #[test]
    fn chain_depends_on_seed_model_and_every_earlier_block() {
        let p = TokenProcessor::new(&TokenProcessorConfig {
            block_size_tokens: 2,
            ..Default::default()
        });
        let seeded = TokenProcessor::new(&TokenProcessorConfig {
            block_size_tokens: 2,
            hash_seed: "42".into(),
            ..Default::default()
        });
        let (mut a, mut b) = (Vec::new(), Vec::new());
        p.request_keys("m", &[1, 2, 3, 4, 5], 10, &mut a);
        assert_eq!(a.len(), 2, "the partial third block has no key");
        p.request_keys("m", &[9, 2, 3, 4], 10, &mut b);
        assert_ne!(a[1], b[1], "a change in block 0 changes block 1's key");
        p.request_keys("lora-a", &[1, 2, 3, 4], 10, &mut b);
        assert_ne!(a[0], b[0]);
        seeded.request_keys("m", &[1, 2, 3, 4], 10, &mut b);
        assert_ne!(a[0], b[0]);
        p.request_keys("m", &[1, 2, 3, 4], 1, &mut b);
        assert_eq!(b, a[..1]);
        // Continuing from a parent gives the same keys as hashing from the root.
        assert_eq!(p.block_key::<&str>(a[0], &[3, 4], &[]), a[1]);
    }
}
