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
//! Rebuilding a prefix elsewhere is cheap next to queueing behind it while the pool has idle
//! room: a 6,000-token prompt is a fraction of a second of prefill, once per server. It is
//! not cheap when every server is busy: then the lightest server's queue is long too, a move
//! saves only the difference, and the prefill it repeats (a conversation's whole history)
//! is work taken from a pool that has none to spare. So each candidate's prefix score fades
//! with how far its load exceeds the least-loaded candidate's, measured against a tolerance
//! that grows with that lightest load:
//!
//! ```text
//! load      = running + waiting × waitingRequestFactor + requests sent since the last scrape
//! tolerance = affinityLoadTolerance + affinityLoadRatio × lightest load
//! score'    = score × max(0, 1 − (load − lightest load) / tolerance)
//! ```
//!
//! With equal loads nothing changes. On a pool with idle room (lightest load near 0) a holder
//! `affinityLoadTolerance` requests busier than the lightest candidate scores 0 on affinity,
//! so the load scorers send the next request elsewhere, which then holds the prefix too: a hot
//! prefix spreads over as many servers as its load needs. On a busy pool a holder keeps its
//! affinity until it carries `1 + affinityLoadRatio` times the lightest load (plus the
//! tolerance), so follow-up turns stay with their history, and the imbalance affinity may
//! cause stays within a constant factor instead of growing without bound.
//! `affinityLoadTolerance: 0` restores GIE's formula; `affinityLoadRatio: 0` the absolute
//! tolerance alone.
//!
//! The defaults come from the simulator's standard workloads (`docs/simulator.md`, hot prefix).

use scheduler_core::{Candidates, CycleState, EndpointState};

use crate::lag_compensation::pending_since_scrape;

/// The default `affinityLoadTolerance`, in requests: about a quarter of vLLM's default
/// `max_num_seqs` (256), so affinity gives way well before a holder's batch is full while
/// the ordinary spread of in-flight counts between busy servers leaves it nearly whole.
pub const DEFAULT_AFFINITY_LOAD_TOLERANCE: f64 = 64.0;

/// The default `affinityLoadRatio`: on a busy pool a holder keeps some affinity until it
/// carries three times the lightest candidate's load (plus the absolute tolerance). Lower
/// ratios moved multi-turn conversations off their servers near saturation in the simulator
/// (ShareGPT at 300 requests/s on 10 servers: p90 TTFT 1.9 s at 0, 610 ms at 0.5, 88 ms at 2).
pub const DEFAULT_AFFINITY_LOAD_RATIO: f64 = 2.0;

/// The default `waitingRequestFactor`: a waiting request counts for this many running ones,
/// since it adds its whole wait, where a running one only slows the batch's steps.
pub const DEFAULT_WAITING_REQUEST_FACTOR: f64 = 4.0;

/// How far a prefix's endpoint may be busier than the lightest candidate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct LoadTolerance {
    /// Requests of excess load at which affinity is gone on an idle pool; 0 turns the
    /// discount off.
    pub(super) requests: f64,
    /// How much the tolerance grows per request of the lightest candidate's load.
    pub(super) ratio: f64,
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
    /// exceeds the lightest candidate's, against a tolerance that grows with that load. Each load is computed once, into a buffer of the
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
        let tolerance = self.requests + self.ratio * lightest;
        for (score, &load) in scores.iter_mut().zip(loads.iter()) {
            if *score <= 0.0 || !load.is_finite() {
                continue;
            }
            let excess = (load - lightest).max(0.0);
            *score *= (1.0 - excess / tolerance).max(0.0);
        }
    }
}

/// Each candidate's load in one decision (reused between decisions).
#[derive(Default)]
struct CandidateLoads(Vec<f64>);
