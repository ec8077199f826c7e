//! Token usage from a response body: the `usage` object of an OpenAI JSON response, or of the
//! last SSE chunk that carries one (streamed responses report it at the end when asked to).
//!
//! Only a bounded tail of the body is kept: usage sits at the end of both shapes, so memory per
//! stream stays constant however long the response.

use serde::Deserialize;

/// How much of the response's end is kept to find the usage object.
pub const TAIL_BYTES: usize = 16 * 1024;

/// Token counts reported by the model server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    /// Tokens of the prompt.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Tokens generated.
    #[serde(default)]
    pub completion_tokens: u64,
    /// Prompt and generated tokens together.
    #[serde(default)]
    pub total_tokens: u64,
    /// Details of the prompt tokens, when reported.
    #[serde(default)]
    pub prompt_tokens_details: Option<PromptTokenDetails>,
}

/// The `prompt_tokens_details` of a usage object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct PromptTokenDetails {
    /// Prompt tokens served from the model server's cache.
    #[serde(default)]
    pub cached_tokens: u64,
}

impl Usage {
    /// The usage as the plugins' response hooks receive it.
    pub fn to_response_usage(&self) -> scheduler_core::ResponseUsage {
        scheduler_core::ResponseUsage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self.total_tokens,
            cached_tokens: self.prompt_tokens_details.map(|details| details.cached_tokens),
        }
    }
}

/// The last [`TAIL_BYTES`] of a response body.
#[derive(Debug, Default)]
pub struct ResponseTail {
    tail: Vec<u8>,
    total_bytes: u64,
}

impl ResponseTail {
    /// Appends a chunk, keeping only the tail.
    pub fn push(&mut self, chunk: &[u8]) {
        self.total_bytes += chunk.len() as u64;
        if chunk.len() >= TAIL_BYTES {
            self.tail.clear();
            self.tail.extend_from_slice(&chunk[chunk.len() - TAIL_BYTES..]);
            return;
        }
        let overflow = (self.tail.len() + chunk.len()).saturating_sub(TAIL_BYTES);
        self.tail.drain(..overflow);
        self.tail.extend_from_slice(chunk);
    }

    /// Bytes seen in all.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// The usage of the last `"usage"` object in the tail that parses, if any.
    pub fn usage(&self) -> Option<Usage> {
        let needle = b"\"usage\"";
        let mut end = self.tail.len();
        while let Some(at) = find_last(&self.tail[..end], needle) {
            if let Some(usage) = parse_usage_after(&self.tail[at + needle.len()..]) {
                return Some(usage);
            }
            end = at;
        }
        None
    }
}

fn find_last(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|window| window == needle)
}

fn parse_usage_after(rest: &[u8]) -> Option<Usage> {
    let colon = rest.iter().position(|&b| !b.is_ascii_whitespace())?;
    if rest[colon] != b':' {
        return None;
    }
    let value = &rest[colon + 1..];
    let mut values = serde_json::Deserializer::from_slice(value).into_iter::<Option<Usage>>();
    values.next()?.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage_of(chunks: &[&str]) -> Option<Usage> {
        let mut tail = ResponseTail::default();
        for chunk in chunks {
            tail.push(chunk.as_bytes());
        }
        tail.usage()
    }

    #[test]
    fn json_response_usage() {
        let body = r#"{"id":"x","choices":[{"text":"hi"}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":8}}}"#;
        let usage = usage_of(&[body]).unwrap();
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (12, 3));
        assert_eq!(
            usage.to_response_usage(),
            scheduler_core::ResponseUsage {
                prompt_tokens: 12,
                completion_tokens: 3,
                total_tokens: 15,
                cached_tokens: Some(8),
            }
        );
    }

    #[test]
    fn sse_last_chunk_usage_across_chunk_boundaries() {
        let chunks = [
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tok",
            "ens\":7,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n",
        ];
        assert_eq!(
            usage_of(&chunks),
            Some(Usage { prompt_tokens: 7, completion_tokens: 2, ..Usage::default() })
        );
    }

    #[test]
    fn no_usage_or_garbage() {
        assert_eq!(usage_of(&["data: {\"usage\": null}\n\n"]), None);
        assert_eq!(usage_of(&["\"usage\": {\"prompt_tokens\": \"x\"}"]), None);
        assert_eq!(usage_of(&["plain text"]), None);
    }

    #[test]
    fn tail_is_bounded() {
        let mut tail = ResponseTail::default();
        for _ in 0..100 {
            tail.push(&[b'x'; 1000]);
        }
        let usage = br#""usage":{"prompt_tokens":1,"completion_tokens":1}"#;
        tail.push(usage);
        assert!(tail.tail.len() <= TAIL_BYTES);
        assert_eq!(
            tail.usage(),
            Some(Usage { prompt_tokens: 1, completion_tokens: 1, ..Usage::default() })
        );
        assert_eq!(tail.total_bytes(), 100_000 + usage.len() as u64);
    }
}
