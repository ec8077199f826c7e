//! Properties of prompt block hashing.

use prefix_cache::{BlockHasher, BlockHasherConfig};

fn hashes(hasher: &BlockHasher, model: &str, prompt: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    hasher.hash_prompt(model, prompt, &mut out);
    out
}

fn prompt(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i * 7 % 26) as u8).collect()
}

#[test]
fn same_prompt_same_hashes() {
    let hasher = BlockHasher::default();
    let text = prompt(1000);
    assert_eq!(hashes(&hasher, "m", &text), hashes(&hasher, "m", &text));
    assert_eq!(hashes(&hasher, "m", &text).len(), 1000 / 64);
}

#[test]
fn one_changed_character_changes_its_block_and_later_ones_only() {
    let hasher = BlockHasher::default();
    let text = prompt(64 * 10);
    let base = hashes(&hasher, "m", &text);
    for block in 0..10 {
        for offset in [0, 31, 63] {
            let mut changed = text.clone();
            changed[block * 64 + offset] ^= 1;
            let other = hashes(&hasher, "m", &changed);
            assert_eq!(other[..block], base[..block], "block {block} offset {offset}");
            for k in block..10 {
                assert_ne!(other[k], base[k], "block {k} after a change in block {block}");
            }
        }
    }
}

#[test]
fn different_models_share_no_block() {
    let hasher = BlockHasher::default();
    let text = prompt(64 * 50);
    let a = hashes(&hasher, "llama-3-8b", &text);
    let b = hashes(&hasher, "llama-3-8b-lora", &text);
    assert_eq!(a.len(), 50);
    assert!(a.iter().all(|h| !b.contains(h)));
}

#[test]
fn prompts_shorter_than_a_block_hash_to_nothing() {
    let hasher = BlockHasher::default();
    let mut out = vec![1, 2, 3];
    hasher.hash_prompt("m", &prompt(63), &mut out);
    assert!(out.is_empty());
    hasher.hash_prompt("m", b"", &mut out);
    assert!(out.is_empty());
    assert_eq!(hashes(&hasher, "m", &prompt(64)).len(), 1);
    assert_eq!(hashes(&hasher, "m", &prompt(127)).len(), 1);
}

#[test]
fn trailing_partial_block_does_not_change_whole_blocks() {
    let hasher = BlockHasher::default();
    let text = prompt(64 * 3 + 20);
    assert_eq!(hashes(&hasher, "m", &text), hashes(&hasher, "m", &text[..64 * 3]));
}

#[test]
fn max_blocks_is_respected() {
    let hasher = BlockHasher::new(BlockHasherConfig { block_size: 16, max_blocks: 5 });
    let long = hashes(&hasher, "m", &prompt(16 * 100));
    assert_eq!(long.len(), 5);
    assert_eq!(long, hashes(&hasher, "m", &prompt(16 * 5)));
    let default = BlockHasher::default();
    assert_eq!(hashes(&default, "m", &prompt(64 * 1000)).len(), 256);
}

#[test]
fn degenerate_configs_hash_nothing_without_panicking() {
    for config in [
        BlockHasherConfig { block_size: 0, max_blocks: 256 },
        BlockHasherConfig { block_size: 64, max_blocks: 0 },
    ] {
        assert!(hashes(&BlockHasher::new(config), "m", &prompt(1000)).is_empty());
    }
}

#[test]
fn reused_buffer_does_not_reallocate() {
    let hasher = BlockHasher::default();
    let mut out = Vec::with_capacity(256);
    let before = out.as_ptr();
    for len in [64 * 256, 64 * 3, 64 * 300] {
        hasher.hash_prompt("m", &prompt(len), &mut out);
        assert_eq!(out.as_ptr(), before);
    }
}
