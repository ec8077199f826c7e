//! The demo's workload: a deterministic list of OpenAI requests with arrival times, built from
//! a seed.
//!
//! It has the shape that separates a cache-aware picker from round-robin: a few long system
//! prompts (2-4 KiB) shared by many conversations, popular ones more often; multi-turn
//! conversations whose prompt grows by one exchange per turn; a share of requests addressed to
//! LoRA adapters; three objectives (`critical`, `standard`, `sheddable`); streamed and
//! non-streamed requests on both APIs. Arrivals are Poisson (exponential gaps).

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// Objectives sent in `x-gateway-inference-objective`, most important first.
pub const OBJECTIVES: [&str; 3] = ["critical", "standard", "sheddable"];

/// What to generate.
#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    /// Requests in all.
    pub requests: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// Mean arrival rate, requests per second.
    pub rate_per_second: f64,
    /// The base model's name.
    pub base_model: String,
    /// LoRA adapter names.
    pub adapters: Vec<String>,
    /// Distinct shared system prompts.
    pub system_prompts: usize,
    /// Share of conversations addressed to an adapter.
    pub adapter_share: f64,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            requests: 600,
            seed: 42,
            rate_per_second: 300.0,
            base_model: "llama-3-8b".into(),
            adapters: vec!["sql-lora".into(), "support-lora".into(), "legal-lora".into()],
            system_prompts: 8,
            adapter_share: 0.25,
        }
    }
}

/// One request of the workload.
#[derive(Clone, Debug)]
pub struct PlannedRequest {
    /// Position in the workload.
    pub index: usize,
    /// Arrival time after the start.
    pub at: Duration,
    /// `/v1/chat/completions` or `/v1/completions`.
    pub path: &'static str,
    /// The JSON body.
    pub body: Vec<u8>,
    /// The objective header value (one of [`OBJECTIVES`]).
    pub objective: &'static str,
    /// Whether the response is streamed.
    pub stream: bool,
    /// Output tokens asked for.
    pub max_tokens: u32,
    /// The conversation it belongs to, numbered in order of first turn.
    pub conversation: usize,
    /// Its turn in that conversation, from 0; a later turn's prompt extends the earlier ones'.
    pub turn: usize,
}

#[derive(Debug)]
struct Conversation {
    id: usize,
    system: usize,
    model: String,
    chat: bool,
    objective: &'static str,
    turns: Vec<(String, String)>,
    turns_left: usize,
}

const WORDS: [&str; 32] = [
    "the",
    "model",
    "serves",
    "tokens",
    "cache",
    "prefix",
    "request",
    "latency",
    "queue",
    "adapter",
    "policy",
    "answer",
    "question",
    "context",
    "system",
    "user",
    "route",
    "pool",
    "endpoint",
    "score",
    "block",
    "memory",
    "batch",
    "decode",
    "prefill",
    "stream",
    "gateway",
    "inference",
    "priority",
    "fair",
    "quick",
    "careful",
];

fn words(rng: &mut SmallRng, characters: usize) -> String {
    let mut text = String::with_capacity(characters + 16);
    while text.len() < characters {
        text.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        text.push(' ');
    }
    text
}

/// Builds the workload for `config`; the same config always gives the same requests.
pub fn generate(config: &WorkloadConfig) -> Vec<PlannedRequest> {
    let mut rng = SmallRng::seed_from_u64(config.seed);
    let systems: Vec<String> = (0..config.system_prompts.max(1))
        .map(|index| {
            let length = rng.random_range(2048..4096);
            format!("You are assistant #{index}. {}", words(&mut rng, length))
        })
        .collect();
    let mut open: Vec<Conversation> = Vec::new();
    let mut at = Duration::ZERO;
    let mut planned = Vec::with_capacity(config.requests);
    let mut conversations = 0;
    for index in 0..config.requests {
        let gap = -(1.0 - rng.random::<f64>()).ln() / config.rate_per_second.max(1e-3);
        at += Duration::from_secs_f64(gap);
        if open.is_empty() || rng.random_bool(0.3) {
            open.push(new_conversation(&mut rng, config, systems.len(), conversations));
            conversations += 1;
        }
        let slot = rng.random_range(0..open.len());
        let conversation = &mut open[slot];
        let question_length = rng.random_range(100..400);
        let question = words(&mut rng, question_length);
        let stream = rng.random_bool(0.7);
        let max_tokens = rng.random_range(16..80u32);
        let body = body(conversation, &systems[conversation.system], &question, stream, max_tokens);
        planned.push(PlannedRequest {
            index,
            at,
            path: if conversation.chat { "/v1/chat/completions" } else { "/v1/completions" },
            body,
            objective: conversation.objective,
            stream,
            max_tokens,
            conversation: conversation.id,
            turn: conversation.turns.len(),
        });
        let answer = words(&mut rng, max_tokens as usize * 4);
        conversation.turns.push((question, answer));
        conversation.turns_left -= 1;
        if conversation.turns_left == 0 {
            open.swap_remove(slot);
        }
    }
    planned
}

fn new_conversation(
    rng: &mut SmallRng,
    config: &WorkloadConfig,
    systems: usize,
    id: usize,
) -> Conversation {
    // Popular system prompts are shared more: the square skews picks towards low indices.
    let system = ((rng.random::<f64>().powi(2)) * systems as f64) as usize;
    let model = if !config.adapters.is_empty() && rng.random_bool(config.adapter_share) {
        config.adapters[rng.random_range(0..config.adapters.len())].clone()
    } else {
        config.base_model.clone()
    };
    let objective = match rng.random_range(0..10) {
        0..2 => OBJECTIVES[0],
        2..8 => OBJECTIVES[1],
        _ => OBJECTIVES[2],
    };
    Conversation {
        id,
        system: system.min(systems.saturating_sub(1)),
        model,
        chat: rng.random_bool(0.7),
        objective,
        turns: Vec::new(),
        turns_left: rng.random_range(1..7),
    }
}

fn body(
    conversation: &Conversation,
    system: &str,
    question: &str,
    stream: bool,
    max_tokens: u32,
) -> Vec<u8> {
    let mut value = if conversation.chat {
        let mut messages = vec![json!({"role": "system", "content": system})];
        for (asked, answered) in &conversation.turns {
            messages.push(json!({"role": "user", "content": asked}));
            messages.push(json!({"role": "assistant", "content": answered}));
        }
        messages.push(json!({"role": "user", "content": question}));
        json!({"model": conversation.model, "messages": messages})
    } else {
        let mut prompt = String::from(system);
        for (asked, answered) in &conversation.turns {
            prompt.push_str("\nQ: ");
            prompt.push_str(asked);
            prompt.push_str("\nA: ");
            prompt.push_str(answered);
        }
        prompt.push_str("\nQ: ");
        prompt.push_str(question);
        prompt.push_str("\nA:");
        json!({"model": conversation.model, "prompt": prompt})
    };
    value["max_tokens"] = json!(max_tokens);
    value["stream"] = json!(stream);
    if stream {
        value["stream_options"] = json!({"include_usage": true});
    }
    value.to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_decides_everything() {
        let config = WorkloadConfig { requests: 50, ..WorkloadConfig::default() };
        let first = generate(&config);
        let second = generate(&config);
        assert_eq!(first.len(), 50);
        for (a, b) in first.iter().zip(&second) {
            assert_eq!((a.at, &a.body, a.objective), (b.at, &b.body, b.objective));
        }
        let other = generate(&WorkloadConfig { seed: 7, ..config });
        assert_ne!(first[0].body, other[0].body);
    }

    #[test]
    fn requests_parse_and_share_prefixes() {
        let planned = generate(&WorkloadConfig { requests: 80, ..WorkloadConfig::default() });
        let prompts: Vec<String> = planned
            .iter()
            .map(|request| {
                scheduler_core::ParsedBody::parse(Some(request.path), &request.body).unwrap().prompt
            })
            .collect();
        let shared = prompts
            .iter()
            .enumerate()
            .filter(|(i, p)| prompts[..*i].iter().any(|q| q.get(..1024) == p.get(..1024)))
            .count();
        assert!(shared > 40, "most requests reuse an earlier prefix, got {shared}");
        assert!(planned.windows(2).all(|pair| pair[0].at <= pair[1].at));
    }

    #[test]
    fn turns_are_numbered_within_their_conversation() {
        let planned = generate(&WorkloadConfig { requests: 200, ..WorkloadConfig::default() });
        let mut next_turn = std::collections::HashMap::new();
        for request in &planned {
            let expected = next_turn.entry(request.conversation).or_insert(0);
            assert_eq!(request.turn, *expected, "request {}", request.index);
            *expected += 1;
        }
        assert!(next_turn.values().any(|turns| *turns > 1), "some conversations have turns");
        // A later turn's prompt starts with the earlier turn's history.
        let prompt = |request: &PlannedRequest| {
            scheduler_core::ParsedBody::parse(Some(request.path), &request.body).unwrap().prompt
        };
        let second = planned.iter().find(|request| request.turn == 1).unwrap();
        let first = planned
            .iter()
            .find(|request| request.conversation == second.conversation && request.turn == 0)
            .unwrap();
        let (first, second) = (prompt(first), prompt(second));
        let shared = first.chars().zip(second.chars()).take_while(|(a, b)| a == b).count();
        assert!(shared > first.len() / 2, "shared {shared} of {}", first.len());
    }
}
