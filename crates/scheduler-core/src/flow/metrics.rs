//! Flow-control metrics as plain atomic counters, for an adapter to export in its own format.
//!
//! Outcomes are counted by reason, queue wait is a fixed-bucket histogram (cumulative-free:
//! each bucket counts its own range; the exporter sums), and unknown objectives are counted.
//! Per-band queue lengths live with the queues: see `FlowController::band_stats`. Recording is
//! a few relaxed atomic adds; nothing here allocates or locks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Why a request left flow control.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OutcomeReason {
    /// Admitted: sent on to scheduling.
    Admitted,
    /// Shed: sheddable and the pool was saturated (no queueing).
    Shed,
    /// Rejected: a queue cap would have been exceeded.
    RejectedCapacity,
    /// Expired: waited in the queue past its TTL.
    Expired,
    /// Cancelled: the client went away (ticket dropped) while queued.
    Cancelled,
    /// Evicted: admitted and in flight, then ended to make room for a higher priority
    /// (`enableEviction`).
    Evicted,
}

impl OutcomeReason {
    /// Every reason, in a stable order.
    pub const ALL: [Self; 6] = [
        Self::Admitted,
        Self::Shed,
        Self::RejectedCapacity,
        Self::Expired,
        Self::Cancelled,
        Self::Evicted,
    ];

    /// A label value for exporters.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admitted => "admitted",
            Self::Shed => "shed",
            Self::RejectedCapacity => "rejected_capacity",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
            Self::Evicted => "evicted",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Upper bounds (inclusive) of the queue-wait histogram buckets; a last bucket catches the rest.
pub const WAIT_BUCKET_BOUNDS: [Duration; 12] = [
    Duration::from_micros(100),
    Duration::from_millis(1),
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(30),
    Duration::from_secs(60),
];

const WAIT_BUCKETS: usize = WAIT_BUCKET_BOUNDS.len() + 1;

/// Counters shared by the objective resolver, the shedder and the flow controller.
#[derive(Debug, Default)]
pub struct FlowMetrics {
    outcomes: [AtomicU64; OutcomeReason::ALL.len()],
    unknown_objectives: AtomicU64,
    wait_buckets: [AtomicU64; WAIT_BUCKETS],
    wait_total_nanos: AtomicU64,
}

/// A point-in-time copy of [`FlowMetrics`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowMetricsSnapshot {
    /// Outcome counts, indexed like [`OutcomeReason::ALL`].
    pub outcomes: [u64; OutcomeReason::ALL.len()],
    /// Requests naming an objective that is not configured.
    pub unknown_objectives: u64,
    /// Admitted requests per wait bucket ([`WAIT_BUCKET_BOUNDS`], then the overflow bucket).
    pub wait_buckets: [u64; WAIT_BUCKETS],
    /// Sum of the waits of admitted requests, in nanoseconds (wrapping).
    pub wait_total_nanos: u64,
}

impl FlowMetricsSnapshot {
    /// The count for `reason`.
    pub fn outcome(&self, reason: OutcomeReason) -> u64 {
        self.outcomes[reason.index()]
    }
}

impl FlowMetrics {
    /// Fresh, zeroed counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one request leaving with `reason`.
    pub fn record_outcome(&self, reason: OutcomeReason) {
        self.outcomes[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Records how long an admitted request waited.
    pub fn record_wait(&self, waited: Duration) {
        let bucket = WAIT_BUCKET_BOUNDS
            .iter()
            .position(|bound| waited <= *bound)
            .unwrap_or(WAIT_BUCKET_BOUNDS.len());
        self.wait_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        // A plain add (no CAS loop on the hot path); it wraps only after 584 years of waiting.
        self.wait_total_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Counts a request naming an unknown objective.
    pub fn record_unknown_objective(&self) {
        self.unknown_objectives.fetch_add(1, Ordering::Relaxed);
    }

    /// The count for `reason`.
    pub fn outcome(&self, reason: OutcomeReason) -> u64 {
        self.outcomes[reason.index()].load(Ordering::Relaxed)
    }

    /// Requests that named an unknown objective.
    pub fn unknown_objectives(&self) -> u64 {
        self.unknown_objectives.load(Ordering::Relaxed)
    }

    /// Copies every counter.
    pub fn snapshot(&self) -> FlowMetricsSnapshot {
        FlowMetricsSnapshot {
            outcomes: std::array::from_fn(|i| self.outcomes[i].load(Ordering::Relaxed)),
            unknown_objectives: self.unknown_objectives(),
            wait_buckets: std::array::from_fn(|i| self.wait_buckets[i].load(Ordering::Relaxed)),
            wait_total_nanos: self.wait_total_nanos.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_land_in_their_buckets() {
        let metrics = FlowMetrics::new();
        metrics.record_wait(Duration::ZERO);
        metrics.record_wait(Duration::from_millis(1));
        metrics.record_wait(Duration::from_millis(2));
        metrics.record_wait(Duration::from_secs(3600));
        let snapshot = metrics.snapshot();
        assert_eq!(snapshot.wait_buckets[0], 1);
        assert_eq!(snapshot.wait_buckets[1], 1, "bounds are inclusive");
        assert_eq!(snapshot.wait_buckets[2], 1);
        assert_eq!(snapshot.wait_buckets[WAIT_BUCKETS - 1], 1);
        assert_eq!(snapshot.wait_total_nanos, 3_600_003_000_000);
    }

    #[test]
    fn outcomes_are_counted_by_reason() {
        let metrics = FlowMetrics::new();
        metrics.record_outcome(OutcomeReason::Expired);
        metrics.record_outcome(OutcomeReason::Expired);
        metrics.record_outcome(OutcomeReason::Shed);
        assert_eq!(metrics.outcome(OutcomeReason::Expired), 2);
        assert_eq!(metrics.snapshot().outcome(OutcomeReason::Shed), 1);
        assert_eq!(metrics.outcome(OutcomeReason::Admitted), 0);
    }
}
