//! In-flight eviction (`flowControl.enableEviction`): ending a sheddable request already routed
//! so that a waiting request of higher priority can use its capacity.
//!
//! The adapter registers every admitted, routed request with [`InFlightRequests::track`] and
//! holds the returned [`InFlightGuard`] for the life of the request (dropping it untracks).
//! When the flow controller finds its top band blocked by saturation, it asks
//! [`InFlightRequests::evict_for`] for a victim. The adapter waits on
//! [`InFlightGuard::evicted`] next to its stream and, when it fires, ends the request (the ext-proc
//! adapter answers 429 with `x-llm-d-request-dropped-reason: evicted`, as the Go EPP does).
//!
//! Rules, as in the Go EPP's eviction filter and ordering (here the plugin types
//! [`SheddableEvictionFilter`](crate::flow::SheddableEvictionFilter) and
//! [`PriorityThenTimeEvictionOrder`](crate::flow::PriorityThenTimeEvictionOrder)):
//! - only sheddable requests (priority < 0) are ever victims (`sheddable-eviction-filter`), and
//!   only for a demand of strictly higher priority;
//! - the lowest priority goes first, the most recently dispatched among equals (it has the
//!   least work to lose; `priority-then-time-eviction-order-policy`);
//! - pacing: one eviction at a time. A new victim is chosen only once the previous one's
//!   request has ended (its guard dropped), so the saturation signal has a chance to reflect
//!   the freed capacity before more work is cut.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;

use crate::flow::eviction_policy::{
    EvictionCandidate, PriorityThenTimeEvictionOrder, SheddableEvictionFilter,
};
use crate::flow::metrics::{FlowMetrics, OutcomeReason};

/// Requests in flight that eviction may end. Cheap to clone: clones share the set.
#[derive(Clone, Default)]
pub struct InFlightRequests {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    metrics: Option<Arc<FlowMetrics>>,
}

#[derive(Default)]
struct State {
    /// Tracked requests by tracking order (a later key was dispatched later).
    tracked: BTreeMap<u64, Tracked>,
    next_key: u64,
    /// Evicted requests whose guard is still alive: while any is, no new eviction is made.
    outstanding: usize,
}

struct Tracked {
    priority: i32,
    signal: Arc<Signal>,
}

/// The eviction flag of one request, and the task waiting on it.
#[derive(Default)]
struct Signal {
    evicted: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Signal {
    fn fire(&self) {
        self.evicted.store(true, Ordering::Release);
        if let Some(waker) = self.waker.lock().take() {
            waker.wake();
        }
    }
}

/// A request chosen for eviction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Evicted {
    /// The victim's priority (always negative).
    pub priority: i32,
    /// The priority of the waiting request it makes room for.
    pub for_priority: i32,
}

impl fmt::Debug for InFlightRequests {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.state.lock();
        f.debug_struct("InFlightRequests")
            .field("tracked", &state.tracked.len())
            .field("outstanding", &state.outstanding)
            .finish()
    }
}

impl InFlightRequests {
    /// An empty set counting evictions into `metrics` (outcome `evicted`).
    pub fn new(metrics: Arc<FlowMetrics>) -> Self {
        Self { shared: Arc::new(Shared { state: Mutex::default(), metrics: Some(metrics) }) }
    }

    /// Tracks a routed request of `priority` until the returned guard is dropped.
    pub fn track(&self, priority: i32) -> InFlightGuard {
        let signal = Arc::new(Signal::default());
        let mut state = self.shared.state.lock();
        let key = state.next_key;
        state.next_key += 1;
        state.tracked.insert(key, Tracked { priority, signal: Arc::clone(&signal) });
        InFlightGuard { requests: self.clone(), key, signal }
    }

    /// Chooses and signals a victim to make room for a waiting request of `for_priority`, if
    /// a sheddable request of lower priority is in flight and no earlier eviction is still
    /// ending. The victim leaves the tracked set at once.
    pub fn evict_for(&self, for_priority: i32) -> Option<Evicted> {
        let mut state = self.shared.state.lock();
        if state.outstanding > 0 {
            return None;
        }
        // The tracking key is the dispatch order: a later key was dispatched later.
        let candidate = |(&key, tracked): (&u64, &Tracked)| EvictionCandidate {
            priority: tracked.priority,
            dispatch_seq: key,
        };
        let order = PriorityThenTimeEvictionOrder;
        let chosen = state
            .tracked
            .iter()
            .map(candidate)
            .filter(|candidate| is_evictable(candidate.priority, for_priority))
            .min_by(|a, b| order.compare(a, b))?;
        let priority = chosen.priority;
        let victim = state.tracked.remove(&chosen.dispatch_seq)?;
        state.outstanding += 1;
        drop(state);
        victim.signal.fire();
        if let Some(metrics) = &self.shared.metrics {
            metrics.record_outcome(OutcomeReason::Evicted);
        }
        Some(Evicted { priority, for_priority })
    }

    /// Requests tracked (not evicted) right now.
    pub fn tracked(&self) -> usize {
        self.shared.state.lock().tracked.len()
    }

    /// Evicted requests whose guard is still alive.
    pub fn outstanding(&self) -> usize {
        self.shared.state.lock().outstanding
    }
}

/// Whether a request of `priority` may be evicted for a demand of `for_priority`: it must be
/// sheddable (below zero) and of strictly lower priority than the demand.
pub fn is_evictable(priority: i32, for_priority: i32) -> bool {
    // The filter decides who may ever be evicted; the bound keeps every eviction strictly
    // below the demand it makes room for.
    SheddableEvictionFilter.accepts(&EvictionCandidate { priority, dispatch_seq: 0 })
        && priority < for_priority
}

/// A tracked request: untracks it when dropped, and tells whether it was evicted.
pub struct InFlightGuard {
    requests: InFlightRequests,
    key: u64,
    signal: Arc<Signal>,
}

impl fmt::Debug for InFlightGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlightGuard")
            .field("key", &self.key)
            .field("evicted", &self.is_evicted())
            .finish()
    }
}

impl InFlightGuard {
    /// Whether the request has been evicted.
    pub fn is_evicted(&self) -> bool {
        self.signal.evicted.load(Ordering::Acquire)
    }

    /// Completes when the request is evicted (never, if it is not).
    pub fn evicted(&self) -> EvictedFuture<'_> {
        EvictedFuture { signal: &self.signal }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut state = self.requests.shared.state.lock();
        if state.tracked.remove(&self.key).is_none() && self.is_evicted() {
            // An evicted request has ended: the next eviction may go ahead.
            state.outstanding = state.outstanding.saturating_sub(1);
        }
    }
}

/// Completes when its request is evicted.
#[derive(Debug)]
pub struct EvictedFuture<'a> {
    signal: &'a Signal,
}

impl fmt::Debug for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signal").field("evicted", &self.evicted.load(Ordering::Relaxed)).finish()
    }
}

impl Future for EvictedFuture<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.evicted.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        *self.signal.waker.lock() = Some(cx.waker().clone());
        // Checked again: the flag may have been set between the first check and the store.
        if self.signal.evicted.load(Ordering::Acquire) { Poll::Ready(()) } else { Poll::Pending }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lowest_priority_then_latest_goes_first_one_at_a_time() {
        let metrics = Arc::new(FlowMetrics::new());
        let requests = InFlightRequests::new(Arc::clone(&metrics));
        let critical = requests.track(0);
        let old_batch = requests.track(-1);
        let lowest = requests.track(-5);
        let new_batch = requests.track(-1);
        assert_eq!(requests.evict_for(0), Some(Evicted { priority: -5, for_priority: 0 }));
        assert!(lowest.is_evicted());
        assert_eq!(requests.evict_for(0), None, "paced: the first victim has not ended yet");
        drop(lowest);
        assert_eq!(requests.evict_for(0), Some(Evicted { priority: -1, for_priority: 0 }));
        assert!(new_batch.is_evicted() && !old_batch.is_evicted(), "the latest of equals");
        drop(new_batch);
        assert_eq!(requests.evict_for(-1), None, "only for a strictly higher priority");
        assert_eq!(requests.evict_for(3), Some(Evicted { priority: -1, for_priority: 3 }));
        drop(old_batch);
        assert_eq!(requests.evict_for(10), None, "priority 0 is never evicted");
        assert!(!critical.is_evicted());
        assert_eq!(metrics.outcome(OutcomeReason::Evicted), 3);
        drop(critical);
        assert_eq!((requests.tracked(), requests.outstanding()), (0, 0));
    }

    #[test]
    fn the_future_completes_on_eviction() {
        let requests = InFlightRequests::default();
        let guard = requests.track(-1);
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut future = std::pin::pin!(guard.evicted());
        assert!(future.as_mut().poll(&mut cx).is_pending());
        requests.evict_for(0);
        assert!(future.as_mut().poll(&mut cx).is_ready());
    }

    proptest! {
        /// Whatever is in flight and whatever demands room, only sheddable requests of lower
        /// priority than the demand are ever evicted, and never more than one at a time.
        #[test]
        fn only_sheddable_lower_priority_requests_are_evicted(
            priorities in proptest::collection::vec(-4i32..4, 0..20),
            steps in proptest::collection::vec((-4i32..6, any::<bool>()), 0..40),
        ) {
            let requests = InFlightRequests::default();
            let mut guards: Vec<(i32, InFlightGuard)> =
                priorities.iter().map(|&p| (p, requests.track(p))).collect();
            for (demand, finish_evicted) in steps {
                let before: Vec<bool> = guards.iter().map(|(_, g)| g.is_evicted()).collect();
                let evicted = requests.evict_for(demand);
                let newly: Vec<i32> = guards
                    .iter()
                    .zip(&before)
                    .filter(|((_, guard), was)| guard.is_evicted() && !**was)
                    .map(|((priority, _), _)| *priority)
                    .collect();
                prop_assert!(newly.len() <= 1);
                prop_assert_eq!(evicted.map(|e| e.priority), newly.first().copied());
                for priority in newly {
                    prop_assert!(priority < 0 && priority < demand, "{} for {}", priority, demand);
                }
                if finish_evicted {
                    guards.retain(|(_, guard)| !guard.is_evicted());
                }
            }
        }
    }
}
