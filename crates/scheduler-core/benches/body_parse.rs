//! Cost of reading an OpenAI request body into the model and the flattened prompt
//! (`ParsedBody::parse`), on the shapes the picker sees:
//! - `chat_16k` / `chat_220k`: chat conversations (a system prompt, alternating turns, some
//!   content-part arrays, escapes), about 16 KB and 220 KB;
//! - `completions_16k`: one 16 KB prompt string;
//! - `tokens_8k`: a prompt of 8,192 token ids;
//! - `token_batches_8k`: the same ids as 1,024 batches of 8 (`[[..],[..]]`);
//! - `anthropic_16k`: the chat conversation as an Anthropic Messages body (`system` apart);
//! - `generate_8k`: vLLM's `/inference/v1/generate` with 8,192 `token_ids`;
//! - `grpc_generate_8k`: vLLM's gRPC `Generate` with the same 8,192 token ids (protobuf).
//!
//! `parser_resolve` is the cost of choosing the parser by path (llm-d-router's default list,
//! longest claimed suffix), paid once per request before the body is read.

use std::hint::black_box;

#[path = "support/bodies.rs"]
mod bodies;

use bodies::{chat_body, prose};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use scheduler_core::{ApiKind, ParsedBody, ParserTable};
use serde_json::json;

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

fn token_ids(count: usize) -> Vec<u64> {
    (0..count as u64).map(|index| index.wrapping_mul(2_654_435_761) % 128_000).collect()
}

fn bodies() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let tokens = token_ids(8_192);
    let batches: Vec<&[u64]> = tokens.chunks(8).collect();
    vec![
        ("chat_16k", CHAT, chat_body(16_000)),
        ("chat_220k", CHAT, chat_body(220_000)),
        (
            "completions_16k",
            COMPLETIONS,
            serde_json::to_vec(&json!({"model": "llama", "prompt": prose(3, 16_000)})).unwrap(),
        ),
        (
            "tokens_8k",
            COMPLETIONS,
            serde_json::to_vec(&json!({"model": "llama", "prompt": tokens})).unwrap(),
        ),
        (
            "token_batches_8k",
            COMPLETIONS,
            serde_json::to_vec(&json!({"model": "llama", "prompt": batches})).unwrap(),
        ),
        ("anthropic_16k", "/v1/messages", anthropic_body(16_000)),
        (
            "generate_8k",
            "/inference/v1/generate",
            serde_json::to_vec(
                &json!({"token_ids": tokens, "sampling_params": {"max_tokens": 64}}),
            )
            .unwrap(),
        ),
    ]
}

/// The chat body of `chat_body` as Anthropic writes it: the system message moved to `system`.
fn anthropic_body(bytes: usize) -> Vec<u8> {
    let mut chat: serde_json::Value = serde_json::from_slice(&chat_body(bytes)).unwrap();
    let messages = chat["messages"].as_array_mut().unwrap();
    let system = messages.remove(0)["content"].take();
    chat["system"] = system;
    chat["max_tokens"] = json!(256);
    serde_json::to_vec(&chat).unwrap()
}

fn varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A framed gRPC `GenerateRequest` whose `tokenized.input_ids` are `tokens`, streamed.
fn grpc_generate(tokens: &[u64]) -> Vec<u8> {
    let mut packed = Vec::new();
    for &token in tokens {
        varint(token, &mut packed);
    }
    let mut tokenized = vec![0x12];
    varint(packed.len() as u64, &mut tokenized);
    tokenized.extend_from_slice(&packed);
    let mut message = vec![0x12];
    varint(tokenized.len() as u64, &mut message);
    message.extend_from_slice(&tokenized);
    message.extend_from_slice(&[0x28, 0x01]);
    let mut body = vec![0];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    body
}

fn resolve(c: &mut Criterion) {
    let parsers = ParserTable::default();
    let mut group = c.benchmark_group("parser_resolve");
    for path in ["/v1/chat/completions", "/v1/messages?beta=true", "/v1/rerank"] {
        assert!(parsers.resolve(path).is_some(), "{path}");
        group.bench_with_input(BenchmarkId::from_parameter(path), path, |b, path| {
            b.iter(|| parsers.resolve(black_box(path)))
        });
    }
    group.finish();
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("body_parse");
    for (name, path, body) in bodies() {
        assert!(ParsedBody::parse(Some(path), &body).is_ok(), "{name} must parse");
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), &body, |b, body| {
            b.iter(|| ParsedBody::parse(Some(path), black_box(body)))
        });
    }
    let body = grpc_generate(&token_ids(8_192));
    let grpc = Some(ApiKind::VllmGrpcGenerate);
    let parsed = ParsedBody::parse_as(grpc, &body).expect("grpc_generate_8k must parse");
    assert_eq!(parsed.prompt.split(' ').filter(|token| !token.is_empty()).count(), 8_192);
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_with_input(BenchmarkId::from_parameter("grpc_generate_8k"), &body, |b, body| {
        b.iter(|| ParsedBody::parse_as(grpc, black_box(body)))
    });
    group.finish();
}

criterion_group!(benches, parse, resolve);
criterion_main!(benches);
