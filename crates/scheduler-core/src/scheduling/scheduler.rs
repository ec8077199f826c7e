//! The scheduler: runs the profiles a request needs and returns the chosen endpoints.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rand::RngCore;

use crate::hash::split_mix;
use crate::pool::endpoint::{EndpointId, EndpointState};
use crate::pool::staleness::{StalenessPolicy, last_known_load};
use crate::pool::{PoolSnapshot, SharedPool};
use crate::request::InferenceRequest;
use crate::scheduling::cycle::{CycleState, ProfileBuffers, Scratch};
use crate::scheduling::plugin::{
    DataProducer, PoolObserver, PreRequest, ProfileHandler, ProfileProgress, ReportedAttribute,
    ResponseComplete, ResponseHeaders, ResponseUsage, Screener, ServedReport, UpstreamHeaders,
    UsageReporter,
};
use crate::scheduling::profile::{ProfileExplanation, SchedulerProfile};
use crate::scheduling::result::{
    CompletedRequest, CompletionGuard, CompletionHooks, PrefillCompleted, ProfileRun,
    ResponseStarted, SchedulingError, SchedulingResult,
};

/// Endpoints a fail-open decision over all-stale candidates returns: the primary and up to
/// three fallbacks, least loaded first (the adapter decides how many it emits).
pub const ALL_STALE_MAX_PICKS: usize = 4;

/// Options of one scheduling call; the defaults suit serving.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScheduleOptions {
    /// The decision time; defaults to now.
    pub now: Option<Instant>,
    /// The seed of the decision's randomness; defaults to one drawn from the scheduler's
    /// seeded sequence.
    pub seed: Option<u64>,
    /// Record every scorer's scores in the result (costs allocations; for debugging).
    pub explain: bool,
}

/// Runs profiles over pool snapshots. Cheap to share: put it in an `Arc`.
pub struct Scheduler {
    profiles: Vec<SchedulerProfile>,
    profile_names: Vec<Arc<str>>,
    handler: Arc<dyn ProfileHandler>,
    /// The handler's plugin name and type, as the config declared it.
    handler_plugin: (Arc<str>, Arc<str>),
    data_producers: Vec<Arc<dyn DataProducer>>,
    /// Screeners with their plugin names, in declaration order.
    screeners: Vec<(Arc<str>, Arc<dyn Screener>)>,
    pre_request: Vec<Arc<dyn PreRequest>>,
    response_complete: Vec<Arc<dyn ResponseComplete>>,
    /// The completion hooks as one callable, shared by every guard this scheduler hands out.
    completion_hooks: Arc<CompletionHooks>,
    pool_observers: Vec<Arc<dyn PoolObserver>>,
    response_headers: Vec<Arc<dyn ResponseHeaders>>,
    upstream_headers: Vec<Arc<dyn UpstreamHeaders>>,
    usage_reporters: Vec<Arc<dyn UsageReporter>>,
    seed: u64,
    decisions: AtomicU64,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("profiles", &self.profiles)
            .field("handler", &self.handler)
            .field("data_producers", &self.data_producers)
            .field("screeners", &self.screeners)
            .field("pre_request", &self.pre_request)
            .field("response_complete", &self.response_complete)
            .field("pool_observers", &self.pool_observers)
            .field("response_headers", &self.response_headers)
            .field("upstream_headers", &self.upstream_headers)
            .field("usage_reporters", &self.usage_reporters)
            .finish_non_exhaustive()
    }
}

thread_local! {
    /// The scratch of the last decision on this thread, handed to the next one.
    static SCRATCH: RefCell<Option<Scratch>> = const { RefCell::new(None) };
}

impl Scheduler {
    /// A scheduler over `profiles`, with `handler` choosing which run.
    pub fn new(profiles: Vec<SchedulerProfile>, handler: Arc<dyn ProfileHandler>) -> Self {
        let profile_names = profiles.iter().map(|profile| profile.name().clone()).collect();
        Self {
            profiles,
            profile_names,
            handler,
            handler_plugin: (SINGLE_PROFILE_HANDLER.into(), SINGLE_PROFILE_HANDLER.into()),
            data_producers: Vec::new(),
            screeners: Vec::new(),
            pre_request: Vec::new(),
            response_complete: Vec::new(),
            completion_hooks: CompletionHooks::none(),
            pool_observers: Vec::new(),
            response_headers: Vec::new(),
            upstream_headers: Vec::new(),
            usage_reporters: Vec::new(),
            seed: process_random_seed(),
            decisions: AtomicU64::new(0),
        }
    }

    /// Names the profile handler's plugin: its name and type as a config declares them
    /// (`single-profile-handler` for both until set). Metrics of the handler's decisions are
    /// labelled with them.
    pub fn with_handler_plugin(mut self, name: &str, type_name: &str) -> Self {
        self.handler_plugin = (name.into(), type_name.into());
        self
    }

    /// The profile handler's plugin name and type (see [`Self::with_handler_plugin`]).
    pub fn handler_plugin(&self) -> (&str, &str) {
        (&self.handler_plugin.0, &self.handler_plugin.1)
    }

    /// Makes every decision's randomness derive from `seed` (tests, simulations).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self.decisions = AtomicU64::new(0);
        self
    }

    /// Adds a screener named `name`, run on the candidates of every decision before the
    /// profiles (after the request's subset hint, before the staleness policy).
    pub fn with_screener(mut self, name: &str, screener: Arc<dyn Screener>) -> Self {
        self.screeners.push((name.into(), screener));
        self
    }

    /// Adds a producer that runs at the start of each decision, before the profiles.
    pub fn with_data_producer(mut self, producer: Arc<dyn DataProducer>) -> Self {
        self.data_producers.push(producer);
        self
    }

    /// Adds a hook that runs after each decision.
    pub fn with_pre_request(mut self, hook: Arc<dyn PreRequest>) -> Self {
        self.pre_request.push(hook);
        self
    }

    /// Adds a hook that runs when each scheduled request ends.
    pub fn with_response_complete(mut self, hook: Arc<dyn ResponseComplete>) -> Self {
        self.response_complete.push(hook);
        let hooks: Arc<[Arc<dyn ResponseComplete>]> = Arc::from(self.response_complete.clone());
        let prefill_hooks = Arc::clone(&hooks);
        let started_hooks = Arc::clone(&hooks);
        self.completion_hooks = Arc::new(CompletionHooks {
            request: Box::new(move |completed: &CompletedRequest| {
                for hook in hooks.iter() {
                    hook.response_complete(completed);
                }
            }),
            prefill: Box::new(move |prefill: &PrefillCompleted| {
                for hook in prefill_hooks.iter() {
                    hook.prefill_complete(prefill);
                }
            }),
            started: Box::new(move |started: &ResponseStarted| {
                for hook in started_hooks.iter() {
                    hook.response_started(started);
                }
            }),
        });
        self
    }

    /// Adds a plugin that keeps per-endpoint state in step with the pool; see
    /// [`Self::observe_pool`].
    pub fn with_pool_observer(mut self, observer: Arc<dyn PoolObserver>) -> Self {
        self.pool_observers.push(observer);
        self
    }

    /// Adds a plugin that writes headers on the requests it schedules, sent upstream with
    /// them ([`SchedulingResult::upstream_headers`]).
    pub fn with_upstream_headers(mut self, writer: Arc<dyn UpstreamHeaders>) -> Self {
        self.upstream_headers.push(writer);
        self
    }

    /// Adds a plugin that writes headers on the responses of the requests it schedules.
    pub fn with_response_headers(mut self, writer: Arc<dyn ResponseHeaders>) -> Self {
        self.response_headers.push(writer);
        self
    }

    /// The headers the plugins write on the response to the request `result` scheduled
    /// (empty, and no allocation, when no plugin writes any).
    pub fn response_headers(&self, result: &SchedulingResult) -> Vec<(String, String)> {
        let mut headers = Vec::new();
        for writer in &self.response_headers {
            writer.response_headers(result, &mut headers);
        }
        headers
    }

    /// Appends to `headers` what the plugins write once the response's headers came and the
    /// proxy reported where it sent the request ([`ResponseHeaders::served_headers`]).
    pub fn served_response_headers(
        &self,
        served: ServedReport<'_>,
        headers: &mut Vec<(String, String)>,
    ) {
        for writer in &self.response_headers {
            writer.served_headers(served, headers);
        }
    }

    /// Adds a plugin that reports values computed from each response's token usage.
    pub fn with_usage_reporter(mut self, reporter: Arc<dyn UsageReporter>) -> Self {
        self.usage_reporters.push(reporter);
        self
    }

    /// Whether any plugin reports values from a response's usage (when none does, the adapter
    /// need not read the usage before the response ends).
    pub fn reports_usage(&self) -> bool {
        !self.usage_reporters.is_empty()
    }

    /// What the plugins report from the token usage of a finished response.
    pub fn report_usage(&self, usage: &ResponseUsage) -> Vec<ReportedAttribute> {
        let mut reported = Vec::new();
        for reporter in &self.usage_reporters {
            reporter.report(usage, &mut reported);
        }
        reported
    }

    /// Subscribes this scheduler's pool observers (the prefix-cache scorer's index, for one)
    /// to `pool`, so that they forget endpoints that leave it. Call once per pool the scheduler
    /// decides over; [`crate::Director`] does it for its pool.
    pub fn observe_pool(&self, pool: &SharedPool) {
        for observer in &self.pool_observers {
            pool.subscribe(Arc::clone(observer));
        }
    }

    /// Waits until the work pre-request hooks deferred for the decisions made so far has taken
    /// effect, e.g. until the prefix-cache scorer's background writer has recorded their
    /// prompts, so that the next decision sees them. Decisions never wait for that work; call
    /// this where an embedder, a simulation or a test needs a deterministic point.
    pub fn flush(&self) {
        for hook in &self.pre_request {
            hook.flush();
        }
    }

    /// Deferred work the pre-request hooks dropped so far because their writers fell behind
    /// (for the prefix-cache scorer: picks whose prompt blocks were never recorded).
    pub fn dropped_deferred(&self) -> u64 {
        self.pre_request.iter().map(|hook| hook.dropped_deferred()).sum()
    }

    /// The profiles.
    pub fn profiles(&self) -> &[SchedulerProfile] {
        &self.profiles
    }

    /// Chooses endpoints for `request` from `pool`, then runs the pre-request hooks.
    pub fn schedule(
        &self,
        request: &InferenceRequest,
        pool: &Arc<PoolSnapshot>,
    ) -> Result<SchedulingResult, SchedulingError> {
        self.schedule_with(request, pool, ScheduleOptions::default())
    }

    /// [`Self::schedule`] with explicit time, seed or explanation.
    pub fn schedule_with(
        &self,
        request: &InferenceRequest,
        pool: &Arc<PoolSnapshot>,
        options: ScheduleOptions,
    ) -> Result<SchedulingResult, SchedulingError> {
        let seed = options.seed.unwrap_or_else(|| {
            split_mix(self.seed ^ self.decisions.fetch_add(1, Ordering::Relaxed))
        });
        // Taken out of the thread-local (not borrowed) so a plugin that schedules re-entrantly
        // gets fresh scratch instead of a borrow panic.
        let scratch = SCRATCH.with(|cell| cell.take()).unwrap_or_default();
        let now = options.now.unwrap_or_else(Instant::now);
        let mut state = CycleState::with_scratch(now, seed, scratch);
        let result = self.decide(&mut state, request, pool, options.explain);
        SCRATCH.with(|cell| cell.replace(Some(state.into_scratch())));
        result
    }

    fn decide(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        pool: &Arc<PoolSnapshot>,
        explain: bool,
    ) -> Result<SchedulingResult, SchedulingError> {
        let mut explanation = explain.then(Vec::new);
        for producer in &self.data_producers {
            producer.produce(state, request, pool);
        }
        let mut buffers = state.take_buffers();
        let runs = self.run_profiles(state, request, pool, &mut buffers, explanation.as_mut());
        state.restore_buffers(buffers);
        let (runs, failures) = runs?;
        let primary = self.handler.primary_profile(request, &runs).filter(|&at| at < runs.len());
        let Some(primary) = primary else {
            // The primary profile did not pick; the last failure says why (it is the primary's
            // own when that ran last, as the decode stage of a prefill-first order does).
            return Err(failures.into_iter().last().unwrap_or(SchedulingError::NoProfileRun));
        };
        let stages = self.handler.stages(&runs);
        let primary_endpoint = pool.endpoints()[runs[primary].picks[0] as usize].id();
        let mut completion = CompletionGuard::new(
            Arc::clone(&self.completion_hooks),
            request.request_id.clone(),
            request.target_model.clone(),
            primary_endpoint,
        );
        completion.set_fairness_id(request.fairness_id.clone());
        let mut result =
            SchedulingResult::new(Arc::clone(pool), runs, primary, explanation, completion, stages);
        let prefill = result.prefill().map(EndpointState::id);
        if let Some(guard) = result.completion_mut() {
            guard.set_prefill(prefill);
        }
        // Load scorers add these to metrics scraped before now (see `DispatchLog`).
        let tokens = request.estimated_prompt_tokens();
        let runs = result.profile_runs();
        for (position, run) in runs.iter().enumerate() {
            let picked = run.picks[0];
            if !runs[..position].iter().any(|earlier| earlier.picks[0] == picked) {
                pool.endpoints()[picked as usize].endpoint.dispatches().record(state.now(), tokens);
            }
        }
        for hook in &self.pre_request {
            hook.pre_request(state, request, &result);
        }
        if !self.upstream_headers.is_empty() {
            let mut headers = Vec::new();
            for writer in &self.upstream_headers {
                writer.upstream_headers(state, request, &result, &mut headers);
            }
            result.set_upstream_headers(headers);
        }
        Ok(result)
    }

    /// Runs the profiles the handler chooses, each at most once, over the pool (or the
    /// request's subset of it). Returns the runs that picked and the errors of those that did
    /// not, in order (with the names of the latter shown to the handler).
    fn run_profiles(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        pool: &PoolSnapshot,
        buffers: &mut ProfileBuffers,
        mut explanation: Option<&mut Vec<ProfileExplanation>>,
    ) -> Result<(Vec<ProfileRun>, Vec<SchedulingError>), SchedulingError> {
        if pool.is_empty() {
            return Err(SchedulingError::EmptyPool);
        }
        buffers.base.clear();
        match &request.endpoint_subset {
            Some(subset) => {
                collect_subset(pool, subset, &mut buffers.base);
                if buffers.base.is_empty() {
                    return Err(SchedulingError::EmptySubset { requested: subset.len() });
                }
            }
            None => buffers.base.extend(0..pool.len() as u32),
        }
        for (name, screener) in &self.screeners {
            screener.screen(state, request, pool, &mut buffers.base);
            if buffers.base.is_empty() {
                return Err(SchedulingError::Screened { screener: name.clone() });
            }
        }
        if let Some(policy) = pool.staleness()
            && let Some(runs) = self.apply_staleness(state, request, pool, policy, buffers)?
        {
            return Ok((runs, Vec::new()));
        }

        let mut runs: Vec<ProfileRun> = Vec::with_capacity(1);
        let mut failed: Vec<Arc<str>> = Vec::new();
        let mut failures: Vec<SchedulingError> = Vec::new();
        let mut next = std::mem::take(&mut buffers.next_profiles);
        // Each profile runs at most once, which bounds the loop whatever the handler does.
        for _ in 0..=self.profiles.len() {
            next.clear();
            let progress = ProfileProgress { pool, runs: &runs, failed: &failed };
            self.handler.next_profiles(state, request, &self.profile_names, &progress, &mut next);
            if next.is_empty() {
                break;
            }
            for &index in next.iter() {
                let Some(profile) = self.profiles.get(index) else { continue };
                let name = profile.name();
                if runs.iter().any(|run| run.profile == *name) || failed.contains(name) {
                    continue;
                }
                match profile.run(state, request, pool, buffers, explanation.as_deref_mut()) {
                    Ok((picks, scores)) => {
                        runs.push(ProfileRun { profile: name.clone(), picks, scores })
                    }
                    Err(error) => {
                        failed.push(name.clone());
                        failures.push(error);
                    }
                }
            }
        }
        buffers.next_profiles = next;
        if runs.is_empty() {
            return Err(failures.pop().unwrap_or(SchedulingError::NoProfileRun));
        }
        Ok((runs, failures))
    }

    /// Applies the pool's staleness policy to the base candidates: keeps the fresh ones when
    /// there are some; when none is, either refuses (fail closed) or decides at once for the
    /// least-loaded candidates by last known load (fail open), among those the first profile's
    /// filters keep, without its scorers, which would rank numbers known to be out of date.
    /// Ties are broken by the decision's seeded randomness.
    fn apply_staleness(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        pool: &PoolSnapshot,
        policy: &StalenessPolicy,
        buffers: &mut ProfileBuffers,
    ) -> Result<Option<Vec<ProfileRun>>, SchedulingError> {
        let now = state.now();
        let fresh_of =
            |index: &u32| policy.is_fresh(&pool.endpoints()[*index as usize].metrics, now);
        let fresh = buffers.base.iter().filter(|index| fresh_of(index)).count();
        if fresh == buffers.base.len() {
            return Ok(None);
        }
        if fresh > 0 {
            buffers.base.retain(fresh_of);
            return Ok(None);
        }
        if !policy.fails_open() {
            return Err(SchedulingError::AllStale {
                candidates: buffers.base.len(),
                threshold: policy.threshold,
            });
        }
        // The profile that would run first: its filters (the role of a P/D stage, a LoRA or
        // label constraint) still apply; only its scorers, which would rank numbers known to
        // be out of date, are skipped.
        let mut next = Vec::with_capacity(1);
        let progress = ProfileProgress { pool, runs: &[], failed: &[] };
        self.handler.next_profiles(state, request, &self.profile_names, &progress, &mut next);
        let position = next.first().copied().filter(|&at| at < self.profiles.len()).unwrap_or(0);
        let profile = self.profiles.get(position).ok_or(SchedulingError::NoProfileRun)?;
        buffers.candidates.clear();
        buffers.candidates.extend_from_slice(&buffers.base);
        profile.run_filters(state, request, pool, &mut buffers.candidates)?;
        let mut ranked: Vec<(u64, u64, u32)> = buffers
            .candidates
            .iter()
            .map(|&index| {
                let load = last_known_load(&pool.endpoints()[index as usize]);
                (load, state.rng().next_u64(), index)
            })
            .collect();
        ranked.sort_unstable();
        let picks: Vec<u32> =
            ranked.iter().take(ALL_STALE_MAX_PICKS).map(|&(_, _, index)| index).collect();
        let profile = profile.name().clone();
        // Ranked by last known load, not scored.
        Ok(Some(vec![ProfileRun { profile, picks, scores: Vec::new() }]))
    }

    /// Runs the completion hooks for a request (what [`CompletionGuard`] does on finish or drop).
    pub fn complete(&self, completed: &CompletedRequest) {
        (self.completion_hooks.request)(completed);
    }
}

/// The pool positions of the endpoints of `subset` that the pool holds, each once, in the
/// subset's order.
pub(crate) fn collect_subset(pool: &PoolSnapshot, subset: &[SocketAddr], out: &mut Vec<u32>) {
    for address in subset {
        let by_id = pool
            .index_of(EndpointId::from_address(*address))
            .filter(|&index| pool.endpoints()[index as usize].endpoint.address == *address);
        let index = by_id.or_else(|| {
            pool.endpoints()
                .iter()
                .position(|state| state.endpoint.address == *address)
                .map(|position| position as u32)
        });
        if let Some(index) = index
            && !out.contains(&index)
        {
            out.push(index);
        }
    }
}

/// A seed that differs between processes, from the standard library's per-process hash keys
/// (no dependency on an OS random source for something that is not security-relevant).
pub(crate) fn process_random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}

/// The default profile handler: runs the one profile there is (the first, if several).
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProfileHandler;

/// GIE type name of [`SingleProfileHandler`].
pub const SINGLE_PROFILE_HANDLER: &str = "single-profile-handler";

impl ProfileHandler for SingleProfileHandler {
    fn next_profiles(
        &self,
        _state: &mut CycleState,
        _request: &InferenceRequest,
        profile_names: &[Arc<str>],
        progress: &ProfileProgress<'_>,
        next: &mut Vec<usize>,
    ) {
        if progress.runs.is_empty() && progress.failed.is_empty() && !profile_names.is_empty() {
            next.push(0);
        }
    }

    fn primary_profile(&self, _request: &InferenceRequest, runs: &[ProfileRun]) -> Option<usize> {
        (!runs.is_empty()).then_some(0)
    }

    fn max_profiles(&self) -> Option<usize> {
        Some(1)
    }
}
