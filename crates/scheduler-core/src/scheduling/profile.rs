//! A scheduling profile: filters, then weighted scorers, then a picker.

use std::sync::Arc;

use crate::pool::PoolSnapshot;
use crate::request::InferenceRequest;
use crate::scheduling::cycle::{CycleState, ProfileBuffers};
use crate::scheduling::plugin::{Candidates, Filter, Picker, Scorer};
use crate::scheduling::result::SchedulingError;

/// A scorer and the weight of its score in the profile's total.
#[derive(Clone, Debug)]
pub struct WeightedScorer {
    /// The plugin's name in the config.
    pub name: Arc<str>,
    /// Non-negative, finite weight.
    pub weight: f64,
    /// The scorer.
    pub scorer: Arc<dyn Scorer>,
}

/// One named pipeline of filters, weighted scorers and a picker.
#[derive(Clone, Debug)]
pub struct SchedulerProfile {
    name: Arc<str>,
    filters: Vec<(Arc<str>, Arc<dyn Filter>)>,
    scorers: Vec<WeightedScorer>,
    picker: (Arc<str>, Arc<dyn Picker>),
}

/// Per-scorer scores of one profile run, for explaining a decision.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileExplanation {
    /// The profile.
    pub profile: Arc<str>,
    /// Candidates left after the filters, as pool positions.
    pub candidates: Vec<u32>,
    /// Each scorer's name, weight and per-candidate scores (aligned with `candidates`).
    pub scorers: Vec<(Arc<str>, f64, Vec<f64>)>,
    /// The weighted totals (aligned with `candidates`).
    pub totals: Vec<f64>,
}

impl SchedulerProfile {
    /// A profile named `name` that picks with `picker`.
    pub fn new(
        name: impl Into<Arc<str>>,
        picker_name: impl Into<Arc<str>>,
        picker: Arc<dyn Picker>,
    ) -> Self {
        Self {
            name: name.into(),
            filters: Vec::new(),
            scorers: Vec::new(),
            picker: (picker_name.into(), picker),
        }
    }

    /// Appends a filter; filters run in the order added.
    pub fn with_filter(mut self, name: impl Into<Arc<str>>, filter: Arc<dyn Filter>) -> Self {
        self.filters.push((name.into(), filter));
        self
    }

    /// Appends a scorer with `weight` (negative or non-finite weights count as 0).
    pub fn with_scorer(
        mut self,
        name: impl Into<Arc<str>>,
        weight: f64,
        scorer: Arc<dyn Scorer>,
    ) -> Self {
        let weight = if weight.is_finite() && weight > 0.0 { weight } else { 0.0 };
        self.scorers.push(WeightedScorer { name: name.into(), weight, scorer });
        self
    }

    /// The profile's name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The filters, in order.
    pub fn filters(&self) -> impl Iterator<Item = &str> {
        self.filters.iter().map(|(name, _)| &**name)
    }

    /// The weighted scorers.
    pub fn scorers(&self) -> &[WeightedScorer] {
        &self.scorers
    }

    /// The picker's name.
    pub fn picker_name(&self) -> &str {
        &self.picker.0
    }

    /// Narrows `candidates` (pool positions) with the profile's filters, in order; fails
    /// naming the filter that left none.
    pub(crate) fn run_filters(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        pool: &PoolSnapshot,
        candidates: &mut Vec<u32>,
    ) -> Result<(), SchedulingError> {
        for (filter_name, filter) in &self.filters {
            filter.filter(state, request, pool, candidates);
            // A filter must only narrow; anything it added that is not in the pool is dropped.
            candidates.retain(|&index| (index as usize) < pool.len());
            if candidates.is_empty() {
                return Err(SchedulingError::NoCandidates {
                    profile: self.name.clone(),
                    filter: filter_name.clone(),
                });
            }
        }
        Ok(())
    }

    /// Runs the profile over `buffers.base` (pool positions) and returns the picked pool
    /// positions, best first.
    pub(crate) fn run(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        pool: &PoolSnapshot,
        buffers: &mut ProfileBuffers,
        explanation: Option<&mut Vec<ProfileExplanation>>,
    ) -> Result<(Vec<u32>, Vec<f64>), SchedulingError> {
        let candidates = &mut buffers.candidates;
        candidates.clear();
        candidates.extend_from_slice(&buffers.base);
        self.run_filters(state, request, pool, candidates)?;

        let count = candidates.len();
        let totals = &mut buffers.totals;
        totals.clear();
        totals.resize(count, 0.0);
        let mut explained = explanation.is_some().then(|| ProfileExplanation {
            profile: self.name.clone(),
            candidates: candidates.clone(),
            scorers: Vec::with_capacity(self.scorers.len()),
            totals: Vec::new(),
        });
        for weighted in &self.scorers {
            let scores = &mut buffers.scores;
            scores.clear();
            scores.resize(count, 0.0);
            weighted.scorer.score(state, request, Candidates::new(pool, candidates), scores);
            for (total, score) in totals.iter_mut().zip(scores.iter_mut()) {
                *score = if score.is_nan() { 0.0 } else { score.clamp(0.0, 1.0) };
                *total += weighted.weight * *score;
            }
            if let Some(explained) = explained.as_mut() {
                explained.scorers.push((weighted.name.clone(), weighted.weight, scores.clone()));
            }
        }

        let picked = &mut buffers.picked;
        picked.clear();
        self.picker.1.pick(state, Candidates::new(pool, candidates), totals, picked);
        let mut chosen = Vec::with_capacity(picked.len());
        let mut chosen_scores = Vec::with_capacity(picked.len());
        for &position in picked.iter() {
            if let Some(&index) = candidates.get(position as usize)
                && !chosen.contains(&index)
            {
                chosen.push(index);
                chosen_scores.push(totals[position as usize]);
            }
        }
        if let (Some(explanation), Some(mut explained)) = (explanation, explained) {
            explained.totals = totals.clone();
            explanation.push(explained);
        }
        if chosen.is_empty() {
            return Err(SchedulingError::PickerChoseNone {
                profile: self.name.clone(),
                picker: self.picker.0.clone(),
            });
        }
        Ok((chosen, chosen_scores))
    }
}
