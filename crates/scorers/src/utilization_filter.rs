//! `utilization-filter`: drops endpoints whose load exceeds configured caps.
//!
//! Matches llm-d-router's `utilization` filter: each of `conditions` caps one metric
//! (`metric`, `maxValue`); an endpoint is kept only when no condition's metric exceeds its
//! cap (`value > maxValue` drops it). Metrics: `running-requests`, `waiting-queue` (as the
//! model server reports them) and `kv-cache-utilization` (a fraction, so its cap is at most
//! 1). When every candidate is dropped and `fallbackOnEmpty` is true, all candidates are kept.
//!
//! `active-requests` (the picker's own in-flight count, which llm-d-router reads from its
//! `inflight-load-producer`) is refused until that producer exists here, and so is
//! `inFlightLoadProducerName`, which only that metric reads.

use scheduler_core::{
    CycleState, EndpointState, Filter, InferenceRequest, PluginError, PoolSnapshot,
};
use serde::Deserialize;

/// llm-d type name.
pub const TYPE_NAME: &str = "utilization-filter";

/// The metric names llm-d-router accepts in a condition.
pub const METRICS: [&str; 4] =
    ["active-requests", "running-requests", "waiting-queue", "kv-cache-utilization"];

/// Parameters of [`UtilizationFilter`].
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UtilizationFilterParameters {
    /// The caps; at least one.
    #[serde(default)]
    pub conditions: Vec<ConditionParameters>,
    /// Keep every candidate when all would be dropped.
    #[serde(default)]
    pub fallback_on_empty: bool,
    /// The in-flight load producer `active-requests` reads (not supported yet).
    #[serde(default)]
    pub in_flight_load_producer_name: String,
}

/// One cap.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConditionParameters {
    /// One of [`METRICS`].
    #[serde(default)]
    pub metric: String,
    /// The largest value an endpoint may have and be kept (required, non-negative).
    pub max_value: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Metric {
    RunningRequests,
    WaitingQueue,
    KvCacheUtilization,
}

impl Metric {
    fn of(self, state: &EndpointState) -> f64 {
        match self {
            Metric::RunningRequests => f64::from(state.metrics.running),
            Metric::WaitingQueue => f64::from(state.metrics.waiting_queue),
            Metric::KvCacheUtilization => state.metrics.kv_usage,
        }
    }
}

/// Keeps the endpoints within every cap.
#[derive(Clone, Debug)]
pub struct UtilizationFilter {
    caps: Vec<(Metric, f64)>,
    fallback_on_empty: bool,
}

impl UtilizationFilter {
    /// A filter for `parameters`; refuses an empty condition list, unknown metrics, missing,
    /// negative or (for `kv-cache-utilization`) above-1 caps.
    pub fn new(parameters: UtilizationFilterParameters) -> Result<Self, PluginError> {
        let invalid = |message: String| PluginError::InvalidParameters(message);
        if parameters.conditions.is_empty() {
            return Err(invalid("'conditions' needs at least one condition".into()));
        }
        if !parameters.in_flight_load_producer_name.is_empty() {
            return Err(invalid(
                "'inFlightLoadProducerName': the inflight-load-producer is not supported yet"
                    .into(),
            ));
        }
        let mut caps = Vec::with_capacity(parameters.conditions.len());
        for (index, condition) in parameters.conditions.iter().enumerate() {
            let metric = match condition.metric.as_str() {
                "running-requests" => Metric::RunningRequests,
                "waiting-queue" => Metric::WaitingQueue,
                "kv-cache-utilization" => Metric::KvCacheUtilization,
                "active-requests" => {
                    return Err(invalid(format!(
                        "'conditions[{index}].metric': 'active-requests' needs the \
                         inflight-load-producer, which is not supported yet"
                    )));
                }
                other => {
                    return Err(invalid(format!(
                        "'conditions[{index}].metric' must be one of {METRICS:?}, got {other:?}"
                    )));
                }
            };
            let Some(max_value) = condition.max_value else {
                return Err(invalid(format!("'conditions[{index}].maxValue' is required")));
            };
            // NaN is refused with the negatives.
            if max_value.is_nan() || max_value < 0.0 {
                return Err(invalid(format!(
                    "'conditions[{index}].maxValue' must be non-negative, got {max_value}"
                )));
            }
            if metric == Metric::KvCacheUtilization && max_value > 1.0 {
                return Err(invalid(format!(
                    "'conditions[{index}].maxValue' of kv-cache-utilization is a fraction and \
                     must be at most 1, got {max_value}"
                )));
            }
            caps.push((metric, max_value));
        }
        Ok(Self { caps, fallback_on_empty: parameters.fallback_on_empty })
    }

    fn within_caps(&self, state: &EndpointState) -> bool {
        self.caps.iter().all(|(metric, max_value)| metric.of(state) <= *max_value)
    }
}

impl Filter for UtilizationFilter {
    fn filter(
        &self,
        _state: &mut CycleState,
        _request: &InferenceRequest,
        pool: &PoolSnapshot,
        candidates: &mut Vec<u32>,
    ) {
        let kept = candidates
            .iter()
            .filter(|&&index| pool.get(index).is_some_and(|state| self.within_caps(state)))
            .count();
        if kept == 0 && self.fallback_on_empty {
            return;
        }
        candidates.retain(|&index| pool.get(index).is_some_and(|state| self.within_caps(state)));
    }
}
