//! The scheduler: runs the profiles a request needs and returns the chosen endpoints.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::cycle::CycleState;
use crate::endpoint::{EndpointId, EndpointState};
use crate::plugin::{CompletedRequest, Outcome, PreRequest, ProfileHandler, ResponseComplete};
use crate::pool::PoolSnapshot;
use crate::profile::{ProfileBuffers, ProfileExplanation, SchedulerProfile};
use crate::request::InferenceRequest;

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
    /// The profile handler chose no profile to run.
    #[error("the profile handler chose no profile for the request")]
    NoProfileRun,
}

/// The endpoints one profile chose, best first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileRun {
    /// The profile's name.
    pub profile: Arc<str>,
    /// Chosen endpoints as positions in the snapshot, best first, no repeats.
    pub picks: Vec<u32>,
}

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
#[derive(Debug)]
pub struct Scheduler {
    profiles: Vec<SchedulerProfile>,
    profile_names: Vec<Arc<str>>,
    handler: Arc<dyn ProfileHandler>,
    pre_request: Vec<Arc<dyn PreRequest>>,
    response_complete: Arc<[Arc<dyn ResponseComplete>]>,
    seed: u64,
    decisions: AtomicU64,
}

thread_local! {
    static BUFFERS: RefCell<(Vec<u32>, ProfileBuffers)> = RefCell::default();
}

impl Scheduler {
    /// A scheduler over `profiles`, with `handler` choosing which run.
    pub fn new(profiles: Vec<SchedulerProfile>, handler: Arc<dyn ProfileHandler>) -> Self {
        let profile_names = profiles.iter().map(|profile| profile.name().clone()).collect();
        Self {
            profiles,
            profile_names,
            handler,
            pre_request: Vec::new(),
            response_complete: Arc::from(Vec::new()),
            seed: process_random_seed(),
            decisions: AtomicU64::new(0),
        }
    }

    /// Makes every decision's randomness derive from `seed` (tests, simulations).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self.decisions = AtomicU64::new(0);
        self
    }

    /// Adds a hook that runs after each decision.
    pub fn with_pre_request(mut self, hook: Arc<dyn PreRequest>) -> Self {
        self.pre_request.push(hook);
        self
    }

    /// Adds a hook that runs when each scheduled request ends.
    pub fn with_response_complete(mut self, hook: Arc<dyn ResponseComplete>) -> Self {
        let mut hooks = self.response_complete.to_vec();
        hooks.push(hook);
        self.response_complete = Arc::from(hooks);
        self
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
        let mut state = CycleState::new(options.now.unwrap_or_else(Instant::now), seed);
        let mut explanation = options.explain.then(Vec::new);

        // Taken out of the thread-local (not borrowed) so a plugin that schedules re-entrantly
        // gets fresh buffers instead of a borrow panic.
        let (mut base, mut buffers) = BUFFERS.with(|cell| cell.take());
        let runs = self.run_profiles(
            &mut state,
            request,
            pool,
            &mut base,
            &mut buffers,
            explanation.as_mut(),
        );
        BUFFERS.with(|cell| cell.replace((base, buffers)));
        let runs = runs?;

        let primary = self.handler.primary_profile(request, &runs).min(runs.len() - 1);
        let primary_endpoint = pool.endpoints()[runs[primary].picks[0] as usize].id();
        let result = SchedulingResult {
            pool: Arc::clone(pool),
            runs,
            primary,
            explanation,
            completion: Some(CompletionGuard {
                hooks: Arc::clone(&self.response_complete),
                completed: Some(CompletedRequest {
                    request_id: request.request_id.clone(),
                    target_model: request.target_model.clone(),
                    scheduled_endpoint: primary_endpoint,
                    served_endpoint: None,
                    prompt_tokens: None,
                    completion_tokens: None,
                    outcome: Outcome::Cancelled,
                }),
            }),
        };
        // Load scorers add these to metrics scraped before now (see `dispatch`).
        let tokens = request.estimated_prompt_tokens();
        for (position, run) in result.runs.iter().enumerate() {
            let picked = run.picks[0];
            if !result.runs[..position].iter().any(|earlier| earlier.picks[0] == picked) {
                pool.endpoints()[picked as usize].endpoint.dispatches().record(state.now(), tokens);
            }
        }
        for hook in &self.pre_request {
            hook.pre_request(&mut state, request, &result);
        }
        Ok(result)
    }

    fn run_profiles(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        pool: &PoolSnapshot,
        base: &mut Vec<u32>,
        buffers: &mut ProfileBuffers,
        explanation: Option<&mut Vec<ProfileExplanation>>,
    ) -> Result<Vec<ProfileRun>, SchedulingError> {
        if pool.is_empty() {
            return Err(SchedulingError::EmptyPool);
        }
        base.clear();
        match &request.endpoint_subset {
            Some(subset) => {
                collect_subset(pool, subset, base);
                if base.is_empty() {
                    return Err(SchedulingError::EmptySubset { requested: subset.len() });
                }
            }
            None => base.extend(0..pool.len() as u32),
        }

        let mut runs: Vec<ProfileRun> = Vec::with_capacity(1);
        let mut next = std::mem::take(&mut buffers.next_profiles);
        let runs_result = self.run_chosen_profiles(
            state,
            request,
            pool,
            base,
            buffers,
            &mut next,
            &mut runs,
            explanation,
        );
        buffers.next_profiles = next;
        runs_result?;
        if runs.is_empty() {
            return Err(SchedulingError::NoProfileRun);
        }
        Ok(runs)
    }

    #[allow(clippy::too_many_arguments)]
    fn run_chosen_profiles(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        pool: &PoolSnapshot,
        base: &[u32],
        buffers: &mut ProfileBuffers,
        next: &mut Vec<usize>,
        runs: &mut Vec<ProfileRun>,
        mut explanation: Option<&mut Vec<ProfileExplanation>>,
    ) -> Result<(), SchedulingError> {
        // Each profile runs at most once, which bounds the loop whatever the handler does.
        for _ in 0..=self.profiles.len() {
            next.clear();
            self.handler.next_profiles(request, &self.profile_names, runs, next);
            if next.is_empty() {
                break;
            }
            for &index in next.iter() {
                let Some(profile) = self.profiles.get(index) else { continue };
                if runs.iter().any(|run| run.profile == *profile.name()) {
                    continue;
                }
                let picks =
                    profile.run(state, request, pool, base, buffers, explanation.as_deref_mut())?;
                runs.push(ProfileRun { profile: profile.name().clone(), picks });
            }
        }
        Ok(())
    }

    /// Runs the completion hooks for a request (what [`CompletionGuard`] does on finish or drop).
    pub fn complete(&self, completed: &CompletedRequest) {
        for hook in self.response_complete.iter() {
            hook.response_complete(completed);
        }
    }
}

fn collect_subset(pool: &PoolSnapshot, subset: &[SocketAddr], out: &mut Vec<u32>) {
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
fn process_random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}

/// Spreads sequential counters over the seed space so consecutive decisions draw unrelated
/// random streams (SplitMix64 finaliser).
fn split_mix(mut value: u64) -> u64 {
    value = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
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
}

impl SchedulingResult {
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

    /// The profile that chose the primary endpoint.
    pub fn primary_profile(&self) -> &str {
        &self.runs[self.primary].profile
    }

    /// Every profile that ran, in order.
    pub fn profile_runs(&self) -> &[ProfileRun] {
        &self.runs
    }

    /// The snapshot the decision was taken on.
    pub fn pool(&self) -> &Arc<PoolSnapshot> {
        &self.pool
    }

    /// Per-scorer scores, when requested with [`ScheduleOptions::explain`].
    pub fn explanation(&self) -> Option<&[ProfileExplanation]> {
        self.explanation.as_deref()
    }

    /// Takes the guard that runs the completion hooks. Keep it for as long as the response
    /// lasts; if it is never taken, the hooks run (as cancelled) when the result is dropped.
    pub fn take_completion(&mut self) -> Option<CompletionGuard> {
        self.completion.take()
    }
}

/// Runs the scheduler's completion hooks exactly once: on [`CompletionGuard::finish`], or as
/// [`Outcome::Cancelled`] when dropped unfinished (client gone, stream reset, error path).
#[derive(Debug)]
pub struct CompletionGuard {
    hooks: Arc<[Arc<dyn ResponseComplete>]>,
    completed: Option<CompletedRequest>,
}

impl CompletionGuard {
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
        if let Some(mut completed) = self.completed.take() {
            completed.outcome = outcome;
            for hook in self.hooks.iter() {
                hook.response_complete(&completed);
            }
        }
    }
}

impl Drop for CompletionGuard {
    fn drop(&mut self) {
        self.run(Outcome::Cancelled);
    }
}

/// The default profile handler: runs the one profile there is (the first, if several).
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProfileHandler;

/// GIE type name of [`SingleProfileHandler`].
pub const SINGLE_PROFILE_HANDLER: &str = "single-profile-handler";

impl ProfileHandler for SingleProfileHandler {
    fn next_profiles(
        &self,
        _request: &InferenceRequest,
        profile_names: &[Arc<str>],
        already_run: &[ProfileRun],
        next: &mut Vec<usize>,
    ) {
        if already_run.is_empty() && !profile_names.is_empty() {
            next.push(0);
        }
    }

    fn primary_profile(&self, _request: &InferenceRequest, _already_run: &[ProfileRun]) -> usize {
        0
    }
}
