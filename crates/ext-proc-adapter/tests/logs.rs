//! The `epp` binary's logs as a cluster reads them, from a real process whose stderr is a
//! pipe: no colour codes, `--log-format json` lines that each parse as one object, and a routed
//! request's line carrying the request id sent and the endpoint picked.

mod support;

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use demo::ext_proc_client::{Decision, ProxyRequest, ProxyStream};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use support::tempdir;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const ESC: u8 = 0x1b;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running `epp` whose stderr is read to its end on a thread (so the pipe never fills).
struct Epp {
    child: std::process::Child,
    stderr: Option<JoinHandle<Vec<u8>>>,
    grpc: SocketAddr,
    health: SocketAddr,
    /// The one endpoint of its pool.
    endpoint: SocketAddr,
}

impl Epp {
    fn start(log_flags: &[&str]) -> Self {
        let dir = tempdir();
        // Nothing listens on the endpoint: its metrics stay stale, and the default fail-open
        // policy routes to it anyway.
        let endpoint = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let pool = dir.join("pool.yaml");
        std::fs::write(&pool, format!("- {{address: 127.0.0.1, port: {}}}\n", endpoint.port()))
            .unwrap();
        let (grpc, health, metrics) = (free_port(), free_port(), free_port());
        let mut child = Command::new(env!("CARGO_BIN_EXE_epp"))
            .arg("--endpoints-file")
            .arg(&pool)
            .args(["--secure-serving=false", "--bind-address", "127.0.0.1"])
            .args(["--grpc-port", &grpc.to_string(), "--grpc-health-port", &health.to_string()])
            .args(["--metrics-port", &metrics.to_string(), "--refresh-metrics-interval", "1s"])
            .args(log_flags)
            // Colour must be off because stderr is a pipe, not because of NO_COLOR.
            .env_remove("NO_COLOR")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut pipe = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        });
        Self {
            child,
            stderr: Some(stderr),
            grpc: SocketAddr::from(([127, 0, 0, 1], grpc)),
            health: SocketAddr::from(([127, 0, 0, 1], health)),
            endpoint,
        }
    }

    async fn ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while health(self.health, "readiness").await != Some(ServingStatus::Serving) {
            assert!(Instant::now() < deadline, "epp never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Routes one request carrying `request_id` and returns the destination.
    async fn route(&self, request_id: &str) -> String {
        let mut client =
            ExternalProcessorClient::<Channel>::connect(format!("http://{}", self.grpc))
                .await
                .unwrap();
        let mut stream = ProxyStream::open(&mut client).await.unwrap();
        stream
            .send_request(&ProxyRequest {
                headers: vec![(":path", "/v1/completions"), ("x-request-id", request_id)],
                body: br#"{"model":"m","prompt":"hello"}"#,
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

    /// Stops the process and returns everything it wrote on stderr.
    fn stop(mut self) -> Vec<u8> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr.take().map(|reader| reader.join().unwrap()).unwrap_or_default()
    }
}

impl Drop for Epp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn health(address: SocketAddr, service: &str) -> Option<ServingStatus> {
    let channel = Channel::from_shared(format!("http://{address}")).ok()?.connect().await.ok()?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest { service: service.to_owned() })
        .await
        .ok()?
        .into_inner();
    ServingStatus::try_from(response.status).ok()
}

#[tokio::test]
async fn text_logs_on_a_pipe_carry_no_colour_codes() {
    let epp = Epp::start(&["-vv"]);
    epp.ready().await;
    let destination = epp.route("text-1").await;
    assert_eq!(destination, epp.endpoint.to_string());
    let endpoint = epp.endpoint;
    let stderr = epp.stop();
    assert!(!stderr.contains(&ESC), "colour codes on a pipe: {}", String::from_utf8_lossy(&stderr));
    let text = String::from_utf8(stderr).unwrap();
    let routed = text.lines().find(|line| line.contains("request routed"));
    let routed = routed.unwrap_or_else(|| panic!("no routed line in {text}"));
    // Text logs quote string fields, so a client cannot forge a line break or a field.
    assert!(routed.contains(r#"request_id="text-1""#), "{routed}");
    assert!(routed.contains(&format!("endpoint={endpoint}")), "{routed}");
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_the_request_id_and_endpoint() {
    let epp = Epp::start(&["--log-format", "json", "-vv"]);
    epp.ready().await;
    // Quotes, a line break and an escape byte from the client stay inside the JSON string.
    let sent = "req-7 \"quoted\"\n\u{1b}[31mred";
    assert_eq!(epp.route(sent).await, epp.endpoint.to_string());
    let long = "x".repeat(300);
    epp.route(&long).await;
    let endpoint = epp.endpoint.to_string();
    let stderr = epp.stop();
    assert!(!stderr.contains(&ESC), "{}", String::from_utf8_lossy(&stderr));
    let text = String::from_utf8(stderr).unwrap();
    let mut lines = Vec::new();
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
        let object = value.as_object().unwrap_or_else(|| panic!("not an object: {line}"));
        for key in ["timestamp", "level", "target"] {
            assert!(object.contains_key(key), "no {key}: {line}");
        }
        lines.push(value);
    }
    let routed = |id: &str| {
        lines.iter().find(|line| line["message"] == "request routed" && line["request_id"] == id)
    };
    let line = routed(sent).unwrap_or_else(|| panic!("no routed line for {sent:?} in {text}"));
    assert_eq!(line["endpoint"], endpoint.as_str(), "{line}");
    assert_eq!(line["level"], "DEBUG", "{line}");
    assert_eq!(line["model"], "m", "{line}");
    // A long id is cut to 128 characters.
    let line = routed(&long[..128]).unwrap_or_else(|| panic!("no bounded id in {text}"));
    assert_eq!(line["endpoint"], endpoint.as_str(), "{line}");
}

#[test]
fn an_unknown_log_format_is_refused_naming_the_flag() {
    let output = Command::new(env!("CARGO_BIN_EXE_epp"))
        .args(["--log-format", "xml", "--grpc-port", "0", "--grpc-health-port", "0"])
        .args(["--metrics-port", "0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--log-format") && stderr.contains("xml"), "{stderr}");
    assert!(!output.stderr.contains(&ESC), "{stderr}");
}
