//! What cross-replica sync adds to a decision: one record queued for the publisher
//! ([`Outbound::push`]), for prompts of 16, 256 and 2048 blocks, alone and with a second
//! thread pushing at the same time. In-flight counts cost a decision nothing: they are
//! levels read once per sync interval.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use redis_sync::Outbound;

/// Records between two drains: the publisher empties the queue far more often than this.
const DRAIN_EVERY: u64 = 64;

fn push(c: &mut Criterion) {
    let mut group = c.benchmark_group("sync_record_push");
    for blocks in [16usize, 256, 2048] {
        let hashes: Vec<u64> = (0..blocks as u64).map(|h| h.wrapping_mul(0x9e37_79b9)).collect();
        group.bench_with_input(BenchmarkId::new("uncontended", blocks), &hashes, |b, hashes| {
            let queue = Outbound::new(usize::MAX / 2);
            b.iter_custom(|iterations| timed(&queue, hashes, iterations));
        });
        group.bench_with_input(BenchmarkId::new("contended", blocks), &hashes, |b, hashes| {
            let queue = Arc::new(Outbound::new(usize::MAX / 2));
            let stop = Arc::new(AtomicBool::new(false));
            let other = {
                let (queue, stop, hashes) = (Arc::clone(&queue), Arc::clone(&stop), hashes.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        queue.push(1, 9, &hashes);
                        std::thread::yield_now();
                    }
                })
            };
            b.iter_custom(|iterations| timed(&queue, hashes, iterations));
            stop.store(true, Ordering::Relaxed);
            let _ = other.join();
        });
    }
    group.finish();
}

/// Pushes `iterations` records, draining every [`DRAIN_EVERY`] outside the timed part.
fn timed(queue: &Outbound, hashes: &[u64], iterations: u64) -> Duration {
    let mut total = Duration::ZERO;
    let mut done = 0;
    while done < iterations {
        let run = DRAIN_EVERY.min(iterations - done);
        let started = Instant::now();
        for endpoint in 0..run {
            black_box(queue.push(0, endpoint, black_box(hashes)));
        }
        total += started.elapsed();
        queue.discard_pending();
        done += run;
    }
    total
}

criterion_group!(benches, push);
criterion_main!(benches);
