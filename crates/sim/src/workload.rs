//! Workloads: what arrives at the gateway, when, and with which prompt.
//!
//! Arrivals are an open-loop Poisson process at a fixed rate, identical for every policy that
//! replays the same [`WorkloadSpec`] and seed, so policies are compared on the same requests.
//! Requests are turns of conversations. The generator keeps `ceil(qps · conversation_gap_s)`
//! conversation slots; each arrival continues the conversation in a random slot (starting a new
//! one when the slot is empty or its conversation is over), so consecutive turns of one
//! conversation are about `conversation_gap_s` apart and a turn's prompt is the whole history
//! (earlier prompts and answers) plus the new message: the growing shared prefix that prefix
//! caching exploits. Because arrivals do not wait for answers (open loop), a turn can arrive
//! before the previous one finished when the pool is overloaded; the gap keeps that rare below
//! saturation.
//!
//! Sources:
//! - [`SyntheticWorkload`]: random text with log-normal message and answer lengths, optional
//!   shared system prompts (a fixed set, chosen uniformly), and a geometric number of turns.
//! - [`TraceWorkload`]: a ShareGPT-format JSON file (`[{"id", "conversations": [{"from",
//!   "value"}]}]`), replayed turn by turn; lengths are characters / 4. When the run needs more
//!   requests than the file holds, later passes prefix each conversation with its pass number
//!   so they do not hit the cache of the first pass.
//!
//! Mixes common to both: a share of conversations that target LoRA adapters (chosen
//! uniformly), and priorities (a share of sheddable conversations, priority -1).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::hashing::{CHARS_PER_TOKEN, extend_block_hashes, model_seed, tokens_for_chars};

/// One request as the gateway receives it.
#[derive(Clone, Debug)]
pub struct WorkloadRequest {
    /// Arrival time, seconds from the start of the run.
    pub arrival_s: f64,
    /// Target model: the base model or a LoRA adapter name.
    pub model: Arc<str>,
    /// The adapter's id in [`WorkloadSpec::adapter_names`], if the request targets one.
    pub adapter: Option<u16>,
    /// The prompt text (the conversation so far plus the new message).
    pub prompt: String,
    /// Chained hashes of the full 64-character blocks of the prompt followed by the answer.
    pub block_hashes: Vec<u64>,
    /// Prompt length, tokens.
    pub prompt_tokens: u32,
    /// Answer length, tokens.
    pub output_tokens: u32,
    /// Priority; below zero is sheddable.
    pub priority: i32,
    /// The rate-ladder stage the request belongs to (0 without a ladder).
    pub stage: u32,
    /// Whether it falls in its stage's warm-up, left out of the stage's latencies.
    pub warmup: bool,
}

/// A length distribution, in tokens.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum LengthDistribution {
    /// Always the same length.
    Fixed(u32),
    /// Log-normal with the given median and shape, clamped to `[min, max]`.
    LogNormal {
        /// Median length.
        median: f64,
        /// Standard deviation of the logarithm.
        sigma: f64,
        /// Smallest length.
        min: u32,
        /// Largest length.
        max: u32,
    },
}

impl LengthDistribution {
    fn sample(&self, rng: &mut SmallRng) -> u32 {
        match *self {
            Self::Fixed(tokens) => tokens.max(1),
            Self::LogNormal { median, sigma, min, max } => {
                let value = median * (sigma * standard_normal(rng)).exp();
                (value.round() as u32).clamp(min.max(1), max.max(1))
            }
        }
    }
}

fn standard_normal(rng: &mut SmallRng) -> f64 {
    // Box-Muller; `1 - u` keeps the logarithm finite.
    let radius = (-2.0 * (1.0 - rng.random::<f64>()).ln()).sqrt();
    radius * (std::f64::consts::TAU * rng.random::<f64>()).cos()
}

/// Synthetic conversations of random text.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SyntheticWorkload {
    /// Length of each user message.
    pub message_tokens: LengthDistribution,
    /// Length of each answer.
    pub output_tokens: LengthDistribution,
    /// Distinct shared system prompts (0 for none).
    pub system_prompts: u32,
    /// Length of each system prompt.
    pub system_prompt_tokens: u32,
    /// Share of conversations that start with a system prompt.
    pub system_prompt_share: f64,
    /// Mean turns per conversation (geometric; 1 means single-turn).
    pub mean_turns: f64,
    /// Distinct questions per system prompt, asked again and again (inference-perf's
    /// `num_prompts_per_group`); 0 makes every question new.
    pub prompts_per_group: u32,
}

impl SyntheticWorkload {
    /// Shaped like ShareGPT as the serving benchmarks replay it: short-to-medium user
    /// messages with a long tail (median 40 tokens), answers of a few hundred tokens
    /// (median 250), about three turns per conversation, no shared system prompt.
    pub fn sharegpt_like() -> Self {
        Self {
            message_tokens: LengthDistribution::LogNormal {
                median: 40.0,
                sigma: 1.4,
                min: 4,
                max: 2048,
            },
            output_tokens: LengthDistribution::LogNormal {
                median: 250.0,
                sigma: 0.9,
                min: 4,
                max: 1536,
            },
            system_prompts: 0,
            system_prompt_tokens: 0,
            system_prompt_share: 0.0,
            mean_turns: 3.0,
            prompts_per_group: 0,
        }
    }

    /// Long shared system prompts and short questions, as in agent or RAG front-ends: 150
    /// system prompts of 6,000 tokens (twice what one server's cache holds, a fifth of ten
    /// servers' caches), every conversation starting with one, single turns of ~100-token
    /// questions and ~100-token answers.
    pub fn prefix_heavy() -> Self {
        Self {
            message_tokens: LengthDistribution::LogNormal {
                median: 100.0,
                sigma: 0.5,
                min: 8,
                max: 1024,
            },
            output_tokens: LengthDistribution::LogNormal {
                median: 100.0,
                sigma: 0.5,
                min: 4,
                max: 1024,
            },
            system_prompts: 150,
            system_prompt_tokens: 6000,
            system_prompt_share: 1.0,
            mean_turns: 1.0,
            prompts_per_group: 0,
        }
    }
    /// One product's assistant: every request opens with the same 6,000-token system prompt,
    /// then a new 200-token question, answered in 200 tokens, single turn. The hot-prefix case
    /// where affinity alone would send the whole load to the one server that holds the prompt.
    pub fn hot_prefix() -> Self {
        Self::shared_prefix(1, 0, 6000, 200, 200)
    }

    /// inference-perf's `shared_prefix` data shape: `groups` system prompts of
    /// `system_prompt_tokens`, each followed by one of `prompts_per_group` fixed questions of
    /// `question_tokens` (0: a new question every time), answers of `output_tokens`; every
    /// request picks a group and a question uniformly, single turn.
    pub fn shared_prefix(
        groups: u32,
        prompts_per_group: u32,
        system_prompt_tokens: u32,
        question_tokens: u32,
        output_tokens: u32,
    ) -> Self {
        Self {
            message_tokens: LengthDistribution::Fixed(question_tokens),
            output_tokens: LengthDistribution::Fixed(output_tokens),
            system_prompts: groups,
            system_prompt_tokens,
            system_prompt_share: 1.0,
            mean_turns: 1.0,
            prompts_per_group,
        }
    }

    /// Long prompts and short answers, the shape prefill/decode disaggregation is for
    /// (document Q&A, retrieval-augmented generation): 1,000 documents of 3,000 tokens, every
    /// conversation opening with one, questions of ~150 tokens, answers of ~100 tokens, two
    /// turns on average (a follow-up finds the document and the first answer cached where the
    /// first turn ran).
    pub fn long_prompt() -> Self {
        Self {
            message_tokens: LengthDistribution::LogNormal {
                median: 150.0,
                sigma: 0.5,
                min: 8,
                max: 1024,
            },
            output_tokens: LengthDistribution::LogNormal {
                median: 100.0,
                sigma: 0.5,
                min: 4,
                max: 512,
            },
            system_prompts: 1000,
            system_prompt_tokens: 3000,
            system_prompt_share: 1.0,
            mean_turns: 2.0,
            prompts_per_group: 0,
        }
    }
}

/// Why a trace file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The file could not be read.
    #[error("cannot read trace file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not ShareGPT-format JSON.
    #[error(
        "trace file {path} is not ShareGPT JSON ([{{\"conversations\": [{{\"from\", \"value\"}}]}}]): {source}"
    )]
    Parse {
        /// The file.
        path: PathBuf,
        /// The JSON error, with line and column.
        source: serde_json::Error,
    },
    /// The file holds no user turn followed by an answer.
    #[error("trace file {path} holds no conversation with a human turn followed by an answer")]
    NoConversations {
        /// The file.
        path: PathBuf,
    },
}

#[derive(Deserialize)]
struct RawConversation {
    #[serde(default)]
    conversations: Vec<RawTurn>,
}

#[derive(Deserialize)]
struct RawTurn {
    from: String,
    value: String,
}

/// One conversation of a trace: (user message, answer) pairs in order.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceConversation {
    /// The turns.
    pub turns: Vec<(String, String)>,
}

/// Conversations replayed from a ShareGPT-format file.
#[derive(Clone, Debug)]
pub struct TraceWorkload {
    /// Where the conversations came from.
    pub path: PathBuf,
    /// The conversations, each with at least one turn.
    pub conversations: Arc<Vec<TraceConversation>>,
}

impl TraceWorkload {
    /// Loads a ShareGPT-format JSON file. Turns from `human` (or `user`) followed by a turn
    /// from anyone else form a (message, answer) pair; other turns are skipped.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, WorkloadError> {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path)
            .map_err(|source| WorkloadError::Read { path: path.clone(), source })?;
        Self::from_json(&bytes, &path)
    }

    /// Parses ShareGPT-format JSON; `path` only names the source in errors.
    pub fn from_json(json: &[u8], path: &Path) -> Result<Self, WorkloadError> {
        let raw: Vec<RawConversation> = serde_json::from_slice(json)
            .map_err(|source| WorkloadError::Parse { path: path.to_path_buf(), source })?;
        let mut conversations = Vec::with_capacity(raw.len());
        for conversation in raw {
            let mut turns = Vec::new();
            let mut pending_message: Option<String> = None;
            for turn in conversation.conversations {
                let from_user = matches!(turn.from.as_str(), "human" | "user");
                match (from_user, pending_message.take()) {
                    (true, _) => pending_message = Some(turn.value),
                    (false, Some(message)) => turns.push((message, turn.value)),
                    (false, None) => {}
                }
            }
            if !turns.is_empty() {
                conversations.push(TraceConversation { turns });
            }
        }
        if conversations.is_empty() {
            return Err(WorkloadError::NoConversations { path: path.to_path_buf() });
        }
        Ok(Self { path: path.to_path_buf(), conversations: Arc::new(conversations) })
    }
}

/// Where the conversations come from.
#[derive(Clone, Debug)]
pub enum WorkloadSource {
    /// Generated text.
    Synthetic(SyntheticWorkload),
    /// A replayed trace.
    Trace(TraceWorkload),
}

/// A complete workload: source, rate, size and mixes.
#[derive(Clone, Debug)]
pub struct WorkloadSpec {
    /// Name for reports.
    pub name: String,
    /// The conversations.
    pub source: WorkloadSource,
    /// Mean arrival rate, requests per second.
    pub qps: f64,
    /// How many requests arrive.
    pub requests: u64,
    /// Mean time between turns of one conversation, seconds.
    pub conversation_gap_s: f64,
    /// Base model name (also seeds the block hashes).
    pub model: String,
    /// LoRA adapters conversations may target.
    pub adapters: u32,
    /// Share of conversations that target an adapter.
    pub adapter_share: f64,
    /// Share of conversations that are sheddable (priority -1); the rest have priority 0.
    pub sheddable_share: f64,
    /// Longest prompt plus answer, tokens: a conversation ends before a turn that would exceed
    /// it (trace conversations whose first turn exceeds it are skipped).
    pub max_context_tokens: u32,
    /// Trace workloads: replay only each conversation's first turn, as single requests, the
    /// way vLLM's `benchmark_serving` and GIE's benchmark tool replay ShareGPT.
    pub first_turns_only: bool,
    /// A rate ladder: the requests are split evenly into one stage per rate, in order, each
    /// continuing from the state the previous one left (no restart). Empty: one stage at `qps`.
    pub ladder: Vec<f64>,
    /// Share of each stage's first requests that are warm-up ([`WorkloadRequest::warmup`]).
    pub warmup_share: f64,
    /// The client's limit on requests in flight: an arrival beyond it waits for a response
    /// before it is sent (a benchmark's `max-concurrency`). `None`: open loop.
    pub max_concurrency: Option<u32>,
    /// The client's timeout: a response that ends later than this after its request was sent
    /// counts as failed, not completed. The server is not told (a real one would abort the
    /// request on the client's disconnect, freeing its slot early; not modelled).
    pub timeout_s: Option<f64>,
}

impl WorkloadSpec {
    /// A workload of `requests` requests at `qps` from `source`, with no adapters and no
    /// sheddable share.
    pub fn new(name: impl Into<String>, source: WorkloadSource, qps: f64, requests: u64) -> Self {
        Self {
            name: name.into(),
            source,
            qps,
            requests,
            conversation_gap_s: 10.0,
            model: "meta-llama/Llama-3.1-8B-Instruct".to_owned(),
            adapters: 0,
            adapter_share: 0.0,
            sheddable_share: 0.0,
            max_context_tokens: 8192,
            first_turns_only: false,
            ladder: Vec::new(),
            warmup_share: 0.0,
            max_concurrency: None,
            timeout_s: None,
        }
    }

    /// A ladder of `rates`, `requests_per_stage` each, the first `warmup_share` of every
    /// stage's requests being warm-up.
    pub fn with_ladder(&self, rates: &[f64], requests_per_stage: u64, warmup_share: f64) -> Self {
        Self {
            qps: rates.iter().copied().fold(0.0, f64::max),
            requests: requests_per_stage.saturating_mul(rates.len() as u64),
            ladder: rates.to_vec(),
            warmup_share,
            ..self.clone()
        }
    }

    /// How many stages the requests are split into.
    pub fn stage_count(&self) -> usize {
        self.ladder.len().max(1)
    }

    /// Requests of one stage (the last may hold fewer).
    fn requests_per_stage(&self) -> u64 {
        self.requests.div_ceil(self.stage_count() as u64).max(1)
    }

    /// The rate of `stage`.
    pub fn stage_qps(&self, stage: usize) -> f64 {
        self.ladder.get(stage).copied().unwrap_or(self.qps)
    }

    /// The same workload at another rate.
    pub fn with_qps(&self, qps: f64) -> Self {
        Self { qps, ..self.clone() }
    }

    /// Names of the adapters, indexed by [`WorkloadRequest::adapter`] (at most 65,535).
    pub fn adapter_names(&self) -> Vec<Arc<str>> {
        (0..self.adapters.min(u32::from(u16::MAX)))
            .map(|index| Arc::from(format!("lora-{index}")))
            .collect()
    }

    /// The requests, generated lazily and deterministically from `seed`.
    pub fn generate(&self, seed: u64) -> WorkloadGenerator {
        WorkloadGenerator::new(self.clone(), seed)
    }
}

#[derive(Debug)]
struct Conversation {
    model: Arc<str>,
    seed: u64,
    adapter: Option<u16>,
    priority: i32,
    history: String,
    hashes: Vec<u64>,
    turns_left: u32,
    trace_turns: Option<(usize, usize)>,
    /// The system prompt the conversation opened with.
    group: Option<usize>,
}

/// Iterator over a workload's requests in arrival order.
#[derive(Debug)]
pub struct WorkloadGenerator {
    spec: WorkloadSpec,
    rng: SmallRng,
    clock_s: f64,
    emitted: u64,
    slots: Vec<Option<Conversation>>,
    system_prompts: Vec<String>,
    /// Block hashes of each system prompt for the base model, so conversations do not rehash
    /// thousands of shared tokens each.
    system_prompt_hashes: Vec<Vec<u64>>,
    /// Each group's fixed questions (`prompts_per_group` of them), empty when questions are new.
    group_questions: Vec<Vec<String>>,
    adapter_names: Vec<Arc<str>>,
    base_model: Arc<str>,
    next_trace_conversation: usize,
}

impl WorkloadGenerator {
    fn new(spec: WorkloadSpec, seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let system_prompts = match &spec.source {
            WorkloadSource::Synthetic(synthetic) => (0..synthetic.system_prompts)
                .map(|_| random_text(&mut rng, synthetic.system_prompt_tokens as usize))
                .collect(),
            WorkloadSource::Trace(_) => Vec::new(),
        };
        let group_questions = match &spec.source {
            WorkloadSource::Synthetic(synthetic) if synthetic.prompts_per_group > 0 => {
                let questions = synthetic.prompts_per_group as usize;
                (0..system_prompts.len())
                    .map(|_| {
                        (0..questions)
                            .map(|_| {
                                let tokens = synthetic.message_tokens.sample(&mut rng);
                                random_text(&mut rng, tokens as usize)
                            })
                            .collect()
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        let slots = spec.qps * spec.conversation_gap_s;
        let slot_count = if slots.is_finite() { slots.ceil().clamp(1.0, 1e6) as usize } else { 1 };
        let base_seed = model_seed(&spec.model);
        let system_prompt_hashes = system_prompts
            .iter()
            .map(|prompt| {
                let mut hashes = Vec::new();
                extend_block_hashes(base_seed, prompt, &mut hashes);
                hashes
            })
            .collect();
        Self {
            system_prompt_hashes,
            group_questions,
            adapter_names: spec.adapter_names(),
            base_model: Arc::from(spec.model.as_str()),
            spec,
            rng,
            clock_s: 0.0,
            emitted: 0,
            slots: (0..slot_count).map(|_| None).collect(),
            system_prompts,
            next_trace_conversation: 0,
        }
    }

    fn start_conversation(&mut self) -> Option<Conversation> {
        let adapters = self.adapter_names.len() as u32;
        let adapter = (adapters > 0 && self.rng.random_bool(clamp01(self.spec.adapter_share)))
            .then(|| self.rng.random_range(0..adapters) as u16);
        let model = match adapter {
            Some(adapter) => Arc::clone(&self.adapter_names[adapter as usize]),
            None => Arc::clone(&self.base_model),
        };
        let priority =
            if self.rng.random_bool(clamp01(self.spec.sheddable_share)) { -1 } else { 0 };
        let mut conversation = Conversation {
            seed: model_seed(&model),
            model,
            adapter,
            priority,
            history: String::new(),
            hashes: Vec::new(),
            turns_left: 1,
            trace_turns: None,
            group: None,
        };
        match &self.spec.source {
            WorkloadSource::Synthetic(synthetic) => {
                if !self.system_prompts.is_empty()
                    && self.rng.random_bool(clamp01(synthetic.system_prompt_share))
                {
                    let index = self.rng.random_range(0..self.system_prompts.len());
                    conversation.group = Some(index);
                    conversation.history.push_str(&self.system_prompts[index]);
                    if conversation.adapter.is_none() {
                        conversation.hashes.clone_from(&self.system_prompt_hashes[index]);
                    }
                }
                conversation.turns_left = geometric(&mut self.rng, synthetic.mean_turns);
            }
            WorkloadSource::Trace(trace) => {
                let total = trace.conversations.len();
                // Skip conversations whose first turn cannot fit; give up after one full pass.
                for _ in 0..total {
                    let index = self.next_trace_conversation % total;
                    let pass = self.next_trace_conversation / total;
                    self.next_trace_conversation += 1;
                    let conversation_turns = &trace.conversations[index].turns;
                    let (message, answer) = &conversation_turns[0];
                    let tokens = tokens_for_chars(message.len()) + tokens_for_chars(answer.len());
                    if tokens <= self.spec.max_context_tokens {
                        if pass > 0 {
                            conversation.history.push_str(&format!("[replay {pass}] "));
                        }
                        conversation.turns_left = if self.spec.first_turns_only {
                            1
                        } else {
                            conversation_turns.len() as u32
                        };
                        conversation.trace_turns = Some((index, 0));
                        return Some(conversation);
                    }
                }
                return None;
            }
        }
        Some(conversation)
    }

    /// The next turn's (message, answer) text and answer tokens, advancing the conversation.
    fn next_turn(&mut self, conversation: &mut Conversation) -> (String, u32, String) {
        match (&self.spec.source, conversation.trace_turns.as_mut()) {
            (WorkloadSource::Trace(trace), Some((index, turn))) => {
                let (message, answer) = &trace.conversations[*index].turns[*turn];
                *turn += 1;
                (message.clone(), tokens_for_chars(answer.len()), answer.clone())
            }
            (WorkloadSource::Synthetic(synthetic), _) => {
                let fixed = conversation
                    .group
                    .and_then(|group| self.group_questions.get(group))
                    .filter(|questions| !questions.is_empty());
                let message = match fixed {
                    Some(questions) => questions[self.rng.random_range(0..questions.len())].clone(),
                    None => {
                        let message_tokens = synthetic.message_tokens.sample(&mut self.rng);
                        random_text(&mut self.rng, message_tokens as usize)
                    }
                };
                let output_tokens = synthetic.output_tokens.sample(&mut self.rng);
                let answer = random_text(&mut self.rng, output_tokens as usize);
                (message, output_tokens, answer)
            }
            (WorkloadSource::Trace(_), None) => (String::from("?"), 1, String::new()),
        }
    }
}

impl Iterator for WorkloadGenerator {
    type Item = WorkloadRequest;

    fn next(&mut self) -> Option<WorkloadRequest> {
        let per_stage = self.spec.requests_per_stage();
        let stage = (self.emitted / per_stage) as usize;
        let rate = self.spec.stage_qps(stage);
        let rate_is_usable = rate > 0.0 && rate.is_finite();
        if self.emitted >= self.spec.requests || !rate_is_usable {
            return None;
        }
        let index_in_stage = self.emitted % per_stage;
        let warmup = (index_in_stage as f64) < self.spec.warmup_share * per_stage as f64;
        // A bounded number of attempts: each either emits or ends a conversation that cannot
        // continue, and starting conversations can fail only for traces with nothing usable.
        for _ in 0..self.slots.len() + 16 {
            let slot = self.rng.random_range(0..self.slots.len());
            let mut conversation = match self.slots[slot].take() {
                Some(conversation) if conversation.turns_left > 0 => conversation,
                _ => self.start_conversation()?,
            };
            let (message, output_tokens, answer) = self.next_turn(&mut conversation);
            conversation.turns_left -= 1;
            let prompt_chars = conversation.history.len() + message.len();
            let prompt_tokens = tokens_for_chars(prompt_chars);
            if prompt_tokens.saturating_add(output_tokens) > self.spec.max_context_tokens {
                continue;
            }
            let mut text = std::mem::take(&mut conversation.history);
            text.push_str(&message);
            let prompt = text.clone();
            text.push_str(&answer);
            extend_block_hashes(conversation.seed, &text, &mut conversation.hashes);
            let gap = -(1.0 - self.rng.random::<f64>()).ln() / rate;
            self.clock_s += gap;
            self.emitted += 1;
            let request = WorkloadRequest {
                arrival_s: self.clock_s,
                model: Arc::clone(&conversation.model),
                adapter: conversation.adapter,
                prompt,
                block_hashes: conversation.hashes.clone(),
                prompt_tokens,
                output_tokens,
                priority: conversation.priority,
                stage: stage as u32,
                warmup,
            };
            conversation.history = text;
            if conversation.turns_left > 0 {
                self.slots[slot] = Some(conversation);
            }
            return Some(request);
        }
        None
    }
}

fn clamp01(value: f64) -> f64 {
    if value.is_nan() { 0.0 } else { value.clamp(0.0, 1.0) }
}

/// A geometric number of turns (at least one) with the given mean.
fn geometric(rng: &mut SmallRng, mean: f64) -> u32 {
    if mean <= 1.0 {
        return 1;
    }
    let continue_probability = 1.0 - 1.0 / mean;
    let mut turns = 1;
    while turns < 64 && rng.random_bool(continue_probability) {
        turns += 1;
    }
    turns
}

/// Random lower-case words: 4 characters per token, never matching another text by chance.
fn random_text(rng: &mut SmallRng, tokens: usize) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz  .,e\n";
    let chars = tokens * CHARS_PER_TOKEN;
    let mut text = Vec::with_capacity(chars);
    while text.len() < chars {
        let mut bits = rng.random::<u64>();
        for _ in 0..12 {
            if text.len() == chars {
                break;
            }
            text.push(ALPHABET[(bits & 31) as usize]);
            bits >>= 5;
        }
    }
    // Every byte comes from an ASCII alphabet.
    String::from_utf8(text).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(source: WorkloadSource, requests: u64) -> WorkloadSpec {
        WorkloadSpec::new("test", source, 10.0, requests)
    }

    #[test]
    fn the_same_seed_replays_the_same_requests() {
        let workload = spec(WorkloadSource::Synthetic(SyntheticWorkload::sharegpt_like()), 50);
        let a: Vec<_> = workload.generate(3).map(|r| (r.arrival_s, r.prompt)).collect();
        let b: Vec<_> = workload.generate(3).map(|r| (r.arrival_s, r.prompt)).collect();
        assert_eq!(a.len(), 50);
        assert_eq!(a, b);
        assert!(a.windows(2).all(|pair| pair[0].0 < pair[1].0), "arrivals are ordered");
    }

    #[test]
    fn later_turns_extend_earlier_ones() {
        let mut synthetic = SyntheticWorkload::sharegpt_like();
        synthetic.mean_turns = 50.0;
        let mut workload = spec(WorkloadSource::Synthetic(synthetic), 40);
        workload.conversation_gap_s = 0.1; // one slot: every request continues one conversation
        let requests: Vec<_> = workload.generate(1).collect();
        let continued =
            requests.windows(2).filter(|pair| pair[1].prompt.starts_with(&pair[0].prompt)).count();
        assert!(continued > 20, "{continued}");
        let (first, second) = (&requests[0], &requests[1]);
        if second.prompt.starts_with(&first.prompt) {
            assert_eq!(second.block_hashes[..first.block_hashes.len()], first.block_hashes[..]);
        }
    }

    #[test]
    fn shared_prefix_requests_are_a_group_prompt_and_one_of_its_questions() {
        let shape = SyntheticWorkload::shared_prefix(4, 3, 100, 20, 30);
        let workload = spec(WorkloadSource::Synthetic(shape), 600);
        let requests: Vec<_> = workload.generate(9).collect();
        assert_eq!(requests.len(), 600);
        let system_chars = 100 * CHARS_PER_TOKEN;
        let question_chars = 20 * CHARS_PER_TOKEN;
        let mut groups = std::collections::BTreeSet::new();
        let mut prompts = std::collections::BTreeSet::new();
        for request in &requests {
            assert_eq!(request.prompt.len(), system_chars + question_chars);
            assert_eq!(request.prompt_tokens, 120);
            assert_eq!(request.output_tokens, 30);
            groups.insert(request.prompt[..system_chars].to_owned());
            prompts.insert(request.prompt.clone());
        }
        assert_eq!(groups.len(), 4, "every group is drawn, and only those");
        assert_eq!(prompts.len(), 12, "4 groups x 3 fixed questions");
        // The same seed replays the same requests; another seed draws other texts.
        let again: Vec<_> = workload.generate(9).map(|r| r.prompt).collect();
        assert_eq!(again, requests.iter().map(|r| r.prompt.clone()).collect::<Vec<_>>());
        let other: Vec<_> = workload.generate(10).map(|r| r.prompt).collect();
        assert!(other.iter().all(|prompt| !prompts.contains(prompt)));
    }

    #[test]
    fn shared_prefix_without_fixed_questions_asks_new_ones() {
        let shape = SyntheticWorkload::shared_prefix(1, 0, 50, 10, 10);
        let workload = spec(WorkloadSource::Synthetic(shape), 200);
        let prompts: std::collections::BTreeSet<_> =
            workload.generate(1).map(|request| request.prompt).collect();
        assert_eq!(prompts.len(), 200);
        let hot = SyntheticWorkload::hot_prefix();
        assert_eq!((hot.system_prompts, hot.system_prompt_tokens), (1, 6000));
    }

    #[test]
    fn traces_parse_and_bad_files_name_the_problem() {
        let json = br#"[{"id":"a","conversations":[{"from":"gpt","value":"skipped"},
            {"from":"human","value":"hi"},{"from":"gpt","value":"hello there"},
            {"from":"human","value":"unanswered"}]},{"id":"b","conversations":[]}]"#;
        let trace = TraceWorkload::from_json(json, Path::new("t.json")).unwrap();
        assert_eq!(trace.conversations.len(), 1);
        assert_eq!(trace.conversations[0].turns, vec![("hi".into(), "hello there".into())]);

        let error = TraceWorkload::from_json(b"{", Path::new("bad.json")).unwrap_err();
        assert!(error.to_string().contains("bad.json"), "{error}");
        let error = TraceWorkload::from_json(b"[]", Path::new("empty.json")).unwrap_err();
        assert!(matches!(error, WorkloadError::NoConversations { .. }));
        let error = TraceWorkload::load("/nonexistent/trace.json").unwrap_err();
        assert!(error.to_string().contains("/nonexistent/trace.json"), "{error}");
    }
}
