//! GIE's `concurrency-detector`: saturation from requests in flight per endpoint.
//!
//! Each endpoint may hold up to `maxConcurrency` requests the picker sent it and that have
//! not completed; the pool is saturated when every endpoint is at its limit (an empty pool is
//! saturated). Counts move through [`ConcurrencyDetector::begin`] / [`ConcurrencyDetector::finish`],
//! which the [`PreRequest`] and [`ResponseComplete`] hooks call. The registry's
//! `concurrency-detector` plugin plays those hook roles next to its detector role, so the
//! scheduler built from a config keeps the counts current. A check is O(endpoints) map lookups
//! under a read lock.

use std::collections::HashMap;
use std::time::Instant;

use parking_lot::RwLock;
use serde::Deserialize;

use crate::flow::saturation::SaturationDetector;
use crate::pool::PoolSnapshot;
use crate::pool::endpoint::{EndpointId, EndpointState};
use crate::request::InferenceRequest;
use crate::scheduling::cycle::CycleState;
use crate::scheduling::plugin::{PreRequest, ResponseComplete};
use crate::scheduling::result::{CompletedRequest, SchedulingResult};

/// GIE type name of the concurrency detector plugin.
pub const CONCURRENCY_DETECTOR_TYPE: &str = "concurrency-detector";

/// Default `maxConcurrency` of the concurrency detector.
pub const DEFAULT_MAX_CONCURRENCY: u32 = 100;

/// Parameters of a `concurrency-detector` plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ConcurrencyParameters {
    /// `maxConcurrency`: requests in flight allowed per endpoint.
    pub max_concurrency: u32,
}

impl Default for ConcurrencyParameters {
    fn default() -> Self {
        Self { max_concurrency: DEFAULT_MAX_CONCURRENCY }
    }
}

/// Saturated when every endpoint has `max_concurrency` requests in flight.
#[derive(Debug)]
pub struct ConcurrencyDetector {
    max_concurrency: u32,
    in_flight: RwLock<HashMap<EndpointId, u32>>,
}

impl ConcurrencyDetector {
    /// A detector allowing `max_concurrency` requests in flight per endpoint.
    pub fn new(max_concurrency: u32) -> Self {
        Self { max_concurrency, in_flight: RwLock::new(HashMap::new()) }
    }

    /// The per-endpoint limit.
    pub fn max_concurrency(&self) -> u32 {
        self.max_concurrency
    }

    /// Records a request sent to `endpoint`.
    pub fn begin(&self, endpoint: EndpointId) {
        let mut in_flight = self.in_flight.write();
        let count = in_flight.entry(endpoint).or_insert(0);
        *count = count.saturating_add(1);
    }

    /// Records that a request sent to `endpoint` ended. Unmatched calls are ignored, so a
    /// duplicate completion cannot drive a count below zero.
    pub fn finish(&self, endpoint: EndpointId) {
        let mut in_flight = self.in_flight.write();
        if let Some(count) = in_flight.get_mut(&endpoint) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                // Removing idle entries bounds the map by the endpoints that have work.
                in_flight.remove(&endpoint);
            }
        }
    }

    /// Requests in flight on `endpoint`.
    pub fn in_flight(&self, endpoint: EndpointId) -> u32 {
        self.in_flight.read().get(&endpoint).copied().unwrap_or(0)
    }
}

impl SaturationDetector for ConcurrencyDetector {
    /// Judged over the endpoints a request could be routed to under the pool's staleness
    /// policy: the fresh ones while any is fresh (a stale endpoint is not routed to, so its
    /// free slots are no capacity); when none is, every endpoint if the policy fails open,
    /// none (saturated) if it fails closed.
    fn is_saturated(&self, pool: &PoolSnapshot, now: Instant) -> bool {
        let in_flight = self.in_flight.read();
        let has_room = |state: &EndpointState| {
            in_flight.get(&state.id()).copied().unwrap_or(0) < self.max_concurrency
        };
        !match pool.staleness() {
            Some(policy) => policy.any_candidate(pool.endpoints(), now, has_room),
            None => pool.endpoints().iter().any(has_room),
        }
    }

    /// Requests in flight over the pool's total capacity (`maxConcurrency` per endpoint), as
    /// the Go detector's request mode computes it; 1 for an empty or saturated pool.
    fn saturation(&self, pool: &PoolSnapshot, now: Instant) -> f64 {
        if pool.endpoints().is_empty() || self.is_saturated(pool, now) {
            return 1.0;
        }
        let in_flight = self.in_flight.read();
        let busy: u64 = pool
            .endpoints()
            .iter()
            .map(|state| u64::from(in_flight.get(&state.id()).copied().unwrap_or(0)))
            .sum();
        let capacity = u64::from(self.max_concurrency) * pool.endpoints().len() as u64;
        if capacity == 0 { 1.0 } else { busy as f64 / capacity as f64 }
    }
}

impl PreRequest for ConcurrencyDetector {
    fn pre_request(
        &self,
        _state: &mut CycleState,
        _request: &InferenceRequest,
        result: &SchedulingResult,
    ) {
        self.begin(result.primary().id());
        if let Some(prefill) = result.prefill() {
            self.begin(prefill.id());
        }
    }
}

impl ResponseComplete for ConcurrencyDetector {
    fn response_complete(&self, completed: &CompletedRequest) {
        // The scheduled endpoint, not the served one: it is the one `pre_request` counted.
        self.finish(completed.scheduled_endpoint);
    }

    fn prefill_complete(&self, prefill: &crate::scheduling::result::PrefillCompleted) {
        self.finish(prefill.endpoint);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::endpoint::{Endpoint, EndpointState};
    use crate::scheduling::result::Outcome;

    #[test]
    fn saturated_only_when_every_endpoint_is_at_its_limit() {
        let a = Endpoint::new(([10, 0, 0, 1], 1).into());
        let b = Endpoint::new(([10, 0, 0, 1], 2).into());
        let pool =
            PoolSnapshot::new([EndpointState::new(a.clone()), EndpointState::new(b.clone())]);
        let now = Instant::now();
        let detector = ConcurrencyDetector::new(2);
        detector.begin(a.id);
        detector.begin(a.id);
        assert!(!detector.is_saturated(&pool, now));
        detector.begin(b.id);
        assert!(!detector.is_saturated(&pool, now));
        detector.begin(b.id);
        assert!(detector.is_saturated(&pool, now));
        detector.response_complete(&CompletedRequest {
            request_id: String::new(),
            target_model: String::new(),
            scheduled_endpoint: b.id,
            served_endpoint: Some(a.id),
            prompt_tokens: None,
            completion_tokens: None,
            outcome: Outcome::Completed,
            fairness_id: None,
            decision_id: 0,
        });
        assert_eq!(detector.in_flight(b.id), 1);
        assert!(!detector.is_saturated(&pool, now));
    }

    #[test]
    fn stale_endpoints_offer_no_slots_while_one_is_fresh() {
        use crate::pool::endpoint::EndpointMetrics;
        use crate::pool::staleness::{AllStale, StalenessPolicy};
        let now = Instant::now();
        let fresh = Endpoint::new(([10, 0, 0, 1], 1).into());
        let stale = Endpoint::new(([10, 0, 0, 1], 2).into());
        let scraped = EndpointMetrics { updated_at: Some(now), ..EndpointMetrics::default() };
        let policy = StalenessPolicy::new(std::time::Duration::from_secs(2));
        let pool = PoolSnapshot::new([
            EndpointState::new(fresh.clone()).with_metrics(scraped),
            EndpointState::new(stale.clone()),
        ])
        .with_staleness(Some(policy));
        let detector = ConcurrencyDetector::new(1);
        assert!(!detector.is_saturated(&pool, now));
        detector.begin(fresh.id);
        assert!(detector.is_saturated(&pool, now), "the never-scraped endpoint is not routed to");

        // Nothing fresh: failing open, every endpoint's slots count; failing closed, none.
        let later = now + std::time::Duration::from_secs(3);
        assert!(!detector.is_saturated(&pool, later));
        detector.begin(stale.id);
        assert!(detector.is_saturated(&pool, later));
        detector.finish(stale.id);
        let closed = pool.with_staleness(Some(policy.when_all_stale(AllStale::FailClosed)));
        assert!(detector.is_saturated(&closed, later));
    }

    #[test]
    fn saturation_is_the_share_of_slots_in_use() {
        let now = Instant::now();
        let (a, b) =
            (Endpoint::new(([10, 0, 0, 1], 1).into()), Endpoint::new(([10, 0, 0, 1], 2).into()));
        let pool =
            PoolSnapshot::new([EndpointState::new(a.clone()), EndpointState::new(b.clone())]);
        let (a, b) = (a.id, b.id);
        let detector = ConcurrencyDetector::new(2);
        assert_eq!(detector.saturation(&pool, now), 0.0);
        detector.begin(a);
        assert_eq!(detector.saturation(&pool, now), 0.25);
        detector.begin(a);
        detector.begin(b);
        assert_eq!(detector.saturation(&pool, now), 0.75);
        detector.begin(b);
        assert_eq!(detector.saturation(&pool, now), 1.0);
        assert_eq!(detector.saturation(&PoolSnapshot::default(), now), 1.0);
    }

    #[test]
    fn unmatched_finish_and_empty_pool() {
        let detector = ConcurrencyDetector::new(1);
        detector.finish(EndpointId(7));
        assert_eq!(detector.in_flight(EndpointId(7)), 0);
        assert!(detector.is_saturated(&PoolSnapshot::default(), Instant::now()));
        let zero = ConcurrencyDetector::new(0);
        let pool =
            PoolSnapshot::new([EndpointState::new(Endpoint::new(([10, 0, 0, 1], 1).into()))]);
        assert!(zero.is_saturated(&pool, Instant::now()), "a zero limit admits nothing");
    }
}
