//! Per-decision state: the clock reading, the random source, and the scratch space every
//! plugin of the decision shares.
//!
//! All per-request scratch lives here, in one place: the scheduler's own buffers (candidate
//! positions, scores, picks) and the typed values plugins keep (a prompt's block hashes, a
//! lookup's buffers). The scheduler recycles the scratch of one decision into the next on the
//! same thread, so once warm a decision allocates nothing per endpoint.

use std::any::{Any, TypeId};
use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::SmallRng;

/// State that lives for one scheduling decision.
///
/// Plugins read the decision time from [`CycleState::now`] instead of the clock, and draw
/// randomness from [`CycleState::rng`], so a decision replays exactly from its seed.
pub struct CycleState {
    now: Instant,
    rng: SmallRng,
    scratch: Scratch,
}

/// Scratch space carried from one decision to the next on a thread.
#[derive(Default)]
pub(crate) struct Scratch {
    /// Bumped for every decision that uses this scratch.
    stamp: u64,
    pub(crate) buffers: ProfileBuffers,
    values: Vec<(TypeId, Box<dyn Any + Send>)>,
}

/// The scheduler's reusable buffers, so a decision allocates nothing per endpoint.
#[derive(Default)]
pub(crate) struct ProfileBuffers {
    /// Pool positions every profile starts from (the pool, or the subset hint).
    pub(crate) base: Vec<u32>,
    pub(crate) candidates: Vec<u32>,
    pub(crate) scores: Vec<f64>,
    pub(crate) totals: Vec<f64>,
    pub(crate) picked: Vec<u32>,
    pub(crate) next_profiles: Vec<usize>,
}

impl CycleState {
    /// A context for a decision taken at `now` with randomness from `seed`, with fresh scratch.
    pub fn new(now: Instant, seed: u64) -> Self {
        Self::with_scratch(now, seed, Scratch::default())
    }

    /// A context reusing the scratch of an earlier decision.
    pub(crate) fn with_scratch(now: Instant, seed: u64, mut scratch: Scratch) -> Self {
        scratch.stamp = scratch.stamp.wrapping_add(1);
        Self { now, rng: SmallRng::seed_from_u64(seed), scratch }
    }

    /// Ends the decision, handing its scratch on to the next one.
    pub(crate) fn into_scratch(self) -> Scratch {
        self.scratch
    }

    pub(crate) fn take_buffers(&mut self) -> ProfileBuffers {
        std::mem::take(&mut self.scratch.buffers)
    }

    pub(crate) fn restore_buffers(&mut self, buffers: ProfileBuffers) {
        self.scratch.buffers = buffers;
    }

    /// The time of the decision.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// The decision's random source (deterministic for a given seed).
    pub fn rng(&mut self) -> &mut SmallRng {
        &mut self.rng
    }

    /// A stamp that differs between the decisions sharing this state's scratch values. A
    /// plugin that computes a value once per decision (the prompt's block hashes) stores the
    /// stamp beside it, and recomputes when the stamp it finds is not the current one.
    pub fn decision_stamp(&self) -> u64 {
        self.scratch.stamp
    }

    /// The scratch value of type `T`, created with `T::default()` the first time a decision on
    /// this thread asks for it and kept for later decisions, so its buffers are allocated once.
    /// It holds whatever the last user left in it: compare [`Self::decision_stamp`] to know
    /// whether it was filled for this decision.
    pub fn scratch<T: Any + Send + Default>(&mut self) -> &mut T {
        let wanted = TypeId::of::<T>();
        let values = &mut self.scratch.values;
        let position = match values.iter().position(|(id, _)| *id == wanted) {
            Some(position) => position,
            None => {
                values.push((wanted, Box::<T>::default()));
                values.len() - 1
            }
        };
        match values[position].1.downcast_mut::<T>() {
            Some(value) => value,
            // The TypeId key guarantees the downcast; reaching here is a bug in this module.
            None => unreachable!("scratch entry keyed by TypeId holds another type"),
        }
    }
}

/// The text values data producers publish for one decision, each under its data key (llm-d's
/// request attribute store, keyed `<data type>/<producer name>`).
#[derive(Default)]
struct RequestAttributes {
    /// The decision the entries belong to.
    stamp: u64,
    entries: Vec<(String, String)>,
}

impl CycleState {
    /// Publishes `value` under `key` for the rest of this decision (its filters, scorers and
    /// pre-request hooks), replacing an earlier value of the same key.
    pub fn put_request_attribute(&mut self, key: &str, value: &str) {
        let stamp = self.scratch.stamp;
        let attributes = self.scratch::<RequestAttributes>();
        if attributes.stamp != stamp {
            attributes.stamp = stamp;
            attributes.entries.clear();
        }
        match attributes.entries.iter_mut().find(|(name, _)| name == key) {
            Some((_, old)) => {
                old.clear();
                old.push_str(value);
            }
            None => attributes.entries.push((key.to_owned(), value.to_owned())),
        }
    }

    /// The value published under `key` during this decision, if any.
    pub fn request_attribute(&mut self, key: &str) -> Option<&str> {
        let stamp = self.scratch.stamp;
        let attributes = self.scratch::<RequestAttributes>();
        if attributes.stamp != stamp {
            return None;
        }
        attributes.entries.iter().find(|(name, _)| name == key).map(|(_, value)| value.as_str())
    }
}

impl std::fmt::Debug for CycleState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CycleState")
            .field("now", &self.now)
            .field("decision_stamp", &self.scratch.stamp)
            .field("scratch_values", &self.scratch.values.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn scratch_values_outlive_the_decision_and_stamps_tell_decisions_apart() {
        let mut state = CycleState::new(Instant::now(), 1);
        let first = state.decision_stamp();
        state.scratch::<Vec<u64>>().extend([1, 2, 3]);
        state.scratch::<String>().push('x');
        assert_eq!(state.scratch::<Vec<u64>>(), &vec![1, 2, 3], "one value per type");

        let mut next = CycleState::with_scratch(Instant::now(), 2, state.into_scratch());
        assert_ne!(next.decision_stamp(), first);
        let kept = next.scratch::<Vec<u64>>();
        assert_eq!(kept, &vec![1, 2, 3], "the next decision on the thread reuses the value");
        assert_eq!(next.scratch::<String>(), "x");
    }

    #[test]
    fn request_attributes_last_one_decision() {
        let mut state = CycleState::new(Instant::now(), 1);
        assert_eq!(state.request_attribute("SessionIDDataKey/p"), None);
        state.put_request_attribute("SessionIDDataKey/p", "a");
        state.put_request_attribute("SessionIDDataKey/p", "b");
        state.put_request_attribute("other/q", "c");
        assert_eq!(state.request_attribute("SessionIDDataKey/p"), Some("b"));
        assert_eq!(state.request_attribute("other/q"), Some("c"));
        let mut next = CycleState::with_scratch(Instant::now(), 2, state.into_scratch());
        assert_eq!(next.request_attribute("SessionIDDataKey/p"), None, "not carried over");
    }

    #[test]
    fn same_seed_same_draws() {
        let now = Instant::now();
        let draws = |seed| {
            let mut state = CycleState::new(now, seed);
            (0..4).map(|_| state.rng().random::<u64>()).collect::<Vec<_>>()
        };
        assert_eq!(draws(3), draws(3));
        assert_ne!(draws(3), draws(4));
    }
}
