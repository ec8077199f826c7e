//! Helpers of the tests that run the real `epp` binary as a process: a child killed on drop,
//! free loopback ports, a metrics page read over plain TCP, a pool file of stand-in servers,
//! `epp` itself started on them, and one request routed through it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use demo::RunningModelServer;
use demo::ext_proc_client::{Decision, ProxyRequest, ProxyStream};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use tonic::transport::Channel;

/// A child process, killed and reaped when dropped.
pub(crate) struct Killed(pub(crate) Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port free at the time of the call.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The first sample of `name` whose labels contain `labels` (any sample when empty) on the
/// metrics page at `port`, if the page answers and has it.
pub(crate) fn metric(port: u16, name: &str, labels: &str) -> Option<f64> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut page = String::new();
    stream.read_to_string(&mut page).ok()?;
    let line = page.lines().find(|line| {
        line.strip_prefix(name).is_some_and(|rest| {
            (labels.is_empty() && rest.starts_with(' '))
                || (rest.starts_with('{') && rest.contains(labels))
        })
    })?;
    line.rsplit(' ').next()?.parse().ok()
}

/// An endpoints file listing `servers`, written into `dir`.
pub(crate) fn write_pool(dir: &Path, servers: &[RunningModelServer]) -> PathBuf {
    let pool = dir.join("pool.yaml");
    let entries: String = servers
        .iter()
        .map(|server| format!("- {{address: 127.0.0.1, port: {}}}\n", server.address.port()))
        .collect();
    std::fs::write(&pool, entries).unwrap();
    pool
}

/// An `epp` process with `config` over the endpoints of `pool`, scraping every 50 ms: the
/// process, its ext-proc address and its metrics port.
pub(crate) fn spawn_epp(config: &Path, pool: &Path) -> (Killed, SocketAddr, u16) {
    let (grpc, metrics) = (free_port(), free_port());
    let process = Killed(
        Command::new(env!("CARGO_BIN_EXE_epp"))
            .arg("--config-file")
            .arg(config)
            .arg("--endpoints-file")
            .arg(pool)
            .args(["--secure-serving=false", "--bind-address", "127.0.0.1"])
            .args(["--grpc-port", &grpc.to_string()])
            .args(["--grpc-health-port", &free_port().to_string()])
            .args(["--metrics-port", &metrics.to_string()])
            .args(["--refresh-metrics-interval", "50ms"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    (process, SocketAddr::from(([127, 0, 0, 1], grpc)), metrics)
}

/// The endpoint the ext-proc service at `grpc` picks for a JSON `body` sent to `path`. The
/// stream is dropped once the decision is in, so the request ends there and leaves no
/// in-flight count behind.
pub(crate) async fn route(grpc: SocketAddr, path: &str, body: &str) -> String {
    let mut client =
        ExternalProcessorClient::<Channel>::connect(format!("http://{grpc}")).await.unwrap();
    let mut stream = ProxyStream::open(&mut client).await.unwrap();
    stream
        .send_request(&ProxyRequest {
            headers: vec![(":path", path), ("content-type", "application/json")],
            body: body.as_bytes(),
            chunk_bytes: 0,
            subset: None,
        })
        .await
        .unwrap();
    match stream.decision().await.unwrap() {
        Decision::Routed { destination, .. } => destination,
        other => panic!("not routed: {other:?}"),
    }
}
