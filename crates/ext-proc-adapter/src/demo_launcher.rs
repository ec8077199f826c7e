//! `epp demo`'s picker: the real ext-proc server, started in this process on loopback.
//!
//! A module of the `epp` binary, not of the library: the demo crate drives pickers through
//! its [`PickerLauncher`] trait, and only the binary ties the two together.

use std::sync::Arc;
use std::time::{Duration, Instant};

use demo::{LaunchError, LaunchedPicker, PickerLauncher, PickerSpec};
use ext_proc_adapter::DirectorOptions;
use ext_proc_adapter::cross_replica::{self, CrossReplica};
use ext_proc_adapter::endpoints_file::EndpointEntry;
use ext_proc_adapter::server::{self, CollectorSettings, ServerConfig};
use metrics_model::collector::CollectorConfig;
use metrics_model::mapping::Engine;
use scheduler_core::flow::{FlowMetrics, ObjectiveResolver};
use scheduler_core::{Director, EndpointPickerConfig, PluginConfig, ROLE_LABEL, SharedPool};

/// How long the picker may take to scrape every simulated server once before the run starts.
const FIRST_SCRAPE_WAIT: Duration = Duration::from_secs(5);
/// How long open streams get to finish when the run ends.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// How often synced demo replicas exchange their records. Far below the server's 200 ms
/// default: the demo's conversations come back for their next turn within tens of
/// milliseconds, where real ones take seconds.
const DEMO_SYNC_INTERVAL: Duration = Duration::from_millis(20);
/// The syncer's name in a synced replica's config.
const SYNCER_NAME: &str = "demo-cross-replica-sync";
/// The pool name the demo's pickers serve (and sync under).
const POOL_NAME: &str = "demo-pool";

/// Starts `epp`'s server with the demo's config, the metrics collector scraping every 50 ms.
/// Replicas asked to share their state get a `redis-cross-replica-syncer` on `redis`.
#[derive(Clone, Debug, Default)]
pub(crate) struct InProcessPicker {
    /// The Redis (`host:port` or URL) that synced replicas share their state through.
    pub(crate) redis: Option<String>,
}

impl InProcessPicker {
    /// `config` plus, for a replica that shares its state under `group`, the syncer on the
    /// Redis this launcher was given.
    fn replica_config(
        &self,
        config: &EndpointPickerConfig,
        group: Option<&str>,
    ) -> Result<EndpointPickerConfig, LaunchError> {
        let mut config = config.clone();
        let Some(group) = group else { return Ok(config) };
        let Some(redis) = &self.redis else {
            return Err("replicas that share their state need --redis ADDR".into());
        };
        config.plugins.push(PluginConfig {
            name: Some(SYNCER_NAME.into()),
            type_name: cross_replica::SYNCER_TYPE.into(),
            parameters: Some(serde_json::json!({"address": redis, "keyPrefix": group})),
        });
        let mut layer = config.data.take().unwrap_or_default();
        layer.cross_replica_syncer_plugin_ref = Some(SYNCER_NAME.into());
        layer.cross_replica_sync_interval = Some(DEMO_SYNC_INTERVAL);
        config.data = Some(layer);
        Ok(config)
    }
}

/// How long `--redis ADDR` gets to accept a connection before the demo gives up.
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether a TCP connection to the Redis at `address` (`host:port`, or a `redis://` or
/// `rediss://` URL) opens; the error names the address.
pub(crate) async fn check_redis(address: &str) -> Result<(), String> {
    let rest = address
        .strip_prefix("redis://")
        .or_else(|| address.strip_prefix("rediss://"))
        .unwrap_or(address);
    let authority = rest.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let target = if host_port.rsplit_once(':').is_some_and(|(_, port)| port.parse::<u16>().is_ok())
    {
        host_port.to_owned()
    } else {
        format!("{host_port}:6379")
    };
    match tokio::time::timeout(REDIS_CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&target)).await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(format!("--redis {address}: cannot connect to {target}: {error}")),
        Err(_) => Err(format!(
            "--redis {address}: no connection to {target} within {REDIS_CONNECT_TIMEOUT:?}"
        )),
    }
}

impl PickerLauncher for InProcessPicker {
    async fn launch(&self, spec: PickerSpec<'_>) -> Result<LaunchedPicker, LaunchError> {
        let pool = Arc::new(SharedPool::default());
        let objectives =
            ObjectiveResolver::from_yaml(spec.objectives_yaml, Arc::new(FlowMetrics::new()))
                .map_err(|error| format!("invalid demo objectives: {error}"))?;
        let config = self.replica_config(spec.config, spec.shared_state)?;
        let mut registry = scorers::builtin_registry();
        cross_replica::register(&mut registry);
        let invalid = |error: &dyn std::fmt::Display| format!("invalid picker config: {error}");
        let plugins = config.construct_plugins(&registry).map_err(|error| invalid(&error))?;
        let layer = config.data_layer(&plugins, &registry).map_err(|error| invalid(&error))?;
        let director = Director::from_constructed(
            &config,
            &plugins,
            &registry,
            Arc::clone(&pool),
            DirectorOptions::default(),
            objectives,
        )
        .map_err(|error| invalid(&error))?;
        let running = server::start_with_director(
            Arc::new(director),
            ServerConfig {
                staleness_threshold: Some(Duration::from_secs(2)),
                collector: Some(CollectorSettings {
                    config: CollectorConfig {
                        interval: Duration::from_millis(50),
                        ..CollectorConfig::default()
                    },
                    default_engine: Engine::Vllm,
                    engines: None,
                }),
                ..ServerConfig::loopback(POOL_NAME)
            },
        )
        .await?;
        let sync = match CrossReplica::start(
            &layer,
            &plugins,
            Arc::clone(&pool),
            POOL_NAME,
            &running.metrics,
        ) {
            Ok(sync) => sync,
            Err(error) => {
                running.shutdown(SHUTDOWN_GRACE).await;
                return Err(error.into());
            }
        };
        let entries: Vec<EndpointEntry> = spec
            .endpoints
            .iter()
            .enumerate()
            .map(|(index, address)| EndpointEntry {
                address: address.ip(),
                host: None,
                port: address.port(),
                name: Some(format!("sim-{index}")),
                engine: None,
                role: None,
                labels: spec
                    .roles
                    .get(index)
                    .and_then(|role| role.label_value())
                    .map(|role| [(ROLE_LABEL.to_owned(), role.to_owned())].into())
                    .unwrap_or_default(),
            })
            .collect();
        if let Err(error) = running.pool_writer.apply(&entries) {
            running.shutdown(SHUTDOWN_GRACE).await;
            if let Some(sync) = sync {
                sync.shutdown().await;
            }
            return Err(error.into());
        }
        // Start only once every endpoint has been scraped, so the first decisions see real load.
        let deadline = Instant::now() + FIRST_SCRAPE_WAIT;
        while Instant::now() < deadline
            && (pool.load().len() < spec.endpoints.len()
                || pool.load().endpoints().iter().any(|state| state.metrics.updated_at.is_none()))
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let grpc_address = running.grpc_address;
        Ok(LaunchedPicker::new(grpc_address, async move {
            running.shutdown(SHUTDOWN_GRACE).await;
            if let Some(sync) = sync {
                sync.shutdown().await;
            }
        }))
    }
}
