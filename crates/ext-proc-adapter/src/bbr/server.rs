//! Starting and stopping `epp bbr`'s listeners: ext-proc gRPC, gRPC health and Prometheus
//! metrics, built as `epp`'s are ([`crate::server`]); plus the adapters-file watcher and the
//! models poller. Listeners bind before [`start`] returns, so callers can use port 0.

use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::adapters_file::{self, AdaptersFileError};
use super::base_models::BaseModels;
use super::metrics::BbrMetrics;
use super::models_poller;
use super::service::BbrExtProc;
use crate::endpoints_file::{self, EndpointEntry};
use crate::health::{EXT_PROC_SERVICE, LIVENESS, READINESS};
use crate::server::{ConnectionLimits, MAX_GRPC_MESSAGE_BYTES, ServerError, bind};
use crate::service::StreamLimits;
use crate::tls::PemIdentity;

/// Default largest request body, in bytes (as `epp`'s).
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Default interval of the `/v1/models` polls.
pub const DEFAULT_MODELS_REFRESH_INTERVAL: Duration = Duration::from_secs(10);

/// Where and how the body-based router serves.
#[derive(Clone, Debug)]
pub struct BbrConfig {
    /// ext-proc gRPC address.
    pub grpc_address: SocketAddr,
    /// gRPC health address.
    pub health_address: SocketAddr,
    /// Prometheus metrics address.
    pub metrics_address: SocketAddr,
    /// TLS identity for ext-proc; `None` serves plaintext.
    pub tls: Option<PemIdentity>,
    /// PEM bundle of the CAs signing client certificates (mutual TLS); needs `tls`.
    pub client_ca: Option<String>,
    /// Keepalive and connection limits of the ext-proc listener.
    pub connections: ConnectionLimits,
    /// Stream limits (the idle and decision timeouts).
    pub limits: StreamLimits,
    /// Largest request body read; larger ones get 413.
    pub max_body_bytes: usize,
    /// ConfigMaps mapping adapters to base models, reloaded on change.
    pub adapters_file: Option<PathBuf>,
    /// Model servers whose `/v1/models` are polled for adapters, reloaded on change.
    pub endpoints_file: Option<PathBuf>,
    /// Interval of the `/v1/models` polls.
    pub models_refresh_interval: Duration,
}

impl BbrConfig {
    /// Every listener on an ephemeral 127.0.0.1 port, plaintext, default limits, no files: a
    /// router for tests and embedding on one host. Set the other fields with struct update
    /// syntax.
    pub fn loopback() -> Self {
        let loopback = SocketAddr::from(SocketAddrV4::new([127, 0, 0, 1].into(), 0));
        Self {
            grpc_address: loopback,
            health_address: loopback,
            metrics_address: loopback,
            tls: None,
            client_ca: None,
            connections: ConnectionLimits::default(),
            limits: StreamLimits::default(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            adapters_file: None,
            endpoints_file: None,
            models_refresh_interval: DEFAULT_MODELS_REFRESH_INTERVAL,
        }
    }
}

/// Why the body-based router could not start.
#[derive(Debug, thiserror::Error)]
pub enum BbrError {
    /// A listener, TLS or the endpoints file.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The adapters file is unusable at start.
    #[error(transparent)]
    AdaptersFile(#[from] AdaptersFileError),
}

/// A running router; dropping it does not stop it, [`RunningBbr::shutdown`] does.
#[derive(Debug)]
pub struct RunningBbr {
    /// Bound ext-proc address.
    pub grpc_address: SocketAddr,
    /// Bound health address.
    pub health_address: SocketAddr,
    /// Bound metrics address.
    pub metrics_address: SocketAddr,
    /// The router's metrics.
    pub metrics: Arc<BbrMetrics>,
    /// The adapter maps in use.
    pub base_models: Arc<BaseModels>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningBbr {
    /// Stops accepting, lets open streams finish within `grace`, and stops the background
    /// tasks.
    pub async fn shutdown(self, grace: Duration) {
        crate::server::stop_tasks(&self.stop, self.tasks, grace).await;
    }
}

/// Reads the files, binds every listener and starts serving.
pub async fn start(config: BbrConfig) -> Result<RunningBbr, BbrError> {
    let initial_adapters = match &config.adapters_file {
        Some(path) => Some((path.clone(), adapters_file::load(path).await?)),
        None => None,
    };
    let initial_endpoints = match &config.endpoints_file {
        Some(path) => {
            Some((path.clone(), endpoints_file::load(path).await.map_err(ServerError::from)?))
        }
        None => None,
    };
    let base_models = Arc::new(BaseModels::default());
    let grpc = bind(config.grpc_address).await?;
    let health = bind(config.health_address).await?;
    let metrics_listener = bind(config.metrics_address).await?;
    let local =
        |listener: &tokio::net::TcpListener, fallback| listener.local_addr().unwrap_or(fallback);
    let grpc_address = local(&grpc, config.grpc_address);
    let health_address = local(&health, config.health_address);
    let metrics_address = local(&metrics_listener, config.metrics_address);

    let metrics = Arc::new(BbrMetrics::new());
    let service = BbrExtProc::new(
        Arc::clone(&base_models),
        Some(Arc::clone(&metrics)),
        config.max_body_bytes,
        config.limits,
    )
    .into_server(MAX_GRPC_MESSAGE_BYTES);
    let (stop, stopped) = watch::channel(false);
    let mut tasks = vec![crate::server::spawn_ext_proc(
        service,
        grpc,
        config.tls.as_ref(),
        config.client_ca.as_deref(),
        config.connections,
        stopped.clone(),
    )?];
    // Nothing to wait for: the router can answer as soon as it listens.
    let reporter = crate::server::spawn_health(health, stopped, &mut tasks);
    for service in [LIVENESS, READINESS, EXT_PROC_SERVICE] {
        reporter.set_service_status(service, tonic_health::ServingStatus::Serving).await;
    }
    let page = Arc::clone(&metrics);
    tasks.push(tokio::spawn(crate::metrics_http::serve(
        metrics_listener,
        Arc::new(move || page.encode()),
    )));

    if let Some((path, (content, map))) = initial_adapters {
        tracing::info!(path = %path.display(), adapters = map.len(), "adapters file loaded");
        base_models.set_configured(map);
        let models = Arc::clone(&base_models);
        tasks.push(tokio::spawn(crate::file_watch::watch(
            path,
            "adapters file",
            content,
            move |path, content| {
                let map = adapters_file::parse_bytes(path, content)?;
                let count = map.len();
                models.set_configured(map);
                Ok::<_, AdaptersFileError>(count)
            },
        )));
    }
    if let Some((path, loaded)) = initial_endpoints {
        let (addresses, watched) = watch::channel(addresses_of(&loaded.entries));
        tasks.push(tokio::spawn(crate::file_watch::watch_and_refresh(
            path,
            "endpoints file",
            loaded.content,
            true,
            Some(endpoints_file::DNS_REFRESH),
            move |path: &std::path::Path, content: &[u8]| {
                let declared = endpoints_file::parse_bytes(path, content);
                let addresses = addresses.clone();
                async move {
                    let entries = endpoints_file::resolve(&declared?).await;
                    addresses.send_replace(addresses_of(&entries));
                    Ok::<_, endpoints_file::EndpointsFileError>(entries.len())
                }
            },
        )));
        tasks.push(tokio::spawn(models_poller::poll(
            watched,
            Arc::clone(&base_models),
            config.models_refresh_interval,
        )));
    }
    tracing::info!(%grpc_address, %health_address, %metrics_address, tls = config.tls.is_some(), "epp bbr serving");
    Ok(RunningBbr {
        grpc_address,
        health_address,
        metrics_address,
        metrics,
        base_models,
        stop,
        tasks,
    })
}

fn addresses_of(entries: &[EndpointEntry]) -> Vec<SocketAddr> {
    entries.iter().map(|entry| SocketAddr::new(entry.address, entry.port)).collect()
}
