//! Cross-replica sync for `epp`: the `redis-cross-replica-syncer` plugin type, which needs
//! the `redis-sync` cargo feature. Without it the type is still known, so that a config
//! naming it fails with a message that says how to get a binary that has it.

use std::sync::Arc;

use scheduler_core::data_layer::ResolvedDataLayer;
use scheduler_core::{ConstructedPlugins, PluginRegistry, SharedPool};

use crate::metrics::EppMetrics;

/// The plugin type.
pub const SYNCER_TYPE: &str = "redis-cross-replica-syncer";

/// Registers the syncer type: the real one with the `redis-sync` feature, else one that
/// refuses to be constructed and names the feature.
pub fn register(registry: &mut PluginRegistry) {
    #[cfg(feature = "redis-sync")]
    redis_sync::register(registry);
    #[cfg(not(feature = "redis-sync"))]
    registry.register(SYNCER_TYPE, |_| {
        Err(scheduler_core::PluginError::Unavailable(format!(
            "this epp was built without the `redis-sync` cargo feature, which '{SYNCER_TYPE}' \
             needs (cargo build -p epp-ext-proc-adapter --features redis-sync)"
        )))
    });
}

/// A running cross-replica syncer.
#[derive(Debug)]
pub struct CrossReplica {
    #[cfg(feature = "redis-sync")]
    sync: redis_sync::CrossReplicaSync,
}

impl CrossReplica {
    /// Starts the syncer the data layer names, if any, for the scheduler built from
    /// `plugins` routing on `pool`; its metrics join `metrics`' page. Must run on a tokio
    /// runtime. Never waits for Redis.
    pub fn start(
        layer: &ResolvedDataLayer,
        plugins: &ConstructedPlugins,
        pool: Arc<SharedPool>,
        pool_name: &str,
        metrics: &EppMetrics,
    ) -> Result<Option<Self>, String> {
        let Some(syncer) = &layer.cross_replica_syncer else { return Ok(None) };
        #[cfg(feature = "redis-sync")]
        {
            let settings = redis_sync::settings_of(plugins, &syncer.name).ok_or_else(|| {
                format!(
                    "dataLayer.crossReplicaSyncerPluginRef: '{}' is not a {SYNCER_TYPE}",
                    syncer.name
                )
            })?;
            let options = redis_sync::SyncOptions {
                pool_name: pool_name.to_owned(),
                interval: layer.cross_replica_sync_interval,
            };
            let sync = redis_sync::CrossReplicaSync::start(&settings, &options, plugins, pool)
                .map_err(|error| format!("cross-replica syncer '{}': {error}", syncer.name))?;
            metrics.add_section(sync.metrics_renderer());
            Ok(Some(Self { sync }))
        }
        #[cfg(not(feature = "redis-sync"))]
        {
            let _ = (plugins, pool, pool_name, metrics);
            Err(format!(
                "cross-replica syncer '{}': this epp was built without the `redis-sync` cargo feature",
                syncer.name
            ))
        }
    }

    /// Stops the syncer, removing this replica's in-flight share from Redis (best effort).
    pub async fn shutdown(self) {
        #[cfg(feature = "redis-sync")]
        self.sync.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use scheduler_core::EndpointPickerConfig;

    const CONFIG: &str = "
plugins:
- name: sync
  type: redis-cross-replica-syncer
  parameters: {address: '127.0.0.1:6379'}
dataLayer:
  crossReplicaSyncerPluginRef: sync
";

    fn construct(yaml: &str) -> Result<scheduler_core::ConstructedPlugins, String> {
        let mut registry = scorers::builtin_registry();
        super::register(&mut registry);
        let config = EndpointPickerConfig::from_yaml(yaml).map_err(|e| e.to_string())?;
        config.construct_plugins(&registry).map_err(|error| error.to_string())
    }

    #[cfg(not(feature = "redis-sync"))]
    #[test]
    fn without_the_feature_a_config_naming_the_syncer_says_how_to_get_it() {
        let error = construct(CONFIG).unwrap_err();
        assert!(error.contains("plugins[0] (name 'sync', type 'redis-cross-replica-syncer')"));
        assert!(error.contains("built without the `redis-sync` cargo feature"), "{error}");
    }

    #[cfg(feature = "redis-sync")]
    #[test]
    fn with_the_feature_the_syncer_is_constructed_and_unknown_keys_refused() {
        assert!(construct(CONFIG).is_ok());
        let typo = CONFIG.replace("address:", "adress:");
        let error = construct(&typo).unwrap_err();
        assert!(error.contains("unknown field `adress`"), "{error}");
    }
}
