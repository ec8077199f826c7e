//! In-flight eviction over real gRPC on loopback: with `enableEviction`, a sheddable request
//! already routed is ended (429, `x-llm-d-request-dropped-reason: evicted`) when a request of
//! higher priority waits on a saturated pool; a non-sheddable one never is.

use std::sync::Arc;
use std::time::{Duration, Instant};

use demo::ext_proc_client::{Decision, ProxyRequest, ProxyStream};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use ext_proc_adapter::{Director, DirectorOptions};
use scheduler_core::flow::OutcomeReason;
use scheduler_core::{Endpoint, EndpointMetrics, EndpointState, PoolSnapshot, SharedPool};
use tonic::transport::Channel;

const CONFIG: &str = "featureGates: [flowControl]
plugins:
- type: queue-scorer
saturationDetector: {queueDepthThreshold: 5, metricsStalenessThreshold: 10s}
flowControl: {defaultRequestTTL: 10s, enableEviction: true}
";

const OBJECTIVES: &str = "- {name: critical, priority: 10}\n- {name: standard, priority: 0}\n- {name: batch, priority: -1}\n";

const CHAT: &[u8] =
    br#"{"model":"llama","messages":[{"role":"user","content":"Hello there"}],"stream":true}"#;

fn endpoint(waiting_queue: u32) -> EndpointState {
    EndpointState::new(Endpoint::new(([127, 0, 0, 1], 9100).into())).with_metrics(EndpointMetrics {
        waiting_queue,
        updated_at: Some(Instant::now()),
        ..EndpointMetrics::default()
    })
}

fn director(pool: Arc<SharedPool>) -> Arc<Director> {
    let config = scheduler_core::EndpointPickerConfig::from_yaml(CONFIG).unwrap();
    let metrics = Arc::new(scheduler_core::flow::FlowMetrics::new());
    let objectives =
        scheduler_core::flow::ObjectiveResolver::from_yaml(OBJECTIVES, metrics).unwrap();
    let director = Director::from_config(
        &config,
        &scorers::builtin_registry(),
        pool,
        DirectorOptions::default(),
        objectives,
    );
    Arc::new(director.unwrap())
}

async fn serve(director: Arc<Director>) -> ExternalProcessorClient<Channel> {
    let config = ext_proc_adapter::ServerConfig::loopback("p");
    let running = ext_proc_adapter::server::start_with_director(director, config).await.unwrap();
    let address = running.grpc_address;
    std::mem::forget(running);
    ExternalProcessorClient::connect(format!("http://{address}")).await.unwrap()
}

fn with_objective(objective: &str) -> ProxyRequest<'_> {
    ProxyRequest {
        headers: vec![
            (":path", "/v1/chat/completions"),
            ("x-gateway-inference-objective", objective),
        ],
        body: CHAT,
        chunk_bytes: 0,
        subset: None,
    }
}

async fn routed(client: &mut ExternalProcessorClient<Channel>, objective: &str) -> ProxyStream {
    let mut stream = ProxyStream::open(client).await.unwrap();
    stream.send_request(&with_objective(objective)).await.unwrap();
    let decision = stream.decision().await.unwrap();
    assert!(matches!(decision, Decision::Routed { .. }), "{objective}: {decision:?}");
    stream
}

#[tokio::test]
async fn a_waiting_critical_request_evicts_a_sheddable_one_in_flight() {
    let pool = Arc::new(SharedPool::new(PoolSnapshot::new([endpoint(0)])));
    let director = director(Arc::clone(&pool));
    let controller = director.admission().and_then(|a| a.controller()).unwrap().clone();
    let mut client = serve(director).await;
    let mut batch = routed(&mut client, "batch").await;
    let mut standard = routed(&mut client, "standard").await;

    pool.update(|snapshot| snapshot.upsert(endpoint(9))); // the pool fills up
    let mut critical = ProxyStream::open(&mut client).await.unwrap();
    critical.send_request(&with_objective("critical")).await.unwrap();

    // The batch request, routed and in flight, is ended with the Go EPP's answer.
    let evicted = tokio::time::timeout(Duration::from_secs(10), batch.decision())
        .await
        .expect("evicted in time")
        .unwrap();
    let Decision::Immediate { status, headers, .. } = evicted else { panic!("{evicted:?}") };
    assert_eq!(status, 429);
    assert!(
        headers.contains(&("x-llm-d-request-dropped-reason".to_owned(), "evicted".to_owned())),
        "{headers:?}"
    );
    assert_eq!(controller.metrics().outcome(OutcomeReason::Evicted), 1);

    // Priority 0 is not sheddable: it is never evicted, however long the critical one waits.
    let standard_answer =
        tokio::time::timeout(Duration::from_millis(300), standard.decision()).await;
    assert!(standard_answer.is_err(), "the standard request kept running: {standard_answer:?}");
    assert_eq!(controller.metrics().outcome(OutcomeReason::Evicted), 1);

    // Capacity shows up in the metrics; the critical request goes out.
    pool.update(|snapshot| snapshot.upsert(endpoint(0)));
    let decision = tokio::time::timeout(Duration::from_secs(10), critical.decision())
        .await
        .expect("routed in time")
        .unwrap();
    assert!(matches!(decision, Decision::Routed { .. }), "{decision:?}");
}
