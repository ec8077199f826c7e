//! `utilization-filter`: drops endpoints whose load exceeds configured caps.
//!
//! Matches llm-d-router's `utilization` filter: each of `conditions` caps one metric
//! (`metric`, `maxValue`); an endpoint is kept only when no condition's metric exceeds its
//! cap (`value > maxValue` drops it). Metrics: `active-requests` (the requests this picker has
//! in flight on the endpoint, from an `inflight-load-producer`, [`crate::inflight_load`]),
//! `running-requests`, `waiting-queue` (as the model server reports them) and
//! `kv-cache-utilization` (a fraction, so its cap is at most 1). When every candidate is
//! dropped and `fallbackOnEmpty` is true, all candidates are kept.
//!
//! `active-requests` reads the producer named `inFlightLoadProducerName`; without one, the
//! config's `inflight-load-producer` (created with default parameters when not declared, as
//! the Go loader creates its default producer). A name the config does not declare is
//! refused.

use std::sync::{Arc, OnceLock};

use scheduler_core::{
    BindPlugins, ConstructedPlugins, CycleState, EndpointState, Filter, InferenceRequest,
    PluginError, PoolSnapshot,
};
use serde::Deserialize;

use crate::inflight_load::{self, InFlightLoad};

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
    /// The in-flight load producer `active-requests` reads (default: `inflight-load-producer`).
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
    ActiveRequests,
    RunningRequests,
    WaitingQueue,
    KvCacheUtilization,
}

/// Keeps the endpoints within every cap.
#[derive(Debug)]
pub struct UtilizationFilter {
    caps: Vec<(Metric, f64)>,
    fallback_on_empty: bool,
    /// The producer `active-requests` reads, named when a condition uses it.
    producer_name: Option<String>,
    producer: OnceLock<Arc<InFlightLoad>>,
}

impl UtilizationFilter {
    /// A filter for `parameters`; refuses an empty condition list, unknown metrics, missing,
    /// negative or (for `kv-cache-utilization`) above-1 caps.
    pub fn new(parameters: UtilizationFilterParameters) -> Result<Self, PluginError> {
        let invalid = |message: String| PluginError::InvalidParameters(message);
        if parameters.conditions.is_empty() {
            return Err(invalid("'conditions' needs at least one condition".into()));
        }
        let mut caps = Vec::with_capacity(parameters.conditions.len());
        for (index, condition) in parameters.conditions.iter().enumerate() {
            let metric = match condition.metric.as_str() {
                "running-requests" => Metric::RunningRequests,
                "waiting-queue" => Metric::WaitingQueue,
                "kv-cache-utilization" => Metric::KvCacheUtilization,
                "active-requests" => Metric::ActiveRequests,
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
        let producer_name =
            caps.iter().any(|(metric, _)| *metric == Metric::ActiveRequests).then(|| {
                match parameters.in_flight_load_producer_name.trim() {
                    "" => inflight_load::TYPE_NAME.to_owned(),
                    name => name.to_owned(),
                }
            });
        Ok(Self {
            caps,
            fallback_on_empty: parameters.fallback_on_empty,
            producer_name,
            producer: OnceLock::new(),
        })
    }

    /// The default producer this filter needs created when the config declares none: the
    /// `inflight-load-producer` when `active-requests` reads it under its default name.
    pub fn default_producers(&self) -> Vec<&'static str> {
        match &self.producer_name {
            Some(name) if name == inflight_load::TYPE_NAME => vec![inflight_load::TYPE_NAME],
            _ => Vec::new(),
        }
    }

    fn value(&self, metric: Metric, state: &EndpointState) -> f64 {
        match metric {
            // An endpoint the producer has not seen has nothing in flight.
            Metric::ActiveRequests => {
                self.producer.get().map_or(0.0, |producer| producer.requests(state.id()) as f64)
            }
            Metric::RunningRequests => f64::from(state.metrics.running),
            Metric::WaitingQueue => f64::from(state.metrics.waiting_queue),
            Metric::KvCacheUtilization => state.metrics.kv_usage,
        }
    }

    fn within_caps(&self, state: &EndpointState) -> bool {
        self.caps.iter().all(|&(metric, max_value)| self.value(metric, state) <= max_value)
    }
}

impl BindPlugins for UtilizationFilter {
    fn bind(&self, plugins: &ConstructedPlugins) -> Result<(), PluginError> {
        if let Some(name) = &self.producer_name {
            let _ = self.producer.set(inflight_load::named(plugins, name)?);
        }
        Ok(())
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
