//! The plugin traits. Each is small and does one thing; a plugin that plays several roles (a
//! scorer that also counts in-flight requests) implements several traits on one value.
//!
//! Dispatch is dynamic once per plugin per request, never per endpoint: scorers receive the
//! whole candidate slice and write one score per candidate into a caller-provided buffer, and
//! filters narrow a reusable index buffer in place.

use std::fmt::Debug;
use std::sync::Arc;

use crate::pool::PoolSnapshot;
use crate::pool::endpoint::EndpointState;
use crate::request::InferenceRequest;
use crate::scheduling::cycle::CycleState;
use crate::scheduling::result::{CompletedRequest, ProfileRun, SchedulingResult};

/// The endpoints still in the running for a request: a view into the pool snapshot.
#[derive(Clone, Copy, Debug)]
pub struct Candidates<'a> {
    pool: &'a PoolSnapshot,
    indices: &'a [u32],
}

impl<'a> Candidates<'a> {
    /// A view of the endpoints of `pool` at `indices`. Indices past the pool's end are skipped
    /// by [`Self::iter`] and make [`Self::get`] return `None`.
    pub fn new(pool: &'a PoolSnapshot, indices: &'a [u32]) -> Self {
        Self { pool, indices }
    }

    /// How many candidates there are.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// The candidate at `position`.
    pub fn get(&self, position: usize) -> Option<&'a EndpointState> {
        self.indices.get(position).and_then(|&index| self.pool.get(index))
    }

    /// The candidates, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &'a EndpointState> + 'a {
        let pool = self.pool;
        let endpoints = pool.endpoints();
        self.indices.iter().map(move |&index| &endpoints[index as usize])
    }

    /// Positions of the candidates in the pool snapshot.
    pub fn indices(&self) -> &'a [u32] {
        self.indices
    }

    /// The snapshot the candidates come from.
    pub fn pool(&self) -> &'a PoolSnapshot {
        self.pool
    }
}

/// Narrows the candidate endpoints of a request.
pub trait Filter: Send + Sync + Debug {
    /// Removes from `candidates` (positions in `pool`) the endpoints that must not serve
    /// `request`, keeping the order of the rest. Removing every candidate is allowed: the
    /// scheduler reports this filter as the one that left none.
    fn filter(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        pool: &PoolSnapshot,
        candidates: &mut Vec<u32>,
    );
}

/// Rates how well each candidate suits a request.
pub trait Scorer: Send + Sync + Debug {
    /// Writes into `scores[i]` a score in `[0, 1]` for `candidates.get(i)`; higher is better.
    /// `scores` has exactly `candidates.len()` entries, zeroed. The scheduler clamps values
    /// outside `[0, 1]` (and NaN to 0) so one faulty scorer cannot distort the others.
    fn score(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        candidates: Candidates<'_>,
        scores: &mut [f64],
    );
}

/// Chooses the endpoint(s) from the scored candidates.
pub trait Picker: Send + Sync + Debug {
    /// Pushes onto `picked` the positions (into `candidates`/`scores`) of the chosen
    /// candidates, best first, without repeats. `picked` is empty on entry; `candidates` is
    /// never empty. Pushing nothing means "none acceptable".
    fn pick(
        &self,
        state: &mut CycleState,
        candidates: Candidates<'_>,
        scores: &[f64],
        picked: &mut Vec<u32>,
    );
}

/// Decides which scheduling profiles run for a request, and which result is the primary one.
pub trait ProfileHandler: Send + Sync + Debug {
    /// Pushes onto `next` the indices of the profiles (into `profile_names`) to run next, given
    /// the profiles already run (in order) and their picks. Pushing nothing ends scheduling;
    /// a profile already run is not run again.
    fn next_profiles(
        &self,
        request: &InferenceRequest,
        profile_names: &[Arc<str>],
        already_run: &[ProfileRun],
        next: &mut Vec<usize>,
    );

    /// Which of the run profiles (by position in `already_run`) holds the primary endpoint.
    fn primary_profile(&self, request: &InferenceRequest, already_run: &[ProfileRun]) -> usize;

    /// The most profiles this handler can make use of; a config declaring more is refused.
    /// `None` (the default): any number.
    fn max_profiles(&self) -> Option<usize> {
        None
    }
}

/// Runs once per decision, before any profile: computes per-request data that the decision's
/// filters and scorers read back from the [`CycleState`] scratch (llm-d's data producers,
/// which run before scheduling), so that a filter can use what a scorer computes.
pub trait DataProducer: Send + Sync + Debug {
    /// Stores into `state` what this producer derives from `request` over `pool`.
    fn produce(&self, state: &mut CycleState, request: &InferenceRequest, pool: &PoolSnapshot);
}

/// Runs after a decision, before the request is forwarded: state that follows a pick
/// (prefix blocks now cached on the endpoint, one more request in flight).
pub trait PreRequest: Send + Sync + Debug {
    /// Called once per scheduled request with its result.
    fn pre_request(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        result: &SchedulingResult,
    );

    /// Waits until the work this hook deferred for the requests scheduled so far (work it
    /// hands to a background writer rather than doing before the decision is returned) has
    /// taken effect. The default defers nothing. See [`crate::Scheduler::flush`].
    fn flush(&self) {}

    /// How many pieces of deferred work this hook has dropped so far because its writer fell
    /// behind (a counter; the default defers nothing and drops nothing).
    fn dropped_deferred(&self) -> u64 {
        0
    }
}

/// Runs when a scheduled request ends, however it ends.
pub trait ResponseComplete: Send + Sync + Debug {
    /// Called exactly once per scheduled request.
    fn response_complete(&self, completed: &CompletedRequest);
}

/// Writes headers on the response of each request it helped schedule, as llm-d-router's
/// `ResponseHeader` hook does (the session-affinity token, for one). The adapter sets them
/// when the model server's response headers pass through.
pub trait ResponseHeaders: Send + Sync + Debug {
    /// Adds `(name, value)` pairs for the response to the request `result` scheduled. A
    /// name already in `headers` is left to whoever wrote it first.
    fn response_headers(&self, result: &SchedulingResult, headers: &mut Vec<(String, String)>);
}

/// Keeps per-endpoint state in step with the pool: told on the writer's side (discovery,
/// file reload) whenever a published snapshot holds a different set of endpoints, so that
/// state of endpoints that left can be dropped without any work on the request path.
pub trait PoolObserver: Send + Sync + Debug {
    /// Called after `pool` was published with a different set of endpoints than the snapshot
    /// before it. Runs on the publishing thread; keep it proportionate to the change.
    fn membership_changed(&self, pool: &PoolSnapshot);
}

/// The token counts a model server reported at the end of a response, as llm-d-router hands
/// them to its response-body hooks: every count present (zero when the response reported
/// none), the cached prompt tokens only when the server reported them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResponseUsage {
    /// Tokens of the prompt.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
    /// Prompt and generated tokens together, as the server counted them.
    pub total_tokens: u64,
    /// Prompt tokens served from the server's cache (`prompt_tokens_details.cached_tokens`).
    pub cached_tokens: Option<u64>,
}

/// One number a [`UsageReporter`] hands back to the proxy: a field of the response's dynamic
/// metadata, `name` under the top-level key `namespace`.
#[derive(Clone, Debug, PartialEq)]
pub struct ReportedAttribute {
    /// The top-level key of the dynamic metadata (`envoy.lb` by default).
    pub namespace: String,
    /// The field within that namespace.
    pub name: String,
    /// The value.
    pub value: f64,
}

/// Computes values from a finished response's token usage for the proxy, which receives them
/// as dynamic metadata on the response's last body message (llm-d-router's response-body
/// hook as `request-attribute-reporter` uses it: cost accounting, quotas).
pub trait UsageReporter: Send + Sync + Debug {
    /// Pushes onto `out` what this reporter derives from `usage`; nothing when it has nothing
    /// to report for this response.
    fn report(&self, usage: &ResponseUsage, out: &mut Vec<ReportedAttribute>);
}
