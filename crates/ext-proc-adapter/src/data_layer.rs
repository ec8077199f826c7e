//! Running the config's `dataLayer`: the metrics source and its extractor configure the
//! collector (path, port, interval, engine metric names), and `file-discovery` names the
//! endpoints file. A config without a data-layer section leaves the command line's settings
//! (`--endpoints-file`, `--refresh-metrics-interval`, the metric-name flags) in charge.
//!
//! One collector runs: when several metrics sources are listed (a renamed one next to the
//! injected default), the first listed is used and the others are logged and skipped.
//! The first `models-data-source` with its extractor polls the endpoints' model lists
//! ([`crate::endpoint_models`]); `endpoint-notification-source` needs no work here, since
//! endpoint changes already reach the collector and the pool.

use std::path::PathBuf;
use std::time::Duration;

use metrics_model::collector::CollectorConfig;
use metrics_model::{EngineConfigError, EngineSet, ScrapeTls, TlsSettings, TlsSettingsError};
use scheduler_core::data_layer::plugins::{ModelsSourceParameters, Scheme, SourceTls};
use scheduler_core::data_layer::{DataLayerPlugin, ResolvedDataLayer};

use crate::endpoint_models::ModelsPollSettings;
use crate::server::{CollectorSettings, ServerConfig};

/// A data layer this server cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataLayerError {
    /// A models source asks for HTTPS, which the model poller does not speak.
    #[error(
        "data source '{source_name}': scheme https is not supported (the model poller speaks plain HTTP)"
    )]
    Https {
        /// The source.
        source_name: String,
    },
    /// A metrics source's TLS files could not be loaded.
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
        if parameters.scheme == Scheme::Https {
            return Err(DataLayerError::Https { source_name: source.source.name.clone() });
        }
        if config.models.is_none() {
            config.models = Some(models_settings(parameters, base_interval));
        }
    }
    Ok(())
}

/// Poll settings of a models source: its interval, else the refresh interval (the Go
/// source's base tick).
fn models_settings(parameters: &ModelsSourceParameters, base: Duration) -> ModelsPollSettings {
    ModelsPollSettings {
        path: parameters.path.clone(),
        interval: parameters.interval.unwrap_or(base),
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
    // The files are read here, once, so a bad one stops the server at start.
    let tls = match parameters.scheme {
        Scheme::Http => None,
        Scheme::Https => {
            Some(ScrapeTls::load(&tls_settings(&parameters.tls)).map_err(|error| {
                DataLayerError::Tls { source_name: source.source.name.clone(), error }
            })?)
        }
    };
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
