//! The picker's own Prometheus metrics, under the names GIE dashboards expect.
//!
//! Request metrics are recorded by the ext-proc exchange; pool gauges are computed from the
//! current pool snapshot when `/metrics` is scraped, so they are never older than the scrape.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use scheduler_core::{InferenceRequest, PoolSnapshot};

use crate::usage::Usage;

/// Labels of per-request metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The model the client asked for.
    pub model_name: String,
    /// The model the request was sent to (after any rewrite).
    pub target_model_name: String,
}

impl RequestLabels {
    /// The labels of `request`.
    pub fn new(request: &InferenceRequest) -> Self {
        Self {
            model_name: request.target_model.clone(),
            target_model_name: request.target_model.clone(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    model_name: String,
    target_model_name: String,
    error_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    name: String,
}

type HistogramFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// Every metric the picker exports.
#[derive(Debug)]
pub struct EppMetrics {
    registry: Registry,
    pool_name: String,
    staleness_threshold: Option<Duration>,
    requests: Family<RequestLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: HistogramFamily,
    input_tokens: HistogramFamily,
    output_tokens: HistogramFamily,
    normalized_time_per_output_token: HistogramFamily,
    request_sizes: HistogramFamily,
    pool_kv_cache: Family<PoolLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pool_queue: Family<PoolLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pool_ready: Family<PoolLabels, Gauge>,
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 20))
}

fn token_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 22))
}

fn ntpot_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

fn size_histogram() -> Histogram {
    Histogram::new(exponential_buckets(64.0, 4.0, 14))
}

impl EppMetrics {
    /// Metrics for the pool named `pool_name`; endpoints whose metrics are older than
    /// `staleness_threshold` do not count as ready (`None`: no metrics source, every known
    /// endpoint counts).
    pub fn new(pool_name: impl Into<String>, staleness_threshold: Option<Duration>) -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration: HistogramFamily = Family::new_with_constructor(duration_histogram);
        let input_tokens: HistogramFamily = Family::new_with_constructor(token_histogram);
        let output_tokens: HistogramFamily = Family::new_with_constructor(token_histogram);
        let normalized_time_per_output_token: HistogramFamily =
            Family::new_with_constructor(ntpot_histogram);
        let request_sizes: HistogramFamily = Family::new_with_constructor(size_histogram);
        let pool_kv_cache = Family::default();
        let pool_queue = Family::default();
        let pool_ready = Family::default();
        registry.register(
            "inference_objective_request",
            "Requests routed, by model",
            requests.clone(),
        );
        registry.register(
            "inference_objective_request_error",
            "Requests answered with an error by the picker, by model and error code",
            errors.clone(),
        );
        registry.register(
            "inference_objective_request_duration_seconds",
            "Time from the routing decision's start to the end of the response",
            duration.clone(),
        );
        registry.register(
            "inference_objective_input_tokens",
            "Prompt tokens per request, as reported by the model server",
            input_tokens.clone(),
        );
        registry.register(
            "inference_objective_output_tokens",
            "Completion tokens per request, as reported by the model server",
            output_tokens.clone(),
        );
        registry.register(
            "inference_objective_normalized_time_per_output_token_seconds",
            "Request duration divided by its completion tokens",
            normalized_time_per_output_token.clone(),
        );
        registry.register(
            "inference_objective_request_sizes",
            "Request body sizes in bytes",
            request_sizes.clone(),
        );
        registry.register(
            "inference_pool_average_kv_cache_utilization",
            "Mean KV-cache utilisation of the pool's endpoints with fresh metrics",
            pool_kv_cache.clone(),
        );
        registry.register(
            "inference_pool_average_queue_size",
            "Mean waiting-queue length of the pool's endpoints with fresh metrics",
            pool_queue.clone(),
        );
        registry.register(
            "inference_pool_ready_pods",
            "Endpoints with fresh metrics",
            pool_ready.clone(),
        );
        Self {
            registry,
            pool_name: pool_name.into(),
            staleness_threshold,
            requests,
            errors,
            duration,
            input_tokens,
            output_tokens,
            normalized_time_per_output_token,
            request_sizes,
            pool_kv_cache,
            pool_queue,
            pool_ready,
        }
    }

    /// Counts a routed request.
    pub fn record_request(&self, labels: &RequestLabels, body_bytes: usize) {
        self.requests.get_or_create(labels).inc();
        self.request_sizes.get_or_create(labels).observe(body_bytes as f64);
    }

    /// Counts a request the picker answered itself.
    pub fn record_rejection(&self, model: &str, error_code: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                model_name: model.to_owned(),
                target_model_name: model.to_owned(),
                error_code: error_code.to_owned(),
            })
            .inc();
    }

    /// Records a finished response.
    pub fn record_completion(
        &self,
        labels: &RequestLabels,
        elapsed: Duration,
        usage: Option<Usage>,
    ) {
        let seconds = elapsed.as_secs_f64();
        self.duration.get_or_create(labels).observe(seconds);
        if let Some(usage) = usage {
            self.input_tokens.get_or_create(labels).observe(usage.prompt_tokens as f64);
            self.output_tokens.get_or_create(labels).observe(usage.completion_tokens as f64);
            if usage.completion_tokens > 0 {
                self.normalized_time_per_output_token
                    .get_or_create(labels)
                    .observe(seconds / usage.completion_tokens as f64);
            }
        }
    }

    /// Updates the pool gauges from `pool` as of `now`.
    pub fn observe_pool(&self, pool: &PoolSnapshot, now: Instant) {
        let fresh: Vec<_> = pool
            .endpoints()
            .iter()
            .filter(|state| {
                self.staleness_threshold
                    .is_none_or(|threshold| !state.metrics.is_stale(now, threshold))
            })
            .collect();
        let labels = PoolLabels { name: self.pool_name.clone() };
        let count = fresh.len();
        let mean = |value: &dyn Fn(&&scheduler_core::EndpointState) -> f64| {
            if count == 0 { 0.0 } else { fresh.iter().map(value).sum::<f64>() / count as f64 }
        };
        self.pool_kv_cache.get_or_create(&labels).set(mean(&|s| s.metrics.kv_usage));
        self.pool_queue.get_or_create(&labels).set(mean(&|s| f64::from(s.metrics.waiting_queue)));
        self.pool_ready.get_or_create(&labels).set(count as i64);
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            let _ = writeln!(text, "# encoding failed");
        }
        text
    }
}
