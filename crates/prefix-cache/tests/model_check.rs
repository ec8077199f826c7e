//! A fuzz target body, reusable from a `cargo fuzz` target (`fuzz_one(data)`), driven here over a
//! few thousand pseudo-random byte strings: the bytes decode into an index configuration and an
//! operation sequence that is run against the reference model (`common::Model`).

mod common;

use common::Model;
use prefix_cache::{IndexConfig, LookupScratch, PrefixIndex, mix64};

/// Keys above the bitset threshold (32 holders) so popular blocks switch representation.
const KEYS: u8 = 48;

/// Reads bytes off the input; an exhausted input reads as zeros, so every string decodes.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn next(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&first, rest)) => {
                self.0 = rest;
                first
            }
            None => 0,
        }
    }

    fn hashes(&mut self) -> Vec<u64> {
        let len = self.next() % 9;
        (0..len)
            .map(|_| match self.next() {
                // Mostly a handful of shared blocks, sometimes a wide one.
                b if b >= 240 => u64::from(b) << 40 | u64::from(self.next()),
                b => u64::from(b % 7),
            })
            .collect()
    }
}

/// Runs the operations encoded in `data` on an index and the model, panicking on the first
/// disagreement. Returns the most blocks seen in bitset form at once, for coverage checks.
pub(crate) fn fuzz_one(data: &[u8]) -> usize {
    let mut input = Bytes(data);
    let capacity = usize::from(input.next() % 9);
    let shards = 1 + usize::from(input.next() % 4);
    let index = PrefixIndex::new(IndexConfig { capacity_per_endpoint: capacity, shards });
    let mut model = Model::new(capacity);
    let keys: Vec<u8> = (0..KEYS).collect();
    let (mut scratch, mut out) = (LookupScratch::default(), Vec::new());
    let mut most_sets = 0;
    while !input.0.is_empty() {
        match input.next() % 8 {
            0..=4 => {
                let key = input.next() % KEYS;
                let hashes = input.hashes();
                index.record(key, &hashes);
                model.record(key, &hashes);
            }
            5 | 6 => {
                let hashes = input.hashes();
                if let Some(mismatch) =
                    model.lookup_mismatch(&index, &hashes, &mut scratch, &mut out)
                {
                    panic!("{mismatch}");
                }
            }
            _ => {
                let key = input.next() % KEYS;
                assert_eq!(index.remove_endpoint(key), model.blocks.remove(&key).is_some());
            }
        }
        if let Err(violation) = index.check_invariants() {
            panic!("{violation}");
        }
        most_sets = most_sets.max(index.bitset_blocks());
    }
    if let Some(problem) = model.disagreement(&index, &keys) {
        panic!("{problem}");
    }
    most_sets
}

#[test]
fn random_byte_strings_agree_with_the_model() {
    // splitmix64: a fixed stream, so a failure replays.
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(state)
    };
    let mut with_sets = 0;
    for case in 0..3_000 {
        let len = if case % 10 == 0 { 2_000 } else { (next() % 400) as usize };
        let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if fuzz_one(&data) > 0 {
            with_sets += 1;
        }
    }
    assert!(with_sets > 0, "no input reached the bitset representation");
}

#[test]
fn degenerate_inputs_decode() {
    for data in [&[][..], &[0], &[255; 64], &[7, 3, 0, 255, 255, 255, 255]] {
        fuzz_one(data);
    }
}
