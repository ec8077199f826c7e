//! Load-aware prefix affinity: a cached prefix earns its score only while its endpoint is not
//! much busier than the least-loaded candidate.
//!
//! GIE's prefix score ignores load, and the load scorers rank queues by min-max normalisation,
//! so the most a queue can cost an endpoint is the queue scorer's weight, however deep the
//! queue. When every request shares one long prefix (a single product's assistant), the one
//! endpoint that holds it keeps winning on affinity: its queue grows without bound while the
//! rest of the pool idles, and throughput collapses to one server's (the simulator's
//! `hot-prefix` workload: a fifth of load-only routing's throughput on 8 servers).
//!
//! Rebuilding a prefix elsewhere is cheap next to queueing behind it: a 6,000-token prompt is a
//! fraction of a second of prefill, once per server. So each candidate's prefix score fades
//! with how far its load exceeds the least-loaded candidate's:
//!
//! ```text
//! load   = running + waiting × waitingRequestFactor + requests sent since the last scrape
//! score' = score × max(0, 1 − (load − lightest load) / affinityLoadTolerance)
//! ```
//!
//! With equal loads nothing changes. A holder `affinityLoadTolerance` requests busier than the
//! lightest candidate scores 0 on affinity, so the load scorers send the next request
//! elsewhere, which then holds the prefix too: a hot prefix spreads over as many servers as its
//! load needs, while conversations and groups of many distinct prefixes keep their servers
//! (their holders are rarely that much busier than the rest). `affinityLoadTolerance: 0`
//! restores GIE's formula.
//!
//! The defaults come from the simulator's standard workloads (`docs/simulator.md`, hot prefix).

use scheduler_core::{Candidates, CycleState, EndpointState};

use crate::lag_compensation::pending_since_scrape;

/// The default `affinityLoadTolerance`, in requests: about a quarter of vLLM's default
/// `max_num_seqs` (256), so affinity gives way well before a holder's batch is full while
/// the ordinary spread of in-flight counts between busy servers leaves it nearly whole.
pub const DEFAULT_AFFINITY_LOAD_TOLERANCE: f64 = 64.0;

/// The default `waitingRequestFactor`: a waiting request counts for this many running ones,
/// since it adds its whole wait, where a running one only slows the batch's steps.
pub const DEFAULT_WAITING_REQUEST_FACTOR: f64 = 4.0;

/// How far a prefix's endpoint may be busier than the lightest candidate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct LoadTolerance {
    /// Requests of excess load at which affinity is gone; 0 turns the discount off.
    pub(super) requests: f64,
    /// Running requests one waiting request counts for.
    pub(super) waiting_factor: f64,
}

impl LoadTolerance {
    /// Whether the discount is off (GIE's formula).
    pub(super) fn is_off(&self) -> bool {
        self.requests <= 0.0
    }

    /// The load of `state`'s endpoint: running and waiting requests as scraped, plus the
    /// requests this picker sent it since.
    fn load_of(&self, state: &EndpointState) -> f64 {
        let pending = f64::from(pending_since_scrape(state, true).requests);
        let waiting = f64::from(state.metrics.waiting_queue);
        f64::from(state.metrics.running) + waiting * self.waiting_factor + pending
    }

    /// Scales `scores` (one per candidate, in [0, 1]) by how far each candidate's load
    /// exceeds the lightest candidate's. Each load is computed once, into a buffer of the
    /// decision's scratch space that later decisions reuse.
    pub(super) fn discount(
        &self,
        state: &mut CycleState,
        candidates: Candidates<'_>,
        scores: &mut [f64],
    ) {
        let loads = &mut state.scratch::<CandidateLoads>().0;
        loads.clear();
        loads.extend((0..candidates.len()).map(|position| {
            candidates.get(position).map_or(f64::INFINITY, |endpoint| self.load_of(endpoint))
        }));
        let lightest = loads.iter().copied().fold(f64::INFINITY, f64::min);
        if !lightest.is_finite() {
            return;
        }
        for (score, &load) in scores.iter_mut().zip(loads.iter()) {
            if *score <= 0.0 || !load.is_finite() {
                continue;
            }
            let excess = (load - lightest).max(0.0);
            *score *= (1.0 - excess / self.requests).max(0.0);
        }
    }
}

/// Each candidate's load in one decision (reused between decisions).
#[derive(Default)]
struct CandidateLoads(Vec<f64>);
