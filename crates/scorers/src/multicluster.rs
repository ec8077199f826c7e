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

/// Writes into `scores` (which arrive zeroed) `score_of(value)` for each candidate with a
/// value, with `(low, high)` the range of the candidates' values.
fn score_with(
    published: &[Arc<AttributeValues>],
    candidates: Candidates<'_>,
    scores: &mut [f64],
    score_of: impl Fn(f64, f64, f64) -> f64,
) {
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
    for (score, &index) in scores.iter_mut().zip(candidates.indices()) {
        if let Some(value) = value_of(index) {
            *score = score_of(value, low, high).clamp(0.0, 1.0);
        }
    }
}

/// `multicluster-kv-cache-utilization-scorer`.
#[derive(Debug)]
pub struct ClusterKvCacheScorer {
    attribute: ClusterAttribute,
}

impl Default for ClusterKvCacheScorer {
    fn default() -> Self {
        Self::new()
    }
}

impl ClusterKvCacheScorer {
    /// A scorer reading the multi-cluster extractors of the config it is bound in.
    pub const fn new() -> Self {
        Self {
            attribute: ClusterAttribute::new(
                KV_CACHE_SCORER_TYPE_NAME,
                MULTICLUSTER_KV_CACHE_UTILIZATION_ATTRIBUTE,
            ),
        }
    }
}

impl BindPlugins for ClusterKvCacheScorer {
    fn bind(&self, plugins: &ConstructedPlugins) -> Result<(), PluginError> {
        self.attribute.bind(plugins)
    }
}

impl Scorer for ClusterKvCacheScorer {
    fn score(
        &self,
        _state: &mut CycleState,
        _request: &InferenceRequest,
        candidates: Candidates<'_>,
        scores: &mut [f64],
    ) {
        score_with(&self.attribute.values(), candidates, scores, |utilization, _, _| {
            1.0 - utilization
        });
    }
}

/// `multicluster-queue-scorer`.
#[derive(Debug)]
pub struct ClusterQueueScorer {
    attribute: ClusterAttribute,
}

impl Default for ClusterQueueScorer {
    fn default() -> Self {
        Self::new()
    }
}

impl ClusterQueueScorer {
    /// A scorer reading the multi-cluster extractors of the config it is bound in.
    pub const fn new() -> Self {
        Self {
            attribute: ClusterAttribute::new(
                QUEUE_SCORER_TYPE_NAME,
                MULTICLUSTER_QUEUE_SIZE_ATTRIBUTE,
            ),
        }
    }
}

impl BindPlugins for ClusterQueueScorer {
    fn bind(&self, plugins: &ConstructedPlugins) -> Result<(), PluginError> {
        self.attribute.bind(plugins)
    }
}

impl Scorer for ClusterQueueScorer {
    fn score(
        &self,
        _state: &mut CycleState,
        _request: &InferenceRequest,
        candidates: Candidates<'_>,
        scores: &mut [f64],
    ) {
        score_with(&self.attribute.values(), candidates, scores, |queue, shortest, longest| {
            if longest == shortest { 1.0 } else { (longest - queue) / (longest - shortest) }
        });
    }
}
