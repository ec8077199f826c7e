//! `inflight-load-producer`: the requests and prompt tokens this picker has in flight on each
//! endpoint, for the plugins that read them.
//!
//! Matches llm-d-router's `dataproducer/inflightload`. After each decision the pre-request
//! hook charges, for every profile run, its first pick with one request and the request's
//! tokens: its prompt's tokens ([`InferenceRequest::estimated_prompt_tokens`]), plus, with
//! `addEstimatedOutputTokens`, an estimate of its output, `round(prompt tokens *
//! outputRatio)` (default ratio 1.5) capped at `maxEstimatedOutputTokens` when set. The
//! charges are released as in Go:
//! - when the response starts: the prefill run's charge (a run of the profile that prefills a
//!   disaggregated request) whole; without `addEstimatedOutputTokens`, also the tokens (not
//!   the request) of every other run, whose prefill is over;
//! - when the request ends, however it ends: whatever is left.
//!
//! Counters never go below zero. A request's charges are kept by its decision (not its
//! request id, which may be absent or repeated; Go makes one up when it is absent). Counters
//! of endpoints that leave the pool are dropped.
//!
//! Readers: `utilization-filter` (`active-requests`), `token-load-scorer` and
//! `concurrency-detector`. A reader names the producer with `inFlightLoadProducerName`; when
//! it names none and the config declares no plugin named `inflight-load-producer`, the config
//! creates one with default parameters under that name, as the Go loader creates a missing
//! default producer.
//!
//! Differences from Go: prompt tokens are estimated from the prompt's length (no tokenizer on
//! the decision path), the prefix-cache discount (only the uncached part of the prompt is
//! charged when a prefix producer's match is known) is not applied (Go's behaviour when no
//! match information is available), and the output estimate is not capped by the request's
//! own `max_tokens`, which the request parser does not keep. `prefixMatchInfoProducerName`
//! is accepted and has no effect.
//!
//! Cross-replica state: with a cross-replica syncer configured, [`InFlightLoad::requests`] and
//! [`InFlightLoad::tokens`] add the other replicas' counts ([`PeerInFlight`]) to this
//! replica's own, as Go's aggregate does; `syncCrossReplicaState: false` opts the producer
//! out (its own counts are then neither published nor summed with the peers').

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use parking_lot::{Mutex, RwLock};
use scheduler_core::{
    CompletedRequest, CycleState, EndpointId, EndpointMap, InferenceRequest, PluginError,
    PoolObserver, PoolSnapshot, PreRequest, ResponseComplete, ResponseStarted, SchedulingResult,
};
use serde::Deserialize;

use crate::peer_load::{InFlightCounts, PeerInFlight, SharedInFlight};

/// llm-d type name (also the name of a default instance).
pub const TYPE_NAME: &str = "inflight-load-producer";
/// Output tokens estimated per prompt token when `outputRatio` is unset.
pub const DEFAULT_OUTPUT_RATIO: f64 = 1.5;

/// Parameters of [`InFlightLoad`].
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct InFlightLoadParameters {
    /// Charge an estimate of each request's output tokens too.
    pub add_estimated_output_tokens: bool,
    /// Output tokens per prompt token (default 1.5; not negative).
    pub output_ratio: Option<f64>,
    /// The largest output estimate charged per request (not negative; unset: no cap).
    pub max_estimated_output_tokens: Option<i64>,
    /// Go's prefix producer for the uncached-token discount (accepted, no effect here).
    pub prefix_match_info_producer_name: String,
    /// Go's cross-replica sharing of the counters (default `true`; only has an effect when
    /// a cross-replica syncer is configured).
    pub sync_cross_replica_state: Option<bool>,
}

/// One endpoint's counters.
#[derive(Debug, Default)]
struct Counters {
    requests: AtomicI64,
    tokens: AtomicI64,
}

/// What one profile run of a request added to an endpoint, until released.
#[derive(Debug)]
struct Charge {
    counters: Arc<Counters>,
    /// Whether this run prefills a disaggregated request.
    prefill: bool,
    requests: i64,
    tokens: i64,
}

impl Charge {
    fn release_tokens(&mut self) {
        decrement(&self.counters.tokens, std::mem::take(&mut self.tokens));
    }

    fn release(&mut self) {
        self.release_tokens();
        decrement(&self.counters.requests, std::mem::take(&mut self.requests));
    }
}

fn clamp(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// Subtracts `amount`, stopping at zero (a release without its charge never goes negative).
fn decrement(counter: &AtomicI64, amount: i64) {
    if amount != 0 {
        let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |current| {
            (current > 0).then(|| (current - amount).max(0))
        });
    }
}

/// The in-flight requests and tokens per endpoint, kept by the request lifecycle hooks.
#[derive(Debug)]
pub struct InFlightLoad {
    counters: RwLock<EndpointMap<Arc<Counters>>>,
    /// The charges of each request in flight, by decision id.
    charges: Mutex<HashMap<u64, Vec<Charge>>>,
    add_estimated_output_tokens: bool,
    output_ratio: f64,
    max_estimated_output_tokens: Option<i64>,
    /// Other replicas' counts, added to this replica's own.
    peers: PeerInFlight,
    /// `syncCrossReplicaState`.
    sync_cross_replica_state: bool,
}

impl InFlightLoad {
    /// A producer for `parameters`; refuses a negative (or non-finite) ratio or cap.
    pub fn new(parameters: &InFlightLoadParameters) -> Result<Self, PluginError> {
        let output_ratio = parameters.output_ratio.unwrap_or(DEFAULT_OUTPUT_RATIO);
        if !output_ratio.is_finite() || output_ratio < 0.0 {
            return Err(PluginError::InvalidParameters(format!(
                "outputRatio must be non-negative, got {output_ratio}"
            )));
        }
        if let Some(cap) = parameters.max_estimated_output_tokens
            && cap < 0
        {
            return Err(PluginError::InvalidParameters(format!(
                "maxEstimatedOutputTokens must be non-negative, got {cap}"
            )));
        }
        Ok(Self {
            counters: RwLock::default(),
            charges: Mutex::default(),
            add_estimated_output_tokens: parameters.add_estimated_output_tokens,
            output_ratio,
            max_estimated_output_tokens: parameters.max_estimated_output_tokens,
            peers: PeerInFlight::default(),
            sync_cross_replica_state: parameters.sync_cross_replica_state.unwrap_or(true),
        })
    }

    /// Requests in flight on `endpoint`: this replica's and, with a cross-replica syncer, its
    /// peers'.
    pub fn requests(&self, endpoint: EndpointId) -> i64 {
        let own =
            self.counters.read().get(&endpoint).map_or(0, |c| c.requests.load(Ordering::Relaxed));
        if self.sync_cross_replica_state {
            own.saturating_add(clamp(self.peers.get(endpoint).requests))
        } else {
            own
        }
    }

    /// Tokens in flight on `endpoint`: this replica's and, with a cross-replica syncer, its
    /// peers'.
    pub fn tokens(&self, endpoint: EndpointId) -> i64 {
        let own =
            self.counters.read().get(&endpoint).map_or(0, |c| c.tokens.load(Ordering::Relaxed));
        if self.sync_cross_replica_state {
            own.saturating_add(clamp(self.peers.get(endpoint).tokens))
        } else {
            own
        }
    }

    /// Whether the counts take part in cross-replica sync (`syncCrossReplicaState`).
    pub fn syncs_cross_replica_state(&self) -> bool {
        self.sync_cross_replica_state
    }

    /// The output tokens estimated for a prompt of `input` tokens.
    pub fn estimated_output(&self, input: i64) -> i64 {
        if input <= 0 {
            return 0;
        }
        let estimate = (input as f64 * self.output_ratio).round() as i64;
        self.max_estimated_output_tokens.map_or(estimate, |cap| estimate.min(cap))
    }

    /// The tokens one run of `request` charges.
    pub fn request_tokens(&self, request: &InferenceRequest) -> i64 {
        let input = i64::try_from(request.estimated_prompt_tokens()).unwrap_or(i64::MAX);
        if self.add_estimated_output_tokens {
            input.saturating_add(self.estimated_output(input))
        } else {
            input
        }
    }

    fn counters_of(&self, endpoint: EndpointId) -> Arc<Counters> {
        if let Some(counters) = self.counters.read().get(&endpoint) {
            return Arc::clone(counters);
        }
        Arc::clone(self.counters.write().entry(endpoint).or_default())
    }
}

impl PreRequest for InFlightLoad {
    fn pre_request(
        &self,
        _state: &mut CycleState,
        request: &InferenceRequest,
        result: &SchedulingResult,
    ) {
        let Some(decision) = result.decision_id() else { return };
        let tokens = self.request_tokens(request);
        let prefill_run = result.stages().prefill;
        let mut charges = Vec::with_capacity(result.profile_runs().len());
        for (position, run) in result.profile_runs().iter().enumerate() {
            let Some(state) = run.picks.first().and_then(|&at| result.pool().get(at)) else {
                continue;
            };
            let counters = self.counters_of(state.id());
            counters.requests.fetch_add(1, Ordering::Relaxed);
            counters.tokens.fetch_add(tokens, Ordering::Relaxed);
            charges.push(Charge {
                counters,
                prefill: prefill_run == Some(position),
                requests: 1,
                tokens,
            });
        }
        self.charges.lock().insert(decision, charges);
    }
}

impl SharedInFlight for InFlightLoad {
    fn local_in_flight(&self, out: &mut Vec<(EndpointId, InFlightCounts)>) {
        if !self.sync_cross_replica_state {
            return;
        }
        for (&endpoint, counters) in self.counters.read().iter() {
            let requests = u64::try_from(counters.requests.load(Ordering::Relaxed)).unwrap_or(0);
            let tokens = u64::try_from(counters.tokens.load(Ordering::Relaxed)).unwrap_or(0);
            if requests > 0 || tokens > 0 {
                out.push((endpoint, InFlightCounts { requests, tokens }));
            }
        }
    }

    fn peers(&self) -> &PeerInFlight {
        &self.peers
    }
}

impl ResponseComplete for InFlightLoad {
    fn response_started(&self, started: &ResponseStarted) {
        let mut charges = self.charges.lock();
        let Some(request) = charges.get_mut(&started.decision_id) else { return };
        for charge in request.iter_mut() {
            if charge.prefill {
                charge.release();
            } else if !self.add_estimated_output_tokens {
                charge.release_tokens();
            }
        }
    }

    fn response_complete(&self, completed: &CompletedRequest) {
        let released = self.charges.lock().remove(&completed.decision_id);
        for mut charge in released.into_iter().flatten() {
            charge.release();
        }
    }
}

impl PoolObserver for InFlightLoad {
    fn membership_changed(&self, pool: &PoolSnapshot) {
        let present: std::collections::HashSet<EndpointId> =
            pool.endpoints().iter().map(|state| state.id()).collect();
        self.counters.write().retain(|endpoint, _| present.contains(endpoint));
    }
}

/// The producer named `name` among `plugins`, for a reader's `inFlightLoadProducerName`.
pub fn named(
    plugins: &scheduler_core::ConstructedPlugins,
    name: &str,
) -> Result<Arc<InFlightLoad>, PluginError> {
    plugins
        .get(name)
        .and_then(|declared| declared.plugin.shared.clone())
        .and_then(|shared| shared.downcast::<InFlightLoad>().ok())
        .ok_or_else(|| {
            PluginError::InvalidParameters(format!(
                "inFlightLoadProducerName: no {TYPE_NAME} named '{name}' is declared"
            ))
        })
}
