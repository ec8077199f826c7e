//! The engines of a `core-metrics-extractor`: its `engineConfigs` (metric specifications per
//! engine name) turned into [`Engine`] mappings, with the built-in engines the Go extractor
//! ships added unless a config of the same name replaces them.
//!
//! An endpoint names its engine with the endpoints file's `engine`, else with its label
//! `engineLabelKey` (then the legacy `inference.networking.k8s.io/engine-type`), as the Go
//! extractor reads pod labels; a name that no config defines falls back to `defaultEngine`, as
//! the Go mapping registry falls back, except that the names this crate has always accepted
//! (`trtllm`, `tensorrt-llm`, ...) keep their meaning.
//!
//! Read: `queuedRequestsSpec`, `runningRequestsSpec`, `kvUsageSpec`, `loraSpec`,
//! `cacheInfoSpec` with `cacheNumBlocksLabelName`. Checked but not read (the endpoint metrics
//! have no place for them): `cacheBlockSizeLabelName`, `cacheBlockSizeSpec`,
//! `cacheNumBlocksSpec`, `customMetrics`.

use std::collections::BTreeMap;
use std::sync::Arc;

use scheduler_core::data_layer::plugins::{CoreMetricsExtractorParameters, EngineConfig};

use crate::mapping::{Engine, MetricMapping, MetricSpec, SpecError};

/// A metric specification of an engine config that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("engine {engine:?} {field}: {source}")]
pub struct EngineConfigError {
    /// The engine's name.
    pub engine: String,
    /// The parameter (`queuedRequestsSpec`, `customMetrics[0].metricSpec`).
    pub field: String,
    /// What is wrong with it.
    #[source]
    pub source: SpecError,
}

/// Engines by name, and the one used for endpoints that name none.
#[derive(Clone, Debug)]
pub struct EngineSet {
    engines: BTreeMap<String, Engine>,
    default: Engine,
    label_key: String,
}

/// The label key the Go extractor still reads when `engineLabelKey` is absent from a pod.
pub const LEGACY_ENGINE_LABEL_KEY: &str = "inference.networking.k8s.io/engine-type";

impl Default for EngineSet {
    /// The built-in engines, vLLM by default.
    fn default() -> Self {
        Self {
            engines: builtins(),
            default: Engine::Vllm,
            label_key: scheduler_core::data_layer::plugins::DEFAULT_ENGINE_LABEL_KEY.to_owned(),
        }
    }
}

impl EngineSet {
    /// The engines of an extractor's (validated) parameters.
    pub fn from_extractor(
        parameters: &CoreMetricsExtractorParameters,
    ) -> Result<Self, EngineConfigError> {
        let mut engines = builtins();
        for config in &parameters.engine_configs {
            let mapping = mapping_of(config)?;
            engines.insert(config.name.clone(), Engine::Custom(Arc::new(mapping)));
        }
        // The loader checked that the default engine is configured or built in; vLLM covers a
        // caller that skipped it.
        let default = engines.get(&parameters.default_engine).cloned().unwrap_or(Engine::Vllm);
        Ok(Self { engines, default, label_key: parameters.engine_label_key.clone() })
    }

    /// The engine of endpoints that name none.
    pub fn default_engine(&self) -> &Engine {
        &self.default
    }

    /// The engine an endpoint naming `name` is read with.
    pub fn resolve(&self, name: Option<&str>) -> Engine {
        let Some(name) = name else { return self.default.clone() };
        match self.engines.get(name) {
            Some(engine) => engine.clone(),
            None => name.parse::<Engine>().unwrap_or_else(|_| self.default.clone()),
        }
    }

    /// The engine of an endpoint that names `engine`, else carries `labels`.
    pub fn resolve_endpoint(
        &self,
        engine: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Engine {
        let named = engine
            .or_else(|| labels.get(&self.label_key).map(String::as_str))
            .or_else(|| labels.get(LEGACY_ENGINE_LABEL_KEY).map(String::as_str));
        self.resolve(named)
    }

    /// Every engine name defined, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.engines.keys().map(String::as_str)
    }
}

/// The Go extractor's built-in engines.
fn builtins() -> BTreeMap<String, Engine> {
    let custom = |specs: [&str; 3]| {
        let mut mapping = MetricMapping::new();
        // Static, known-good specs: a parse failure would be a typo caught by the tests.
        let parse = |spec: &str| MetricSpec::parse(spec).ok();
        if let Some(spec) = parse(specs[0]) {
            mapping = mapping.with_waiting(spec);
        }
        if let Some(spec) = parse(specs[1]) {
            mapping = mapping.with_running(spec);
        }
        if let Some(spec) = (!specs[2].is_empty()).then(|| parse(specs[2])).flatten() {
            mapping = mapping.with_kv_usage(spec);
        }
        Engine::Custom(Arc::new(mapping))
    };
    BTreeMap::from([
        ("vllm".to_owned(), Engine::Vllm),
        ("sglang".to_owned(), Engine::Sglang),
        ("trtllm-serve".to_owned(), Engine::TrtLlm),
        (
            "triton-tensorrt-llm".to_owned(),
            custom([
                "nv_trt_llm_request_metrics{request_type=waiting}",
                "nv_trt_llm_request_metrics{request_type=scheduled}",
                "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}",
            ]),
        ),
        (
            "triton".to_owned(),
            custom(["nv_inference_pending_request_count", "nv_inference_exec_count", ""]),
        ),
    ])
}

/// The mapping of one engine config; empty specs are not read.
fn mapping_of(config: &EngineConfig) -> Result<MetricMapping, EngineConfigError> {
    let parse = |field: &str, spec: &str| -> Result<Option<MetricSpec>, EngineConfigError> {
        if spec.trim().is_empty() {
            return Ok(None);
        }
        MetricSpec::parse(spec).map(Some).map_err(|source| EngineConfigError {
            engine: config.name.clone(),
            field: field.to_owned(),
            source,
        })
    };
    let mut mapping = MetricMapping::new();
    if let Some(spec) = parse("queuedRequestsSpec", &config.queued_requests_spec)? {
        mapping = mapping.with_waiting(spec);
    }
    if let Some(spec) = parse("runningRequestsSpec", &config.running_requests_spec)? {
        mapping = mapping.with_running(spec);
    }
    if let Some(spec) = parse("kvUsageSpec", &config.kv_usage_spec)? {
        mapping = mapping.with_kv_usage(spec);
    }
    if let Some(spec) = parse("loraSpec", &config.lora_spec)? {
        mapping = mapping.with_lora_info(spec);
    }
    if let Some(spec) = parse("cacheInfoSpec", &config.cache_info_spec)? {
        mapping = mapping.with_cache_info(spec);
    }
    if !config.cache_num_blocks_label_name.is_empty() {
        mapping = mapping.with_cache_blocks_label(config.cache_num_blocks_label_name.as_str());
    }
    parse("cacheBlockSizeSpec", &config.cache_block_size_spec)?;
    parse("cacheNumBlocksSpec", &config.cache_num_blocks_spec)?;
    for (index, custom) in config.custom_metrics.iter().enumerate() {
        parse(&format!("customMetrics[{index}].metricSpec"), &custom.metric_spec)?;
    }
    Ok(mapping)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn parameters(value: serde_json::Value) -> CoreMetricsExtractorParameters {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn custom_metric_names_are_read() {
        let set = EngineSet::from_extractor(&parameters(serde_json::json!({
            "defaultEngine": "mine",
            "engineConfigs": [{
                "name": "mine",
                "queuedRequestsSpec": "my_waiting{tier=gold}",
                "runningRequestsSpec": "my_running",
                "kvUsageSpec": "my_kv",
                "cacheInfoSpec": "my_cache",
                "cacheNumBlocksLabelName": "num_pages"
            }]
        })))
        .unwrap();
        let page = "my_waiting{tier=\"gold\"} 4\nmy_waiting{tier=\"free\"} 100\nmy_running 2\n\
                    my_kv 0.5\nmy_cache{num_pages=\"900\"} 1\n";
        let metrics = set.default_engine().mapping().extract(page, Instant::now()).unwrap();
        assert_eq!((metrics.waiting_queue, metrics.running, metrics.kv_usage), (4, 2, 0.5));
        assert_eq!(metrics.kv_capacity_blocks, Some(900));
        // An unknown name falls back to the default engine, a known one is itself.
        assert!(set.resolve(Some("unheard-of")).same_as(set.default_engine()));
        assert!(set.resolve(Some("sglang")).same_as(&Engine::Sglang));
        assert!(set.resolve(Some("trtllm")).same_as(&Engine::TrtLlm), "this crate's alias");
        let labels = BTreeMap::from([(
            scheduler_core::data_layer::plugins::DEFAULT_ENGINE_LABEL_KEY.to_owned(),
            "sglang".to_owned(),
        )]);
        assert!(set.resolve_endpoint(None, &labels).same_as(&Engine::Sglang), "by label");
        assert!(set.resolve_endpoint(Some("vllm"), &labels).same_as(&Engine::Vllm), "named wins");
        let legacy = BTreeMap::from([(LEGACY_ENGINE_LABEL_KEY.to_owned(), "sglang".to_owned())]);
        assert!(set.resolve_endpoint(None, &legacy).same_as(&Engine::Sglang));
        assert!(set.resolve_endpoint(None, &BTreeMap::new()).same_as(set.default_engine()));
    }

    #[test]
    fn builtins_are_present_and_replaceable() {
        let set = EngineSet::from_extractor(&CoreMetricsExtractorParameters::default()).unwrap();
        assert!(set.default_engine().same_as(&Engine::Vllm));
        let names: Vec<&str> = set.names().collect();
        assert_eq!(names, ["sglang", "triton", "triton-tensorrt-llm", "trtllm-serve", "vllm"]);
        let page = "nv_trt_llm_request_metrics{request_type=\"waiting\"} 3\n\
                    nv_trt_llm_request_metrics{request_type=\"scheduled\"} 5\n\
                    nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"fraction\"} 0.25\n";
        let triton = set.resolve(Some("triton-tensorrt-llm"));
        let metrics = triton.mapping().extract(page, Instant::now()).unwrap();
        assert_eq!((metrics.waiting_queue, metrics.running, metrics.kv_usage), (3, 5, 0.25));

        let replaced = EngineSet::from_extractor(&parameters(serde_json::json!({
            "engineConfigs": [{"name": "vllm", "queuedRequestsSpec": "q"}]
        })))
        .unwrap();
        let metrics = replaced.default_engine().mapping().extract("q 7\n", Instant::now());
        assert_eq!(metrics.unwrap().waiting_queue, 7, "only the replacement's metrics are read");
    }

    #[test]
    fn bad_specs_name_engine_and_field() {
        let error = EngineSet::from_extractor(&parameters(serde_json::json!({
            "engineConfigs": [{"name": "mine", "customMetrics": [
                {"attributeKey": "a", "metricSpec": "ok"},
                {"attributeKey": "b", "metricSpec": "bad{"}
            ]}]
        })))
        .unwrap_err();
        assert_eq!(
            (error.engine.as_str(), error.field.as_str()),
            ("mine", "customMetrics[1].metricSpec")
        );
        assert!(error.to_string().starts_with("engine \"mine\" customMetrics[1].metricSpec: "));
    }
}
