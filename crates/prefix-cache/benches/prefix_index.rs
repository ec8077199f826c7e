//! Prefix index benchmarks: prompt hashing, lookup and record against a full index, and the same
//! operations against a baseline built from `lru::LruCache` plus a reverse `HashMap`.
//!
//! Workload: 1,000 endpoints; each endpoint receives 256-block prompts that start with one of the
//! 8-block system prompts of its group of 10 endpoints (100 groups x 10 system prompts), followed
//! by a unique tail, until its LRU is full. So a system prompt is held by about 10 endpoints and a
//! tail by one. The lookup cases then make the query's system prompt, and finally its whole
//! prompt, held by every endpoint: the common production case of one shared system prompt.

use std::collections::{HashMap, HashSet};
use std::hint::black_box;
use std::num::NonZeroUsize;
use std::time::Instant;

use criterion::measurement::WallTime;
use criterion::{
    BatchSize, BenchmarkGroup, BenchmarkId, Criterion, criterion_group, criterion_main,
};
use prefix_cache::{BlockHasher, IndexConfig, LookupScratch, PrefixIndex, mix64};

const ENDPOINTS: u64 = 1_000;
const PROMPT_BLOCKS: usize = 256;
const SYSTEM_BLOCKS: usize = 8;
const GROUP_SIZE: u64 = 10;
const SYSTEM_PROMPTS_PER_GROUP: u64 = 10;
/// Capacity for the side-by-side comparison with the `lru` baseline, whose per-entry cost makes
/// 1,000 x 31,250 entries impractical on a small machine.
const COMPARISON_CAPACITY: usize = 4_096;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }
}

/// Chained block hashes of a synthetic prompt: a system prompt then a random tail.
fn prompt(endpoint: u64, rng: &mut Rng) -> Vec<u64> {
    let group = endpoint / GROUP_SIZE;
    let system = group * SYSTEM_PROMPTS_PER_GROUP + rng.next() % SYSTEM_PROMPTS_PER_GROUP;
    let mut parent = xxhash_rust::xxh3::xxh3_64(&system.to_le_bytes());
    (0..PROMPT_BLOCKS)
        .map(|i| {
            let content = if i < SYSTEM_BLOCKS { i as u64 } else { rng.next() };
            parent = xxhash_rust::xxh3::xxh3_64_with_seed(&content.to_le_bytes(), parent);
            parent
        })
        .collect()
}

/// Anything that can be filled with prompts and queried.
trait Index {
    /// The buffers a lookup reuses, owned by the caller (one per thread).
    type Scratch: Default;
    fn record(&mut self, endpoint: u64, hashes: &[u64]);
    fn lookup(&self, hashes: &[u64], scratch: &mut Self::Scratch, out: &mut Vec<(u64, usize)>);
}

impl Index for PrefixIndex<u64> {
    type Scratch = LookupScratch;

    fn record(&mut self, endpoint: u64, hashes: &[u64]) {
        PrefixIndex::record(self, endpoint, hashes);
    }

    fn lookup(&self, hashes: &[u64], scratch: &mut LookupScratch, out: &mut Vec<(u64, usize)>) {
        self.longest_prefix_matches(hashes, scratch, out);
    }
}

/// The straightforward design: an `lru::LruCache` per endpoint and a reverse map of sets.
struct LruBaseline {
    capacity: NonZeroUsize,
    endpoints: HashMap<u64, lru::LruCache<u64, ()>>,
    holders: HashMap<u64, HashSet<u64>>,
}

impl LruBaseline {
    fn new(capacity: usize) -> Self {
        Self {
            capacity: NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN),
            endpoints: HashMap::new(),
            holders: HashMap::new(),
        }
    }
}

impl Index for LruBaseline {
    type Scratch = ();

    fn record(&mut self, endpoint: u64, hashes: &[u64]) {
        let capacity = self.capacity;
        let lru = self.endpoints.entry(endpoint).or_insert_with(|| lru::LruCache::new(capacity));
        for &hash in hashes[..hashes.len().min(capacity.get())].iter().rev() {
            if lru.get(&hash).is_some() {
                continue;
            }
            if let Some((evicted, ())) = lru.push(hash, ())
                && let Some(set) = self.holders.get_mut(&evicted)
            {
                set.remove(&endpoint);
                if set.is_empty() {
                    self.holders.remove(&evicted);
                }
            }
            self.holders.entry(hash).or_default().insert(endpoint);
        }
    }

    fn lookup(&self, hashes: &[u64], (): &mut (), out: &mut Vec<(u64, usize)>) {
        out.clear();
        let Some(first) = hashes.first().and_then(|h| self.holders.get(h)) else {
            return;
        };
        out.extend(first.iter().map(|&e| (e, 1)));
        // out[..alive] still match; the others keep the depth at which they stopped.
        let mut alive = out.len();
        for (i, hash) in hashes.iter().enumerate().skip(1) {
            let Some(set) = self.holders.get(hash) else {
                break;
            };
            let mut j = 0;
            while j < alive {
                if set.contains(&out[j].0) {
                    out[j].1 = i + 1;
                    j += 1;
                } else {
                    alive -= 1;
                    out.swap(j, alive);
                }
            }
            if alive == 0 {
                break;
            }
        }
    }
}

/// Fills every endpoint to `capacity`, then records the returned query prompt on a few endpoints
/// of one group, most recently, so it is held in full.
fn fill(index: &mut impl Index, capacity: usize) -> Vec<u64> {
    let mut rng = Rng(0x5eed);
    let prompts_per_endpoint = capacity.div_ceil(PROMPT_BLOCKS - SYSTEM_BLOCKS) + 1;
    for _ in 0..prompts_per_endpoint {
        for endpoint in 0..ENDPOINTS {
            index.record(endpoint, &prompt(endpoint, &mut rng));
        }
    }
    let query = prompt(420, &mut rng);
    for endpoint in [420, 421, 425] {
        index.record(endpoint, &query);
    }
    query
}

fn bench_hash(c: &mut Criterion) {
    let hasher = BlockHasher::default();
    let text: Vec<u8> = (0..16 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
    let mut out = Vec::with_capacity(256);
    c.bench_function("hash/16k_chars_256_blocks", |b| {
        b.iter(|| hasher.hash_prompt(black_box("llama-3-8b"), black_box(&text), &mut out))
    });
}

/// Lookups (deep hit, miss, then a prefix held by every endpoint) and records on `index`, under
/// `label/...` in `group`.
fn bench_index<I: Index>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    label: &str,
    index: &mut I,
    query: &[u64],
) {
    let mut scratch = I::Scratch::default();
    let mut out = Vec::with_capacity(ENDPOINTS as usize);
    let mut miss = query.to_vec();
    miss[0] ^= 1;
    for (name, hashes) in [("deep_hit", query), ("miss", &miss[..])] {
        group.bench_function(BenchmarkId::new(format!("{label}/lookup_256"), name), |b| {
            b.iter(|| index.lookup(black_box(hashes), &mut scratch, &mut out))
        });
    }
    // Every endpoint now also holds the query's system prompt: the candidate set starts at
    // 1,000 endpoints and shrinks to the query's three holders after the eighth block.
    for endpoint in 0..ENDPOINTS {
        index.record(endpoint, &query[..SYSTEM_BLOCKS]);
    }
    index.lookup(query, &mut scratch, &mut out);
    assert_eq!(out.len(), ENDPOINTS as usize);
    assert_eq!(out.iter().filter(|e| e.1 == PROMPT_BLOCKS).count(), 3);
    group.bench_function(BenchmarkId::new(format!("{label}/lookup_256"), "popular_prefix"), |b| {
        b.iter(|| index.lookup(black_box(query), &mut scratch, &mut out))
    });

    // New prompts on random endpoints: 248 new blocks each, evicting as many.
    let mut rng = Rng(99);
    group.bench_function(format!("{label}/record_256/new_blocks_evicting"), |b| {
        b.iter_batched(
            || {
                let endpoint = rng.next() % ENDPOINTS;
                (endpoint, prompt(endpoint, &mut rng))
            },
            |(endpoint, hashes)| index.record(endpoint, black_box(&hashes)),
            BatchSize::SmallInput,
        )
    });
    // The server's case: a prompt of 256 blocks no endpoint holds, each evicting a block.
    group.bench_function(format!("{label}/record 256 new blocks into a full index"), |b| {
        b.iter_batched(
            || {
                let endpoint = rng.next() % ENDPOINTS;
                let hashes: Vec<u64> = (0..PROMPT_BLOCKS).map(|_| rng.next()).collect();
                (endpoint, hashes)
            },
            |(endpoint, hashes)| index.record(endpoint, black_box(&hashes)),
            BatchSize::SmallInput,
        )
    });
    group.bench_function(format!("{label}/record_256/held_blocks"), |b| {
        b.iter(|| index.record(420, black_box(query)))
    });

    // Every endpoint now holds the whole query: each of its 256 blocks is held by all 1,000
    // endpoints, and all of them match to full length.
    for endpoint in 0..ENDPOINTS {
        index.record(endpoint, query);
    }
    index.lookup(query, &mut scratch, &mut out);
    assert_eq!(out.iter().filter(|e| e.1 == PROMPT_BLOCKS).count(), ENDPOINTS as usize);
    group.bench_function(
        BenchmarkId::new(format!("{label}/lookup_256"), "popular_whole_prompt"),
        |b| b.iter(|| index.lookup(black_box(query), &mut scratch, &mut out)),
    );
    group.bench_function(format!("{label}/record_256/popular_held_blocks"), |b| {
        b.iter(|| index.record(420, black_box(query)))
    });
}

fn bench_full_index(c: &mut Criterion) {
    let capacity = IndexConfig::default().capacity_per_endpoint;
    let mut index: PrefixIndex<u64> = PrefixIndex::new(IndexConfig::default());
    let started = Instant::now();
    let query = fill(&mut index, capacity);
    let blocks = index.len();
    let bytes = index.memory_bytes();
    eprintln!(
        "full index: {ENDPOINTS} endpoints x {capacity} blocks = {blocks} pairs built in {:.1?}; \
         memory_bytes {bytes} = {:.2} bytes/block",
        started.elapsed(),
        bytes as f64 / blocks as f64
    );
    let mut group = c.benchmark_group("full_1000x31250");
    bench_index(&mut group, "prefix_index", &mut index, &query);
    group.finish();
    let (blocks, bytes) = (index.len(), index.memory_bytes());
    eprintln!(
        "full index after the popular cases: {blocks} pairs, {} bitset blocks; memory_bytes \
         {bytes} = {:.2} bytes/block",
        index.bitset_blocks(),
        bytes as f64 / blocks as f64
    );
}

fn bench_against_lru(c: &mut Criterion) {
    let mut group = c.benchmark_group("vs_lru_1000x4096");
    let mut ours: PrefixIndex<u64> = PrefixIndex::new(IndexConfig {
        capacity_per_endpoint: COMPARISON_CAPACITY,
        ..IndexConfig::default()
    });
    let query = fill(&mut ours, COMPARISON_CAPACITY);
    bench_index(&mut group, "prefix_index", &mut ours, &query);
    drop(ours);
    let mut baseline = LruBaseline::new(COMPARISON_CAPACITY);
    let baseline_query = fill(&mut baseline, COMPARISON_CAPACITY);
    assert_eq!(query, baseline_query);
    bench_index(&mut group, "lru_baseline", &mut baseline, &query);
    group.finish();
}

criterion_group!(benches, bench_hash, bench_full_index, bench_against_lru);
criterion_main!(benches);
