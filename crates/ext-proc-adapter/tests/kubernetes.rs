//! The real `epp` binary, built with the `kubernetes` feature, against a fake API server that
//! speaks the real list/watch protocol: it serves only once its InferencePool is listed,
//! routes to the pool's ready pods as they change, applies InferenceObjectives live, and two
//! replicas with leader election serve one at a time, handing over when the leader stops.

#![cfg(feature = "kubernetes")]

#[path = "../../k8s-discovery/tests/fake_api/mod.rs"]
mod fake_api;
mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use demo::ext_proc_client::{Decision, ProxyRequest, ProxyStream};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use fake_api::FakeApiServer;
use serde_json::{Value, json};
use support::{http_get, tempdir};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const NAMESPACE: &str = "serving";

struct Epp {
    child: Child,
    grpc: u16,
    health: u16,
    metrics: u16,
}

impl Drop for Epp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Epp {
    /// Asks the process to stop as Kubernetes does (SIGTERM).
    fn terminate(&self) {
        let status =
            Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    async fn readiness(&self) -> Option<ServingStatus> {
        let channel =
            tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", self.health))
                .unwrap()
                .connect()
                .await
                .ok()?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest { service: "readiness".to_owned() })
            .await
            .ok()?
            .into_inner();
        ServingStatus::try_from(response.status).ok()
    }

    async fn route(&self) -> String {
        let mut client =
            ExternalProcessorClient::connect(format!("http://127.0.0.1:{}", self.grpc))
                .await
                .unwrap();
        let mut stream = ProxyStream::open(&mut client).await.unwrap();
        let request = ProxyRequest {
            headers: vec![(":path", "/v1/completions"), ("x-gateway-inference-objective", "batch")],
            body: br#"{"model":"m","prompt":"hello"}"#,
            chunk_bytes: 0,
            subset: None,
        };
        stream.send_request(&request).await.unwrap();
        match stream.decision().await.unwrap() {
            Decision::Routed { destination, .. } => destination,
            other => panic!("not routed: {other:?}"),
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A kubeconfig naming the fake server, as `kubectl` would read it.
fn kubeconfig(dir: &Path, server: &FakeApiServer) -> PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster: {{server: '{}'}}
users:
- name: fake
  user: {{}}
contexts:
- name: fake
  context: {{cluster: fake, user: fake, namespace: {NAMESPACE}}}
current-context: fake
",
        server.url()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn spawn_epp(kubeconfig: &Path, extra: &[&str]) -> Epp {
    let (grpc, health, metrics) = (free_port(), free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_epp"))
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .args(["--pool-name", "chat", "--pool-namespace", NAMESPACE])
        .args(["--secure-serving=false", "--bind-address", "127.0.0.1", "--drain-timeout", "1s"])
        .args(["--grpc-port", &grpc.to_string()])
        .args(["--grpc-health-port", &health.to_string()])
        .args(["--metrics-port", &metrics.to_string()])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Epp { child, grpc, health, metrics }
}

fn pool(ports: &[u16]) -> Value {
    let ports: Vec<Value> = ports.iter().map(|port| json!({"number": port})).collect();
    json!({
        "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
        "metadata": {"name": "chat", "namespace": NAMESPACE},
        "spec": {"selector": {"matchLabels": {"app": "vllm"}}, "targetPorts": ports,
                 "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}}
    })
}

fn pod(name: &str, ip: &str, ready: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": "vllm"}},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    })
}

async fn eventually<F: std::future::Future<Output = bool>>(
    limit: Duration,
    mut check: impl FnMut() -> F,
) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check().await
}

#[tokio::test(flavor = "multi_thread")]
async fn epp_serves_the_pools_ready_pods_once_listed() {
    let server = FakeApiServer::start().await;
    server.install_api("llm-d.ai/v1alpha2", &["inferenceobjectives", "inferencemodelrewrites"]);
    let dir = tempdir();
    let epp = spawn_epp(&kubeconfig(&dir, &server), &[]);
    // Up, but no InferencePool yet: not ready.
    assert!(
        eventually(Duration::from_secs(20), || async { epp.readiness().await.is_some() }).await,
        "epp did not start"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(epp.readiness().await, Some(ServingStatus::NotServing));

    server.apply("pods", pod("vllm-0", "127.0.0.2", true));
    server.apply("pods", pod("vllm-1", "127.0.0.3", false));
    server.apply("inferencepools", pool(&[8000]));
    assert!(
        eventually(Duration::from_secs(10), || async {
            epp.readiness().await == Some(ServingStatus::Serving)
        })
        .await
    );
    assert_eq!(epp.route().await, "127.0.0.2:8000");

    // The ready pod goes unready and the other becomes ready: routing follows.
    server.apply("pods", pod("vllm-0", "127.0.0.2", false));
    server.apply("pods", pod("vllm-1", "127.0.0.3", true));
    assert!(
        eventually(Duration::from_secs(10), || async { epp.route().await == "127.0.0.3:8000" })
            .await
    );

    // `batch` names no objective yet: each such request is counted as unknown. Once an
    // InferenceObjective of that name points at the pool, it no longer is.
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], epp.metrics));
    let unknown = || async {
        let page = http_get(metrics, "/metrics").await;
        let line = page
            .lines()
            .find(|line| line.starts_with("inference_extension_flow_control_unknown_objective"));
        line.and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok()).unwrap_or(0.0)
    };
    let before = unknown().await;
    epp.route().await;
    assert_eq!(unknown().await, before + 1.0, "an objective nobody declared is counted");
    server.apply(
        "inferenceobjectives",
        json!({"apiVersion": "llm-d.ai/v1alpha2", "kind": "InferenceObjective",
               "metadata": {"name": "batch", "namespace": NAMESPACE},
               "spec": {"priority": -1, "poolRef": {"name": "chat"}}}),
    );
    let objective_applied = eventually(Duration::from_secs(10), || async {
        let before = unknown().await;
        epp.route().await;
        unknown().await == before
    })
    .await;
    assert!(objective_applied, "{}", http_get(metrics, "/metrics").await);

    // An InferenceModelRewrite sends `m` to `m-canary`; changed to `m-stable`; removed.
    let rewrite = |target: &str| {
        json!({"apiVersion": "llm-d.ai/v1alpha2", "kind": "InferenceModelRewrite",
               "metadata": {"name": "canary", "namespace": NAMESPACE},
               "spec": {"poolRef": {"name": "chat"},
                        "rules": [{"matches": [{"model": {"value": "m"}}], "targets": [{"modelRewrite": target}]}]}})
    };
    let routed_as = |target: &'static str| {
        let epp = &epp;
        move || async move {
            let count = |page: &str| {
                let series = format!(
                    "inference_objective_request_total{{model_name=\"m\",target_model_name=\"{target}\"}}"
                );
                page.lines()
                    .find(|line| line.starts_with(&series))
                    .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            let before = count(&http_get(metrics, "/metrics").await);
            epp.route().await;
            count(&http_get(metrics, "/metrics").await) > before
        }
    };
    server.apply("inferencemodelrewrites", rewrite("m-canary"));
    assert!(eventually(Duration::from_secs(10), routed_as("m-canary")).await, "rewrite added");
    server.apply("inferencemodelrewrites", rewrite("m-stable"));
    assert!(eventually(Duration::from_secs(10), routed_as("m-stable")).await, "rewrite changed");
    assert!(server.delete("llm-d.ai/v1alpha2", "inferencemodelrewrites", NAMESPACE, "canary"));
    assert!(eventually(Duration::from_secs(10), routed_as("m")).await, "rewrite removed");

    assert!(server.delete("inference.networking.k8s.io/v1", "inferencepools", NAMESPACE, "chat"));
    assert!(
        eventually(Duration::from_secs(10), || async {
            epp.readiness().await == Some(ServingStatus::NotServing)
        })
        .await
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_with_leader_election_serve_one_at_a_time_and_hand_over_on_shutdown() {
    let server = FakeApiServer::start().await;
    server.apply("pods", pod("vllm-0", "127.0.0.2", true));
    server.apply("inferencepools", pool(&[8000]));
    let dir = tempdir();
    let config = kubeconfig(&dir, &server);
    let replicas = [
        spawn_epp(&config, &["--ha-enable-leader-election"]),
        spawn_epp(&config, &["--ha-enable-leader-election"]),
    ];
    let serving = || async {
        let mut states = Vec::new();
        for replica in &replicas {
            states.push(replica.readiness().await);
        }
        states
    };
    assert!(
        eventually(Duration::from_secs(20), || async {
            serving().await.iter().filter(|state| **state == Some(ServingStatus::Serving)).count()
                == 1
        })
        .await,
        "{:?}",
        serving().await
    );
    // Both answer health; only the leader is ready, and stays the only one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let states = serving().await;
    assert_eq!(
        states.iter().filter(|state| **state == Some(ServingStatus::Serving)).count(),
        1,
        "{states:?}"
    );
    assert!(states.iter().all(Option::is_some), "{states:?}");
    let leader = states.iter().position(|state| *state == Some(ServingStatus::Serving)).unwrap();
    let follower = &replicas[1 - leader];
    // The follower's state is warm: it routes a request that reaches it anyway.
    assert_eq!(follower.route().await, "127.0.0.2:8000");

    let stopped = Instant::now();
    replicas[leader].terminate();
    assert!(
        eventually(Duration::from_secs(12), || async {
            follower.readiness().await == Some(ServingStatus::Serving)
        })
        .await
    );
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "took over in {:?}: the lease was released, not left to expire (15 s)",
        stopped.elapsed()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
