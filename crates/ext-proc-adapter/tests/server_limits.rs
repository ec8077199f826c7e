//! Limits of the ext-proc server, on real loopback servers: the routing-decision deadline,
//! HTTP/2 keepalive against a peer that stops answering, and mutual TLS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use demo::ext_proc_client::{ClientError, Decision, ProxyRequest, ProxyStream};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use ext_proc_adapter::server::{self, ConnectionLimits, RunningServer, ServerConfig};
use ext_proc_adapter::tls::PemIdentity;
use ext_proc_adapter::{Director, DirectorOptions, StreamLimits};
use scheduler_core::{
    Endpoint, EndpointMetrics, EndpointState, PoolSnapshot, Scheduler, SchedulerProfile,
    SharedPool, SingleProfileHandler,
};
use scorers::{ActiveRequestScorer, MaxScorePicker, QueueScorer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

fn endpoint(port: u16, waiting_queue: u32) -> EndpointState {
    EndpointState::new(Endpoint::new(([127, 0, 0, 1], port).into())).with_metrics(EndpointMetrics {
        waiting_queue,
        updated_at: Some(Instant::now()),
        ..EndpointMetrics::default()
    })
}

/// A server whose scheduler counts requests in flight (from decision to response end).
async fn start_counting(config: ServerConfig) -> (RunningServer, Arc<ActiveRequestScorer>) {
    let in_flight = Arc::new(ActiveRequestScorer::new());
    let profile = SchedulerProfile::new(
        "default",
        "max-score-picker",
        Arc::new(MaxScorePicker::new(1.try_into().unwrap())),
    )
    .with_scorer("queue-scorer", 1.0, Arc::new(QueueScorer::default()));
    let scheduler = Scheduler::new(vec![profile], Arc::new(SingleProfileHandler))
        .with_pre_request(in_flight.clone())
        .with_response_complete(in_flight.clone());
    let pool = Arc::new(SharedPool::new(PoolSnapshot::new([endpoint(9000, 0)])));
    let director = Arc::new(Director::new(Arc::new(scheduler), pool, DirectorOptions::default()));
    let running = server::start_with_director(director, config).await.unwrap();
    (running, in_flight)
}

async fn client(address: SocketAddr) -> ExternalProcessorClient<Channel> {
    ExternalProcessorClient::connect(format!("http://{address}")).await.unwrap()
}

const BODY: &[u8] = br#"{"model":"m","prompt":"hello"}"#;

fn request() -> ProxyRequest<'static> {
    ProxyRequest {
        headers: vec![(":path", "/v1/completions")],
        body: BODY,
        chunk_bytes: 0,
        subset: None,
    }
}

/// The decision timeout is short, the idle timeout long: only the former can end the stream
/// within the test.
fn deadline_limits() -> StreamLimits {
    StreamLimits {
        request_idle_timeout: Duration::from_secs(600),
        decision_timeout: Duration::from_millis(300),
        ..StreamLimits::default()
    }
}

fn assert_deadline_exceeded(outcome: Result<Result<Decision, ClientError>, impl std::fmt::Debug>) {
    match outcome {
        Ok(Err(ClientError::Status(status))) => {
            assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
            assert!(status.message().contains("no routing decision within"), "{status:?}");
        }
        other => panic!("expected DEADLINE_EXCEEDED within the test's wait, got {other:?}"),
    }
}

#[tokio::test]
async fn headers_then_nothing_is_ended_at_the_decision_deadline() {
    let config = ServerConfig { limits: deadline_limits(), ..ServerConfig::loopback("p") };
    let (running, in_flight) = start_counting(config).await;
    let mut client = client(running.grpc_address).await;
    let mut stream = ProxyStream::open(&mut client).await.unwrap();
    stream.send_headers(&[(":path", "/v1/completions")], false, None).await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), stream.decision()).await;
    assert_deadline_exceeded(outcome);
    assert_eq!(in_flight.total_in_flight(), 0);
    // The server still routes others.
    let mut next = ProxyStream::open(&mut client).await.unwrap();
    next.send_request(&request()).await.unwrap();
    assert!(matches!(next.decision().await.unwrap(), Decision::Routed { .. }));
    running.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_trickled_body_is_ended_at_the_decision_deadline() {
    let config = ServerConfig { limits: deadline_limits(), ..ServerConfig::loopback("p") };
    let (running, _) = start_counting(config).await;
    let mut client = client(running.grpc_address).await;
    let mut stream = ProxyStream::open(&mut client).await.unwrap();
    stream.send_headers(&[(":path", "/v1/completions")], false, None).await.unwrap();
    let started = Instant::now();
    // One byte every 50 ms: never idle for long, never complete.
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            tokio::select! {
                decision = stream.decision() => return decision,
                () = tokio::time::sleep(Duration::from_millis(50)) => {
                    if stream.send_body(true, b" ".to_vec(), false).await.is_err() {
                        return stream.decision().await;
                    }
                }
            }
        }
    })
    .await;
    assert_deadline_exceeded(outcome);
    assert!(started.elapsed() < Duration::from_secs(5), "ended after {:?}", started.elapsed());
    running.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_request_queued_past_the_decision_deadline_leaves_the_queue() {
    // Saturated pool, flow control without TTL: only the decision deadline ends the wait.
    let yaml = "featureGates: [flowControl]\nplugins:\n- type: queue-scorer\nsaturationDetector: {queueDepthThreshold: 5, metricsStalenessThreshold: 1m}\nflowControl: {defaultRequestTTL: 0}\n";
    let pool = Arc::new(SharedPool::new(PoolSnapshot::new([endpoint(9100, 9), endpoint(9101, 9)])));
    let objectives = scheduler_core::flow::ObjectiveResolver::from_yaml(
        "- {name: batch, priority: -1}\n",
        Arc::new(scheduler_core::flow::FlowMetrics::new()),
    )
    .unwrap();
    let director = Director::from_config(
        &scheduler_core::EndpointPickerConfig::from_yaml(yaml).unwrap(),
        &scorers::builtin_registry(),
        pool,
        DirectorOptions::default(),
        objectives,
    )
    .unwrap();
    let controller = director.admission().and_then(|a| a.controller()).unwrap().clone();
    let config = ServerConfig { limits: deadline_limits(), ..ServerConfig::loopback("p") };
    let running = server::start_with_director(Arc::new(director), config).await.unwrap();
    let mut client = client(running.grpc_address).await;
    let mut stream = ProxyStream::open(&mut client).await.unwrap();
    let queued = ProxyRequest {
        headers: vec![(":path", "/v1/completions"), ("x-gateway-inference-objective", "batch")],
        ..request()
    };
    stream.send_request(&queued).await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), stream.decision()).await;
    assert_deadline_exceeded(outcome);
    let deadline = Instant::now() + Duration::from_secs(5);
    while controller.queued_requests() != 0 {
        assert!(Instant::now() < deadline, "the request kept its queue place");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    running.shutdown(Duration::from_secs(1)).await;
}

/// A TCP relay that can be frozen: it then stops moving bytes either way but keeps both
/// sockets open, like a peer whose host vanished (no FIN, no RST).
async fn freezable_relay(target: SocketAddr) -> (SocketAddr, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let frozen = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&frozen);
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let outbound = TcpStream::connect(target).await.unwrap();
            let (inbound_read, inbound_write) = inbound.into_split();
            let (outbound_read, outbound_write) = outbound.into_split();
            tokio::spawn(pump(inbound_read, outbound_write, Arc::clone(&flag)));
            tokio::spawn(pump(outbound_read, inbound_write, Arc::clone(&flag)));
        }
    });
    (address, frozen)
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        if frozen.load(Ordering::Acquire) {
            // Hold both halves open without reading or writing, for good.
            std::future::pending::<()>().await;
        }
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            () = tokio::time::sleep(Duration::from_millis(10)) => continue,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(count) => {
                if to.write_all(&buffer[..count]).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_loses_its_connection_and_its_requests() {
    let connections = ConnectionLimits {
        http2_keepalive_interval: Some(Duration::from_millis(200)),
        http2_keepalive_timeout: Duration::from_millis(300),
        ..ConnectionLimits::default()
    };
    let config = ServerConfig { connections, ..ServerConfig::loopback("p") };
    let (running, in_flight) = start_counting(config).await;
    let (relay, frozen) = freezable_relay(running.grpc_address).await;
    let mut client = client(relay).await;
    let mut stream = ProxyStream::open(&mut client).await.unwrap();
    stream.send_request(&request()).await.unwrap();
    assert!(matches!(stream.decision().await.unwrap(), Decision::Routed { .. }));
    assert_eq!(in_flight.total_in_flight(), 1, "routed, awaiting its response");

    // The proxy's host vanishes: nothing more arrives, not even PING acknowledgements.
    frozen.store(true, Ordering::Release);
    let deadline = Instant::now() + Duration::from_secs(10);
    while in_flight.total_in_flight() != 0 {
        assert!(Instant::now() < deadline, "the vanished peer still holds its request");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(stream);
    running.shutdown(Duration::from_secs(1)).await;
}

/// A CA, a server certificate for localhost and a client certificate, all signed by the CA.
struct Pki {
    ca: String,
    server: PemIdentity,
    client: PemIdentity,
}

fn make_pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let certificate = CertificateParams::new(names).unwrap().signed_by(&key, &ca).unwrap();
        PemIdentity { certificate: certificate.pem(), key: key.serialize_pem() }
    };
    let server = leaf(vec!["localhost".to_owned()]);
    let client = leaf(vec!["proxy.example".to_owned()]);
    Pki { ca: ca.pem(), server, client }
}

async fn mtls_client(
    address: SocketAddr,
    pki: &Pki,
    identity: Option<&PemIdentity>,
) -> Result<Decision, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");
    if let Some(identity) = identity {
        tls = tls.identity(Identity::from_pem(&identity.certificate, &identity.key));
    }
    let channel = Channel::from_shared(format!("https://{address}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|error| format!("connect: {error}"))?;
    let mut client = ExternalProcessorClient::new(channel);
    let mut stream = ProxyStream::open(&mut client).await.map_err(|error| error.to_string())?;
    stream.send_request(&request()).await.map_err(|error| error.to_string())?;
    stream.decision().await.map_err(|error| error.to_string())
}

#[tokio::test]
async fn mutual_tls_admits_clients_signed_by_the_ca_only() {
    let pki = make_pki();
    let config = ServerConfig {
        tls: Some(pki.server.clone()),
        client_ca: Some(pki.ca.clone()),
        ..ServerConfig::loopback("p")
    };
    let (running, _) = start_counting(config).await;
    let routed = mtls_client(running.grpc_address, &pki, Some(&pki.client)).await;
    assert!(matches!(routed, Ok(Decision::Routed { .. })), "{routed:?}");

    let anonymous = mtls_client(running.grpc_address, &pki, None).await;
    assert!(anonymous.is_err(), "a client without a certificate was served: {anonymous:?}");

    // A certificate from another CA is refused too.
    let stranger = make_pki();
    let foreign = mtls_client(running.grpc_address, &pki, Some(&stranger.client)).await;
    assert!(foreign.is_err(), "a client with a foreign certificate was served: {foreign:?}");
    running.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_client_ca_without_tls_is_refused_at_start() {
    let config = ServerConfig { client_ca: Some(make_pki().ca), ..ServerConfig::loopback("p") };
    let pool = Arc::new(SharedPool::default());
    let error = server::start(Arc::new(scorers::default_scheduler().unwrap()), pool, config)
        .await
        .unwrap_err();
    assert_eq!(error.to_string(), "TLS setup failed: a client CA needs TLS serving");
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    let connections = ConnectionLimits { max_connections: 1, ..ConnectionLimits::default() };
    let config = ServerConfig { connections, ..ServerConfig::loopback("p") };
    let (running, _) = start_counting(config).await;
    let route = |mut client: ExternalProcessorClient<Channel>| async move {
        let mut stream = ProxyStream::open(&mut client).await.unwrap();
        stream.send_request(&request()).await.unwrap();
        stream.decision().await.unwrap()
    };
    let first = client(running.grpc_address).await;
    assert!(matches!(route(first.clone()).await, Decision::Routed { .. }));

    // A second connection is not served while the first is open...
    let second =
        Channel::from_shared(format!("http://{}", running.grpc_address)).unwrap().connect_lazy();
    let waiting = tokio::spawn(route(ExternalProcessorClient::new(second)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "served beyond the connection limit");

    // ...and is once the first closes.
    drop(first);
    let decision = tokio::time::timeout(Duration::from_secs(10), waiting).await;
    assert!(matches!(decision, Ok(Ok(Decision::Routed { .. }))), "{decision:?}");
    running.shutdown(Duration::from_secs(1)).await;
}
