//! Helpers the server tests share: a fresh scratch directory, a plain HTTP GET, endpoints
//! with fresh metrics, and a loopback server for a director with a client connected to it.

// Each test file uses the helpers it needs.
#![allow(dead_code)]

pub(crate) mod process;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use ext_proc_adapter::server::{self, RunningServer, ServerConfig};
use scheduler_core::{Director, Endpoint, EndpointMetrics, EndpointState};
use tonic::transport::Channel;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A new empty directory under the system's temporary directory, unique to this call.
pub(crate) fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "epp-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The whole HTTP/1.1 response (status line, headers, body) to `GET path`.
pub(crate) async fn http_get(address: SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// An endpoint at 127.0.0.1:`port` with `waiting_queue` requests waiting, scraped just now.
pub(crate) fn fresh_endpoint(port: u16, waiting_queue: u32) -> EndpointState {
    EndpointState::new(Endpoint::new(([127, 0, 0, 1], port).into())).with_metrics(EndpointMetrics {
        waiting_queue,
        updated_at: Some(std::time::Instant::now()),
        ..EndpointMetrics::default()
    })
}

/// `director` served on loopback (metrics never stale), and a client connected to it.
pub(crate) async fn serve(director: Director) -> (RunningServer, ExternalProcessorClient<Channel>) {
    let config = ServerConfig { staleness_threshold: None, ..ServerConfig::loopback("pool") };
    let running = server::start_with_director(Arc::new(director), config).await.unwrap();
    let client =
        ExternalProcessorClient::connect(format!("http://{}", running.grpc_address)).await.unwrap();
    (running, client)
}
