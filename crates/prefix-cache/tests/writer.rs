//! The background writer: deferred records become visible at `flush`, a full queue drops and
//! counts instead of waiting, coalescing leaves the index as applying every record would, and
//! the thread ends with the writer.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Model;
use prefix_cache::{IndexConfig, LookupScratch, PrefixIndex, RecordWriter, WriterConfig};
use proptest::prelude::*;

fn index(capacity: usize) -> Arc<PrefixIndex<u32>> {
    Arc::new(PrefixIndex::new(IndexConfig { capacity_per_endpoint: capacity, shards: 4 }))
}

fn matches(index: &PrefixIndex<u32>, hashes: &[u64]) -> Vec<(u32, usize)> {
    let (mut scratch, mut out) = (LookupScratch::default(), Vec::new());
    index.longest_prefix_matches(hashes, &mut scratch, &mut out);
    out.sort_unstable();
    out
}

#[test]
fn a_deferred_record_is_seen_by_the_next_lookup_after_flush() {
    let index = index(64);
    let writer = RecordWriter::new(Arc::clone(&index), WriterConfig::default());
    // Turn one of a conversation, then turn two extending it, each looked up after a flush.
    let first: Vec<u64> = (1..=8).collect();
    assert!(writer.submit(3, &first));
    writer.flush();
    assert_eq!(matches(&index, &first), [(3, 8)]);
    let second: Vec<u64> = (1..=12).collect();
    assert_eq!(matches(&index, &second), [(3, 8)]);
    assert!(writer.submit(3, &second));
    writer.flush();
    assert_eq!(matches(&index, &second), [(3, 12)]);
    assert_eq!((writer.applied() + writer.coalesced(), writer.dropped()), (2, 0));
    assert_eq!(index.check_invariants(), Ok(()));
}

#[test]
fn a_flush_with_nothing_queued_returns_at_once() {
    let writer = RecordWriter::new(index(8), WriterConfig::default());
    writer.flush();
    let quiet = RecordWriter::without_thread(index(8), WriterConfig::default());
    quiet.flush();
    assert_eq!(writer.applied() + quiet.applied(), 0);
}

#[test]
fn a_full_queue_drops_and_counts_records_instead_of_waiting() {
    let index = index(64);
    // Without a thread nothing drains until `flush`, so the queue's state is exact.
    let writer =
        RecordWriter::without_thread(Arc::clone(&index), WriterConfig { max_queued_blocks: 8 });
    assert!(writer.submit(1, &[10, 11, 12, 13, 14]));
    assert!(!writer.submit(2, &[20, 21, 22, 23, 24]), "5 + 5 blocks pass the bound of 8");
    assert!(writer.submit(3, &[30, 31, 32]), "5 + 3 blocks fit");
    assert!(!writer.submit(4, &[40]));
    assert_eq!((writer.dropped(), writer.queued_blocks()), (2, 8));
    assert!(index.is_empty(), "nothing is applied before the flush");
    writer.flush();
    assert_eq!(writer.queued_blocks(), 0);
    assert_eq!(matches(&index, &[10, 11]), [(1, 2)]);
    assert_eq!(matches(&index, &[20]), []);
    assert_eq!(matches(&index, &[30]), [(3, 1)]);
    assert_eq!(writer.applied(), 2);
    // Drained, the queue accepts records again; one longer than the bound fits an empty queue.
    let long: Vec<u64> = (100..120).collect();
    assert!(writer.submit(5, &long));
    assert!(!writer.submit(6, &[1]));
    writer.flush();
    assert_eq!(matches(&index, &long), [(5, 20)]);
    assert_eq!(writer.dropped(), 3);
}

#[test]
fn a_batch_records_a_repeated_or_extended_prompt_once() {
    let index = index(64);
    let writer = RecordWriter::without_thread(Arc::clone(&index), WriterConfig::default());
    let turn: Vec<u64> = (1..=6).collect();
    let next_turn: Vec<u64> = (1..=9).collect();
    for hashes in [&turn, &turn, &next_turn] {
        writer.submit(1, hashes);
    }
    // Another endpoint's records in between do not stop endpoint 2's from coalescing.
    writer.submit(2, &turn);
    writer.submit(1, &[50, 51]);
    writer.submit(2, &next_turn);
    writer.flush();
    // Endpoint 1: both copies of `turn` are covered by `next_turn`; `[50, 51]` is not.
    // Endpoint 2: `turn` is covered by `next_turn`.
    assert_eq!((writer.applied(), writer.coalesced()), (3, 3));
    assert_eq!(index.blocks_of(1), [50, 51, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert_eq!(index.blocks_of(2), next_turn);
}

#[test]
fn an_overloaded_writer_drops_records_and_submit_never_waits() {
    // Long prompts into a small queue, submitted far faster than a record is applied.
    let index = index(4_096);
    let writer = RecordWriter::new(Arc::clone(&index), WriterConfig { max_queued_blocks: 4 * 256 });
    let mut state = 7u64;
    let mut slowest = Duration::ZERO;
    let submitted = 5_000u64;
    let mut accepted = 0;
    for request in 0..submitted {
        let prompt: Vec<u64> = (0..256)
            .map(|_| {
                state = prefix_cache::mix64(state.wrapping_add(request));
                state
            })
            .collect();
        let started = Instant::now();
        accepted += u64::from(writer.submit((request % 50) as u32, &prompt));
        slowest = slowest.max(started.elapsed());
    }
    writer.flush();
    assert!(writer.dropped() > 0, "the writer kept up with {submitted} records");
    assert_eq!(writer.dropped() + accepted, submitted);
    assert_eq!(writer.applied() + writer.coalesced(), accepted);
    assert_eq!(index.check_invariants(), Ok(()));
    // Not a timing assertion on the happy path: only that no submit waited for a record to be
    // applied, which takes far longer than this even when a test machine is busy.
    assert!(slowest < Duration::from_secs(1), "a submit took {slowest:?}");
}

#[test]
fn dropping_the_writer_ends_its_thread() {
    let index = index(64);
    for _ in 0..20 {
        let writer = RecordWriter::new(Arc::clone(&index), WriterConfig::default());
        writer.submit(1, &[1, 2, 3]);
        drop(writer);
        // The thread held the only other reference to the index; `drop` joined it.
        assert_eq!(Arc::strong_count(&index), 1);
    }
    assert_eq!(index.check_invariants(), Ok(()));
}

#[test]
fn submits_from_many_threads_all_arrive() {
    let index = index(1_024);
    let writer = RecordWriter::new(Arc::clone(&index), WriterConfig::default());
    std::thread::scope(|scope| {
        for thread in 0..4u32 {
            let writer = &writer;
            scope.spawn(move || {
                for request in 0..200u64 {
                    let base = u64::from(thread) << 32 | request << 8;
                    assert!(writer.submit(thread, &[base, base + 1, base + 2]));
                }
            });
        }
    });
    writer.flush();
    assert_eq!(writer.applied() + writer.coalesced(), 800);
    for thread in 0..4u32 {
        assert_eq!(index.blocks_of(thread).len(), 600);
    }
    assert_eq!(index.check_invariants(), Ok(()));
}

/// Prompts built from a few conversations: each record is a prefix of one of them, so that
/// later records often extend, repeat or cut short earlier ones of the same endpoint.
fn record() -> impl Strategy<Value = (u32, Vec<u64>)> {
    (0u32..4, 0u64..3, 1usize..10).prop_map(|(key, conversation, len)| {
        (key, (0..len as u64).map(|i| conversation * 100 + i).collect())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever records a batch coalesces, the index ends as the reference model that applies
    /// every record in order, holding the same blocks in the same recency order.
    #[test]
    fn coalesced_batches_match_applying_every_record(
        capacity in 1usize..12,
        batches in prop::collection::vec(prop::collection::vec(record(), 1..12), 1..6),
    ) {
        let index = index(capacity);
        let writer = RecordWriter::without_thread(Arc::clone(&index), WriterConfig::default());
        let mut model = Model::new(capacity);
        for batch in &batches {
            for (key, hashes) in batch {
                prop_assert!(writer.submit(*key, hashes));
                model.record(*key, hashes);
            }
            writer.flush();
            let keys: Vec<u32> = (0..4).collect();
            if let Some(problem) = model.disagreement(&index, &keys) {
                return Err(TestCaseError::fail(problem));
            }
            let (mut scratch, mut out) = (LookupScratch::default(), Vec::new());
            for conversation in 0..3u64 {
                let query: Vec<u64> = (0..10).map(|i| conversation * 100 + i).collect();
                if let Some(mismatch) = model.lookup_mismatch(&index, &query, &mut scratch, &mut out) {
                    return Err(TestCaseError::fail(mismatch));
                }
            }
        }
        let total: usize = batches.iter().map(Vec::len).sum();
        prop_assert_eq!((writer.applied() + writer.coalesced()) as usize, total);
    }
}
