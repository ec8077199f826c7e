//! The multi-cluster plugin family (alpha in llm-d-router): an EPP whose endpoints are peer
//! clusters' gateways (from `multicluster-file-discovery`), each scored by the pool averages
//! its own EPP publishes, which `multicluster-metrics-extractor` reads into the endpoint
//! attributes `llm-d.ai/multicluster-kv-cache-utilization` and `llm-d.ai/multicluster-queue-size`.
//!
//! - `multicluster-kv-cache-utilization-scorer`: `1 - utilization`.
//! - `multicluster-queue-scorer`: queue sizes min-max normalized over the candidates, the
//!   shortest 1 and the longest 0; all equal score 1.
//!
//! A cluster without the attribute (not scraped yet, or its page lacks the metric) is left
//! unscored (0), as in llm-d. Both scorers need a declared `multicluster-metrics-extractor`,
//! and a config without one is refused when loaded, rather than scoring nothing.
//!
//! The family's other members behave exactly like the single-cluster plugins, since a
//! cluster is just an endpoint to them: `multicluster-session-affinity-filter`,
//! `multicluster-prefix-cache-scorer` and `multicluster-approx-prefix-cache-producer` are
//! registered under their own names with the same factories.

use std::sync::{Arc, OnceLock};

use scheduler_core::data_layer::plugins::{
    DataLayerPlugin, MULTICLUSTER_KV_CACHE_UTILIZATION_ATTRIBUTE,
    MULTICLUSTER_METRICS_EXTRACTOR_TYPE, MULTICLUSTER_QUEUE_SIZE_ATTRIBUTE,
};
use scheduler_core::{
    AttributeValues, BindPlugins, Candidates, ConstructedPlugins, CycleState, EndpointAttributes,
    InferenceRequest, PluginError, Scorer,
};

/// Type name of the KV-cache scorer over peer clusters.
pub const KV_CACHE_SCORER_TYPE_NAME: &str = "multicluster-kv-cache-utilization-scorer";
/// Type name of the queue scorer over peer clusters.
pub const QUEUE_SCORER_TYPE_NAME: &str = "multicluster-queue-scorer";
/// Type name of the session-affinity filter over peer clusters.
pub const SESSION_AFFINITY_FILTER_TYPE_NAME: &str = "multicluster-session-affinity-filter";
/// Type name of the prefix-cache scorer over peer clusters.
pub const PREFIX_CACHE_SCORER_TYPE_NAME: &str = "multicluster-prefix-cache-scorer";
/// Type name of the prefix-cache producer over peer clusters.
pub const PREFIX_CACHE_PRODUCER_TYPE_NAME: &str = "multicluster-approx-prefix-cache-producer";

/// The pool-average attribute a scorer reads, from every declared multi-cluster extractor.
#[derive(Debug)]
struct ClusterAttribute {
    scorer: &'static str,
    attribute: &'static str,
    extractors: OnceLock<Vec<Arc<EndpointAttributes>>>,
}

impl ClusterAttribute {
    const fn new(scorer: &'static str, attribute: &'static str) -> Self {
        Self { scorer, attribute, extractors: OnceLock::new() }
    }

    fn bind(&self, plugins: &ConstructedPlugins) -> Result<(), PluginError> {
        let extractors: Vec<Arc<EndpointAttributes>> = plugins
            .iter()
            .filter_map(|declared| match declared.plugin.data_layer.as_deref() {
                Some(DataLayerPlugin::ClusterMetricsExtractor(parameters)) => {
                    Some(Arc::clone(&parameters.attributes.0))
                }
                _ => None,
            })
            .collect();
        if extractors.is_empty() {
            return Err(PluginError::InvalidParameters(format!(
                "{} reads the attribute '{}', which only a declared '{}' publishes; declare one \
                 and bind it to a multicluster-metrics-data-source",
                self.scorer, self.attribute, MULTICLUSTER_METRICS_EXTRACTOR_TYPE
            )));
        }
        let _ = self.extractors.set(extractors);
        Ok(())
    }

    /// The values published, first extractor first (several are unusual: one per source).
    fn values(&self) -> Vec<Arc<AttributeValues>> {
        self.extractors
            .get()
            .map(|extractors| {
                extractors.iter().filter_map(|found| found.values(self.attribute)).collect()
            })
            .unwrap_or_default()
    }
}

/// How a scorer turns one peer's average into a score, given the candidates' range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Formula {
    /// `1 - value` (a utilization).
    OneMinus,
    /// Min-max inverted over the candidates; all equal score 1.
    InvertedRange,
}

impl Formula {
    fn score(self, value: f64, low: f64, high: f64) -> f64 {
        match self {
            Self::OneMinus => 1.0 - value,
            Self::InvertedRange if high == low => 1.0,
            Self::InvertedRange => (high - value) / (high - low),
        }
    }
}

/// A scorer over one pool average of the peer clusters:
/// `multicluster-kv-cache-utilization-scorer` or `multicluster-queue-scorer`.
#[derive(Debug)]
pub struct ClusterScorer {
    attribute: ClusterAttribute,
    formula: Formula,
}

impl ClusterScorer {
    /// `multicluster-kv-cache-utilization-scorer`, reading the multi-cluster extractors of the
    /// config it is bound in.
    pub const fn kv_cache() -> Self {
        Self {
            attribute: ClusterAttribute::new(
                KV_CACHE_SCORER_TYPE_NAME,
                MULTICLUSTER_KV_CACHE_UTILIZATION_ATTRIBUTE,
            ),
            formula: Formula::OneMinus,
        }
    }

    /// `multicluster-queue-scorer`, reading the multi-cluster extractors of the config it is
    /// bound in.
    pub const fn queue() -> Self {
        Self {
            attribute: ClusterAttribute::new(
                QUEUE_SCORER_TYPE_NAME,
                MULTICLUSTER_QUEUE_SIZE_ATTRIBUTE,
            ),
            formula: Formula::InvertedRange,
        }
    }
}

impl BindPlugins for ClusterScorer {
    fn bind(&self, plugins: &ConstructedPlugins) -> Result<(), PluginError> {
        self.attribute.bind(plugins)
    }
}

impl Scorer for ClusterScorer {
    fn score(
        &self,
        _state: &mut CycleState,
        _request: &InferenceRequest,
        candidates: Candidates<'_>,
        scores: &mut [f64],
    ) {
        let published = self.attribute.values();
        if published.is_empty() {
            return;
        }
        let value_of = |index: u32| {
            let id = candidates.pool().get(index)?.id();
            published.iter().find_map(|values| values.get(&id).copied()).filter(|v| v.is_finite())
        };
        let (low, high) = candidates
            .indices()
            .iter()
            .filter_map(|&index| value_of(index))
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(low, high), v| (low.min(v), high.max(v)));
        // Scores arrive zeroed: a peer without a value stays unscored.
        for (score, &index) in scores.iter_mut().zip(candidates.indices()) {
            if let Some(value) = value_of(index) {
                *score = self.formula.score(value, low, high).clamp(0.0, 1.0);
            }
        }
    }
}
