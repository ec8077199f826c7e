//! What the layer adds per request beyond the decision: the inner service alone, the
//! director's decision alone, and both through the layer, on the same request and pool.

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

fn director() -> Arc<Director> {
    let now = Instant::now();
    let pool = SharedPool::new(PoolSnapshot::new((0..100u16).map(|i| {
        EndpointState::new(Endpoint::new(([10, 0, 0, (i % 250) as u8], 8000 + i).into()))
            .with_metrics(EndpointMetrics {
                waiting_queue: u32::from(i % 7),
                kv_usage: f64::from(i % 10) / 10.0,
                updated_at: Some(now),
                ..EndpointMetrics::default()
            })
    })));
    let scheduler = Arc::new(scorers::default_scheduler().expect("default scheduler"));
    Arc::new(Director::new(scheduler, Arc::new(pool), DirectorOptions::default()))
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
    group.bench_function("through_the_layer", |b| {
        let mut service = EndpointPickerLayer::new(Arc::clone(&director)).layer(inner);
        b.iter(|| {
            runtime.block_on(async {
                let response = service.call(request()).await.expect("infallible");
                black_box(response.into_body().collect().await.map(|c| c.to_bytes()))
            })
        })
    });
    group.finish();
}

criterion_group!(benches, layer_overhead);
criterion_main!(benches);
