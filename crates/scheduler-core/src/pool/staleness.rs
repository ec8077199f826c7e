//! Stale metrics: one policy for readiness, admission and routing.
//!
//! An endpoint's metrics are *fresh* while they are at most [`StalenessPolicy::threshold`] old
//! (default [`DEFAULT_METRICS_STALENESS_THRESHOLD`], 2 s); older or never scraped, they are
//! *stale*. The policy is held by the pool ([`SharedPool::set_staleness`]), so every reader of
//! a snapshot applies the same threshold:
//!
//! | Endpoints     | Routing                                      | Admission (utilization detector)       | Readiness   |
//! |---------------|----------------------------------------------|----------------------------------------|-------------|
//! | all fresh     | every endpoint                               | fresh endpoints' headroom              | serving     |
//! | some stale    | fresh endpoints only                         | fresh endpoints' headroom              | serving     |
//! | all stale, [`AllStale::FailOpen`] (default) | the least-loaded endpoints by last known load | last known metrics of every endpoint | serving |
//! | all stale, [`AllStale::FailClosed`] | none: 503 ([`SchedulingError::AllStale`]) | saturated | not serving |
//!
//! The last known load of an endpoint is its scraped waiting queue plus its scraped running
//! requests plus the requests this picker sent it since that scrape ([`last_known_load`]).
//!
//! Why fail open by default: metrics go stale for reasons that do not stop model servers from
//! serving (a metrics port blocked by a network policy, a scrape path renamed, a collector
//! starved of CPU). Refusing every request then turns a monitoring fault into an outage, while
//! routing on the last numbers known still spreads load. Fail closed suits deployments where a
//! proxy-level fallback (another pool, `failure_mode_allow`) does better than blind routing.
//!
//! The Go EPP applies two thresholds: `--metrics-staleness-threshold` (2 s) for its pool
//! metrics, and the utilization detector's `metricsStalenessThreshold` (200 ms), where stale
//! endpoints count as saturated (fail closed for admission) while its filter falls back to
//! every endpoint when none is fresh (fail open for routing). Here one threshold applies to all
//! three, and one switch chooses what happens when nothing is fresh.
//!
//! A pool without a policy (metrics set by hand, or no metrics at all) never calls an endpoint
//! stale for routing or readiness.
//!
//! [`SharedPool::set_staleness`]: crate::SharedPool::set_staleness
//! [`SchedulingError::AllStale`]: crate::SchedulingError::AllStale

use std::time::{Duration, Instant};

use crate::pool::endpoint::{EndpointMetrics, EndpointState};

/// Default staleness threshold: metrics older than this are stale (the Go EPP's
/// `--metrics-staleness-threshold` default; 40 scrapes at the default 50 ms interval).
pub const DEFAULT_METRICS_STALENESS_THRESHOLD: Duration = Duration::from_secs(2);

/// What to do when every candidate endpoint's metrics are stale.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AllStale {
    /// Route on the last known metrics: the least-loaded endpoints, and stay ready.
    #[default]
    FailOpen,
    /// Refuse: requests get 503, the pool counts as saturated, readiness is not serving.
    FailClosed,
}

/// The staleness threshold and the all-stale behaviour, applied together everywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StalenessPolicy {
    /// Metrics older than this are stale.
    pub threshold: Duration,
    /// What happens when every candidate is stale.
    pub when_all_stale: AllStale,
}

impl Default for StalenessPolicy {
    fn default() -> Self {
        Self { threshold: DEFAULT_METRICS_STALENESS_THRESHOLD, when_all_stale: AllStale::FailOpen }
    }
}

impl StalenessPolicy {
    /// A policy with `threshold`, failing open.
    pub fn new(threshold: Duration) -> Self {
        Self { threshold, when_all_stale: AllStale::FailOpen }
    }

    /// Sets what happens when every candidate is stale.
    pub fn when_all_stale(mut self, when_all_stale: AllStale) -> Self {
        self.when_all_stale = when_all_stale;
        self
    }

    /// Whether `metrics` are fresh at `now` (at most `threshold` old).
    pub fn is_fresh(&self, metrics: &EndpointMetrics, now: Instant) -> bool {
        !metrics.is_stale(now, self.threshold)
    }

    /// Whether the policy routes on last known metrics when nothing is fresh.
    pub fn fails_open(&self) -> bool {
        self.when_all_stale == AllStale::FailOpen
    }

    /// Whether some endpoint a request could be routed to under this policy satisfies
    /// `has_room`: a fresh one while any is fresh; with none fresh, any endpoint when failing
    /// open and none when failing closed. What saturation detectors judge capacity over, so
    /// admission and routing agree on the candidates.
    pub fn any_candidate(
        &self,
        endpoints: &[EndpointState],
        now: Instant,
        has_room: impl Fn(&EndpointState) -> bool,
    ) -> bool {
        let mut any_fresh = false;
        for state in endpoints {
            if self.is_fresh(&state.metrics, now) {
                if has_room(state) {
                    return true;
                }
                any_fresh = true;
            }
        }
        !any_fresh && self.fails_open() && endpoints.iter().any(has_room)
    }
}

/// The last known load of an endpoint: scraped waiting queue plus scraped running requests
/// plus the requests sent to it since that scrape (what fail-open routing ranks by).
pub fn last_known_load(state: &EndpointState) -> u64 {
    let pending = state.endpoint.dispatches().pending_since(state.metrics.updated_at);
    u64::from(state.metrics.waiting_queue)
        + u64::from(state.metrics.running)
        + u64::from(pending.requests)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::endpoint::Endpoint;

    #[test]
    fn fresh_up_to_the_threshold() {
        let now = Instant::now();
        let policy = StalenessPolicy::new(Duration::from_secs(1));
        let metrics = EndpointMetrics { updated_at: Some(now), ..Default::default() };
        assert!(policy.is_fresh(&metrics, now + Duration::from_secs(1)));
        assert!(!policy.is_fresh(&metrics, now + Duration::from_millis(1001)));
        assert!(!policy.is_fresh(&EndpointMetrics::default(), now), "never scraped");
        assert!(policy.fails_open());
        assert!(!policy.when_all_stale(AllStale::FailClosed).fails_open());
    }

    #[test]
    fn load_counts_queue_running_and_picks_since_the_scrape() {
        let scraped = Instant::now();
        let state = EndpointState::new(Endpoint::new(([10, 0, 0, 1], 1).into())).with_metrics(
            EndpointMetrics {
                waiting_queue: 3,
                running: 2,
                updated_at: Some(scraped),
                ..Default::default()
            },
        );
        assert_eq!(last_known_load(&state), 5);
        state.endpoint.dispatches().record(scraped + Duration::from_millis(1), 10);
        assert_eq!(last_known_load(&state), 6);
    }
}
