//! `active-request-scorer`: prefers endpoints with fewer requests in flight from this picker.
//!
//! Metrics lag by a scrape interval; requests this picker has sent are known at once. Each
//! decision's primary endpoint is counted in by the pre-request hook and out by the completion
//! hook (on the endpoint it was scheduled on), so bursts spread before the next scrape shows
//! them. A disaggregated request's prefill endpoint is counted too, and out when the
//! response starts (its prefill is over by then). Score = (max - n) / (max - min) over the candidates; all equal -> 1.
//!
//! Counters live in a read-mostly map of atomics: scoring takes one shared lock per request
//! and no write lock; only the first request to a new endpoint takes the write lock.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;
use scheduler_core::{
    Candidates, CompletedRequest, CycleState, EndpointId, EndpointMap, InferenceRequest,
    PreRequest, PrefillCompleted, ResponseComplete, SchedulingResult, Scorer,
};

/// llm-d type name.
pub const TYPE_NAME: &str = "active-request-scorer";

/// Counts in-flight requests per endpoint and scores by them.
#[derive(Debug, Default)]
pub struct ActiveRequestScorer {
    in_flight: RwLock<EndpointMap<AtomicU64>>,
}

impl ActiveRequestScorer {
    /// A scorer with no request in flight.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests in flight on `endpoint`.
    pub fn in_flight(&self, endpoint: EndpointId) -> u64 {
        self.in_flight.read().get(&endpoint).map_or(0, |count| count.load(Ordering::Relaxed))
    }

    /// Requests in flight on all endpoints.
    pub fn total_in_flight(&self) -> u64 {
        self.in_flight.read().values().map(|count| count.load(Ordering::Relaxed)).sum()
    }

    fn increment(&self, endpoint: EndpointId) {
        if let Some(counter) = self.in_flight.read().get(&endpoint) {
            counter.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut map = self.in_flight.write();
        // Endpoints leave the pool; drop their idle counters so the map stays pool-sized.
        if map.len() >= 1024 && map.len().is_power_of_two() {
            map.retain(|_, count| count.load(Ordering::Relaxed) > 0);
        }
        map.entry(endpoint).or_default().fetch_add(1, Ordering::Relaxed);
    }
}

impl Scorer for ActiveRequestScorer {
    fn score(
        &self,
        _state: &mut CycleState,
        _request: &InferenceRequest,
        candidates: Candidates<'_>,
        scores: &mut [f64],
    ) {
        let map = self.in_flight.read();
        for (score, state) in scores.iter_mut().zip(candidates.iter()) {
            *score = map.get(&state.id()).map_or(0, |count| count.load(Ordering::Relaxed)) as f64;
        }
        crate::normalize::min_max_inverted(scores);
    }
}

impl PreRequest for ActiveRequestScorer {
    fn pre_request(
        &self,
        _state: &mut CycleState,
        _request: &InferenceRequest,
        result: &SchedulingResult,
    ) {
        self.increment(result.primary().id());
        // A disaggregated request keeps its prefill endpoint busy too, until the response
        // starts (`prefill_complete`).
        if let Some(prefill) = result.prefill() {
            self.increment(prefill.id());
        }
    }
}

impl ActiveRequestScorer {
    fn decrement(&self, endpoint: EndpointId) {
        let map = self.in_flight.read();
        if let Some(counter) = map.get(&endpoint) {
            // Saturating: a completion without a matching start must not wrap the counter.
            let _ =
                counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }
}

impl ResponseComplete for ActiveRequestScorer {
    fn response_complete(&self, completed: &CompletedRequest) {
        // The request was counted on the scheduled endpoint; if the proxy served it elsewhere,
        // the scheduled endpoint still holds the count.
        self.decrement(completed.scheduled_endpoint);
    }

    fn prefill_complete(&self, prefill: &PrefillCompleted) {
        self.decrement(prefill.endpoint);
    }
}
