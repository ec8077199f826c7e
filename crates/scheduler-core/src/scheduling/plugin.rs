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
use crate::scheduling::result::{
    CompletedRequest, PrefillCompleted, ProfileRun, ResponseStarted, SchedulingResult, StageRuns,
};

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

/// Narrows the candidates once per request, before any profile runs, so every profile of
/// the request sees the same set (llm-d-router's request-control screeners). Unlike a filter
/// it cannot be undone or bypassed by one profile's choices.
pub trait Screener: Send + Sync + Debug {
    /// Removes from `candidates` (positions in `pool`) the endpoints no profile may use for
    /// `request`, keeping the order of the rest. Removing every candidate fails the request.
    fn screen(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        pool: &PoolSnapshot,
        candidates: &mut Vec<u32>,
    );
}

/// Adds headers to the request on its way to the chosen endpoint, after the pre-request hooks
/// ran (llm-d-router's pre-request plugins that set request headers). Names come from
/// [`ROUTING_REQUEST_HEADERS`](crate::protocol::ROUTING_REQUEST_HEADERS), so that a client's
/// value of a name the decision leaves unset is removed rather than passed on.
pub trait UpstreamHeaders: Send + Sync + Debug {
    /// Appends `(name, value)` pairs for the request `result` scheduled. `state` is the
    /// decision's own, holding what its producers left.
    fn upstream_headers(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        result: &SchedulingResult,
        headers: &mut Vec<(&'static str, String)>,
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

/// What a profile handler knows of a decision so far: the snapshot it is taken on and the
/// profiles run, those that picked and those that could not.
#[derive(Clone, Copy, Debug)]
pub struct ProfileProgress<'a> {
    /// The snapshot the decision is taken on (the picks are positions in it).
    pub pool: &'a PoolSnapshot,
    /// The profiles that picked, in the order they ran.
    pub runs: &'a [ProfileRun],
    /// The profiles that ran and picked nothing (a filter left no candidate), in order.
    pub failed: &'a [Arc<str>],
}

impl<'a> ProfileProgress<'a> {
    /// The run of the profile named `profile`, if it ran and picked.
    pub fn run(&self, profile: &str) -> Option<&'a ProfileRun> {
        self.runs.iter().find(|run| &*run.profile == profile)
    }

    /// Whether the profile named `profile` ran, whatever came of it.
    pub fn attempted(&self, profile: &str) -> bool {
        self.run(profile).is_some() || self.failed.iter().any(|name| &**name == profile)
    }

    /// The endpoint the profile named `profile` picked first, if it ran and picked.
    pub fn first_pick(&self, profile: &str) -> Option<&'a EndpointState> {
        self.run(profile).and_then(|run| run.picks.first()).and_then(|&at| self.pool.get(at))
    }
}

/// Decides which scheduling profiles run for a request, and which result is the primary one.
///
/// The scheduler runs the profiles the handler names, one round at a time, until it names
/// none. A profile that picks nothing does not end the decision: the handler sees it in
/// [`ProfileProgress::failed`] and decides (a disaggregating handler serves decode-only when
/// no prefill endpoint is left); the decision fails only when the primary profile has no run.
pub trait ProfileHandler: Send + Sync + Debug {
    /// Pushes onto `next` the indices of the profiles (into `profile_names`) to run next, given
    /// what ran so far. Pushing nothing ends scheduling; a profile already run is not run
    /// again. `state` is the decision's scratch, where the data producers left what they
    /// computed (a decider reads the prefix matches there).
    fn next_profiles(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        profile_names: &[Arc<str>],
        progress: &ProfileProgress<'_>,
        next: &mut Vec<usize>,
    );

    /// Which of the runs (by position in `runs`) holds the primary endpoint; `None` when the
    /// profile that would hold it has no run, which fails the decision.
    fn primary_profile(&self, request: &InferenceRequest, runs: &[ProfileRun]) -> Option<usize>;

    /// The most profiles this handler can make use of; a config declaring more is refused.
    /// `None` (the default): any number.
    fn max_profiles(&self) -> Option<usize> {
        None
    }

    /// Checks the handler's configuration against the profiles the config declares (a
    /// profile it names must exist), so a mistake is refused at load rather than failing
    /// every request. The default accepts any profiles.
    fn check_profiles(&self, _profile_names: &[Arc<str>]) -> Result<(), String> {
        Ok(())
    }

    /// The part each run plays beyond the primary one (the prefill and encode stages of a
    /// disaggregated request), and how the destination is to be written. The default: the
    /// primary alone, as picked.
    fn stages(&self, _runs: &[ProfileRun]) -> StageRuns {
        StageRuns::default()
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

    /// Called once per disaggregated request when its prefill stage is over: when the
    /// response starts (the decode endpoint emits only after the prefill endpoint handed over
    /// the KV cache), or when the request ends first. Hooks that count the prefill endpoint's
    /// work in flight release it here; the default counts none.
    fn prefill_complete(&self, _prefill: &PrefillCompleted) {}

    /// Called at most once per scheduled request, when its response starts (before
    /// [`Self::prefill_complete`]); hooks that release work done by then (a prompt's prefill)
    /// release it here. A request that ends before its response starts never calls it. The
    /// default does nothing.
    fn response_started(&self, _started: &ResponseStarted) {}
}

/// Writes headers on the response of each request it helped schedule, as llm-d-router's
/// `ResponseHeader` hook does (the session-affinity token, for one). The adapter sets them
/// when the model server's response headers pass through.
pub trait ResponseHeaders: Send + Sync + Debug {
    /// Adds `(name, value)` pairs for the response to the request `result` scheduled. A
    /// name already in `headers` is left to whoever wrote it first.
    fn response_headers(&self, result: &SchedulingResult, headers: &mut Vec<(String, String)>);

    /// Adds pairs once the model server's response headers came, from what the proxy
    /// reported about where it sent the request. Only adapters that hear from a proxy call
    /// it (ext-proc). The default adds none.
    fn served_headers(&self, _served: ServedReport<'_>, _headers: &mut Vec<(String, String)>) {}
}

/// What the proxy reported, with the response's headers, about the endpoint that served a
/// request: the `x-gateway-destination-endpoint-served` field of its `envoy.lb` metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServedReport<'a> {
    /// The response carried no `envoy.lb` metadata.
    NoLbMetadata,
    /// The `envoy.lb` metadata named no served endpoint (or not as text).
    NoServedEndpoint,
    /// The served endpoint, as the proxy wrote it.
    Served(&'a str),
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
