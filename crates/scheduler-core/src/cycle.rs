//! Per-request scheduling context: the clock reading, the random source and scratch values
//! that plugins compute once and share (for example the prompt's block hashes).

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
    scratch: Vec<(TypeId, Box<dyn Any + Send>)>,
}

impl CycleState {
    /// A context for a decision taken at `now` with randomness from `seed`.
    pub fn new(now: Instant, seed: u64) -> Self {
        Self { now, rng: SmallRng::seed_from_u64(seed), scratch: Vec::new() }
    }

    /// The time of the decision.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// The decision's random source (deterministic for a given seed).
    pub fn rng(&mut self) -> &mut SmallRng {
        &mut self.rng
    }

    /// The shared value of type `T`, if a plugin stored one.
    pub fn get<T: Any + Send>(&self) -> Option<&T> {
        let wanted = TypeId::of::<T>();
        self.scratch
            .iter()
            .find(|(id, _)| *id == wanted)
            .and_then(|(_, value)| value.downcast_ref::<T>())
    }

    /// The shared value of type `T`, computed by `init` the first time it is asked for.
    pub fn get_or_insert_with<T: Any + Send>(&mut self, init: impl FnOnce() -> T) -> &mut T {
        let wanted = TypeId::of::<T>();
        let position = match self.scratch.iter().position(|(id, _)| *id == wanted) {
            Some(position) => position,
            None => {
                self.scratch.push((wanted, Box::new(init())));
                self.scratch.len() - 1
            }
        };
        match self.scratch[position].1.downcast_mut::<T>() {
            Some(value) => value,
            // The TypeId key guarantees the downcast; reaching here is a bug in this module.
            None => unreachable!("scratch entry keyed by TypeId holds another type"),
        }
    }

    /// Stores `value`, replacing any earlier value of the same type.
    pub fn insert<T: Any + Send>(&mut self, value: T) {
        let wanted = TypeId::of::<T>();
        match self.scratch.iter_mut().find(|(id, _)| *id == wanted) {
            Some(entry) => entry.1 = Box::new(value),
            None => self.scratch.push((wanted, Box::new(value))),
        }
    }
}

impl std::fmt::Debug for CycleState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CycleState")
            .field("now", &self.now)
            .field("scratch_values", &self.scratch.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn scratch_is_computed_once_and_shared() {
        let mut state = CycleState::new(Instant::now(), 1);
        let mut calls = 0;
        *state.get_or_insert_with(|| {
            calls += 1;
            vec![1u64, 2]
        }) = vec![7];
        state.get_or_insert_with(|| {
            calls += 1;
            vec![0u64]
        });
        assert_eq!(calls, 1);
        assert_eq!(state.get::<Vec<u64>>(), Some(&vec![7]));
        state.insert(vec![9u64]);
        assert_eq!(state.get::<Vec<u64>>(), Some(&vec![9]));
        assert_eq!(state.get::<String>(), None);
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
