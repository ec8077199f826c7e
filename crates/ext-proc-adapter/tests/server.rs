//! The whole server: TLS and plaintext ext-proc, health services, `/metrics`, endpoints file.

mod support;

use support::{http_get, tempdir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use demo::ext_proc_client::{Decision, ProxyRequest, ProxyStream};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use ext_proc_adapter::server::{self, CollectorSettings, RunningServer, ServerConfig};
use ext_proc_adapter::tls::PemIdentity;
use metrics_model::collector::CollectorConfig;
use metrics_model::mapping::Engine;
use scheduler_core::SharedPool;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn start(
    tls: Option<PemIdentity>,
    endpoints_file: Option<std::path::PathBuf>,
) -> (RunningServer, Arc<SharedPool>) {
    start_with(tls, endpoints_file, None).await
}

async fn start_with(
    tls: Option<PemIdentity>,
    endpoints_file: Option<std::path::PathBuf>,
    collector: Option<CollectorSettings>,
) -> (RunningServer, Arc<SharedPool>) {
    let pool = Arc::new(SharedPool::default());
    let config =
        ServerConfig { tls, endpoints_file, collector, ..ServerConfig::loopback("test-pool") };
    let scheduler = Arc::new(scorers::default_scheduler().unwrap());
    let running = server::start(scheduler, Arc::clone(&pool), config).await.unwrap();
    (running, pool)
}

fn write_endpoints(path: &std::path::Path, ports: &[u16]) {
    let text: String =
        ports.iter().map(|port| format!("- {{address: 127.0.0.1, port: {port}}}\n")).collect();
    std::fs::write(path, text).unwrap();
}

async fn route_once(client: &mut ExternalProcessorClient<Channel>) -> Decision {
    let mut stream = ProxyStream::open(client).await.unwrap();
    stream
        .send_request(&ProxyRequest {
            headers: vec![(":path", "/v1/completions")],
            body: br#"{"model":"m","prompt":"hello"}"#,
            chunk_bytes: 0,
            subset: None,
        })
        .await
        .unwrap();
    stream.decision().await.unwrap()
}

async fn health(address: SocketAddr, service: &str) -> ServingStatus {
    let channel =
        Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
    let mut client = HealthClient::new(channel);
    let response = client
        .check(HealthCheckRequest { service: service.to_owned() })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(response.status).unwrap()
}

async fn eventually_healthy(address: SocketAddr, service: &str, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if health(address, service).await == want {
            return;
        }
        assert!(Instant::now() < deadline, "{service} never became {want:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn tls_ext_proc_with_a_self_signed_certificate() {
    let identity = PemIdentity::self_signed().unwrap();
    let dir = tempdir();
    let file = dir.join("pool.yaml");
    write_endpoints(&file, &[8000]);
    let (running, _) = start(Some(identity.clone()), Some(file)).await;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&identity.certificate))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{}", running.grpc_address))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ExternalProcessorClient::new(channel);
    let Decision::Routed { destination, .. } = route_once(&mut client).await else { panic!() };
    assert_eq!(destination, "127.0.0.1:8000");

    // Plaintext is refused on a TLS port.
    let plain = ExternalProcessorClient::connect(format!("http://{}", running.grpc_address)).await;
    if let Ok(mut plain) = plain {
        assert!(ProxyStream::open(&mut plain).await.is_err());
    }
    running.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn readiness_follows_the_pool_and_the_endpoints_file_reloads() {
    let dir = tempdir();
    let file = dir.join("pool.yaml");
    write_endpoints(&file, &[]);
    std::fs::write(&file, "[]\n").unwrap();
    let (running, pool) = start(None, Some(file.clone())).await;
    eventually_healthy(running.health_address, "liveness", ServingStatus::Serving).await;
    eventually_healthy(running.health_address, "readiness", ServingStatus::NotServing).await;
    // The Helm charts' single-replica probe name (liveness too) serves from the start, as
    // the Go EPP's does once the pool is read: an empty pool does not get the pod restarted.
    eventually_healthy(running.health_address, "inference-extension", ServingStatus::Serving).await;
    eventually_healthy(
        running.health_address,
        "envoy.service.ext_proc.v3.ExternalProcessor",
        ServingStatus::NotServing,
    )
    .await;
    let mut client =
        ExternalProcessorClient::connect(format!("http://{}", running.grpc_address)).await.unwrap();
    assert!(matches!(route_once(&mut client).await, Decision::Immediate { status: 503, .. }));

    // Changes are detected by content: no need to wait for a new modification time.
    write_endpoints(&file, &[8000, 8001]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.load().len() != 2 {
        assert!(Instant::now() < deadline, "endpoints file was not reloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually_healthy(running.health_address, "readiness", ServingStatus::Serving).await;
    eventually_healthy(running.health_address, "inference-extension", ServingStatus::Serving).await;
    eventually_healthy(
        running.health_address,
        "envoy.service.ext_proc.v3.ExternalProcessor",
        ServingStatus::Serving,
    )
    .await;
    assert!(matches!(route_once(&mut client).await, Decision::Routed { .. }));

    // A broken file keeps the last good pool (the watcher polls every second: 1.5 s covers
    // at least one look at the broken content), and a good one after it is applied.
    std::fs::write(&file, "- address: [").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(pool.load().len(), 2);
    write_endpoints(&file, &[8000, 8001, 8002]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.load().len() != 3 {
        assert!(Instant::now() < deadline, "the good file after a broken one was not applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn metrics_expose_the_gie_names() {
    let dir = tempdir();
    let file = dir.join("pool.yaml");
    write_endpoints(&file, &[8000]);
    let (running, _) = start(None, Some(file)).await;
    let mut client =
        ExternalProcessorClient::connect(format!("http://{}", running.grpc_address)).await.unwrap();
    let mut stream = ProxyStream::open(&mut client).await.unwrap();
    stream
        .send_request(&ProxyRequest {
            headers: vec![(":path", "/v1/completions"), ("x-gateway-model-name-rewrite", "m-v2")],
            body: br#"{"model":"m","prompt":"hello"}"#,
            chunk_bytes: 0,
            subset: None,
        })
        .await
        .unwrap();
    stream.decision().await.unwrap();
    stream
        .respond(None, &[br#"{"usage":{"prompt_tokens":3,"completion_tokens":5}}"#])
        .await
        .unwrap();
    let mut bad = ProxyStream::open(&mut client).await.unwrap();
    bad.send_request(&ProxyRequest {
        headers: vec![],
        body: b"nope",
        chunk_bytes: 0,
        subset: None,
    })
    .await
    .unwrap();
    bad.decision().await.unwrap();

    let text = http_get(running.metrics_address, "/metrics").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    for name in [
        "inference_objective_request_total{model_name=\"m\",target_model_name=\"m-v2\"} 1",
        "inference_objective_request_error_total{",
        "error_code=\"bad_request\"",
        "inference_objective_request_duration_seconds_count",
        "inference_objective_input_tokens_sum{model_name=\"m\",target_model_name=\"m-v2\"} 3.0",
        "inference_objective_output_tokens_sum{model_name=\"m\",target_model_name=\"m-v2\"} 5.0",
        "inference_objective_normalized_time_per_output_token_seconds_count",
        "inference_pool_average_kv_cache_utilization{name=\"test-pool\"}",
        "inference_pool_average_queue_size{name=\"test-pool\"}",
        "inference_pool_ready_pods{name=\"test-pool\"} 1",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    assert!(http_get(running.metrics_address, "/other").await.starts_with("HTTP/1.1 404"));
    running.shutdown(Duration::from_secs(1)).await;
}

/// A model server that only serves a vLLM metrics page, keeping connections alive.
async fn fake_vllm(waiting: u32) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let page = format!(
        "# TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{model_name=\"m\"}} {waiting}\n\
         vllm:num_requests_running{{model_name=\"m\"}} 2\n\
         vllm:kv_cache_usage_perc{{model_name=\"m\"}} 0.25\n"
    );
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else { return };
            let page = page.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 4096];
                loop {
                    let mut seen = Vec::new();
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buffer[..n]),
                        }
                    }
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{page}",
                        page.len()
                    );
                    if socket.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    address
}

#[tokio::test]
async fn the_collector_keeps_endpoint_metrics_fresh_and_drives_readiness() {
    let healthy = fake_vllm(4).await;
    let dir = tempdir();
    let file = dir.join("pool.yaml");
    // One endpoint answers; nothing listens on the other (a closed loopback port).
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    std::fs::write(
        &file,
        format!("- {{address: 127.0.0.1, port: {}, engine: vllm}}\n- {{address: 127.0.0.1, port: {closed_port}}}\n", healthy.port()),
    )
    .unwrap();
    let settings = CollectorSettings {
        config: CollectorConfig {
            interval: Duration::from_millis(20),
            staleness_threshold: Duration::from_millis(500),
            ..CollectorConfig::default()
        },
        default_engine: Engine::Vllm,
        engines: None,
    };
    let (running, pool) = start_with(None, Some(file), Some(settings)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snapshot = pool.load();
        let state = snapshot.by_id(scheduler_core::EndpointId::from_address(healthy));
        if state.is_some_and(|s| s.metrics.waiting_queue == 4 && s.metrics.running == 2) {
            assert_eq!(state.unwrap().metrics.kv_usage, 0.25);
            break;
        }
        assert!(Instant::now() < deadline, "metrics never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually_healthy(running.health_address, "readiness", ServingStatus::Serving).await;
    let text = http_get(running.metrics_address, "/metrics").await;
    assert!(text.contains("inference_pool_ready_pods{name=\"test-pool\"} 1"), "{text}");
    assert!(text.contains("inference_pool_average_queue_size{name=\"test-pool\"} 4.0"), "{text}");
    // The same gauge under llm-d-router's name, which a peer cluster's EPP scrapes.
    assert!(text.contains("llm_d_epp_average_queue_size{name=\"test-pool\"} 4.0"), "{text}");
    assert!(text.contains("llm_d_epp_ready_endpoints{name=\"test-pool\"} 1"), "{text}");
    running.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn an_unknown_engine_in_the_endpoints_file_is_refused_by_name() {
    let dir = tempdir();
    let file = dir.join("pool.yaml");
    std::fs::write(&file, "- {address: 127.0.0.1, port: 1, engine: tgi}\n").unwrap();
    let settings = CollectorSettings {
        config: CollectorConfig::default(),
        default_engine: Engine::Vllm,
        engines: None,
    };
    let pool = Arc::new(SharedPool::default());
    let config = ServerConfig {
        endpoints_file: Some(file),
        collector: Some(settings),
        ..ServerConfig::loopback("p")
    };
    let error = server::start(Arc::new(scorers::default_scheduler().unwrap()), pool, config)
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "endpoint 127.0.0.1:1: unknown engine 'tgi' (known: vllm, sglang, trtllm)"
    );
}

#[tokio::test]
async fn a_metrics_client_that_stops_mid_request_is_disconnected() {
    let dir = std::env::temp_dir().join(format!("epp-metrics-timeout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("pool.yaml");
    std::fs::write(&file, "[]\n").unwrap();
    let (running, _) = start(None, Some(file)).await;
    let mut stalled = tokio::net::TcpStream::connect(running.metrics_address).await.unwrap();
    stalled.write_all(b"GET /metr").await.unwrap();
    // The header read timeout (5 s) closes it; without one it stayed open for good.
    let mut rest = Vec::new();
    let closed =
        tokio::time::timeout(Duration::from_secs(20), stalled.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the stalled connection is still open after 20 s");
    // The server still answers others.
    assert!(http_get(running.metrics_address, "/metrics").await.starts_with("HTTP/1.1 200"));
    running.shutdown(Duration::from_secs(1)).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn draining_reports_not_ready_while_still_routing_then_stops() {
    let dir = tempdir();
    let file = dir.join("pool.yaml");
    write_endpoints(&file, &[8000]);
    let (running, _) = start(None, Some(file)).await;
    eventually_healthy(running.health_address, "readiness", ServingStatus::Serving).await;
    let (grpc, health_address) = (running.grpc_address, running.health_address);
    let mut client = ExternalProcessorClient::connect(format!("http://{grpc}")).await.unwrap();
    let draining =
        tokio::spawn(running.drain(Duration::from_millis(1_500), Duration::from_secs(1)));

    eventually_healthy(health_address, "readiness", ServingStatus::NotServing).await;
    eventually_healthy(health_address, EXT_PROC_HEALTH, ServingStatus::NotServing).await;
    eventually_healthy(health_address, "inference-extension", ServingStatus::NotServing).await;
    assert_eq!(health(health_address, "liveness").await, ServingStatus::Serving);
    // Not ready, but requests that still arrive are routed, not refused.
    assert!(matches!(route_once(&mut client).await, Decision::Routed { .. }));

    tokio::time::timeout(Duration::from_secs(10), draining).await.unwrap().unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(5), async {
        match ProxyStream::open(&mut client).await {
            Err(_) => true,
            Ok(mut stream) => {
                stream
                    .send_request(&ProxyRequest {
                        headers: vec![(":path", "/v1/completions")],
                        body: br#"{"model":"m","prompt":"late"}"#,
                        chunk_bytes: 0,
                        subset: None,
                    })
                    .await
                    .is_err()
                    || stream.decision().await.is_err()
            }
        }
    })
    .await
    .unwrap();
    assert!(stopped, "after the drain window the server stops");
}

const EXT_PROC_HEALTH: &str = "envoy.service.ext_proc.v3.ExternalProcessor";
