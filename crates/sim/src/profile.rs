//! Performance profiles of simulated model servers.
//!
//! A step of a vLLM-style engine costs
//!
//! ```text
//! step_overhead + prefill_token × (prefill tokens) + decode_seq × (decode sequences)
//!               + context_token × (context tokens read by the decode sequences)
//! ```
//!
//! plus `lora_load` when the step loads an adapter. The linear model is the usual roofline
//! approximation: decode is memory-bound (every step streams the weights once, and each decode
//! sequence streams its own KV cache), prefill is compute-bound (about `2·parameters` FLOPs per
//! token). It ignores attention's quadratic prefill term and kernel-shape effects, which is fine
//! for prompts of a few thousand tokens and batches up to a few hundred sequences.
//!
//! `h100-llama3-8b` (Llama-3-8B, bf16, one H100 SXM 80 GB, vLLM defaults):
//! The numbers come from roofline reasoning and were checked for order of magnitude (not fitted)
//! against public vLLM serving benchmarks of this model on this card, which report inter-token
//! latencies of roughly 7-15 ms at small to moderate batch and prefill rates of tens of
//! thousands of tokens per second:
//! - step overhead 6 ms: the 16 GB of weights at ~3.35 TB/s HBM take ~4.8 ms per step, plus
//!   ~1 ms of scheduling, sampling and launch overhead.
//! - prefill 35 µs/token (~28k tokens/s): 16 GFLOP per token at ~45-50% of the 989 TFLOP/s
//!   bf16 peak, in line with published single-H100 prefill figures of 20-30k tokens/s.
//! - decode 25 µs/sequence: the per-token MLP/projection FLOPs stop hiding behind the weight
//!   read as the batch grows (batch 64 adds ~1.6 ms), plus sampling.
//! - context 20 ns/token: 128 KiB of KV per token (32 layers × 8 KV heads × 128 × 2 × bf16)
//!   read at ~60% of HBM bandwidth is ~65 ns; part of it overlaps the weight read, so 20 ns.
//!   Batch 64 at 1,000 tokens of context: 6 + 1.6 + 1.3 ≈ 9 ms per decode step.
//! - KV capacity 27,000 blocks of 16 tokens (~430k tokens): (80 GB × 0.9 − 16 GB weights −
//!   activations) / 128 KiB per token.
//! - `max_num_batched_tokens` 8192, `max_num_seqs` 256, `max_loras` 4 with a 30 ms load (an
//!   adapter of rank 16 is tens of MB copied from host memory), `max_model_len` 8192.
//! - KV bytes per token 131,072 (128 KiB), what a prefill/decode transfer moves per prompt
//!   token: keys and values (2) × 32 layers × 8 KV heads (grouped-query attention) × head
//!   dimension 128 × 2 bytes (bf16) = 2 · 32 · 8 · 128 · 2 = 131,072 bytes.

use serde::{Deserialize, Serialize};

/// Cost and capacity parameters of one model-server replica.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServerProfile {
    /// The profile's name.
    pub name: String,
    /// Fixed cost of every step, seconds.
    pub step_overhead_s: f64,
    /// Cost per prompt token computed in a step, seconds.
    pub prefill_token_s: f64,
    /// Cost per decode sequence in a step, seconds.
    pub decode_seq_s: f64,
    /// Cost per context token of the decode sequences in a step, seconds.
    pub context_token_s: f64,
    /// Token budget of one step (vLLM `max_num_batched_tokens`).
    pub max_batched_tokens: u32,
    /// Most sequences running at once (vLLM `max_num_seqs`).
    pub max_running: u32,
    /// KV-cache capacity in blocks of 16 tokens.
    pub kv_blocks: u32,
    /// LoRA adapters resident at once (vLLM `max_loras`).
    pub max_loras: u32,
    /// Cost of loading an adapter, added to the step that loads it, seconds.
    pub lora_load_s: f64,
    /// Longest prompt plus output the server accepts, tokens.
    pub max_model_len: u32,
    /// Bytes of KV cache per token: 2 (keys and values) × layers × KV heads × head dimension ×
    /// bytes per element. What a prefill/decode KV transfer moves per token.
    pub kv_bytes_per_token: u64,
    /// GPUs one server spans (tensor parallelism); already folded into the costs, reported.
    pub tensor_parallelism: u32,
}

/// Why a profile file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The file could not be read.
    #[error("cannot read server profile {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not YAML of the profile's shape (unknown or missing fields, wrong types).
    #[error("server profile {origin} is not valid: {message}")]
    Parse {
        /// The file or built-in profile.
        origin: String,
        /// What the YAML parser said, with the line.
        message: String,
    },
    /// A field out of range.
    #[error("server profile {origin}: '{field}' {requirement}, got {value}")]
    Invalid {
        /// The file or built-in profile.
        origin: String,
        /// The YAML field.
        field: &'static str,
        /// What it must be.
        requirement: &'static str,
        /// What it was.
        value: String,
    },
    /// Not a shipped profile's name nor a `.yaml` file.
    #[error("unknown profile '{0}': expected one of {names}, or a profile file (.yaml)", names = ServerProfile::NAMES.join(", "))]
    Unknown(String),
}

/// A profile as written in YAML, in the units people quote (ms, µs, ns, vLLM's flag names).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ProfileFile {
    name: String,
    #[serde(default = "one")]
    tensor_parallelism: u32,
    step_overhead_ms: f64,
    prefill_token_us: f64,
    decode_seq_us: f64,
    context_token_ns: f64,
    max_num_batched_tokens: u32,
    max_num_seqs: u32,
    kv_blocks: u64,
    #[serde(default = "sixteen")]
    block_size_tokens: u32,
    #[serde(default)]
    max_loras: u32,
    #[serde(default)]
    lora_load_ms: f64,
    max_model_len: u32,
    kv_bytes_per_token: u64,
}

fn one() -> u32 {
    1
}

fn sixteen() -> u32 {
    16
}

/// The shipped profiles: name and YAML text (`crates/sim/profiles/`).
const SHIPPED: &[(&str, &str)] = &[
    ("h100-llama3-8b", include_str!("../profiles/h100-llama3-8b.yaml")),
    ("h100x2-qwen3-32b", include_str!("../profiles/h100x2-qwen3-32b.yaml")),
    ("h100x4-llama3.1-70b", include_str!("../profiles/h100x4-llama3.1-70b.yaml")),
    ("a100-llama2-7b", include_str!("../profiles/a100-llama2-7b.yaml")),
];

impl ServerProfile {
    /// Names accepted by [`ServerProfile::named`].
    pub const NAMES: &'static [&'static str] = &[
        "h100-llama3-8b",
        "h100x2-qwen3-32b",
        "h100x4-llama3.1-70b",
        "a100-llama2-7b",
        "small-test",
    ];

    /// Llama-3-8B on one H100; see the module documentation for where the numbers come from.
    pub fn h100_llama3_8b() -> Self {
        Self {
            name: "h100-llama3-8b".to_owned(),
            step_overhead_s: 0.006,
            prefill_token_s: 35e-6,
            decode_seq_s: 25e-6,
            context_token_s: 20e-9,
            max_batched_tokens: 8192,
            max_running: 256,
            kv_blocks: 27_000,
            max_loras: 4,
            lora_load_s: 0.030,
            max_model_len: 8192,
            kv_bytes_per_token: 2 * 32 * 8 * 128 * 2,
            tensor_parallelism: 1,
        }
    }

    /// A tiny server with round numbers, for tests: 10 ms per step, 1 ms per prompt token,
    /// nothing per decode sequence, 64 KV blocks, 2 adapters costing 50 ms each, 1 MB of KV per
    /// token (so a 1 GB/s link moves a token in 1 ms).
    pub fn small_test() -> Self {
        Self {
            name: "small-test".to_owned(),
            step_overhead_s: 0.010,
            prefill_token_s: 0.001,
            decode_seq_s: 0.0,
            context_token_s: 0.0,
            max_batched_tokens: 512,
            max_running: 8,
            kv_blocks: 64,
            max_loras: 2,
            lora_load_s: 0.050,
            max_model_len: 1024,
            kv_bytes_per_token: 1_000_000,
            tensor_parallelism: 1,
        }
    }

    /// The profile called `name`, if there is one.
    pub fn named(name: &str) -> Option<Self> {
        if name == "small-test" {
            return Some(Self::small_test());
        }
        let (_, yaml) = SHIPPED.iter().find(|(shipped, _)| *shipped == name)?;
        match Self::from_yaml(yaml, name) {
            Ok(profile) => Some(profile),
            Err(error) => unreachable!("the shipped profile {name} is valid: {error}"),
        }
    }

    /// A shipped profile's name, or the path of a profile file (ending in `.yaml` or `.yml`).
    pub fn load(name_or_path: &str) -> Result<Self, ProfileError> {
        if let Some(profile) = Self::named(name_or_path) {
            return Ok(profile);
        }
        if !(name_or_path.ends_with(".yaml") || name_or_path.ends_with(".yml")) {
            return Err(ProfileError::Unknown(name_or_path.to_owned()));
        }
        let text = std::fs::read_to_string(name_or_path)
            .map_err(|source| ProfileError::Read { path: name_or_path.to_owned(), source })?;
        Self::from_yaml(&text, name_or_path)
    }

    /// A profile from YAML (the shape of `crates/sim/profiles/*.yaml`); `origin` names it in
    /// errors. Every cost and capacity is checked: finite, not negative, and the capacities
    /// above zero. A block size other than 16 tokens is converted to 16-token blocks of the
    /// same total capacity, the simulator's cache granularity.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Self, ProfileError> {
        let file: ProfileFile = serde_saphyr::from_str(text).map_err(|error| {
            ProfileError::Parse { origin: origin.to_owned(), message: error.to_string() }
        })?;
        let invalid = |field: &'static str, requirement: &'static str, value: String| {
            ProfileError::Invalid { origin: origin.to_owned(), field, requirement, value }
        };
        let costs = [
            ("stepOverheadMs", file.step_overhead_ms),
            ("prefillTokenUs", file.prefill_token_us),
            ("decodeSeqUs", file.decode_seq_us),
            ("contextTokenNs", file.context_token_ns),
            ("loraLoadMs", file.lora_load_ms),
        ];
        for (field, value) in costs {
            if !(value.is_finite() && value >= 0.0) {
                return Err(invalid(
                    field,
                    "must be a finite number, 0 or more",
                    value.to_string(),
                ));
            }
        }
        if file.prefill_token_us <= 0.0 && file.step_overhead_ms <= 0.0 {
            return Err(invalid(
                "stepOverheadMs",
                "or prefillTokenUs must be above 0 (a step must take time)",
                "0".to_owned(),
            ));
        }
        let counts = [
            ("tensorParallelism", u64::from(file.tensor_parallelism)),
            ("maxNumBatchedTokens", u64::from(file.max_num_batched_tokens)),
            ("maxNumSeqs", u64::from(file.max_num_seqs)),
            ("kvBlocks", file.kv_blocks),
            ("blockSizeTokens", u64::from(file.block_size_tokens)),
            ("maxModelLen", u64::from(file.max_model_len)),
            ("kvBytesPerToken", file.kv_bytes_per_token),
        ];
        for (field, value) in counts {
            if value == 0 {
                return Err(invalid(field, "must be at least 1", value.to_string()));
            }
        }
        let kv_tokens = file.kv_blocks.saturating_mul(u64::from(file.block_size_tokens));
        let kv_blocks = u32::try_from(kv_tokens / 16).map_err(|_| {
            invalid(
                "kvBlocks",
                "is too large (at most 2^32 blocks of 16 tokens)",
                kv_tokens.to_string(),
            )
        })?;
        if kv_blocks == 0 {
            return Err(invalid("kvBlocks", "must hold at least 16 tokens", kv_tokens.to_string()));
        }
        Ok(Self {
            name: file.name,
            step_overhead_s: file.step_overhead_ms * 1e-3,
            prefill_token_s: file.prefill_token_us * 1e-6,
            decode_seq_s: file.decode_seq_us * 1e-6,
            context_token_s: file.context_token_ns * 1e-9,
            max_batched_tokens: file.max_num_batched_tokens,
            max_running: file.max_num_seqs,
            kv_blocks,
            max_loras: file.max_loras,
            lora_load_s: file.lora_load_ms * 1e-3,
            max_model_len: file.max_model_len,
            kv_bytes_per_token: file.kv_bytes_per_token,
            tensor_parallelism: file.tensor_parallelism,
        })
    }

    /// Duration of a step, seconds, without adapter loads.
    pub fn step_time(&self, prefill_tokens: u32, decode_seqs: u32, context_tokens: u64) -> f64 {
        self.step_overhead_s
            + self.prefill_token_s * f64::from(prefill_tokens)
            + self.decode_seq_s * f64::from(decode_seqs)
            + self.context_token_s * context_tokens as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_profile_is_in_the_published_range() {
        let profile = ServerProfile::h100_llama3_8b();
        let decode_step = profile.step_time(0, 64, 64 * 1000);
        assert!((0.008..=0.015).contains(&decode_step), "{decode_step}");
        let prefill_rate = 1.0 / profile.prefill_token_s;
        assert!((10_000.0..=60_000.0).contains(&prefill_rate), "{prefill_rate}");
        assert_eq!(profile.kv_bytes_per_token, 128 * 1024);
        for name in ServerProfile::NAMES {
            assert_eq!(ServerProfile::named(name).map(|p| p.name), Some((*name).to_owned()));
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1.0)
    }

    #[test]
    fn the_shipped_yaml_is_the_built_in_profile() {
        let built_in = ServerProfile::h100_llama3_8b();
        let shipped = ServerProfile::named("h100-llama3-8b").unwrap();
        assert!(close(shipped.step_overhead_s, built_in.step_overhead_s));
        assert!(close(shipped.prefill_token_s, built_in.prefill_token_s));
        assert!(close(shipped.decode_seq_s, built_in.decode_seq_s));
        assert!(close(shipped.context_token_s, built_in.context_token_s));
        assert!(close(shipped.lora_load_s, built_in.lora_load_s));
        let integers = |p: &ServerProfile| {
            (p.max_batched_tokens, p.max_running, p.kv_blocks, p.max_loras, p.max_model_len)
        };
        assert_eq!(integers(&shipped), integers(&built_in));
        assert_eq!(shipped.kv_bytes_per_token, built_in.kv_bytes_per_token);
    }

    #[test]
    fn bigger_models_are_slower_per_token_and_hold_fewer_tokens_per_gpu() {
        let small = ServerProfile::named("h100-llama3-8b").unwrap();
        for name in ["h100x2-qwen3-32b", "h100x4-llama3.1-70b"] {
            let big = ServerProfile::named(name).unwrap();
            assert!(big.step_time(0, 64, 64_000) > small.step_time(0, 64, 64_000), "{name}");
            assert!(big.prefill_token_s > small.prefill_token_s, "{name}");
            let tokens_per_gpu =
                |p: &ServerProfile| u64::from(p.kv_blocks) * 16 / u64::from(p.tensor_parallelism);
            assert!(tokens_per_gpu(&big) < tokens_per_gpu(&small), "{name}");
            assert!(big.tensor_parallelism > 1);
        }
        let a100 = ServerProfile::named("a100-llama2-7b").unwrap();
        assert_eq!(a100.max_model_len, 4096);
        assert_eq!(a100.kv_bytes_per_token, 2 * 32 * 32 * 128 * 2, "no grouped-query attention");
    }

    #[test]
    fn profile_files_are_validated_with_errors_that_name_the_field() {
        let valid = include_str!("../profiles/h100-llama3-8b.yaml");
        let refused = |text: String, expected: &str| {
            let error = ServerProfile::from_yaml(&text, "mine.yaml").unwrap_err().to_string();
            assert!(error.contains(expected) && error.contains("mine.yaml"), "{error}");
        };
        refused(valid.replace("maxNumSeqs: 256", "maxNumSeqs: 0"), "maxNumSeqs");
        refused(valid.replace("prefillTokenUs: 35", "prefillTokenUs: -35"), "prefillTokenUs");
        refused(valid.replace("kvBlocks: 27000", "kvBlocks: 27000\ncolour: blue"), "colour");
        refused(valid.replace("maxModelLen: 8192\n", ""), "maxModelLen");
        refused(valid.replace("stepOverheadMs: 6", "stepOverheadMs: .nan"), "stepOverheadMs");
        // Block size is converted to the simulator's 16-token blocks, capacity kept.
        let bigger = valid.replace("blockSizeTokens: 16", "blockSizeTokens: 32");
        let profile = ServerProfile::from_yaml(&bigger, "mine.yaml").unwrap();
        assert_eq!(profile.kv_blocks, 54_000);
        let error = ServerProfile::load("no-such-profile").unwrap_err().to_string();
        assert!(error.contains("no-such-profile") && error.contains("a100-llama2-7b"), "{error}");
        let error = ServerProfile::load("/nonexistent/p.yaml").unwrap_err().to_string();
        assert!(error.contains("/nonexistent/p.yaml"), "{error}");
    }
}
