//! What a decision produces: the chosen endpoints, why none could be chosen, and the guard
//! that reports how the request ended. These types sit below the plugin traits (hooks receive
//! them), so they depend on the pool and endpoint types only.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::pool::PoolSnapshot;
use crate::pool::endpoint::{EndpointId, EndpointState};
use crate::scheduling::profile::ProfileExplanation;

/// Why no endpoint could be chosen. Each maps to one HTTP status in the adapters (503).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulingError {
    /// The pool has no endpoints at all.
    #[error("the pool has no endpoints")]
    EmptyPool,
    /// The proxy restricted the request to endpoints none of which is in the pool.
    #[error("none of the {requested} endpoints in the subset hint is in the pool")]
    EmptySubset {
        /// How many addresses the hint named.
        requested: usize,
    },
    /// A filter removed the last candidates.
    #[error("filter '{filter}' of profile '{profile}' removed the last candidate endpoints")]
    NoCandidates {
        /// The profile being run.
        profile: Arc<str>,
        /// The filter that left none.
        filter: Arc<str>,
    },
    /// The picker chose nothing.
    #[error("picker '{picker}' of profile '{profile}' chose no endpoint")]
    PickerChoseNone {
        /// The profile being run.
        profile: Arc<str>,
        /// The picker.
        picker: Arc<str>,
    },
    /// A screener removed every candidate before any profile ran.
    #[error("screener '{screener}' removed every candidate endpoint")]
    Screened {
        /// The screener's plugin name.
        screener: Arc<str>,
    },
    /// The profile handler chose no profile to run.
    #[error("the profile handler chose no profile for the request")]
    NoProfileRun,
    /// Every candidate's metrics are stale and the staleness policy fails closed.
    #[error(
        "the metrics of all {candidates} candidate endpoints are older than {threshold:?} (stale-metrics policy: fail closed)"
    )]
    AllStale {
        /// How many candidates there were.
        candidates: usize,
        /// The staleness threshold.
        threshold: std::time::Duration,
    },
}

/// The endpoints one profile chose, best first.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileRun {
    /// The profile's name.
    pub profile: Arc<str>,
    /// Chosen endpoints as positions in the snapshot, best first, no repeats.
    pub picks: Vec<u32>,
    /// The weighted total score of each pick, in the order of `picks`; empty when the picks
    /// were not scored (every candidate stale: ranked by last known load).
    pub scores: Vec<f64>,
}

/// How a scheduled request ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Outcome {
    /// The response was received in full.
    Completed,
    /// The upstream or the proxy failed the request.
    Failed,
    /// The request ended without completing: client gone, stream dropped, never forwarded.
    #[default]
    Cancelled,
}

/// What the completion hooks learn about a finished request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompletedRequest {
    /// The request id.
    pub request_id: String,
    /// The model the request targeted.
    pub target_model: String,
    /// The endpoint chosen for it.
    pub scheduled_endpoint: EndpointId,
    /// The endpoint that actually served it, when the proxy says (it may have fallen back).
    pub served_endpoint: Option<EndpointId>,
    /// Prompt tokens, when the response reported usage.
    pub prompt_tokens: Option<u64>,
    /// Completion tokens, when the response reported usage.
    pub completion_tokens: Option<u64>,
    /// How it ended.
    pub outcome: Outcome,
    /// The request's fairness id (its flow in flow control), when it had one.
    pub fairness_id: Option<String>,
    /// A number no other request scheduled in this process has ([`SchedulingResult::
    /// decision_id`]): what hooks key per-request state by, as a request id may be absent or
    /// repeated.
    pub decision_id: u64,
}

/// The source of [`CompletedRequest::decision_id`].
static NEXT_DECISION_ID: AtomicU64 = AtomicU64::new(1);

impl CompletedRequest {
    /// The endpoint that did the work: the served one when known, else the scheduled one.
    pub fn endpoint(&self) -> EndpointId {
        self.served_endpoint.unwrap_or(self.scheduled_endpoint)
    }
}

/// What the completion hooks learn when a disaggregated request's prefill stage is over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefillCompleted {
    /// The request id.
    pub request_id: String,
    /// The endpoint that ran the prefill.
    pub endpoint: EndpointId,
}

/// A scheduled request whose response started (the model server's response headers came).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseStarted {
    /// The request id.
    pub request_id: String,
    /// The endpoint the request was scheduled on.
    pub scheduled_endpoint: EndpointId,
    /// The request's [`CompletedRequest::decision_id`].
    pub decision_id: u64,
}

/// The part each profile run of a decision plays beyond the primary one, as the profile
/// handler says ([`ProfileHandler::stages`](crate::ProfileHandler::stages)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageRuns {
    /// The run (position among the runs) that chose the prefill endpoint of a disaggregated
    /// request; `None`: the primary endpoint prefills too.
    pub prefill: Option<usize>,
    /// The run that chose the encoders of a request's multimodal inputs.
    pub encode: Option<usize>,
    /// Data-parallel serving: the port the destination takes (the pod's primary port) in
    /// place of the picked rank's, which then travels in a header.
    pub data_parallel_port: Option<u16>,
}

/// A scheduler's completion hooks, as the guards of its requests call them.
pub(crate) struct CompletionHooks {
    /// When a request ends.
    pub(crate) request: Box<dyn Fn(&CompletedRequest) + Send + Sync>,
    /// When a disaggregated request's prefill stage is over.
    pub(crate) prefill: Box<dyn Fn(&PrefillCompleted) + Send + Sync>,
    /// When a request's response starts.
    pub(crate) started: Box<dyn Fn(&ResponseStarted) + Send + Sync>,
}

impl CompletionHooks {
    /// Hooks that do nothing.
    pub(crate) fn none() -> Arc<Self> {
        Arc::new(Self {
            request: Box::new(|_| {}),
            prefill: Box::new(|_| {}),
            started: Box::new(|_| {}),
        })
    }
}

/// The outcome of a decision: the chosen endpoints and what the adapter needs to finish the
/// request's accounting.
#[derive(Debug)]
pub struct SchedulingResult {
    pool: Arc<PoolSnapshot>,
    runs: Vec<ProfileRun>,
    primary: usize,
    explanation: Option<Vec<ProfileExplanation>>,
    completion: Option<CompletionGuard>,
    stages: StageRuns,
    /// Headers plugins set on the request sent upstream.
    upstream_headers: Vec<(&'static str, String)>,
}

impl SchedulingResult {
    /// A result whose primary endpoint is the first pick of `runs[primary]` (clamped to the
    /// last run); `runs` is not empty and each run has at least one pick.
    pub(crate) fn new(
        pool: Arc<PoolSnapshot>,
        runs: Vec<ProfileRun>,
        primary: usize,
        explanation: Option<Vec<ProfileExplanation>>,
        completion: CompletionGuard,
        stages: StageRuns,
    ) -> Self {
        let primary = primary.min(runs.len().saturating_sub(1));
        let valid = |run: Option<usize>| run.filter(|&at| at < runs.len() && at != primary);
        let stages = StageRuns {
            prefill: valid(stages.prefill),
            encode: valid(stages.encode),
            data_parallel_port: stages.data_parallel_port,
        };
        Self {
            pool,
            runs,
            primary,
            explanation,
            completion: Some(completion),
            stages,
            upstream_headers: Vec::new(),
        }
    }

    /// Headers the plugins set on the request sent upstream (see
    /// [`UpstreamHeaders`](crate::UpstreamHeaders)).
    pub fn upstream_headers(&self) -> &[(&'static str, String)] {
        &self.upstream_headers
    }

    pub(crate) fn set_upstream_headers(&mut self, headers: Vec<(&'static str, String)>) {
        self.upstream_headers = headers;
    }

    /// The endpoint that runs the prefill of a disaggregated request (the decode endpoint,
    /// [`Self::primary`], receives the request and fetches the KV cache from it); `None` when
    /// the primary serves the request whole.
    pub fn prefill(&self) -> Option<&EndpointState> {
        let run = &self.runs[self.stages.prefill?];
        run.picks.first().map(|&index| &self.pool.endpoints()[index as usize])
    }

    /// The endpoints that encode the request's multimodal inputs, best first (empty when the
    /// request is not encoded apart).
    pub fn encoders(&self) -> impl Iterator<Item = &EndpointState> {
        let picks = self.stages.encode.map_or(&[][..], |run| &self.runs[run].picks[..]);
        picks.iter().map(|&index| &self.pool.endpoints()[index as usize])
    }

    /// The pod port the destination takes under data-parallel serving (the picked rank's
    /// own address then travels in a header); `None` otherwise.
    pub fn data_parallel_port(&self) -> Option<u16> {
        self.stages.data_parallel_port
    }

    /// The endpoint to send the request to.
    pub fn primary(&self) -> &EndpointState {
        &self.pool.endpoints()[self.runs[self.primary].picks[0] as usize]
    }

    /// The primary profile's endpoints after the first, best first.
    pub fn fallbacks(&self) -> impl Iterator<Item = &EndpointState> {
        self.ranked().skip(1)
    }

    /// The primary profile's endpoints, best first.
    pub fn ranked(&self) -> impl Iterator<Item = &EndpointState> {
        self.runs[self.primary].picks.iter().map(|&index| &self.pool.endpoints()[index as usize])
    }

    /// The weighted total scores of [`Self::ranked`]'s endpoints, in the same order; empty
    /// when they were not scored.
    pub fn ranked_scores(&self) -> &[f64] {
        &self.runs[self.primary].scores
    }

    /// The profile that chose the primary endpoint.
    pub fn primary_profile(&self) -> &str {
        &self.runs[self.primary].profile
    }

    /// The part each run plays beyond the primary one (which run chose the prefill endpoint,
    /// which the encoders).
    pub fn stages(&self) -> StageRuns {
        self.stages
    }

    /// The request's [`CompletedRequest::decision_id`], while the completion guard has not
    /// been taken (pre-request hooks see it).
    pub fn decision_id(&self) -> Option<u64> {
        self.completion
            .as_ref()
            .and_then(CompletionGuard::request)
            .map(|request| request.decision_id)
    }

    /// Every profile that ran, in order.
    pub fn profile_runs(&self) -> &[ProfileRun] {
        &self.runs
    }

    /// The snapshot the decision was taken on.
    pub fn pool(&self) -> &Arc<PoolSnapshot> {
        &self.pool
    }

    /// Per-scorer scores, when requested with
    /// [`ScheduleOptions::explain`](crate::ScheduleOptions::explain).
    pub fn explanation(&self) -> Option<&[ProfileExplanation]> {
        self.explanation.as_deref()
    }

    /// The guard that runs the completion hooks, while it has not been taken.
    pub(crate) fn completion_mut(&mut self) -> Option<&mut CompletionGuard> {
        self.completion.as_mut()
    }

    /// Takes the guard that runs the completion hooks. Keep it for as long as the response
    /// lasts; if it is never taken, the hooks run (as cancelled) when the result is dropped.
    pub fn take_completion(&mut self) -> Option<CompletionGuard> {
        self.completion.take()
    }
}

/// Runs the scheduler's completion hooks exactly once: on [`CompletionGuard::finish`], or as
/// [`Outcome::Cancelled`] when dropped unfinished (client gone, stream reset, error path).
pub struct CompletionGuard {
    hooks: Arc<CompletionHooks>,
    completed: Option<CompletedRequest>,
    /// The prefill endpoint of a disaggregated request, until its stage is reported over.
    prefill: Option<EndpointId>,
    /// Whether the response start was reported.
    started: bool,
}

impl std::fmt::Debug for CompletionGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionGuard")
            .field("completed", &self.completed)
            .field("prefill", &self.prefill)
            .finish_non_exhaustive()
    }
}

impl CompletionGuard {
    /// A guard for a request scheduled onto `scheduled_endpoint`.
    pub(crate) fn new(
        hooks: Arc<CompletionHooks>,
        request_id: String,
        target_model: String,
        scheduled_endpoint: EndpointId,
    ) -> Self {
        Self {
            hooks,
            completed: Some(CompletedRequest {
                request_id,
                target_model,
                scheduled_endpoint,
                served_endpoint: None,
                prompt_tokens: None,
                completion_tokens: None,
                outcome: Outcome::Cancelled,
                fairness_id: None,
                decision_id: NEXT_DECISION_ID.fetch_add(1, Ordering::Relaxed),
            }),
            prefill: None,
            started: false,
        }
    }

    /// Records the prefill endpoint of a disaggregated request, whose stage ends with
    /// [`Self::prefill_done`] (or with the request).
    pub(crate) fn set_prefill(&mut self, endpoint: Option<EndpointId>) {
        self.prefill = endpoint;
    }

    /// The prefill endpoint whose stage is not reported over yet.
    pub fn pending_prefill(&self) -> Option<EndpointId> {
        self.prefill
    }

    /// Reports the prefill stage over (the response started): runs the hooks'
    /// [`prefill_complete`](crate::ResponseComplete::prefill_complete) once; later calls, and
    /// requests that were not disaggregated, do nothing.
    pub fn prefill_done(&mut self) {
        if let (Some(endpoint), Some(completed)) = (self.prefill.take(), self.completed.as_ref()) {
            let prefill = PrefillCompleted { request_id: completed.request_id.clone(), endpoint };
            (self.hooks.prefill)(&prefill);
        }
    }

    /// Reports the response started (its headers came from the model server): runs the
    /// hooks' [`response_started`](crate::ResponseComplete::response_started) once, then ends
    /// a disaggregated request's prefill stage ([`Self::prefill_done`]). Later calls do
    /// nothing; a request that ends without a response never reports a start.
    pub fn response_started(&mut self) {
        if !self.started
            && let Some(completed) = self.completed.as_ref()
        {
            self.started = true;
            let started = ResponseStarted {
                request_id: completed.request_id.clone(),
                scheduled_endpoint: completed.scheduled_endpoint,
                decision_id: completed.decision_id,
            };
            (self.hooks.started)(&started);
        }
        self.prefill_done();
    }

    /// Records the request's fairness id, for hooks that account per flow.
    pub(crate) fn set_fairness_id(&mut self, fairness_id: Option<String>) {
        if let Some(completed) = self.completed.as_mut() {
            completed.fairness_id = fairness_id;
        }
    }

    /// Records the endpoint that actually served the request (the proxy may have used a fallback).
    pub fn set_served_endpoint(&mut self, endpoint: EndpointId) {
        if let Some(completed) = self.completed.as_mut() {
            completed.served_endpoint = Some(endpoint);
        }
    }

    /// Records token usage read from the response.
    pub fn set_usage(&mut self, prompt_tokens: u64, completion_tokens: u64) {
        if let Some(completed) = self.completed.as_mut() {
            completed.prompt_tokens = Some(prompt_tokens);
            completed.completion_tokens = Some(completion_tokens);
        }
    }

    /// The request as the hooks will see it.
    pub fn request(&self) -> Option<&CompletedRequest> {
        self.completed.as_ref()
    }

    /// Ends the request with `outcome` and runs the hooks.
    pub fn finish(mut self, outcome: Outcome) {
        self.run(outcome);
    }

    fn run(&mut self, outcome: Outcome) {
        // A request that ends before its response started ends its prefill stage too.
        self.prefill_done();
        if let Some(mut completed) = self.completed.take() {
            completed.outcome = outcome;
            (self.hooks.request)(&completed);
        }
    }
}

impl Drop for CompletionGuard {
    fn drop(&mut self) {
        self.run(Outcome::Cancelled);
    }
}
