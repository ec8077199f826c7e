//! The pool snapshot: every endpoint with its latest metrics, published as one immutable value.
//!
//! Writers (metrics collector, discovery) build a new snapshot and swap it in; readers (the
//! scheduler) load the current one without locking. Endpoints and their metrics live in one
//! value so a reader never sees an endpoint list from one update and metrics from another.

pub(crate) mod attributes;
pub(crate) mod dispatch_log;
pub(crate) mod endpoint;
pub(crate) mod staleness;

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use parking_lot::RwLock;

use crate::pool::endpoint::{EndpointId, EndpointMap, EndpointMetrics, EndpointState};
use crate::pool::staleness::StalenessPolicy;
use crate::scheduling::plugin::PoolObserver;

/// An immutable view of the pool at one moment.
#[derive(Clone, Debug, Default)]
pub struct PoolSnapshot {
    endpoints: Vec<EndpointState>,
    index_by_id: EndpointMap<u32>,
    generation: u64,
    membership: u64,
    staleness: Option<StalenessPolicy>,
}

impl PoolSnapshot {
    /// A snapshot holding `endpoints`. A later duplicate id replaces an earlier one.
    pub fn new(endpoints: impl IntoIterator<Item = EndpointState>) -> Self {
        let mut snapshot = Self::default();
        for state in endpoints {
            snapshot.upsert(state);
        }
        snapshot
    }

    /// Inserts or replaces an endpoint (and its metrics).
    pub fn upsert(&mut self, state: EndpointState) {
        match self.index_by_id.get(&state.id()) {
            Some(&index) => {
                let mut state = state;
                // A re-declared endpoint (new labels or name) is still the same server: keep
                // what was sent to it since its last scrape.
                if let Some(previous) = self.endpoints.get(index as usize) {
                    state.endpoint.share_dispatches_of(&previous.endpoint);
                }
                self.endpoints[index as usize] = state;
            }
            None => {
                self.membership = self.membership.wrapping_add(1);
                let index = u32::try_from(self.endpoints.len()).unwrap_or(u32::MAX);
                self.index_by_id.insert(state.id(), index);
                self.endpoints.push(state);
            }
        }
    }

    /// Removes an endpoint; returns whether it was present.
    pub fn remove(&mut self, id: EndpointId) -> bool {
        let Some(index) = self.index_by_id.remove(&id) else {
            return false;
        };
        self.membership = self.membership.wrapping_add(1);
        self.endpoints.swap_remove(index as usize);
        if let Some(moved) = self.endpoints.get(index as usize) {
            self.index_by_id.insert(moved.id(), index);
        }
        true
    }

    /// Replaces the metrics of an endpoint; returns whether it was present.
    pub fn set_metrics(&mut self, id: EndpointId, metrics: EndpointMetrics) -> bool {
        match self.index_by_id.get(&id) {
            Some(&index) => {
                self.endpoints[index as usize].metrics = metrics;
                true
            }
            None => false,
        }
    }

    /// All endpoints, in a stable order within this snapshot.
    pub fn endpoints(&self) -> &[EndpointState] {
        &self.endpoints
    }

    /// The endpoint at `index` in [`Self::endpoints`].
    pub fn get(&self, index: u32) -> Option<&EndpointState> {
        self.endpoints.get(index as usize)
    }

    /// The endpoint with `id`.
    pub fn by_id(&self, id: EndpointId) -> Option<&EndpointState> {
        self.index_of(id).and_then(|index| self.get(index))
    }

    /// The position of `id` in [`Self::endpoints`].
    pub fn index_of(&self, id: EndpointId) -> Option<u32> {
        self.index_by_id.get(&id).copied()
    }

    /// How many endpoints the pool has.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Whether the pool has no endpoints.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// A counter that [`SharedPool`] bumps on every publish, for logs and tests.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A counter that changes whenever the set of endpoint ids changes (an endpoint added or
    /// removed); metrics updates and re-declarations leave it alone. Snapshots of one
    /// [`SharedPool`] with equal values hold the same endpoints.
    pub fn membership(&self) -> u64 {
        self.membership
    }

    /// The staleness policy of the pool; `None` when nothing tracks metric freshness (no
    /// endpoint is then ever stale for routing or readiness). See [`StalenessPolicy`].
    pub fn staleness(&self) -> Option<&StalenessPolicy> {
        self.staleness.as_ref()
    }

    /// Sets the staleness policy (for a snapshot used on its own; a [`SharedPool`] keeps its
    /// own, see [`SharedPool::set_staleness`]).
    pub fn with_staleness(mut self, staleness: Option<StalenessPolicy>) -> Self {
        self.staleness = staleness;
        self
    }

    /// Whether `state` has fresh metrics at `now` under the pool's policy
    /// (always, without a policy).
    pub fn is_fresh(&self, state: &EndpointState, now: Instant) -> bool {
        self.staleness.is_none_or(|policy| policy.is_fresh(&state.metrics, now))
    }

    /// Whether a request arriving at `now` could be routed: some endpoint is known and, when
    /// the policy fails closed, some endpoint is fresh. What readiness reports.
    pub fn can_route(&self, now: Instant) -> bool {
        match &self.staleness {
            _ if self.is_empty() => false,
            None => true,
            Some(policy) if policy.fails_open() => true,
            Some(policy) => self.endpoints.iter().any(|state| policy.is_fresh(&state.metrics, now)),
        }
    }

    /// Whether both snapshots hold exactly the same endpoint ids.
    fn same_endpoints(&self, other: &PoolSnapshot) -> bool {
        self.len() == other.len()
            && self.endpoints.iter().all(|state| other.index_of(state.id()).is_some())
    }
}

/// The current [`PoolSnapshot`], shared between one or more writers and many readers.
///
/// Writers may also tell [`PoolObserver`]s when the set of endpoints changes, on the writer's
/// own thread: per-endpoint state elsewhere (a prefix index) then follows the pool without
/// any check on the request path.
#[derive(Debug, Default)]
pub struct SharedPool {
    current: ArcSwap<PoolSnapshot>,
    observers: RwLock<Vec<Arc<dyn PoolObserver>>>,
}

impl SharedPool {
    /// A pool that starts with `snapshot`.
    pub fn new(snapshot: PoolSnapshot) -> Self {
        Self { current: ArcSwap::from_pointee(snapshot), observers: RwLock::default() }
    }

    /// The current snapshot; cheap, lock-free, and stable for as long as it is held.
    pub fn load(&self) -> Arc<PoolSnapshot> {
        self.current.load_full()
    }

    /// Tells `observer` of every later change in the set of endpoints.
    pub fn subscribe(&self, observer: Arc<dyn PoolObserver>) {
        self.observers.write().push(observer);
    }

    /// Sets the staleness policy every later snapshot carries (see [`StalenessPolicy`]).
    pub fn set_staleness(&self, staleness: Option<StalenessPolicy>) {
        self.update(|snapshot| snapshot.staleness = staleness);
    }

    /// Publishes `snapshot` as the current one. The pool's staleness policy is kept: it
    /// changes through [`Self::set_staleness`] only.
    pub fn publish(&self, mut snapshot: PoolSnapshot) {
        let previous = self.current.load_full();
        snapshot.generation = previous.generation.wrapping_add(1);
        snapshot.staleness = previous.staleness;
        snapshot.membership = if snapshot.same_endpoints(&previous) {
            previous.membership
        } else {
            previous.membership.wrapping_add(1)
        };
        let next = Arc::new(snapshot);
        let previous = self.current.swap(Arc::clone(&next));
        self.notify_if_membership_moved(&previous, &next);
    }

    /// Applies `change` to a copy of the current snapshot and publishes the result.
    ///
    /// Concurrent updaters retry on conflict, so no update is lost.
    pub fn update(&self, mut change: impl FnMut(&mut PoolSnapshot)) {
        let previous = self.current.rcu(|current| {
            let mut next = PoolSnapshot::clone(current);
            change(&mut next);
            next.generation = current.generation.wrapping_add(1);
            next
        });
        let next = self.current.load_full();
        self.notify_if_membership_moved(&previous, &next);
    }

    fn notify_if_membership_moved(&self, previous: &PoolSnapshot, next: &PoolSnapshot) {
        if previous.membership != next.membership {
            for observer in self.observers.read().iter() {
                observer.membership_changed(next);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::endpoint::Endpoint;

    fn state(port: u16) -> EndpointState {
        EndpointState::new(Endpoint::new(([10, 0, 0, 1], port).into()))
    }

    #[test]
    fn upsert_remove_keep_the_index_consistent() {
        let mut pool = PoolSnapshot::new([state(1), state(2), state(3)]);
        let first = pool.endpoints()[0].id();
        assert!(pool.remove(first));
        assert!(!pool.remove(first));
        assert_eq!(pool.len(), 2);
        for (index, endpoint) in pool.endpoints().iter().enumerate() {
            assert_eq!(pool.index_of(endpoint.id()), Some(index as u32));
        }
        pool.upsert(state(2));
        assert_eq!(pool.len(), 2, "upsert of a known id replaces it");
    }

    #[test]
    fn a_re_declared_endpoint_keeps_what_was_sent_to_it() {
        let mut pool = PoolSnapshot::new([state(1)]);
        pool.endpoints()[0].endpoint.dispatches().record(std::time::Instant::now(), 10);
        pool.upsert(EndpointState::new(
            Endpoint::new(([10, 0, 0, 1], 1).into()).with_label("tier", "gold"),
        ));
        assert_eq!(pool.endpoints()[0].endpoint.dispatches().pending_since(None).requests, 1);
        assert_eq!(pool.endpoints()[0].endpoint.labels.len(), 1, "the new declaration wins");
    }

    #[test]
    fn membership_moves_with_the_set_of_endpoints_only() {
        let shared = SharedPool::new(PoolSnapshot::new([state(1)]));
        let before = shared.load().membership();
        shared.update(|pool| {
            pool.set_metrics(pool.endpoints()[0].id(), EndpointMetrics::default());
            pool.upsert(state(1));
        });
        assert_eq!(shared.load().membership(), before, "metrics and re-declarations");
        shared.update(|pool| pool.upsert(state(2)));
        let added = shared.load().membership();
        assert_ne!(added, before);
        shared.update(|pool| {
            pool.remove(EndpointId::from_address(([10, 0, 0, 1], 2).into()));
        });
        assert_ne!(shared.load().membership(), added);
        let removed = shared.load().membership();
        shared.publish(PoolSnapshot::new([state(1)]));
        assert_eq!(shared.load().membership(), removed, "a whole snapshot of the same endpoints");
        shared.publish(PoolSnapshot::new([state(3)]));
        assert_ne!(shared.load().membership(), removed, "a whole snapshot of other endpoints");
    }

    #[derive(Debug, Default)]
    struct Recorder(parking_lot::Mutex<Vec<Vec<u16>>>);

    impl PoolObserver for Recorder {
        fn membership_changed(&self, pool: &PoolSnapshot) {
            let ports = pool.endpoints().iter().map(|s| s.endpoint.address.port()).collect();
            self.0.lock().push(ports);
        }
    }

    #[test]
    fn observers_hear_of_membership_changes_only() {
        let shared = SharedPool::new(PoolSnapshot::new([state(1)]));
        let recorder = Arc::new(Recorder::default());
        shared.subscribe(recorder.clone());
        shared.update(|pool| {
            pool.set_metrics(pool.endpoints()[0].id(), EndpointMetrics::default());
        });
        shared.publish(PoolSnapshot::new([state(1)]));
        assert!(recorder.0.lock().is_empty(), "metrics and identical snapshots say nothing");
        shared.update(|pool| pool.upsert(state(2)));
        shared.update(|pool| {
            pool.remove(EndpointId::from_address(([10, 0, 0, 1], 1).into()));
        });
        shared.publish(PoolSnapshot::new([state(3)]));
        assert_eq!(*recorder.0.lock(), vec![vec![1, 2], vec![2], vec![3]]);
    }

    #[test]
    fn the_staleness_policy_follows_the_shared_pool_and_decides_readiness() {
        use crate::pool::staleness::{AllStale, StalenessPolicy};
        let now = Instant::now();
        let shared = SharedPool::default();
        assert!(!shared.load().can_route(now), "no endpoint");
        shared.publish(PoolSnapshot::new([state(1)]));
        assert!(shared.load().can_route(now), "no policy: a known endpoint is enough");
        let policy = StalenessPolicy::new(std::time::Duration::from_secs(1));
        shared.set_staleness(Some(policy));
        shared.publish(PoolSnapshot::new([state(1)]));
        assert_eq!(shared.load().staleness(), Some(&policy), "publish keeps the policy");
        assert!(shared.load().can_route(now), "never scraped, failing open");
        shared.set_staleness(Some(policy.when_all_stale(AllStale::FailClosed)));
        assert!(!shared.load().can_route(now), "never scraped, failing closed");
        shared.update(|pool| {
            let id = pool.endpoints()[0].id();
            pool.set_metrics(id, EndpointMetrics { updated_at: Some(now), ..Default::default() });
        });
        assert!(shared.load().can_route(now), "fresh");
        assert!(!shared.load().can_route(now + std::time::Duration::from_secs(2)), "stale again");
    }

    #[test]
    fn updates_publish_new_generations() {
        let shared = SharedPool::new(PoolSnapshot::new([state(1)]));
        let before = shared.load();
        shared.update(|pool| pool.upsert(state(2)));
        assert_eq!(before.len(), 1, "a held snapshot never changes");
        assert_eq!(shared.load().len(), 2);
        assert_eq!(shared.load().generation(), before.generation() + 1);
    }
}
