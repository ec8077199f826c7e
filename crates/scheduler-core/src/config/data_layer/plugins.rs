//! The data-layer plugin types and their parameters, as the Go EPP declares them.
//!
//! They are pure configuration here: the core cannot scrape or watch files, so a constructed
//! data-layer plugin is its validated parameters ([`DataLayerPlugin`]), and the server that runs
//! the data layer reads them. Defaults are the Go factories' defaults; unknown keys are errors,
//! like every other plugin's.

use std::time::Duration;

use serde::Deserialize;

use crate::config::registry::{NoParameters, Plugin, PluginError, PluginRegistry, PluginSpec};

/// Type of the source that scrapes each endpoint's Prometheus metrics page.
pub const METRICS_DATA_SOURCE_TYPE: &str = "metrics-data-source";
/// Type of the extractor that reads the engine metrics (queue, running, KV usage, LoRA).
pub const CORE_METRICS_EXTRACTOR_TYPE: &str = "core-metrics-extractor";
/// Type of the source that polls each endpoint's OpenAI model list.
pub const MODELS_DATA_SOURCE_TYPE: &str = "models-data-source";
/// Type of the extractor that keeps the served models and adapters of each endpoint.
pub const MODELS_DATA_EXTRACTOR_TYPE: &str = "models-data-extractor";
/// Type of the discovery that reads the endpoints from a file.
pub const FILE_DISCOVERY_TYPE: &str = "file-discovery";
/// Type of the source notified when endpoints are added or removed.
pub const ENDPOINT_NOTIFICATION_SOURCE_TYPE: &str = "endpoint-notification-source";
/// GIE v1.4's name of the engine-metrics extractor (`core-metrics-extractor` since v1.5).
pub const MODEL_SERVER_PROTOCOL_METRICS_TYPE: &str = "model-server-protocol-metrics";
/// Type of the source that scrapes each endpoint's NVIDIA DCGM exporter (alpha in llm-d).
pub const DCGM_DATA_SOURCE_TYPE: &str = "dcgm-data-source";
/// Type of the extractor that reads GPU utilization from a DCGM exporter page (alpha).
pub const DCGM_EXTRACTOR_TYPE: &str = "dcgm-extractor";
/// The attribute under which `dcgm-extractor` publishes an endpoint's GPU utilization.
pub const GPU_UTILIZATION_ATTRIBUTE: &str = "GPUUtilization";
/// Type of the discovery that reads peer clusters from a file, by DNS name or IP (alpha).
pub const MULTICLUSTER_FILE_DISCOVERY_TYPE: &str = "multicluster-file-discovery";
/// Type of the source that scrapes each peer cluster's EPP metrics page (alpha).
pub const MULTICLUSTER_METRICS_DATA_SOURCE_TYPE: &str = "multicluster-metrics-data-source";
/// Type of the extractor that reads a peer cluster's pool averages (alpha).
pub const MULTICLUSTER_METRICS_EXTRACTOR_TYPE: &str = "multicluster-metrics-extractor";
/// The attribute under which `multicluster-metrics-extractor` publishes a peer cluster's
/// average KV-cache utilization.
pub const MULTICLUSTER_KV_CACHE_UTILIZATION_ATTRIBUTE: &str =
    "llm-d.ai/multicluster-kv-cache-utilization";
/// The attribute under which `multicluster-metrics-extractor` publishes a peer cluster's
/// average queue size.
pub const MULTICLUSTER_QUEUE_SIZE_ATTRIBUTE: &str = "llm-d.ai/multicluster-queue-size";
/// The metric a peer cluster's EPP publishes its average KV-cache utilization as.
pub const DEFAULT_MULTICLUSTER_KV_CACHE_METRIC: &str = "llm_d_epp_average_kv_cache_utilization";
/// The metric a peer cluster's EPP publishes its average queue size as.
pub const DEFAULT_MULTICLUSTER_QUEUE_METRIC: &str = "llm_d_epp_average_queue_size";
/// The label of a peer cluster's entry naming the host that serves its metrics.
pub const METRICS_ADDRESS_LABEL: &str = "metricsAddress";
/// The label of a peer cluster's entry naming the port that serves its metrics.
pub const METRICS_PORT_LABEL: &str = "metricsPort";
/// Port the DCGM exporter listens on unless `port` says otherwise.
pub const DEFAULT_DCGM_PORT: u16 = 9400;
/// Engine label key GIE v1.4's `model-server-protocol-metrics` reads by default.
pub const GIE_V14_ENGINE_LABEL_KEY: &str = "inference.networking.k8s.io/engine-type";
/// The engine configurations GIE v1.4's extractor ships.
pub const GIE_V14_BUILTIN_ENGINE_NAMES: &[&str] = &["vllm", "sglang"];

/// Default metrics page path.
pub const DEFAULT_METRICS_PATH: &str = "/metrics";
/// Default model list path.
pub const DEFAULT_MODELS_PATH: &str = "/v1/models";
/// Default label naming an endpoint's engine.
pub const DEFAULT_ENGINE_LABEL_KEY: &str = "llm-d.ai/engine-type";
/// Engine of endpoints that name none.
pub const DEFAULT_ENGINE_NAME: &str = "vllm";
/// The engine configurations the Go extractor ships; a user config of the same name replaces
/// one.
pub const BUILTIN_ENGINE_NAMES: &[&str] =
    &["vllm", "sglang", "trtllm-serve", "triton-tensorrt-llm", "triton"];
/// Engine name the Go extractor reserves for its fallback mapping.
pub const RESERVED_ENGINE_NAME: &str = "default";

/// URL scheme of an HTTP data source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    /// Plain HTTP (the default).
    #[default]
    Http,
    /// HTTP over TLS.
    Https,
}

/// TLS settings shared by the HTTP sources; they only matter with [`Scheme::Https`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceTls {
    /// Skip verifying the server certificate (Go default: `true`).
    pub insecure_skip_verify: bool,
    /// PEM CA bundle verifying the server.
    pub ca_cert_path: Option<String>,
    /// Client certificate for mutual TLS (set together with the key).
    pub client_cert_path: Option<String>,
    /// Client key for mutual TLS.
    pub client_key_path: Option<String>,
}

/// Parameters of `metrics-data-source`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsSourceParameters {
    /// `scheme`: `http` (default) or `https`.
    pub scheme: Scheme,
    /// `path`: the metrics page (default `/metrics`).
    pub path: String,
    /// `port`: scrape this port instead of the endpoint's serving port.
    pub port: Option<u16>,
    /// `insecureSkipVerify`, `caCertPath`, `clientCertPath`, `clientKeyPath`.
    pub tls: SourceTls,
    /// `interval`: scrape period; `None` means every refresh tick.
    pub interval: Option<Duration>,
}

/// Parameters of `models-data-source`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelsSourceParameters {
    /// `scheme`: `http` (default) or `https`.
    pub scheme: Scheme,
    /// `path`: the model list (default `/v1/models`).
    pub path: String,
    /// `insecureSkipVerify`, `caCertPath`, `clientCertPath`, `clientKeyPath`.
    pub tls: SourceTls,
    /// `interval`: poll period; `None` means every refresh tick.
    pub interval: Option<Duration>,
}

/// Parameters of `dcgm-data-source`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DcgmSourceParameters {
    /// `scheme`: `http` (default) or `https`.
    pub scheme: Scheme,
    /// `path`: the exporter's metrics page (default `/metrics`).
    pub path: String,
    /// `port`: the exporter's port (default 9400); `None` when the config says `0`, which
    /// (as in Go) means no override: the endpoint's own port is scraped.
    pub port: Option<u16>,
    /// `insecureSkipVerify` (default `true`); the Go source takes no CA or client identity,
    /// so the other TLS fields are always unset.
    pub tls: SourceTls,
    /// `useNodeAddress`: scrape the endpoint's node (a DaemonSet exporter) instead of the
    /// endpoint's own address (a sidecar exporter).
    pub use_node_address: bool,
    /// `interval`: scrape period; `None` means every refresh tick.
    pub interval: Option<Duration>,
}

/// Parameters of `multicluster-metrics-extractor`, with the attributes it publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterMetricsExtractorParameters {
    /// `kvCacheUtilizationMetric`: the spec of the peer's average KV-cache utilization.
    pub kv_cache_utilization_metric: String,
    /// `queueSizeMetric`: the spec of the peer's average queue size.
    pub queue_size_metric: String,
    /// Where the values are published.
    pub attributes: crate::pool::attributes::AttributeHandle,
}

/// Parameters of `core-metrics-extractor`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct CoreMetricsExtractorParameters {
    /// Label naming an endpoint's engine (default `llm-d.ai/engine-type`).
    pub engine_label_key: String,
    /// Engine of endpoints that name none (default `vllm`); any configured or built-in name.
    pub default_engine: String,
    /// Engine metric specifications; the built-in ones are added unless a config of the same
    /// name replaces them.
    pub engine_configs: Vec<EngineConfig>,
}

impl Default for CoreMetricsExtractorParameters {
    fn default() -> Self {
        Self {
            engine_label_key: DEFAULT_ENGINE_LABEL_KEY.to_owned(),
            default_engine: DEFAULT_ENGINE_NAME.to_owned(),
            engine_configs: Vec::new(),
        }
    }
}

/// One engine's metric specifications, each `name` or `name{label=value,...}`; an empty one is
/// not read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EngineConfig {
    /// The engine's name, as endpoints name it.
    pub name: String,
    /// Waiting requests.
    #[serde(default)]
    pub queued_requests_spec: String,
    /// Running requests.
    #[serde(default)]
    pub running_requests_spec: String,
    /// KV-cache usage in `[0, 1]`.
    #[serde(default)]
    pub kv_usage_spec: String,
    /// LoRA info (vLLM's `lora_requests_info` labels).
    #[serde(default)]
    pub lora_spec: String,
    /// Cache-config info gauge whose labels give block size and block count.
    #[serde(default)]
    pub cache_info_spec: String,
    /// Label of [`Self::cache_info_spec`] holding the block size (default `block_size`).
    #[serde(default)]
    pub cache_block_size_label_name: String,
    /// Label of [`Self::cache_info_spec`] holding the block count (default `num_gpu_blocks`).
    #[serde(default)]
    pub cache_num_blocks_label_name: String,
    /// Block size as a gauge value (instead of the info labels).
    #[serde(default)]
    pub cache_block_size_spec: String,
    /// Block count as a gauge value (instead of the info labels).
    #[serde(default)]
    pub cache_num_blocks_spec: String,
    /// Further scalar metrics kept under attribute keys.
    #[serde(default)]
    pub custom_metrics: Vec<CustomMetricConfig>,
}

/// A scalar metric kept under an attribute key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CustomMetricConfig {
    /// Where the value is kept.
    pub attribute_key: String,
    /// The metric, `name` or `name{label=value,...}`.
    pub metric_spec: String,
}

/// Parameters of `file-discovery`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileDiscoveryParameters {
    /// The endpoints file (required; the format of `--endpoints-file`).
    #[serde(default)]
    pub path: String,
    /// Reload the file when it changes (default `false`: read once at start).
    #[serde(default)]
    pub watch_file: bool,
}

/// A constructed data-layer plugin: what it is and its validated parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataLayerPlugin {
    /// `metrics-data-source`.
    MetricsSource(MetricsSourceParameters),
    /// `core-metrics-extractor`.
    CoreMetricsExtractor(CoreMetricsExtractorParameters),
    /// `models-data-source`.
    ModelsSource(ModelsSourceParameters),
    /// `models-data-extractor`.
    ModelsExtractor,
    /// `file-discovery`.
    FileDiscovery(FileDiscoveryParameters),
    /// `endpoint-notification-source`.
    EndpointNotificationSource,
    /// `dcgm-data-source`.
    DcgmSource(DcgmSourceParameters),
    /// `dcgm-extractor`, with the attributes it publishes.
    DcgmExtractor(crate::pool::attributes::AttributeHandle),
    /// `multicluster-metrics-data-source`: a peer cluster's EPP metrics page, over HTTPS with
    /// the certificate checked unless the config says otherwise.
    ClusterMetricsSource(MetricsSourceParameters),
    /// `multicluster-metrics-extractor`.
    ClusterMetricsExtractor(ClusterMetricsExtractorParameters),
    /// A cross-replica syncer (`redis-cross-replica-syncer`, registered by the crate that
    /// implements it): its typed parameters are the plugin's
    /// [`shared`](crate::Plugin::shared) value.
    CrossReplicaSyncer,
}

/// What a data-layer plugin can be referenced as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataLayerRole {
    /// In `sources[].pluginRef`.
    Source,
    /// In `sources[].extractors[].pluginRef`.
    Extractor,
    /// In `discovery.pluginRef`.
    Discovery,
    /// In `crossReplicaSyncerPluginRef`.
    CrossReplicaSyncer,
}

impl DataLayerRole {
    /// The role as error messages name it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Source => "a data source",
            Self::Extractor => "an extractor",
            Self::Discovery => "an endpoint discovery",
            Self::CrossReplicaSyncer => "a cross-replica syncer",
        }
    }
}

impl DataLayerPlugin {
    /// The role the plugin plays.
    pub fn role(&self) -> DataLayerRole {
        match self {
            Self::MetricsSource(_)
            | Self::ModelsSource(_)
            | Self::EndpointNotificationSource
            | Self::DcgmSource(_)
            | Self::ClusterMetricsSource(_) => DataLayerRole::Source,
            Self::CoreMetricsExtractor(_)
            | Self::ModelsExtractor
            | Self::DcgmExtractor(_)
            | Self::ClusterMetricsExtractor(_) => DataLayerRole::Extractor,
            Self::FileDiscovery(_) => DataLayerRole::Discovery,
            Self::CrossReplicaSyncer => DataLayerRole::CrossReplicaSyncer,
        }
    }

    /// Whether `extractor` reads what this source produces (the Go data layer refuses to bind
    /// an extractor to a source of another payload type).
    pub fn accepts(&self, extractor: &Self) -> bool {
        matches!(
            (self, extractor),
            (Self::MetricsSource(_), Self::CoreMetricsExtractor(_))
                | (Self::ModelsSource(_), Self::ModelsExtractor)
                | (Self::DcgmSource(_), Self::DcgmExtractor(_))
                | (Self::ClusterMetricsSource(_), Self::ClusterMetricsExtractor(_))
        )
    }
}

/// The wire form shared by the HTTP sources; `port` is refused by the models source.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpSourceWire {
    #[serde(default)]
    scheme: Scheme,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default = "default_true")]
    insecure_skip_verify: bool,
    #[serde(default)]
    ca_cert_path: Option<String>,
    #[serde(default)]
    client_cert_path: Option<String>,
    #[serde(default)]
    client_key_path: Option<String>,
    #[serde(default, deserialize_with = "crate::flow::units::optional_duration")]
    interval: Option<Duration>,
}

impl Default for HttpSourceWire {
    fn default() -> Self {
        Self {
            scheme: Scheme::Http,
            path: None,
            port: None,
            insecure_skip_verify: true,
            ca_cert_path: None,
            client_cert_path: None,
            client_key_path: None,
            interval: None,
        }
    }
}

fn default_true() -> bool {
    true
}

/// A source's `path`: `default` when unset or empty, else it must start with `/`.
fn source_path(path: Option<&str>, default: &str) -> Result<String, PluginError> {
    match path {
        None | Some("") => Ok(default.to_owned()),
        Some(path) if path.starts_with('/') => Ok(path.to_owned()),
        Some(path) => Err(invalid(format!("path: {path:?} must start with '/'"))),
    }
}

fn invalid(message: impl Into<String>) -> PluginError {
    PluginError::InvalidParameters(message.into())
}

impl HttpSourceWire {
    /// Checks what the Go factories check, and returns the path (`default_path` when unset).
    fn validate(&self, default_path: &str) -> Result<(String, SourceTls), PluginError> {
        let path = source_path(self.path.as_deref(), default_path)?;
        if self.port == Some(0) {
            return Err(invalid("port: 0 is not a port (1-65535)"));
        }
        let empty = |value: &Option<String>| value.as_deref().is_none_or(str::is_empty);
        if empty(&self.client_cert_path) != empty(&self.client_key_path) {
            return Err(invalid("clientCertPath and clientKeyPath must be set together"));
        }
        let nonempty = |value: &Option<String>| value.clone().filter(|value| !value.is_empty());
        let tls = SourceTls {
            insecure_skip_verify: self.insecure_skip_verify,
            ca_cert_path: nonempty(&self.ca_cert_path),
            client_cert_path: nonempty(&self.client_cert_path),
            client_key_path: nonempty(&self.client_key_path),
        };
        Ok((path, tls))
    }
}

fn metrics_source(spec: &PluginSpec<'_>) -> Result<DataLayerPlugin, PluginError> {
    let wire: HttpSourceWire = spec.parameters()?;
    let (path, tls) = wire.validate(DEFAULT_METRICS_PATH)?;
    Ok(DataLayerPlugin::MetricsSource(MetricsSourceParameters {
        scheme: wire.scheme,
        path,
        port: wire.port,
        tls,
        interval: wire.interval,
    }))
}

/// Go's multi-cluster source takes the pod source's parameters with safer defaults: HTTPS,
/// and the peer's certificate checked (the scrape crosses a trust boundary).
fn cluster_metrics_source(spec: &PluginSpec<'_>) -> Result<DataLayerPlugin, PluginError> {
    let given = |key: &str| spec.parameters.and_then(|value| value.get(key)).is_some();
    let mut wire: HttpSourceWire = spec.parameters()?;
    if !given("scheme") {
        wire.scheme = Scheme::Https;
    }
    if !given("insecureSkipVerify") {
        wire.insecure_skip_verify = false;
    }
    let (path, tls) = wire.validate(DEFAULT_METRICS_PATH)?;
    Ok(DataLayerPlugin::ClusterMetricsSource(MetricsSourceParameters {
        scheme: wire.scheme,
        path,
        port: wire.port,
        tls,
        interval: wire.interval,
    }))
}

fn cluster_metrics_extractor(spec: &PluginSpec<'_>) -> Result<Plugin, PluginError> {
    #[derive(Default, Deserialize)]
    #[serde(default, deny_unknown_fields, rename_all = "camelCase")]
    struct Wire {
        kv_cache_utilization_metric: String,
        queue_size_metric: String,
    }
    let wire: Wire = spec.parameters()?;
    let or_default = |given: String, default: &str| {
        if given.trim().is_empty() { default.to_owned() } else { given }
    };
    let attributes = crate::pool::attributes::AttributeHandle::default();
    let shared = std::sync::Arc::clone(&attributes.0);
    let parameters = ClusterMetricsExtractorParameters {
        kv_cache_utilization_metric: or_default(
            wire.kv_cache_utilization_metric,
            DEFAULT_MULTICLUSTER_KV_CACHE_METRIC,
        ),
        queue_size_metric: or_default(wire.queue_size_metric, DEFAULT_MULTICLUSTER_QUEUE_METRIC),
        attributes,
    };
    Ok(Plugin {
        shared: Some(shared),
        data_layer: Some(std::sync::Arc::new(DataLayerPlugin::ClusterMetricsExtractor(parameters))),
        ..Plugin::default()
    })
}

fn models_source(spec: &PluginSpec<'_>) -> Result<DataLayerPlugin, PluginError> {
    let wire: HttpSourceWire = spec.parameters()?;
    if wire.port.is_some() {
        return Err(invalid("port: unknown field `port` (models-data-source has no port)"));
    }
    let (path, tls) = wire.validate(DEFAULT_MODELS_PATH)?;
    Ok(DataLayerPlugin::ModelsSource(ModelsSourceParameters {
        scheme: wire.scheme,
        path,
        tls,
        interval: wire.interval,
    }))
}

/// The wire form of `dcgm-data-source`: Go's parameters, nothing more.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DcgmSourceWire {
    #[serde(default)]
    scheme: Scheme,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default = "default_true")]
    insecure_skip_verify: bool,
    #[serde(default)]
    use_node_address: bool,
    #[serde(default, deserialize_with = "crate::flow::units::optional_duration")]
    interval: Option<Duration>,
}

impl Default for DcgmSourceWire {
    fn default() -> Self {
        Self {
            scheme: Scheme::Http,
            path: None,
            port: None,
            insecure_skip_verify: true,
            use_node_address: false,
            interval: None,
        }
    }
}

fn dcgm_source(spec: &PluginSpec<'_>) -> Result<DataLayerPlugin, PluginError> {
    let wire: DcgmSourceWire = spec.parameters()?;
    let path = source_path(wire.path.as_deref(), DEFAULT_METRICS_PATH)?;
    let port = match wire.port {
        None => Some(DEFAULT_DCGM_PORT),
        Some(0) => None,
        Some(port) => Some(port),
    };
    if wire.use_node_address && port.is_none() {
        return Err(invalid("port: useNodeAddress needs the exporter's port (not 0)"));
    }
    Ok(DataLayerPlugin::DcgmSource(DcgmSourceParameters {
        scheme: wire.scheme,
        path,
        port,
        tls: SourceTls { insecure_skip_verify: wire.insecure_skip_verify, ..SourceTls::default() },
        use_node_address: wire.use_node_address,
        interval: wire.interval,
    }))
}

/// GIE v1.4's extractor parameters: the five specs per engine, no more.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct ProtocolMetricsWire {
    engine_label_key: String,
    default_engine: String,
    engine_configs: Vec<ProtocolEngineWire>,
}

impl Default for ProtocolMetricsWire {
    fn default() -> Self {
        Self {
            engine_label_key: GIE_V14_ENGINE_LABEL_KEY.to_owned(),
            default_engine: DEFAULT_ENGINE_NAME.to_owned(),
            engine_configs: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ProtocolEngineWire {
    #[serde(default)]
    name: String,
    #[serde(default)]
    queued_requests_spec: String,
    #[serde(default)]
    running_requests_spec: String,
    #[serde(default)]
    kv_usage_spec: String,
    #[serde(default)]
    lora_spec: String,
    #[serde(default)]
    cache_info_spec: String,
}

/// GIE v1.4's `model-server-protocol-metrics`: the same extractor as `core-metrics-extractor`
/// with v1.4's defaults (label key `inference.networking.k8s.io/engine-type`, built-in engines
/// `vllm` and `sglang`) and only the five v1.4 specs per engine.
fn protocol_metrics_extractor(spec: &PluginSpec<'_>) -> Result<DataLayerPlugin, PluginError> {
    let wire: ProtocolMetricsWire = spec.parameters()?;
    let engine_configs: Vec<EngineConfig> = wire
        .engine_configs
        .into_iter()
        .map(|engine| EngineConfig {
            name: engine.name,
            queued_requests_spec: engine.queued_requests_spec,
            running_requests_spec: engine.running_requests_spec,
            kv_usage_spec: engine.kv_usage_spec,
            lora_spec: engine.lora_spec,
            cache_info_spec: engine.cache_info_spec,
            ..EngineConfig::default()
        })
        .collect();
    let mut parameters = CoreMetricsExtractorParameters {
        engine_label_key: wire.engine_label_key,
        default_engine: wire.default_engine,
        engine_configs,
    };
    if parameters.engine_label_key.is_empty() {
        parameters.engine_label_key = GIE_V14_ENGINE_LABEL_KEY.to_owned();
    }
    check_extractor(parameters, GIE_V14_BUILTIN_ENGINE_NAMES)
}

/// Applies the Go extractor's defaults and checks its rules: engine names are non-empty,
/// unique and not `default`, and the default engine is configured or built in. Metric spec
/// syntax is checked by the metrics crate, which parses the specs.
fn core_metrics_extractor(spec: &PluginSpec<'_>) -> Result<DataLayerPlugin, PluginError> {
    let mut parameters: CoreMetricsExtractorParameters = spec.parameters()?;
    if parameters.default_engine.is_empty() {
        parameters.default_engine = DEFAULT_ENGINE_NAME.to_owned();
    }
    if parameters.engine_label_key.is_empty() {
        parameters.engine_label_key = DEFAULT_ENGINE_LABEL_KEY.to_owned();
    }
    check_extractor(parameters, BUILTIN_ENGINE_NAMES)
}

/// The rules both extractor generations share; `builtins` are the engines the default engine
/// may name without configuring it.
fn check_extractor(
    mut parameters: CoreMetricsExtractorParameters,
    builtins: &[&str],
) -> Result<DataLayerPlugin, PluginError> {
    if parameters.default_engine.is_empty() {
        parameters.default_engine = DEFAULT_ENGINE_NAME.to_owned();
    }
    for (index, engine) in parameters.engine_configs.iter().enumerate() {
        if engine.name.is_empty() {
            return Err(invalid(format!("engineConfigs[{index}].name: must not be empty")));
        }
        if engine.name == RESERVED_ENGINE_NAME {
            return Err(invalid(format!(
                "engineConfigs[{index}].name: {RESERVED_ENGINE_NAME:?} is reserved"
            )));
        }
        if let Some(first) =
            parameters.engine_configs[..index].iter().position(|other| other.name == engine.name)
        {
            return Err(invalid(format!(
                "engineConfigs[{index}].name: {:?} is already configured by engineConfigs[{first}]",
                engine.name
            )));
        }
        for (metric, custom) in engine.custom_metrics.iter().enumerate() {
            if custom.attribute_key.is_empty() {
                return Err(invalid(format!(
                    "engineConfigs[{index}].customMetrics[{metric}].attributeKey: must not be empty"
                )));
            }
        }
    }
    let known = parameters
        .engine_configs
        .iter()
        .map(|engine| engine.name.as_str())
        .chain(builtins.iter().copied())
        .any(|name| name == parameters.default_engine);
    if !known {
        return Err(invalid(format!(
            "defaultEngine: {:?} is neither in engineConfigs nor built in ({})",
            parameters.default_engine,
            builtins.join(", ")
        )));
    }
    Ok(DataLayerPlugin::CoreMetricsExtractor(parameters))
}

fn file_discovery(spec: &PluginSpec<'_>) -> Result<DataLayerPlugin, PluginError> {
    let parameters: FileDiscoveryParameters = spec.parameters()?;
    if parameters.path.is_empty() {
        return Err(invalid("path: the endpoints file is required"));
    }
    Ok(DataLayerPlugin::FileDiscovery(parameters))
}

/// Registers the data-layer plugin types.
pub(crate) fn register(registry: &mut PluginRegistry) {
    fn data(plugin: DataLayerPlugin) -> Plugin {
        Plugin { data_layer: Some(std::sync::Arc::new(plugin)), ..Plugin::default() }
    }
    registry.register(METRICS_DATA_SOURCE_TYPE, |spec| metrics_source(spec).map(data));
    registry.register(MODELS_DATA_SOURCE_TYPE, |spec| models_source(spec).map(data));
    registry.register(CORE_METRICS_EXTRACTOR_TYPE, |spec| core_metrics_extractor(spec).map(data));
    registry.register(FILE_DISCOVERY_TYPE, |spec| file_discovery(spec).map(data));
    registry.register(MODELS_DATA_EXTRACTOR_TYPE, |spec| {
        spec.parameters::<NoParameters>()?;
        Ok(data(DataLayerPlugin::ModelsExtractor))
    });
    registry.register(MODEL_SERVER_PROTOCOL_METRICS_TYPE, |spec| {
        protocol_metrics_extractor(spec).map(data)
    });
    registry.register_experimental(DCGM_DATA_SOURCE_TYPE, |spec| dcgm_source(spec).map(data));
    registry.register_experimental(DCGM_EXTRACTOR_TYPE, |spec| {
        spec.parameters::<NoParameters>()?;
        let handle = crate::pool::attributes::AttributeHandle::default();
        let shared = std::sync::Arc::clone(&handle.0);
        Ok(Plugin { shared: Some(shared), ..data(DataLayerPlugin::DcgmExtractor(handle)) })
    });
    registry.register_experimental(MULTICLUSTER_FILE_DISCOVERY_TYPE, |spec| {
        file_discovery(spec).map(data)
    });
    registry.register_experimental(MULTICLUSTER_METRICS_DATA_SOURCE_TYPE, |spec| {
        cluster_metrics_source(spec).map(data)
    });
    registry.register_experimental(MULTICLUSTER_METRICS_EXTRACTOR_TYPE, cluster_metrics_extractor);
    registry.register(ENDPOINT_NOTIFICATION_SOURCE_TYPE, |spec| {
        spec.parameters::<NoParameters>()?;
        Ok(data(DataLayerPlugin::EndpointNotificationSource))
    });
}
