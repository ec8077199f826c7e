//! Starting and stopping the picker's listeners: ext-proc gRPC (TLS or plaintext), gRPC
//! health, and Prometheus metrics. Listeners bind before `start` returns, so callers (tests,
//! the demo) can use port 0 and read the bound addresses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use metrics_model::EngineSet;
use metrics_model::collector::{CollectorConfig, MetricsCollector};
use metrics_model::mapping::Engine;
use scheduler_core::{AllStale, Endpoint, EndpointId, Scheduler, SharedPool, StalenessPolicy};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use tonic_health::server::HealthReporter;

use crate::endpoint_models::{EndpointModels, ModelsPollSettings};
use crate::endpoints_file;
pub use crate::listener::TcpKeepalive;
use crate::metrics::EppMetrics;
use crate::service::{EppExtProc, StreamLimits};
use crate::tls::PemIdentity;
use scheduler_core::{Director, DirectorOptions};

/// Largest gRPC message accepted or sent (a body chunk is at most the proxy's buffer size).
pub(crate) const MAX_GRPC_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Where and how to serve.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// ext-proc gRPC address.
    pub grpc_address: SocketAddr,
    /// gRPC health address.
    pub health_address: SocketAddr,
    /// Prometheus metrics address.
    pub metrics_address: SocketAddr,
    /// TLS identity for ext-proc; `None` serves plaintext.
    pub tls: Option<PemIdentity>,
    /// PEM bundle of the CAs that sign client certificates: with it, ext-proc requires mutual
    /// TLS and refuses clients without a certificate signed by one of them. Needs `tls`.
    pub client_ca: Option<String>,
    /// Keepalive and connection limits of the ext-proc listener.
    pub connections: ConnectionLimits,
    /// Routing options.
    pub director: DirectorOptions,
    /// Stream limits.
    pub limits: StreamLimits,
    /// Pool name in metrics.
    pub pool_name: String,
    /// Metrics older than this mark an endpoint stale; `None` when no metrics source runs,
    /// so nothing is ever stale and readiness only needs a known endpoint. With a collector,
    /// the collector's threshold applies instead.
    pub staleness_threshold: Option<Duration>,
    /// What happens when every endpoint is stale (see [`StalenessPolicy`]); set into the
    /// pool with the threshold.
    pub when_all_stale: AllStale,
    /// Static pool file.
    pub endpoints_file: Option<PathBuf>,
    /// Reload the endpoints file when it changes (`false`: read once at start, as a
    /// `file-discovery` without `watchFile`).
    pub watch_endpoints_file: bool,
    /// Scrape the endpoints' Prometheus metrics; `None` leaves metrics to the embedder.
    pub collector: Option<CollectorSettings>,
    /// Poll the endpoints' model lists into [`RunningServer::endpoint_models`].
    pub models: Option<ModelsPollSettings>,
    /// Model rewrites, loaded at start and reloaded when the file changes (`None`: the
    /// director's own, if any).
    pub model_rewrites: Option<crate::model_rewrites::ModelRewriteSettings>,
    /// Scrape the endpoints' DCGM exporters into
    /// [`RunningServer::endpoint_gpu_utilization`].
    pub gpu: Option<crate::endpoint_gpu::GpuPollSettings>,
    /// Scrape peer clusters' pool averages for the multi-cluster scorers.
    pub cluster_metrics: Option<crate::cluster_metrics::ClusterMetricsSettings>,
}

impl ServerConfig {
    /// Every listener on an ephemeral 127.0.0.1 port, plaintext, default limits, no endpoints
    /// file and no metrics collector: a server for tests, demos and embedding on one host.
    /// Set the other fields with struct update syntax.
    pub fn loopback(pool_name: impl Into<String>) -> Self {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            grpc_address: loopback,
            health_address: loopback,
            metrics_address: loopback,
            tls: None,
            client_ca: None,
            connections: ConnectionLimits::default(),
            director: DirectorOptions::default(),
            limits: StreamLimits::default(),
            pool_name: pool_name.into(),
            staleness_threshold: None,
            when_all_stale: AllStale::FailOpen,
            endpoints_file: None,
            watch_endpoints_file: true,
            collector: None,
            models: None,
            model_rewrites: None,
            gpu: None,
            cluster_metrics: None,
        }
    }
}

/// Keepalive and connection limits of the ext-proc listener: what notices a proxy that
/// vanished without closing (its streams, and the requests they hold, are then released) and
/// what bounds the resources one client can take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Interval of HTTP/2 PINGs on each connection; `None` sends none.
    pub http2_keepalive_interval: Option<Duration>,
    /// A PING unanswered this long closes the connection and every stream on it.
    pub http2_keepalive_timeout: Duration,
    /// TCP keepalive of accepted sockets; `None` leaves it off.
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` of each connection: ext-proc streams (requests in
    /// progress) one connection may hold; a proxy opens more connections beyond it.
    pub max_concurrent_streams: u32,
    /// Connections open at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// A TLS handshake not done in this time closes the connection.
    pub tls_handshake_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            http2_keepalive_interval: Some(DEFAULT_HTTP2_KEEPALIVE_INTERVAL),
            http2_keepalive_timeout: DEFAULT_HTTP2_KEEPALIVE_TIMEOUT,
            tcp_keepalive: Some(TcpKeepalive {
                idle: DEFAULT_TCP_KEEPALIVE_IDLE,
                interval: DEFAULT_TCP_KEEPALIVE_INTERVAL,
                retries: DEFAULT_TCP_KEEPALIVE_RETRIES,
            }),
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            tls_handshake_timeout: DEFAULT_TLS_HANDSHAKE_TIMEOUT,
        }
    }
}

/// Default interval of HTTP/2 keepalive PINGs.
pub const DEFAULT_HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// Default wait for a PING's acknowledgement.
pub const DEFAULT_HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default idle time before TCP keepalive probes.
pub const DEFAULT_TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Default time between TCP keepalive probes.
pub const DEFAULT_TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Default unanswered TCP keepalive probes before the connection is dropped.
pub const DEFAULT_TCP_KEEPALIVE_RETRIES: u32 = 3;
/// Default concurrent streams per connection.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Default connections open at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default TLS handshake timeout.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How endpoint metrics are scraped.
#[derive(Clone, Debug)]
pub struct CollectorSettings {
    /// Interval, timeout, staleness and limits of the scrapes.
    pub config: CollectorConfig,
    /// Engine of endpoints whose entry names none.
    pub default_engine: Engine,
    /// Engines by name from a data-layer `core-metrics-extractor`: with them, an entry's
    /// engine is looked up there and an unknown name falls back to the default engine (as the
    /// Go extractor does); without them, an unknown name is refused.
    pub engines: Option<EngineSet>,
}

impl CollectorSettings {
    /// The engine of the endpoint `entry` describes.
    fn engine_for(&self, entry: &endpoints_file::EndpointEntry) -> Result<Engine, ServerError> {
        let endpoint = SocketAddr::new(entry.address, entry.port);
        match (&self.engines, entry.engine.as_deref()) {
            (Some(engines), name) => Ok(engines.resolve_endpoint(name, &entry.labels)),
            (None, None) => Ok(self.default_engine.clone()),
            (None, Some(name)) => name
                .parse::<Engine>()
                .map_err(|_| ServerError::UnknownEngine { endpoint, engine: name.to_owned() }),
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not bind.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TLS could not be configured.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// The model rewrites file is unusable at start.
    #[error(transparent)]
    ModelRewritesFile(#[from] crate::model_rewrites::ModelRewritesFileError),
    /// The endpoints file is unusable at start.
    #[error(transparent)]
    EndpointsFile(#[from] endpoints_file::EndpointsFileError),
    /// The metrics collector could not start.
    #[error("metrics collector: {0}")]
    Collector(String),
    /// An endpoint names an engine that does not exist.
    #[error("endpoint {endpoint}: unknown engine '{engine}' (known: vllm, sglang, trtllm)")]
    UnknownEngine {
        /// The endpoint.
        endpoint: SocketAddr,
        /// The engine named.
        engine: String,
    },
}

/// Where endpoint changes go: straight into the pool, or through the collector that scrapes
/// them (which then owns their metrics).
#[derive(Clone, Debug)]
pub enum PoolWriter {
    /// Metrics are left as they are (set by the embedder, or none).
    Direct(Arc<SharedPool>),
    /// The collector adds, scrapes and removes endpoints, reading each with its engine.
    Collector(Arc<MetricsCollector>, Arc<CollectorSettings>),
}

impl PoolWriter {
    /// Makes the pool hold exactly `entries`, keeping the metrics of endpoints that stay.
    pub fn apply(&self, entries: &[endpoints_file::EndpointEntry]) -> Result<(), ServerError> {
        match self {
            Self::Direct(pool) => {
                apply_endpoints(pool, entries);
                Ok(())
            }
            Self::Collector(collector, settings) => {
                let mut wanted = Vec::with_capacity(entries.len());
                for entry in entries {
                    let endpoint = entry.to_endpoint();
                    let engine = settings.engine_for(entry)?;
                    wanted.push((endpoint, engine));
                }
                collector.set_endpoints(wanted);
                Ok(())
            }
        }
    }
}

/// A running server; dropping it does not stop it, [`RunningServer::shutdown`] does.
#[derive(Debug)]
pub struct RunningServer {
    /// Bound ext-proc address.
    pub grpc_address: SocketAddr,
    /// Bound health address.
    pub health_address: SocketAddr,
    /// Bound metrics address.
    pub metrics_address: SocketAddr,
    /// The picker's metrics.
    pub metrics: Arc<EppMetrics>,
    /// Where endpoint changes go (for embedders adding endpoints at runtime).
    pub pool_writer: PoolWriter,
    /// The models each endpoint serves, when [`ServerConfig::models`] polls them.
    pub endpoint_models: Option<Arc<EndpointModels>>,
    health: tonic_health::server::HealthReporter,
    holds: Arc<crate::health::ReadinessHolds>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// The GPU utilization of each endpoint (`dcgm-extractor`'s `GPUUtilization`), when
    /// [`ServerConfig::gpu`] scrapes it.
    pub endpoint_gpu_utilization: Option<Arc<crate::endpoint_gpu::EndpointGpuUtilization>>,
}

pub(crate) async fn bind(address: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(address).await.map_err(|source| ServerError::Bind { address, source })
}

/// Resolves once `stopped` turns true (or its sender is gone).
async fn until_stopped(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// Serves an ext-proc service on `listener` (TLS when `tls` is given, mutual with
/// `client_ca`), under `limits`, until `stopped`. The returned task ends when the server does.
pub(crate) fn spawn_ext_proc<T: ExternalProcessor>(
    service: ExternalProcessorServer<T>,
    listener: TcpListener,
    tls: Option<&PemIdentity>,
    client_ca: Option<&str>,
    limits: ConnectionLimits,
    stopped: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, ServerError> {
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(limits.http2_keepalive_interval)
        .http2_keepalive_timeout(Some(limits.http2_keepalive_timeout))
        .max_concurrent_streams(limits.max_concurrent_streams);
    match (tls, client_ca) {
        (Some(identity), client_ca) => {
            let mut tls = identity.server_config().timeout(limits.tls_handshake_timeout);
            if let Some(client_ca) = client_ca {
                tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(client_ca));
            }
            builder =
                builder.tls_config(tls).map_err(|error| ServerError::Tls(error.to_string()))?;
        }
        (None, Some(_)) => {
            return Err(ServerError::Tls("a client CA needs TLS serving".into()));
        }
        (None, None) => {}
    }
    let incoming =
        crate::listener::limited_incoming(listener, limits.max_connections, limits.tcp_keepalive);
    let serving =
        builder.add_service(service).serve_with_incoming_shutdown(incoming, until_stopped(stopped));
    Ok(tokio::spawn(async move {
        if let Err(error) = serving.await {
            tracing::error!(%error, "ext-proc server failed");
        }
    }))
}

/// Serves gRPC health on `listener` until `stopped`, pushing its task onto `tasks`; the
/// statuses are set through the returned reporter.
pub(crate) fn spawn_health(
    listener: TcpListener,
    stopped: watch::Receiver<bool>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> HealthReporter {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let serving = tonic::transport::Server::builder()
        .add_service(health_service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), until_stopped(stopped));
    tasks.push(tokio::spawn(async move {
        if let Err(error) = serving.await {
            tracing::error!(%error, "health server failed");
        }
    }));
    reporter
}

/// Binds every listener and starts serving, admitting every request (no flow control).
pub async fn start(
    scheduler: Arc<Scheduler>,
    pool: Arc<SharedPool>,
    config: ServerConfig,
) -> Result<RunningServer, ServerError> {
    let director = Arc::new(Director::new(scheduler, pool, config.director.clone()));
    start_with_director(director, config).await
}

/// How often queued requests are re-checked for dispatch and TTL expiry, besides on every
/// completion.
const FLOW_TICK: Duration = Duration::from_millis(5);

/// Binds every listener and starts serving with `director` (its pool, scheduler and flow
/// control).
pub async fn start_with_director(
    director: Arc<Director>,
    config: ServerConfig,
) -> Result<RunningServer, ServerError> {
    let pool = Arc::clone(director.pool());
    let (pool_writer, staleness_threshold) = match &config.collector {
        Some(settings) => {
            let collector = MetricsCollector::start(Arc::clone(&pool), settings.config.clone())
                .map_err(|error| ServerError::Collector(error.to_string()))?;
            let staleness = collector.config().staleness_threshold;
            (
                PoolWriter::Collector(Arc::new(collector), Arc::new(settings.clone())),
                Some(staleness),
            )
        }
        None => (PoolWriter::Direct(Arc::clone(&pool)), config.staleness_threshold),
    };
    // One policy for readiness, admission and routing, carried by every later snapshot.
    if let Some(threshold) = staleness_threshold {
        let policy = StalenessPolicy::new(threshold).when_all_stale(config.when_all_stale);
        tracing::info!(?threshold, when_all_stale = ?policy.when_all_stale, "metrics staleness policy");
        pool.set_staleness(Some(policy));
    }
    let initial_endpoints_file = match &config.endpoints_file {
        Some(path) => {
            let loaded = endpoints_file::load(path).await?;
            pool_writer.apply(&loaded.entries)?;
            Some((path.clone(), loaded.content))
        }
        None => None,
    };
    let grpc = bind(config.grpc_address).await?;
    let health = bind(config.health_address).await?;
    let metrics_listener = bind(config.metrics_address).await?;
    let local = |listener: &TcpListener, fallback| listener.local_addr().unwrap_or(fallback);
    let grpc_address = local(&grpc, config.grpc_address);
    let health_address = local(&health, config.health_address);
    let metrics_address = local(&metrics_listener, config.metrics_address);

    let metrics = Arc::new(EppMetrics::new(config.pool_name.clone(), staleness_threshold));
    if let Some(rewrites) = director.model_rewrites() {
        metrics.admit_model_names(rewrites.model_names());
    }
    let initial_model_rewrites = match &config.model_rewrites {
        Some(settings) => {
            let content = settings.load_into(&director, &metrics).await?;
            Some((settings.clone(), content))
        }
        None => None,
    };
    let flow = director.admission().filter(|flow| flow.controller().is_some()).cloned();
    let service = EppExtProc::new(Arc::clone(&director), Some(Arc::clone(&metrics)), config.limits)
        .into_server(MAX_GRPC_MESSAGE_BYTES);
    let (stop, stopped) = watch::channel(false);

    let mut tasks = vec![spawn_ext_proc(
        service,
        grpc,
        config.tls.as_ref(),
        config.client_ca.as_deref(),
        config.connections,
        stopped.clone(),
    )?];
    let reporter = spawn_health(health, stopped.clone(), &mut tasks);
    let holds = Arc::new(crate::health::ReadinessHolds::default());
    tasks.push(tokio::spawn(crate::health::report(
        reporter.clone(),
        Arc::clone(&pool),
        Arc::clone(&holds),
        Duration::from_millis(500),
    )));
    if let Some((settings, applied)) = initial_model_rewrites {
        let watcher = settings.watch(Arc::clone(&director), Arc::clone(&metrics), applied);
        tasks.push(tokio::spawn(watcher));
    }
    tasks.push(tokio::spawn(crate::metrics_http::serve(
        metrics_listener,
        crate::metrics_http::epp_page(Arc::clone(&metrics), director),
    )));
    if let Some((path, applied)) = initial_endpoints_file {
        let follow = config.watch_endpoints_file;
        tasks.push(tokio::spawn(watch_endpoints_file(path, applied, follow, pool_writer.clone())));
    }
    let endpoint_models = config.models.clone().map(|settings| {
        let models = Arc::new(EndpointModels::default());
        tasks.push(tokio::spawn(crate::endpoint_models::poll(
            Arc::clone(&pool),
            Arc::clone(&models),
            settings,
        )));
        models
    });
    let endpoint_gpu_utilization = config.gpu.clone().map(|settings| {
        let store = Arc::new(crate::endpoint_gpu::EndpointGpuUtilization::default());
        tasks.push(tokio::spawn(crate::endpoint_gpu::poll(
            Arc::clone(&pool),
            Arc::clone(&store),
            settings,
        )));
        store
    });
    if let Some(settings) = config.cluster_metrics.clone() {
        tasks.push(tokio::spawn(crate::cluster_metrics::poll(Arc::clone(&pool), settings)));
    }
    if let Some(flow) = flow {
        let pool = Arc::clone(&pool);
        tasks.push(tokio::spawn(async move {
            let mut interval = tokio::time::interval(FLOW_TICK);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                interval.tick().await;
                flow.tick(&pool.load(), std::time::Instant::now());
            }
        }));
    }
    tracing::info!(%grpc_address, %health_address, %metrics_address, tls = config.tls.is_some(), mtls = config.client_ca.is_some(), "epp serving");
    Ok(RunningServer {
        grpc_address,
        health_address,
        metrics_address,
        metrics,
        pool_writer,
        endpoint_models,
        health: reporter,
        holds,
        stop,
        tasks,
        endpoint_gpu_utilization,
    })
}

impl RunningServer {
    /// The conditions that hold readiness at NotServing besides the pool's state (endpoint
    /// discovery, leader election).
    pub fn readiness_holds(&self) -> Arc<crate::health::ReadinessHolds> {
        Arc::clone(&self.holds)
    }

    /// Stops accepting, lets open streams finish, and stops the background tasks (the
    /// collector stops when its last handle is dropped).
    pub async fn shutdown(self, grace: Duration) {
        stop_tasks(&self.stop, self.tasks, grace).await;
    }

    /// Drains, then stops: readiness reports NotServing at once (so Kubernetes takes the pod
    /// out of the Service and gateways stop picking it), ext-proc keeps serving for `window`
    /// (requests that still arrive meanwhile are answered, not refused), then
    /// [`Self::shutdown`] with `grace`. As the Go EPP's `--drain-timeout`.
    pub async fn drain(self, window: Duration, grace: Duration) {
        crate::health::start_draining(&self.health, &self.holds).await;
        tracing::info!(?window, "draining: not ready, still serving");
        tokio::time::sleep(window).await;
        self.shutdown(grace).await;
    }
}

/// Signals `stop`, aborts every task but the first (the ext-proc server), and gives that one
/// `grace` to finish its open streams before aborting it too.
pub(crate) async fn stop_tasks(
    stop: &watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    grace: Duration,
) {
    let _ = stop.send(true);
    let (grpc, rest) = tasks.split_at(1);
    for task in rest {
        task.abort();
    }
    if let Some(grpc) = grpc.first() {
        let _ = tokio::time::timeout(grace, async {
            while !grpc.is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        grpc.abort();
    }
}

/// Makes the pool hold exactly `entries`, keeping the metrics of endpoints that stay.
pub fn apply_endpoints(pool: &SharedPool, entries: &[endpoints_file::EndpointEntry]) {
    let endpoints: Vec<Endpoint> =
        entries.iter().map(endpoints_file::EndpointEntry::to_endpoint).collect();
    pool.update(|snapshot| {
        let keep: std::collections::HashSet<EndpointId> = endpoints.iter().map(|e| e.id).collect();
        let gone: Vec<EndpointId> =
            snapshot.endpoints().iter().map(|s| s.id()).filter(|id| !keep.contains(id)).collect();
        for id in gone {
            snapshot.remove(id);
        }
        for endpoint in &endpoints {
            let metrics =
                snapshot.by_id(endpoint.id).map(|s| s.metrics.clone()).unwrap_or_default();
            snapshot.upsert(scheduler_core::EndpointState { endpoint: endpoint.clone(), metrics });
        }
    });
}

/// Reloads the endpoints file when its content changes (with `follow_changes`, see
/// [`crate::file_watch`]), and resolves its DNS names again every
/// [`endpoints_file::DNS_REFRESH`]: a file that cannot be read or parsed keeps the last good
/// pool.
async fn watch_endpoints_file(
    path: PathBuf,
    applied: Vec<u8>,
    follow_changes: bool,
    writer: PoolWriter,
) {
    let refresh = Some(endpoints_file::DNS_REFRESH);
    crate::file_watch::watch_and_refresh(
        path,
        "endpoints file",
        applied,
        follow_changes,
        refresh,
        move |path: &Path, content: &[u8]| {
            let declared = endpoints_file::parse_bytes(path, content);
            let writer = writer.clone();
            async move {
                let entries = endpoints_file::resolve(&declared?).await;
                writer.apply(&entries)?;
                Ok::<_, ServerError>(entries.len())
            }
        },
    )
    .await;
}
