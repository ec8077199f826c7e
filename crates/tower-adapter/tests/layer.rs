//! Requests through the layer: the pick reaches the inner service; rejections carry their
//! status and JSON body; in-flight counts return to zero after success, error and drop.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use scheduler_core::{
    Director, DirectorOptions, Endpoint, EndpointMetrics, EndpointState, PoolSnapshot, Scheduler,
    SchedulerProfile, SharedPool, SingleProfileHandler,
};
use scorers::{ActiveRequestScorer, MaxScorePicker, QueueScorer};
use tower_adapter::testing::ServiceFn;
use tower_adapter::{EndpointPickerLayer, PickedEndpoint};
use tower_layer::Layer;
use tower_service::Service;

fn setup(options: DirectorOptions, endpoints: usize) -> (Arc<Director>, Arc<ActiveRequestScorer>) {
    let in_flight = Arc::new(ActiveRequestScorer::new());
    let profile = SchedulerProfile::new(
        "default",
        "max-score-picker",
        Arc::new(MaxScorePicker::new(2.try_into().unwrap())),
    )
    .with_scorer("queue-scorer", 1.0, Arc::new(QueueScorer::default()));
    let scheduler = Scheduler::new(vec![profile], Arc::new(SingleProfileHandler))
        .with_pre_request(in_flight.clone())
        .with_response_complete(in_flight.clone());
    let now = Instant::now();
    // Queues 5, 0, 9: 8001 first, then 8000.
    let queues = [5, 0, 9];
    let pool = SharedPool::new(PoolSnapshot::new((0..endpoints).map(|i| {
        EndpointState::new(Endpoint::new(([127, 0, 0, 1], 8000 + i as u16).into())).with_metrics(
            EndpointMetrics {
                waiting_queue: queues[i % 3],
                updated_at: Some(now),
                ..Default::default()
            },
        )
    })));
    (Arc::new(Director::new(Arc::new(scheduler), Arc::new(pool), options)), in_flight)
}

const BODY: &[u8] = br#"{"model":"llama","prompt":"Hello"}"#;

fn request(body: &'static [u8]) -> http::Request<Full<Bytes>> {
    http::Request::post("/v1/completions").body(Full::new(Bytes::from_static(body))).unwrap()
}

/// What the inner service saw: the pick, the destination header and the body.
type Seen = Arc<std::sync::OnceLock<(Option<PickedEndpoint>, Option<String>, Vec<u8>)>>;

fn recording_inner(
    seen: Seen,
) -> impl Service<
    http::Request<Full<Bytes>>,
    Response = http::Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    ServiceFn(move |request: http::Request<Full<Bytes>>| {
        let seen = Arc::clone(&seen);
        async move {
            let picked = request.extensions().get::<PickedEndpoint>().cloned();
            let header = request
                .headers()
                .get("x-gateway-destination-endpoint")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = request.into_body().collect().await.unwrap().to_bytes().to_vec();
            let _ = seen.set((picked, header, body));
            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    })
}

#[tokio::test]
async fn the_inner_service_gets_the_pick_and_the_body() {
    let (director, in_flight) = setup(DirectorOptions::default(), 3);
    let seen: Seen = Arc::default();
    let mut service = EndpointPickerLayer::new(director)
        .with_max_fallback_endpoints(1)
        .layer(recording_inner(Arc::clone(&seen)));
    let response = service.call(request(BODY)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(in_flight.total_in_flight(), 1, "in flight until the body is read");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "ok");
    assert_eq!(in_flight.total_in_flight(), 0);
    let (picked, header, forwarded) = seen.get().unwrap().clone();
    let picked = picked.unwrap();
    assert_eq!(picked.primary, "127.0.0.1:8001".parse().unwrap());
    assert_eq!(picked.fallbacks, vec!["127.0.0.1:8000".parse().unwrap()]);
    assert_eq!(header.as_deref(), Some("127.0.0.1:8001"), "the header names the primary alone");
    assert_eq!(forwarded, BODY);
}

async fn rejection(
    director: Arc<Director>,
    request: http::Request<Full<Bytes>>,
) -> (u16, serde_json::Value) {
    let seen: Seen = Arc::default();
    let mut service = EndpointPickerLayer::new(director).layer(recording_inner(Arc::clone(&seen)));
    let response = service.call(request).await.unwrap();
    let status = response.status().as_u16();
    assert_eq!(response.headers()["content-type"], "application/json");
    // Only dropped requests (429, 503) say why; a client's mistake is not a drop.
    let reason = response.headers().get("x-llm-d-request-dropped-reason");
    match status {
        503 => assert_eq!(reason.unwrap(), "rejected-no-endpoints"),
        429 => assert_eq!(reason.unwrap(), "rejected-saturated"),
        _ => assert!(reason.is_none(), "{status}: {reason:?}"),
    }
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(seen.get().is_none(), "a rejected request never reaches the inner service");
    (status, serde_json::from_slice(&body).unwrap())
}

#[tokio::test]
async fn rejections_carry_status_and_json() {
    let (director, _) = setup(DirectorOptions::default(), 3);
    let (status, body) = rejection(Arc::clone(&director), request(b"{nope")).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_request")));
    let (empty, _) = setup(DirectorOptions::default(), 0);
    let (status, body) = rejection(empty, request(BODY)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("no_ready_endpoint")));
    let (small, _) = setup(DirectorOptions { max_body_bytes: 8, ..DirectorOptions::default() }, 3);
    let (status, body) = rejection(small, request(BODY)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (413, Some("body_too_large")));
}

#[tokio::test]
async fn in_flight_counts_return_to_zero_after_error_and_drop() {
    let (director, in_flight) = setup(DirectorOptions::default(), 3);
    // The inner service fails: the request completes at once.
    let failing = ServiceFn(|_: http::Request<Full<Bytes>>| async {
        Err::<http::Response<Full<Bytes>>, _>("upstream down")
    });
    let mut service = EndpointPickerLayer::new(Arc::clone(&director)).layer(failing);
    assert!(service.call(request(BODY)).await.is_err());
    assert_eq!(in_flight.total_in_flight(), 0);

    // The response body errors midway.
    let erroring = ServiceFn(|_: http::Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(http::Response::new(FailsMidway { sent: false }))
    });
    let mut service = EndpointPickerLayer::new(Arc::clone(&director)).layer(erroring);
    let response = service.call(request(BODY)).await.unwrap();
    assert_eq!(in_flight.total_in_flight(), 1);
    assert!(response.into_body().collect().await.is_err());
    assert_eq!(in_flight.total_in_flight(), 0);

    // The client goes away before reading the body.
    let seen: Seen = Arc::default();
    let mut service = EndpointPickerLayer::new(director).layer(recording_inner(seen));
    let response = service.call(request(BODY)).await.unwrap();
    assert_eq!(in_flight.total_in_flight(), 1);
    drop(response);
    assert_eq!(in_flight.total_in_flight(), 0);
}

/// A body that yields one chunk, then fails (an upstream reset).
struct FailsMidway {
    sent: bool,
}

impl http_body::Body for FailsMidway {
    type Data = Bytes;
    type Error = &'static str;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.sent {
            return std::task::Poll::Ready(Some(Err("reset")));
        }
        self.sent = true;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(b"partial")))))
    }
}

/// Counts wake-ups, to see that a task parked by `poll_ready` is woken.
#[derive(Default)]
struct CountingWaker(std::sync::atomic::AtomicUsize);

impl std::task::Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test]
async fn poll_ready_waits_while_the_flow_control_queue_is_full() {
    // One endpoint taking one request at a time, and a queue of one place.
    let yaml = "\
featureGates: [flowControl]
plugins:
- type: concurrency-detector
  parameters: {maxConcurrency: 1}
- type: queue-scorer
- type: max-score-picker
saturationDetector: {pluginRef: concurrency-detector}
flowControl: {maxRequests: 1, defaultRequestTTL: 30s}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
";
    let config = scheduler_core::EndpointPickerConfig::from_yaml(yaml).unwrap();
    let pool = SharedPool::new(PoolSnapshot::new([EndpointState::new(Endpoint::new(
        ([127, 0, 0, 1], 8000).into(),
    ))
    .with_metrics(EndpointMetrics { updated_at: Some(Instant::now()), ..Default::default() })]));
    let director = Director::from_config(
        &config,
        &scorers::builtin_registry(),
        Arc::new(pool),
        DirectorOptions::default(),
        scheduler_core::flow::ObjectiveResolver::new([], Arc::default()).unwrap(),
    )
    .unwrap();
    let seen: Seen = Arc::default();
    let mut service =
        EndpointPickerLayer::new(Arc::new(director)).layer(recording_inner(Arc::clone(&seen)));
    let counter = Arc::new(CountingWaker::default());
    let waker = std::task::Waker::from(Arc::clone(&counter));
    let mut cx = std::task::Context::from_waker(&waker);

    assert!(
        Service::<http::Request<Full<Bytes>>>::poll_ready(&mut service, &mut cx).is_ready(),
        "an empty queue has room"
    );
    let first = service.call(request(BODY)).await.unwrap();
    assert_eq!(first.status(), 200, "admitted at once: the endpoint was idle");

    // The endpoint is busy, so the second request takes the queue's only place.
    let second = tokio::spawn(service.call(request(BODY)));
    // The spawned call runs on another worker thread: wait for it to queue, boundedly.
    let mut became_pending = false;
    for _ in 0..100_000 {
        if Service::<http::Request<Full<Bytes>>>::poll_ready(&mut service, &mut cx).is_pending() {
            became_pending = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(became_pending, "poll_ready stays pending while the queue is full");
    assert_eq!(counter.0.load(std::sync::atomic::Ordering::SeqCst), 0);

    // The first response ends: the queued request is dispatched and the waiter woken.
    drop(first);
    let second = second.await.unwrap().unwrap();
    assert_eq!(second.status(), 200);
    assert!(counter.0.load(std::sync::atomic::Ordering::SeqCst) >= 1, "the waiter was woken");
    assert!(Service::<http::Request<Full<Bytes>>>::poll_ready(&mut service, &mut cx).is_ready());
}

#[tokio::test]
async fn fallbacks_are_opt_in() {
    let (director, _) = setup(DirectorOptions::default(), 3);
    let seen: Seen = Arc::default();
    let mut service = EndpointPickerLayer::new(director).layer(recording_inner(Arc::clone(&seen)));
    let response = service.call(request(BODY)).await.unwrap();
    drop(response);
    let picked = seen.get().unwrap().0.clone().unwrap();
    assert_eq!(picked.primary, "127.0.0.1:8001".parse().unwrap());
    assert!(picked.fallbacks.is_empty(), "the picker ranked two, the layer was asked for none");
}

#[tokio::test]
async fn a_model_rewrite_reaches_the_inner_service_in_body_and_headers() {
    let (director, _) = setup(DirectorOptions::default(), 3);
    let rewrites = scheduler_core::rewrite::ModelRewrites::from_yaml(
        "kind: InferenceModelRewrite\nmetadata: {name: alias}\nspec:\n  rules:\n  - matches: [{model: {value: llama}}]\n    targets: [{modelRewrite: llama-3.1-8b-instruct}]\n",
    )
    .unwrap();
    director.set_model_rewrites(Some(Arc::new(rewrites)));
    let headers: Seen3 = Arc::default();
    let inner = {
        let headers = Arc::clone(&headers);
        ServiceFn(move |request: http::Request<Full<Bytes>>| {
            let headers = Arc::clone(&headers);
            async move {
                let header = |name: &str| {
                    request.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
                };
                let seen = (header("content-length"), header("x-llm-d-model-name-rewrite"));
                let body = request.into_body().collect().await.unwrap().to_bytes().to_vec();
                let _ = headers.set((seen.0, seen.1, body));
                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
            }
        })
    };
    let mut service = EndpointPickerLayer::new(director).layer(inner);
    let response = service.call(request(BODY)).await.unwrap();
    assert_eq!(response.status(), 200);
    let (length, rewrite, body) = headers.get().unwrap().clone();
    let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(value, serde_json::json!({"model": "llama-3.1-8b-instruct", "prompt": "Hello"}));
    assert_eq!(length, Some(body.len().to_string()));
    assert_eq!(rewrite.as_deref(), Some("llama-3.1-8b-instruct"));
}

/// Content length, rewrite header and body the inner service saw.
type Seen3 = Arc<std::sync::OnceLock<(Option<String>, Option<String>, Vec<u8>)>>;

#[tokio::test]
async fn a_request_without_a_body_reaches_a_random_endpoint() {
    let (director, in_flight) = setup(DirectorOptions::default(), 3);
    let mut primaries = std::collections::BTreeSet::new();
    for _ in 0..60 {
        let seen: Seen = Arc::default();
        let mut service = EndpointPickerLayer::new(Arc::clone(&director))
            .layer(recording_inner(Arc::clone(&seen)));
        let request = http::Request::get("/v1/models").body(Full::new(Bytes::new())).unwrap();
        let response = service.call(request).await.unwrap();
        assert_eq!(response.status(), 200);
        primaries.insert(seen.get().unwrap().0.clone().unwrap().primary);
    }
    assert_eq!(primaries.len(), 3, "drawn at random, not by queue: {primaries:?}");
    assert_eq!(in_flight.total_in_flight(), 0, "not scheduled, so never counted in flight");
}

#[tokio::test]
async fn plugins_write_their_headers_on_the_response() {
    let config = scheduler_core::EndpointPickerConfig::from_yaml(
        "plugins:\n- type: queue-scorer\n- type: session-affinity-filter\n",
    )
    .unwrap();
    let mut registry = scorers::builtin_registry();
    registry.allow_experimental_plugins(true);
    let scheduler = config.build(&registry).unwrap();
    let pool = SharedPool::new(PoolSnapshot::new([EndpointState::new(
        Endpoint::new(([127, 0, 0, 1], 8000).into()).with_name("pod-a"),
    )
    .with_metrics(EndpointMetrics { updated_at: Some(Instant::now()), ..Default::default() })]));
    let director =
        Arc::new(Director::new(Arc::new(scheduler), Arc::new(pool), DirectorOptions::default()));
    let mut service = EndpointPickerLayer::new(director).layer(recording_inner(Arc::default()));
    let response = service.call(request(BODY)).await.unwrap();
    let token = response.headers().get("x-session-token").and_then(|v| v.to_str().ok());
    assert_eq!(token, Some(scorers::session_affinity::session_token("pod-a").as_str()));
}
