//! The soak run: a real `epp` process under mixed, partly hostile traffic for a while, then a
//! check that it returns to idle.
//!
//! Traffic (several concurrent clients, seeded): complete requests (some answered 5xx upstream),
//! streams torn mid-body, streams reset after the decision, streams held open and dropped,
//! oversized and malformed bodies, bodiless requests, across three objectives (sheddable,
//! default, critical) with the flowControl gate on and a per-endpoint concurrency limit low
//! enough that requests queue and some expire. Meanwhile the pool churns (the endpoints file is
//! rewritten every few seconds) and a few listed endpoints serve garbage metrics: a page that
//! is not UTF-8, malformed text, a 500, a connection closed at once, a server that never answers.
//!
//! Afterwards, with every client gone: the flow-control queues are empty, no request is counted
//! as running, the process holds no more file descriptors than it did idle, and its resident
//! memory is within 10% of what it was after warm-up. Any unexpected answer (a malformed body
//! routed, an oversized one not refused with 413, ...) fails the run too.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use demo::ext_proc_client::{Decision, ProxyRequest, ProxyStream};
use demo::{ModelServerConfig, RunningModelServer, http_client};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::load::Clients;
use crate::process::{self, ScratchDir, ServerProcess};

/// Model-server stand-ins that serve good metrics.
const GOOD_ENDPOINTS: usize = 12;
/// Concurrent traffic tasks.
const CLIENT_TASKS: usize = 16;
/// gRPC connections the tasks share.
const CONNECTIONS: usize = 3;
/// Largest body epp accepts in this run; oversized requests send half as much again.
const MAX_BODY_BYTES: usize = 256 * 1024;
/// Distinct prompts: bounded, so the prefix index reaches its working size during warm-up
/// and memory growth after it means a leak, not a cache filling up.
const DISTINCT_PROMPTS: usize = 96;
/// How often the pool changes.
const CHURN_PERIOD: Duration = Duration::from_secs(3);
/// Longest wait for a decision before the client gives up on the stream.
const DECISION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server may take to settle once traffic stops.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(15);
/// Allowed memory growth from the end of warm-up to the end of the run.
const MEMORY_GROWTH_LIMIT: f64 = 0.10;

const CONFIG: &str = "\
featureGates: [flowControl]
plugins:
- {type: concurrency-detector, name: limit, parameters: {maxConcurrency: 1}}
- {type: queue-scorer}
- {type: kv-cache-utilization-scorer}
- {type: prefix-cache-scorer}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
flowControl:
  saturationDetector: {pluginRef: limit}
  defaultRequestTTL: 2s
  maxRequests: 64
";

const OBJECTIVES: &str = "- {name: batch, priority: -1}\n- {name: critical, priority: 10}\n";

/// What a soak run reports.
#[derive(Debug, Default)]
struct Tally {
    routed: AtomicU64,
    refused_by_flow_control: AtomicU64,
    torn: AtomicU64,
    reset_after_decision: AtomicU64,
    held_and_dropped: AtomicU64,
    too_large: AtomicU64,
    malformed: AtomicU64,
    bodiless: AtomicU64,
    gave_up: AtomicU64,
    /// The most requests seen queued at once on `/metrics`.
    most_queued: AtomicU64,
    /// Answers that should not have happened, with what was sent.
    unexpected: Mutex<Vec<String>>,
}

impl Tally {
    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn unexpected(&self, what: String) {
        let mut unexpected = self.unexpected.lock();
        if unexpected.len() < 20 {
            unexpected.push(what);
        }
    }
}

/// The process's resident memory in bytes and open descriptors.
#[derive(Clone, Copy, Debug)]
struct Footprint {
    resident_bytes: u64,
    descriptors: usize,
}

fn footprint(pid: u32) -> Result<Footprint, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|error| format!("cannot read /proc/{pid}/status: {error}"))?;
    let resident_kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .ok_or("no VmRSS in /proc status")?;
    let descriptors = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|error| format!("cannot list /proc/{pid}/fd: {error}"))?
        .count();
    Ok(Footprint { resident_bytes: resident_kib * 1024, descriptors })
}

/// Runs the soak for `seconds` against the `epp` at `epp_path`.
pub(crate) async fn soak(epp_path: &Path, seconds: u64) -> Result<(), String> {
    let total = Duration::from_secs(seconds.max(6));
    let warm_up = total / 4;

    let mut good = Vec::with_capacity(GOOD_ENDPOINTS);
    for _ in 0..GOOD_ENDPOINTS {
        good.push(
            RunningModelServer::start(ModelServerConfig::default())
                .await
                .map_err(|error| format!("cannot start a model-server stand-in: {error}"))?,
        );
    }
    let good: Vec<SocketAddr> = {
        let addresses = good.iter().map(|server| server.address).collect();
        std::mem::forget(good); // served until the process exits
        addresses
    };
    let garbage = GarbageMetrics::start_all().await?;

    let scratch = ScratchDir::create()?;
    let every: Vec<SocketAddr> = good.iter().chain(garbage.iter()).copied().collect();
    let endpoints_file = process::write_endpoints_file(&scratch.0, &every)?;
    let config_file = write(&scratch, "config.yaml", CONFIG)?;
    let objectives_file = write(&scratch, "objectives.yaml", OBJECTIVES)?;
    let args = vec![
        "--config-file".to_owned(),
        config_file.display().to_string(),
        "--objectives-file".to_owned(),
        objectives_file.display().to_string(),
        "--max-request-body-bytes".to_owned(),
        MAX_BODY_BYTES.to_string(),
    ];
    // Its log (scrape failures of the broken endpoints, mostly) goes to a file, shown on failure.
    let log_path = scratch.0.join("epp.log");
    let log = std::fs::File::create(&log_path)
        .map_err(|error| format!("cannot create {}: {error}", log_path.display()))?;
    let epp = process::start_epp(epp_path, &endpoints_file, good.len(), &args, log.into()).await?;
    let metrics_address = epp.metrics_address.ok_or("epp reports no metrics address")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = footprint(epp.pid())?;
    println!(
        "soak: epp pid {} over {} good and {} garbage-metrics endpoints; idle: {} descriptors, {:.1} MiB resident",
        epp.pid(),
        good.len(),
        garbage.len(),
        idle.descriptors,
        mib(idle.resident_bytes)
    );

    let clients = Clients::connect(epp.grpc_address, CONNECTIONS).await?;
    let tally = Arc::new(Tally::default());
    let prompts = Arc::new(prompts());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for seed in 0..CLIENT_TASKS as u64 {
        tasks.push(tokio::spawn(client_task(
            clients.clone(),
            Arc::clone(&prompts),
            Arc::clone(&tally),
            Arc::clone(&stop),
            seed,
        )));
    }
    let churn = tokio::spawn(churn_pool(
        scratch.0.clone(),
        good.clone(),
        garbage.clone(),
        Arc::clone(&stop),
    ));

    let sampler =
        tokio::spawn(sample_queue(metrics_address, Arc::clone(&tally), Arc::clone(&stop)));

    tokio::time::sleep(warm_up).await;
    let warm = footprint(epp.pid())?;
    tokio::time::sleep(total - warm_up).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    let _ = churn.await;
    let _ = sampler.await;
    drop(clients);
    // The full pool again, as at the start.
    process::write_endpoints_file(&scratch.0, &every)?;

    let settled = settle(&epp, metrics_address, idle).await;
    let end = footprint(epp.pid())?;
    report(&tally, idle, warm, end);

    let mut failures = Vec::new();
    if let Err(reason) = settled {
        failures.push(reason);
    }
    let growth = end.resident_bytes as f64 / warm.resident_bytes as f64 - 1.0;
    if growth > MEMORY_GROWTH_LIMIT {
        failures.push(format!(
            "resident memory grew {:.1}% after warm-up ({:.1} -> {:.1} MiB)",
            growth * 100.0,
            mib(warm.resident_bytes),
            mib(end.resident_bytes)
        ));
    }
    let unexpected = tally.unexpected.lock().clone();
    if !unexpected.is_empty() {
        failures.push(format!("unexpected answers:\n  {}", unexpected.join("\n  ")));
    }
    for (name, counter) in [
        ("routed", &tally.routed),
        ("queued", &tally.most_queued),
        ("refused with 413", &tally.too_large),
        ("refused with 400", &tally.malformed),
    ] {
        if counter.load(Ordering::Relaxed) == 0 {
            failures.push(format!("no request was {name}: the traffic did not exercise it"));
        }
    }
    if failures.is_empty() {
        println!("soak: passed");
        Ok(())
    } else {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Err(format!(
            "soak failed:\n- {}\nlast lines of the epp log:\n{}",
            failures.join("\n- "),
            tail.join("\n")
        ))
    }
}

fn write(directory: &ScratchDir, name: &str, text: &str) -> Result<PathBuf, String> {
    let path = directory.0.join(name);
    std::fs::write(&path, text)
        .map_err(|error| format!("cannot write {}: {error}", path.display()))?;
    Ok(path)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Waits until the queues are empty, nothing runs and descriptors are back to idle.
async fn settle(epp: &ServerProcess, metrics: SocketAddr, idle: Footprint) -> Result<(), String> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let page = http_client::get_text(metrics, "/metrics").await.unwrap_or_default();
        let queued = sum_of(&page, "inference_extension_flow_control_queue_size");
        let running = sum_of(&page, "inference_objective_running_requests");
        let descriptors = footprint(epp.pid())?.descriptors;
        if queued == Some(0.0) && running == Some(0.0) && descriptors <= idle.descriptors {
            println!(
                "settled: queued {queued:?}, running {running:?}, descriptors {descriptors} (idle {})",
                idle.descriptors
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "did not return to idle within {SETTLE_TIMEOUT:?}: queued {queued:?}, running \
                 {running:?}, descriptors {descriptors} (idle {})",
                idle.descriptors
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Records the longest flow-control queue seen on `/metrics` while traffic runs.
async fn sample_queue(metrics: SocketAddr, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let page = http_client::get_text(metrics, "/metrics").await.unwrap_or_default();
        if let Some(queued) = sum_of(&page, "inference_extension_flow_control_queue_size") {
            tally.most_queued.fetch_max(queued as u64, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sum of a metric's samples on a `/metrics` page; `None` if it has none.
fn sum_of(page: &str, metric: &str) -> Option<f64> {
    let values: Vec<f64> = page
        .lines()
        .filter(|line| {
            line.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

fn report(tally: &Tally, idle: Footprint, warm: Footprint, end: Footprint) {
    let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    println!(
        "traffic: {} routed (at most {} queued at once), {} refused by flow control, {} torn mid-body, {} reset after the \
         decision, {} held and dropped, {} oversized (413), {} malformed (400), {} bodiless, {} \
         given up",
        get(&tally.routed),
        get(&tally.most_queued),
        get(&tally.refused_by_flow_control),
        get(&tally.torn),
        get(&tally.reset_after_decision),
        get(&tally.held_and_dropped),
        get(&tally.too_large),
        get(&tally.malformed),
        get(&tally.bodiless),
        get(&tally.gave_up),
    );
    println!(
        "footprint: descriptors idle {} / after warm-up {} / end {}; resident idle {:.1} / after \
         warm-up {:.1} / end {:.1} MiB",
        idle.descriptors,
        warm.descriptors,
        end.descriptors,
        mib(idle.resident_bytes),
        mib(warm.resident_bytes),
        mib(end.resident_bytes)
    );
}

fn prompts() -> Vec<Vec<u8>> {
    (0..DISTINCT_PROMPTS)
        .map(|i| {
            let system = format!("Tenant {} system prompt with its rules. ", i % 8).repeat(20);
            let question = format!("Question {i} asks about something specific. ").repeat(10);
            serde_json::json!({
                "model": "llama-3-8b",
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ],
            })
            .to_string()
            .into_bytes()
        })
        .collect()
}

/// One client: picks an action at random until told to stop.
async fn client_task(
    clients: Clients,
    prompts: Arc<Vec<Vec<u8>>>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let oversized = vec![b'x'; MAX_BODY_BYTES + MAX_BODY_BYTES / 2];
    while !stop.load(Ordering::Relaxed) {
        let objective = ["", "batch", "critical"][rng.random_range(0..3)];
        let mut headers =
            vec![(":path", "/v1/chat/completions"), ("content-type", "application/json")];
        if !objective.is_empty() {
            headers.push(("x-gateway-inference-objective", objective));
        }
        let prompt = &prompts[rng.random_range(0..prompts.len())];
        let Ok(mut stream) = ProxyStream::open(&mut clients.next_client()).await else {
            Tally::count(&tally.gave_up);
            continue;
        };
        match rng.random_range(0..100) {
            // A whole request: decision, a while upstream, the response (some 5xx).
            0..50 => {
                let request =
                    ProxyRequest { headers, body: prompt, chunk_bytes: 1024, subset: None };
                match decide(&mut stream, &request).await {
                    Some(Decision::Routed { .. }) => {
                        Tally::count(&tally.routed);
                        tokio::time::sleep(Duration::from_millis(rng.random_range(0..120))).await;
                        let status = if rng.random_range(0..10) == 0 { 503 } else { 200 };
                        let _ =
                            stream.respond_with_status(status, None, &[b"{\"usage\":{}}"]).await;
                    }
                    Some(Decision::Immediate { status: 429 | 503, .. }) => {
                        Tally::count(&tally.refused_by_flow_control)
                    }
                    Some(other) => tally.unexpected(format!("a valid request got {other:?}")),
                    None => Tally::count(&tally.gave_up),
                }
            }
            // Torn mid-body: half the body, then the stream goes away.
            50..60 => {
                let _ = stream.send_headers(&headers, false, None).await;
                let _ = stream.send_body(true, prompt[..prompt.len() / 2].to_vec(), false).await;
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..20))).await;
                Tally::count(&tally.torn);
            }
            // Reset once routed: no response ever comes.
            60..70 => {
                let request = ProxyRequest { headers, body: prompt, chunk_bytes: 0, subset: None };
                if decide(&mut stream, &request).await.is_some() {
                    Tally::count(&tally.reset_after_decision);
                }
            }
            // Headers only, held open a while, then dropped.
            70..78 => {
                let _ = stream.send_headers(&headers, false, None).await;
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
                Tally::count(&tally.held_and_dropped);
            }
            // Too large: refused with 413 before any parsing.
            78..84 => {
                let request = ProxyRequest {
                    headers,
                    body: &oversized,
                    chunk_bytes: 64 * 1024,
                    subset: None,
                };
                match decide(&mut stream, &request).await {
                    Some(Decision::Immediate { status: 413, .. }) => Tally::count(&tally.too_large),
                    Some(other) => tally.unexpected(format!("an oversized body got {other:?}")),
                    None => Tally::count(&tally.gave_up),
                }
            }
            // Malformed JSON, or JSON that is not a request.
            84..94 => {
                let bodies: [&[u8]; 4] =
                    [b"{\"model\": \"llama", b"[1,2,3]", b"{\"messages\": 7}", &prompt[1..]];
                let body = bodies[rng.random_range(0..bodies.len())];
                let request = ProxyRequest { headers, body, chunk_bytes: 0, subset: None };
                match decide(&mut stream, &request).await {
                    Some(Decision::Immediate { status: 400, .. }) => Tally::count(&tally.malformed),
                    Some(other) => tally.unexpected(format!(
                        "malformed body {:?} got {other:?}",
                        String::from_utf8_lossy(&body[..body.len().min(40)])
                    )),
                    None => Tally::count(&tally.gave_up),
                }
            }
            // No body at all (`GET /v1/models`, a probe): routed to some endpoint without
            // being scheduled.
            _ => {
                let _ = stream.send_headers(&headers, true, None).await;
                match tokio::time::timeout(DECISION_TIMEOUT, stream.headers_only_decision()).await {
                    Ok(Ok(Decision::Routed { destination, .. })) if !destination.is_empty() => {
                        Tally::count(&tally.bodiless)
                    }
                    Ok(Ok(other)) => tally.unexpected(format!("a bodiless request got {other:?}")),
                    _ => Tally::count(&tally.gave_up),
                }
            }
        }
    }
}

/// Sends the request and waits for the decision; `None` when the stream failed or timed out.
async fn decide(stream: &mut ProxyStream, request: &ProxyRequest<'_>) -> Option<Decision> {
    stream.send_request(request).await.ok()?;
    tokio::time::timeout(DECISION_TIMEOUT, stream.decision()).await.ok()?.ok()
}

/// Rewrites the endpoints file every [`CHURN_PERIOD`] with the garbage endpoints and a random
/// half or more of the good ones.
async fn churn_pool(
    directory: PathBuf,
    good: Vec<SocketAddr>,
    garbage: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = SmallRng::seed_from_u64(7);
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(CHURN_PERIOD).await;
        let keep = rng.random_range(good.len() / 2..=good.len());
        let mut listed: Vec<SocketAddr> = good.clone();
        while listed.len() > keep {
            listed.swap_remove(rng.random_range(0..listed.len()));
        }
        listed.extend(&garbage);
        let _ = process::write_endpoints_file(&directory, &listed);
    }
}

/// Endpoints whose metrics are broken in every way a scraper meets.
struct GarbageMetrics;

#[derive(Clone, Copy)]
enum Garbage {
    NotUtf8,
    Malformed,
    ServerError,
    ClosedAtOnce,
    NeverAnswers,
}

impl GarbageMetrics {
    async fn start_all() -> Result<Vec<SocketAddr>, String> {
        let mut addresses = Vec::new();
        for kind in [
            Garbage::NotUtf8,
            Garbage::Malformed,
            Garbage::ServerError,
            Garbage::ClosedAtOnce,
            Garbage::NeverAnswers,
        ] {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|error| format!("cannot bind a garbage-metrics server: {error}"))?;
            addresses
                .push(listener.local_addr().map_err(|error| format!("no local address: {error}"))?);
            tokio::spawn(serve_garbage(listener, kind));
        }
        Ok(addresses)
    }
}

async fn serve_garbage(listener: TcpListener, kind: Garbage) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            if matches!(kind, Garbage::ClosedAtOnce) {
                return;
            }
            let mut request = [0u8; 4096];
            loop {
                let Ok(read) = stream.read(&mut request).await else { return };
                if read == 0 {
                    return;
                }
                let (status, body): (&str, Vec<u8>) = match kind {
                    Garbage::NotUtf8 => {
                        ("200 OK", b"vllm:num_requests_waiting \xff\xfe 1\n".to_vec())
                    }
                    Garbage::Malformed => {
                        ("200 OK", b"vllm:num_requests_waiting{model_name=\"x 3\n{{{\n".to_vec())
                    }
                    Garbage::ServerError => ("500 Internal Server Error", b"oops".to_vec()),
                    Garbage::NeverAnswers => {
                        std::future::pending::<()>().await;
                        return;
                    }
                    Garbage::ClosedAtOnce => return,
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                if stream.write_all(head.as_bytes()).await.is_err()
                    || stream.write_all(&body).await.is_err()
                {
                    return;
                }
            }
        });
    }
}
