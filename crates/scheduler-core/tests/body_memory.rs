//! Peak memory of parsing a request body, counted by a global allocator that tracks the bytes
//! live on this thread (allocation-counter); the body itself is allocated before counting.
//!
//! The bound (at most twice the body) is the one the ext-proc server relies on when it admits
//! bodies up to its limit: the earlier parser buffered every JSON node of the prompt as a generic
//! value first and raised the server's peak RSS by 1.9 GiB for one 32 MiB body of token arrays.

use scheduler_core::ParsedBody;

const BODY_BYTES: usize = 32 * 1024 * 1024;

/// `{"model":"m","prompt":[<item>,<item>,...]}` of about [`BODY_BYTES`].
fn body_of(item: &str) -> Vec<u8> {
    let head = br#"{"model":"m","prompt":["#;
    let mut body = Vec::with_capacity(BODY_BYTES + item.len() + 8);
    body.extend_from_slice(head);
    while body.len() < BODY_BYTES {
        body.extend_from_slice(item.as_bytes());
        body.push(b',');
    }
    body.pop();
    body.extend_from_slice(b"]}");
    body
}

/// Peak bytes allocated while parsing `body`, and the prompt's length.
fn peak_while_parsing(body: &[u8]) -> (u64, usize) {
    let mut prompt_len = 0;
    let info = allocation_counter::measure(|| {
        let parsed = ParsedBody::parse(Some("/v1/completions"), body);
        prompt_len = parsed.map(|parsed| parsed.prompt.len()).unwrap_or_default();
    });
    (info.bytes_max, prompt_len)
}

#[test]
fn token_arrays_parse_within_twice_the_body() {
    for (item, prompt_per_item) in [("[0]", 2), ("[128000,7]", 9), ("0", 2), ("\"ab\"", 3)] {
        let body = body_of(item);
        let (peak, prompt_len) = peak_while_parsing(&body);
        let items = (body.len() - 24) / (item.len() + 1);
        assert!(prompt_len >= items * prompt_per_item, "{item}: the prompt holds every item");
        let ratio = peak as f64 / body.len() as f64;
        eprintln!("{item}: body {} B, peak {peak} B, {ratio:.2} x the body", body.len());
        assert!(peak <= 2 * body.len() as u64, "{item}: peak {peak} B is {ratio:.2} x the body");
    }
}
