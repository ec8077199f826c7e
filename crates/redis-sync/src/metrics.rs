//! The syncer's counters, rendered in the Prometheus text format for the picker's `/metrics`.
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `epp_cross_replica_sync_lag_seconds` | histogram | from a record queued on a peer to its application here |
//! | `epp_cross_replica_dropped_updates_total` | counter | records dropped: queue full, or Redis unreachable when publishing |
//! | `epp_cross_replica_ignored_messages_total{reason}` | counter | messages ignored: `malformed`, `version`, `foreign` (another pool) |
//! | `epp_cross_replica_peers` | gauge | live peer replicas heard from in the last TTL |
//! | `epp_cross_replica_records_published_total` | counter | records published |
//! | `epp_cross_replica_records_applied_total` | counter | peers' records applied to the local index |
//! | `epp_cross_replica_redis_errors_total` | counter | failed Redis commands |
//! | `epp_cross_replica_redis_up` | gauge | 1 when the last Redis command succeeded |
//!
//! Lag samples are also kept in a ring of the last [`LAG_SAMPLES`] for exact quantiles
//! ([`SyncMetrics::lag_quantile`]).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

/// Lag samples kept for quantiles.
pub const LAG_SAMPLES: usize = 4096;

/// Upper bounds of the lag histogram, in seconds.
const LAG_BUCKETS: [f64; 12] =
    [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// Why a message was ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored {
    /// Not decodable.
    Malformed,
    /// Another format version.
    Version,
    /// Another pool's (or a message naming no plugin of this replica).
    Foreign,
}

/// Every counter of one syncer.
#[derive(Debug, Default)]
pub struct SyncMetrics {
    lag_buckets: [AtomicU64; LAG_BUCKETS.len()],
    lag_count: AtomicU64,
    lag_sum_micros: AtomicU64,
    lag_samples: Mutex<VecDeque<u64>>,
    pub(crate) dropped: AtomicU64,
    malformed: AtomicU64,
    version: AtomicU64,
    foreign: AtomicU64,
    pub(crate) peers: AtomicI64,
    pub(crate) published: AtomicU64,
    pub(crate) applied: AtomicU64,
    pub(crate) redis_errors: AtomicU64,
    pub(crate) redis_up: AtomicI64,
}

impl SyncMetrics {
    /// Records one replication lag.
    pub(crate) fn observe_lag(&self, lag: Duration) {
        let seconds = lag.as_secs_f64();
        for (bound, bucket) in LAG_BUCKETS.iter().zip(&self.lag_buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.lag_count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(lag.as_micros()).unwrap_or(u64::MAX);
        self.lag_sum_micros.fetch_add(micros, Ordering::Relaxed);
        let mut samples = self.lag_samples.lock();
        if samples.len() == LAG_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(micros);
    }

    pub(crate) fn ignore(&self, why: Ignored) {
        let counter = match why {
            Ignored::Malformed => &self.malformed,
            Ignored::Version => &self.version,
            Ignored::Foreign => &self.foreign,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Messages ignored for `why`.
    pub fn ignored(&self, why: Ignored) -> u64 {
        match why {
            Ignored::Malformed => &self.malformed,
            Ignored::Version => &self.version,
            Ignored::Foreign => &self.foreign,
        }
        .load(Ordering::Relaxed)
    }

    /// Records dropped before reaching Redis.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Live peers at the last in-flight exchange.
    pub fn peers(&self) -> i64 {
        self.peers.load(Ordering::Relaxed)
    }

    /// Records published.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// Peers' records applied.
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }

    /// Failed Redis commands.
    pub fn redis_errors(&self) -> u64 {
        self.redis_errors.load(Ordering::Relaxed)
    }

    /// Lag samples observed so far.
    pub fn lag_count(&self) -> u64 {
        self.lag_count.load(Ordering::Relaxed)
    }

    /// The `q` quantile (0..=1) of the last [`LAG_SAMPLES`] lags, `None` before the first.
    pub fn lag_quantile(&self, q: f64) -> Option<Duration> {
        let mut samples: Vec<u64> = self.lag_samples.lock().iter().copied().collect();
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let rank = ((samples.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        samples.get(rank).map(|&micros| Duration::from_micros(micros))
    }

    /// Appends the metrics in the Prometheus text format, labelled with `pool`.
    pub fn render(&self, pool: &str, out: &mut String) {
        let pool = escape(pool);
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP epp_cross_replica_sync_lag_seconds From a record queued on a peer to its application here.\n# TYPE epp_cross_replica_sync_lag_seconds histogram"
        );
        for (bound, bucket) in LAG_BUCKETS.iter().zip(&self.lag_buckets) {
            let _ = writeln!(
                out,
                "epp_cross_replica_sync_lag_seconds_bucket{{pool=\"{pool}\",le=\"{bound}\"}} {}",
                load(bucket)
            );
        }
        let count = load(&self.lag_count);
        let _ = writeln!(
            out,
            "epp_cross_replica_sync_lag_seconds_bucket{{pool=\"{pool}\",le=\"+Inf\"}} {count}\nepp_cross_replica_sync_lag_seconds_sum{{pool=\"{pool}\"}} {}\nepp_cross_replica_sync_lag_seconds_count{{pool=\"{pool}\"}} {count}",
            load(&self.lag_sum_micros) as f64 / 1e6
        );
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{pool=\"{pool}\"}} {value}"
            );
        };
        counter(
            out,
            "epp_cross_replica_dropped_updates_total",
            "Records dropped before reaching Redis (queue full or Redis unreachable).",
            load(&self.dropped),
        );
        let _ = writeln!(
            out,
            "# HELP epp_cross_replica_ignored_messages_total Messages from Redis ignored.\n# TYPE epp_cross_replica_ignored_messages_total counter"
        );
        for (reason, value) in
            [("malformed", &self.malformed), ("version", &self.version), ("foreign", &self.foreign)]
        {
            let _ = writeln!(
                out,
                "epp_cross_replica_ignored_messages_total{{pool=\"{pool}\",reason=\"{reason}\"}} {}",
                load(value)
            );
        }
        counter(
            out,
            "epp_cross_replica_records_published_total",
            "Prefix records published.",
            load(&self.published),
        );
        counter(
            out,
            "epp_cross_replica_records_applied_total",
            "Peers' prefix records applied to the local index.",
            load(&self.applied),
        );
        counter(
            out,
            "epp_cross_replica_redis_errors_total",
            "Failed Redis commands.",
            load(&self.redis_errors),
        );
        let gauge = |out: &mut String, name: &str, help: &str, value: i64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{pool=\"{pool}\"}} {value}"
            );
        };
        gauge(
            out,
            "epp_cross_replica_peers",
            "Live peer replicas heard from within the TTL.",
            self.peers.load(Ordering::Relaxed),
        );
        gauge(
            out,
            "epp_cross_replica_redis_up",
            "1 when the last Redis command succeeded.",
            self.redis_up.load(Ordering::Relaxed),
        );
    }
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_quantiles_and_rendering() {
        let metrics = SyncMetrics::default();
        assert_eq!(metrics.lag_quantile(0.99), None);
        for millis in 1..=100 {
            metrics.observe_lag(Duration::from_millis(millis));
        }
        assert_eq!(metrics.lag_quantile(0.99), Some(Duration::from_millis(99)));
        assert_eq!(metrics.lag_quantile(0.0), Some(Duration::from_millis(1)));
        metrics.ignore(Ignored::Foreign);
        let mut text = String::new();
        metrics.render("p\"1", &mut text);
        assert!(text.contains("epp_cross_replica_sync_lag_seconds_count{pool=\"p\\\"1\"} 100"));
        assert!(text.contains("le=\"0.005\"} 5\n"));
        assert!(text.contains("reason=\"foreign\"} 1\n"));
    }
}
