//! `lora-affinity-filter`: narrows to endpoints that hold the request's adapter, or can load it.
//!
//! The candidates split into an affinity group (adapter active or waiting there) and an
//! available group (a free adapter slot). With probability `threshold` (default 0.999, GIE's)
//! the affinity group is kept when it is non-empty; otherwise the available group, so adapters
//! still spread to new servers under load. When both groups are empty nothing is removed: the
//! filter steers, it never fails a request that some endpoint could serve after a swap.

use rand::Rng;
use scheduler_core::{CycleState, Filter, InferenceRequest, PluginError, PoolSnapshot};
use serde::Deserialize;

/// GIE type name.
pub const TYPE_NAME: &str = "lora-affinity-filter";

/// Parameters of [`LoraAffinityFilter`].
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoraAffinityParameters {
    /// Probability of keeping the affinity group when both groups are non-empty.
    #[serde(default = "default_threshold")]
    pub threshold: f64,
}

impl Default for LoraAffinityParameters {
    fn default() -> Self {
        Self { threshold: default_threshold() }
    }
}

fn default_threshold() -> f64 {
    0.999
}

/// Steers requests to endpoints with adapter affinity.
#[derive(Clone, Copy, Debug)]
pub struct LoraAffinityFilter {
    threshold: f64,
}

impl LoraAffinityFilter {
    /// A filter with `parameters`; the threshold must be in `[0, 1]`.
    pub fn new(parameters: LoraAffinityParameters) -> Result<Self, PluginError> {
        if !(0.0..=1.0).contains(&parameters.threshold) {
            return Err(PluginError::InvalidParameters(format!(
                "'threshold' must be in [0, 1], got {}",
                parameters.threshold
            )));
        }
        Ok(Self { threshold: parameters.threshold })
    }
}

impl Filter for LoraAffinityFilter {
    fn filter(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        pool: &PoolSnapshot,
        candidates: &mut Vec<u32>,
    ) {
        let adapter = request.target_model.as_str();
        let has_affinity = |index: u32| {
            pool.get(index).is_some_and(|s| {
                s.metrics.has_active_adapter(adapter) || s.metrics.has_waiting_adapter(adapter)
            })
        };
        let has_slot =
            |index: u32| pool.get(index).is_some_and(|s| s.metrics.has_free_adapter_slot());
        let any_affinity = candidates.iter().any(|&i| has_affinity(i));
        let any_slot = candidates.iter().any(|&i| has_slot(i));
        let keep_affinity =
            any_affinity && (!any_slot || state.rng().random::<f64>() < self.threshold);
        if keep_affinity {
            candidates.retain(|&i| has_affinity(i));
        } else if any_slot {
            candidates.retain(|&i| has_slot(i));
        }
    }
}
