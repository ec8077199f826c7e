//! llm-d-router's `concurrency-detector`: saturation from the requests and tokens in flight on
//! each endpoint, and a filter that keeps endpoints below their burst limit.
//!
//! The detector reads its counts from an [`InFlightSource`]. With the built-in plugins that is
//! the `inflight-load-producer` (named by `inFlightLoadProducerName`, created with default
//! parameters when the config declares none), as in Go, where the detector consumes the
//! producer's per-endpoint in-flight load attribute. A registry holding only the core's plugins
//! has no such producer; there the plugin counts for itself ([`LocalInFlight`], charged by its
//! own pre-request hook and released on completion), so the core stays usable alone.
//!
//! With `r`, `t` the requests and tokens in flight on an endpoint, `R` = `maxConcurrency`
//! (default 100), `T` = `maxTokenConcurrency` (default 1,000,000) and `h` = `headroom`
//! (default 0), by `concurrencyMode`:
//! - `requests` (default): saturation = sum(r) / (R × endpoints); an endpoint passes the
//!   filter while r < ⌊R × (1 + h)⌋;
//! - `tokens`: saturation = sum(t) / (T × endpoints); filter t < ⌊T × (1 + h)⌋;
//! - `hybrid`: saturation = mean over endpoints of max(r / R, t / T); an endpoint passes
//!   while both limits hold.
//!
//! The pool is saturated when saturation reaches 1 (an empty pool is saturated), as Go's flow
//! controller reads the signal. Headroom only widens the filter: backpressure works on the
//! ideal capacity while scheduling may burst past it for affinity.
//!
//! Difference from Go: saturation is judged over the endpoints a request could be routed to
//! under the pool's staleness policy (the fresh ones while any is fresh; when none is, every
//! endpoint if the policy fails open, none if it fails closed), because routing here never
//! sends to a stale endpoint while a fresh one exists, so a stale endpoint's free slots are no
//! capacity. Without a pool policy every endpoint counts, as in Go.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use serde::Deserialize;

use crate::flow::saturation::SaturationDetector;
use crate::pool::PoolSnapshot;
use crate::pool::endpoint::{EndpointId, EndpointState};
use crate::request::InferenceRequest;
use crate::scheduling::cycle::CycleState;
use crate::scheduling::plugin::{Filter, PreRequest, ResponseComplete};
use crate::scheduling::result::{CompletedRequest, SchedulingResult};

/// llm-d type name of the concurrency detector plugin.
pub const CONCURRENCY_DETECTOR_TYPE: &str = "concurrency-detector";

/// Default `maxConcurrency`: requests in flight one endpoint is meant to hold.
pub const DEFAULT_MAX_CONCURRENCY: i64 = 100;

/// Default `maxTokenConcurrency`: tokens in flight one endpoint is meant to hold.
pub const DEFAULT_MAX_TOKEN_CONCURRENCY: i64 = 1_000_000;

/// The producer type the detector reads by default (`inflight-load-producer`).
pub const DEFAULT_IN_FLIGHT_PRODUCER: &str = "inflight-load-producer";

/// What the detector counts (`concurrencyMode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConcurrencyMode {
    /// Requests in flight.
    #[default]
    Requests,
    /// Tokens in flight.
    Tokens,
    /// Both; each endpoint judged by the tighter of the two.
    Hybrid,
}

/// Parameters of a `concurrency-detector` plugin (llm-d-router's names).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ConcurrencyParameters {
    /// `maxConcurrency`: the ideal requests in flight per endpoint (positive).
    pub max_concurrency: i64,
    /// `maxTokenConcurrency`: the ideal tokens in flight per endpoint (positive).
    pub max_token_concurrency: i64,
    /// `headroom`: the filter's burst allowance over the ideal, as a fraction (not negative).
    pub headroom: f64,
    /// `concurrencyMode`: `requests`, `tokens` or `hybrid`.
    pub concurrency_mode: ConcurrencyMode,
    /// `inFlightLoadProducerName`: the producer read (empty or absent: the default one).
    pub in_flight_load_producer_name: Option<String>,
}

impl Default for ConcurrencyParameters {
    fn default() -> Self {
        Self {
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
            max_token_concurrency: DEFAULT_MAX_TOKEN_CONCURRENCY,
            headroom: 0.0,
            concurrency_mode: ConcurrencyMode::Requests,
            in_flight_load_producer_name: None,
        }
    }
}

impl ConcurrencyParameters {
    /// Every constraint Go enforces, all reported at once.
    pub fn validate(&self) -> Result<(), String> {
        let mut errors = Vec::new();
        if self.max_concurrency <= 0 {
            errors.push(format!(
                "maxConcurrency must be strictly positive, got {}",
                self.max_concurrency
            ));
        }
        if !(self.headroom >= 0.0 && self.headroom.is_finite()) {
            errors.push(format!("headroom must be a non-negative value, got {}", self.headroom));
        }
        if self.max_token_concurrency <= 0 {
            errors.push(format!(
                "maxTokenConcurrency must be strictly positive, got {}",
                self.max_token_concurrency
            ));
        }
        if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
    }

    /// The producer the detector reads: `inFlightLoadProducerName`, or the default type name.
    pub fn producer_name(&self) -> &str {
        match self.in_flight_load_producer_name.as_deref() {
            None | Some("") => DEFAULT_IN_FLIGHT_PRODUCER,
            Some(name) => name,
        }
    }
}

/// Requests and tokens in flight on one endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InFlight {
    /// Requests.
    pub requests: i64,
    /// Tokens.
    pub tokens: i64,
}

/// Where in-flight counts come from (the `inflight-load-producer`, or [`LocalInFlight`]).
pub trait InFlightSource: Send + Sync + fmt::Debug {
    /// The counts on `endpoint` (zero when nothing is known).
    fn in_flight(&self, endpoint: EndpointId) -> InFlight;
}

/// Counts kept by the detector's own hooks, for registries without an in-flight producer:
/// one request and the prompt's estimated tokens per endpoint picked (primary and prefill),
/// released when that endpoint's part of the request ends.
#[derive(Debug, Default)]
pub struct LocalInFlight {
    counts: RwLock<HashMap<EndpointId, InFlight>>,
    /// What each decision charged, so its end releases exactly that.
    charges: Mutex<HashMap<u64, LocalCharge>>,
}

#[derive(Debug)]
struct LocalCharge {
    request_id: String,
    tokens: i64,
    /// The prefill endpoint, until its part ends.
    prefill: Option<EndpointId>,
}

impl LocalInFlight {
    /// Records a request of `tokens` sent to `endpoint`.
    pub fn begin(&self, endpoint: EndpointId, tokens: i64) {
        let mut counts = self.counts.write();
        let count = counts.entry(endpoint).or_default();
        count.requests = count.requests.saturating_add(1);
        count.tokens = count.tokens.saturating_add(tokens);
    }

    /// Records that a request of `tokens` sent to `endpoint` ended. Counts stop at zero, so a
    /// duplicate completion cannot drive them negative.
    pub fn finish(&self, endpoint: EndpointId, tokens: i64) {
        let mut counts = self.counts.write();
        if let Some(count) = counts.get_mut(&endpoint) {
            count.requests = (count.requests - 1).max(0);
            count.tokens = (count.tokens - tokens).max(0);
            if count.requests == 0 {
                // Idle entries are dropped so the map holds only endpoints with work.
                counts.remove(&endpoint);
            }
        }
    }
}

impl InFlightSource for LocalInFlight {
    fn in_flight(&self, endpoint: EndpointId) -> InFlight {
        self.counts.read().get(&endpoint).copied().unwrap_or_default()
    }
}

impl PreRequest for LocalInFlight {
    fn pre_request(
        &self,
        _state: &mut CycleState,
        request: &InferenceRequest,
        result: &SchedulingResult,
    ) {
        let tokens = i64::try_from(request.estimated_prompt_tokens()).unwrap_or(i64::MAX);
        self.begin(result.primary().id(), tokens);
        let prefill = result.prefill().map(EndpointState::id);
        if let Some(prefill) = prefill {
            self.begin(prefill, tokens);
        }
        if let Some(decision) = result.decision_id() {
            let request_id = request.request_id.clone();
            self.charges.lock().insert(decision, LocalCharge { request_id, tokens, prefill });
        }
    }
}

impl ResponseComplete for LocalInFlight {
    fn response_complete(&self, completed: &CompletedRequest) {
        let charge = self.charges.lock().remove(&completed.decision_id);
        let tokens = charge.as_ref().map_or(0, |charge| charge.tokens);
        // The scheduled endpoint, not the served one: it is the one `pre_request` charged.
        self.finish(completed.scheduled_endpoint, tokens);
        if let Some(prefill) = charge.and_then(|charge| charge.prefill) {
            self.finish(prefill, tokens);
        }
    }

    fn prefill_complete(&self, prefill: &crate::scheduling::result::PrefillCompleted) {
        // The prefill report carries the request id, not the decision: find the charge by both
        // the id and the endpoint.
        let tokens = self.charges.lock().values_mut().find_map(|charge| {
            (charge.prefill == Some(prefill.endpoint) && charge.request_id == prefill.request_id)
                .then(|| {
                    charge.prefill = None;
                    charge.tokens
                })
        });
        if let Some(tokens) = tokens {
            self.finish(prefill.endpoint, tokens);
        }
    }
}

/// Saturation from in-flight counts, and the per-endpoint burst filter.
pub struct ConcurrencyDetector {
    parameters: ConcurrencyParameters,
    request_limit: i64,
    token_limit: i64,
    source: OnceLock<Arc<dyn InFlightSource>>,
}

impl fmt::Debug for ConcurrencyDetector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyDetector")
            .field("parameters", &self.parameters)
            .field("bound", &self.source.get().is_some())
            .finish()
    }
}

impl ConcurrencyDetector {
    /// A detector for `parameters`, not yet reading any counts ([`Self::bind_source`]); refuses
    /// what Go refuses.
    pub fn new(parameters: ConcurrencyParameters) -> Result<Self, String> {
        parameters.validate()?;
        // Go truncates the burst limit to a whole count.
        let limit = |ideal: i64| (ideal as f64 * (1.0 + parameters.headroom)) as i64;
        Ok(Self {
            request_limit: limit(parameters.max_concurrency),
            token_limit: limit(parameters.max_token_concurrency),
            parameters,
            source: OnceLock::new(),
        })
    }

    /// A detector reading `source`.
    pub fn with_source(
        parameters: ConcurrencyParameters,
        source: Arc<dyn InFlightSource>,
    ) -> Result<Self, String> {
        let detector = Self::new(parameters)?;
        detector.bind_source(source);
        Ok(detector)
    }

    /// Makes the detector read `source`; a detector reads one source for its whole life, so a
    /// second call is ignored and returns `false`.
    pub fn bind_source(&self, source: Arc<dyn InFlightSource>) -> bool {
        self.source.set(source).is_ok()
    }

    /// The parameters in use.
    pub fn parameters(&self) -> &ConcurrencyParameters {
        &self.parameters
    }

    /// The counts on `endpoint`; an unbound detector sees every endpoint idle.
    pub fn in_flight(&self, endpoint: EndpointId) -> InFlight {
        self.source.get().map(|source| source.in_flight(endpoint)).unwrap_or_default()
    }

    /// Whether an endpoint with `load` passes the filter (below its burst limit).
    pub fn admits(&self, load: InFlight) -> bool {
        match self.parameters.concurrency_mode {
            ConcurrencyMode::Requests => load.requests < self.request_limit,
            ConcurrencyMode::Tokens => load.tokens < self.token_limit,
            ConcurrencyMode::Hybrid => {
                load.requests < self.request_limit && load.tokens < self.token_limit
            }
        }
    }

    /// The saturation of `endpoints` by the mode's formula; 1 for none.
    pub fn saturation_of<'a>(&self, endpoints: impl Iterator<Item = &'a EndpointState>) -> f64 {
        let (max_requests, max_tokens) =
            (self.parameters.max_concurrency, self.parameters.max_token_concurrency);
        let (mut requests, mut tokens, mut count, mut hybrid) = (0i64, 0i64, 0i64, 0.0f64);
        for state in endpoints {
            let load = self.in_flight(state.id());
            count += 1;
            requests = requests.saturating_add(load.requests);
            tokens = tokens.saturating_add(load.tokens);
            hybrid += ratio(load.requests, max_requests).max(ratio(load.tokens, max_tokens));
        }
        if count == 0 {
            return 1.0;
        }
        match self.parameters.concurrency_mode {
            ConcurrencyMode::Requests => ratio(requests, max_requests.saturating_mul(count)),
            ConcurrencyMode::Tokens => ratio(tokens, max_tokens.saturating_mul(count)),
            ConcurrencyMode::Hybrid => hybrid / count as f64,
        }
    }
}

/// In flight over capacity; a zero capacity reads as saturated.
fn ratio(in_flight: i64, capacity: i64) -> f64 {
    if capacity == 0 { 1.0 } else { in_flight as f64 / capacity as f64 }
}

impl SaturationDetector for ConcurrencyDetector {
    fn is_saturated(&self, pool: &PoolSnapshot, now: Instant) -> bool {
        self.saturation(pool, now) >= 1.0
    }

    fn saturation(&self, pool: &PoolSnapshot, now: Instant) -> f64 {
        let endpoints = pool.endpoints();
        let Some(policy) = pool.staleness() else {
            return self.saturation_of(endpoints.iter());
        };
        let fresh = |state: &&EndpointState| policy.is_fresh(&state.metrics, now);
        if endpoints.iter().any(|state| fresh(&state)) {
            self.saturation_of(endpoints.iter().filter(fresh))
        } else if policy.fails_open() {
            self.saturation_of(endpoints.iter())
        } else {
            1.0
        }
    }
}

impl Filter for ConcurrencyDetector {
    fn filter(
        &self,
        _state: &mut CycleState,
        _request: &InferenceRequest,
        pool: &PoolSnapshot,
        candidates: &mut Vec<u32>,
    ) {
        candidates.retain(|&index| {
            pool.get(index).is_some_and(|state| self.admits(self.in_flight(state.id())))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::endpoint::{Endpoint, EndpointState};
    use crate::scheduling::result::Outcome;

    fn detector(json: &str, source: &Arc<LocalInFlight>) -> ConcurrencyDetector {
        let parameters: ConcurrencyParameters = serde_json::from_str(json).expect("parameters");
        ConcurrencyDetector::with_source(parameters, source.clone()).expect("valid")
    }

    fn pool(ports: &[u16]) -> (PoolSnapshot, Vec<EndpointId>) {
        let endpoints: Vec<Endpoint> =
            ports.iter().map(|&port| Endpoint::new(([10, 0, 0, 1], port).into())).collect();
        let ids = endpoints.iter().map(|endpoint| endpoint.id).collect();
        (PoolSnapshot::new(endpoints.into_iter().map(EndpointState::new)), ids)
    }

    #[test]
    fn request_mode_saturates_on_the_aggregate_share() {
        let (pool, ids) = pool(&[1, 2]);
        let now = Instant::now();
        let counts = Arc::new(LocalInFlight::default());
        let detector = detector(r#"{"maxConcurrency": 2}"#, &counts);
        assert_eq!(detector.saturation(&pool, now), 0.0);
        counts.begin(ids[0], 0);
        assert_eq!(detector.saturation(&pool, now), 0.25);
        counts.begin(ids[0], 0);
        counts.begin(ids[1], 0);
        assert_eq!(detector.saturation(&pool, now), 0.75);
        assert!(!detector.is_saturated(&pool, now));
        counts.begin(ids[1], 0);
        assert_eq!(detector.saturation(&pool, now), 1.0);
        assert!(detector.is_saturated(&pool, now));
        // Go's signal is the aggregate: one endpoint over its share saturates the pool even
        // though the other still has a free slot.
        counts.finish(ids[1], 0);
        counts.begin(ids[0], 0);
        assert_eq!(detector.saturation(&pool, now), 1.0);
        assert!(detector.is_saturated(&PoolSnapshot::default(), now), "an empty pool");
    }

    #[test]
    fn token_and_hybrid_modes() {
        let (pool, ids) = pool(&[1, 2]);
        let now = Instant::now();
        let counts = Arc::new(LocalInFlight::default());
        counts.begin(ids[0], 600);
        counts.begin(ids[1], 200);
        let tokens =
            detector(r#"{"concurrencyMode": "tokens", "maxTokenConcurrency": 1000}"#, &counts);
        assert_eq!(tokens.saturation(&pool, now), 0.4);
        // Hybrid: endpoint 0 max(1/4, 0.6) = 0.6, endpoint 1 max(1/4, 0.2) = 0.25.
        let hybrid = detector(
            r#"{"concurrencyMode": "hybrid", "maxConcurrency": 4, "maxTokenConcurrency": 1000}"#,
            &counts,
        );
        assert!((hybrid.saturation(&pool, now) - 0.425).abs() < 1e-12);
    }

    #[test]
    fn the_filter_allows_the_headroom_burst() {
        let (pool, ids) = pool(&[1, 2]);
        let counts = Arc::new(LocalInFlight::default());
        // ⌊10 × 1.25⌋ = 12 requests pass, the 13th does not.
        let burst = detector(r#"{"maxConcurrency": 10, "headroom": 0.25}"#, &counts);
        for _ in 0..12 {
            counts.begin(ids[0], 0);
        }
        let mut candidates = vec![0, 1];
        let request = InferenceRequest::new("m", "p");
        burst.filter(&mut CycleState::new(Instant::now(), 1), &request, &pool, &mut candidates);
        assert_eq!(candidates, [1], "12 in flight reach the limit of 12");
        counts.finish(ids[0], 0);
        let mut candidates = vec![0, 1];
        burst.filter(&mut CycleState::new(Instant::now(), 1), &request, &pool, &mut candidates);
        assert_eq!(candidates, [0, 1]);
        assert_eq!(
            burst.saturation(&pool, Instant::now()),
            11.0 / 20.0,
            "backpressure uses the ideal capacity, not the burst limit"
        );

        // Hybrid drops an endpoint at either limit.
        let hybrid =
            detector(r#"{"concurrencyMode": "hybrid", "maxTokenConcurrency": 100}"#, &counts);
        counts.begin(ids[1], 100);
        let mut candidates = vec![0, 1];
        hybrid.filter(&mut CycleState::new(Instant::now(), 1), &request, &pool, &mut candidates);
        assert_eq!(candidates, [0]);
    }

    #[test]
    fn parameters_are_checked_as_in_go() {
        let error = |json: &str| {
            let parameters: ConcurrencyParameters = serde_json::from_str(json).expect("parses");
            ConcurrencyDetector::new(parameters).expect_err("refused")
        };
        assert_eq!(
            error(r#"{"maxConcurrency": 0}"#),
            "maxConcurrency must be strictly positive, got 0"
        );
        assert_eq!(
            error(r#"{"headroom": -0.5, "maxTokenConcurrency": -1}"#),
            "headroom must be a non-negative value, got -0.5; maxTokenConcurrency must be strictly positive, got -1"
        );
        let unknown =
            serde_json::from_str::<ConcurrencyParameters>(r#"{"concurrencyMode": "bytes"}"#);
        assert!(unknown.expect_err("refused").to_string().contains("unknown variant `bytes`"));
        let defaults = ConcurrencyParameters::default();
        assert_eq!(
            (defaults.max_concurrency, defaults.max_token_concurrency, defaults.producer_name()),
            (100, 1_000_000, "inflight-load-producer")
        );
    }

    #[test]
    fn stale_endpoints_offer_no_capacity_while_one_is_fresh() {
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
        let counts = Arc::new(LocalInFlight::default());
        let detector = detector(r#"{"maxConcurrency": 1}"#, &counts);
        assert!(!detector.is_saturated(&pool, now));
        counts.begin(fresh.id, 0);
        assert!(detector.is_saturated(&pool, now), "the never-scraped endpoint is not routed to");

        // Nothing fresh: failing open, every endpoint's slots count; failing closed, none.
        let later = now + std::time::Duration::from_secs(3);
        assert_eq!(detector.saturation(&pool, later), 0.5);
        counts.begin(stale.id, 0);
        assert!(detector.is_saturated(&pool, later));
        counts.finish(stale.id, 0);
        let closed = pool.with_staleness(Some(policy.when_all_stale(AllStale::FailClosed)));
        assert!(detector.is_saturated(&closed, later));
    }

    #[test]
    fn local_counts_follow_the_hooks() {
        let (pool, ids) = pool(&[1]);
        let counts = LocalInFlight::default();
        counts.begin(ids[0], 7);
        counts.begin(ids[0], 3);
        let completed = |decision_id| CompletedRequest {
            request_id: String::new(),
            target_model: String::new(),
            scheduled_endpoint: ids[0],
            served_endpoint: None,
            prompt_tokens: None,
            completion_tokens: None,
            outcome: Outcome::Completed,
            fairness_id: None,
            decision_id,
        };
        counts
            .charges
            .lock()
            .insert(9, LocalCharge { request_id: String::new(), tokens: 3, prefill: None });
        counts.response_complete(&completed(9));
        assert_eq!(counts.in_flight(ids[0]), InFlight { requests: 1, tokens: 7 });
        counts.finish(ids[0], 7);
        counts.finish(ids[0], 7);
        assert_eq!(counts.in_flight(ids[0]), InFlight::default(), "never below zero");
        counts.finish(EndpointId(77), 1);
        assert_eq!(counts.in_flight(EndpointId(77)), InFlight::default());
        let unbound = ConcurrencyDetector::new(ConcurrencyParameters::default()).expect("valid");
        assert_eq!(unbound.saturation(&pool, Instant::now()), 0.0, "unbound reads idle");
    }
}
