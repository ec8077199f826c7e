//! Readers and writers hammering one index from several threads.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use prefix_cache::{IndexConfig, LookupScratch, PrefixIndex};

/// xorshift64*: deterministic per-thread streams without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A prompt made of one of a few shared prefixes followed by a random tail, as chained hashes.
fn prompt(rng: &mut Rng) -> Vec<u64> {
    let prefix = rng.below(6);
    let len = 1 + rng.below(40) as usize;
    let shared = len.min(1 + rng.below(12) as usize);
    (0..len).map(|i| if i < shared { prefix * 1000 + i as u64 } else { rng.next() }).collect()
}

const ENDPOINTS: u64 = 24;
const CAPACITY: usize = 64;

#[test]
fn readers_and_writers_never_deadlock_and_leave_a_consistent_index() {
    let index: PrefixIndex<u64> =
        PrefixIndex::new(IndexConfig { capacity_per_endpoint: CAPACITY, shards: 8 });
    let writers_done = AtomicUsize::new(0);
    let stop_readers = AtomicBool::new(false);
    let lookups = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for writer in 0..3u64 {
            let (index, writers_done) = (&index, &writers_done);
            scope.spawn(move || {
                let mut rng = Rng(0x9e37_79b9 + writer);
                for step in 0..20_000 {
                    let key = rng.below(ENDPOINTS);
                    if step % 97 == 0 {
                        index.remove_endpoint(key);
                    } else {
                        index.record(key, &prompt(&mut rng));
                    }
                }
                writers_done.fetch_add(1, Ordering::SeqCst);
            });
        }
        for reader in 0..3u64 {
            let (index, stop, lookups) = (&index, &stop_readers, &lookups);
            scope.spawn(move || {
                let mut rng = Rng(0x5151_7777 + reader);
                let (mut scratch, mut out) = (LookupScratch::default(), Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let hashes = prompt(&mut rng);
                    index.longest_prefix_matches(&hashes, &mut scratch, &mut out);
                    let mut seen = HashSet::new();
                    for &(key, depth) in &out {
                        assert!(key < ENDPOINTS);
                        assert!((1..=hashes.len()).contains(&depth));
                        assert!(seen.insert(key), "endpoint {key} reported twice");
                    }
                    let _ = index.memory_bytes();
                    lookups.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        while writers_done.load(Ordering::SeqCst) < 3 {
            std::thread::yield_now();
        }
        stop_readers.store(true, Ordering::Relaxed);
    });
    assert!(lookups.load(Ordering::Relaxed) > 0);
    assert_eq!(index.check_invariants(), Ok(()));
    assert!(index.memory_bytes() <= index.memory_bound_bytes());

    // With the writers gone, lookups must agree with what each endpoint reports holding.
    let held: Vec<(u64, HashSet<u64>)> =
        (0..ENDPOINTS).map(|k| (k, index.blocks_of(k).into_iter().collect())).collect();
    assert!(held.iter().all(|(_, blocks)| blocks.len() <= CAPACITY));
    let mut rng = Rng(42);
    let (mut scratch, mut out) = (LookupScratch::default(), Vec::new());
    for _ in 0..500 {
        let hashes = prompt(&mut rng);
        index.longest_prefix_matches(&hashes, &mut scratch, &mut out);
        out.sort_unstable();
        let mut expected: Vec<(u64, usize)> = held
            .iter()
            .map(|(k, blocks)| (*k, hashes.iter().take_while(|h| blocks.contains(h)).count()))
            .filter(|&(_, depth)| depth > 0)
            .collect();
        expected.sort_unstable();
        assert_eq!(out, expected);
    }
}

#[test]
fn concurrent_records_to_one_endpoint_respect_its_capacity() {
    let index: PrefixIndex<u32> =
        PrefixIndex::new(IndexConfig { capacity_per_endpoint: 50, shards: 4 });
    std::thread::scope(|scope| {
        for writer in 0..4u64 {
            let index = &index;
            scope.spawn(move || {
                let mut rng = Rng(7 + writer);
                for step in 0..5_000 {
                    index.record(1, &prompt(&mut rng));
                    if step % 501 == 0 {
                        index.remove_endpoint(1);
                    }
                }
            });
        }
    });
    assert_eq!(index.check_invariants(), Ok(()));
    assert!(index.blocks_of(1).len() <= 50);
    assert_eq!(index.len(), index.blocks_of(1).len());
}
