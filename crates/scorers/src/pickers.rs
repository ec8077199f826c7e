//! Pickers: `max-score-picker`, `random-picker` and `weighted-random-picker`.
//!
//! Each returns up to `maxNumOfEndpoints` (default 1) distinct candidates, best first; the
//! ones after the first are the fallbacks an adapter may emit. Randomness comes from the
//! decision's seeded [`CycleState::rng`], so a decision replays exactly from its seed.
//!
//! - max-score: highest total first; ties in random order. One random salt per decision
//!   orders equal scores by a hash of (position, salt), so the top k are selected in O(n) and
//!   sorted in O(k log k) with no per-candidate random draw or buffer.
//! - random: k distinct candidates uniformly (partial Fisher-Yates).
//! - weighted-random: k distinct candidates with probability proportional to score,
//!   without replacement (Efraimidis-Spirakis: key = u^(1/w), keep the k largest keys);
//!   all-zero scores fall back to uniform.

use std::cmp::Ordering;
use std::num::NonZeroUsize;

use rand::Rng;
use scheduler_core::hash::mix64;
use scheduler_core::{Candidates, CycleState, Picker, PluginError, PluginSpec};
use serde::Deserialize;

/// GIE type name of [`MaxScorePicker`].
pub const MAX_SCORE_TYPE_NAME: &str = "max-score-picker";
/// GIE type name of [`RandomPicker`].
pub const RANDOM_TYPE_NAME: &str = "random-picker";
/// GIE type name of [`WeightedRandomPicker`].
pub const WEIGHTED_RANDOM_TYPE_NAME: &str = "weighted-random-picker";

/// Parameters shared by the pickers.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PickerParameters {
    /// How many endpoints to return: the primary plus fallbacks (default 1).
    #[serde(default)]
    pub max_num_of_endpoints: Option<usize>,
}

impl PickerParameters {
    /// Reads and validates the parameters of `spec`.
    pub fn from_spec(spec: &PluginSpec<'_>) -> Result<NonZeroUsize, PluginError> {
        let parameters: Self = spec.parameters()?;
        match parameters.max_num_of_endpoints {
            None => Ok(NonZeroUsize::MIN),
            Some(count) => NonZeroUsize::new(count).ok_or_else(|| {
                PluginError::InvalidParameters("'maxNumOfEndpoints' must be at least 1".into())
            }),
        }
    }
}

/// Picks the highest-scoring candidates, ties broken at random.
#[derive(Clone, Copy, Debug)]
pub struct MaxScorePicker {
    max_endpoints: NonZeroUsize,
}

impl MaxScorePicker {
    /// Returns up to `max_endpoints` candidates.
    pub fn new(max_endpoints: NonZeroUsize) -> Self {
        Self { max_endpoints }
    }
}

impl Default for MaxScorePicker {
    fn default() -> Self {
        Self::new(NonZeroUsize::MIN)
    }
}

/// Best first: higher score, then (among equal scores) a salted hash of the position.
fn by_score_then_salt(scores: &[f64], salt: u64) -> impl Fn(&u32, &u32) -> Ordering + '_ {
    move |a, b| {
        scores[*b as usize]
            .total_cmp(&scores[*a as usize])
            .then_with(|| tie_key(*a, salt).cmp(&tie_key(*b, salt)))
    }
}

/// A per-decision pseudo-random rank of a position.
fn tie_key(position: u32, salt: u64) -> u64 {
    mix64(u64::from(position) ^ salt)
}

impl Picker for MaxScorePicker {
    fn pick(
        &self,
        state: &mut CycleState,
        candidates: Candidates<'_>,
        scores: &[f64],
        picked: &mut Vec<u32>,
    ) {
        let count = candidates.len().min(scores.len());
        if count == 0 {
            return;
        }
        if self.max_endpoints.get() == 1 {
            // One pass, reservoir sampling among the ties: the common case allocates nothing
            // and touches no buffer.
            let mut best = 0usize;
            let mut ties = 1u32;
            for position in 1..count {
                match scores[position].total_cmp(&scores[best]) {
                    Ordering::Greater => {
                        best = position;
                        ties = 1;
                    }
                    Ordering::Equal => {
                        ties += 1;
                        if state.rng().random_range(0..ties) == 0 {
                            best = position;
                        }
                    }
                    Ordering::Less => {}
                }
            }
            picked.push(best as u32);
            return;
        }
        let keep = self.max_endpoints.get().min(count);
        let order = by_score_then_salt(scores, state.rng().random());
        picked.extend(0..count as u32);
        if keep < count {
            picked.select_nth_unstable_by(keep - 1, &order);
            picked.truncate(keep);
        }
        picked.sort_unstable_by(&order);
    }
}

/// Picks candidates uniformly at random, ignoring scores.
#[derive(Clone, Copy, Debug)]
pub struct RandomPicker {
    max_endpoints: NonZeroUsize,
}

impl RandomPicker {
    /// Returns up to `max_endpoints` candidates.
    pub fn new(max_endpoints: NonZeroUsize) -> Self {
        Self { max_endpoints }
    }
}

impl Picker for RandomPicker {
    fn pick(
        &self,
        state: &mut CycleState,
        candidates: Candidates<'_>,
        _scores: &[f64],
        picked: &mut Vec<u32>,
    ) {
        let count = candidates.len();
        let keep = self.max_endpoints.get().min(count);
        if keep == 1 {
            picked.push(state.rng().random_range(0..count as u32));
            return;
        }
        picked.extend(0..count as u32);
        for slot in 0..keep {
            let chosen = state.rng().random_range(slot..count);
            picked.swap(slot, chosen);
        }
        picked.truncate(keep);
    }
}

/// Picks candidates at random with probability proportional to their score.
#[derive(Clone, Copy, Debug)]
pub struct WeightedRandomPicker {
    max_endpoints: NonZeroUsize,
}

impl WeightedRandomPicker {
    /// Returns up to `max_endpoints` candidates.
    pub fn new(max_endpoints: NonZeroUsize) -> Self {
        Self { max_endpoints }
    }
}

impl Picker for WeightedRandomPicker {
    fn pick(
        &self,
        state: &mut CycleState,
        candidates: Candidates<'_>,
        scores: &[f64],
        picked: &mut Vec<u32>,
    ) {
        let count = candidates.len().min(scores.len());
        if count == 0 {
            return;
        }
        if !scores[..count].iter().any(|&score| score > 0.0) {
            return RandomPicker::new(self.max_endpoints).pick(state, candidates, scores, picked);
        }
        let keep = self.max_endpoints.get().min(count);
        // Keys live in log space (ln(u) / w) to stay finite for tiny weights; zero-weight
        // candidates get -inf and are only chosen once every positive one is.
        let mut keyed: Vec<(f64, u32)> = (0..count)
            .map(|position| {
                let weight = scores[position];
                let uniform: f64 = state.rng().random_range(f64::MIN_POSITIVE..1.0);
                let key = if weight > 0.0 { uniform.ln() / weight } else { f64::NEG_INFINITY };
                (key, position as u32)
            })
            .collect();
        let descending = |a: &(f64, u32), b: &(f64, u32)| b.0.total_cmp(&a.0);
        if keep < count {
            keyed.select_nth_unstable_by(keep - 1, descending);
            keyed.truncate(keep);
        }
        keyed.sort_unstable_by(descending);
        picked.extend(keyed.iter().map(|&(_, position)| position));
    }
}
