//! The picker's own Prometheus metrics, under the names GIE dashboards expect.
//!
//! Request metrics are recorded by the ext-proc exchange; pool gauges are computed from the
//! current pool snapshot when `/metrics` is scraped, so they are never older than the scrape.
//!
//! Model names come from clients (the body's `model`, the rewrite header), so they are escaped
//! for the text format (the encoder writes label values as given) and bounded: the first
//! [`MAX_MODEL_LABELS`] distinct names, each at most [`MAX_MODEL_LABEL_BYTES`] long, get
//! series of their own; any other name counts under [`OTHER_MODEL_LABEL`]. A client can
//! neither forge samples nor grow the exposition without bound.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use scheduler_core::flow::{Admission, OutcomeReason};
use scheduler_core::{InferenceRequest, PoolSnapshot, Scheduler};

use crate::usage::Usage;

/// Type of llm-d's profile handler whose decisions `disagg_decision_total` counts.
const DISAGG_PROFILE_HANDLER: &str = "disagg-profile-handler";
/// Type of llm-d's deprecated handler whose decisions `pd_decision_total` counts.
const PD_PROFILE_HANDLER: &str = "pd-profile-handler";

/// Most distinct model names with series of their own.
pub const MAX_MODEL_LABELS: usize = 128;
/// Longest model name (in bytes) with series of its own.
pub const MAX_MODEL_LABEL_BYTES: usize = 256;
/// The label value every other model name counts under.
pub const OTHER_MODEL_LABEL: &str = "other";

/// Labels of per-request metrics, escaped and bounded (see [`EppMetrics::request_labels`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The model the client asked for.
    model_name: String,
    /// The model the request was sent to (after any rewrite).
    target_model_name: String,
}

/// The model names that have series, up to [`MAX_MODEL_LABELS`].
#[derive(Debug, Default)]
pub(crate) struct ModelLabels {
    known: RwLock<HashSet<String>>,
}

impl ModelLabels {
    /// The label value for `model`: the name escaped for the text format, or
    /// [`OTHER_MODEL_LABEL`] once the bounds are reached.
    pub(crate) fn value(&self, model: &str) -> String {
        if model.len() > MAX_MODEL_LABEL_BYTES {
            return OTHER_MODEL_LABEL.to_owned();
        }
        let escaped = escape_label_value(model);
        if self.known.read().contains(&escaped) {
            return escaped;
        }
        let mut known = self.known.write();
        if known.len() < MAX_MODEL_LABELS || known.contains(&escaped) {
            known.insert(escaped.clone());
            escaped
        } else {
            OTHER_MODEL_LABEL.to_owned()
        }
    }
}

/// Escapes a label value for the Prometheus text format: backslash, double quote and line feed.
fn escape_label_value(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for character in value.chars() {
        match character {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            other => escaped.push(other),
        }
    }
    escaped
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    model_name: String,
    target_model_name: String,
    error_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RewriteLabels {
    model_rewrite_name: String,
    model_name: String,
    target_model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BandLabels {
    priority: String,
    inference_pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
    inference_pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    plugin_name: String,
    plugin_type: String,
    model_name: String,
    decision_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LegacyDecisionLabels {
    model_name: String,
    decision_type: &'static str,
}

/// A disaggregation decision's counters, under llm-d-router's name and its deprecated one.
#[derive(Debug, Default)]
struct DecisionCounters {
    current: Family<DecisionLabels, Counter>,
    deprecated: Family<LegacyDecisionLabels, Counter>,
}

impl DecisionCounters {
    fn register(registry: &mut Registry, name: &str, help: &str) -> Self {
        let counters = Self::default();
        registry.register(format!("llm_d_epp_{name}"), help, counters.current.clone());
        registry.register(
            format!("llm_d_inference_scheduler_{name}"),
            format!("[Deprecated: use llm_d_epp_{name}_total] {help}"),
            counters.deprecated.clone(),
        );
        counters
    }

    fn count(&self, handler: (&str, &str), model_name: &str, decision_type: &'static str) {
        let model_name = if model_name.is_empty() { "unknown" } else { model_name };
        self.current
            .get_or_create(&DecisionLabels {
                plugin_name: escape_label_value(handler.0),
                plugin_type: escape_label_value(handler.1),
                model_name: model_name.to_owned(),
                decision_type,
            })
            .inc();
        self.deprecated
            .get_or_create(&LegacyDecisionLabels {
                model_name: model_name.to_owned(),
                decision_type,
            })
            .inc();
    }
}

/// llm-d-router's disaggregation decision types, from the stages a request was given.
fn decision_type(prefilled_apart: bool, encoded_apart: bool) -> &'static str {
    match (encoded_apart, prefilled_apart) {
        (true, true) => "encode-prefill-decode",
        (true, false) => "encode-decode",
        (false, true) => "prefill-decode",
        (false, false) => "decode-only",
    }
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
    models: ModelLabels,
    flow_queue_size: Family<BandLabels, Gauge>,
    flow_queue_bytes: Family<BandLabels, Gauge>,
    flow_outcomes: Family<OutcomeLabels, Counter>,
    unknown_objectives: Family<PoolLabels, Counter>,
    running: Family<RunningLabels, Gauge>,
    dropped_records: Family<PoolLabels, Counter>,
    rewrite_decisions: Family<RewriteLabels, Counter>,
    disagg_decisions: DecisionCounters,
    pd_decisions: DecisionCounters,
    sections: ExtraSections,
}

/// Renderers of metrics kept outside this registry (an optional integration's own, such as
/// the cross-replica syncer's), appended to the page at each scrape.
#[derive(Default)]
struct ExtraSections(RwLock<Vec<RenderSection>>);

/// Writes one section of the page.
type RenderSection = Box<dyn Fn(&mut String) + Send + Sync>;

impl std::fmt::Debug for ExtraSections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExtraSections({})", self.0.read().len())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunningLabels {
    model_name: String,
}

/// A request counted in `inference_objective_running_requests` until this is dropped: from
/// the routing decision to the end of the response, a reset stream, or an abandoned exchange.
#[derive(Debug)]
pub struct RunningRequest {
    gauge: Gauge,
}

impl Drop for RunningRequest {
    fn drop(&mut self) {
        self.gauge.dec();
    }
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
        let flow_queue_size = Family::default();
        let flow_queue_bytes = Family::default();
        let flow_outcomes = Family::default();
        let unknown_objectives = Family::default();
        let running = Family::default();
        let dropped_records = Family::default();
        let rewrite_decisions = Family::default();
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
        // llm-d-router's names for the same pool gauges (same `name` label): what a peer's
        // multicluster-metrics-extractor scrapes by default.
        registry.register(
            "llm_d_epp_average_kv_cache_utilization",
            "Mean KV-cache utilisation of the pool's endpoints with fresh metrics",
            pool_kv_cache.clone(),
        );
        registry.register(
            "llm_d_epp_average_queue_size",
            "Mean waiting-queue length of the pool's endpoints with fresh metrics",
            pool_queue.clone(),
        );
        registry.register(
            "llm_d_epp_ready_endpoints",
            "Endpoints with fresh metrics",
            pool_ready.clone(),
        );
        registry.register(
            "inference_extension_flow_control_queue_size",
            "Requests held in the flow-control queues, by priority band",
            flow_queue_size.clone(),
        );
        registry.register(
            "inference_extension_flow_control_queue_bytes",
            "Bytes of the requests held in the flow-control queues, by priority band",
            flow_queue_bytes.clone(),
        );
        registry.register(
            "inference_extension_flow_control_request_outcome",
            "Requests leaving admission, by outcome (admitted, shed, rejected_capacity, expired, cancelled, evicted)",
            flow_outcomes.clone(),
        );
        registry.register(
            "inference_extension_flow_control_unknown_objective",
            "Requests naming an InferenceObjective that is not configured (priority 0 applied)",
            unknown_objectives.clone(),
        );
        registry.register(
            "inference_objective_running_requests",
            "Requests routed and not yet finished, by model",
            running.clone(),
        );
        registry.register(
            "inference_extension_prefix_cache_dropped_records",
            "Picks whose prompt blocks were not recorded in the prefix index because its writer had fallen behind",
            dropped_records.clone(),
        );
        registry.register(
            "inference_extension_model_rewrite_decisions",
            "Requests whose model a model rewrite rule changed, by rule, requested model and target",
            rewrite_decisions.clone(),
        );
        let disagg_decisions = DecisionCounters::register(
            &mut registry,
            "disagg_decision",
            "Requests routed by disagg-profile-handler, by the stages they were given (decode-only, prefill-decode, encode-decode, encode-prefill-decode)",
        );
        let pd_decisions = DecisionCounters::register(
            &mut registry,
            "pd_decision",
            "Requests routed by the deprecated pd-profile-handler, by decision (decode-only, prefill-decode)",
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
            models: ModelLabels::default(),
            flow_queue_size,
            flow_queue_bytes,
            flow_outcomes,
            unknown_objectives,
            running,
            dropped_records,
            rewrite_decisions,
            disagg_decisions,
            pd_decisions,
            sections: ExtraSections::default(),
        }
    }

    /// Appends what `render` writes (complete metric families in the text format) to every
    /// scrape of the page.
    pub fn add_section(&self, render: impl Fn(&mut String) + Send + Sync + 'static) {
        self.sections.0.write().push(Box::new(render));
    }

    /// Counts the disaggregation decision of a request that `handler` (its plugin name and
    /// type) routed with `request_headers`, as llm-d-router's handlers count theirs: the
    /// `disagg_decision` series for `disagg-profile-handler`, `pd_decision` for
    /// `pd-profile-handler`, nothing for other handlers.
    pub fn record_disagg_decision(
        &self,
        handler: (&str, &str),
        labels: &RequestLabels,
        request_headers: &[(&'static str, String)],
    ) {
        use scheduler_core::protocol::{ENCODER_ENDPOINTS_HEADER, PREFILL_ENDPOINT_HEADER};
        let counters = match handler.1 {
            DISAGG_PROFILE_HANDLER => &self.disagg_decisions,
            PD_PROFILE_HANDLER => &self.pd_decisions,
            _ => return,
        };
        let has = |name: &str| request_headers.iter().any(|(header, _)| *header == name);
        let decision = decision_type(has(PREFILL_ENDPOINT_HEADER), has(ENCODER_ENDPOINTS_HEADER));
        counters.count(handler, &labels.target_model_name, decision);
    }

    /// Gives `names` (the models the operator configured: rewrite sources and targets) series
    /// of their own whatever the bound, so that configured models never count as `other`.
    pub fn admit_model_names<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let mut known = self.models.known.write();
        known.extend(
            names
                .into_iter()
                .filter(|name| name.len() <= MAX_MODEL_LABEL_BYTES)
                .map(escape_label_value),
        );
    }

    /// Counts a request whose model a rewrite rule changed (nothing for other requests).
    pub fn record_rewrite(&self, request: &InferenceRequest, labels: &RequestLabels) {
        let Some(rule) = &request.model_rewrite else { return };
        self.rewrite_decisions
            .get_or_create(&RewriteLabels {
                model_rewrite_name: escape_label_value(rule),
                model_name: labels.model_name.clone(),
                target_model: labels.target_model_name.clone(),
            })
            .inc();
    }

    /// The labels of `request`: the body's model and the target model, escaped and bounded.
    pub fn request_labels(&self, request: &InferenceRequest) -> RequestLabels {
        RequestLabels {
            model_name: self.models.value(&request.model),
            target_model_name: self.models.value(&request.target_model),
        }
    }

    /// Counts a routed request.
    pub fn record_request(&self, labels: &RequestLabels, body_bytes: usize) {
        self.requests.get_or_create(labels).inc();
        self.request_sizes.get_or_create(labels).observe(body_bytes as f64);
    }

    /// Counts a routed request as running until the returned guard is dropped.
    pub fn start_running(&self, labels: &RequestLabels) -> RunningRequest {
        let gauge = self
            .running
            .get_or_create(&RunningLabels { model_name: labels.model_name.clone() })
            .clone();
        gauge.inc();
        RunningRequest { gauge }
    }

    /// Counts a request the picker answered itself.
    /// `model` is what the gateway's rewrite header named, if anything (the body may be unusable).
    pub fn record_rejection(&self, model: &str, error_code: &'static str) {
        let model = self.models.value(model);
        self.errors
            .get_or_create(&ErrorLabels {
                model_name: model.clone(),
                target_model_name: model,
                error_code: error_code.to_owned(),
            })
            .inc();
    }

    /// Counts a response the upstream answered with an error status (4xx, 5xx), under the
    /// request error counter with the status class as error code (`upstream_4xx`,
    /// `upstream_5xx`).
    pub fn record_response_error(&self, labels: &RequestLabels, status: u16) {
        let error_code = if status >= 500 { "upstream_5xx" } else { "upstream_4xx" };
        self.errors
            .get_or_create(&ErrorLabels {
                model_name: labels.model_name.clone(),
                target_model_name: labels.target_model_name.clone(),
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

    /// Copies the counters the scheduler keeps itself (prefix-cache records dropped).
    pub fn observe_scheduler(&self, scheduler: &Scheduler) {
        self.dropped_records
            .get_or_create(&PoolLabels { name: self.pool_name.clone() })
            .inner()
            .store(scheduler.dropped_deferred(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Updates the flow-control series from `admission`: admission outcomes and unknown
    /// objectives (counters kept by the core, copied here), and queue lengths per priority band.
    pub fn observe_admission(&self, admission: &Admission) {
        let flow = admission.objectives().metrics().snapshot();
        for reason in OutcomeReason::ALL {
            let labels =
                OutcomeLabels { outcome: reason.as_str(), inference_pool: self.pool_name.clone() };
            self.flow_outcomes
                .get_or_create(&labels)
                .inner()
                .store(flow.outcome(reason), std::sync::atomic::Ordering::Relaxed);
        }
        self.unknown_objectives
            .get_or_create(&PoolLabels { name: self.pool_name.clone() })
            .inner()
            .store(flow.unknown_objectives, std::sync::atomic::Ordering::Relaxed);
        if let Some(controller) = admission.controller() {
            for band in controller.band_stats() {
                let labels = BandLabels {
                    priority: band.priority.to_string(),
                    inference_pool: self.pool_name.clone(),
                };
                let as_gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
                self.flow_queue_size.get_or_create(&labels).set(as_gauge(band.queued_requests));
                self.flow_queue_bytes.get_or_create(&labels).set(as_gauge(band.queued_bytes));
            }
        }
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut text = encode_registry(&self.registry);
        let sections = self.sections.0.read();
        if !sections.is_empty() {
            // The families go before the end-of-exposition marker.
            let eof = text.ends_with("# EOF\n");
            if eof {
                text.truncate(text.len() - "# EOF\n".len());
            }
            for render in sections.iter() {
                render(&mut text);
            }
            if eof {
                text.push_str("# EOF\n");
            }
        }
        text
    }
}

/// The text exposition of `registry` (a comment line in place of what could not be encoded).
pub(crate) fn encode_registry(registry: &Registry) -> String {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
        let _ = writeln!(text, "# encoding failed");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_model::text::Parser;

    /// One parsed sample: name, labels as decoded pairs, value.
    type ParsedSample = (String, Vec<(String, String)>, f64);

    /// Every sample of the exposition, parsed back.
    fn samples(text: &str) -> Vec<ParsedSample> {
        Parser::new(text)
            .samples()
            .map(|sample| {
                let sample = sample.unwrap_or_else(|error| panic!("{error} in\n{text}"));
                let labels = sample
                    .labels
                    .iter()
                    .map(|label| (label.name.to_owned(), label.value.into_owned()))
                    .collect();
                (sample.name.to_owned(), labels, sample.value)
            })
            .collect()
    }

    fn request(model: &str, target: &str) -> InferenceRequest {
        InferenceRequest { model: model.into(), ..InferenceRequest::new(target, "hi") }
    }

    #[test]
    fn extra_sections_join_the_page_before_its_end() {
        let metrics = EppMetrics::new("p", None);
        let plain = metrics.encode();
        metrics.add_section(|out| out.push_str("# TYPE extra_total counter\nextra_total 3\n"));
        let text = metrics.encode();
        assert!(text.contains("extra_total 3\n"));
        assert_eq!(text.ends_with("# EOF\n"), plain.ends_with("# EOF\n"));
        assert_eq!(text.matches("# EOF").count(), plain.matches("# EOF").count());
        assert!(
            samples(&text).iter().any(|(name, _, value)| name == "extra_total" && *value == 3.0)
        );
    }

    #[test]
    fn running_requests_count_until_their_guard_drops() {
        let metrics = EppMetrics::new("default-pool", None);
        let running = |text: &str, model: &str| {
            samples(text)
                .into_iter()
                .find(|(name, labels, _)| {
                    name == "inference_objective_running_requests"
                        && labels.iter().any(|(k, v)| k == "model_name" && v == model)
                })
                .map(|(_, _, value)| value)
        };
        let labels = metrics.request_labels(&request("llama", "llama"));
        let first = metrics.start_running(&labels);
        let second = metrics.start_running(&labels);
        assert_eq!(running(&metrics.encode(), "llama"), Some(2.0));
        drop(first);
        assert_eq!(running(&metrics.encode(), "llama"), Some(1.0));
        drop(second);
        assert_eq!(running(&metrics.encode(), "llama"), Some(0.0));
    }

    #[test]
    fn dropped_prefix_records_are_exported() {
        let metrics = EppMetrics::new("default-pool", None);
        let scheduler = scorers::default_scheduler().expect("the default scheduler builds");
        metrics.observe_scheduler(&scheduler);
        let dropped = samples(&metrics.encode())
            .into_iter()
            .find(|(name, _, _)| name == "inference_extension_prefix_cache_dropped_records_total")
            .map(|(_, _, value)| value);
        assert_eq!(dropped, Some(0.0));
    }

    #[test]
    fn a_model_name_cannot_forge_samples() {
        let metrics = EppMetrics::new("default-pool", None);
        let hostile = "x\"} 1\ninference_pool_ready_pods{name=\"default-pool\"} 0\n#\\";
        let labels = metrics.request_labels(&request(hostile, hostile));
        metrics.record_request(&labels, 10);
        metrics.observe_pool(&PoolSnapshot::default(), Instant::now());
        let text = metrics.encode();
        let parsed = samples(&text);
        let ready: Vec<_> =
            parsed.iter().filter(|(name, ..)| name == "inference_pool_ready_pods").collect();
        assert_eq!(ready.len(), 1, "one ready-pods sample, not a forged second:\n{text}");
        let (_, labels, value) = parsed
            .iter()
            .find(|(name, ..)| name == "inference_objective_request_total")
            .expect("the request counter");
        assert_eq!(*value, 1.0);
        assert!(
            labels.iter().any(|(name, value)| name == "model_name" && value == hostile),
            "the name round-trips through the escaping: {labels:?}"
        );
    }

    #[test]
    fn model_labels_are_bounded() {
        let metrics = EppMetrics::new("p", None);
        for index in 0..MAX_MODEL_LABELS * 3 {
            let model = format!("model-{index}");
            metrics.record_request(&metrics.request_labels(&request(&model, &model)), 1);
        }
        let long = "m".repeat(MAX_MODEL_LABEL_BYTES + 1);
        metrics.record_request(&metrics.request_labels(&request(&long, &long)), 1);
        let parsed = samples(&metrics.encode());
        let counters: Vec<_> = parsed
            .iter()
            .filter(|(name, ..)| name == "inference_objective_request_total")
            .collect();
        assert_eq!(counters.len(), MAX_MODEL_LABELS + 1, "the first names plus one overflow");
        let other = counters
            .iter()
            .find(|(_, labels, _)| labels.iter().any(|(_, value)| value == OTHER_MODEL_LABEL))
            .expect("an overflow series");
        assert_eq!(other.2, (MAX_MODEL_LABELS * 2 + 1) as f64, "every later name counts there");
    }

    #[test]
    fn model_and_target_model_are_the_two_real_values() {
        let metrics = EppMetrics::new("p", None);
        let labels = metrics.request_labels(&request("tweet-summary", "tweet-summary-v2"));
        metrics.record_request(&labels, 1);
        let text = metrics.encode();
        assert!(
            text.contains(
                "inference_objective_request_total{model_name=\"tweet-summary\",target_model_name=\"tweet-summary-v2\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn upstream_errors_count_by_status_class() {
        let metrics = EppMetrics::new("p", None);
        let labels = metrics.request_labels(&request("m", "m"));
        metrics.record_response_error(&labels, 503);
        metrics.record_response_error(&labels, 502);
        metrics.record_response_error(&labels, 404);
        let text = metrics.encode();
        assert!(text.contains("error_code=\"upstream_5xx\"} 2"), "{text}");
        assert!(text.contains("error_code=\"upstream_4xx\"} 1"), "{text}");
    }

    #[test]
    fn flow_control_series_follow_admission() {
        use scheduler_core::flow::{FlowMetrics, ObjectiveResolver};
        use scheduler_core::{Director, DirectorOptions, EndpointPickerConfig, SharedPool};
        use std::sync::Arc;

        let config = EndpointPickerConfig::from_yaml(
            "featureGates: [flowControl]\nplugins:\n- type: queue-scorer\nflowControl: {defaultRequestTTL: 0}\n",
        )
        .unwrap();
        let objectives = ObjectiveResolver::new(Vec::new(), Arc::new(FlowMetrics::new())).unwrap();
        // An empty pool has no fresh endpoint: saturated, so the request queues.
        let director = Director::from_config(
            &config,
            &scorers::builtin_registry(),
            Arc::new(SharedPool::default()),
            DirectorOptions::default(),
            objectives,
        )
        .unwrap();
        let admission = director.admission().unwrap();
        let mut request = InferenceRequest::new("m", "hi");
        request.objective = Some("not-configured".into());
        let ticket = admission.submit(&mut request, 100, &director.pool().load(), Instant::now());

        let metrics = EppMetrics::new("p", None);
        metrics.observe_admission(admission);
        let text = metrics.encode();
        for line in [
            "inference_extension_flow_control_queue_size{priority=\"0\",inference_pool=\"p\"} 1",
            "inference_extension_flow_control_queue_bytes{priority=\"0\",inference_pool=\"p\"} 100",
            "inference_extension_flow_control_unknown_objective_total{name=\"p\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }

        drop(ticket); // the client went away
        metrics.observe_admission(admission);
        let text = metrics.encode();
        for line in [
            "inference_extension_flow_control_queue_size{priority=\"0\",inference_pool=\"p\"} 0",
            "inference_extension_flow_control_request_outcome_total{outcome=\"cancelled\",inference_pool=\"p\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn disaggregation_decisions_count_under_the_handlers_family() {
        use scheduler_core::protocol::{ENCODER_ENDPOINTS_HEADER, PREFILL_ENDPOINT_HEADER};
        let metrics = EppMetrics::new("p", None);
        let labels = metrics.request_labels(&request("m", "m-v2"));
        let prefill = (PREFILL_ENDPOINT_HEADER, "10.0.0.1:8000".to_owned());
        let encoders = (ENCODER_ENDPOINTS_HEADER, "10.0.0.2:8000".to_owned());
        let disagg = ("stages", "disagg-profile-handler");
        metrics.record_disagg_decision(disagg, &labels, &[prefill.clone(), encoders.clone()]);
        metrics.record_disagg_decision(disagg, &labels, &[encoders]);
        metrics.record_disagg_decision(("old", "pd-profile-handler"), &labels, &[prefill]);
        metrics.record_disagg_decision(("old", "pd-profile-handler"), &labels, &[]);
        metrics.record_disagg_decision(("single", "single-profile-handler"), &labels, &[]);
        let text = metrics.encode();
        let counted: Vec<(String, String, String)> = samples(&text)
            .into_iter()
            .filter(|(name, ..)| name.starts_with("llm_d_"))
            .map(|(name, labels, _)| {
                let label = |key: &str| {
                    labels
                        .iter()
                        .find(|(k, _)| k == key)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                (name, label("plugin_name"), label("decision_type"))
            })
            .collect();
        let expected = |name: &str, plugin: &str, decision: &str| {
            (name.to_owned(), plugin.to_owned(), decision.to_owned())
        };
        for series in [
            expected("llm_d_epp_disagg_decision_total", "stages", "encode-prefill-decode"),
            expected("llm_d_epp_disagg_decision_total", "stages", "encode-decode"),
            expected("llm_d_inference_scheduler_disagg_decision_total", "", "encode-decode"),
            expected("llm_d_epp_pd_decision_total", "old", "prefill-decode"),
            expected("llm_d_epp_pd_decision_total", "old", "decode-only"),
            expected("llm_d_inference_scheduler_pd_decision_total", "", "decode-only"),
        ] {
            assert!(counted.contains(&series), "missing {series:?} in\n{text}");
        }
        assert_eq!(counted.len(), 8, "nothing for other handlers:\n{text}");
        assert!(text.contains("model_name=\"m-v2\""), "the target model labels it:\n{text}");
    }
}
