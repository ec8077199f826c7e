//! Request bodies the benches share: prose with the escapes chat turns carry, and chat
//! conversations of a given size (`model` after `messages`, as serde_json orders keys, so a
//! scan for the model crosses the whole conversation).

use serde_json::{Value, json};

/// Text of `len` bytes that reads like prose, with the escapes a chat turn carries
/// (newlines, quotes, a non-ASCII character).
pub(crate) fn prose(seed: usize, len: usize) -> String {
    const WORDS: [&str; 12] = [
        "the",
        "model",
        "server",
        "\"quoted\"",
        "prefix",
        "cache",
        "line\n",
        "token",
        "é",
        "request",
        "endpoint",
        "picker",
    ];
    let mut text = String::with_capacity(len + 16);
    let mut index = seed;
    while text.len() < len {
        text.push_str(WORDS[index % WORDS.len()]);
        text.push(' ');
        index = index.wrapping_mul(31).wrapping_add(7);
    }
    text
}

pub(crate) fn chat_body(target_len: usize) -> Vec<u8> {
    let mut messages = vec![json!({"role": "system", "content": prose(1, 2_000)})];
    let mut turn = 0;
    loop {
        let body = serde_json::to_vec(&json!({"model": "llama", "messages": messages})).unwrap();
        if body.len() >= target_len {
            return body;
        }
        turn += 1;
        let message: Value = match turn % 4 {
            1 => json!({"role": "user", "content": prose(turn, 600)}),
            3 => json!({"role": "user", "content": [
                {"type": "text", "text": prose(turn, 300)},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                {"type": "text", "text": prose(turn + 1, 300)},
            ]}),
            _ => json!({"role": "assistant", "content": prose(turn, 900)}),
        };
        messages.push(message);
    }
}
