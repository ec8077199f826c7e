//! What a model's tokenizer costs the EPP: resident memory once loaded, load time, and the
//! time to render and tokenize a chat request of about 4,000 tokens, never seen before and as
//! the next turn of a conversation whose earlier turns were tokenized.
//!
//! ```sh
//! cargo run --release -p epp-tokenizer --example tokenizer_cost -- \
//!     path/to/tokenizer.json [path/to/tokenizer_config.json]
//! ```
//!
//! Without arguments it measures the small test tokenizer in `fixtures/`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokenizer::{ChatMessage, PromptTokenizer, TokenizerFiles};

/// This process's resident memory in KiB (Linux), if it can be read.
fn resident_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut args = std::env::args().skip(1);
    let tokenizer_path = args.next().map_or_else(|| fixtures.join("tokenizer.json"), PathBuf::from);
    let config_path = args.next().map_or_else(|| fixtures.join("llama3.json"), PathBuf::from);

    let before = resident_kib();
    let started = Instant::now();
    let tokenizer = PromptTokenizer::from_files(&TokenizerFiles {
        tokenizer: Some(&tokenizer_path),
        tokenizer_config: Some(&config_path),
        chat_template: None,
    })?
    .with_piece_cache_tokens(0);
    let load = started.elapsed();
    let after = resident_kib();
    println!("tokenizer: {} ({} tokens)", tokenizer_path.display(), tokenizer.vocabulary_size());
    println!("load: {:.1} ms", load.as_secs_f64() * 1e3);
    if let (Some(before), Some(after)) = (before, after) {
        println!("resident memory added by loading: {:.1} MiB", (after - before) as f64 / 1024.0);
    }

    let prose = "The endpoint picker scores every replica of the pool by its queue, its KV-cache \
                 use and how much of the prompt it already holds, then sends the request to the \
                 best one. Blocks of sixteen tokens are hashed in a chain, so a shared system \
                 prompt maps to the same keys on every request that starts with it. ";
    let turns = [("system", 20), ("user", 12), ("assistant", 10), ("user", 14)]
        .map(|(role, n)| (role, prose.repeat(n)));
    let messages: Vec<ChatMessage<'_>> =
        turns.iter().map(|(role, content)| ChatMessage { role, content }).collect();
    let mut ids = Vec::new();
    let mut cold: Vec<Duration> = (0..51)
        .map(|_| {
            let started = Instant::now();
            tokenizer.encode_chat(&messages, &mut ids).expect("the chat renders");
            started.elapsed()
        })
        .collect();
    let text_len = tokenizer.render_chat(&messages)?.len();
    report(&format!("new chat of {text_len} bytes, {} tokens", ids.len()), &mut cold);

    let tokenizer = tokenizer.with_piece_cache_tokens(4 << 20);
    tokenizer.encode_chat(&messages, &mut ids)?;
    let mut next_turn: Vec<Duration> = (0..51)
        .map(|turn| {
            let question = format!("Question {turn}: which replica holds this conversation now?");
            let mut next = messages.clone();
            next.push(ChatMessage { role: "assistant", content: "Noted." });
            next.push(ChatMessage { role: "user", content: &question });
            let started = Instant::now();
            tokenizer.encode_chat(&next, &mut ids).expect("the chat renders");
            started.elapsed()
        })
        .collect();
    report(&format!("next turn, {} tokens", ids.len()), &mut next_turn);
    if let Some(now) = resident_kib() {
        println!("resident memory now: {:.1} MiB", now as f64 / 1024.0);
    }
    Ok(())
}

/// Prints the median, minimum and maximum of `times`.
fn report(what: &str, times: &mut [Duration]) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{what}: median {:.3} ms to render and tokenize (min {:.3}, max {:.3}, {} runs)",
        ms(times[times.len() / 2]),
        ms(times[0]),
        ms(times[times.len() - 1]),
        times.len()
    );
}
