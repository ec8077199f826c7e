//! Running the config's `dataLayer`: the metrics source and its extractor configure the
//! collector (path, port, interval, engine metric names), and `file-discovery` names the
//! endpoints file. A config without a data-layer section leaves the command line's settings
//! (`--endpoints-file`, `--refresh-metrics-interval`, the metric-name flags) in charge.
//!
//! One collector runs: when several metrics sources are listed (a renamed one next to the
//! injected default), the first listed is used and the others are logged and skipped.
//! The first `models-data-source` with its extractor polls the endpoints' model lists
//! ([`crate::endpoint_models`]), over HTTPS when asked, with the metrics source's TLS
//! settings. The first `dcgm-data-source` with `dcgm-extractor` scrapes the endpoints' DCGM
//! exporters for GPU utilization ([`crate::endpoint_gpu`]).
//!
//! The first `multicluster-metrics-data-source` with its extractor scrapes the peer clusters'
//! pool averages ([`crate::cluster_metrics`]); `multicluster-file-discovery` names the peers'
//! file like `file-discovery` (its entries may name hosts by DNS name).
//!
//! `endpoint-notification-source` starts nothing. In the Go EPP it hands endpoint additions
//! and removals to the extractors bound under it; no built-in extractor here reads such
//! events (the pool, the collector and the pollers above follow endpoint changes by
//! themselves), and a config binding an extractor under it is refused when loaded.

use std::path::PathBuf;
use std::time::Duration;

use metrics_model::collector::CollectorConfig;
use metrics_model::{EngineConfigError, EngineSet, ScrapeTls, TlsSettings, TlsSettingsError};
use scheduler_core::data_layer::plugins::{ModelsSourceParameters, Scheme, SourceTls};
use scheduler_core::data_layer::{DataLayerPlugin, ResolvedDataLayer};

use crate::cluster_metrics::ClusterMetricsSettings;
use crate::endpoint_gpu::GpuPollSettings;
use crate::endpoint_models::ModelsPollSettings;
use crate::server::{CollectorSettings, ServerConfig};

/// A data layer this server cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataLayerError {
    /// A DCGM source asks for the node's address, which endpoints here do not carry.
    #[error(
        "data source '{source_name}': useNodeAddress: endpoints carry no node address here (run the exporter as a sidecar and scrape the endpoint's IP)"
    )]
    NodeAddress {
        /// The source.
        source_name: String,
    },
    /// An HTTP source's TLS files could not be loaded.
    #[error("data source '{source_name}': {error}")]
    Tls {
        /// The source.
        source_name: String,
        /// What is wrong.
        error: TlsSettingsError,
    },
    /// An engine metric specification does not parse.
    #[error("extractor '{extractor}': {error}")]
    Engine {
        /// The extractor.
        extractor: String,
        /// What is wrong.
        error: EngineConfigError,
    },
    /// A multi-cluster extractor's metric does not parse.
    #[error("extractor '{extractor}': {parameter}: {error}")]
    MetricSpec {
        /// The extractor.
        extractor: String,
        /// The parameter.
        parameter: &'static str,
        /// What is wrong.
        error: metrics_model::mapping::SpecError,
    },
    /// Both the command line and the config name the endpoints.
    #[error(
        "--endpoints-file and dataLayer.discovery ('{discovery}') both name the endpoints; keep one"
    )]
    TwoDiscoveries {
        /// The discovery plugin.
        discovery: String,
    },
}

/// Applies `layer` to `config` (built from the command line): replaces its collector and
/// model polling and, with a discovery plugin, its endpoints file. Does nothing when the
/// config has no data-layer section.
pub fn apply(layer: &ResolvedDataLayer, config: &mut ServerConfig) -> Result<(), DataLayerError> {
    if !layer.declared {
        return Ok(());
    }
    if let Some(discovery) = &layer.discovery
        && let DataLayerPlugin::FileDiscovery(parameters) = &*discovery.plugin
    {
        if config.endpoints_file.is_some() {
            return Err(DataLayerError::TwoDiscoveries { discovery: discovery.name.clone() });
        }
        config.endpoints_file = Some(PathBuf::from(&parameters.path));
        config.watch_endpoints_file = parameters.watch_file;
    }
    let base = config.collector.as_ref().map(|settings| settings.config.clone());
    let base = base.unwrap_or_default();
    let base_interval = base.interval;
    config.collector = collector_settings(layer, base)?;
    config.models = None;
    config.gpu = None;
    config.cluster_metrics = None;
    if config.collector.is_none() {
        // Nothing scrapes metrics, so none can turn stale: readiness needs only endpoints.
        config.staleness_threshold = None;
    }
    for source in layer.sources_where(|plugin| matches!(plugin, DataLayerPlugin::ModelsSource(_))) {
        let DataLayerPlugin::ModelsSource(parameters) = &*source.source.plugin else { continue };
        if source.extractors.is_empty() {
            tracing::warn!(source = %source.source.name, "models source without an extractor; not polled");
            continue;
        }
        if config.models.is_some() {
            tracing::warn!(source = %source.source.name, "a models source is already polled; this one is skipped");
            continue;
        }
        let tls = load_tls(&source.source.name, parameters.scheme, &parameters.tls)?;
        config.models = Some(models_settings(parameters, base_interval, tls));
    }
    for source in layer.sources_where(|plugin| matches!(plugin, DataLayerPlugin::DcgmSource(_))) {
        let DataLayerPlugin::DcgmSource(parameters) = &*source.source.plugin else { continue };
        if source.extractors.is_empty() {
            tracing::warn!(source = %source.source.name, "DCGM source without an extractor; not scraped");
            continue;
        }
        if config.gpu.is_some() {
            tracing::warn!(source = %source.source.name, "a DCGM source is already scraped; this one is skipped");
            continue;
        }
        if parameters.use_node_address {
            return Err(DataLayerError::NodeAddress { source_name: source.source.name.clone() });
        }
        let tls = load_tls(&source.source.name, parameters.scheme, &parameters.tls)?;
        let publish_to = source.extractors.iter().find_map(|extractor| match &*extractor.plugin {
            DataLayerPlugin::DcgmExtractor(handle) => Some(std::sync::Arc::clone(&handle.0)),
            _ => None,
        });
        config.gpu = Some(GpuPollSettings {
            path: parameters.path.clone(),
            port: parameters.port,
            interval: parameters.interval.unwrap_or(base_interval),
            tls,
            publish_to,
        });
    }
    for source in
        layer.sources_where(|plugin| matches!(plugin, DataLayerPlugin::ClusterMetricsSource(_)))
    {
        let DataLayerPlugin::ClusterMetricsSource(parameters) = &*source.source.plugin else {
            continue;
        };
        let extractor = source.extractors.iter().find_map(|extractor| match &*extractor.plugin {
            DataLayerPlugin::ClusterMetricsExtractor(parameters) => {
                Some((extractor.name.as_str(), parameters))
            }
            _ => None,
        });
        let Some((extractor_name, extractor)) = extractor else {
            tracing::warn!(source = %source.source.name, "multi-cluster metrics source without an extractor; not scraped");
            continue;
        };
        if config.cluster_metrics.is_some() {
            tracing::warn!(source = %source.source.name, "a multi-cluster metrics source is already scraped; this one is skipped");
            continue;
        }
        let spec = |parameter: &'static str, text: &str| {
            metrics_model::mapping::MetricSpec::parse(text).map_err(|error| {
                DataLayerError::MetricSpec {
                    extractor: extractor_name.to_owned(),
                    parameter,
                    error,
                }
            })
        };
        config.cluster_metrics = Some(ClusterMetricsSettings {
            path: parameters.path.clone(),
            port: parameters.port,
            interval: parameters.interval.unwrap_or(base_interval),
            tls: load_tls(&source.source.name, parameters.scheme, &parameters.tls)?,
            kv_cache_metric: spec(
                "kvCacheUtilizationMetric",
                &extractor.kv_cache_utilization_metric,
            )?,
            queue_metric: spec("queueSizeMetric", &extractor.queue_size_metric)?,
            publish_to: std::sync::Arc::clone(&extractor.attributes.0),
        });
    }
    Ok(())
}

/// The TLS client configuration of an HTTP source (`None` for plain HTTP). The files are
/// read here, once, so a bad one stops the server at start.
fn load_tls(
    source_name: &str,
    scheme: Scheme,
    tls: &SourceTls,
) -> Result<Option<ScrapeTls>, DataLayerError> {
    match scheme {
        Scheme::Http => Ok(None),
        Scheme::Https => ScrapeTls::load(&tls_settings(tls))
            .map(Some)
            .map_err(|error| DataLayerError::Tls { source_name: source_name.to_owned(), error }),
    }
}

/// Poll settings of a models source: its interval, else the refresh interval (the Go
/// source's base tick).
fn models_settings(
    parameters: &ModelsSourceParameters,
    base: Duration,
    tls: Option<ScrapeTls>,
) -> ModelsPollSettings {
    ModelsPollSettings {
        path: parameters.path.clone(),
        interval: parameters.interval.unwrap_or(base),
        tls,
    }
}

/// The collector of the first metrics source with an extractor, on `base`'s timing.
fn collector_settings(
    layer: &ResolvedDataLayer,
    base: CollectorConfig,
) -> Result<Option<CollectorSettings>, DataLayerError> {
    let mut chosen = None;
    for source in layer.sources_where(|plugin| matches!(plugin, DataLayerPlugin::MetricsSource(_)))
    {
        let extractor = source.extractors.iter().find_map(|extractor| match &*extractor.plugin {
            DataLayerPlugin::CoreMetricsExtractor(parameters) => {
                Some((extractor.name.as_str(), parameters))
            }
            _ => None,
        });
        let Some(extractor) = extractor else {
            tracing::warn!(source = %source.source.name, "metrics source without an extractor; not scraped");
            continue;
        };
        if chosen.is_some() {
            tracing::warn!(source = %source.source.name, "a metrics source is already scraped; this one is skipped");
            continue;
        }
        chosen = Some((source, extractor));
    }
    let Some((source, (extractor_name, extractor))) = chosen else { return Ok(None) };
    let DataLayerPlugin::MetricsSource(parameters) = &*source.source.plugin else {
        return Ok(None);
    };
    let tls = load_tls(&source.source.name, parameters.scheme, &parameters.tls)?;
    let engines = EngineSet::from_extractor(extractor)
        .map_err(|error| DataLayerError::Engine { extractor: extractor_name.to_owned(), error })?;
    let config = CollectorConfig {
        metrics_path: parameters.path.clone(),
        scrape_port: parameters.port,
        interval: parameters.interval.unwrap_or(base.interval),
        tls,
        ..base
    };
    Ok(Some(CollectorSettings {
        config,
        default_engine: engines.default_engine().clone(),
        engines: Some(engines),
    }))
}

/// The collector's TLS settings from a source's configured ones.
fn tls_settings(tls: &SourceTls) -> TlsSettings {
    TlsSettings {
        insecure_skip_verify: tls.insecure_skip_verify,
        ca_cert_path: tls.ca_cert_path.as_ref().map(PathBuf::from),
        client_cert_path: tls.client_cert_path.as_ref().map(PathBuf::from),
        client_key_path: tls.client_key_path.as_ref().map(PathBuf::from),
    }
}
