//! A reverse proxy built from the layer: hyper serves, `EndpointPickerLayer` picks, and a tiny
//! forwarding service sends each request to the picked model server. Three simulated vLLM
//! servers run on loopback, their metrics scraped by the collector; the example sends a few
//! chat requests through the proxy and prints where each went.
//!
//! Run with `cargo run -p epp-tower-adapter --example reverse_proxy`.

use std::error::Error;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use demo::http_client;
use demo::{ModelServerConfig, RunningModelServer};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use metrics_model::collector::{CollectorConfig, MetricsCollector};
use metrics_model::mapping::Engine;
use scheduler_core::flow::{FlowMetrics, ObjectiveResolver};
use scheduler_core::{Director, DirectorOptions, Endpoint, EndpointPickerConfig, SharedPool};
use tower_adapter::testing::ServiceFn;
use tower_adapter::{EndpointPickerLayer, PickedEndpoint};
use tower_layer::Layer;

/// Forwards a request to the endpoint the layer picked.
async fn forward(
    request: http::Request<Full<Bytes>>,
) -> Result<http::Response<Incoming>, Box<dyn Error + Send + Sync>> {
    let picked = request.extensions().get::<PickedEndpoint>().cloned().ok_or("no pick")?;
    Ok(http_client::send(picked.primary, request).await?)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn Error>> {
    // The model servers.
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(RunningModelServer::start(ModelServerConfig::default()).await?);
    }

    // The picker: GIE's default profile over a pool the collector keeps fresh.
    let pool = Arc::new(SharedPool::default());
    let collector = MetricsCollector::start(Arc::clone(&pool), CollectorConfig::default())?;
    for server in &servers {
        collector.upsert_endpoint(Endpoint::new(server.address), Engine::Vllm);
    }
    let director = Director::from_config(
        &EndpointPickerConfig::gie_default(),
        &scorers::builtin_registry(),
        Arc::clone(&pool),
        DirectorOptions::default(),
        ObjectiveResolver::new(Vec::new(), Arc::new(FlowMetrics::new()))?,
    )?;
    let service = EndpointPickerLayer::new(Arc::new(director)).layer(ServiceFn(forward));

    // The proxy.
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let proxy_address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder.serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await; // a first scrape

    // Clients: two conversations sharing a long system prompt, then a malformed request.
    let system = "You are a meticulous assistant for a logistics company. ".repeat(40);
    for turn in 0..6 {
        let body = serde_json::json!({
            "model": "llama-3-8b",
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": format!("Question {turn}: where is parcel {turn}?")}
            ]
        });
        let response =
            http_client::post(proxy_address, "/v1/chat/completions", body.to_string().into_bytes())
                .await?;
        let status = response.status();
        let text = response.into_body().collect().await?.to_bytes();
        println!("request {turn}: {status}, {} bytes of completion", text.len());
    }
    let bad =
        http_client::post(proxy_address, "/v1/chat/completions", b"{\"messages\": []}".to_vec())
            .await?;
    let status = bad.status();
    let body = bad.into_body().collect().await?.to_bytes();
    println!("malformed request: {status} {}", String::from_utf8_lossy(&body));
    for (index, server) in servers.iter().enumerate() {
        println!("server {index} ({}): served {}", server.address, server.server.stats().served);
    }
    Ok(())
}
