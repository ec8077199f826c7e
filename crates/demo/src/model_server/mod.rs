//! A simulated vLLM-like model server: the OpenAI completions and chat completions APIs
//! (streamed as SSE or as one JSON body) and vLLM's `/metrics`, on a loopback port.
//!
//! Why simulate: the demo must show routing quality on a laptop in seconds, so the server keeps
//! the few mechanisms a picker reacts to and fakes the rest.
//! * A bounded number of running slots (a FIFO semaphore); requests beyond them wait in a queue.
//! * A KV cache of `kv_blocks` blocks with an LRU prefix cache over 64-character prompt blocks,
//!   hashed with [`prefix_cache::BlockHasher`] over the prompt as the picker flattens it, so a
//!   hit is a real hit and the picker's prefix index is judged against real residency.
//! * Time to first token grows with the prompt blocks that missed the cache; decoding costs a
//!   fixed delay per output token (slept in groups of tokens: timer resolution is ~1 ms).
//! * LoRA adapters: at most `max_lora` resident; serving a non-resident one costs a load delay.
//! * Prefill/decode disaggregation as vLLM's KV connectors do it, driven by the request's
//!   `kv_transfer_params` ([`KvTransfer`]): a prefill-only request answers with the handle of its
//!   KV blocks, and a request carrying such a handle pulls the blocks at `kv_transfer_per_block`
//!   instead of computing them.
//! * Optionally (`prefill_stalls_decode`) one GPU's worth of compute: prefills run one at a time
//!   and the server's decodes wait while one runs, as vLLM schedules waiting prefills ahead of
//!   running decodes. This interference is what disaggregation removes.
//!
//! KV usage reports the blocks pinned by running requests over the capacity, as vLLM's
//! `vllm:kv_cache_usage_perc` does; the prefix cache counters are in blocks.
//!
//! [`ModelServer`] is the logic (admission, prefix cache, adapters, metrics text);
//! [`RunningModelServer`] serves it over HTTP/1.1 on loopback; [`PrefixLru`] is its
//! prefix cache.

mod http;
mod prefix_lru;

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use prefix_cache::{BlockHasher, BlockHasherConfig};
use scheduler_core::ParsedBody;
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use http::{Body, RunningModelServer};
pub use prefix_lru::PrefixLru;

/// Characters per prompt block, as the picker's prefix scorer cuts prompts by default.
pub const BLOCK_CHARS: usize = 64;
/// Characters per token when counting prompt tokens (no tokenizer here).
const CHARS_PER_TOKEN: usize = 4;
/// Tokens per KV block (64 characters at 4 characters a token).
const TOKENS_PER_BLOCK: usize = BLOCK_CHARS / CHARS_PER_TOKEN;
/// Output tokens when the request names no `max_tokens`.
const DEFAULT_MAX_TOKENS: u32 = 16;
/// Output tokens above this are cut, so a bad request cannot hold a slot for long.
const MAX_OUTPUT_TOKENS: u32 = 4096;
/// Largest request body read.
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// The simulated hardware and its speed.
#[derive(Clone, Debug)]
pub struct ModelServerConfig {
    /// Name of the base model; any other `model` names a LoRA adapter.
    pub base_model: String,
    /// Requests decoded at once; more wait.
    pub max_running: usize,
    /// KV cache capacity in blocks of 64 characters.
    pub kv_blocks: usize,
    /// Prefill time per prompt block that missed the prefix cache.
    pub prefill_per_block: Duration,
    /// Decode time per output token.
    pub decode_per_token: Duration,
    /// Output tokens per streamed chunk (and per sleep).
    pub tokens_per_chunk: u32,
    /// LoRA adapters resident at once.
    pub max_lora: usize,
    /// Time to load a LoRA adapter that is not resident.
    pub lora_load: Duration,
    /// Time to pull one prompt block computed by another server (a prefill server's KV).
    pub kv_transfer_per_block: Duration,
    /// Prefills share one compute engine and stall this server's decodes while they run.
    pub prefill_stalls_decode: bool,
}

impl Default for ModelServerConfig {
    fn default() -> Self {
        Self {
            base_model: "llama-3-8b".into(),
            max_running: 4,
            kv_blocks: 512,
            prefill_per_block: Duration::from_micros(200),
            decode_per_token: Duration::from_micros(500),
            tokens_per_chunk: 8,
            max_lora: 2,
            lora_load: Duration::from_millis(15),
            kv_transfer_per_block: Duration::from_micros(20),
            prefill_stalls_decode: false,
        }
    }
}

/// Counters and gauges of a server at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelServerStats {
    /// Requests decoding.
    pub running: u32,
    /// Requests waiting for a slot.
    pub waiting: u32,
    /// KV blocks pinned by running requests over the capacity.
    pub kv_usage: f64,
    /// Prompt blocks found in the prefix cache, since start.
    pub prefix_hits: u64,
    /// Prompt blocks looked up in the prefix cache, since start.
    pub prefix_queries: u64,
    /// Requests completed or cancelled after starting, since start.
    pub served: u64,
    /// Adapters of running requests.
    pub running_adapters: Vec<String>,
    /// Adapters of waiting requests.
    pub waiting_adapters: Vec<String>,
    /// Prefill-only requests served for a decode server elsewhere, since start.
    pub prefills_for_remote_decode: u64,
    /// Prompt blocks pulled from another server's prefill, since start.
    pub pulled_blocks: u64,
}

#[derive(Debug)]
struct State {
    cache: PrefixLru,
    running: u32,
    waiting: u32,
    pinned_blocks: usize,
    running_adapters: BTreeMap<String, u32>,
    waiting_adapters: BTreeMap<String, u32>,
    /// Resident adapters, least recently used first.
    resident_adapters: VecDeque<String>,
    prefix_hits: u64,
    prefix_queries: u64,
    served: u64,
    prefills_for_remote_decode: u64,
    pulled_blocks: u64,
}

fn count_up(counts: &mut BTreeMap<String, u32>, key: &str) {
    *counts.entry(key.to_owned()).or_default() += 1;
}

fn count_down(counts: &mut BTreeMap<String, u32>, key: &str) {
    if let Some(count) = counts.get_mut(key) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            counts.remove(key);
        }
    }
}

/// The server's logic, independent of HTTP.
#[derive(Debug)]
pub struct ModelServer {
    config: ModelServerConfig,
    hasher: BlockHasher,
    slots: Arc<Semaphore>,
    state: Mutex<State>,
    /// The compute engine prefills take turns on (fair: first come, first served); decodes
    /// wait on it too when `prefill_stalls_decode` is set.
    compute: tokio::sync::Mutex<()>,
}

/// The request's part in prefill/decode disaggregation: vLLM's `kv_transfer_params`, as llm-d's
/// decode-side sidecar sets them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvTransfer {
    /// Plain serving: compute whatever the prefix cache lacks.
    #[default]
    None,
    /// `do_remote_decode`: prefill only; a decode server will pull the KV blocks. The response
    /// carries their handle in its own `kv_transfer_params`.
    PrefillForRemoteDecode,
    /// `do_remote_prefill`: another server computed the prompt; pull up to `blocks` of its
    /// blocks (those the local prefix cache lacks) instead of computing them.
    PullFromRemote {
        /// Prompt blocks the remote prefill holds (`remote_block_ids`).
        blocks: usize,
    },
}

#[derive(Deserialize)]
struct KvTransferParams {
    #[serde(default)]
    do_remote_decode: Option<bool>,
    #[serde(default)]
    do_remote_prefill: Option<bool>,
    #[serde(default)]
    remote_block_ids: Option<Vec<serde_json::Value>>,
}

impl KvTransfer {
    fn from_params(params: Option<KvTransferParams>) -> Self {
        let Some(params) = params else { return Self::None };
        if params.do_remote_prefill == Some(true) {
            let blocks = params.remote_block_ids.map_or(0, |ids| ids.len());
            Self::PullFromRemote { blocks }
        } else if params.do_remote_decode == Some(true) {
            Self::PrefillForRemoteDecode
        } else {
            Self::None
        }
    }
}

/// What a request asks of the server, parsed from its body.
#[derive(Clone, Debug)]
pub struct Job {
    /// The `model` field: the base model or an adapter.
    pub model: String,
    /// The prompt as the picker flattens it.
    pub prompt: String,
    /// Whether to stream SSE chunks.
    pub stream: bool,
    /// Chat (`/v1/chat/completions`) rather than completions.
    pub chat: bool,
    /// Output tokens to produce.
    pub max_tokens: u32,
    /// Its part in prefill/decode disaggregation.
    pub kv_transfer: KvTransfer,
}

#[derive(Deserialize)]
struct Limits {
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    kv_transfer_params: Option<KvTransferParams>,
}

impl Job {
    /// Parses an OpenAI request body sent to `path`.
    pub fn parse(path: &str, body: &[u8]) -> Result<Self, String> {
        let parsed = ParsedBody::parse(Some(path), body).map_err(|error| error.to_string())?;
        let limits: Limits = serde_json::from_slice(body).map_err(|error| error.to_string())?;
        let max_tokens = limits
            .max_completion_tokens
            .or(limits.max_tokens)
            .unwrap_or(DEFAULT_MAX_TOKENS)
            .clamp(1, MAX_OUTPUT_TOKENS);
        Ok(Self {
            model: parsed.model,
            prompt: parsed.prompt,
            stream: parsed.stream,
            chat: path.ends_with("/chat/completions"),
            max_tokens,
            kv_transfer: KvTransfer::from_params(limits.kv_transfer_params),
        })
    }
}

/// A request holding a running slot; dropping it frees the slot and its KV blocks, also when
/// the client goes away mid-stream.
#[derive(Debug)]
pub struct RunningJob {
    server: Arc<ModelServer>,
    _permit: OwnedSemaphorePermit,
    adapter: Option<String>,
    pinned_blocks: usize,
    /// Time before the first token: uncached prefill, pulled blocks and any adapter load.
    pub first_token_delay: Duration,
    /// The part of `first_token_delay` spent computing the prompt.
    pub prefill_compute: Duration,
    /// Prompt blocks found in the cache.
    pub hit_blocks: usize,
    /// Blocks in the prompt.
    pub prompt_blocks: usize,
}

impl Drop for RunningJob {
    fn drop(&mut self) {
        let mut state = self.server.state.lock();
        state.running = state.running.saturating_sub(1);
        state.pinned_blocks = state.pinned_blocks.saturating_sub(self.pinned_blocks);
        state.served += 1;
        if let Some(adapter) = &self.adapter {
            count_down(&mut state.running_adapters, adapter);
        }
    }
}

/// Undoes the waiting count if the request is cancelled while queued.
struct Queued<'a> {
    server: &'a ModelServer,
    adapter: Option<&'a str>,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let mut state = self.server.state.lock();
        state.waiting = state.waiting.saturating_sub(1);
        if let Some(adapter) = self.adapter {
            count_down(&mut state.waiting_adapters, adapter);
        }
    }
}

impl ModelServer {
    /// A server with `config`, idle and with an empty cache.
    pub fn new(config: ModelServerConfig) -> Arc<Self> {
        let hasher = BlockHasher::new(BlockHasherConfig {
            block_size: BLOCK_CHARS,
            max_blocks: config.kv_blocks.max(1),
        });
        let state = State {
            cache: PrefixLru::new(config.kv_blocks),
            running: 0,
            waiting: 0,
            pinned_blocks: 0,
            running_adapters: BTreeMap::new(),
            waiting_adapters: BTreeMap::new(),
            resident_adapters: VecDeque::new(),
            prefix_hits: 0,
            prefix_queries: 0,
            served: 0,
            prefills_for_remote_decode: 0,
            pulled_blocks: 0,
        };
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(config.max_running.max(1))),
            config,
            hasher,
            state: Mutex::new(state),
            compute: tokio::sync::Mutex::new(()),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelServerConfig {
        &self.config
    }

    /// Waits for a running slot, then looks the prompt up in the prefix cache and loads the
    /// adapter if needed. `None` only if the server is shutting down.
    pub async fn admit(self: &Arc<Self>, job: &Job) -> Option<RunningJob> {
        let adapter = (job.model != self.config.base_model).then_some(job.model.as_str());
        {
            let mut state = self.state.lock();
            state.waiting += 1;
            if let Some(adapter) = adapter {
                count_up(&mut state.waiting_adapters, adapter);
            }
        }
        let queued = Queued { server: self, adapter };
        let permit = Arc::clone(&self.slots).acquire_owned().await.ok()?;
        drop(queued);

        let mut blocks = Vec::new();
        self.hasher.hash_prompt(&job.model, job.prompt.as_bytes(), &mut blocks);
        let output_blocks = (job.max_tokens as usize).div_ceil(TOKENS_PER_BLOCK);
        let mut state = self.state.lock();
        let hits = state.cache.lookup_and_insert(&blocks);
        state.prefix_hits += hits as u64;
        state.prefix_queries += blocks.len() as u64;
        state.running += 1;
        let pinned_blocks = blocks.len() + output_blocks;
        state.pinned_blocks += pinned_blocks;
        let missed = blocks.len() - hits;
        let pulled = match job.kv_transfer {
            KvTransfer::PullFromRemote { blocks: remote } => missed.min(remote),
            KvTransfer::None | KvTransfer::PrefillForRemoteDecode => 0,
        };
        if job.kv_transfer == KvTransfer::PrefillForRemoteDecode {
            state.prefills_for_remote_decode += 1;
        }
        state.pulled_blocks += pulled as u64;
        let prefill_compute = self.config.prefill_per_block * (missed - pulled) as u32;
        let mut first_token_delay =
            prefill_compute + self.config.kv_transfer_per_block * pulled as u32;
        if let Some(adapter) = adapter {
            count_up(&mut state.running_adapters, adapter);
            let resident = &mut state.resident_adapters;
            match resident.iter().position(|name| name == adapter) {
                Some(at) => {
                    if let Some(name) = resident.remove(at) {
                        resident.push_back(name);
                    }
                }
                None => {
                    first_token_delay += self.config.lora_load;
                    resident.push_back(adapter.to_owned());
                    while resident.len() > self.config.max_lora.max(1) {
                        resident.pop_front();
                    }
                }
            }
        }
        drop(state);
        Some(RunningJob {
            server: Arc::clone(self),
            _permit: permit,
            adapter: adapter.map(str::to_owned),
            pinned_blocks,
            first_token_delay,
            prefill_compute,
            hit_blocks: hits,
            prompt_blocks: blocks.len(),
        })
    }

    /// Waits out the time before `running`'s first token. With `prefill_stalls_decode`, the
    /// prefill takes its turn on the compute engine and holds it while it runs.
    pub async fn until_first_token(&self, running: &RunningJob) {
        if !self.config.prefill_stalls_decode || running.prefill_compute.is_zero() {
            tokio::time::sleep(running.first_token_delay).await;
            return;
        }
        tokio::time::sleep(running.first_token_delay.saturating_sub(running.prefill_compute)).await;
        let _engine = self.compute.lock().await;
        tokio::time::sleep(running.prefill_compute).await;
    }

    /// Produces `tokens` output tokens of a running request. With `prefill_stalls_decode`, a
    /// decode step first waits for the prefills ahead of it.
    pub async fn decode(&self, tokens: u32) {
        if self.config.prefill_stalls_decode {
            drop(self.compute.lock().await);
        }
        tokio::time::sleep(self.config.decode_per_token * tokens).await;
    }

    /// The current gauges and counters.
    pub fn stats(&self) -> ModelServerStats {
        let state = self.state.lock();
        ModelServerStats {
            running: state.running,
            waiting: state.waiting,
            kv_usage: (state.pinned_blocks as f64 / self.config.kv_blocks.max(1) as f64).min(1.0),
            prefix_hits: state.prefix_hits,
            prefix_queries: state.prefix_queries,
            served: state.served,
            running_adapters: state.running_adapters.keys().cloned().collect(),
            waiting_adapters: state.waiting_adapters.keys().cloned().collect(),
            prefills_for_remote_decode: state.prefills_for_remote_decode,
            pulled_blocks: state.pulled_blocks,
        }
    }

    /// The `/metrics` text in vLLM's names.
    pub fn metrics_text(&self) -> String {
        let stats = self.stats();
        let model = &self.config.base_model;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let mut text = String::with_capacity(1024);
        let _ = write!(
            text,
            "# TYPE vllm:num_requests_running gauge\n\
             vllm:num_requests_running{{model_name=\"{model}\"}} {running}\n\
             # TYPE vllm:num_requests_waiting gauge\n\
             vllm:num_requests_waiting{{model_name=\"{model}\"}} {waiting}\n\
             # TYPE vllm:kv_cache_usage_perc gauge\n\
             vllm:kv_cache_usage_perc{{model_name=\"{model}\"}} {kv}\n\
             # TYPE vllm:lora_requests_info gauge\n\
             vllm:lora_requests_info{{max_lora=\"{max_lora}\",running_lora_adapters=\"{running_lora}\",waiting_lora_adapters=\"{waiting_lora}\"}} {now}\n\
             # TYPE vllm:prefix_cache_queries counter\n\
             vllm:prefix_cache_queries_total{{model_name=\"{model}\"}} {queries}\n\
             # TYPE vllm:prefix_cache_hits counter\n\
             vllm:prefix_cache_hits_total{{model_name=\"{model}\"}} {hits}\n\
             # TYPE vllm:cache_config_info gauge\n\
             vllm:cache_config_info{{block_size=\"{TOKENS_PER_BLOCK}\",num_gpu_blocks=\"{blocks}\"}} 1\n",
            running = stats.running,
            waiting = stats.waiting,
            kv = stats.kv_usage,
            max_lora = self.config.max_lora,
            running_lora = stats.running_adapters.join(","),
            waiting_lora = stats.waiting_adapters.join(","),
            queries = stats.prefix_queries,
            hits = stats.prefix_hits,
            blocks = self.config.kv_blocks,
        );
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn parse_vllm_metrics(page: &str) -> Option<scheduler_core::EndpointMetrics> {
        metrics_model::mapping::MetricMapping::vllm().extract(page, std::time::Instant::now()).ok()
    }

    fn job(model: &str, prompt: &str) -> Job {
        Job {
            model: model.into(),
            prompt: prompt.into(),
            stream: false,
            chat: false,
            max_tokens: 4,
            kv_transfer: KvTransfer::None,
        }
    }

    pub(super) fn quick(max_running: usize) -> ModelServerConfig {
        ModelServerConfig {
            max_running,
            decode_per_token: Duration::from_micros(10),
            lora_load: Duration::from_millis(7),
            max_lora: 1,
            ..ModelServerConfig::default()
        }
    }

    #[tokio::test]
    async fn requests_beyond_the_slots_wait_in_a_queue() {
        let server = ModelServer::new(quick(1));
        let first = server.admit(&job("llama-3-8b", "a")).await.unwrap();
        let waiting = tokio::spawn({
            let server = Arc::clone(&server);
            async move { server.admit(&job("llama-3-8b", "b")).await.map(|a| a.hit_blocks) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let stats = server.stats();
        assert_eq!((stats.running, stats.waiting, stats.served), (1, 1, 0));
        drop(first);
        assert_eq!(waiting.await.unwrap(), Some(0));
        let stats = server.stats();
        assert_eq!((stats.running, stats.waiting, stats.served), (0, 0, 2));
    }

    #[tokio::test]
    async fn cached_prefixes_skip_prefill_and_adapters_load_once() {
        let server = ModelServer::new(quick(4));
        let prompt = "x".repeat(BLOCK_CHARS * 10);
        let cold = server.admit(&job("llama-3-8b", &prompt)).await.unwrap();
        assert_eq!((cold.hit_blocks, cold.first_token_delay), (0, Duration::from_millis(2)));
        let warm = server.admit(&job("llama-3-8b", &format!("{prompt}more"))).await.unwrap();
        assert_eq!((warm.hit_blocks, warm.first_token_delay), (10, Duration::ZERO));
        let stats = server.stats();
        assert_eq!((stats.prefix_hits, stats.prefix_queries), (10, 20));
        assert!(stats.kv_usage > 0.0);
        drop((cold, warm));
        assert_eq!(server.stats().kv_usage, 0.0);

        let load = server.admit(&job("sql-lora", "q")).await.unwrap().first_token_delay;
        let resident = server.admit(&job("sql-lora", "q")).await.unwrap().first_token_delay;
        let evicting = server.admit(&job("chat-lora", "q")).await.unwrap().first_token_delay;
        assert_eq!(
            (load, resident, evicting),
            (Duration::from_millis(7), Duration::ZERO, Duration::from_millis(7))
        );
    }

    #[test]
    fn kv_transfer_params_say_which_side_of_a_handoff_a_request_is() {
        let parse = |body: &str| Job::parse("/v1/completions", body.as_bytes()).unwrap();
        let plain = parse(r#"{"model":"m","prompt":"p"}"#);
        assert_eq!(plain.kv_transfer, KvTransfer::None);
        let prefill = parse(
            r#"{"model":"m","prompt":"p","kv_transfer_params":{"do_remote_decode":true,"do_remote_prefill":false}}"#,
        );
        assert_eq!(prefill.kv_transfer, KvTransfer::PrefillForRemoteDecode);
        let decode = parse(
            r#"{"model":"m","prompt":"p","kv_transfer_params":{"do_remote_prefill":true,"remote_block_ids":[0,1,2]}}"#,
        );
        assert_eq!(decode.kv_transfer, KvTransfer::PullFromRemote { blocks: 3 });
        assert!(
            Job::parse("/v1/completions", br#"{"model":"m","prompt":"p","kv_transfer_params":7}"#)
                .is_err()
        );
    }

    #[tokio::test]
    async fn pulled_blocks_cost_the_transfer_not_the_prefill() {
        let server = ModelServer::new(quick(4));
        let prompt = "y".repeat(BLOCK_CHARS * 10);
        let mut pulled = job("llama-3-8b", &prompt);
        // The remote prefill holds only 6 of the 10 blocks: the other 4 are computed here.
        pulled.kv_transfer = KvTransfer::PullFromRemote { blocks: 6 };
        let running = server.admit(&pulled).await.unwrap();
        let config = server.config();
        assert_eq!(running.prefill_compute, config.prefill_per_block * 4);
        assert_eq!(
            running.first_token_delay,
            config.prefill_per_block * 4 + config.kv_transfer_per_block * 6
        );
        assert_eq!(server.stats().pulled_blocks, 6);
        drop(running);
        // Now cached here: nothing to pull or compute.
        let again = server.admit(&pulled).await.unwrap();
        assert_eq!((again.first_token_delay, server.stats().pulled_blocks), (Duration::ZERO, 6));
    }

    #[tokio::test]
    async fn a_running_prefill_stalls_decodes_only_when_configured() {
        for stalls in [false, true] {
            let server = ModelServer::new(ModelServerConfig {
                prefill_per_block: Duration::from_millis(4),
                decode_per_token: Duration::from_micros(10),
                prefill_stalls_decode: stalls,
                ..quick(4)
            });
            let long =
                server.admit(&job("llama-3-8b", &"z".repeat(BLOCK_CHARS * 20))).await.unwrap();
            assert_eq!(long.prefill_compute, Duration::from_millis(80));
            let prefilling = tokio::spawn({
                let server = Arc::clone(&server);
                async move { server.until_first_token(&long).await }
            });
            tokio::time::sleep(Duration::from_millis(10)).await;
            let started = std::time::Instant::now();
            server.decode(1).await;
            let waited = started.elapsed();
            if stalls {
                // Sleeps never end early, so the wait is at least the prefill's remaining time.
                assert!(waited >= Duration::from_millis(50), "decode waited only {waited:?}");
            } else {
                assert!(!prefilling.is_finished(), "the decode did not wait for the prefill");
            }
            prefilling.await.unwrap();
        }
    }

    #[tokio::test]
    async fn metrics_text_reports_the_load_in_vllm_names() {
        let server = ModelServer::new(quick(1));
        let running = server.admit(&job("sql-lora", "a")).await.unwrap();
        let queued = tokio::spawn({
            let server = Arc::clone(&server);
            async move { server.admit(&job("chat-lora", "b")).await.is_some() }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let text = server.metrics_text();
        assert!(
            text.contains("vllm:num_requests_waiting{model_name=\"llama-3-8b\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("running_lora_adapters=\"sql-lora\",waiting_lora_adapters=\"chat-lora\"")
        );
        assert!(text.contains("vllm:prefix_cache_queries_total"));
        let metrics = parse_vllm_metrics(&text).unwrap();
        assert_eq!((metrics.running, metrics.waiting_queue, metrics.max_lora_adapters), (1, 1, 1));
        assert_eq!(metrics.active_lora_adapters, vec![Arc::<str>::from("sql-lora")]);
        drop(running);
        assert!(queued.await.unwrap());
    }
}
