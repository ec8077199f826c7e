//! Memory at full capacity against the documented bytes-per-block bound.

use prefix_cache::index::MAX_BYTES_PER_BLOCK_AT_CAPACITY;
use prefix_cache::{BlockHasher, IndexConfig, PrefixIndex};

#[test]
fn full_index_stays_within_48_bytes_per_block() {
    const ENDPOINTS: u64 = 48;
    let config = IndexConfig::default();
    let capacity = config.capacity_per_endpoint;
    let index: PrefixIndex<u64> = PrefixIndex::new(config);
    let hasher = BlockHasher::default();
    let mut hashes = Vec::new();
    // Prompts of 256 blocks, each endpoint sharing a system prompt with a few others; enough of
    // them to fill every endpoint and then churn through evictions.
    let mut prompt = vec![0u8; 64 * 256];
    for endpoint in 0..ENDPOINTS {
        for request in 0..(capacity as u64 / 200 + 40) {
            prompt[..8].copy_from_slice(&(endpoint % 8).to_le_bytes());
            prompt[640..648].copy_from_slice(&(endpoint * 1_000_003 + request).to_le_bytes());
            hasher.hash_prompt("model", &prompt, &mut hashes);
            index.record(endpoint, &hashes);
        }
    }
    let blocks = index.len();
    assert_eq!(blocks, ENDPOINTS as usize * capacity, "every endpoint is full");
    let bytes = index.memory_bytes();
    // Per-endpoint and per-shard constants are outside the per-block figure.
    let constants = 64 * 512 + ENDPOINTS as usize * 512 + 4096;
    let per_block = bytes as f64 / blocks as f64;
    println!("{bytes} bytes for {blocks} blocks: {per_block:.2} bytes/block");
    assert!(bytes <= MAX_BYTES_PER_BLOCK_AT_CAPACITY * blocks + constants);
    assert!(bytes <= index.memory_bound_bytes());
    assert_eq!(MAX_BYTES_PER_BLOCK_AT_CAPACITY, 48);
    assert_eq!(index.check_invariants(), Ok(()));

    // Removing endpoints shrinks the shards back under the bound.
    for endpoint in 0..ENDPOINTS / 2 {
        assert!(index.remove_endpoint(endpoint));
    }
    let remaining = index.len();
    assert_eq!(remaining, (ENDPOINTS / 2) as usize * capacity);
    assert!(index.memory_bytes() <= MAX_BYTES_PER_BLOCK_AT_CAPACITY * remaining + constants);
    assert_eq!(index.check_invariants(), Ok(()));
}

#[test]
fn empty_index_is_small() {
    let index: PrefixIndex<u64> = PrefixIndex::default();
    assert!(index.memory_bytes() < 16 * 1024, "{}", index.memory_bytes());
    index.record(1, &[1, 2, 3]);
    index.remove_endpoint(1);
    assert!(index.memory_bytes() < 16 * 1024, "{}", index.memory_bytes());
    assert!(index.is_empty());
}
