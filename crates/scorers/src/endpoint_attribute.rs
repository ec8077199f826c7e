//! `endpoint-attribute-filter` and `endpoint-attribute-scorer` (alpha in llm-d-router): route
//! on one named scalar attribute a data-layer producer publishes per endpoint, such as
//! `dcgm-extractor`'s `GPUUtilization`.
//!
//! The filter keeps the endpoints whose value compares true against a threshold (`LessThan`,
//! `LessThanOrEqual`, `GreaterThan`, `GreaterThanOrEqual`, `Equal`, `NotEqual`); endpoints
//! without the attribute pass (`onMissing: Pass`, the default) or go (`Fail`); with
//! `fallbackOnEmpty` an emptied set is given back whole.
//!
//! The scorer normalizes the value linearly, against a fixed `[min, max]` (clamped) or against
//! the range the candidates span (all equal: 1 each), and inverts it for
//! `linear_lower_is_better`. Endpoints without the attribute score 0.
//!
//! `producer` names the declared plugin publishing the attribute (it must exist). Without it
//! llm-d reads the core metrics extractor's configured custom metrics, which epp-rs does not
//! extract: every endpoint is then without the attribute. A `/` in an attribute without a
//! producer is refused, as in llm-d, since it is likely the combined `Attribute/Producer`
//! spelling.

use std::sync::{Arc, OnceLock};

use scheduler_core::{
    AttributeValues, BindPlugins, Candidates, ConstructedPlugins, CycleState, EndpointAttributes,
    Filter, InferenceRequest, PluginError, PoolSnapshot, Scorer,
};
use serde::Deserialize;

/// llm-d type name of the filter.
pub const FILTER_TYPE_NAME: &str = "endpoint-attribute-filter";
/// llm-d type name of the scorer.
pub const SCORER_TYPE_NAME: &str = "endpoint-attribute-scorer";

fn invalid<T>(message: String) -> Result<T, PluginError> {
    Err(PluginError::InvalidParameters(message))
}

/// Where an attribute comes from, found when the config is bound.
#[derive(Debug)]
struct AttributeSource {
    attribute: String,
    producer: Option<String>,
    attributes: OnceLock<Arc<EndpointAttributes>>,
}

impl AttributeSource {
    fn new(plugin: &str, attribute: String, producer: Option<String>) -> Result<Self, PluginError> {
        let producer = producer.filter(|name| !name.is_empty());
        if attribute.is_empty() {
            return invalid(format!("{plugin} requires a non-empty attribute"));
        }
        if producer.is_none()
            && let Some((name, producer)) = attribute.rsplit_once('/')
        {
            return invalid(format!(
                "attribute '{attribute}' contains '/' but no producer is set; give attribute: \
                 '{name}' and producer: '{producer}', or set the producer explicitly"
            ));
        }
        Ok(Self { attribute, producer, attributes: OnceLock::new() })
    }

    fn bind(&self, plugins: &ConstructedPlugins) -> Result<(), PluginError> {
        let Some(producer) = &self.producer else { return Ok(()) };
        let found = plugins
            .get(producer)
            .and_then(|declared| declared.plugin.shared.clone())
            .and_then(|shared| shared.downcast::<EndpointAttributes>().ok());
        match found {
            Some(attributes) => {
                let _ = self.attributes.set(attributes);
                Ok(())
            }
            None => invalid(format!(
                "producer: no declared plugin named '{producer}' publishes endpoint attributes"
            )),
        }
    }

    /// The attribute's values now, if its producer has published them.
    fn values(&self) -> Option<Arc<AttributeValues>> {
        self.attributes.get()?.values(&self.attribute)
    }
}

/// Threshold comparison of the filter.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum Operator {
    /// `value < threshold`.
    LessThan,
    /// `value <= threshold`.
    LessThanOrEqual,
    /// `value > threshold`.
    GreaterThan,
    /// `value >= threshold`.
    GreaterThanOrEqual,
    /// `value == threshold`.
    Equal,
    /// `value != threshold`.
    NotEqual,
}

impl Operator {
    fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Self::LessThan => value < threshold,
            Self::LessThanOrEqual => value <= threshold,
            Self::GreaterThan => value > threshold,
            Self::GreaterThanOrEqual => value >= threshold,
            Self::Equal => value == threshold,
            Self::NotEqual => value != threshold,
        }
    }
}

/// `algorithm.threshold`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    /// The comparison.
    pub operator: Operator,
    /// The value compared against.
    #[serde(default)]
    pub value: f64,
}

/// The filter's `algorithm` (`threshold` is the only type).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilterAlgorithm {
    /// `threshold`.
    #[serde(default, rename = "type")]
    pub kind: String,
    /// Required with `type: threshold`.
    #[serde(default)]
    pub threshold: Option<Threshold>,
}

/// Parameters of [`EndpointAttributeFilter`].
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointAttributeFilterParameters {
    /// The attribute's name.
    #[serde(default)]
    pub attribute: String,
    /// The plugin publishing it.
    #[serde(default)]
    pub producer: Option<String>,
    /// `Pass` (default) keeps endpoints without the attribute, `Fail` drops them.
    #[serde(default)]
    pub on_missing: Option<String>,
    /// Give back every candidate when none is left.
    #[serde(default)]
    pub fallback_on_empty: bool,
    /// The comparison.
    #[serde(default)]
    pub algorithm: FilterAlgorithm,
}

/// Keeps the endpoints whose attribute passes a threshold.
#[derive(Debug)]
pub struct EndpointAttributeFilter {
    source: AttributeSource,
    pass_on_missing: bool,
    fallback_on_empty: bool,
    threshold: Threshold,
}

impl EndpointAttributeFilter {
    /// A filter for `parameters`, validated as llm-d's.
    pub fn new(parameters: EndpointAttributeFilterParameters) -> Result<Self, PluginError> {
        let source =
            AttributeSource::new(FILTER_TYPE_NAME, parameters.attribute, parameters.producer)?;
        let pass_on_missing = match parameters.on_missing.as_deref() {
            None | Some("") | Some("Pass") => true,
            Some("Fail") => false,
            Some(other) => {
                return invalid(format!("onMissing must be 'Pass' or 'Fail', got '{other}'"));
            }
        };
        if parameters.algorithm.kind != "threshold" {
            return invalid(format!(
                "algorithm.type must be 'threshold', got '{}'",
                parameters.algorithm.kind
            ));
        }
        let Some(threshold) = parameters.algorithm.threshold else {
            return invalid(
                "algorithm.threshold is required when algorithm.type is 'threshold'".into(),
            );
        };
        Ok(Self {
            source,
            pass_on_missing,
            fallback_on_empty: parameters.fallback_on_empty,
            threshold,
        })
    }
}

impl BindPlugins for EndpointAttributeFilter {
    fn bind(&self, plugins: &ConstructedPlugins) -> Result<(), PluginError> {
        self.source.bind(plugins)
    }
}

impl Filter for EndpointAttributeFilter {
    fn filter(
        &self,
        _state: &mut CycleState,
        _request: &InferenceRequest,
        pool: &PoolSnapshot,
        candidates: &mut Vec<u32>,
    ) {
        let values = self.source.values();
        let keeps = |index: u32| {
            let value =
                pool.get(index).and_then(|endpoint| values.as_ref()?.get(&endpoint.id()).copied());
            match value {
                Some(value) => self.threshold.operator.holds(value, self.threshold.value),
                None => self.pass_on_missing,
            }
        };
        if self.fallback_on_empty && !candidates.iter().any(|&index| keeps(index)) {
            return;
        }
        candidates.retain(|&index| keeps(index));
    }
}

/// `algorithm.normalization.fixedRange`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FixedRange {
    /// Value scoring 0 (1 when lower is better).
    #[serde(default)]
    pub min: f64,
    /// Value scoring 1 (0 when lower is better).
    #[serde(default)]
    pub max: f64,
}

/// `algorithm.normalization`: at most one strategy; the adaptive range by default.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Normalization {
    /// A fixed range.
    #[serde(default)]
    pub fixed_range: Option<FixedRange>,
    /// The candidates' range.
    #[serde(default)]
    pub adaptive_range: Option<AdaptiveRange>,
}

/// `algorithm.normalization.adaptiveRange`: takes no parameters.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveRange {}

/// The scorer's `algorithm`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScorerAlgorithm {
    /// `linear_lower_is_better` or `linear_higher_is_better`.
    #[serde(default, rename = "type")]
    pub kind: String,
    /// How values map to `[0, 1]`.
    #[serde(default)]
    pub normalization: Normalization,
}

/// Parameters of [`EndpointAttributeScorer`].
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointAttributeScorerParameters {
    /// The attribute's name.
    #[serde(default)]
    pub attribute_key: String,
    /// The plugin publishing it.
    #[serde(default)]
    pub producer: Option<String>,
    /// The scoring.
    #[serde(default)]
    pub algorithm: ScorerAlgorithm,
}

/// Scores endpoints by an attribute, linearly.
#[derive(Debug)]
pub struct EndpointAttributeScorer {
    source: AttributeSource,
    lower_is_better: bool,
    fixed_range: Option<FixedRange>,
}

impl EndpointAttributeScorer {
    /// A scorer for `parameters`, validated as llm-d's.
    pub fn new(parameters: EndpointAttributeScorerParameters) -> Result<Self, PluginError> {
        let source =
            AttributeSource::new(SCORER_TYPE_NAME, parameters.attribute_key, parameters.producer)?;
        let lower_is_better = match parameters.algorithm.kind.as_str() {
            "linear_lower_is_better" => true,
            "linear_higher_is_better" => false,
            other => {
                return invalid(format!(
                    "algorithm.type must be 'linear_lower_is_better' or 'linear_higher_is_better', got '{other}'"
                ));
            }
        };
        let Normalization { fixed_range, adaptive_range } = parameters.algorithm.normalization;
        if fixed_range.is_some() && adaptive_range.is_some() {
            return invalid(
                "algorithm.normalization takes one of fixedRange and adaptiveRange, not both"
                    .into(),
            );
        }
        if let Some(range) = fixed_range
            && range.min.partial_cmp(&range.max) != Some(std::cmp::Ordering::Less)
        {
            return invalid(format!(
                "algorithm.normalization.fixedRange needs min < max, got min {}, max {}",
                range.min, range.max
            ));
        }
        Ok(Self { source, lower_is_better, fixed_range })
    }

    fn oriented(&self, normalized: f64) -> f64 {
        if self.lower_is_better { 1.0 - normalized } else { normalized }
    }
}

impl BindPlugins for EndpointAttributeScorer {
    fn bind(&self, plugins: &ConstructedPlugins) -> Result<(), PluginError> {
        self.source.bind(plugins)
    }
}

impl Scorer for EndpointAttributeScorer {
    fn score(
        &self,
        _state: &mut CycleState,
        _request: &InferenceRequest,
        candidates: Candidates<'_>,
        scores: &mut [f64],
    ) {
        // Scores arrive zeroed: an endpoint without the attribute keeps 0.
        let Some(values) = self.source.values() else { return };
        let pool = candidates.pool();
        let value_of =
            |index: u32| pool.get(index).and_then(|endpoint| values.get(&endpoint.id()).copied());
        let (low, high) = match self.fixed_range {
            Some(range) => (range.min, range.max),
            None => candidates
                .indices()
                .iter()
                .filter_map(|&index| value_of(index))
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(low, high), value| {
                    (low.min(value), high.max(value))
                }),
        };
        for (score, &index) in scores.iter_mut().zip(candidates.indices()) {
            let Some(value) = value_of(index) else { continue };
            *score = if self.fixed_range.is_none() && high == low {
                1.0
            } else {
                let normalized = ((value - low) / (high - low)).clamp(0.0, 1.0);
                self.oriented(normalized)
            };
            if !score.is_finite() {
                *score = 0.0;
            }
        }
    }
}
