//! Precise index benchmarks: event ingestion (decode + key computation + index update) and
//! lookups, alone and while another thread ingests.
//!
//! Ingestion workload: one endpoint, vLLM's block size of 16 tokens. Each message is one batch
//! of 16 `BlockStored` events of 16 blocks each (a 256-block sequence, chained by parent hash)
//! followed by 16 `BlockRemoved` events removing the previous message's 256 blocks, so the
//! index stays at steady state: 512 block events per message. Throughput is reported in block
//! events (one stored or removed block each).
//!
//! Lookup workload: 8 endpoints each holding the same 256-block (4,096-token) prefix plus
//! unique blocks up to capacity; the request is that prefix. "contended" runs the lookups
//! while a second thread ingests into all 8 endpoints without pause.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kv_events::{
    BlockRemoved, BlockStored, Encoding, EndpointMatch, Event, EventBatch, IndexConfig,
    PreciseIndex, TokenProcessor, TokenProcessorConfig, encode_batch,
};

const BS: u32 = 16;
const EVENTS: u64 = 16;
const BLOCKS_PER_EVENT: u64 = 16;

/// Message `n` of the ingestion workload: engine hashes are unique per message.
fn message(n: u64, encoding: Encoding) -> (Vec<u8>, u64) {
    let base = n * EVENTS * BLOCKS_PER_EVENT + 1;
    let mut events = Vec::new();
    let mut parent = None;
    for e in 0..EVENTS {
        let hashes: Vec<u64> =
            (0..BLOCKS_PER_EVENT).map(|b| base + e * BLOCKS_PER_EVENT + b).collect();
        let tokens: Vec<u32> = (0..BLOCKS_PER_EVENT * u64::from(BS))
            .map(|t| ((base + e * 1000 + t) % 50_000) as u32)
            .collect();
        events.push(Event::BlockStored(BlockStored {
            block_hashes: hashes.clone(),
            parent_block_hash: parent,
            token_ids: tokens,
            block_size: BS,
            medium: Some("GPU".into()),
            ..BlockStored::default()
        }));
        parent = hashes.last().copied();
    }
    if n > 0 {
        let prev = base - EVENTS * BLOCKS_PER_EVENT;
        for e in 0..EVENTS {
            events.push(Event::BlockRemoved(BlockRemoved {
                block_hashes: (0..BLOCKS_PER_EVENT)
                    .map(|b| prev + e * BLOCKS_PER_EVENT + b)
                    .collect(),
                medium: Some("GPU".into()),
                group_idx: None,
            }));
        }
    }
    let batch = EventBatch { ts: 1.0, events, data_parallel_rank: Some(0) };
    (encode_batch(&batch, encoding), EVENTS * BLOCKS_PER_EVENT * 2)
}

fn processor() -> TokenProcessor {
    TokenProcessor::new(&TokenProcessorConfig { block_size_tokens: BS, ..Default::default() })
}

fn ingestion(c: &mut Criterion) {
    let mut group = c.benchmark_group("ingest");
    for (name, encoding) in [("array", Encoding::ArrayTagged), ("map", Encoding::Map)] {
        // A ring of messages; each refers to the one before, so it is replayed in order with
        // sequence numbers that keep increasing (the first of the ring is re-sent after the
        // last: its removals of unknown hashes are no-ops, its stores start a new chain).
        let ring: Vec<Vec<u8>> = (0..64).map(|n| message(n, encoding).0).collect();
        let per_message = EVENTS * BLOCKS_PER_EVENT * 2;
        group.throughput(Throughput::Elements(per_message));
        let index = PreciseIndex::new(processor(), IndexConfig::default());
        index.add_endpoint(0u32);
        let mut seq = 0u64;
        group.bench_function(name, |b| {
            b.iter(|| {
                let payload = &ring[(seq % ring.len() as u64) as usize];
                let r = index.ingest(0, seq, "meta-llama/Llama-3.1-8B-Instruct", payload);
                seq += 1;
                black_box(r).ok();
            });
        });
        assert_eq!(index.stats().gaps, 0);
    }
    group.finish();
}

fn lookups(c: &mut Criterion) {
    const ENDPOINTS: u32 = 8;
    let index =
        Arc::new(PreciseIndex::new(processor(), IndexConfig { capacity_per_endpoint: 16_384 }));
    let shared: Vec<u32> = (0..256 * BS).map(|t| t * 7 % 50_000).collect();
    let shared_batch = EventBatch {
        ts: 0.0,
        events: vec![Event::BlockStored(BlockStored {
            block_hashes: (1_000_000..1_000_256).collect(),
            token_ids: shared.clone(),
            block_size: BS,
            ..BlockStored::default()
        })],
        data_parallel_rank: None,
    };
    for ep in 0..ENDPOINTS {
        index.add_endpoint(ep);
        for n in 0..48 {
            index.apply_batch(
                ep,
                "m",
                &kv_events::decode_batch(&message(n, Encoding::ArrayTagged).0).unwrap(),
            );
        }
        index.apply_batch(ep, "m", &shared_batch);
    }
    let mut keys = Vec::new();
    index.processor().request_keys("m", &shared, usize::MAX, &mut keys);
    let endpoints: Vec<u32> = (0..ENDPOINTS).collect();
    let mut out = vec![EndpointMatch::Unknown; endpoints.len()];
    index.match_endpoints(&keys, &endpoints, &mut out);
    assert!(out.iter().all(|m| *m == EndpointMatch::Blocks(256)), "{out:?}");

    let mut group = c.benchmark_group("lookup_256_blocks_8_endpoints");
    group.bench_function("uncontended", |b| {
        b.iter(|| index.match_endpoints(black_box(&keys), &endpoints, &mut out));
    });

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (index, stop) = (Arc::clone(&index), Arc::clone(&stop));
        // Messages with hashes far from the shared prefix's, so the prefix stays held.
        let ring: Vec<Vec<u8>> = (100..164).map(|n| message(n, Encoding::ArrayTagged).0).collect();
        let shared_batch = shared_batch.clone();
        std::thread::spawn(move || {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Round robin over the endpoints, each seeing its own messages in order.
                let ep = (seq % u64::from(ENDPOINTS)) as u32;
                let n = seq / u64::from(ENDPOINTS);
                let slot = (n % ring.len() as u64) as usize;
                if slot == 0 {
                    // Once per lap, refresh the shared prefix so capacity never evicts it.
                    index.apply_batch(ep, "m", &shared_batch);
                }
                index.ingest(ep, n, "m", &ring[slot]).ok();
                seq += 1;
            }
        })
    };
    group.bench_function("contended", |b| {
        b.iter(|| index.match_endpoints(black_box(&keys), &endpoints, &mut out));
    });
    stop.store(true, Ordering::Relaxed);
    writer.join().ok();
    assert!(out.iter().all(|m| *m == EndpointMatch::Blocks(256)), "{out:?}");
    group.finish();
}

criterion_group!(benches, ingestion, lookups);
criterion_main!(benches);
