//! Which metrics each model-server engine publishes, and how they become
//! [`EndpointMetrics`].
//!
//! | engine | waiting | running | KV usage (0..1) | LoRA | KV capacity |
//! |---|---|---|---|---|---|
//! | vLLM | `vllm:num_requests_waiting` | `vllm:num_requests_running` | `vllm:kv_cache_usage_perc`, else `vllm:gpu_cache_usage_perc` | `vllm:lora_requests_info` | `vllm:cache_config_info{num_gpu_blocks}` |
//! | SGLang | `sglang:num_queue_reqs` | `sglang:num_running_reqs` | `sglang:token_usage` | - | - |
//! | TRT-LLM | `trtllm_num_requests_waiting` | `trtllm_num_requests_running` | `trtllm_kv_cache_utilization` | - | - |
//!
//! A custom mapping is built from the Go EPP's flag values (`--total-queued-requests-metric`,
//! `--total-running-requests-metric`, `--kv-cache-usage-percentage-metric`,
//! `--lora-info-metric`, `--cache-info-metric`), each `metric_name` optionally followed by
//! `{label="value",...}` selectors, see [`MetricSpec`].
//!
//! **Several matching series.** A server can publish one series per model name, engine core or
//! data-parallel rank. The scheduler wants the load of the whole server, so waiting and running
//! counts are **summed** over the matching series, while KV usage takes the **maximum**: the
//! fullest cache is the one a new request may be refused by, and averaging would hide it. For
//! LoRA info, vLLM publishes one series per state change with the change's timestamp as value;
//! the series with the **largest value** (the latest) is the current one. A spec with label
//! selectors narrows the series first.
//!
//! **Failures.** Extraction is strict: a parse error on any materialised line, a configured
//! queue/running/KV metric that is absent, or a value that is not a valid count or fraction
//! fails the whole page, so the collector keeps the endpoint's last good metrics instead of
//! publishing half-read ones. LoRA info and KV capacity are optional.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use scheduler_core::EndpointMetrics;

use crate::text::{Labels, NameFilter, ParseError, Parser, Sample};

/// The model-server engine of an endpoint, which decides the metric names read from it.
#[derive(Clone, Debug, Default)]
pub enum Engine {
    /// vLLM (the default, as in the Go EPP).
    #[default]
    Vllm,
    /// SGLang.
    Sglang,
    /// TensorRT-LLM's `trtllm-serve`.
    TrtLlm,
    /// Metric names given explicitly.
    Custom(Arc<MetricMapping>),
}

impl Engine {
    /// Whether both are the same engine (custom mappings: the same shared mapping).
    pub fn same_as(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Vllm, Self::Vllm)
            | (Self::Sglang, Self::Sglang)
            | (Self::TrtLlm, Self::TrtLlm) => true,
            (Self::Custom(a), Self::Custom(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// The metric mapping of this engine.
    pub fn mapping(&self) -> &MetricMapping {
        static VLLM: LazyLock<MetricMapping> = LazyLock::new(MetricMapping::vllm);
        static SGLANG: LazyLock<MetricMapping> = LazyLock::new(MetricMapping::sglang);
        static TRTLLM: LazyLock<MetricMapping> = LazyLock::new(MetricMapping::trtllm);
        match self {
            Self::Vllm => &VLLM,
            Self::Sglang => &SGLANG,
            Self::TrtLlm => &TRTLLM,
            Self::Custom(mapping) => mapping,
        }
    }

    /// The engine's name as used in configuration (`vllm`, `sglang`, `trtllm`, `custom`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Vllm => "vllm",
            Self::Sglang => "sglang",
            Self::TrtLlm => "trtllm",
            Self::Custom(_) => "custom",
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An engine name that is not known.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown engine {0:?}: expected one of vllm, sglang, trtllm (custom mappings are built from metric specs)"
)]
pub struct UnknownEngine(pub String);

impl FromStr for Engine {
    type Err = UnknownEngine;

    /// Parses `vllm`, `sglang` or `trtllm` (also `trt-llm`, `tensorrt-llm`), ignoring case.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name.trim().to_ascii_lowercase().as_str() {
            "vllm" => Ok(Self::Vllm),
            "sglang" => Ok(Self::Sglang),
            "trtllm" | "trt-llm" | "tensorrt-llm" => Ok(Self::TrtLlm),
            _ => Err(UnknownEngine(name.to_owned())),
        }
    }
}

/// A metric name with optional label selectors: `name` or `name{label="value",...}`.
///
/// The syntax is the Go EPP's flag syntax; values may be quoted or bare
/// (`name{label=value}`). A series matches when it has the name and every selected label has
/// exactly the given value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricSpec {
    name: Box<str>,
    selectors: Vec<(Box<str>, Box<str>)>,
}

/// A metric spec that cannot be parsed. Every variant names the spec.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// The spec is empty.
    #[error("empty metric spec")]
    Empty,
    /// The part before `{` is not a valid metric name.
    #[error("invalid metric name in metric spec {spec:?}")]
    InvalidMetricName {
        /// The spec.
        spec: String,
    },
    /// A `{` without its closing `}`, or text after it.
    #[error("metric spec {spec:?} must end with '}}' closing its label selectors")]
    UnclosedSelectors {
        /// The spec.
        spec: String,
    },
    /// A selector that is not `label="value"` or `label=value`.
    #[error(
        "invalid label selector {selector:?} in metric spec {spec:?}: expected label=\"value\""
    )]
    InvalidSelector {
        /// The spec.
        spec: String,
        /// The offending selector.
        selector: String,
    },
}

impl MetricSpec {
    /// A spec selecting every series named `name`.
    pub fn named(name: impl Into<Box<str>>) -> Self {
        Self { name: name.into(), selectors: Vec::new() }
    }

    /// Adds a label selector.
    pub fn with_label(mut self, label: impl Into<Box<str>>, value: impl Into<Box<str>>) -> Self {
        self.selectors.push((label.into(), value.into()));
        self
    }

    /// Parses `metric_name` or `metric_name{label="value",...}`.
    pub fn parse(spec: &str) -> Result<Self, SpecError> {
        let trimmed = spec.trim();
        if trimmed.is_empty() {
            return Err(SpecError::Empty);
        }
        let (name, selectors_text) = match trimmed.split_once('{') {
            None => (trimmed, None),
            Some((name, rest)) => {
                let inner = rest
                    .strip_suffix('}')
                    .ok_or_else(|| SpecError::UnclosedSelectors { spec: spec.to_owned() })?;
                (name.trim_end(), Some(inner))
            }
        };
        if !is_metric_name(name) {
            return Err(SpecError::InvalidMetricName { spec: spec.to_owned() });
        }
        let mut parsed = Self::named(name);
        for selector in selectors_text.into_iter().flat_map(split_selectors) {
            let selector = selector.trim();
            if selector.is_empty() {
                continue;
            }
            let invalid = || SpecError::InvalidSelector {
                spec: spec.to_owned(),
                selector: selector.to_owned(),
            };
            let (label, value) = selector.split_once('=').ok_or_else(invalid)?;
            let (label, value) = (label.trim(), value.trim());
            let value = match value.strip_prefix('"') {
                Some(quoted) => quoted.strip_suffix('"').ok_or_else(invalid)?,
                None => value,
            };
            if !is_label_name(label) || value.is_empty() || value.contains('"') {
                return Err(invalid());
            }
            parsed = parsed.with_label(label, value);
        }
        Ok(parsed)
    }

    /// The metric name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The label selectors.
    pub fn selectors(&self) -> impl Iterator<Item = (&str, &str)> {
        self.selectors.iter().map(|(label, value)| (&**label, &**value))
    }

    /// Whether `sample` is a series this spec selects.
    pub fn matches(&self, sample: &Sample<'_>) -> bool {
        *self.name == *sample.name && self.selects_labels(&sample.labels)
    }

    fn selects_labels(&self, labels: &Labels<'_>) -> bool {
        self.selectors
            .iter()
            .all(|(label, value)| labels.get(label).is_some_and(|found| *found == **value))
    }
}

/// Splits selectors on commas that are not inside quotes.
fn split_selectors(text: &str) -> impl Iterator<Item = &str> {
    let mut in_quotes = false;
    text.split(move |c| {
        if c == '"' {
            in_quotes = !in_quotes;
        }
        c == ',' && !in_quotes
    })
}

fn is_metric_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

fn is_label_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl FromStr for MetricSpec {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        Self::parse(spec)
    }
}

impl fmt::Display for MetricSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if !self.selectors.is_empty() {
            f.write_str("{")?;
            for (index, (label, value)) in self.selectors.iter().enumerate() {
                let separator = if index == 0 { "" } else { "," };
                write!(f, "{separator}{label}=\"{value}\"")?;
            }
            f.write_str("}")?;
        }
        Ok(())
    }
}

/// The values of the Go EPP's metric-name flags. An empty string leaves that metric unread.
#[derive(Clone, Copy, Debug, Default)]
pub struct FlagSpecs<'a> {
    /// `--total-queued-requests-metric`.
    pub total_queued_requests: &'a str,
    /// `--total-running-requests-metric`.
    pub total_running_requests: &'a str,
    /// `--kv-cache-usage-percentage-metric` (a fraction in `[0, 1]` despite the name).
    pub kv_cache_usage_percentage: &'a str,
    /// `--lora-info-metric`.
    pub lora_info: &'a str,
    /// `--cache-info-metric` (its `num_gpu_blocks` label gives the KV capacity).
    pub cache_info: &'a str,
}

/// A flag whose metric spec is invalid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("--{flag}: {source}")]
pub struct FlagSpecError {
    /// The flag, without the leading dashes.
    pub flag: &'static str,
    /// What is wrong with its value.
    #[source]
    pub source: SpecError,
}

/// Reading a page into [`EndpointMetrics`] failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ExtractError {
    /// The page is not valid exposition text.
    #[error("malformed metrics page: {0}")]
    Parse(#[from] ParseError),
    /// No series of a required metric was found.
    #[error("metric {metric} not found")]
    MissingMetric {
        /// The spec(s) looked for, alternatives separated by `|`.
        metric: String,
    },
    /// A count is negative or not finite, or a usage is not a number.
    #[error("metric {metric} has invalid value {value}")]
    InvalidValue {
        /// The metric.
        metric: String,
        /// Its value.
        value: f64,
    },
    /// An info label that must be a number is not one.
    #[error("label {label} of {metric} has invalid value {value:?}")]
    InvalidLabel {
        /// The metric.
        metric: String,
        /// The label.
        label: &'static str,
        /// Its value.
        value: String,
    },
}

/// The metrics read from one engine's page and how they map to [`EndpointMetrics`].
///
/// Each of waiting, running and KV usage holds alternatives in order of preference: the first
/// one present on the page is used (vLLM renamed its KV metric, and pages of both ages exist).
#[derive(Clone, Debug, Default)]
pub struct MetricMapping {
    waiting: Vec<MetricSpec>,
    running: Vec<MetricSpec>,
    kv_usage: Vec<MetricSpec>,
    lora_info: Option<MetricSpec>,
    cache_info: Option<MetricSpec>,
    /// Label of the cache info holding the block count; `num_gpu_blocks` when unset.
    cache_blocks_label: Option<Box<str>>,
    filter: NameFilter,
}

/// vLLM's LoRA info labels.
const RUNNING_ADAPTERS_LABEL: &str = "running_lora_adapters";
const WAITING_ADAPTERS_LABEL: &str = "waiting_lora_adapters";
const MAX_LORA_LABEL: &str = "max_lora";
/// vLLM's cache-config label holding the KV capacity.
const GPU_BLOCKS_LABEL: &str = "num_gpu_blocks";

impl MetricMapping {
    /// A mapping that reads nothing; add metrics with the `with_*` methods.
    pub fn new() -> Self {
        Self::default()
    }

    /// vLLM's metrics.
    pub fn vllm() -> Self {
        Self::new()
            .with_waiting(MetricSpec::named("vllm:num_requests_waiting"))
            .with_running(MetricSpec::named("vllm:num_requests_running"))
            .with_kv_usage(MetricSpec::named("vllm:kv_cache_usage_perc"))
            .with_kv_usage(MetricSpec::named("vllm:gpu_cache_usage_perc"))
            .with_lora_info(MetricSpec::named("vllm:lora_requests_info"))
            .with_cache_info(MetricSpec::named("vllm:cache_config_info"))
    }

    /// SGLang's metrics.
    pub fn sglang() -> Self {
        Self::new()
            .with_waiting(MetricSpec::named("sglang:num_queue_reqs"))
            .with_running(MetricSpec::named("sglang:num_running_reqs"))
            .with_kv_usage(MetricSpec::named("sglang:token_usage"))
    }

    /// TensorRT-LLM (`trtllm-serve`) metrics.
    pub fn trtllm() -> Self {
        Self::new()
            .with_waiting(MetricSpec::named("trtllm_num_requests_waiting"))
            .with_running(MetricSpec::named("trtllm_num_requests_running"))
            .with_kv_usage(MetricSpec::named("trtllm_kv_cache_utilization"))
    }

    /// A mapping from the Go EPP's flag values; empty values leave that metric unread.
    pub fn from_flag_specs(specs: &FlagSpecs<'_>) -> Result<Self, FlagSpecError> {
        fn parse(flag: &'static str, value: &str) -> Result<Option<MetricSpec>, FlagSpecError> {
            if value.trim().is_empty() {
                return Ok(None);
            }
            MetricSpec::parse(value).map(Some).map_err(|source| FlagSpecError { flag, source })
        }
        let mut mapping = Self::new();
        if let Some(spec) = parse("total-queued-requests-metric", specs.total_queued_requests)? {
            mapping = mapping.with_waiting(spec);
        }
        if let Some(spec) = parse("total-running-requests-metric", specs.total_running_requests)? {
            mapping = mapping.with_running(spec);
        }
        if let Some(spec) =
            parse("kv-cache-usage-percentage-metric", specs.kv_cache_usage_percentage)?
        {
            mapping = mapping.with_kv_usage(spec);
        }
        if let Some(spec) = parse("lora-info-metric", specs.lora_info)? {
            mapping = mapping.with_lora_info(spec);
        }
        if let Some(spec) = parse("cache-info-metric", specs.cache_info)? {
            mapping = mapping.with_cache_info(spec);
        }
        Ok(mapping)
    }

    /// Adds a source of the waiting-queue length (a fallback if one is already set).
    pub fn with_waiting(mut self, spec: MetricSpec) -> Self {
        self.waiting.push(spec);
        self.rebuild_filter()
    }

    /// Adds a source of the running-request count (a fallback if one is already set).
    pub fn with_running(mut self, spec: MetricSpec) -> Self {
        self.running.push(spec);
        self.rebuild_filter()
    }

    /// Adds a source of KV-cache usage in `[0, 1]` (a fallback if one is already set).
    pub fn with_kv_usage(mut self, spec: MetricSpec) -> Self {
        self.kv_usage.push(spec);
        self.rebuild_filter()
    }

    /// Sets the LoRA info metric (labels `running_lora_adapters`, `waiting_lora_adapters`,
    /// `max_lora`; value = time of the last change).
    pub fn with_lora_info(mut self, spec: MetricSpec) -> Self {
        self.lora_info = Some(spec);
        self.rebuild_filter()
    }

    /// Sets the cache-config info metric (label `num_gpu_blocks`).
    pub fn with_cache_info(mut self, spec: MetricSpec) -> Self {
        self.cache_info = Some(spec);
        self.rebuild_filter()
    }

    /// Reads the KV capacity from `label` of the cache info instead of `num_gpu_blocks` (SGLang
    /// publishes `num_pages`).
    pub fn with_cache_blocks_label(mut self, label: impl Into<Box<str>>) -> Self {
        self.cache_blocks_label = Some(label.into());
        self
    }

    fn rebuild_filter(mut self) -> Self {
        self.filter = NameFilter::exact(self.specs().map(|(_, spec)| spec.name()));
        self
    }

    fn specs(&self) -> impl Iterator<Item = (Slot, &MetricSpec)> {
        fn tagged(slot: Slot, specs: &[MetricSpec]) -> impl Iterator<Item = (Slot, &MetricSpec)> {
            specs.iter().map(move |spec| (slot, spec))
        }
        tagged(Slot::Waiting, &self.waiting)
            .chain(tagged(Slot::Running, &self.running))
            .chain(tagged(Slot::KvUsage, &self.kv_usage))
            .chain(self.lora_info.iter().map(|spec| (Slot::LoraInfo, spec)))
            .chain(self.cache_info.iter().map(|spec| (Slot::CacheInfo, spec)))
    }

    /// The filter that materialises exactly the samples this mapping reads.
    pub fn filter(&self) -> &NameFilter {
        &self.filter
    }

    /// Reads `page` (text, or the bytes as received: only the lines this mapping reads are
    /// decoded) into metrics observed at `scraped_at`.
    pub fn extract<P: AsRef<[u8]> + ?Sized>(
        &self,
        page: &P,
        scraped_at: Instant,
    ) -> Result<EndpointMetrics, ExtractError> {
        let specs: Vec<(Slot, &MetricSpec)> = self.specs().collect();
        let mut totals = vec![Aggregate::default(); specs.len()];
        let mut latest_lora: Option<(f64, Labels<'_>)> = None;
        let mut capacity_labels: Option<Labels<'_>> = None;

        for sample in Parser::from_bytes(page.as_ref()).with_filter(&self.filter).samples() {
            let sample = sample?;
            for ((slot, spec), total) in specs.iter().zip(totals.iter_mut()) {
                if !spec.matches(&sample) {
                    continue;
                }
                match slot {
                    Slot::Waiting | Slot::Running => {
                        if !(sample.value.is_finite() && sample.value >= 0.0) {
                            return Err(invalid_value(spec, sample.value));
                        }
                        total.add(sample.value);
                    }
                    Slot::KvUsage => {
                        if sample.value.is_nan() {
                            return Err(invalid_value(spec, sample.value));
                        }
                        total.add(sample.value);
                    }
                    Slot::LoraInfo => {
                        // NaN never compares greater, so a NaN series can never be the latest.
                        if latest_lora.as_ref().is_none_or(|(latest, _)| sample.value > *latest) {
                            latest_lora = Some((sample.value, sample.labels));
                        }
                    }
                    Slot::CacheInfo => {
                        capacity_labels.get_or_insert(sample.labels);
                    }
                }
            }
        }

        let pick = |wanted: Slot| first_present(&specs, &totals, wanted);
        let mut metrics = EndpointMetrics { updated_at: Some(scraped_at), ..Default::default() };
        if !self.waiting.is_empty() {
            metrics.waiting_queue =
                count(pick(Slot::Waiting).ok_or_else(|| missing(&self.waiting))?.sum);
        }
        if !self.running.is_empty() {
            metrics.running = count(pick(Slot::Running).ok_or_else(|| missing(&self.running))?.sum);
        }
        if !self.kv_usage.is_empty() {
            let usage = pick(Slot::KvUsage).ok_or_else(|| missing(&self.kv_usage))?.max;
            metrics.kv_usage = usage.clamp(0.0, 1.0);
        }
        if let (Some(spec), Some((_, labels))) = (&self.lora_info, latest_lora) {
            metrics.active_lora_adapters = adapter_list(labels.get(RUNNING_ADAPTERS_LABEL));
            metrics.waiting_lora_adapters = adapter_list(labels.get(WAITING_ADAPTERS_LABEL));
            metrics.max_lora_adapters = match labels.get(MAX_LORA_LABEL) {
                None => 0,
                Some(text) => parse_whole_number(&text)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| ExtractError::InvalidLabel {
                        metric: spec.to_string(),
                        label: MAX_LORA_LABEL,
                        value: text.into_owned(),
                    })?,
            };
        }
        // vLLM reports `num_gpu_blocks="None"` until the engine has profiled memory: capacity is
        // informational, so anything unreadable means "unknown" rather than a failed scrape.
        metrics.kv_capacity_blocks = capacity_labels
            .and_then(|labels| {
                labels.get(self.cache_blocks_label.as_deref().unwrap_or(GPU_BLOCKS_LABEL))
            })
            .and_then(|text| parse_whole_number(&text));
        Ok(metrics)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Waiting,
    Running,
    KvUsage,
    LoraInfo,
    CacheInfo,
}

#[derive(Clone, Copy, Debug)]
struct Aggregate {
    series: u32,
    sum: f64,
    max: f64,
}

impl Default for Aggregate {
    fn default() -> Self {
        Self { series: 0, sum: 0.0, max: f64::NEG_INFINITY }
    }
}

impl Aggregate {
    fn add(&mut self, value: f64) {
        self.series += 1;
        self.sum += value;
        self.max = self.max.max(value);
    }
}

/// The aggregate of the first alternative of `wanted` that matched at least one series.
fn first_present(
    specs: &[(Slot, &MetricSpec)],
    totals: &[Aggregate],
    wanted: Slot,
) -> Option<Aggregate> {
    specs
        .iter()
        .zip(totals)
        .find(|((slot, _), total)| *slot == wanted && total.series > 0)
        .map(|(_, total)| *total)
}

fn missing(alternatives: &[MetricSpec]) -> ExtractError {
    let metric = alternatives.iter().map(ToString::to_string).collect::<Vec<_>>().join("|");
    ExtractError::MissingMetric { metric }
}

fn invalid_value(spec: &MetricSpec, value: f64) -> ExtractError {
    ExtractError::InvalidValue { metric: spec.to_string(), value }
}

/// Rounds a non-negative finite sum to a count, saturating at `u32::MAX`.
fn count(sum: f64) -> u32 {
    // `as` saturates for floats, which is the intent for absurdly large counts.
    sum.round() as u32
}

/// Parses `4` or `4.0` (Python clients format integers as floats).
fn parse_whole_number(text: &str) -> Option<u64> {
    let text = text.trim();
    if let Ok(n) = text.parse::<u64>() {
        return Some(n);
    }
    let float = text.parse::<f64>().ok()?;
    (float.is_finite() && float >= 0.0 && float.fract() == 0.0 && float <= u64::MAX as f64)
        .then_some(float as u64)
}

fn adapter_list(text: Option<Cow<'_, str>>) -> Vec<Arc<str>> {
    text.map(|text| {
        text.split(',').map(str::trim).filter(|name| !name.is_empty()).map(Arc::from).collect()
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Instant {
        Instant::now()
    }

    #[test]
    fn engines_parse_from_names() {
        assert!(matches!("vllm".parse(), Ok(Engine::Vllm)));
        assert!(matches!("SGLang".parse(), Ok(Engine::Sglang)));
        assert!(matches!("trtllm".parse(), Ok(Engine::TrtLlm)));
        assert!(matches!("tensorrt-llm".parse(), Ok(Engine::TrtLlm)));
        let error = "tgi".parse::<Engine>().expect_err("unknown");
        assert!(error.to_string().contains("\"tgi\""), "{error}");
        assert!(matches!(Engine::default(), Engine::Vllm));
    }

    #[test]
    fn specs_parse_with_and_without_selectors() -> Result<(), SpecError> {
        let plain = MetricSpec::parse("vllm:num_requests_waiting")?;
        assert_eq!(plain.name(), "vllm:num_requests_waiting");
        assert_eq!(plain.selectors().count(), 0);

        let selected = MetricSpec::parse(r#" m{model_name="a,b", engine=0 ,} "#)?;
        assert_eq!(
            selected.selectors().collect::<Vec<_>>(),
            [("model_name", "a,b"), ("engine", "0")]
        );
        assert_eq!(selected.to_string(), r#"m{model_name="a,b",engine="0"}"#);
        assert_eq!(MetricSpec::parse(&selected.to_string())?, selected);
        Ok(())
    }

    #[test]
    fn spec_errors_name_the_spec() {
        let cases = [
            ("", SpecError::Empty),
            ("9lives", SpecError::InvalidMetricName { spec: "9lives".into() }),
            ("m{a=\"b\"", SpecError::UnclosedSelectors { spec: "m{a=\"b\"".into() }),
            ("m{a=\"b\"} x", SpecError::UnclosedSelectors { spec: "m{a=\"b\"} x".into() }),
            ("m{a}", SpecError::InvalidSelector { spec: "m{a}".into(), selector: "a".into() }),
            ("m{a=}", SpecError::InvalidSelector { spec: "m{a=}".into(), selector: "a=".into() }),
            (
                "m{1a=b}",
                SpecError::InvalidSelector { spec: "m{1a=b}".into(), selector: "1a=b".into() },
            ),
            (
                "m{a=\"b}",
                SpecError::InvalidSelector { spec: "m{a=\"b}".into(), selector: "a=\"b".into() },
            ),
        ];
        for (spec, expected) in cases {
            assert_eq!(MetricSpec::parse(spec), Err(expected), "{spec:?}");
        }
        let message = MetricSpec::parse("m{a}").expect_err("invalid").to_string();
        assert!(message.contains("\"m{a}\""), "{message}");

        let flag_error = MetricMapping::from_flag_specs(&FlagSpecs {
            kv_cache_usage_percentage: "bad name",
            ..Default::default()
        })
        .expect_err("invalid");
        assert_eq!(flag_error.flag, "kv-cache-usage-percentage-metric");
        assert!(flag_error.to_string().starts_with("--kv-cache-usage-percentage-metric: "));
    }

    #[test]
    fn sums_counts_and_takes_the_largest_usage() -> Result<(), ExtractError> {
        let page = "vllm:num_requests_waiting{engine=\"0\"} 2\n\
                    vllm:num_requests_waiting{engine=\"1\"} 3\n\
                    vllm:num_requests_running{engine=\"0\"} 4.0\n\
                    vllm:num_requests_running{engine=\"1\"} 1.0\n\
                    vllm:kv_cache_usage_perc{engine=\"0\"} 0.5\n\
                    vllm:kv_cache_usage_perc{engine=\"1\"} 0.75\n";
        let scraped_at = now();
        let metrics = Engine::Vllm.mapping().extract(page, scraped_at)?;
        assert_eq!((metrics.waiting_queue, metrics.running, metrics.kv_usage), (5, 5, 0.75));
        assert_eq!(metrics.updated_at, Some(scraped_at));
        assert_eq!(metrics.kv_capacity_blocks, None);
        assert!(metrics.active_lora_adapters.is_empty());
        Ok(())
    }

    #[test]
    fn kv_usage_falls_back_to_the_older_name_only_when_the_newer_is_absent()
    -> Result<(), ExtractError> {
        let old = "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\nvllm:gpu_cache_usage_perc 0.3\n";
        assert_eq!(Engine::Vllm.mapping().extract(old, now())?.kv_usage, 0.3);
        let both = format!("{old}vllm:kv_cache_usage_perc 0.1\n");
        assert_eq!(Engine::Vllm.mapping().extract(&both, now())?.kv_usage, 0.1);
        Ok(())
    }

    #[test]
    fn lora_info_takes_the_latest_series() -> Result<(), ExtractError> {
        let page = "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\nvllm:kv_cache_usage_perc 0\n\
            vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"old\",waiting_lora_adapters=\"\"} 1.7e9\n\
            vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"sql, chat\",waiting_lora_adapters=\"tool\"} 1.7000001e9\n\
            vllm:lora_requests_info{max_lora=\"8\",running_lora_adapters=\"nan\",waiting_lora_adapters=\"\"} NaN\n\
            vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"27153\"} 1.0\n";
        let metrics = Engine::Vllm.mapping().extract(page, now())?;
        assert_eq!(metrics.active_lora_adapters, [Arc::from("sql"), Arc::from("chat")]);
        assert_eq!(metrics.waiting_lora_adapters, [Arc::from("tool")]);
        assert_eq!(metrics.max_lora_adapters, 4);
        assert_eq!(metrics.kv_capacity_blocks, Some(27153));
        Ok(())
    }

    #[test]
    fn unknown_capacity_and_bad_max_lora() {
        let base = "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\nvllm:kv_cache_usage_perc 0\n";
        let none = format!("{base}vllm:cache_config_info{{num_gpu_blocks=\"None\"}} 1\n");
        assert_eq!(
            Engine::Vllm.mapping().extract(&none, now()).map(|m| m.kv_capacity_blocks),
            Ok(None)
        );
        let bad = format!("{base}vllm:lora_requests_info{{max_lora=\"many\"}} 1\n");
        assert!(matches!(
            Engine::Vllm.mapping().extract(&bad, now()),
            Err(ExtractError::InvalidLabel { label: "max_lora", .. })
        ));
    }

    #[test]
    fn strict_failures() {
        let mapping = Engine::Sglang.mapping();
        let missing =
            mapping.extract("sglang:num_queue_reqs 1\nsglang:num_running_reqs 1\n", now());
        assert_eq!(
            missing,
            Err(ExtractError::MissingMetric { metric: "sglang:token_usage".into() })
        );
        let negative = mapping.extract("sglang:num_queue_reqs -1\n", now());
        assert!(matches!(negative, Err(ExtractError::InvalidValue { .. })));
        let garbage = mapping.extract("<html>oops</html>", now());
        assert!(matches!(garbage, Err(ExtractError::Parse(_))));
        let vllm_missing_kv = Engine::Vllm
            .mapping()
            .extract("vllm:num_requests_waiting 0\nvllm:num_requests_running 0\n", now())
            .expect_err("missing");
        assert_eq!(
            vllm_missing_kv.to_string(),
            "metric vllm:kv_cache_usage_perc|vllm:gpu_cache_usage_perc not found"
        );
    }

    #[test]
    fn custom_specs_select_series_by_label() -> Result<(), Box<dyn std::error::Error>> {
        let mapping = MetricMapping::from_flag_specs(&FlagSpecs {
            total_queued_requests: "queue{model=\"a\"}",
            total_running_requests: "running",
            kv_cache_usage_percentage: "kv{pool=gpu}",
            ..Default::default()
        })?;
        let page = "queue{model=\"a\"} 1\nqueue{model=\"b\"} 10\nqueue{model=\"a\",lora=\"x\"} 2\n\
                    running 3\nkv{pool=\"cpu\"} 0.9\nkv{pool=\"gpu\"} 1.5\n";
        let metrics = mapping.extract(page, now())?;
        assert_eq!((metrics.waiting_queue, metrics.running), (3, 3));
        assert_eq!(metrics.kv_usage, 1.0, "usage is clamped to [0, 1]");

        let partial = MetricMapping::from_flag_specs(&FlagSpecs {
            total_running_requests: "running",
            ..Default::default()
        })?;
        assert_eq!(partial.extract("running 2\n", now())?.running, 2);
        Ok(())
    }
}
