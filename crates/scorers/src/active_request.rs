//! `active-request-scorer`: prefers endpoints with fewer requests in flight from this picker.
//!
//! Metrics lag by a scrape interval; requests this picker has sent are known at once. Each
//! decision's primary endpoint is counted in by the pre-request hook and out by the completion
//! hook (on the endpoint it was scheduled on), so bursts spread before the next scrape shows
//! them. A disaggregated request's prefill endpoint is counted too, and out when the
//! response starts (its prefill is over by then).
//!
//! Score, as llm-d-router's: an endpoint with at most `idleThreshold` requests in flight
//! (default 0) is idle and scores 1; a busy one with n scores (max - n) / max ×
//! `maxBusyScore` (default 1), max the largest count among the candidates. llm-d-router
//! reads the counts from its `inflight-load-producer`; this scorer keeps the same counts
//! itself, so `inFlightLoadProducerName` has no effect, and `requestTimeout` is accepted and
//! ignored as in llm-d-router (deprecated there). A `maxBusyScore` outside [0, 1] and a
//! negative `idleThreshold` fall back to their defaults, as there, with a warning.
//!
//! Counters live in a read-mostly map of atomics: scoring takes one shared lock per request
//! and no write lock; only the first request to a new endpoint takes the write lock.
//!
//! With a cross-replica syncer, the requests other replicas have in flight
//! ([`PeerInFlight`]) are added to this replica's own counts when scoring.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;
use scheduler_core::{
    Candidates, CompletedRequest, CycleState, EndpointId, EndpointMap, InferenceRequest,
    PreRequest, PrefillCompleted, ResponseComplete, SchedulingResult, Scorer,
};
use serde::Deserialize;

use crate::peer_load::{InFlightCounts, PeerInFlight, SharedInFlight};

/// llm-d type name.
pub const TYPE_NAME: &str = "active-request-scorer";

/// Parameters of [`ActiveRequestScorer`] (llm-d-router's).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct ActiveRequestParameters {
    /// Requests in flight up to which an endpoint is idle and scores 1 (default 0).
    pub idle_threshold: i64,
    /// The score of the least busy endpoint that is not idle, in [0, 1] (default 1).
    pub max_busy_score: Option<f64>,
    /// Deprecated in llm-d-router and ignored there; accepted, no effect.
    pub request_timeout: Option<String>,
    /// llm-d-router's producer of the counts; accepted, no effect (see the module doc).
    pub in_flight_load_producer_name: Option<String>,
}

/// Counts in-flight requests per endpoint and scores by them.
#[derive(Debug)]
pub struct ActiveRequestScorer {
    in_flight: RwLock<EndpointMap<AtomicU64>>,
    /// Other replicas' requests in flight, added when scoring.
    peers: PeerInFlight,
    idle_threshold: u64,
    max_busy_score: f64,
}

impl Default for ActiveRequestScorer {
    fn default() -> Self {
        Self {
            in_flight: RwLock::default(),
            peers: PeerInFlight::default(),
            idle_threshold: 0,
            max_busy_score: 1.0,
        }
    }
}

impl ActiveRequestScorer {
    /// A scorer with no request in flight and the default parameters.
    pub fn new() -> Self {
        Self::default()
    }

    /// A scorer with `parameters`; out-of-range values take their defaults, as in
    /// llm-d-router.
    pub fn with_parameters(parameters: &ActiveRequestParameters) -> Self {
        let idle_threshold = u64::try_from(parameters.idle_threshold).unwrap_or_else(|_| {
            tracing::warn!(
                idle_threshold = parameters.idle_threshold,
                "active-request-scorer: ignoring a negative idleThreshold; using 0"
            );
            0
        });
        let max_busy_score = match parameters.max_busy_score {
            None => 1.0,
            Some(score) if (0.0..=1.0).contains(&score) => score,
            Some(score) => {
                tracing::warn!(
                    max_busy_score = score,
                    "active-request-scorer: ignoring an out-of-range maxBusyScore; using 1.0"
                );
                1.0
            }
        };
        Self { idle_threshold, max_busy_score, ..Self::default() }
    }

    /// The score of an endpoint with `count` requests in flight, `max` the largest count
    /// among the candidates.
    pub fn score_of(&self, count: u64, max: u64) -> f64 {
        if count <= self.idle_threshold || max == 0 {
            return 1.0;
        }
        (max - count.min(max)) as f64 / max as f64 * self.max_busy_score
    }

    /// Requests this replica has in flight on `endpoint` (peers' not included).
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
        self.peers.with(|peers| {
            let count = |state: &scheduler_core::EndpointState| {
                let own = map.get(&state.id()).map_or(0, |count| count.load(Ordering::Relaxed));
                own.saturating_add(peers.get(&state.id()).map_or(0, |peer| peer.requests))
            };
            let max = candidates.iter().map(count).max().unwrap_or(0);
            for (score, state) in scores.iter_mut().zip(candidates.iter()) {
                *score = self.score_of(count(state), max);
            }
        });
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

impl SharedInFlight for ActiveRequestScorer {
    fn local_in_flight(&self, out: &mut Vec<(EndpointId, InFlightCounts)>) {
        for (&endpoint, count) in self.in_flight.read().iter() {
            let requests = count.load(Ordering::Relaxed);
            if requests > 0 {
                out.push((endpoint, InFlightCounts { requests, tokens: 0 }));
            }
        }
    }

    fn peers(&self) -> &PeerInFlight {
        &self.peers
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
