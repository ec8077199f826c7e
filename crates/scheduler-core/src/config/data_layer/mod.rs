//! The `dataLayer` section (`data` before GIE v1.5): which data sources run, which extractors
//! read each source's payload, and which plugin discovers the endpoints.
//!
//! Every `pluginRef` names a plugin declared under `plugins`, of the kind its place requires;
//! a dangling reference, or a scorer where a source belongs, is a [`ConfigError`] naming the
//! field. As the Go loader does, the metrics source and its extractor are injected unless
//! `injectDefaults: false` or a source already references `metrics-data-source` by name (or,
//! unlike Go, a `multicluster-metrics-data-source` scrapes peer clusters, which have no engine
//! metrics to read); a
//! declared plugin of that name is used as declared (with its parameters), otherwise one with
//! default parameters is created. GIE v1.4's extractor, `model-server-protocol-metrics`,
//! declared under that name (and no `core-metrics-extractor`), takes the injected extractor's
//! place, and makes the config's data layer count as declared even without a section, since
//! its parameters are data-layer settings. Data-layer plugins never enter a scheduling profile.

pub mod plugins;

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::config::registry::{PluginRegistry, PluginSpec};
use crate::config::{ConfigError, ConstructedPlugins, EndpointPickerConfig};
pub use plugins::{
    CORE_METRICS_EXTRACTOR_TYPE, DataLayerPlugin, DataLayerRole, FILE_DISCOVERY_TYPE,
    FileDiscoveryParameters, METRICS_DATA_SOURCE_TYPE, MODEL_SERVER_PROTOCOL_METRICS_TYPE,
};

/// The `dataLayer` section as written.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DataLayerConfig {
    /// Whether the default metrics source and extractor are injected (default `true`).
    #[serde(default)]
    pub inject_defaults: Option<bool>,
    /// The data sources and their extractors.
    #[serde(default)]
    pub sources: Vec<DataLayerSource>,
    /// The plugin that discovers endpoints (instead of the command line's endpoints file).
    #[serde(default)]
    pub discovery: Option<DataLayerPluginRef>,
    /// The plugin that discovers peer replicas; no built-in plugin is one.
    #[serde(default)]
    pub peer_discovery: Option<DataLayerPluginRef>,
    /// The plugin sharing state across replicas (`redis-cross-replica-syncer`, when the
    /// binary is built with it).
    #[serde(default)]
    pub cross_replica_syncer_plugin_ref: Option<String>,
    /// How often state is shared across replicas.
    #[serde(default, deserialize_with = "crate::flow::units::optional_duration")]
    pub cross_replica_sync_interval: Option<Duration>,
}

/// One entry of `dataLayer.sources`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DataLayerSource {
    /// The source plugin.
    pub plugin_ref: String,
    /// The extractors reading its payload.
    #[serde(default)]
    pub extractors: Vec<DataLayerPluginRef>,
}

/// A `{pluginRef: name}` entry.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DataLayerPluginRef {
    /// The referenced plugin's name.
    pub plugin_ref: String,
}

/// A resolved data-layer plugin: its name and what it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedDataPlugin {
    /// The name it is declared (or was injected) under.
    pub name: String,
    /// The plugin and its parameters.
    pub plugin: Arc<DataLayerPlugin>,
}

/// A source with its extractors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedSource {
    /// The source.
    pub source: NamedDataPlugin,
    /// Its extractors, in declaration order.
    pub extractors: Vec<NamedDataPlugin>,
}

/// The data layer a config asks for, every reference resolved and defaults injected.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvedDataLayer {
    /// Whether the config has a data-layer section at all (`dataLayer` or `data`); without
    /// one, a server keeps its command-line scrape and discovery settings.
    pub declared: bool,
    /// The sources, declared ones first, then the injected metrics source.
    pub sources: Vec<ResolvedSource>,
    /// The discovery plugin, when one is named.
    pub discovery: Option<NamedDataPlugin>,
    /// The cross-replica sync interval, when given.
    pub cross_replica_sync_interval: Option<Duration>,
    /// The cross-replica syncer, when one is named.
    pub cross_replica_syncer: Option<NamedDataPlugin>,
}

impl ResolvedDataLayer {
    /// The sources whose plugin matches `pick`.
    pub fn sources_where<'a>(
        &'a self,
        pick: impl Fn(&DataLayerPlugin) -> bool + 'a,
    ) -> impl Iterator<Item = &'a ResolvedSource> + 'a {
        self.sources.iter().filter(move |source| pick(&source.source.plugin))
    }
}

impl EndpointPickerConfig {
    /// Resolves the data layer against `plugins` (constructed from this config), creating the
    /// injected defaults with `registry`.
    pub fn data_layer(
        &self,
        plugins: &ConstructedPlugins,
        registry: &PluginRegistry,
    ) -> Result<ResolvedDataLayer, ConfigError> {
        let section = self.data.clone().unwrap_or_default();
        let mut resolved = ResolvedDataLayer {
            declared: self.data.is_some(),
            cross_replica_sync_interval: section.cross_replica_sync_interval,
            ..ResolvedDataLayer::default()
        };
        for (index, source) in section.sources.iter().enumerate() {
            let field = format!("dataLayer.sources[{index}].pluginRef");
            let named = lookup(plugins, &field, &source.plugin_ref, DataLayerRole::Source)?;
            let mut extractors = Vec::with_capacity(source.extractors.len());
            for (position, extractor) in source.extractors.iter().enumerate() {
                let field = format!("dataLayer.sources[{index}].extractors[{position}].pluginRef");
                let extractor =
                    lookup(plugins, &field, &extractor.plugin_ref, DataLayerRole::Extractor)?;
                if !named.plugin.accepts(&extractor.plugin) {
                    return Err(ConfigError::DataLayerMismatch {
                        field,
                        extractor: extractor.name,
                        source_name: named.name.clone(),
                    });
                }
                extractors.push(extractor);
            }
            resolved.sources.push(ResolvedSource { source: named, extractors });
        }
        if let Some(discovery) = &section.discovery {
            let field = "dataLayer.discovery.pluginRef";
            resolved.discovery =
                Some(lookup(plugins, field, &discovery.plugin_ref, DataLayerRole::Discovery)?);
        }
        if let Some(syncer) =
            section.cross_replica_syncer_plugin_ref.as_deref().filter(|name| !name.is_empty())
        {
            let field = "dataLayer.crossReplicaSyncerPluginRef";
            resolved.cross_replica_syncer =
                Some(lookup(plugins, field, syncer, DataLayerRole::CrossReplicaSyncer)?);
        }
        // No built-in plugin discovers peers (a Redis syncer finds its peers through Redis): a
        // reference is either dangling or names a plugin of another kind.
        let unsupported = [(
            "dataLayer.peerDiscovery.pluginRef",
            section.peer_discovery.map(|r| r.plugin_ref),
            "a peer discovery",
        )];
        for (field, reference, expected) in unsupported {
            let Some(reference) = reference.filter(|reference| !reference.is_empty()) else {
                continue;
            };
            let Some(declared) = plugins.get(&reference) else {
                return Err(ConfigError::DataLayerDanglingRef {
                    field: field.to_owned(),
                    plugin_ref: reference,
                });
            };
            return Err(ConfigError::DataLayerWrongKind {
                field: field.to_owned(),
                plugin_ref: reference,
                type_name: declared.type_name.clone(),
                expected,
            });
        }
        // Peer clusters have no engine metrics: with a multi-cluster source, a pod scrape of
        // them could only fail and mark every cluster stale, so none is injected.
        let scrapes_clusters = resolved.sources.iter().any(|source| {
            matches!(*source.source.plugin, DataLayerPlugin::ClusterMetricsSource(_))
        });
        if section.inject_defaults != Some(false)
            && !scrapes_clusters
            && !section.sources.iter().any(|source| source.plugin_ref == METRICS_DATA_SOURCE_TYPE)
        {
            let source = declared_or_default(plugins, registry, METRICS_DATA_SOURCE_TYPE)?;
            // GIE v1.4 configs declare the extractor under its old name and, in the docs'
            // examples, no data section at all: that extractor is the one the default source
            // feeds, and its parameters are the config's data layer.
            let legacy = plugins.get(CORE_METRICS_EXTRACTOR_TYPE).is_none()
                && plugins.get(MODEL_SERVER_PROTOCOL_METRICS_TYPE).is_some();
            let extractor = if legacy {
                resolved.declared = true;
                lookup(
                    plugins,
                    "dataLayer (injected default source)",
                    MODEL_SERVER_PROTOCOL_METRICS_TYPE,
                    DataLayerRole::Extractor,
                )?
            } else {
                declared_or_default(plugins, registry, CORE_METRICS_EXTRACTOR_TYPE)?
            };
            if !source.plugin.accepts(&extractor.plugin) {
                return Err(ConfigError::DataLayerMismatch {
                    field: "dataLayer (injected default source)".to_owned(),
                    extractor: extractor.name,
                    source_name: source.name,
                });
            }
            resolved.sources.push(ResolvedSource { source, extractors: vec![extractor] });
        }
        Ok(resolved)
    }
}

/// The declared data-layer plugin `name`, which must play `role`.
fn lookup(
    plugins: &ConstructedPlugins,
    field: &str,
    name: &str,
    role: DataLayerRole,
) -> Result<NamedDataPlugin, ConfigError> {
    let Some(declared) = plugins.get(name) else {
        return Err(ConfigError::DataLayerDanglingRef {
            field: field.to_owned(),
            plugin_ref: name.to_owned(),
        });
    };
    match &declared.plugin.data_layer {
        Some(plugin) if plugin.role() == role => {
            Ok(NamedDataPlugin { name: declared.name.clone(), plugin: Arc::clone(plugin) })
        }
        _ => Err(ConfigError::DataLayerWrongKind {
            field: field.to_owned(),
            plugin_ref: name.to_owned(),
            type_name: declared.type_name.clone(),
            expected: role.describe(),
        }),
    }
}

/// The plugin declared under the type's name (as the Go loader looks it up), else a new one
/// of that type with default parameters.
fn declared_or_default(
    plugins: &ConstructedPlugins,
    registry: &PluginRegistry,
    type_name: &str,
) -> Result<NamedDataPlugin, ConfigError> {
    let role = match type_name {
        METRICS_DATA_SOURCE_TYPE => DataLayerRole::Source,
        _ => DataLayerRole::Extractor,
    };
    if plugins.get(type_name).is_some() {
        return lookup(plugins, "dataLayer (injected default source)", type_name, role);
    }
    let created =
        registry.create(&PluginSpec::of_type(type_name)).map_err(|source| ConfigError::Plugin {
            index: usize::MAX,
            name: type_name.to_owned(),
            type_name: type_name.to_owned(),
            source,
        })?;
    match created.data_layer {
        Some(plugin) => Ok(NamedDataPlugin { name: type_name.to_owned(), plugin }),
        None => Err(ConfigError::DataLayerWrongKind {
            field: "dataLayer (injected default source)".to_owned(),
            plugin_ref: type_name.to_owned(),
            type_name: type_name.to_owned(),
            expected: role.describe(),
        }),
    }
}

#[cfg(test)]
mod tests;
