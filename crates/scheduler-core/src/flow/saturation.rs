//! Saturation detection: is there room in the pool for one more request right now?
//!
//! [`UtilizationDetector`] follows GIE's `utilization-detector`: the pool is saturated when
//! every endpoint with fresh metrics has a waiting queue of at least `queueDepthThreshold`
//! or a KV-cache usage of at least `kvCacheUtilThreshold`. Endpoints whose metrics are stale
//! (or were never scraped) offer no capacity while some endpoint is fresh; an empty pool is
//! saturated. One check is O(endpoints) and allocation-free.
//!
//! Staleness follows the pool's [`StalenessPolicy`] when it has one (its threshold, and when
//! every endpoint is stale: fail open judges the last known metrics, fail closed calls the
//! pool saturated), so admission and routing agree. Without a pool policy the detector's own
//! `metricsStalenessThreshold` (default [`DEFAULT_METRICS_STALENESS_THRESHOLD`]) applies and
//! an all-stale pool is saturated, as in GIE.
//!
//! Detectors are read through `&self` and take `now` as a parameter: they never read a clock.

use std::fmt::Debug;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer};

use crate::flow::units;
use crate::pool::PoolSnapshot;
use crate::pool::endpoint::EndpointMetrics;
pub use crate::pool::staleness::DEFAULT_METRICS_STALENESS_THRESHOLD;
use crate::pool::staleness::{AllStale, StalenessPolicy};

/// GIE type name of the utilization detector plugin.
pub const UTILIZATION_DETECTOR_TYPE: &str = "utilization-detector";

/// Decides whether the pool can take one more request.
pub trait SaturationDetector: Send + Sync + Debug {
    /// Whether the pool is saturated at `now`. Must not block for long: it runs under the flow
    /// controller's lock, once per dispatch.
    fn is_saturated(&self, pool: &PoolSnapshot, now: Instant) -> bool;

    /// Told of every request admitted (directly or from a queue), before the next check.
    ///
    /// Detectors whose signal lags admissions (scraped metrics, in-flight counts recorded only
    /// once the request is scheduled) ignore it and may let a burst through between two updates,
    /// as GIE's do; a detector that counts admissions itself uses it to stay exact.
    fn on_admit(&self) {}

    /// How saturated the pool is: 0 idle, 1 or more saturated. Consulted only by a usage limit
    /// policy with a ceiling below 1. It must reach 1 whenever [`Self::is_saturated`] holds;
    /// the default reads that flag alone (0 or 1).
    fn saturation(&self, pool: &PoolSnapshot, now: Instant) -> f64 {
        if self.is_saturated(pool, now) { 1.0 } else { 0.0 }
    }
}

/// Default of `queueDepthThreshold`: waiting requests at which an endpoint is full.
pub const DEFAULT_QUEUE_DEPTH_THRESHOLD: u32 = 5;
/// Default of `kvCacheUtilThreshold`: KV-cache usage at which an endpoint is full.
pub const DEFAULT_KV_CACHE_UTIL_THRESHOLD: f64 = 0.8;

/// The thresholds of the utilization detector: the parameters of a `utilization-detector`
/// plugin, and the keys of the top-level `saturationDetector` section in its thresholds form.
/// Absent keys take their defaults.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UtilizationThresholds {
    /// `queueDepthThreshold`: an endpoint with at least this many waiting requests is full.
    #[serde(rename = "queueDepthThreshold")]
    pub queue_depth: u32,
    /// `kvCacheUtilThreshold`, in (0, 1]: an endpoint at or above this KV-cache usage is full.
    #[serde(rename = "kvCacheUtilThreshold", deserialize_with = "unit_fraction")]
    pub kv_cache_util: f64,
    /// `metricsStalenessThreshold` (Go duration or milliseconds): metrics older than this
    /// count as no capacity. Used only when the pool has no [`StalenessPolicy`] (the `epp`
    /// server lifts it into the pool's policy, refusing one that differs from its flag);
    /// absent: [`DEFAULT_METRICS_STALENESS_THRESHOLD`].
    #[serde(rename = "metricsStalenessThreshold", deserialize_with = "units::optional_duration")]
    pub metrics_staleness: Option<Duration>,
}

/// A number in (0, 1].
fn unit_fraction<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    let value = f64::deserialize(deserializer)?;
    if value > 0.0 && value <= 1.0 {
        Ok(value)
    } else {
        Err(serde::de::Error::custom(format_args!("{value} is not a number in (0, 1]")))
    }
}

impl Default for UtilizationThresholds {
    fn default() -> Self {
        Self {
            queue_depth: DEFAULT_QUEUE_DEPTH_THRESHOLD,
            kv_cache_util: DEFAULT_KV_CACHE_UTIL_THRESHOLD,
            metrics_staleness: None,
        }
    }
}

/// GIE's `utilization-detector`: saturated when no endpoint with fresh metrics has headroom.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UtilizationDetector {
    thresholds: UtilizationThresholds,
}

impl UtilizationDetector {
    /// A detector with `thresholds`.
    pub fn new(thresholds: UtilizationThresholds) -> Self {
        Self { thresholds }
    }

    /// The thresholds in use.
    pub fn thresholds(&self) -> &UtilizationThresholds {
        &self.thresholds
    }

    /// The staleness policy applied to `pool`: the pool's own, else this detector's threshold
    /// failing closed.
    fn policy_for(&self, pool: &PoolSnapshot) -> StalenessPolicy {
        pool.staleness().copied().unwrap_or(StalenessPolicy {
            threshold: self
                .thresholds
                .metrics_staleness
                .unwrap_or(DEFAULT_METRICS_STALENESS_THRESHOLD),
            when_all_stale: AllStale::FailClosed,
        })
    }

    /// Whether one endpoint can take more work at `now`: fresh under this detector's own
    /// threshold and below both thresholds.
    pub fn has_headroom(&self, metrics: &EndpointMetrics, now: Instant) -> bool {
        let threshold =
            self.thresholds.metrics_staleness.unwrap_or(DEFAULT_METRICS_STALENESS_THRESHOLD);
        !metrics.is_stale(now, threshold) && self.below_thresholds(metrics)
    }

    /// Whether `metrics`, fresh or not, are below both thresholds.
    fn below_thresholds(&self, metrics: &EndpointMetrics) -> bool {
        // NaN usage compares false below, so a garbled gauge never reads as headroom.
        metrics.waiting_queue < self.thresholds.queue_depth
            && metrics.kv_usage < self.thresholds.kv_cache_util
    }
}

impl SaturationDetector for UtilizationDetector {
    fn is_saturated(&self, pool: &PoolSnapshot, now: Instant) -> bool {
        // When every endpoint is stale and the policy fails open, the last known numbers are
        // judged, as routing does.
        !self
            .policy_for(pool)
            .any_candidate(pool.endpoints(), now, |state| self.below_thresholds(&state.metrics))
    }

    /// The mean over endpoints of each endpoint's fullness, the larger of its queue depth and
    /// its KV-cache use over their thresholds; an endpoint with stale metrics counts as full,
    /// and an empty pool is saturated (the Go EPP's utilization formula). Raised to 1 when
    /// [`Self::is_saturated`] holds, so the two never disagree.
    fn saturation(&self, pool: &PoolSnapshot, now: Instant) -> f64 {
        if self.is_saturated(pool, now) || pool.endpoints().is_empty() {
            return 1.0;
        }
        let threshold = self.policy_for(pool).threshold;
        let total: f64 = pool
            .endpoints()
            .iter()
            .map(|state| {
                if state.metrics.is_stale(now, threshold) {
                    return 1.0;
                }
                let queue =
                    f64::from(state.metrics.waiting_queue) / f64::from(self.thresholds.queue_depth);
                let kv = state.metrics.kv_usage / self.thresholds.kv_cache_util;
                // A garbled gauge (NaN) reads as full, never as headroom.
                let full = queue.max(kv);
                if full.is_nan() { 1.0 } else { full }
            })
            .sum();
        total / pool.endpoints().len() as f64
    }
}

/// A pool-wide permit count: saturated when no permit is left.
///
/// Each admission takes a permit ([`SaturationDetector::on_admit`]) and
/// [`PermitDetector::return_permit`] gives it back, so admissions are exact with no lag. Useful
/// as a simple global concurrency limit and as a deterministic detector in tests.
#[derive(Debug, Default)]
pub struct PermitDetector {
    available: AtomicI64,
}

impl PermitDetector {
    /// A detector with `permits` permits.
    pub fn new(permits: u32) -> Self {
        Self { available: AtomicI64::new(i64::from(permits)) }
    }

    /// Returns one permit (a request admitted earlier finished).
    pub fn return_permit(&self) {
        self.available.fetch_add(1, Ordering::AcqRel);
    }

    /// Adds or removes permits (negative `delta`), for tests and live resizing.
    pub fn adjust(&self, delta: i64) {
        self.available.fetch_add(delta, Ordering::AcqRel);
    }

    /// Permits left; negative when more were taken than given.
    pub fn available(&self) -> i64 {
        self.available.load(Ordering::Acquire)
    }
}

impl SaturationDetector for PermitDetector {
    fn is_saturated(&self, _pool: &PoolSnapshot, _now: Instant) -> bool {
        self.available() <= 0
    }

    fn on_admit(&self) {
        self.available.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Never saturated: admits everything. For benchmarks and for running without a detector.
#[derive(Clone, Copy, Debug, Default)]
pub struct NeverSaturated;

impl SaturationDetector for NeverSaturated {
    fn is_saturated(&self, _pool: &PoolSnapshot, _now: Instant) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::endpoint::{Endpoint, EndpointState};

    fn endpoint(port: u16, waiting: u32, kv: f64, updated_at: Option<Instant>) -> EndpointState {
        EndpointState::new(Endpoint::new(([10, 0, 0, 1], port).into())).with_metrics(
            EndpointMetrics {
                waiting_queue: waiting,
                kv_usage: kv,
                updated_at,
                ..Default::default()
            },
        )
    }

    #[test]
    fn saturation_level_is_the_mean_roofline_of_the_endpoints() {
        let now = Instant::now();
        let detector = UtilizationDetector::default(); // queue 5, KV 0.8
        // Queue 1/5 = 0.2 vs KV 0.4/0.8 = 0.5 -> 0.5; queue 3/5 = 0.6 vs KV 0 -> 0.6.
        let pool =
            PoolSnapshot::new([endpoint(1, 1, 0.4, Some(now)), endpoint(2, 3, 0.0, Some(now))]);
        assert!((detector.saturation(&pool, now) - 0.55).abs() < 1e-9);
        // A stale endpoint counts as full: (0.5 + 1) / 2.
        let stale = PoolSnapshot::new([endpoint(1, 1, 0.4, Some(now)), endpoint(2, 0, 0.0, None)]);
        assert!((detector.saturation(&stale, now) - 0.75).abs() < 1e-9);
        assert_eq!(detector.saturation(&PoolSnapshot::default(), now), 1.0, "empty: saturated");
        let full = PoolSnapshot::new([endpoint(1, 5, 0.0, Some(now))]);
        assert!(detector.is_saturated(&full, now));
        assert_eq!(detector.saturation(&full, now), 1.0, "never below 1 while saturated");
    }

    #[test]
    fn thresholds_are_inclusive_at_the_edge() {
        let now = Instant::now();
        let detector = UtilizationDetector::default();
        let below = PoolSnapshot::new([endpoint(1, 4, 0.79, Some(now))]);
        assert!(!detector.is_saturated(&below, now));
        let queue_at_edge = PoolSnapshot::new([endpoint(1, 5, 0.0, Some(now))]);
        assert!(detector.is_saturated(&queue_at_edge, now));
        let kv_at_edge = PoolSnapshot::new([endpoint(1, 0, 0.8, Some(now))]);
        assert!(detector.is_saturated(&kv_at_edge, now));
        let nan_kv = PoolSnapshot::new([endpoint(1, 0, f64::NAN, Some(now))]);
        assert!(detector.is_saturated(&nan_kv, now));
    }

    #[test]
    fn one_fresh_endpoint_with_headroom_is_enough() {
        let now = Instant::now();
        let detector = UtilizationDetector::default();
        let pool = PoolSnapshot::new([
            endpoint(1, 50, 0.9, Some(now)),
            endpoint(2, 0, 0.1, Some(now)),
            endpoint(3, 9, 0.1, Some(now)),
        ]);
        assert!(!detector.is_saturated(&pool, now));
    }

    #[test]
    fn stale_endpoints_offer_no_capacity() {
        let scraped = Instant::now();
        let detector = UtilizationDetector::default();
        let pool =
            PoolSnapshot::new([endpoint(1, 0, 0.0, Some(scraped)), endpoint(2, 0, 0.0, None)]);
        let at_threshold = scraped + DEFAULT_METRICS_STALENESS_THRESHOLD;
        assert!(!detector.is_saturated(&pool, at_threshold), "exactly 2 s old is still fresh");
        let past = at_threshold + Duration::from_nanos(1);
        assert!(detector.is_saturated(&pool, past), "all stale is saturated");
    }

    #[test]
    fn the_pool_policy_decides_staleness_and_the_all_stale_case() {
        use crate::pool::staleness::{AllStale, StalenessPolicy};
        let scraped = Instant::now();
        let detector = UtilizationDetector::default();
        let policy = StalenessPolicy::new(Duration::from_secs(1));
        let later = scraped + Duration::from_secs(5);
        // Some stale: a stale endpoint with room does not count, a fresh full one decides.
        let some_stale = PoolSnapshot::new([
            endpoint(1, 0, 0.0, Some(scraped)),
            endpoint(2, 9, 0.0, Some(later)),
        ])
        .with_staleness(Some(policy));
        assert!(detector.is_saturated(&some_stale, later));
        // All stale, failing open: the last known numbers decide.
        let all_stale = PoolSnapshot::new([
            endpoint(1, 0, 0.0, Some(scraped)),
            endpoint(2, 9, 0.0, Some(scraped)),
        ]);
        let open = all_stale.clone().with_staleness(Some(policy));
        assert!(!detector.is_saturated(&open, later));
        let full =
            PoolSnapshot::new([endpoint(1, 7, 0.0, Some(scraped))]).with_staleness(Some(policy));
        assert!(detector.is_saturated(&full, later));
        // All stale, failing closed: saturated whatever the numbers.
        let closed = all_stale.with_staleness(Some(policy.when_all_stale(AllStale::FailClosed)));
        assert!(detector.is_saturated(&closed, later));
        // The pool's threshold wins over the detector's own.
        let own = UtilizationDetector::new(UtilizationThresholds {
            metrics_staleness: Some(Duration::from_secs(60)),
            ..UtilizationThresholds::default()
        });
        let one = PoolSnapshot::new([endpoint(1, 0, 0.0, Some(scraped))]);
        assert!(!own.is_saturated(&one, later), "without a pool policy: 60 s");
        let one = one.with_staleness(Some(policy.when_all_stale(AllStale::FailClosed)));
        assert!(own.is_saturated(&one, later), "with one: the pool's 1 s");
    }

    #[test]
    fn empty_pool_is_saturated() {
        let detector = UtilizationDetector::default();
        assert!(detector.is_saturated(&PoolSnapshot::default(), Instant::now()));
    }

    #[test]
    fn permits_are_taken_and_returned() {
        let pool = PoolSnapshot::default();
        let now = Instant::now();
        let permits = PermitDetector::new(1);
        assert!(!permits.is_saturated(&pool, now));
        permits.on_admit();
        assert!(permits.is_saturated(&pool, now));
        permits.return_permit();
        assert!(!permits.is_saturated(&pool, now));
    }
}
