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
//!
//! KV usage reports the blocks pinned by running requests over the capacity, as vLLM's
//! `vllm:kv_cache_usage_perc` does; the prefix cache counters are in blocks.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use prefix_cache::{BlockHasher, BlockHasherConfig};
use scheduler_core::ParsedBody;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

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
pub struct SimConfig {
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
}

impl Default for SimConfig {
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
        }
    }
}

/// An LRU set of block hashes with a capacity: the prefix cache of one server.
#[derive(Debug)]
pub struct PrefixLru {
    capacity: usize,
    stamps: HashMap<u64, u64>,
    order: BTreeMap<u64, u64>,
    clock: u64,
}

impl PrefixLru {
    /// An empty cache holding at most `capacity` blocks.
    pub fn new(capacity: usize) -> Self {
        Self { capacity, stamps: HashMap::new(), order: BTreeMap::new(), clock: 0 }
    }

    /// Counts the prompt's leading blocks already cached, then caches every block of it.
    /// Returns the hit count.
    pub fn lookup_and_insert(&mut self, blocks: &[u64]) -> usize {
        let hits = blocks.iter().take_while(|hash| self.stamps.contains_key(hash)).count();
        // Touch the tail first so the prompt's first blocks are the most recent: eviction then
        // takes tails before heads, and a shared head (system prompt) survives longest, as in
        // vLLM's block manager.
        for &hash in blocks.iter().rev() {
            self.clock += 1;
            if let Some(old) = self.stamps.insert(hash, self.clock) {
                self.order.remove(&old);
            }
            self.order.insert(self.clock, hash);
        }
        while self.stamps.len() > self.capacity {
            let Some((_, hash)) = self.order.pop_first() else { break };
            self.stamps.remove(&hash);
        }
        hits
    }

    /// Blocks cached.
    pub fn len(&self) -> usize {
        self.stamps.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.stamps.is_empty()
    }
}

/// Counters and gauges of a server at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SimStats {
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
pub struct SimServer {
    config: SimConfig,
    hasher: BlockHasher,
    slots: Arc<Semaphore>,
    state: Mutex<State>,
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
}

#[derive(Deserialize)]
struct Limits {
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
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
        })
    }
}

/// A request holding a running slot; dropping it frees the slot and its KV blocks, also when
/// the client goes away mid-stream.
#[derive(Debug)]
pub struct Admitted {
    server: Arc<SimServer>,
    _permit: OwnedSemaphorePermit,
    adapter: Option<String>,
    pinned_blocks: usize,
    /// Time before the first token: uncached prefill plus any adapter load.
    pub first_token_delay: Duration,
    /// Prompt blocks found in the cache.
    pub hit_blocks: usize,
}

impl Drop for Admitted {
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
    server: &'a SimServer,
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

impl SimServer {
    /// A server with `config`, idle and with an empty cache.
    pub fn new(config: SimConfig) -> Arc<Self> {
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
        };
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(config.max_running.max(1))),
            config,
            hasher,
            state: Mutex::new(state),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// Waits for a running slot, then looks the prompt up in the prefix cache and loads the
    /// adapter if needed. `None` only if the server is shutting down.
    pub async fn admit(self: &Arc<Self>, job: &Job) -> Option<Admitted> {
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
        let mut first_token_delay = self.config.prefill_per_block * (blocks.len() - hits) as u32;
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
        Some(Admitted {
            server: Arc::clone(self),
            _permit: permit,
            adapter: adapter.map(str::to_owned),
            pinned_blocks,
            first_token_delay,
            hit_blocks: hits,
        })
    }

    /// The current gauges and counters.
    pub fn stats(&self) -> SimStats {
        let state = self.state.lock();
        SimStats {
            running: state.running,
            waiting: state.waiting,
            kv_usage: (state.pinned_blocks as f64 / self.config.kv_blocks.max(1) as f64).min(1.0),
            prefix_hits: state.prefix_hits,
            prefix_queries: state.prefix_queries,
            served: state.served,
            running_adapters: state.running_adapters.keys().cloned().collect(),
            waiting_adapters: state.waiting_adapters.keys().cloned().collect(),
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

    /// Answers one HTTP request.
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let path = request.uri().path().to_owned();
        match (request.method(), path.as_str()) {
            (&Method::GET, "/metrics") => text_response(StatusCode::OK, self.metrics_text()),
            (&Method::GET, "/health") => text_response(StatusCode::OK, String::new()),
            (&Method::POST, "/v1/completions" | "/v1/chat/completions") => {
                let body = match read_body(request.into_body()).await {
                    Ok(body) => body,
                    Err(status) => return error_response(status, "request body unreadable"),
                };
                match Job::parse(&path, &body) {
                    Ok(job) => self.generate(job).await,
                    Err(message) => error_response(StatusCode::BAD_REQUEST, &message),
                }
            }
            _ => error_response(StatusCode::NOT_FOUND, "no such route"),
        }
    }

    /// Runs `job`: an SSE stream whose chunks follow the simulated timing, or one JSON body
    /// after the whole generation.
    pub async fn generate(self: Arc<Self>, job: Job) -> Response<Body> {
        if job.stream {
            let (sender, receiver) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
            tokio::spawn(async move {
                let Some(admitted) = self.admit(&job).await else { return };
                stream_tokens(&self.config, &job, &admitted, &sender).await;
            });
            let body = StreamBody::new(ReceiverStream::new(receiver)).boxed();
            let mut response = Response::new(body);
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/event-stream"),
            );
            return response;
        }
        let Some(admitted) = self.admit(&job).await else {
            return error_response(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
        };
        tokio::time::sleep(admitted.first_token_delay).await;
        tokio::time::sleep(self.config.decode_per_token * job.max_tokens).await;
        drop(admitted);
        let text = "tok ".repeat(job.max_tokens as usize);
        let choice = if job.chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
        } else {
            json!({"index": 0, "text": text, "finish_reason": "length"})
        };
        let body = json!({
            "id": "sim",
            "object": if job.chat { "chat.completion" } else { "text_completion" },
            "model": job.model,
            "choices": [choice],
            "usage": usage(&job),
        });
        json_response(StatusCode::OK, body.to_string())
    }
}

fn usage(job: &Job) -> serde_json::Value {
    let prompt_tokens = job.prompt.len().div_ceil(CHARS_PER_TOKEN);
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": job.max_tokens,
        "total_tokens": prompt_tokens as u64 + u64::from(job.max_tokens),
    })
}

async fn stream_tokens(
    config: &SimConfig,
    job: &Job,
    admitted: &Admitted,
    sender: &mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
) {
    let object = if job.chat { "chat.completion.chunk" } else { "text_completion" };
    let chunk = |text: &str, finish: Option<&str>| {
        let choice = if job.chat {
            json!({"index": 0, "delta": {"content": text}, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": text, "finish_reason": finish})
        };
        json!({"id": "sim", "object": object, "model": job.model, "choices": [choice]})
    };
    let send = |value: String| {
        let sender = sender.clone();
        async move { sender.send(Ok(Frame::data(Bytes::from(value)))).await.is_ok() }
    };
    tokio::time::sleep(admitted.first_token_delay + config.decode_per_token).await;
    if !send(format!("data: {}\n\n", chunk("tok ", None))).await {
        return;
    }
    let mut left = job.max_tokens.saturating_sub(1);
    let per_chunk = config.tokens_per_chunk.max(1);
    while left > 0 {
        let tokens = left.min(per_chunk);
        tokio::time::sleep(config.decode_per_token * tokens).await;
        left -= tokens;
        if !send(format!("data: {}\n\n", chunk(&"tok ".repeat(tokens as usize), None))).await {
            return;
        }
    }
    let mut last = chunk("", Some("length"));
    last["usage"] = usage(job);
    let _ = send(format!("data: {last}\n\ndata: [DONE]\n\n")).await;
}

/// Response body of the simulated server.
pub type Body = BoxBody<Bytes, Infallible>;

async fn read_body(body: Incoming) -> Result<Bytes, StatusCode> {
    let limited = http_body_util::Limited::new(body, MAX_BODY_BYTES);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(_) => Err(StatusCode::PAYLOAD_TOO_LARGE),
    }
}

fn text_response(status: StatusCode, text: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(text)).boxed());
    *response.status_mut() = status;
    response
}

fn json_response(status: StatusCode, json: String) -> Response<Body> {
    let mut response = text_response(status, json);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn error_response(status: StatusCode, message: &str) -> Response<Body> {
    json_response(
        status,
        json!({"error": {"message": message, "code": status.as_u16()}}).to_string(),
    )
}

/// A simulated server listening on loopback.
#[derive(Debug)]
pub struct RunningSim {
    /// Where it listens.
    pub address: SocketAddr,
    /// Its state, for the report.
    pub server: Arc<SimServer>,
    accept: JoinHandle<()>,
}

impl RunningSim {
    /// Binds `127.0.0.1:0` and serves until [`RunningSim::stop`].
    pub async fn start(config: SimConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let address = listener.local_addr()?;
        let server = SimServer::new(config);
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&server)));
        Ok(Self { address, server, accept })
    }

    /// Stops accepting connections (open ones finish on their own).
    pub fn stop(&self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, server: Arc<SimServer>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "simulated server accept failed");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let server = Arc::clone(&server);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let server = Arc::clone(&server);
                async move { Ok::<_, Infallible>(server.handle(request).await) }
            });
            if let Err(error) =
                http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
            {
                tracing::debug!(%error, "simulated server connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_vllm_metrics(page: &str) -> Option<scheduler_core::EndpointMetrics> {
        metrics_model::mapping::MetricMapping::vllm().extract(page, std::time::Instant::now()).ok()
    }
    use crate::demo::proxy::{http_get, post};

    fn job(model: &str, prompt: &str) -> Job {
        Job {
            model: model.into(),
            prompt: prompt.into(),
            stream: false,
            chat: false,
            max_tokens: 4,
        }
    }

    fn quick(max_running: usize) -> SimConfig {
        SimConfig {
            max_running,
            decode_per_token: Duration::from_micros(10),
            lora_load: Duration::from_millis(7),
            max_lora: 1,
            ..SimConfig::default()
        }
    }

    #[test]
    fn lru_matches_leading_blocks_and_evicts_tails_first() {
        let mut cache = PrefixLru::new(3);
        assert_eq!(cache.lookup_and_insert(&[1, 2, 3]), 0);
        assert_eq!(cache.lookup_and_insert(&[1, 2, 9]), 2, "a miss ends the matched run");
        // Capacity 3 held 1, 2 and 9 (3 was evicted as the oldest tail); now 4 evicts 9.
        assert_eq!(cache.lookup_and_insert(&[4]), 0);
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.lookup_and_insert(&[1, 2, 9]), 2);
        assert_eq!(cache.lookup_and_insert(&[2]), 1);
    }

    #[tokio::test]
    async fn requests_beyond_the_slots_wait_in_a_queue() {
        let server = SimServer::new(quick(1));
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
        let server = SimServer::new(quick(4));
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

    #[tokio::test]
    async fn metrics_text_reports_the_load_in_vllm_names() {
        let server = SimServer::new(quick(1));
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

    #[tokio::test]
    async fn speaks_openai_over_http_streamed_and_not() {
        let sim = RunningSim::start(quick(2)).await.unwrap();
        let streamed = br#"{"model":"llama-3-8b","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":20}"#;
        let response = post(sim.address, "/v1/chat/completions", streamed.to_vec()).await.unwrap();
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(text.starts_with("data: {"), "{text}");
        assert!(text.ends_with("}}\n\ndata: [DONE]\n\n"), "{text}");
        assert!(text.contains("\"usage\":{\"completion_tokens\":20,"), "{text}");
        assert_eq!(
            text.matches("data: ").count(),
            1 + 3 + 1 + 1,
            "first token, 19 in 3 chunks, usage, done"
        );

        let plain = br#"{"model":"llama-3-8b","prompt":"hello","max_tokens":3}"#;
        let response = post(sim.address, "/v1/completions", plain.to_vec()).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["usage"]["completion_tokens"], 3);
        assert_eq!(json["choices"][0]["text"], "tok tok tok ");

        let bad = post(sim.address, "/v1/completions", b"{not json".to_vec()).await.unwrap();
        assert_eq!(bad.status(), 400);
        let metrics = http_get(sim.address, "/metrics").await.unwrap();
        assert!(parse_vllm_metrics(&metrics).is_some());
        assert_eq!(sim.server.stats().served, 2);
        sim.stop();
    }
}
