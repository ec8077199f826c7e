//! The ext-proc service over real gRPC on loopback, driven as Envoy drives it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use demo::ext_proc_client::{Decision, ProxyRequest, ProxyStream};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use ext_proc_adapter::{Director, DirectorOptions, EppExtProc, StreamLimits};
use parking_lot::Mutex;
use scheduler_core::{
    CompletedRequest, Endpoint, EndpointMetrics, EndpointState, PoolSnapshot, ResponseComplete,
    Scheduler, SchedulerProfile, SharedPool, SingleProfileHandler,
};
use scorers::{ActiveRequestScorer, MaxScorePicker, QueueScorer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Channel;

#[derive(Debug, Default)]
struct Recorder(Mutex<Vec<CompletedRequest>>);

impl ResponseComplete for Recorder {
    fn response_complete(&self, completed: &CompletedRequest) {
        self.0.lock().push(completed.clone());
    }
}

struct Harness {
    client: ExternalProcessorClient<Channel>,
    in_flight: Arc<ActiveRequestScorer>,
    completed: Arc<Recorder>,
}

fn endpoint(port: u16, waiting_queue: u32) -> EndpointState {
    EndpointState::new(Endpoint::new(([127, 0, 0, 1], port).into())).with_metrics(EndpointMetrics {
        waiting_queue,
        updated_at: Some(Instant::now()),
        ..EndpointMetrics::default()
    })
}

async fn start(options: DirectorOptions, limits: StreamLimits) -> Harness {
    let in_flight = Arc::new(ActiveRequestScorer::new());
    let completed = Arc::new(Recorder::default());
    let profile = SchedulerProfile::new(
        "default",
        "max-score-picker",
        Arc::new(MaxScorePicker::new(3.try_into().unwrap())),
    )
    .with_scorer("queue-scorer", 1.0, Arc::new(QueueScorer::default()));
    let scheduler = Scheduler::new(vec![profile], Arc::new(SingleProfileHandler))
        .with_pre_request(in_flight.clone())
        .with_response_complete(in_flight.clone())
        .with_response_complete(completed.clone());
    // Queues 3, 0, 5: 9001 is best, then 9000, then 9002. Metrics stay fresh for the test.
    let pool = Arc::new(SharedPool::new(PoolSnapshot::new([
        endpoint(9000, 3),
        endpoint(9001, 0),
        endpoint(9002, 5),
    ])));
    let director = Arc::new(Director::new(Arc::new(scheduler), pool, options));
    let service = EppExtProc::new(director, None, limits).into_server(8 * 1024 * 1024);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let client = ExternalProcessorClient::connect(format!("http://{address}")).await.unwrap();
    Harness { client, in_flight, completed }
}

const CHAT: &[u8] =
    br#"{"model":"llama","messages":[{"role":"user","content":"Hello there"}],"stream":true}"#;

fn request(body: &[u8], chunk_bytes: usize) -> ProxyRequest<'_> {
    ProxyRequest {
        headers: vec![
            (":path", "/v1/chat/completions"),
            (":method", "POST"),
            ("x-request-id", "r-1"),
        ],
        body,
        chunk_bytes,
        subset: None,
    }
}

async fn decide(harness: &mut Harness, request: &ProxyRequest<'_>) -> (ProxyStream, Decision) {
    let mut stream = ProxyStream::open(&mut harness.client).await.unwrap();
    stream.send_request(request).await.unwrap();
    let decision = stream.decision().await.unwrap();
    (stream, decision)
}

fn error_status(decision: &Decision) -> (u16, serde_json::Value) {
    match decision {
        Decision::Immediate { status, body, .. } => {
            (*status, serde_json::from_slice(body).unwrap())
        }
        other => panic!("expected an immediate response, got {other:?}"),
    }
}

#[tokio::test]
async fn headers_then_body_are_routed_and_the_body_streams_back() {
    let mut harness = start(DirectorOptions::default(), StreamLimits::default()).await;
    let (_, decision) = decide(&mut harness, &request(CHAT, 0)).await;
    assert_eq!(
        decision,
        Decision::Routed {
            destination: "127.0.0.1:9001".into(),
            metadata_destination: "127.0.0.1:9001".into(),
            body: CHAT.to_vec(),
            headers: Vec::new(),
        }
    );
}

#[tokio::test]
async fn body_chunks_sent_before_any_answer_are_buffered_and_echoed_in_order() {
    let mut harness = start(DirectorOptions::default(), StreamLimits::default()).await;
    let (_, decision) = decide(&mut harness, &request(CHAT, 7)).await;
    let Decision::Routed { body, .. } = decision else { panic!("{decision:?}") };
    assert_eq!(body, CHAT);
}

#[tokio::test]
async fn fallbacks_are_opt_in() {
    let limits = StreamLimits { max_fallback_endpoints: 2, ..StreamLimits::default() };
    let mut harness = start(DirectorOptions::default(), limits).await;
    let (_, decision) = decide(&mut harness, &request(CHAT, 0)).await;
    let Decision::Routed { destination, metadata_destination, .. } = decision else { panic!() };
    assert_eq!(destination, "127.0.0.1:9001,127.0.0.1:9000,127.0.0.1:9002");
    assert_eq!(metadata_destination, destination);
}

#[tokio::test]
async fn subset_hint_is_honoured_and_an_empty_one_is_503() {
    let mut harness = start(DirectorOptions::default(), StreamLimits::default()).await;
    let mut hinted = request(CHAT, 0);
    hinted.subset = Some(vec!["127.0.0.1:9002".into(), "127.0.0.1:9000".into()]);
    let (_, decision) = decide(&mut harness, &hinted).await;
    let Decision::Routed { destination, .. } = decision else { panic!("{decision:?}") };
    assert_eq!(destination, "127.0.0.1:9000");

    hinted.subset = Some(Vec::new());
    let (_, decision) = decide(&mut harness, &hinted).await;
    let (status, body) = error_status(&decision);
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "no_ready_endpoint");
}

#[tokio::test]
async fn malformed_bodies_are_400_with_a_json_error() {
    let mut harness = start(DirectorOptions::default(), StreamLimits::default()).await;
    let (_, decision) = decide(&mut harness, &request(b"{\"model\": ", 0)).await;
    let (status, body) = error_status(&decision);
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().unwrap().contains("not valid JSON"), "{body}");
    let (_, decision) = decide(&mut harness, &request(br#"{"messages":[]}"#, 0)).await;
    let (status, body) = error_status(&decision);
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().unwrap().contains("\"model\""), "{body}");
}

#[tokio::test]
async fn oversized_bodies_are_413_before_the_body_ends() {
    let options = DirectorOptions { max_body_bytes: 1024, ..DirectorOptions::default() };
    let mut harness = start(options, StreamLimits::default()).await;
    let mut stream = ProxyStream::open(&mut harness.client).await.unwrap();
    stream.send_headers(&[(":path", "/v1/completions")], false, None).await.unwrap();
    // Two chunks fit; the third crosses the limit and is answered at once, before the end.
    for _ in 0..3 {
        stream.send_body(true, vec![b'x'; 500], false).await.unwrap();
    }
    let (status, body) = error_status(&stream.decision().await.unwrap());
    assert_eq!(status, 413);
    assert_eq!(body["error"]["code"], "body_too_large");
}

#[tokio::test]
async fn requests_without_a_body_go_to_a_random_endpoint_of_the_subset() {
    let mut harness = start(DirectorOptions::default(), StreamLimits::default()).await;
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..60 {
        let mut stream = ProxyStream::open(&mut harness.client).await.unwrap();
        stream
            .send_headers(&[(":path", "/v1/models"), (":method", "GET")], true, None)
            .await
            .unwrap();
        let Decision::Routed { destination, .. } = stream.headers_only_decision().await.unwrap()
        else {
            panic!("a GET without a body is routed, not refused");
        };
        *seen.entry(destination).or_insert(0) += 1;
        stream.respond(None, &[b"{\"data\":[]}"]).await.unwrap();
    }
    // Not by queue (9001 would take all): every endpoint gets a share.
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.values().all(|count| *count >= 5), "{seen:?}");
    assert!(harness.completed.0.lock().is_empty(), "no scheduling, so no completion hooks");

    let subset = ["127.0.0.1:9002".to_owned()];
    for _ in 0..10 {
        let mut stream = ProxyStream::open(&mut harness.client).await.unwrap();
        stream.send_headers(&[(":path", "/health")], true, Some(&subset)).await.unwrap();
        let decision = stream.headers_only_decision().await.unwrap();
        assert!(
            matches!(&decision, Decision::Routed { destination, .. } if destination == "127.0.0.1:9002"),
            "{decision:?}"
        );
    }
    let outside = ["10.9.9.9:80".to_owned()];
    let mut stream = ProxyStream::open(&mut harness.client).await.unwrap();
    stream.send_headers(&[(":path", "/v1/models")], true, Some(&outside)).await.unwrap();
    let decision = stream.headers_only_decision().await.unwrap();
    let Decision::Immediate { status: 503, headers, .. } = decision else {
        panic!("a subset outside the pool has no endpoint: {decision:?}");
    };
    assert!(
        headers
            .contains(&("x-llm-d-request-dropped-reason".into(), "rejected-no-endpoints".into())),
        "{headers:?}"
    );
}

#[tokio::test]
async fn an_upstream_server_error_fails_the_request() {
    let mut harness = start(DirectorOptions::default(), StreamLimits::default()).await;
    let (mut stream, _) = decide(&mut harness, &request(CHAT, 0)).await;
    stream.respond_with_status(503, None, &[b"overloaded"]).await.unwrap();
    let completed = harness.completed.0.lock().clone();
    assert_eq!(completed.len(), 1);
    assert_eq!(completed[0].outcome, scheduler_core::Outcome::Failed, "a 5xx is no completion");
    assert_eq!(harness.in_flight.total_in_flight(), 0);
}

#[tokio::test]
async fn the_response_completes_the_request_with_usage_and_served_endpoint() {
    let mut harness = start(DirectorOptions::default(), StreamLimits::default()).await;
    let (mut stream, decision) = decide(&mut harness, &request(CHAT, 0)).await;
    assert!(matches!(decision, Decision::Routed { .. }));
    assert_eq!(harness.in_flight.total_in_flight(), 1);
    let served: SocketAddr = "127.0.0.1:9000".parse().unwrap();
    let chunks: [&[u8]; 2] = [
        b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n",
        b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":4}}\n\ndata: [DONE]\n\n",
    ];
    let echoed = stream.respond(Some(served), &chunks).await.unwrap();
    assert_eq!(echoed, chunks.concat());
    let completed = harness.completed.0.lock().clone();
    assert_eq!(completed.len(), 1);
    let completed = &completed[0];
    assert_eq!(completed.outcome, scheduler_core::Outcome::Completed);
    assert_eq!((completed.prompt_tokens, completed.completion_tokens), (Some(9), Some(4)));
    assert_eq!(completed.served_endpoint, Some(scheduler_core::EndpointId::from_address(served)));
    assert_eq!(completed.request_id, "r-1");
    assert_eq!(harness.in_flight.total_in_flight(), 0);
}

async fn eventually(mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "condition not reached in 10 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_stream_that_ends_early_frees_its_request() {
    let mut harness = start(DirectorOptions::default(), StreamLimits::default()).await;
    let (stream, _) = decide(&mut harness, &request(CHAT, 0)).await;
    assert_eq!(harness.in_flight.total_in_flight(), 1);
    drop(stream); // proxy resets before the response
    let in_flight = harness.in_flight.clone();
    eventually(|| in_flight.total_in_flight() == 0).await;
    let completed = harness.completed.0.lock().clone();
    assert_eq!(completed[0].outcome, scheduler_core::Outcome::Cancelled);
}

#[tokio::test]
async fn a_body_that_never_completes_is_dropped_after_the_idle_timeout() {
    let limits = StreamLimits {
        request_idle_timeout: Duration::from_millis(100),
        ..StreamLimits::default()
    };
    let mut harness = start(DirectorOptions::default(), limits).await;
    let mut stream = ProxyStream::open(&mut harness.client).await.unwrap();
    stream.send_headers(&[(":path", "/v1/completions")], false, None).await.unwrap();
    stream.send_body(true, b"{\"model\":".to_vec(), false).await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), stream.decision()).await;
    assert!(matches!(outcome, Ok(Err(_))), "the picker must close an idle stream: {outcome:?}");
    assert_eq!(harness.in_flight.total_in_flight(), 0);
}

#[tokio::test]
async fn hundreds_of_concurrent_streams_are_all_answered() {
    let harness = start(DirectorOptions::default(), StreamLimits::default()).await;
    let mut tasks = Vec::new();
    for i in 0..300 {
        let mut client = harness.client.clone();
        tasks.push(tokio::spawn(async move {
            let body = format!(r#"{{"model":"llama","prompt":"request {i}"}}"#);
            let mut stream = ProxyStream::open(&mut client).await.unwrap();
            stream
                .send_request(&ProxyRequest {
                    headers: vec![(":path", "/v1/completions")],
                    body: body.as_bytes(),
                    chunk_bytes: 16,
                    subset: None,
                })
                .await
                .unwrap();
            let decision = stream.decision().await.unwrap();
            let Decision::Routed { body: echoed, .. } = decision else { panic!("{decision:?}") };
            assert_eq!(echoed, body.as_bytes());
            stream.respond(None, &[b"{}"]).await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(harness.in_flight.total_in_flight(), 0);
    assert_eq!(harness.completed.0.lock().len(), 300);
}

fn saturated_pool(waiting_queue: u32) -> Arc<SharedPool> {
    Arc::new(SharedPool::new(PoolSnapshot::new([
        endpoint(9100, waiting_queue),
        endpoint(9101, waiting_queue),
    ])))
}

async fn serve_director(director: Arc<Director>) -> ExternalProcessorClient<Channel> {
    let config = ext_proc_adapter::ServerConfig::loopback("p");
    let running = ext_proc_adapter::server::start_with_director(director, config).await.unwrap();
    let address = running.grpc_address;
    std::mem::forget(running);
    ExternalProcessorClient::connect(format!("http://{address}")).await.unwrap()
}

const OBJECTIVES: &str = "- {name: critical, priority: 10}\n- {name: batch, priority: -1}\n";

fn director_for(config: &str, pool: Arc<SharedPool>) -> Arc<Director> {
    let config = scheduler_core::EndpointPickerConfig::from_yaml(config).unwrap();
    let metrics = Arc::new(scheduler_core::flow::FlowMetrics::new());
    let objectives =
        scheduler_core::flow::ObjectiveResolver::from_yaml(OBJECTIVES, metrics).unwrap();
    let mut registry = scorers::builtin_registry();
    registry.allow_experimental_plugins(true);
    Arc::new(
        Director::from_config(&config, &registry, pool, DirectorOptions::default(), objectives)
            .unwrap(),
    )
}

fn with_objective<'a>(objective: &'a str) -> ProxyRequest<'a> {
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

#[tokio::test]
async fn sheddable_requests_get_429_when_the_pool_is_saturated() {
    let config = "plugins:\n- type: queue-scorer\nsaturationDetector: {queueDepthThreshold: 5, metricsStalenessThreshold: 10s}\n";
    let pool = saturated_pool(7);
    let mut client = serve_director(director_for(config, Arc::clone(&pool))).await;
    let decide = |client: &mut ExternalProcessorClient<Channel>, objective: &'static str| {
        let mut client = client.clone();
        async move {
            let mut stream = ProxyStream::open(&mut client).await.unwrap();
            stream.send_request(&with_objective(objective)).await.unwrap();
            stream.decision().await.unwrap()
        }
    };
    let shed = decide(&mut client, "batch").await;
    let (status, body) = error_status(&shed);
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], "request_shed");
    let Decision::Immediate { headers, .. } = shed else { unreachable!() };
    let reason = ("x-llm-d-request-dropped-reason".to_owned(), "rejected-saturated".to_owned());
    assert!(headers.contains(&reason), "{headers:?}");
    assert!(
        matches!(decide(&mut client, "critical").await, Decision::Routed { .. }),
        "never shed priority >= 0"
    );
    assert!(
        matches!(decide(&mut client, "unknown-objective").await, Decision::Routed { .. }),
        "unknown = 0"
    );
    // llm-d-router's header name, carrying a legacy criticality rather than a configured name.
    let mut stream = ProxyStream::open(&mut client).await.unwrap();
    let legacy_criticality = ProxyRequest {
        headers: vec![
            (":path", "/v1/chat/completions"),
            ("x-llm-d-inference-objective", "Sheddable"),
        ],
        body: CHAT,
        chunk_bytes: 0,
        subset: None,
    };
    stream.send_request(&legacy_criticality).await.unwrap();
    assert_eq!(error_status(&stream.decision().await.unwrap()).0, 429);

    // Saturation lifts: the sheddable request goes through.
    pool.update(|snapshot| {
        for port in [9100, 9101] {
            snapshot.upsert(endpoint(port, 0));
        }
    });
    assert!(matches!(decide(&mut client, "batch").await, Decision::Routed { .. }));
}

#[tokio::test]
async fn with_the_flow_control_gate_requests_wait_until_saturation_lifts() {
    let config = "featureGates: [flowControl]\nplugins:\n- type: queue-scorer\nsaturationDetector: {queueDepthThreshold: 5, metricsStalenessThreshold: 10s}\nflowControl: {defaultRequestTTL: 10s}\n";
    let pool = saturated_pool(9);
    let mut client = serve_director(director_for(config, Arc::clone(&pool))).await;
    let mut waiting = ProxyStream::open(&mut client).await.unwrap();
    waiting.send_request(&with_objective("batch")).await.unwrap();
    let decision = tokio::spawn(async move { waiting.decision().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!decision.is_finished(), "queued while saturated");
    pool.update(|snapshot| snapshot.upsert(endpoint(9101, 0)));
    let decision = tokio::time::timeout(Duration::from_secs(10), decision).await.unwrap().unwrap();
    let Decision::Routed { destination, .. } = decision else { panic!("{decision:?}") };
    assert_eq!(destination, "127.0.0.1:9101");
}

#[tokio::test]
async fn a_queued_request_leaves_the_queue_when_its_stream_goes_away() {
    // TTL 0: without cancellation the request would hold its place forever.
    let config = "featureGates: [flowControl]\nplugins:\n- type: queue-scorer\nsaturationDetector: {queueDepthThreshold: 5, metricsStalenessThreshold: 10s}\nflowControl: {defaultRequestTTL: 0}\n";
    let pool = saturated_pool(9);
    let director = director_for(config, Arc::clone(&pool));
    let controller = director.admission().and_then(|a| a.controller()).unwrap().clone();
    let mut client = serve_director(director).await;
    let waiting = ProxyStream::open(&mut client).await.unwrap();
    waiting.send_request(&with_objective("batch")).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while controller.queued_requests() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the request never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    drop(waiting); // the proxy resets the stream (client gone, Envoy timeout)
    while controller.queued_requests() != 0 {
        assert!(tokio::time::Instant::now() < deadline, "the reset stream kept its queue place");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Saturation lifting later must not schedule the abandoned request.
    pool.update(|snapshot| snapshot.upsert(endpoint(9101, 0)));
    assert_eq!(controller.queued_requests(), 0);
}

#[tokio::test]
async fn agent_identity_makes_a_session_header_the_fairness_id_unless_one_is_given() {
    let director = director_for(
        "plugins:
- type: agent-identity
  parameters: {additionalSessionHeaders: [x-my-agent-session]}
- type: queue-scorer
- type: max-score-picker
",
        saturated_pool(0),
    );
    let body = br#"{"model":"m","prompt":"hello"}"#;
    let fairness_of = async |headers: &[(&str, &str)]| {
        let mut all = vec![(":path".to_owned(), "/v1/completions".to_owned())];
        all.extend(headers.iter().map(|(name, value)| ((*name).to_owned(), (*value).to_owned())));
        let routed = director.decide(&all, body, None).await.unwrap();
        routed.request.fairness_id.clone()
    };
    assert_eq!(
        fairness_of(&[("x-claude-code-session-id", "claude-1")]).await.as_deref(),
        Some("claude-1")
    );
    assert_eq!(
        fairness_of(&[("session-id", "codex-1"), ("x-my-agent-session", "mine")]).await.as_deref(),
        Some("mine"),
        "configured headers are looked up first"
    );
    assert_eq!(
        fairness_of(&[("session-id", "codex-1"), ("x-llm-d-inference-fairness-id", "tenant")])
            .await
            .as_deref(),
        Some("tenant"),
        "an explicit fairness id wins"
    );
    assert_eq!(fairness_of(&[]).await, None);
}
