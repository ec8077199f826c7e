//! The bounded queue between the decision path and the publisher task.
//!
//! [`Outbound::push`] copies a record's hashes into a flat buffer under a short
//! `parking_lot` mutex and wakes the publisher (a `Notify`, an atomic when the publisher is
//! already awake). When the buffer would pass its cap the record is dropped and counted: a
//! decision never waits for Redis. The publisher swaps the buffer out whole, so a warm queue
//! allocates nothing. Memory: at most `max_queued_blocks` hashes (8 bytes each) plus 24 bytes
//! a record, twice (the buffer being filled and the one being published).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use scheduler_core::EndpointId;
use scorers::RecordSink;
use tokio::sync::Notify;

use crate::wire::MAX_RECORD_BLOCKS;

/// Queued records: `(plugin, endpoint, start, len)` into one flat buffer of hashes.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub(crate) entries: Vec<(u8, u64, usize, usize)>,
    pub(crate) hashes: Vec<u64>,
    /// When the oldest record was queued (microseconds since the epoch).
    pub(crate) oldest_micros: u64,
}

impl Batch {
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.hashes.clear();
        self.oldest_micros = 0;
    }

    /// The records, in order.
    pub(crate) fn records(&self) -> impl Iterator<Item = (u8, u64, &[u64])> + '_ {
        self.entries.iter().filter_map(|&(plugin, endpoint, start, len)| {
            Some((plugin, endpoint, self.hashes.get(start..start + len)?))
        })
    }
}

/// The bounded queue of prefix records waiting to be published (see the crate docs): what a
/// decision pays for sync is one [`Outbound::push`].
#[derive(Debug)]
pub struct Outbound {
    pending: Mutex<Batch>,
    ready: Notify,
    max_queued_blocks: usize,
    pub(crate) dropped: AtomicU64,
    pub(crate) queued: AtomicU64,
}

impl Outbound {
    /// A queue holding at most `max_queued_blocks` block hashes.
    pub fn new(max_queued_blocks: usize) -> Self {
        Self {
            pending: Mutex::new(Batch::default()),
            ready: Notify::new(),
            max_queued_blocks: max_queued_blocks.max(1),
            dropped: AtomicU64::new(0),
            queued: AtomicU64::new(0),
        }
    }

    /// Queues a record of the index at position `plugin`; `false` when it was dropped
    /// because the queue is full.
    pub fn push(&self, plugin: u8, endpoint: u64, hashes: &[u64]) -> bool {
        if hashes.is_empty() {
            return true;
        }
        let hashes = &hashes[..hashes.len().min(MAX_RECORD_BLOCKS)];
        let mut pending = self.pending.lock();
        let queued = pending.hashes.len();
        if queued + hashes.len() > self.max_queued_blocks {
            drop(pending);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if pending.entries.is_empty() {
            pending.oldest_micros = crate::now_micros();
        }
        pending.entries.push((plugin, endpoint, queued, hashes.len()));
        pending.hashes.extend_from_slice(hashes);
        drop(pending);
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.ready.notify_one();
        true
    }

    /// Discards every queued record; returns how many there were.
    pub fn discard_pending(&self) -> usize {
        let mut pending = self.pending.lock();
        let count = pending.entries.len();
        pending.clear();
        count
    }

    /// Waits until records are queued, then swaps them into `batch` (cleared first).
    pub(crate) async fn take(&self, batch: &mut Batch) {
        loop {
            let notified = self.ready.notified();
            {
                let mut pending = self.pending.lock();
                if !pending.entries.is_empty() {
                    batch.clear();
                    std::mem::swap(&mut *pending, batch);
                    return;
                }
            }
            notified.await;
        }
    }
}

/// The [`RecordSink`] one prefix producer calls: queues its records under its plugin's
/// position in the message's name table.
#[derive(Debug)]
pub(crate) struct ProducerSink {
    pub(crate) plugin: u8,
    pub(crate) outbound: Arc<Outbound>,
}

impl RecordSink for ProducerSink {
    fn recorded(&self, endpoint: EndpointId, hashes: &[u64]) {
        self.outbound.push(self.plugin, endpoint.0, hashes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_queue_in_order_and_a_full_queue_drops() {
        let outbound = Outbound::new(5);
        assert!(outbound.push(0, 1, &[1, 2, 3]));
        assert!(outbound.push(1, 2, &[4, 5]));
        assert!(!outbound.push(0, 3, &[6]), "a sixth hash passes the cap");
        assert_eq!(outbound.dropped.load(Ordering::Relaxed), 1);
        let mut batch = Batch::default();
        outbound.take(&mut batch).await;
        let records: Vec<_> = batch.records().map(|(p, e, h)| (p, e, h.to_vec())).collect();
        assert_eq!(records, [(0, 1, vec![1, 2, 3]), (1, 2, vec![4, 5])]);
        assert!(batch.oldest_micros > 0);
        // The queue is empty again: room for more.
        assert!(outbound.push(0, 3, &[6]));
    }
}
