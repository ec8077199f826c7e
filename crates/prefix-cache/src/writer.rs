//! A bounded background writer for a [`PrefixIndex`]: the request path queues a record and
//! returns; a thread of the writer's own applies the queue in batches.
//!
//! # Why
//! Recording a prompt is work that the decision does not need: the endpoint is already chosen.
//! Done inline, it sat on the path that answers the proxy, and under many long unique prompts
//! it was most of the picker's CPU. Queued, a decision pays for copying the prompt's block
//! hashes (2 KB for 256 blocks) under a short mutex.
//!
//! # Algorithm
//! * [`RecordWriter::submit`] appends the record's hashes to a flat pending buffer under a
//!   `parking_lot` mutex. It wakes the worker only if the worker is asleep (no record for a
//!   while) or the queue is filling up: after each batch the worker first dozes for up to
//!   half a millisecond, picking up records that arrive meanwhile without a wake-up call on
//!   the request path. When the buffer would pass
//!   [`WriterConfig::max_queued_blocks`] the record is dropped and counted
//!   ([`RecordWriter::dropped`]): a request never waits for the writer. A lost record only
//!   costs a future cache-hit estimate.
//! * The worker swaps the pending buffer with an empty one (both keep their capacity, so a
//!   warm writer allocates nothing), then applies the batch. Before applying, it coalesces:
//!   a record is skipped when a later record of the same batch for the same endpoint starts
//!   with the same blocks, since recording `a` then `b` leaves an endpoint's LRU exactly as
//!   recording `b` alone when every block of `a` is in `b` (`b` touches or inserts all of
//!   them last; the evictions are the same oldest blocks). Records of different endpoints
//!   touch disjoint state and commute, so the skip is exact. A repeated prompt, or the turns
//!   of one conversation queued together, are recorded once.
//! * [`RecordWriter::flush`] waits until every record submitted before it was applied (or
//!   dropped): a deterministic barrier for tests, simulations and embedders.
//! * Dropping the writer stops the worker after its current batch and joins it; records still
//!   queued are discarded.
//!
//! # Bound
//! The queue holds at most `max_queued_blocks` hashes (8 bytes each) plus one small entry per
//! record, twice (the buffer being filled and the one being applied), whatever the load; one
//! record longer than the bound is still accepted into an empty queue.
//!
//! Lookups run concurrently with the worker and never wait for the queue; they wait only for
//! a shard write lock, which the worker holds for the few pairs of one record in that shard.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use crate::index::PrefixIndex;

/// Default bound of a writer's queue, in block hashes: 256 prompts of 256 blocks (512 KiB).
pub const DEFAULT_MAX_QUEUED_BLOCKS: usize = 256 * 256;

/// Sizing of a [`RecordWriter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterConfig {
    /// Most block hashes waiting to be applied; a record that would pass it is dropped.
    pub max_queued_blocks: usize,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self { max_queued_blocks: DEFAULT_MAX_QUEUED_BLOCKS }
    }
}

/// Queued records: `(endpoint, start, len)` into one flat buffer of hashes.
#[derive(Debug)]
struct Records<K> {
    entries: Vec<(K, usize, usize)>,
    hashes: Vec<u64>,
}

impl<K> Default for Records<K> {
    fn default() -> Self {
        Self { entries: Vec::new(), hashes: Vec::new() }
    }
}

impl<K> Records<K> {
    fn clear(&mut self) {
        self.entries.clear();
        self.hashes.clear();
    }

    fn get(&self, entry: usize) -> Option<(&K, &[u64])> {
        let (key, start, len) = self.entries.get(entry)?;
        Some((key, self.hashes.get(*start..start + len)?))
    }
}

#[derive(Debug)]
struct Queue<K> {
    pending: Records<K>,
    /// Records accepted so far (applied, coalesced or pending).
    submitted: u64,
    /// Records accepted and then applied or coalesced: every record numbered below is done.
    done: u64,
    /// Whether the worker is waiting for records, and how deeply.
    parked: Parked,
    /// Set by `Drop`: the worker stops after its current batch.
    shutdown: bool,
    /// Set by the worker as it exits (also on a panic): nothing will be applied any more.
    stopped: bool,
}

/// The worker's state between batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parked {
    /// Applying a batch: it takes the queue again when done.
    No,
    /// Waiting at most [`DOZE`] for more records: a record is picked up then without a
    /// wake-up on the request path (a futex call, a few microseconds), unless the queue is
    /// filling up.
    Dozing,
    /// Waiting until woken: the first record after a quiet spell wakes it.
    Asleep,
}

/// How long the worker waits for more records before sleeping until woken: the most a
/// record waits before it is applied, while records keep coming.
const DOZE: std::time::Duration = std::time::Duration::from_micros(500);

#[derive(Debug, Default)]
struct Counters {
    dropped: AtomicU64,
    applied: AtomicU64,
    coalesced: AtomicU64,
}

#[derive(Debug)]
struct Shared<K> {
    index: Arc<PrefixIndex<K>>,
    config: WriterConfig,
    queue: Mutex<Queue<K>>,
    /// The worker waits here for records or shutdown.
    work: Condvar,
    /// `flush` waits here for the worker's progress.
    progress: Condvar,
    counters: Counters,
}

/// Applies records to a [`PrefixIndex`] on a thread of its own (see the [module docs](self)).
///
/// ```
/// use std::sync::Arc;
/// use prefix_cache::{IndexConfig, LookupScratch, PrefixIndex, RecordWriter, WriterConfig};
///
/// let index: Arc<PrefixIndex<u32>> = Arc::new(PrefixIndex::new(IndexConfig::default()));
/// let writer = RecordWriter::new(Arc::clone(&index), WriterConfig::default());
/// assert!(writer.submit(7, &[1, 2, 3])); // returns at once
/// writer.flush(); // waits until the record is in the index
/// let (mut scratch, mut out) = (LookupScratch::default(), Vec::new());
/// index.longest_prefix_matches(&[1, 2, 9], &mut scratch, &mut out);
/// assert_eq!(out, [(7, 2)]);
/// assert_eq!(writer.dropped(), 0);
/// ```
#[derive(Debug)]
pub struct RecordWriter<K> {
    shared: Arc<Shared<K>>,
    mode: Mode,
}

/// Who applies the queued records.
#[derive(Debug)]
enum Mode {
    /// The writer's thread.
    Thread(JoinHandle<()>),
    /// Whoever calls `flush`, on their thread; the mutex makes concurrent flushes wait for
    /// each other, so that each returns only once everything before it is applied.
    OnFlush(Mutex<Scratch>),
    /// `submit` itself: the fallback when no thread could be started.
    Inline,
}

/// The worker's reusable buffers.
#[derive(Debug, Default)]
struct Scratch {
    latest: HashMap<u64, usize>,
    skip: Vec<bool>,
}

impl<K> RecordWriter<K>
where
    K: Copy + Eq + Hash + Send + Sync + 'static,
{
    /// Starts a writer thread for `index`. Should the system refuse a thread, the writer
    /// applies every record inline in [`submit`](Self::submit) instead.
    pub fn new(index: Arc<PrefixIndex<K>>, config: WriterConfig) -> Self {
        let shared = Self::shared(index, config);
        let for_worker = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("prefix-index-writer".to_owned())
            .spawn(move || run(&for_worker));
        let mode = match spawned {
            Ok(worker) => Mode::Thread(worker),
            Err(_) => {
                shared.queue.lock().stopped = true;
                Mode::Inline
            }
        };
        Self { shared, mode }
    }

    /// A writer without a thread: records queue up (bounded and counted the same way) until
    /// [`flush`](Self::flush) applies them on the caller's thread. For single-threaded
    /// embedders and simulations that decide when the index catches up, and for tests.
    pub fn without_thread(index: Arc<PrefixIndex<K>>, config: WriterConfig) -> Self {
        Self { shared: Self::shared(index, config), mode: Mode::OnFlush(Mutex::default()) }
    }

    fn shared(index: Arc<PrefixIndex<K>>, config: WriterConfig) -> Arc<Shared<K>> {
        Arc::new(Shared {
            index,
            config,
            queue: Mutex::new(Queue {
                pending: Records::default(),
                submitted: 0,
                done: 0,
                parked: Parked::No,
                shutdown: false,
                stopped: false,
            }),
            work: Condvar::new(),
            progress: Condvar::new(),
            counters: Counters::default(),
        })
    }

    /// The index this writer records into.
    pub fn index(&self) -> &Arc<PrefixIndex<K>> {
        &self.shared.index
    }

    /// Queues the record "endpoint `key` now holds `hashes`" (see [`PrefixIndex::record`]) and
    /// returns without waiting. Returns `false` when the record was dropped because the queue
    /// is full (counted by [`dropped`](Self::dropped)) or the writer is shutting down.
    pub fn submit(&self, key: K, hashes: &[u64]) -> bool {
        if hashes.is_empty() {
            return true;
        }
        // Blocks past the capacity are never recorded: do not queue them.
        let hashes = &hashes[..hashes.len().min(self.shared.index.config().capacity_per_endpoint)];
        if let Mode::Inline = self.mode {
            self.shared.index.record(key, hashes);
            self.shared.counters.applied.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        let mut queue = self.shared.queue.lock();
        let queued = queue.pending.hashes.len();
        if queue.shutdown
            || (queued > 0 && queued + hashes.len() > self.shared.config.max_queued_blocks)
        {
            drop(queue);
            self.shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let start = queue.pending.hashes.len();
        queue.pending.hashes.extend_from_slice(hashes);
        queue.pending.entries.push((key, start, hashes.len()));
        queue.submitted += 1;
        let wake = match queue.parked {
            Parked::No => false,
            Parked::Dozing => 4 * queue.pending.hashes.len() > self.shared.config.max_queued_blocks,
            Parked::Asleep => true,
        };
        if wake {
            queue.parked = Parked::No;
        }
        drop(queue);
        if wake {
            self.shared.work.notify_one();
        }
        true
    }

    /// Waits until every record submitted before this call has been applied (or coalesced
    /// into a later one); a writer [`without_thread`](Self::without_thread) applies them here.
    /// Returns at once if the writer's thread has stopped.
    pub fn flush(&self) {
        match &self.mode {
            Mode::Thread(_) => {
                let mut queue = self.shared.queue.lock();
                if queue.parked != Parked::No {
                    queue.parked = Parked::No;
                    self.shared.work.notify_one();
                }
                let target = queue.submitted;
                while queue.done < target && !queue.stopped {
                    self.shared.progress.wait(&mut queue);
                }
            }
            Mode::OnFlush(scratch) => {
                let mut scratch = scratch.lock();
                let (batch, through) = {
                    let mut queue = self.shared.queue.lock();
                    (std::mem::take(&mut queue.pending), queue.submitted)
                };
                apply(&self.shared, &batch, &mut scratch);
                self.shared.queue.lock().done = through;
            }
            Mode::Inline => {}
        }
    }

    /// Records dropped because the queue was full (or the writer shutting down).
    pub fn dropped(&self) -> u64 {
        self.shared.counters.dropped.load(Ordering::Relaxed)
    }

    /// Records applied to the index.
    pub fn applied(&self) -> u64 {
        self.shared.counters.applied.load(Ordering::Relaxed)
    }

    /// Records skipped because a later record of the same endpoint in the same batch covered
    /// them (see the [module docs](self)).
    pub fn coalesced(&self) -> u64 {
        self.shared.counters.coalesced.load(Ordering::Relaxed)
    }

    /// Block hashes waiting to be applied (not counting the batch being applied).
    pub fn queued_blocks(&self) -> usize {
        self.shared.queue.lock().pending.hashes.len()
    }
}

impl<K> Drop for RecordWriter<K> {
    fn drop(&mut self) {
        self.shared.queue.lock().shutdown = true;
        self.shared.work.notify_one();
        if let Mode::Thread(worker) = std::mem::replace(&mut self.mode, Mode::Inline) {
            // A panic in the worker was already reported on its thread; nothing to add here.
            let _ = worker.join();
        }
    }
}

/// Marks the writer stopped when the worker exits, however it exits, so `flush` never hangs.
struct StopOnExit<'a, K>(&'a Shared<K>);

impl<K> Drop for StopOnExit<'_, K> {
    fn drop(&mut self) {
        self.0.queue.lock().stopped = true;
        self.0.progress.notify_all();
    }
}

/// The worker: waits for records, swaps them out, coalesces and applies them.
fn run<K>(shared: &Shared<K>)
where
    K: Copy + Eq + Hash + Send + Sync + 'static,
{
    let _stop = StopOnExit(shared);
    let mut batch = Records::default();
    let mut scratch = Scratch::default();
    loop {
        let through = {
            let mut queue = shared.queue.lock();
            if queue.pending.entries.is_empty() && !queue.shutdown {
                queue.parked = Parked::Dozing;
                shared.work.wait_for(&mut queue, DOZE);
            }
            while queue.pending.entries.is_empty() && !queue.shutdown {
                queue.parked = Parked::Asleep;
                shared.work.wait(&mut queue);
            }
            queue.parked = Parked::No;
            if queue.shutdown {
                return;
            }
            std::mem::swap(&mut queue.pending, &mut batch);
            queue.submitted
        };
        apply(shared, &batch, &mut scratch);
        batch.clear();
        shared.queue.lock().done = through;
        shared.progress.notify_all();
    }
}

/// Applies `batch` in order, skipping each record that a later record of the same endpoint
/// starts with (see the [module docs](self)).
fn apply<K>(shared: &Shared<K>, batch: &Records<K>, scratch: &mut Scratch)
where
    K: Copy + Eq + Hash + Send + Sync + 'static,
{
    let Scratch { latest, skip } = scratch;
    let count = batch.entries.len();
    latest.clear();
    skip.clear();
    skip.resize(count, false);
    // Newest first: compare each record with the next one of its endpoint that is applied.
    // Endpoints are keyed by a hash of `K` so the buffer needs no `K` type; a collision only
    // makes a comparison fail and the record be applied, never skipped wrongly.
    for entry in (0..count).rev() {
        let Some((key, hashes)) = batch.get(entry) else { continue };
        let id = endpoint_id(key);
        let covered = latest
            .get(&id)
            .and_then(|&later| batch.get(later))
            .is_some_and(|(later_key, later)| later_key == key && later.starts_with(hashes));
        match skip.get_mut(entry) {
            Some(flag) if covered => *flag = true,
            _ => {
                latest.insert(id, entry);
            }
        }
    }
    let (mut applied, mut coalesced) = (0, 0);
    for (entry, &skipped) in skip.iter().enumerate() {
        if skipped {
            coalesced += 1;
        } else if let Some((&key, hashes)) = batch.get(entry) {
            shared.index.record(key, hashes);
            applied += 1;
        }
    }
    shared.counters.applied.fetch_add(applied, Ordering::Relaxed);
    shared.counters.coalesced.fetch_add(coalesced, Ordering::Relaxed);
}

fn endpoint_id<K: Hash>(key: &K) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(key)
}
