//! Tokenizing a chat request of about 4,000 tokens: the template's rendering, the tokenizer,
//! both for a conversation never seen (`cold`), and the next turn of a conversation whose
//! earlier turns were tokenized before (`next_turn`: only the new message is tokenized).
//!
//! `cargo bench -p epp-tokenizer --bench tokenize`

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use tokenizer::{ChatMessage, PromptTokenizer, TokenizerFiles};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// A system prompt and a few turns of English prose, about 16 KB of text.
fn conversation() -> Vec<(String, String)> {
    let prose = "The endpoint picker scores every replica of the pool by its queue, its KV-cache \
                 use and how much of the prompt it already holds, then sends the request to the \
                 best one. Blocks of sixteen tokens are hashed in a chain, so a shared system \
                 prompt maps to the same keys on every request that starts with it. ";
    let turn = |n: usize| prose.repeat(n);
    vec![
        ("system".to_owned(), turn(20)),
        ("user".to_owned(), turn(12)),
        ("assistant".to_owned(), turn(10)),
        ("user".to_owned(), turn(14)),
    ]
}

fn tokenize(c: &mut Criterion) {
    let tokenizer_file = fixture("tokenizer.json");
    let config = fixture("llama3.json");
    let files = TokenizerFiles {
        tokenizer: Some(&tokenizer_file),
        tokenizer_config: Some(&config),
        chat_template: None,
    };
    let tokenizer = PromptTokenizer::from_files(&files).expect("fixture tokenizer loads");
    let uncached = PromptTokenizer::from_files(&files)
        .expect("fixture tokenizer loads")
        .with_piece_cache_tokens(0);
    let turns = conversation();
    let messages: Vec<ChatMessage<'_>> =
        turns.iter().map(|(role, content)| ChatMessage { role, content }).collect();
    let mut ids = Vec::new();
    tokenizer.encode_chat(&messages, &mut ids).expect("renders");
    let text = tokenizer.render_chat(&messages).expect("renders");
    eprintln!("chat request: {} bytes of text, {} tokens", text.len(), ids.len());

    let mut group = c.benchmark_group("chat_4k_tokens");
    group.bench_function("render", |b| {
        b.iter(|| black_box(tokenizer.render_chat(black_box(&messages)).unwrap()))
    });
    group.bench_function("encode_rendered", |b| {
        b.iter(|| {
            tokenizer.encode_text(black_box(&text), &mut ids).unwrap();
            black_box(ids.len())
        })
    });
    group.bench_function("cold", |b| {
        b.iter(|| {
            uncached.encode_chat(black_box(&messages), &mut ids).unwrap();
            black_box(ids.len())
        })
    });
    // The conversation so far is known; each request adds a question not seen before.
    tokenizer.encode_chat(&messages, &mut ids).unwrap();
    let mut turn = 0u64;
    group.bench_function("next_turn", |b| {
        b.iter(|| {
            turn += 1;
            let question = format!("Question {turn}: which replica holds this conversation now?");
            let mut next = messages.clone();
            next.push(ChatMessage { role: "assistant", content: "Noted." });
            next.push(ChatMessage { role: "user", content: &question });
            tokenizer.encode_chat(black_box(&next), &mut ids).unwrap();
            black_box(ids.len())
        })
    });
    group.finish();
}

criterion_group!(benches, tokenize);
criterion_main!(benches);
