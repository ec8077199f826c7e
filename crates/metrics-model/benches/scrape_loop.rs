//! The scrape loop at scale: CPU per scrape round of a [`MetricsCollector`] over 1,000
//! endpoints on loopback.
//!
//! Every endpoint is a tiny in-process HTTP/1 server on 127.0.0.1 (one listener task each,
//! keep-alive) serving the realistic vLLM page of `tests/data/vllm.prom`. Two phases run against
//! the same servers, one after the other:
//!
//! 1. **Bare GETs** (the baseline): one task per endpoint that does what the collector's scrape
//!    tasks do on the wire and nothing else: a 50 ms ticker, the same bound on scrapes in
//!    flight, one keep-alive connection with its own driver task, `GET /metrics`, read the whole
//!    body, throw it away. No parsing, no mapping, no snapshot updates.
//! 2. **Collector**: a [`MetricsCollector`] with a 50 ms interval over every endpoint.
//!
//! Each phase waits until every endpoint has been served (phase 2: until every endpoint has
//! fresh metrics in the pool), warms up for a second, then measures for a few seconds: scrapes
//! completed (requests the servers answered), rounds (scrapes / endpoints), process CPU time
//! (user + system from `/proc/self/stat`) per round and per scrape, and, in phase 2, freshness:
//! the age of the oldest `updated_at` in the pool, sampled every 50 ms.
//!
//! The servers run in this process, so their CPU is in both phases; the baseline also carries
//! the client-side HTTP cost. The collector's own cost (parsing, mapping, publishing, its task
//! structure) is the difference between the two rows.
//!
//! Run with `cargo bench -p epp-metrics-model --bench scrape_loop`. Environment knobs:
//! `SCRAPE_LOOP_ENDPOINTS` (default 1000) and `SCRAPE_LOOP_SECONDS` (measured seconds per
//! phase, default 5).

use std::convert::Infallible;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::header::{ACCEPT, HOST};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use metrics_model::{CollectorConfig, Engine, MetricsCollector};
use scheduler_core::{Endpoint, SharedPool};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

const VLLM_PAGE: &str = include_str!("../tests/data/vllm.prom");
const DEFAULT_ENDPOINTS: usize = 1000;
const DEFAULT_SECONDS: u64 = 5;
const INTERVAL: Duration = Duration::from_millis(50);
const WARM_UP: Duration = Duration::from_secs(1);
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// Descriptors per endpoint: the listener and both ends of the keep-alive connection.
const DESCRIPTORS_PER_ENDPOINT: u64 = 3;
/// Descriptors kept for everything else (stdio, the runtime, cargo's pipes).
const DESCRIPTOR_RESERVE: u64 = 256;

fn main() {
    let requested = env_number("SCRAPE_LOOP_ENDPOINTS", DEFAULT_ENDPOINTS as u64) as usize;
    let seconds = env_number("SCRAPE_LOOP_SECONDS", DEFAULT_SECONDS).max(1);
    let endpoints = endpoints_within_descriptor_limit(requested.max(1));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("build the tokio runtime");
    let workers = runtime.metrics().num_workers();
    let report = runtime.block_on(run(endpoints, Duration::from_secs(seconds)));
    report.print(endpoints, workers);
}

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value.parse().unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
        Err(_) => default,
    }
}

/// Raises the soft descriptor limit as far as needed (and allowed), and falls back to fewer
/// endpoints when the hard limit is too low.
fn endpoints_within_descriptor_limit(requested: usize) -> usize {
    let needed = requested as u64 * DESCRIPTORS_PER_ENDPOINT + DESCRIPTOR_RESERVE;
    let limit = match rlimit::increase_nofile_limit(needed) {
        Ok(limit) => limit,
        Err(error) => {
            eprintln!("could not raise RLIMIT_NOFILE ({error}); keeping the current limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft).unwrap_or(1024)
        }
    };
    if limit >= needed {
        return requested;
    }
    let fitting = (limit.saturating_sub(DESCRIPTOR_RESERVE) / DESCRIPTORS_PER_ENDPOINT).max(1);
    eprintln!(
        "RLIMIT_NOFILE is {limit}, {needed} needed for {requested} endpoints: \
         running {fitting} endpoints instead"
    );
    fitting as usize
}

// ---------------------------------------------------------------------------------------------
// The servers

struct Servers {
    addresses: Vec<SocketAddr>,
    served: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Servers {
    async fn start(count: usize) -> Self {
        let served = Arc::new(AtomicU64::new(0));
        let page = Bytes::from_static(VLLM_PAGE.as_bytes());
        let mut addresses = Vec::with_capacity(count);
        let mut tasks = Vec::with_capacity(count);
        for _ in 0..count {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind an ephemeral port");
            addresses.push(listener.local_addr().expect("local address"));
            tasks.push(tokio::spawn(serve(listener, page.clone(), Arc::clone(&served))));
        }
        Self { addresses, served, tasks }
    }

    fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One endpoint: accepts connections and answers every request with the page, keeping the
/// connection alive.
async fn serve(listener: TcpListener, page: Bytes, served: Arc<AtomicU64>) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        let page = page.clone();
        let served = Arc::clone(&served);
        let service = service_fn(move |_request| {
            served.fetch_add(1, Ordering::Relaxed);
            let page = page.clone();
            async move { Ok::<_, Infallible>(Response::new(Full::new(page))) }
        });
        tokio::spawn(async move {
            // A connection ends when the client closes it; nothing to report.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

// ---------------------------------------------------------------------------------------------
// The baseline: the collector's wire traffic without parsing or publishing

async fn bare_get_loop(address: SocketAddr, permits: Arc<Semaphore>) {
    let stream = TcpStream::connect(address).await.expect("connect");
    let _ = stream.set_nodelay(true);
    let (mut sender, driver) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    // Dropped, and so aborted, when this task is.
    let _driver = DriverGuard(tokio::spawn(async move {
        let _ = driver.await;
    }));
    let host = address.to_string();
    let mut ticker = tokio::time::interval(INTERVAL);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let _permit = permits.acquire().await.expect("the semaphore stays open");
        sender.ready().await.expect("connection ready");
        let request = Request::get("/metrics")
            .header(HOST, host.as_str())
            .header(ACCEPT, "text/plain;version=0.0.4")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        let body = response.into_body().collect().await.expect("body").to_bytes();
        black_box(body.len());
    }
}

/// Aborts a connection driver together with the loop that owns it.
struct DriverGuard(JoinHandle<()>);

impl Drop for DriverGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Measuring

/// Process CPU time (user + system, every thread) from `/proc/self/stat`.
struct CpuClock {
    ticks_per_second: u64,
}

impl CpuClock {
    fn new() -> Self {
        let ticks_per_second = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .filter(|&ticks| ticks > 0)
            .unwrap_or(100);
        Self { ticks_per_second }
    }

    fn now(&self) -> Duration {
        let stat = std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
        // The command name (field 2) may hold spaces; fields are counted after its ')'.
        let after_name = &stat[stat.rfind(')').expect("stat has a command name") + 1..];
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // Field 3 (state) is fields[0]; utime is field 14, stime field 15.
        let ticks: u64 =
            fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        Duration::from_nanos(ticks * 1_000_000_000 / self.ticks_per_second)
    }
}

/// What one measured window saw.
struct Window {
    wall: Duration,
    cpu: Duration,
    scrapes: u64,
    /// Snapshots the collector published (collector phase only).
    publishes: u64,
    /// Age of the oldest metrics in the pool, sampled every interval (collector phase only).
    oldest_ages: Vec<Duration>,
}

impl Window {
    fn rounds(&self, endpoints: usize) -> f64 {
        self.scrapes as f64 / endpoints as f64
    }

    fn rounds_per_second(&self, endpoints: usize) -> f64 {
        self.rounds(endpoints) / self.wall.as_secs_f64()
    }

    fn cpu_micros_per_round(&self, endpoints: usize) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.rounds(endpoints)
    }

    fn cpu_micros_per_scrape(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.scrapes as f64
    }

    fn cores_busy(&self) -> f64 {
        self.cpu.as_secs_f64() / self.wall.as_secs_f64()
    }

    fn age_percentile(&self, percentile: f64) -> Option<Duration> {
        if self.oldest_ages.is_empty() {
            return None;
        }
        let mut ages = self.oldest_ages.clone();
        ages.sort_unstable();
        let rank = ((percentile / 100.0) * ages.len() as f64).ceil() as usize;
        Some(ages[rank.clamp(1, ages.len()) - 1])
    }
}

async fn measure(
    clock: &CpuClock,
    servers: &Servers,
    pool: Option<&SharedPool>,
    length: Duration,
) -> Window {
    let mut oldest_ages = Vec::new();
    let mut ticker = tokio::time::interval(INTERVAL);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker.tick().await;
    let generation = || pool.map_or(0, |pool| pool.load().generation());
    let (start, cpu_start, served_start, generation_start) =
        (Instant::now(), clock.now(), servers.served(), generation());
    loop {
        ticker.tick().await;
        if let Some(pool) = pool {
            oldest_ages.push(oldest_age(pool));
        }
        if start.elapsed() >= length {
            break;
        }
    }
    let (wall, cpu, served) = (start.elapsed(), clock.now(), servers.served());
    Window {
        wall,
        cpu: cpu - cpu_start,
        scrapes: served - served_start,
        publishes: generation().wrapping_sub(generation_start),
        oldest_ages,
    }
}

/// The age of the oldest metrics in the pool (never-scraped endpoints count as infinitely old).
fn oldest_age(pool: &SharedPool) -> Duration {
    let snapshot = pool.load();
    let now = Instant::now();
    snapshot
        .endpoints()
        .iter()
        .map(|state| match state.metrics.updated_at {
            Some(at) => now.saturating_duration_since(at),
            None => Duration::MAX,
        })
        .max()
        .unwrap_or_default()
}

/// The mean time of one copy of the pool's snapshot.
fn time_snapshot_copy(pool: &SharedPool) -> Duration {
    const COPIES: u32 = 200;
    let snapshot = pool.load();
    let start = Instant::now();
    for _ in 0..COPIES {
        black_box(scheduler_core::PoolSnapshot::clone(black_box(&snapshot)));
    }
    start.elapsed() / COPIES
}

/// Waits until `ready` holds, polling every 10 ms.
async fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + READY_DEADLINE;
    while !ready() {
        assert!(Instant::now() < deadline, "{what} did not happen within {READY_DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The run

struct Report {
    baseline: Window,
    collector: Window,
    /// Time to copy the full pool snapshot once, as every publish does.
    snapshot_copy: Duration,
}

async fn run(endpoints: usize, length: Duration) -> Report {
    let clock = CpuClock::new();
    let servers = Servers::start(endpoints).await;
    let max_in_flight = CollectorConfig::default().max_concurrent_scrapes;

    // Phase 1: bare GETs.
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let served_before = servers.served();
    let loops: Vec<JoinHandle<()>> = servers
        .addresses
        .iter()
        .map(|&address| tokio::spawn(bare_get_loop(address, Arc::clone(&permits))))
        .collect();
    wait_until("a first bare GET of every endpoint", || {
        servers.served() - served_before >= endpoints as u64
    })
    .await;
    tokio::time::sleep(WARM_UP).await;
    let baseline = measure(&clock, &servers, None, length).await;
    for task in &loops {
        task.abort();
    }
    for task in loops {
        let _ = task.await;
    }
    // Let the servers notice the closed connections before the next phase.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Phase 2: the collector.
    let pool = Arc::new(SharedPool::default());
    let config = CollectorConfig { interval: INTERVAL, ..CollectorConfig::default() };
    let collector = MetricsCollector::start(Arc::clone(&pool), config).expect("start");
    let started = Instant::now();
    for &address in &servers.addresses {
        collector.upsert_endpoint(Endpoint::new(address), Engine::Vllm);
    }
    wait_until("fresh metrics for every endpoint", || {
        let snapshot = pool.load();
        snapshot.len() == endpoints
            && snapshot
                .endpoints()
                .iter()
                .all(|state| state.metrics.updated_at.is_some_and(|at| at >= started))
    })
    .await;
    tokio::time::sleep(WARM_UP).await;
    let collector_window = measure(&clock, &servers, Some(&pool), length).await;
    // Every endpoint kept being scraped successfully through the window.
    let stalest = oldest_age(&pool);
    assert!(stalest < Duration::from_secs(2), "an endpoint's metrics went stale: {stalest:?}");
    collector.shutdown().await;
    let snapshot_copy = time_snapshot_copy(&pool);

    Report { baseline, collector: collector_window, snapshot_copy }
}

impl Report {
    fn print(&self, endpoints: usize, workers: usize) {
        let target = 1.0 / INTERVAL.as_secs_f64();
        println!(
            "scrape loop: {endpoints} endpoints on 127.0.0.1, {} ms interval (target {target:.0} \
             rounds/s), vLLM page of {} bytes, {workers} runtime workers, at most {} scrapes in \
             flight",
            INTERVAL.as_millis(),
            VLLM_PAGE.len(),
            CollectorConfig::default().max_concurrent_scrapes,
        );
        println!();
        println!(
            "{:<22} {:>9} {:>9} {:>10} {:>14} {:>13} {:>14} {:>14}",
            "phase",
            "scrapes",
            "rounds/s",
            "CPU cores",
            "CPU µs/round",
            "CPU µs/scrape",
            "freshness p50",
            "freshness p99"
        );
        for (name, window) in
            [("bare GETs (baseline)", &self.baseline), ("collector", &self.collector)]
        {
            println!(
                "{:<22} {:>9} {:>9.2} {:>10.2} {:>14.0} {:>13.1} {:>14} {:>14}",
                name,
                window.scrapes,
                window.rounds_per_second(endpoints),
                window.cores_busy(),
                window.cpu_micros_per_round(endpoints),
                window.cpu_micros_per_scrape(),
                milliseconds(window.age_percentile(50.0)),
                milliseconds(window.age_percentile(99.0)),
            );
        }
        let per_scrape =
            self.collector.cpu_micros_per_scrape() - self.baseline.cpu_micros_per_scrape();
        println!(
            "{:<22} {:>9} {:>9} {:>10} {:>14.0} {:>13.1} {:>14} {:>14}",
            "collector − baseline",
            "",
            "",
            "",
            per_scrape * endpoints as f64,
            per_scrape,
            "",
            ""
        );
        println!();
        let publishes_per_second =
            self.collector.publishes as f64 / self.collector.wall.as_secs_f64();
        println!(
            "collector: {publishes_per_second:.0} snapshot publishes/s, {:.1} scrapes per \
             publish; one copy of the {endpoints}-endpoint snapshot takes {:.1} µs",
            self.collector.scrapes as f64 / self.collector.publishes.max(1) as f64,
            self.snapshot_copy.as_secs_f64() * 1e6,
        );
        println!(
            "CPU is the whole process (servers included) from /proc/self/stat over {:.1} s; \
             freshness is the age of the oldest metrics in the pool, sampled every {} ms.",
            self.collector.wall.as_secs_f64(),
            INTERVAL.as_millis()
        );
    }
}

fn milliseconds(age: Option<Duration>) -> String {
    match age {
        Some(age) => format!("{:.1} ms", age.as_secs_f64() * 1e3),
        None => "-".to_owned(),
    }
}
