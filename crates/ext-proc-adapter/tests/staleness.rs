//! The stale-metrics policy end to end, on a real loopback server: routing and readiness
//! through fresh -> some stale -> all stale (fail open) -> all stale (fail closed) -> fresh.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use demo::ext_proc_client::{Decision, ProxyRequest, ProxyStream};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use ext_proc_adapter::server::{self, ServerConfig};
use parking_lot::Mutex;
use scheduler_core::{
    AllStale, Endpoint, EndpointId, EndpointMetrics, EndpointState, SharedPool, StalenessPolicy,
};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const THRESHOLD: Duration = Duration::from_millis(300);

/// Stands in for the metrics collector: every 20 ms, the endpoints listed as alive get
/// metrics scraped now (with their fixed queue length); the others age.
fn refresher(pool: Arc<SharedPool>, queues: Vec<(SocketAddr, u32)>) -> Arc<Mutex<HashSet<u16>>> {
    let alive: Arc<Mutex<HashSet<u16>>> =
        Arc::new(Mutex::new(queues.iter().map(|(address, _)| address.port()).collect()));
    let handle = Arc::clone(&alive);
    tokio::spawn(async move {
        loop {
            let now = Instant::now();
            let alive = handle.lock().clone();
            pool.update(|snapshot| {
                for (address, queue) in &queues {
                    if alive.contains(&address.port()) {
                        let metrics = EndpointMetrics {
                            waiting_queue: *queue,
                            updated_at: Some(now),
                            ..Default::default()
                        };
                        snapshot.set_metrics(EndpointId::from_address(*address), metrics);
                    }
                }
            });
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    alive
}

async fn route(client: &mut ExternalProcessorClient<Channel>) -> Decision {
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

async fn destinations(client: &mut ExternalProcessorClient<Channel>, count: usize) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..count {
        match route(client).await {
            Decision::Routed { destination, .. } => seen.push(destination),
            other => panic!("expected a route, got {other:?}"),
        }
    }
    seen
}

async fn readiness(address: SocketAddr) -> ServingStatus {
    let channel =
        Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
    let request = HealthCheckRequest { service: "readiness".to_owned() };
    let response = HealthClient::new(channel).check(request).await.unwrap().into_inner();
    ServingStatus::try_from(response.status).unwrap()
}

async fn eventually_ready(address: SocketAddr, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while readiness(address).await != want {
        assert!(Instant::now() < deadline, "readiness never became {want:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn stale_metrics_transitions_for_routing_and_readiness() {
    let idle: SocketAddr = "127.0.0.1:8001".parse().unwrap();
    let busy: SocketAddr = "127.0.0.1:8002".parse().unwrap();
    let pool = Arc::new(SharedPool::default());
    pool.update(|snapshot| {
        snapshot.upsert(EndpointState::new(Endpoint::new(idle)));
        snapshot.upsert(EndpointState::new(Endpoint::new(busy)));
    });
    let config =
        ServerConfig { staleness_threshold: Some(THRESHOLD), ..ServerConfig::loopback("stale") };
    let scheduler = Arc::new(scorers::default_scheduler().unwrap());
    let running = server::start(scheduler, Arc::clone(&pool), config).await.unwrap();
    let policy = StalenessPolicy::new(THRESHOLD);
    assert_eq!(pool.load().staleness(), Some(&policy), "the server sets its policy on the pool");
    let alive = refresher(Arc::clone(&pool), vec![(idle, 0), (busy, 50)]);
    let mut client =
        ExternalProcessorClient::connect(format!("http://{}", running.grpc_address)).await.unwrap();

    // Fresh: the scorers prefer the idle endpoint.
    eventually_ready(running.health_address, ServingStatus::Serving).await;
    assert_eq!(destinations(&mut client, 3).await, vec![idle.to_string(); 3]);

    // Some stale: the idle endpoint's metrics stop; only the fresh (busy) one gets requests,
    // however attractive the stale numbers look.
    alive.lock().remove(&idle.port());
    tokio::time::sleep(THRESHOLD * 2).await;
    assert_eq!(destinations(&mut client, 3).await, vec![busy.to_string(); 3]);
    eventually_ready(running.health_address, ServingStatus::Serving).await;

    // All stale, failing open (the default): the least-loaded by last known load, and ready.
    alive.lock().clear();
    tokio::time::sleep(THRESHOLD * 2).await;
    assert_eq!(destinations(&mut client, 3).await, vec![idle.to_string(); 3]);
    eventually_ready(running.health_address, ServingStatus::Serving).await;

    // All stale, failing closed: 503 with the reason, and not ready.
    pool.set_staleness(Some(policy.when_all_stale(AllStale::FailClosed)));
    match route(&mut client).await {
        Decision::Immediate { status, body, .. } => {
            assert_eq!(status, 503);
            let body = String::from_utf8_lossy(&body);
            assert!(body.contains("stale_metrics"), "{body}");
        }
        other => panic!("expected 503, got {other:?}"),
    }
    eventually_ready(running.health_address, ServingStatus::NotServing).await;

    // Fresh again: routed and ready.
    alive.lock().extend([idle.port(), busy.port()]);
    eventually_ready(running.health_address, ServingStatus::Serving).await;
    assert_eq!(destinations(&mut client, 2).await, vec![idle.to_string(); 2]);
    running.shutdown(Duration::from_secs(1)).await;
}
