//! The load: ext-proc streams sent the way Envoy sends them (one stream per request, body chunks
//! sent without waiting for answers), open loop at a fixed rate or closed loop with a fixed
//! number of streams, timed to the routing decision.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use demo::ext_proc_client::{Decision, ProxyRequest, ProxyStream};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use parking_lot::Mutex;
use tonic::transport::Channel;

use crate::process::ServerProcess;

/// Largest gRPC message, both ways (a 220 KB body is sent in 16 KB chunks, but echoed answers
/// and future cases may be larger).
const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// Request body bytes per ext-proc message, as Envoy's default buffer sends them.
const BODY_CHUNK_BYTES: usize = 16 * 1024;

/// Where a unique request number is stamped into a body (the start of its prompt).
const STAMP: &[u8] = b"#000000000000";

/// Request bodies: chat requests whose first half is one of a few shared system prompts, or,
/// [`Prompts::unique`], each made unique by a request number at the start of its prompt (so no
/// prompt block repeats, as with mostly new prompts).
#[derive(Clone)]
pub(crate) struct Prompts {
    bodies: Arc<Vec<Vec<u8>>>,
    unique: bool,
}

impl Prompts {
    /// The same bodies, each request made unique.
    pub(crate) fn unique(&self) -> Self {
        Self { bodies: Arc::clone(&self.bodies), unique: true }
    }

    /// The body of request `i`.
    fn body(&self, i: usize) -> std::borrow::Cow<'_, [u8]> {
        let template = &self.bodies[i % self.bodies.len()];
        if !self.unique {
            return std::borrow::Cow::Borrowed(template);
        }
        let mut body = template.clone();
        if let Some(at) = body.windows(STAMP.len()).position(|window| window == STAMP) {
            let number = format!("#{:012}", i % 1_000_000_000_000);
            body[at..at + STAMP.len()].copy_from_slice(number.as_bytes());
        }
        std::borrow::Cow::Owned(body)
    }
}

/// `count` bodies of about `size` bytes (see [`Prompts`]).
pub(crate) fn bodies(size: usize, count: usize) -> Prompts {
    let bodies = (0..count)
        .map(|i| {
            let stamp = String::from_utf8_lossy(STAMP);
            let system =
                format!("{stamp} System prompt {} for this tenant. ", i % 16).repeat(size / 30 + 1);
            let question =
                format!("Question {i} from the user, with details. ").repeat(size / 40 + 1);
            let mut text = format!("{}{}", &system[..size / 2], question);
            text.truncate(size.saturating_sub(120));
            serde_json::json!({
                "model": "llama-3-8b",
                "messages": [{"role": "system", "content": text}],
                "stream": true,
            })
            .to_string()
            .into_bytes()
        })
        .collect();
    Prompts { bodies: Arc::new(bodies), unique: false }
}

/// A few gRPC connections to one server, used in turn.
#[derive(Clone)]
pub(crate) struct Clients(Arc<Vec<ExternalProcessorClient<Channel>>>, Arc<AtomicUsize>);

impl Clients {
    /// Opens `connections` connections to `address`.
    pub(crate) async fn connect(address: SocketAddr, connections: usize) -> Result<Self, String> {
        let mut clients = Vec::with_capacity(connections);
        for _ in 0..connections {
            let channel = Channel::from_shared(format!("http://{address}"))
                .map_err(|error| error.to_string())?
                .connect()
                .await
                .map_err(|error| format!("cannot connect to {address}: {error}"))?;
            clients.push(
                ExternalProcessorClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            );
        }
        Ok(Self(Arc::new(clients), Arc::new(AtomicUsize::new(0))))
    }

    /// The next connection in turn.
    pub(crate) fn next_client(&self) -> ExternalProcessorClient<Channel> {
        let index = self.1.fetch_add(1, Ordering::Relaxed) % self.0.len();
        self.0[index].clone()
    }
}

/// One request: the decision latency, or `None` when it failed or was answered immediately.
async fn one_request(clients: &Clients, body: &[u8]) -> Option<Duration> {
    let started = Instant::now();
    let mut client = clients.next_client();
    let mut stream = ProxyStream::open(&mut client).await.ok()?;
    let request = ProxyRequest {
        headers: vec![(":path", "/v1/chat/completions"), (":method", "POST")],
        body,
        chunk_bytes: BODY_CHUNK_BYTES,
        subset: None,
    };
    stream.send_request(&request).await.ok()?;
    match stream.decision().await.ok()? {
        Decision::Routed { .. } => Some(started.elapsed()),
        Decision::Immediate { .. } => None,
    }
}

/// What one server achieved in one case.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Figures {
    pub(crate) requests_per_second: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    /// The server process's CPU time per routed request (NaN without `/proc`).
    pub(crate) cpu_us_per_request: f64,
    pub(crate) failed: usize,
}

fn summarize(
    mut latencies: Vec<Duration>,
    failed: usize,
    elapsed: Duration,
    cpu_seconds: Option<f64>,
) -> Figures {
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    let count = latencies.len().max(1) as f64;
    Figures {
        requests_per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        cpu_us_per_request: cpu_seconds.map_or(f64::NAN, |cpu| cpu / count * 1e6),
        failed,
    }
}

/// Latencies and failures collected by the load tasks.
#[derive(Clone, Default)]
struct Tally(Arc<Mutex<Vec<Duration>>>, Arc<AtomicUsize>);

impl Tally {
    fn record(&self, outcome: Option<Duration>) {
        match outcome {
            Some(latency) => self.0.lock().push(latency),
            None => {
                self.1.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn summarize(&self, elapsed: Duration, cpu_seconds: Option<f64>) -> Figures {
        let latencies = std::mem::take(&mut *self.0.lock());
        summarize(latencies, self.1.load(Ordering::Relaxed), elapsed, cpu_seconds)
    }
}

/// The server's CPU seconds between `before` and now.
fn cpu_since(server: &ServerProcess, before: Option<f64>) -> Option<f64> {
    Some(server.cpu_seconds()? - before?)
}

/// Sends `rate` requests per second for `duration`, each on its own task.
pub(crate) async fn open_loop(
    server: &ServerProcess,
    clients: &Clients,
    bodies: &Prompts,
    rate: f64,
    duration: Duration,
) -> Figures {
    let tally = Tally::default();
    let total = (rate * duration.as_secs_f64()) as usize;
    let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let cpu = server.cpu_seconds();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        interval.tick().await;
        let (clients, bodies, tally) = (clients.clone(), bodies.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            tally.record(one_request(&clients, &bodies.body(i)).await);
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    tally.summarize(started.elapsed(), cpu_since(server, cpu))
}

/// Keeps `streams` requests in flight for `duration`, each worker sending its next request as
/// soon as the last is decided.
pub(crate) async fn closed_loop(
    server: &ServerProcess,
    clients: &Clients,
    bodies: &Prompts,
    streams: usize,
    duration: Duration,
) -> Figures {
    let tally = Tally::default();
    let cpu = server.cpu_seconds();
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(streams);
    for worker in 0..streams {
        let (clients, bodies, tally) = (clients.clone(), bodies.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = worker;
            while Instant::now() < deadline {
                tally.record(one_request(&clients, &bodies.body(i)).await);
                i += streams;
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    tally.summarize(started.elapsed(), cpu_since(server, cpu))
}
