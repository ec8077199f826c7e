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

use serde::Serialize;

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
}

impl ServerProfile {
    /// Names accepted by [`ServerProfile::named`].
    pub const NAMES: &'static [&'static str] = &["h100-llama3-8b", "small-test"];

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
        }
    }

    /// The profile called `name`, if there is one.
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "h100-llama3-8b" => Some(Self::h100_llama3_8b()),
            "small-test" => Some(Self::small_test()),
            _ => None,
        }
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
}
