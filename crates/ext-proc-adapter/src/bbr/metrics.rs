//! The body-based router's Prometheus metrics.
//!
//! - `bbr_requests_total{outcome}`: every request once, by what the router did with it
//!   ([`Outcome`]); every outcome is exported from the start, at zero.
//! - `bbr_routed_requests_total{base_model}`: routed requests by the base model they were
//!   sent to. Base model names come from clients (a model nobody described is its own base),
//!   so they are escaped and bounded as `epp`'s model labels are (see [`crate::metrics`]).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::metrics::ModelLabels;

/// What the router did with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The model headers were set.
    Routed,
    /// Not a JSON inference request (or no body): passed on untouched.
    Passthrough,
    /// The body has no `model`: answered 400.
    MissingModel,
    /// The body is not a JSON object, or its `model` is not a usable string: answered 400.
    BadBody,
    /// The body exceeded the limit: answered 413.
    TooLarge,
}

impl Outcome {
    /// Every outcome.
    pub const ALL: [Self; 5] =
        [Self::Routed, Self::Passthrough, Self::MissingModel, Self::BadBody, Self::TooLarge];

    /// The `outcome` label value (also the error code of an immediate response).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Routed => "routed",
            Self::Passthrough => "passthrough",
            Self::MissingModel => "missing_model",
            Self::BadBody => "bad_body",
            Self::TooLarge => "too_large",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BaseModelLabels {
    base_model: String,
}

/// Every metric the body-based router exports.
#[derive(Debug)]
pub struct BbrMetrics {
    registry: Registry,
    requests: Family<OutcomeLabels, Counter>,
    routed: Family<BaseModelLabels, Counter>,
    base_models: ModelLabels,
}

impl Default for BbrMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl BbrMetrics {
    /// Fresh metrics, every outcome at zero.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<OutcomeLabels, Counter>::default();
        let routed = Family::<BaseModelLabels, Counter>::default();
        registry.register("bbr_requests", "Requests seen, by outcome", requests.clone());
        registry.register("bbr_routed_requests", "Requests routed, by base model", routed.clone());
        for outcome in Outcome::ALL {
            let _ = requests.get_or_create(&OutcomeLabels { outcome: outcome.as_str() });
        }
        Self { registry, requests, routed, base_models: ModelLabels::default() }
    }

    /// Counts a request that ended with `outcome`.
    pub fn record(&self, outcome: Outcome) {
        self.requests.get_or_create(&OutcomeLabels { outcome: outcome.as_str() }).inc();
    }

    /// Counts a request routed to `base_model`.
    pub fn record_routed(&self, base_model: &str) {
        self.record(Outcome::Routed);
        let base_model = self.base_models.value(base_model);
        self.routed.get_or_create(&BaseModelLabels { base_model }).inc();
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        crate::metrics::encode_registry(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{MAX_MODEL_LABELS, OTHER_MODEL_LABEL};

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
    }

    #[test]
    fn outcomes_start_at_zero_and_count() {
        let metrics = BbrMetrics::new();
        let text = metrics.encode();
        for outcome in Outcome::ALL {
            let series = format!("bbr_requests_total{{outcome=\"{}\"}}", outcome.as_str());
            assert_eq!(sample(&text, &series), Some(0.0), "{series}");
        }
        metrics.record(Outcome::TooLarge);
        metrics.record_routed("llama");
        let text = metrics.encode();
        assert_eq!(sample(&text, "bbr_requests_total{outcome=\"too_large\"}"), Some(1.0));
        assert_eq!(sample(&text, "bbr_requests_total{outcome=\"routed\"}"), Some(1.0));
        assert_eq!(sample(&text, "bbr_routed_requests_total{base_model=\"llama\"}"), Some(1.0));
    }

    #[test]
    fn base_model_labels_are_escaped_and_bounded() {
        let metrics = BbrMetrics::new();
        metrics.record_routed("evil\"} 1\nforged_total 9");
        for index in 0..MAX_MODEL_LABELS + 5 {
            metrics.record_routed(&format!("model-{index}"));
        }
        let text = metrics.encode();
        assert!(!text.lines().any(|line| line.starts_with("forged_total")), "{text}");
        assert!(text.contains(r#"base_model="evil\"} 1\nforged_total 9""#), "{text}");
        let other = format!("bbr_routed_requests_total{{base_model=\"{OTHER_MODEL_LABEL}\"}}");
        assert_eq!(sample(&text, &other), Some(6.0), "the names past the bound");
    }
}
