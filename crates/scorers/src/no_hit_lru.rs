//! `no-hit-lru-scorer`: spreads cold requests (no cached prefix anywhere) over the endpoints
//! that served cold requests least recently, so the new KV blocks they create grow every
//! cache evenly instead of piling onto one.
//!
//! Matches llm-d-router's no-hit LRU scorer. For a warm request (the prefix scorer found a
//! cached prefix on some candidate) every candidate scores 0.5, leaving locality to the prefix
//! scorer. For a cold one, with n candidates: a lone candidate scores 1; otherwise the
//! candidates that never served a cold request come first, the i-th of them (in candidate
//! order, from 0) scoring 1 - i / (n - 1); an endpoint at position p of the LRU (0 = least
//! recently used among every tracked endpoint, candidate or not) scores
//! max(0, 1 - (u + p) / (n - 1)), with u the number of never-used candidates.
//!
//! The pre-request hook moves the chosen endpoint to the most-recent end, for cold requests
//! only, and likewise the first pick of a profile named `prefill` (llm-d-router's fixed name
//! for the prefill profile of disaggregated serving). At most `lruSize` endpoints (default
//! 1024) are tracked; the least recent is forgotten first.
//!
//! Whether the request is cold comes from `prefix-cache-scorer`, which leaves that fact in
//! the decision's [`CycleState`]; as in llm-d-router the prefix scorer must come first in
//! the profile, and without it every request counts as cold. The llm-d-router parameters
//! naming the prefix plugin or its producer (`prefixPluginType`, `prefixPluginName`,
//! `prefixMatchInfoProducerName`) are accepted and have no effect: epp-rs has one prefix
//! scorer per decision. A non-positive `lruSize`, which llm-d-router replaces by the
//! default, is refused.

use parking_lot::RwLock;
use scheduler_core::{
    Candidates, CycleState, EndpointId, EndpointMap, InferenceRequest, PluginError, PreRequest,
    SchedulingResult, Scorer,
};
use serde::Deserialize;

use crate::prefix_cache::PrefixHit;

/// llm-d type name.
pub const TYPE_NAME: &str = "no-hit-lru-scorer";

/// llm-d-router's default LRU size.
pub const DEFAULT_LRU_SIZE: i64 = 1024;

/// The profile whose pick is also recorded (llm-d-router's fixed prefill profile name).
const PREFILL_PROFILE: &str = "prefill";

/// Parameters of [`NoHitLruScorer`].
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NoHitLruParameters {
    /// Endpoints tracked (default 1024; must be positive).
    #[serde(default)]
    pub lru_size: Option<i64>,
    /// Deprecated in llm-d-router, never used there; accepted and ignored.
    #[serde(default)]
    pub prefix_plugin_type: Option<String>,
    /// Deprecated in llm-d-router, never used there; accepted and ignored.
    #[serde(default)]
    pub prefix_plugin_name: Option<String>,
    /// The llm-d-router prefix-match producer; accepted and ignored (see module doc).
    #[serde(default)]
    pub prefix_match_info_producer_name: Option<String>,
}

/// Endpoints by the sequence number of their latest cold request.
#[derive(Debug, Default)]
struct Lru {
    next: u64,
    last_used: EndpointMap<u64>,
}

/// Per-decision scratch: whether the decision's request is cold, and a sorting buffer.
#[derive(Debug, Default)]
struct NoHitScratch {
    cold_for: Option<(u64, bool)>,
    order: Vec<u64>,
}

/// Ranks endpoints by how long ago they served a cold request.
#[derive(Debug)]
pub struct NoHitLruScorer {
    capacity: usize,
    lru: RwLock<Lru>,
}

impl NoHitLruScorer {
    /// A scorer with `parameters`; `lruSize` must be positive.
    pub fn new(parameters: &NoHitLruParameters) -> Result<Self, PluginError> {
        let size = parameters.lru_size.unwrap_or(DEFAULT_LRU_SIZE);
        let capacity = usize::try_from(size).ok().filter(|&size| size > 0).ok_or_else(|| {
            PluginError::InvalidParameters(format!("'lruSize' must be positive, got {size}"))
        })?;
        Ok(Self { capacity, lru: RwLock::new(Lru::default()) })
    }

    /// The tracked endpoints, least recently used first.
    pub fn recently_used(&self) -> Vec<EndpointId> {
        let lru = self.lru.read();
        let mut entries: Vec<_> = lru.last_used.iter().map(|(&id, &seq)| (seq, id)).collect();
        entries.sort_unstable_by_key(|&(seq, _)| seq);
        entries.into_iter().map(|(_, id)| id).collect()
    }

    /// Makes `endpoint` the most recently used, forgetting the least recent one when full.
    fn touch(&self, endpoint: EndpointId) {
        let mut lru = self.lru.write();
        lru.next += 1;
        let seq = lru.next;
        if !lru.last_used.contains_key(&endpoint) && lru.last_used.len() >= self.capacity {
            let oldest = lru.last_used.iter().min_by_key(|&(_, &seq)| seq).map(|(&id, _)| id);
            if let Some(oldest) = oldest {
                lru.last_used.remove(&oldest);
            }
        }
        lru.last_used.insert(endpoint, seq);
    }
}

impl Scorer for NoHitLruScorer {
    fn score(
        &self,
        state: &mut CycleState,
        _request: &InferenceRequest,
        candidates: Candidates<'_>,
        scores: &mut [f64],
    ) {
        // No prefix information counts as cold, as in llm-d-router.
        let cold = PrefixHit::of_decision(state) != Some(true);
        let stamp = state.decision_stamp();
        let scratch = state.scratch::<NoHitScratch>();
        scratch.cold_for = Some((stamp, cold));
        if !cold {
            scores.fill(0.5);
            return;
        }
        if scores.len() == 1 {
            scores[0] = 1.0;
        }
        if scores.len() <= 1 {
            return;
        }
        let last = (scores.len() - 1) as f64;
        let lru = self.lru.read();
        let mut never_used = 0usize;
        for (score, state) in scores.iter_mut().zip(candidates.iter()) {
            if !lru.last_used.contains_key(&state.id()) {
                *score = 1.0 - never_used as f64 / last;
                never_used += 1;
            }
        }
        // Positions are among every tracked endpoint, found by sorting their sequence numbers
        // once rather than scanning the LRU per candidate.
        let order = &mut scratch.order;
        order.clear();
        order.extend(lru.last_used.values().copied());
        order.sort_unstable();
        for (score, state) in scores.iter_mut().zip(candidates.iter()) {
            if let Some(seq) = lru.last_used.get(&state.id()) {
                let position = order.binary_search(seq).unwrap_or_default();
                *score = (1.0 - (never_used + position) as f64 / last).max(0.0);
            }
        }
    }
}

impl PreRequest for NoHitLruScorer {
    fn pre_request(
        &self,
        state: &mut CycleState,
        _request: &InferenceRequest,
        result: &SchedulingResult,
    ) {
        let stamp = state.decision_stamp();
        // Only a cold request that this scorer scored moves endpoints in the LRU.
        if state.scratch::<NoHitScratch>().cold_for != Some((stamp, true)) {
            return;
        }
        self.touch(result.primary().id());
        let pool = result.pool();
        for run in result.profile_runs().iter().filter(|run| &*run.profile == PREFILL_PROFILE) {
            if let Some(state) = run.picks.first().and_then(|&index| pool.get(index)) {
                self.touch(state.id());
            }
        }
    }
}
