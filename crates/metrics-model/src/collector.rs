//! The metrics collector: scrapes every endpoint's metrics page on an interval and publishes
//! the results into the shared pool snapshot.
//!
//! Shape, and why:
//!
//! - **One task per endpoint**, each with its own ticker and its own keep-alive HTTP/1
//!   connection, so a slow or hung server delays nobody else. A semaphore bounds how many
//!   scrapes are in flight at once across the pool. Each task scrapes in one of ten phase
//!   slots of the interval (a golden-ratio sequence over the order tasks start), so the pool's
//!   scrapes are spread over the interval in small groups that wake the runtime together,
//!   rather than one burst per tick or one wake-up per scrape, and it reads each page into a
//!   buffer it keeps between scrapes.
//! - **Only the series a mapping reads are decoded.** The page is never validated or parsed
//!   as a whole: lines of families the mapping does not read are skipped after a prefix
//!   comparison (see [`crate::text::Parser::from_bytes`]).
//! - **One publisher task.** Scrape tasks send their results over a bounded channel; the
//!   publisher waits a short coalescing window (a fifth of the interval, at most 10 ms) after
//!   the first result and applies everything that arrived in one [`SharedPool::update`]. Each
//!   update copies the snapshot (about 150 µs at 1,000 endpoints), so a pool of N endpoints
//!   scraped every 50 ms costs about five copies per interval, not N; freshness pays at most
//!   the window.
//! - **Failures keep the last good metrics.** A scrape that fails (connection refused or reset,
//!   timeout, non-2xx status, oversized or malformed page, missing metrics) publishes nothing:
//!   the endpoint keeps its previous metrics with their old `updated_at`, so they turn stale by
//!   time alone ([`scheduler_core::EndpointMetrics::is_stale`]) and consumers decide what stale
//!   means for them. The failure is logged at `warn` when it starts, when the metrics cross the
//!   staleness threshold, and then at most once per [`CollectorConfig::failure_log_interval`];
//!   recovery is logged at `info`.
//! - **Endpoints come and go at runtime.** [`MetricsCollector::upsert_endpoint`] and
//!   [`MetricsCollector::remove_endpoint`] change the snapshot and the set of scrape tasks
//!   together, under a lock that is never held across an await.
//! - **Time** is read from tokio's clock, so tests can pause or advance it.
//!
//! The HTTP client is hyper's connection-level HTTP/1 client over plain TCP, or over rustls
//! when [`CollectorConfig::tls`] is set: no connection pool and no proxy support, which is all
//! a scrape of `http(s)://ip:port/metrics` needs.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{ACCEPT, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use scheduler_core::{Endpoint, EndpointId, EndpointMetrics, EndpointState, SharedPool};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::mapping::{Engine, ExtractError};
use crate::tls::ScrapeTls;

/// How the collector scrapes. [`Default`] matches the Go EPP.
#[derive(Clone, Debug)]
pub struct CollectorConfig {
    /// Time between two scrapes of one endpoint. Default 50 ms.
    pub interval: Duration,
    /// Longest a scrape may take, connection included. Default 1 s. Clamped to half the
    /// staleness threshold when not below it, so a hung server is noticed before its metrics
    /// would be trusted past their age.
    pub scrape_timeout: Duration,
    /// Age after which metrics are stale. Default 2 s. The collector does not discard stale
    /// metrics; it uses the threshold for its timeout bound and its logs.
    pub staleness_threshold: Duration,
    /// Path of the metrics page. Default `/metrics`.
    pub metrics_path: String,
    /// Port of the metrics page when the server publishes it apart from its serving port
    /// (`None`, the default: the endpoint's own port).
    pub scrape_port: Option<u16>,
    /// Most scrapes in flight at once. Default 64.
    pub max_concurrent_scrapes: usize,
    /// Largest page accepted, in bytes. Default 16 MiB.
    pub max_body_bytes: usize,
    /// Least time between two warnings about the same failing endpoint. Default 30 s.
    pub failure_log_interval: Duration,
    /// Scrape over HTTPS with this client configuration (`None`, the default: plain HTTP).
    pub tls: Option<ScrapeTls>,
}

impl Default for CollectorConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(50),
            scrape_timeout: Duration::from_secs(1),
            staleness_threshold: Duration::from_secs(2),
            metrics_path: "/metrics".to_owned(),
            scrape_port: None,
            max_concurrent_scrapes: 64,
            max_body_bytes: 16 << 20,
            failure_log_interval: Duration::from_secs(30),
            tls: None,
        }
    }
}

impl CollectorConfig {
    /// The settings actually used: the timeout bounded by the staleness threshold, and every
    /// value that a timer or semaphore cannot take (zero) raised to its minimum.
    fn effective(mut self) -> Self {
        const MINIMUM_TICK: Duration = Duration::from_millis(1);
        self.interval = self.interval.max(MINIMUM_TICK);
        self.staleness_threshold = self.staleness_threshold.max(MINIMUM_TICK);
        if self.scrape_timeout >= self.staleness_threshold {
            self.scrape_timeout = self.staleness_threshold / 2;
        }
        self.scrape_timeout = self.scrape_timeout.max(MINIMUM_TICK);
        self.max_concurrent_scrapes = self.max_concurrent_scrapes.clamp(1, Semaphore::MAX_PERMITS);
        if !self.metrics_path.starts_with('/') {
            self.metrics_path.insert(0, '/');
        }
        self
    }
}

/// The collector could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CollectorError {
    /// Started outside a tokio runtime.
    #[error("the metrics collector must be started inside a tokio runtime")]
    NoRuntime,
    /// The metrics path is not a valid URI path.
    #[error("invalid metrics path {path:?}")]
    InvalidPath {
        /// The configured path.
        path: String,
    },
}

/// Scrapes endpoints and keeps their metrics in a [`SharedPool`] fresh.
///
/// Dropping it (or calling [`Self::shutdown`]) stops every scrape.
pub struct MetricsCollector {
    inner: Arc<Inner>,
    publisher: JoinHandle<()>,
}

struct Inner {
    pool: Arc<SharedPool>,
    context: Arc<ScrapeContext>,
    runtime: tokio::runtime::Handle,
    results: mpsc::Sender<(EndpointId, EndpointMetrics)>,
    scrapers: Mutex<HashMap<EndpointId, Scraper>>,
    scrapers_started: AtomicU64,
}

/// A running scrape task and what it scrapes.
struct Scraper {
    target: Target,
    task: JoinHandle<()>,
}

/// What every scrape task shares.
struct ScrapeContext {
    config: CollectorConfig,
    path: hyper::Uri,
    permits: Semaphore,
    /// Time zero of every scraper's phase.
    epoch: Instant,
}

/// Results waiting for the publisher; bounded so a stalled publisher slows scrapers down
/// instead of growing memory.
const RESULT_CHANNEL_CAPACITY: usize = 1024;
/// Most results applied in one snapshot update.
const PUBLISH_BATCH: usize = RESULT_CHANNEL_CAPACITY;

impl MetricsCollector {
    /// Starts a collector publishing into `pool`, with no endpoints yet.
    ///
    /// Endpoints already in `pool` are left alone (not scraped) until they are upserted.
    pub fn start(pool: Arc<SharedPool>, config: CollectorConfig) -> Result<Self, CollectorError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| CollectorError::NoRuntime)?;
        let config = config.effective();
        let path = config
            .metrics_path
            .parse::<hyper::Uri>()
            .ok()
            .filter(|uri| uri.scheme().is_none() && uri.authority().is_none())
            .ok_or_else(|| CollectorError::InvalidPath { path: config.metrics_path.clone() })?;
        let permits = Semaphore::new(config.max_concurrent_scrapes);
        let (results, receiver) = mpsc::channel(RESULT_CHANNEL_CAPACITY);
        let window =
            (config.interval / 5).clamp(Duration::from_millis(1), Duration::from_millis(10));
        let publisher = runtime.spawn(publish(Arc::clone(&pool), receiver, window));
        let context = Arc::new(ScrapeContext { config, path, permits, epoch: Instant::now() });
        let inner = Arc::new(Inner {
            pool,
            context,
            runtime,
            results,
            scrapers: Mutex::new(HashMap::new()),
            scrapers_started: AtomicU64::new(0),
        });
        Ok(Self { inner, publisher })
    }

    /// The pool this collector publishes into.
    pub fn pool(&self) -> &Arc<SharedPool> {
        &self.inner.pool
    }

    /// The settings in use, after bounding (see [`CollectorConfig::scrape_timeout`]).
    pub fn config(&self) -> &CollectorConfig {
        &self.inner.context.config
    }

    /// Adds `endpoint` to the pool, or replaces it, and scrapes it as `engine`.
    ///
    /// A replaced endpoint keeps its current metrics; its scraping restarts with the new engine.
    pub fn upsert_endpoint(&self, endpoint: Endpoint, engine: Engine) {
        self.upsert(endpoint, None, engine);
    }

    /// Like [`Self::upsert_endpoint`], but also sets the endpoint's metrics (for example ones
    /// carried over from a previous discovery).
    pub fn upsert_endpoint_state(&self, state: EndpointState, engine: Engine) {
        self.upsert(state.endpoint, Some(state.metrics), engine);
    }

    fn upsert(&self, endpoint: Endpoint, metrics: Option<EndpointMetrics>, engine: Engine) {
        let id = endpoint.id;
        // The lock makes the snapshot change and the task change one step for concurrent
        // upserts and removals of the same endpoint; nothing inside awaits.
        let mut scrapers = self.inner.scrapers.lock();
        self.inner.pool.update(|snapshot| {
            let metrics = metrics
                .clone()
                .or_else(|| snapshot.by_id(id).map(|state| state.metrics.clone()))
                .unwrap_or_default();
            snapshot.upsert(EndpointState { endpoint: endpoint.clone(), metrics });
        });
        let target = Target::of(&endpoint, engine, self.inner.context.config.scrape_port);
        self.start_scraper(&mut scrapers, target);
    }

    fn start_scraper(&self, scrapers: &mut HashMap<EndpointId, Scraper>, target: Target) {
        let index = self.inner.scrapers_started.fetch_add(1, Ordering::Relaxed);
        let phase = phase_offset(index, self.inner.context.config.interval);
        let task = self.inner.runtime.spawn(scrape_endpoint(
            target.clone(),
            Arc::clone(&self.inner.context),
            self.inner.results.clone(),
            phase,
        ));
        if let Some(previous) = scrapers.insert(target.id, Scraper { target, task }) {
            previous.task.abort();
        }
    }

    /// Makes the pool hold exactly `wanted`, published as one snapshot (a reader never sees a
    /// half-applied change, such as an empty pool between removals and additions): endpoints
    /// not listed leave, listed ones are added or re-declared, keeping their metrics. Scrapers
    /// of endpoints whose address, name and engine did not change keep running.
    pub fn set_endpoints(&self, wanted: Vec<(Endpoint, Engine)>) {
        let mut scrapers = self.inner.scrapers.lock();
        let keep: std::collections::HashSet<EndpointId> =
            wanted.iter().map(|(endpoint, _)| endpoint.id).collect();
        self.inner.pool.update(|snapshot| {
            let gone: Vec<EndpointId> = snapshot
                .endpoints()
                .iter()
                .map(EndpointState::id)
                .filter(|id| !keep.contains(id))
                .collect();
            for id in gone {
                snapshot.remove(id);
            }
            for (endpoint, _) in &wanted {
                let metrics = snapshot
                    .by_id(endpoint.id)
                    .map(|state| state.metrics.clone())
                    .unwrap_or_default();
                snapshot.upsert(EndpointState { endpoint: endpoint.clone(), metrics });
            }
        });
        scrapers.retain(|id, scraper| {
            let stays = keep.contains(id);
            if !stays {
                scraper.task.abort();
            }
            stays
        });
        for (endpoint, engine) in wanted {
            let target = Target::of(&endpoint, engine, self.inner.context.config.scrape_port);
            if !scrapers.get(&target.id).is_some_and(|running| running.target.same_as(&target)) {
                self.start_scraper(&mut scrapers, target);
            }
        }
    }

    /// How many scrape tasks were started so far (one per added or changed endpoint).
    pub fn scrapers_started(&self) -> u64 {
        self.inner.scrapers_started.load(Ordering::Relaxed)
    }

    /// Removes an endpoint from the pool and stops scraping it; returns whether it was known.
    pub fn remove_endpoint(&self, id: EndpointId) -> bool {
        let mut scrapers = self.inner.scrapers.lock();
        let scraper = scrapers.remove(&id);
        if let Some(scraper) = &scraper {
            scraper.task.abort();
        }
        let mut was_in_pool = false;
        self.inner.pool.update(|snapshot| was_in_pool = snapshot.remove(id));
        scraper.is_some() || was_in_pool
    }

    /// The endpoints being scraped.
    pub fn endpoints(&self) -> Vec<EndpointId> {
        self.inner.scrapers.lock().keys().copied().collect()
    }

    /// Stops every scrape and waits until the tasks have ended.
    pub async fn shutdown(mut self) {
        let tasks = self.abort_all();
        for task in tasks {
            // A cancelled task reports a cancellation error, which is the expected outcome.
            let _ = task.await;
        }
    }

    fn abort_all(&mut self) -> Vec<JoinHandle<()>> {
        let mut tasks: Vec<JoinHandle<()>> =
            self.inner.scrapers.lock().drain().map(|(_, scraper)| scraper.task).collect();
        // The publisher is replaced by a finished placeholder so it can be awaited once.
        let publisher = std::mem::replace(&mut self.publisher, self.inner.runtime.spawn(async {}));
        tasks.push(publisher);
        for task in &tasks {
            task.abort();
        }
        tasks
    }
}

impl Drop for MetricsCollector {
    fn drop(&mut self) {
        for task in self.inner.scrapers.lock().drain().map(|(_, scraper)| scraper.task) {
            task.abort();
        }
        self.publisher.abort();
    }
}

impl fmt::Debug for MetricsCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsCollector")
            .field("config", &self.inner.context.config)
            .field("endpoints", &self.inner.scrapers.lock().len())
            .finish()
    }
}

/// Applies scrape results to the pool: after the first result, waits `window` for more, then
/// applies them all in one snapshot update.
async fn publish(
    pool: Arc<SharedPool>,
    mut results: mpsc::Receiver<(EndpointId, EndpointMetrics)>,
    window: Duration,
) {
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    while results.recv_many(&mut batch, PUBLISH_BATCH).await > 0 {
        tokio::time::sleep(window).await;
        while batch.len() < PUBLISH_BATCH {
            match results.try_recv() {
                Ok(result) => batch.push(result),
                Err(_) => break,
            }
        }
        pool.update(|snapshot| {
            for (id, metrics) in &batch {
                // An endpoint removed after its scrape finished is simply not there any more.
                snapshot.set_metrics(*id, metrics.clone());
            }
        });
        batch.clear();
    }
}

/// The endpoint a scrape task serves.
#[derive(Clone)]
struct Target {
    id: EndpointId,
    address: SocketAddr,
    name: Arc<str>,
    engine: Engine,
}

impl Target {
    /// The scrape target of `endpoint`, on `port` instead of its own when given.
    fn of(endpoint: &Endpoint, engine: Engine, port: Option<u16>) -> Self {
        let mut address = endpoint.address;
        if let Some(port) = port {
            address.set_port(port);
        }
        Self { id: endpoint.id, address, name: Arc::clone(&endpoint.name), engine }
    }

    /// Whether a scraper of `self` also serves `other` (same address, name and engine).
    fn same_as(&self, other: &Self) -> bool {
        self.address == other.address
            && self.name == other.name
            && self.engine.same_as(&other.engine)
    }
}

/// Why a scrape failed.
#[derive(Debug, thiserror::Error)]
enum ScrapeError {
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("tls handshake: {0}")]
    Tls(#[source] std::io::Error),
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("could not build the request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("status {0}")]
    Status(StatusCode),
    #[error("reading the body: {0}")]
    Body(String),
    #[error("page larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Extract(#[from] ExtractError),
}

impl ScrapeError {
    /// A short, stable tag, so that a changing detail (a line number) does not count as a new
    /// kind of failure in the logs.
    fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Tls(_) => "tls",
            Self::Http(_) => "http",
            Self::Request(_) => "request",
            Self::Status(_) => "status",
            Self::Body(_) => "body",
            Self::TooLarge { .. } => "too-large",
            Self::Timeout(_) => "timeout",
            Self::Extract(_) => "page",
        }
    }
}

/// A keep-alive connection to one endpoint. Dropping it closes the connection.
struct Connection {
    sender: SendRequest<Empty<Bytes>>,
    driver: JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// The scrape loop of one endpoint; runs until aborted.
async fn scrape_endpoint(
    target: Target,
    context: Arc<ScrapeContext>,
    results: mpsc::Sender<(EndpointId, EndpointMetrics)>,
    phase: Duration,
) {
    let config = &context.config;
    // The first scrape runs at once (a new endpoint should not wait for its metrics); the
    // following ones at this endpoint's phase of the interval, counted from the collector's
    // epoch, so N endpoints' scrapes are spread over the interval instead of bursting together.
    let first_tick = next_phase_tick(context.epoch, Instant::now(), phase, config.interval);
    let mut ticker = tokio::time::interval_at(first_tick, config.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut first = true;
    let mut connection: Option<Connection> = None;
    let mut health = Health::default();
    // The page buffer lives as long as the loop: a scrape reuses its capacity rather than
    // allocating a page-sized buffer every interval.
    let mut page: Vec<u8> = Vec::new();
    loop {
        if !std::mem::take(&mut first) {
            ticker.tick().await;
        }
        // Fetching and parsing both hold the permit, so `max_concurrent_scrapes` bounds the
        // pages held and parsed at once, not only the ones in transit.
        let (metrics, scraped_at) = {
            let Ok(_permit) = context.permits.acquire().await else { return };
            let fetched = match tokio::time::timeout(
                config.scrape_timeout,
                fetch(&target, &context, &mut connection, &mut page),
            )
            .await
            {
                Ok(result) => result,
                Err(_) => Err(ScrapeError::Timeout(config.scrape_timeout)),
            };
            let scraped_at = Instant::now();
            let metrics = match fetched {
                // A large page would hold a runtime worker for milliseconds: parse it where
                // blocking is allowed (the buffer goes there and comes back).
                Ok(()) if page.len() > BLOCKING_PARSE_BYTES => {
                    let engine = target.engine.clone();
                    let buffer = std::mem::take(&mut page);
                    match tokio::task::spawn_blocking(move || {
                        let metrics = extract(&engine, &buffer, scraped_at);
                        (metrics, buffer)
                    })
                    .await
                    {
                        Ok((metrics, buffer)) => {
                            page = buffer;
                            metrics
                        }
                        Err(error) => Err(ScrapeError::Body(error.to_string())),
                    }
                }
                Ok(()) => extract(&target.engine, &page, scraped_at),
                Err(error) => Err(error),
            };
            // A one-off huge page does not pin its memory for the endpoint's lifetime.
            if page.capacity() > RETAINED_PAGE_BYTES {
                page = Vec::new();
            }
            (metrics, scraped_at)
        };
        match metrics {
            Ok(metrics) => {
                health.succeeded(&target);
                if results.send((target.id, metrics)).await.is_err() {
                    return; // the collector is shutting down
                }
            }
            Err(error) => {
                if !matches!(error, ScrapeError::Extract(_)) {
                    // Only a fully read response leaves the connection reusable; after an error
                    // status (body unread), a transport failure or a timeout, start afresh.
                    connection = None;
                }
                health.failed(&target, &error, scraped_at, config);
            }
        }
    }
}

/// Where in the interval the `index`-th scraper started scrapes: one of [`PHASE_SLOTS`] slots,
/// chosen by a Weyl sequence of the golden ratio (index × 2⁶⁴/φ, wrapping), whose first n
/// points split the interval into gaps of at most three lengths, the largest under 2.7/n of
/// it, for every n. Endpoints that come and go keep the spread without re-planning the
/// others. Slots rather than a continuous phase: scrapers of one slot wake the runtime
/// together, and with 100 endpoints at 50 ms that halves the idle CPU compared with one
/// wake-up per scrape, while the load still comes in ten small bursts per interval, not one.
fn phase_offset(index: u64, interval: Duration) -> Duration {
    const GOLDEN_FRACTION: u64 = 0x9E37_79B9_7F4A_7C15; // 2⁶⁴/φ
    let fraction = index.wrapping_mul(GOLDEN_FRACTION);
    let slot = ((fraction >> 32) * PHASE_SLOTS) >> 32;
    // Below PHASE_SLOTS, so the conversions cannot fail.
    (interval / PHASE_SLOTS as u32) * slot as u32
}

/// Phases a scrape interval is cut into (every 5 ms at the default 50 ms interval).
const PHASE_SLOTS: u64 = 10;

/// The first time at or after `now` that is `phase` past a whole number of intervals since
/// `epoch`.
fn next_phase_tick(epoch: Instant, now: Instant, phase: Duration, interval: Duration) -> Instant {
    let first = epoch + phase;
    if now <= first || interval.is_zero() {
        return first;
    }
    let periods = (now - first).as_nanos().div_ceil(interval.as_nanos());
    let periods = u32::try_from(periods).unwrap_or(u32::MAX);
    first + interval.saturating_mul(periods)
}

/// Pages larger than this are parsed on the blocking pool rather than a runtime worker.
const BLOCKING_PARSE_BYTES: usize = 256 * 1024;

/// Page buffers up to this capacity are kept between scrapes (a vLLM page is about 80 KiB).
const RETAINED_PAGE_BYTES: usize = 1024 * 1024;

/// The endpoint's metrics from a fetched page.
fn extract(
    engine: &Engine,
    page: &[u8],
    scraped_at: Instant,
) -> Result<EndpointMetrics, ScrapeError> {
    Ok(engine.mapping().extract(page, scraped_at.into_std())?)
}

/// Fetches the metrics page into `page` (cleared first), reusing the endpoint's connection
/// when it is still open.
async fn fetch(
    target: &Target,
    context: &ScrapeContext,
    connection: &mut Option<Connection>,
    page: &mut Vec<u8>,
) -> Result<(), ScrapeError> {
    page.clear();
    if connection.as_ref().is_some_and(|open| open.sender.is_closed()) {
        *connection = None;
    }
    let reused = connection.is_some();
    let open = match connection {
        Some(open) => open,
        None => connection.insert(connect(target.address, context.config.tls.as_ref()).await?),
    };
    if let Err(error) = open.sender.ready().await {
        if !reused {
            return Err(error.into());
        }
        // The server closed the kept-alive connection since the last scrape: one fresh try.
        *open = connect(target.address, context.config.tls.as_ref()).await?;
        open.sender.ready().await?;
    }
    let request = Request::get(context.path.clone())
        .header(HOST, target.address.to_string())
        .header(ACCEPT, "text/plain;version=0.0.4;q=1,application/openmetrics-text;q=0.5,*/*;q=0.1")
        .body(Empty::<Bytes>::new())?;
    let response = open.sender.send_request(request).await?;
    if !response.status().is_success() {
        return Err(ScrapeError::Status(response.status()));
    }
    let limit = context.config.max_body_bytes;
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue }; // trailers carry no page
        if page.len() + data.len() > limit {
            return Err(ScrapeError::TooLarge { limit });
        }
        page.extend_from_slice(&data);
    }
    Ok(())
}

async fn connect(address: SocketAddr, tls: Option<&ScrapeTls>) -> Result<Connection, ScrapeError> {
    let stream = TcpStream::connect(address).await.map_err(ScrapeError::Connect)?;
    // Small request, latency-sensitive: do not wait to coalesce packets. Failure is harmless.
    let _ = stream.set_nodelay(true);
    // The sender's type does not depend on the transport, so both arms yield one connection
    // type; only the driver task differs.
    let (sender, driver) = match tls {
        None => {
            let (sender, driver) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            (sender, tokio::spawn(drive(driver)))
        }
        Some(tls) => {
            let stream = tls.connect(address, stream).await.map_err(ScrapeError::Tls)?;
            let (sender, driver) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            (sender, tokio::spawn(drive(driver)))
        }
    };
    Ok(Connection { sender, driver })
}

/// Runs a connection until it ends. It ends with an error when the server goes away; the next
/// fetch notices through the closed sender and reconnects.
async fn drive<F: std::future::Future>(driver: F) {
    let _ = driver.await;
}

/// Failure bookkeeping of one endpoint, for rate-limited logs.
#[derive(Default)]
struct Health {
    failing_since: Option<Instant>,
    failures: u64,
    last_warning: Option<Instant>,
    last_kind: &'static str,
    reported_stale: bool,
}

impl Health {
    fn failed(
        &mut self,
        target: &Target,
        error: &ScrapeError,
        now: Instant,
        config: &CollectorConfig,
    ) {
        self.failures += 1;
        let since = *self.failing_since.get_or_insert(now);
        let kind_changed = self.last_kind != error.kind();
        let failing_for = now.saturating_duration_since(since);
        let newly_stale = !self.reported_stale && failing_for > config.staleness_threshold;
        let log_due = self
            .last_warning
            .is_none_or(|last| now.saturating_duration_since(last) >= config.failure_log_interval);
        if !(kind_changed || newly_stale || log_due) {
            return;
        }
        self.reported_stale |= newly_stale;
        self.last_kind = error.kind();
        self.last_warning = Some(now);
        tracing::warn!(
            endpoint = %target.name,
            address = %target.address,
            engine = %target.engine,
            failures = self.failures,
            failing_for_ms = failing_for.as_millis() as u64,
            stale = self.reported_stale,
            %error,
            "metrics scrape failed; keeping the last good metrics"
        );
    }

    fn succeeded(&mut self, target: &Target) {
        if self.failing_since.is_some() {
            tracing::info!(
                endpoint = %target.name,
                address = %target.address,
                failures = self.failures,
                "metrics scrape recovered"
            );
            *self = Self::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrape_offsets_cover_the_interval() {
        let interval = Duration::from_millis(50);
        for count in [1u64, 2, 3, 10, 100, 1000, 4096] {
            let mut phases: Vec<Duration> =
                (0..count).map(|index| phase_offset(index, interval)).collect();
            assert!(phases.iter().all(|phase| *phase < interval));
            phases.sort_unstable();
            let wrap = interval - phases[phases.len() - 1] + phases[0];
            let largest_gap = phases.windows(2).map(|pair| pair[1] - pair[0]).max().unwrap_or(wrap);
            let largest_gap = largest_gap.max(wrap);
            let slot = interval / PHASE_SLOTS as u32;
            assert!(phases.iter().all(|phase| phase.as_nanos() % slot.as_nanos() == 0));
            // An even spread would leave gaps of interval/count; the sequence stays within
            // 2.7x of that, plus one slot for rounding down to a slot.
            let bound = 2.7 * interval.as_secs_f64() / count as f64 + slot.as_secs_f64();
            assert!(
                largest_gap.as_secs_f64() <= bound,
                "{count} scrapers leave a gap of {largest_gap:?}"
            );
            if count >= 3 * PHASE_SLOTS {
                assert_eq!(largest_gap, slot, "every slot is used");
            }
        }
    }

    #[test]
    fn the_next_tick_keeps_the_phase() {
        let epoch = Instant::now();
        let interval = Duration::from_millis(50);
        let phase = Duration::from_millis(20);
        assert_eq!(next_phase_tick(epoch, epoch, phase, interval), epoch + phase);
        let later = epoch + Duration::from_millis(1_234);
        let tick = next_phase_tick(epoch, later, phase, interval);
        assert!(tick >= later && tick < later + interval);
        assert_eq!((tick - epoch - phase).as_millis() % 50, 0);
        assert_eq!(next_phase_tick(epoch, epoch + phase, phase, interval), epoch + phase);
    }

    #[test]
    fn the_timeout_stays_below_the_staleness_threshold() {
        let config = CollectorConfig {
            scrape_timeout: Duration::from_secs(5),
            staleness_threshold: Duration::from_secs(2),
            interval: Duration::ZERO,
            max_concurrent_scrapes: 0,
            metrics_path: "stats".into(),
            ..CollectorConfig::default()
        }
        .effective();
        assert_eq!(config.scrape_timeout, Duration::from_secs(1));
        assert_eq!(config.interval, Duration::from_millis(1));
        assert_eq!(config.max_concurrent_scrapes, 1);
        assert_eq!(config.metrics_path, "/stats");
        let defaults = CollectorConfig::default().effective();
        assert_eq!(defaults.scrape_timeout, Duration::from_secs(1));
    }

    #[test]
    fn starting_outside_a_runtime_is_an_error() {
        let result = MetricsCollector::start(Arc::default(), CollectorConfig::default());
        assert!(matches!(result, Err(CollectorError::NoRuntime)));
    }
}
