//! What the layer adds per request beyond the decision: the inner service alone, the
//! director's decision alone, and both through the layer (`poll_ready` then `call`), on the
//! same request and pool; then the layer in front of a director with the flow-control gate on
//! and a capped queue (admission and `poll_ready` both ask the flow controller).

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::{BodyExt, Full};
use scheduler_core::{
    Director, DirectorOptions, Endpoint, EndpointMetrics, EndpointState, PoolSnapshot, SharedPool,
};
use tower_adapter::EndpointPickerLayer;
use tower_adapter::testing::ServiceFn;
use tower_layer::Layer;
use tower_service::Service;

const BODY: &[u8] = br#"{"model":"llama","messages":[{"role":"user","content":"Summarise the attached meeting notes in three bullet points."}]}"#;

fn pool() -> SharedPool {
    let now = Instant::now();
    SharedPool::new(PoolSnapshot::new((0..100u16).map(|i| {
        EndpointState::new(Endpoint::new(([10, 0, 0, (i % 250) as u8], 8000 + i).into()))
            .with_metrics(EndpointMetrics {
                waiting_queue: u32::from(i % 7),
                kv_usage: f64::from(i % 10) / 10.0,
                updated_at: Some(now),
                ..EndpointMetrics::default()
            })
    })))
}

fn director() -> Arc<Director> {
    let scheduler = Arc::new(scorers::default_scheduler().expect("default scheduler"));
    Arc::new(Director::new(scheduler, Arc::new(pool()), DirectorOptions::default()))
}

/// The GIE default profile behind flow control: gate on, a queue capped at 1,000 requests,
/// and a concurrency detector (the bench's metrics are never refreshed, so the utilization
/// detector would soon call them stale and queue every request).
fn director_with_flow_control() -> Arc<Director> {
    let yaml = scheduler_core::DEFAULT_CONFIG_YAML.replacen(
        "plugins:\n",
        "featureGates: [flowControl]\nflowControl: {maxRequests: 1000}\n\
         saturationDetector: {pluginRef: concurrency-detector}\nplugins:\n\
         - type: concurrency-detector\n  parameters: {maxConcurrency: 64}\n",
        1,
    );
    let config = scheduler_core::EndpointPickerConfig::from_yaml(&yaml).expect("bench config");
    let objectives =
        scheduler_core::flow::ObjectiveResolver::new([], Arc::default()).expect("no objectives");
    let director = Director::from_config(
        &config,
        &scorers::builtin_registry(),
        Arc::new(pool()),
        DirectorOptions::default(),
        objectives,
    );
    Arc::new(director.expect("bench director"))
}

/// `poll_ready` then `call`, as a tower caller must.
async fn ready_and_call<S>(service: &mut S, request: http::Request<Full<Bytes>>) -> S::Response
where
    S: Service<http::Request<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    std::future::poll_fn(|cx| service.poll_ready(cx)).await.expect("ready");
    service.call(request).await.expect("infallible")
}

fn layer_overhead(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let director = director();
    let inner = ServiceFn(|request: http::Request<Full<Bytes>>| async move {
        let body = request.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        Ok::<_, Infallible>(http::Response::new(Full::new(body)))
    });
    let request = || {
        http::Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(BODY)))
            .expect("request")
    };
    let mut group = c.benchmark_group("tower_layer");
    group.bench_function("inner_service_alone", |b| {
        let mut inner = inner;
        b.iter(|| runtime.block_on(async { black_box(inner.call(request()).await) }))
    });
    group.bench_function("decision_alone", |b| {
        let headers = vec![(":path".to_owned(), "/v1/chat/completions".to_owned())];
        b.iter(|| {
            runtime.block_on(async { black_box(director.decide(&headers, BODY, None).await) })
        })
    });
    for (name, director) in [
        ("through_the_layer", Arc::clone(&director)),
        ("through_the_layer_with_flow_control", director_with_flow_control()),
    ] {
        group.bench_function(name, |b| {
            let mut service = EndpointPickerLayer::new(Arc::clone(&director)).layer(inner);
            b.iter(|| {
                runtime.block_on(async {
                    let response = ready_and_call(&mut service, request()).await;
                    black_box(response.into_body().collect().await.map(|c| c.to_bytes()))
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, layer_overhead);
criterion_main!(benches);
