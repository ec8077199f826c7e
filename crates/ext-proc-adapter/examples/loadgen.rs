//! Load generator: drives the real `epp` ext-proc server over loopback the way Envoy does (one
//! stream per request, body chunks sent without waiting for answers), and the same load against
//! a do-nothing ext-proc server (the floor: same protocol and buffering, no decision) in the same
//! run, and prints every figure with its ratio to the floor.
//!
//! Client and servers share the machine's cores, so only the ratios carry over between machines.
//!
//! ```sh
//! cargo run --release -p epp-ext-proc-adapter --example loadgen            # every scenario
//! cargo run --release -p epp-ext-proc-adapter --example loadgen -- quick   # a short smoke run
//! ```

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use demo::ext_proc_client::{Decision, ProxyRequest, ProxyStream};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    ProcessingRequest, ProcessingResponse, processing_request,
};
use ext_proc_adapter::server::{self, ServerConfig};
use ext_proc_adapter::{DirectorOptions, StreamLimits, proto};
use parking_lot::Mutex;
use scheduler_core::{Endpoint, EndpointMetrics, EndpointState, PoolSnapshot, SharedPool};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

/// The floor: buffers the body like the picker, then routes every request to one fixed address.
#[derive(Clone, Debug)]
struct DoNothing;

#[tonic::async_trait]
impl ExternalProcessor for DoNothing {
    type ProcessStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let (sender, receiver) = mpsc::channel(32);
        tokio::spawn(async move {
            let mut chunks: Vec<Vec<u8>> = Vec::new();
            while let Ok(Some(message)) = inbound.message().await {
                if let Some(processing_request::Request::RequestBody(body)) = message.request {
                    let end = body.end_of_stream;
                    chunks.push(body.body);
                    if end {
                        let _ = sender.send(Ok(proto::route_to("10.0.0.1:8000", &[]))).await;
                        let count = chunks.len();
                        for (index, chunk) in chunks.drain(..).enumerate() {
                            let answer = proto::body_chunk(true, chunk, index + 1 == count);
                            let _ = sender.send(Ok(answer)).await;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

async fn start_floor() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind floor");
    let address = listener.local_addr().expect("floor address");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                ExternalProcessorServer::new(DoNothing).max_decoding_message_size(16 << 20),
            )
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    address
}

async fn start_epp(endpoints: usize) -> SocketAddr {
    let now = Instant::now();
    let pool = Arc::new(SharedPool::new(PoolSnapshot::new((0..endpoints).map(|i| {
        let address = SocketAddr::from(([10, 1, (i / 250) as u8, (i % 250) as u8], 8000));
        EndpointState::new(Endpoint::new(address)).with_metrics(EndpointMetrics {
            waiting_queue: (i % 7) as u32,
            running: 8,
            kv_usage: (i % 10) as f64 / 10.0,
            updated_at: Some(now),
            ..EndpointMetrics::default()
        })
    }))));
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("loopback");
    let config = ServerConfig {
        grpc_address: loopback,
        health_address: loopback,
        metrics_address: loopback,
        tls: None,
        director: DirectorOptions::default(),
        limits: StreamLimits::default(),
        pool_name: "loadgen".into(),
        staleness_threshold: None,
        endpoints_file: None,
        collector: None,
    };
    let scheduler = Arc::new(scorers::default_scheduler().expect("default scheduler"));
    let running = server::start(scheduler, pool, config).await.expect("start epp");
    let address = running.grpc_address;
    std::mem::forget(running); // serve until the process exits
    address
}

/// Request bodies: chat requests whose first half is one of a few shared system prompts.
fn bodies(size: usize, count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            let system =
                format!("System prompt {} for this tenant. ", i % 16).repeat(size / 30 + 1);
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
        .collect()
}

#[derive(Clone)]
struct Clients(Arc<Vec<ExternalProcessorClient<Channel>>>, Arc<AtomicUsize>);

impl Clients {
    async fn connect(address: SocketAddr, connections: usize) -> Self {
        let mut clients = Vec::new();
        for _ in 0..connections {
            let channel = Channel::from_shared(format!("http://{address}"))
                .expect("uri")
                .connect()
                .await
                .expect("connect");
            clients.push(
                ExternalProcessorClient::new(channel)
                    .max_decoding_message_size(16 << 20)
                    .max_encoding_message_size(16 << 20),
            );
        }
        Self(Arc::new(clients), Arc::new(AtomicUsize::new(0)))
    }

    fn next(&self) -> ExternalProcessorClient<Channel> {
        let index = self.1.fetch_add(1, Ordering::Relaxed) % self.0.len();
        self.0[index].clone()
    }
}

/// One request: returns the decision latency, or None when it failed.
async fn one_request(clients: &Clients, body: &[u8]) -> Option<Duration> {
    let started = Instant::now();
    let mut client = clients.next();
    let mut stream = ProxyStream::open(&mut client).await.ok()?;
    let request = ProxyRequest {
        headers: vec![(":path", "/v1/chat/completions"), (":method", "POST")],
        body,
        chunk_bytes: 16 * 1024,
        subset: None,
    };
    stream.send_request(&request).await.ok()?;
    match stream.decision().await.ok()? {
        Decision::Routed { .. } => Some(started.elapsed()),
        Decision::Immediate { .. } => None,
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    requests_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_request: f64,
    failed: usize,
}

fn process_cpu_seconds() -> f64 {
    // utime + stime of this process, in clock ticks (Linux; elsewhere CPU is not reported).
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return f64::NAN };
    let after_name = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(f64::NAN);
    (ticks(11) + ticks(12)) / 100.0
}

fn summarize(mut latencies: Vec<Duration>, failed: usize, elapsed: Duration, cpu: f64) -> Figures {
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
        cpu_us_per_request: cpu / count * 1e6,
        failed,
    }
}

async fn open_loop(
    clients: &Clients,
    bodies: &Arc<Vec<Vec<u8>>>,
    rate: f64,
    duration: Duration,
) -> Figures {
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(AtomicUsize::new(0));
    let total = (rate * duration.as_secs_f64()) as usize;
    let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let cpu = process_cpu_seconds();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        interval.tick().await;
        let (clients, bodies, latencies, failed) =
            (clients.clone(), Arc::clone(bodies), Arc::clone(&latencies), Arc::clone(&failed));
        tasks.push(tokio::spawn(async move {
            match one_request(&clients, &bodies[i % bodies.len()]).await {
                Some(latency) => latencies.lock().push(latency),
                None => {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let elapsed = started.elapsed();
    let latencies = std::mem::take(&mut *latencies.lock());
    summarize(latencies, failed.load(Ordering::Relaxed), elapsed, process_cpu_seconds() - cpu)
}

async fn closed_loop(
    clients: &Clients,
    bodies: &Arc<Vec<Vec<u8>>>,
    streams: usize,
    duration: Duration,
) -> Figures {
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(AtomicUsize::new(0));
    let cpu = process_cpu_seconds();
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for worker in 0..streams {
        let (clients, bodies, latencies, failed) =
            (clients.clone(), Arc::clone(bodies), Arc::clone(&latencies), Arc::clone(&failed));
        tasks.push(tokio::spawn(async move {
            let mut i = worker;
            while Instant::now() < deadline {
                match one_request(&clients, &bodies[i % bodies.len()]).await {
                    Some(latency) => latencies.lock().push(latency),
                    None => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += streams;
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let elapsed = started.elapsed();
    let latencies = std::mem::take(&mut *latencies.lock());
    summarize(latencies, failed.load(Ordering::Relaxed), elapsed, process_cpu_seconds() - cpu)
}

fn print_row(name: &str, floor: Figures, epp: Figures) {
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    println!(
        "{name:<34} {:>9.0} {:>9.0} {:>6.2}x | {:>7.3} {:>7.3} {:>6.2}x | {:>7.3} {:>7.3} {:>6.2}x | {:>7.0} {:>7.0} | {}/{}",
        floor.requests_per_second,
        epp.requests_per_second,
        ratio(epp.requests_per_second, floor.requests_per_second),
        floor.p50_ms,
        epp.p50_ms,
        ratio(epp.p50_ms, floor.p50_ms),
        floor.p99_ms,
        epp.p99_ms,
        ratio(epp.p99_ms, floor.p99_ms),
        floor.cpu_us_per_request,
        epp.cpu_us_per_request,
        floor.failed,
        epp.failed,
    );
}

fn main() {
    let quick = std::env::args().any(|arg| arg == "quick");
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async move {
        let floor = Clients::connect(start_floor().await, 4).await;
        let epp = Clients::connect(start_epp(100).await, 4).await;
        let small = Arc::new(bodies(16 * 1024, 256));
        let large = Arc::new(bodies(220 * 1024, 32));
        let seconds = Duration::from_secs(if quick { 1 } else { 5 });
        println!("100 endpoints, GIE default profile (queue 2, kv-cache 2, prefix 3); {seconds:?} per case");
        println!(
            "{:<34} {:>9} {:>9} {:>7} | {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} | {:>7} {:>7} | failed",
            "case", "floor/s", "epp/s", "ratio", "p50 fl", "p50 epp", "ratio", "p99 fl", "p99 epp", "ratio", "cpu fl", "cpu epp"
        );
        println!("{:<34} {:>27} | {:>23} | {:>23} | {:>15} |", "", "(requests per second)", "(decision ms)", "(decision ms)", "(µs/request)");
        for rate in [1_000.0, 5_000.0] {
            let f = open_loop(&floor, &small, rate, seconds).await;
            let e = open_loop(&epp, &small, rate, seconds).await;
            print_row(&format!("open loop {rate} req/s, 16 KB"), f, e);
        }
        let f = closed_loop(&floor, &small, 64, seconds).await;
        let e = closed_loop(&epp, &small, 64, seconds).await;
        print_row("closed loop 64 streams, 16 KB", f, e);
        let f = closed_loop(&floor, &large, 150, seconds).await;
        let e = closed_loop(&epp, &large, 150, seconds).await;
        print_row("closed loop 150 streams, 220 KB", f, e);
    });
}
