//! What this picker has sent to an endpoint since its metrics were scraped.
//!
//! Metrics lag by up to a scrape interval. Between two scrapes every decision sees the same
//! queue and KV numbers, so a max-score picker sends a whole burst to the endpoint that looked
//! least loaded at the last scrape (herding). The scheduler records each pick here, and the
//! load scorers add the picks newer than the endpoint's `updated_at` to the scraped numbers:
//! once the next scrape arrives it already contains those requests, and they stop counting.
//!
//! A fixed ring of the most recent [`DISPATCH_RING_SLOTS`] picks per endpoint, written and
//! read with atomics only: recording is one `fetch_add` and two stores, and reading walks back
//! from the newest pick until one predates the scrape (usually one or two slots). Bounded
//! memory and no lock on the decision path, at the price of being approximate: a pick racing
//! a reader may be missed, and more than [`DISPATCH_RING_SLOTS`] picks in one scrape interval
//! count as that many (by then the endpoint is clearly the busiest).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Picks remembered per endpoint.
pub const DISPATCH_RING_SLOTS: usize = 16;

/// Picks of one endpoint, shared by every snapshot holding the endpoint (clones share it).
#[derive(Clone, Default)]
pub struct DispatchLog {
    ring: Arc<Ring>,
}

#[derive(Default)]
struct Ring {
    /// Time zero of the stored timestamps: the first pick's time.
    origin: OnceLock<Instant>,
    /// Picks recorded so far; the next goes into slot `next % DISPATCH_RING_SLOTS`.
    next: AtomicU64,
    slots: [Slot; DISPATCH_RING_SLOTS],
}

#[derive(Default)]
struct Slot {
    /// Nanoseconds after `origin`, plus one; zero marks an empty slot.
    at: AtomicU64,
    /// Estimated prompt tokens of the request.
    tokens: AtomicU64,
}

/// Picks sent after a given time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingDispatches {
    /// Requests.
    pub requests: u32,
    /// Their estimated prompt tokens.
    pub tokens: u64,
}

impl DispatchLog {
    /// Records a request of about `tokens` prompt tokens sent at `at`.
    pub fn record(&self, at: Instant, tokens: u64) {
        let ring = &*self.ring;
        let origin = *ring.origin.get_or_init(|| at);
        let stamp = nanos_since(origin, at).saturating_add(1);
        let index = ring.next.fetch_add(1, Ordering::AcqRel) as usize % DISPATCH_RING_SLOTS;
        let slot = &ring.slots[index];
        slot.tokens.store(tokens, Ordering::Relaxed);
        slot.at.store(stamp, Ordering::Release);
    }

    /// Requests recorded after `since` (all remembered ones when `since` is `None`: the
    /// endpoint was never scraped).
    pub fn pending_since(&self, since: Option<Instant>) -> PendingDispatches {
        let ring = &*self.ring;
        let Some(&origin) = ring.origin.get() else {
            return PendingDispatches::default();
        };
        // Picks at or before the scrape are in its numbers; a scrape before the first pick
        // (origin) saw none of them.
        let seen_up_to = match since {
            Some(since) if since >= origin => nanos_since(origin, since).saturating_add(1),
            _ => 0,
        };
        let recorded = ring.next.load(Ordering::Acquire);
        let mut pending = PendingDispatches::default();
        for back in 1..=recorded.min(DISPATCH_RING_SLOTS as u64) {
            let index = (recorded - back) as usize % DISPATCH_RING_SLOTS;
            let slot = &ring.slots[index];
            let at = slot.at.load(Ordering::Acquire);
            if at == 0 || at <= seen_up_to {
                break;
            }
            pending.requests += 1;
            pending.tokens = pending.tokens.saturating_add(slot.tokens.load(Ordering::Relaxed));
        }
        pending
    }
}

fn nanos_since(origin: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX - 1)
}

/// Bookkeeping, not identity: two endpoints are equal whatever they were sent.
impl PartialEq for DispatchLog {
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}

impl fmt::Debug for DispatchLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DispatchLog").field("pending", &self.pending_since(None)).finish()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn counts_only_picks_after_the_scrape() {
        let log = DispatchLog::default();
        let start = Instant::now();
        let at = |millis| start + Duration::from_millis(millis);
        assert_eq!(log.pending_since(Some(at(0))), PendingDispatches::default());
        log.record(at(10), 100);
        log.record(at(20), 50);
        log.record(at(30), 7);
        assert_eq!(log.pending_since(None), PendingDispatches { requests: 3, tokens: 157 });
        assert_eq!(log.pending_since(Some(at(5))), PendingDispatches { requests: 3, tokens: 157 });
        assert_eq!(log.pending_since(Some(at(20))), PendingDispatches { requests: 1, tokens: 7 });
        assert_eq!(log.pending_since(Some(at(30))), PendingDispatches::default());
    }

    #[test]
    fn remembers_at_most_the_ring() {
        let log = DispatchLog::default();
        let start = Instant::now();
        for i in 0..100 {
            log.record(start + Duration::from_millis(i), 1);
        }
        let pending = log.pending_since(None);
        assert_eq!(pending.requests as usize, DISPATCH_RING_SLOTS);
        let recent = log.pending_since(Some(start + Duration::from_millis(96)));
        assert_eq!(recent.requests, 3, "picks at 97, 98 and 99 ms");
    }

    #[test]
    fn clones_share_the_log() {
        let log = DispatchLog::default();
        let clone = log.clone();
        clone.record(Instant::now(), 1);
        assert_eq!(log.pending_since(None).requests, 1);
    }
}
