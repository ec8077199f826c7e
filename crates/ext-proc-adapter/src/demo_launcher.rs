//! `epp demo`'s picker: the real ext-proc server, started in this process on loopback.
//!
//! A module of the `epp` binary, not of the library: the demo crate drives pickers through
//! its [`PickerLauncher`] trait, and only the binary ties the two together.

use std::sync::Arc;
use std::time::{Duration, Instant};

use demo::{LaunchError, LaunchedPicker, PickerLauncher, PickerSpec};
use ext_proc_adapter::DirectorOptions;
use ext_proc_adapter::endpoints_file::EndpointEntry;
use ext_proc_adapter::server::{self, CollectorSettings, ServerConfig};
use metrics_model::collector::CollectorConfig;
use metrics_model::mapping::Engine;
use scheduler_core::flow::{FlowMetrics, ObjectiveResolver};
use scheduler_core::{Director, ROLE_LABEL, SharedPool};

/// How long the picker may take to scrape every simulated server once before the run starts.
const FIRST_SCRAPE_WAIT: Duration = Duration::from_secs(5);
/// How long open streams get to finish when the run ends.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Starts `epp`'s server with the demo's config, the metrics collector scraping every 50 ms.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct InProcessPicker;

impl PickerLauncher for InProcessPicker {
    async fn launch(&self, spec: PickerSpec<'_>) -> Result<LaunchedPicker, LaunchError> {
        let pool = Arc::new(SharedPool::default());
        let objectives =
            ObjectiveResolver::from_yaml(spec.objectives_yaml, Arc::new(FlowMetrics::new()))
                .map_err(|error| format!("invalid demo objectives: {error}"))?;
        let director = Director::from_config(
            spec.config,
            &scorers::builtin_registry(),
            Arc::clone(&pool),
            DirectorOptions::default(),
            objectives,
        )
        .map_err(|error| format!("invalid picker config: {error}"))?;
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
                ..ServerConfig::loopback("demo-pool")
            },
        )
        .await?;
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
        Ok(LaunchedPicker::new(grpc_address, running.shutdown(SHUTDOWN_GRACE)))
    }
}
