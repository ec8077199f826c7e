//! Discovery against a fake API server that speaks the real list/watch protocol: pods come
//! and go, get ready and unready, change IP; the pool's selector and ports change; the pool
//! is deleted and recreated; watches break and history is compacted (410 Gone, relist).

mod fake_api;

use std::time::Duration;

use fake_api::FakeApiServer;
use k8s_discovery::{
    DiscoveredPool, Discovery, DiscoveryConfig, POOL_GROUP_V1, POOL_GROUP_V1ALPHA2, PoolSource,
    parse_selector,
};
use serde_json::{Value, json};
use tokio::sync::watch;

const NAMESPACE: &str = "serving";
const POOL_V1: &str = "inference.networking.k8s.io/v1";

fn pod(name: &str, ip: &str, ready: bool, app: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": app, "llm-d.ai/role": "decode"}},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    })
}

fn pool(app: &str, ports: &[u16]) -> Value {
    let ports: Vec<Value> = ports.iter().map(|port| json!({"number": port})).collect();
    json!({
        "apiVersion": POOL_V1, "kind": "InferencePool",
        "metadata": {"name": "chat", "namespace": NAMESPACE},
        "spec": {"selector": {"matchLabels": {"app": app}}, "targetPorts": ports,
                 "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}}
    })
}

fn start(
    server: &FakeApiServer,
    source: PoolSource,
) -> (Discovery, watch::Receiver<DiscoveredPool>) {
    let config = DiscoveryConfig { namespace: NAMESPACE.to_owned(), source };
    let discovery = Discovery::start(server.client(), config).unwrap();
    let updates = discovery.subscribe();
    (discovery, updates)
}

fn chat_pool() -> PoolSource {
    PoolSource::InferencePool { name: "chat".to_owned(), group: POOL_GROUP_V1.to_owned() }
}

/// Waits (up to 10 s) for a snapshot whose endpoints, as `ip:port` sorted, are `expected`.
async fn wait_for(
    updates: &mut watch::Receiver<DiscoveredPool>,
    expected: &[&str],
) -> DiscoveredPool {
    let wanted: Vec<String> = expected.iter().map(|s| (*s).to_owned()).collect();
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            {
                let pool = updates.borrow_and_update();
                if pool.synced && addresses(&pool) == wanted {
                    return pool.clone();
                }
            }
            updates.changed().await.expect("discovery stopped");
        }
    })
    .await;
    match seen {
        Ok(pool) => pool,
        Err(_) => panic!("expected {wanted:?}, last seen {:?}", addresses(&updates.borrow())),
    }
}

fn addresses(pool: &DiscoveredPool) -> Vec<String> {
    let mut addresses: Vec<String> = pool
        .endpoints
        .iter()
        .map(|endpoint| format!("{}:{}", endpoint.address, endpoint.port))
        .collect();
    addresses.sort();
    addresses
}

#[tokio::test]
async fn ready_pods_of_the_pool_are_its_endpoints() {
    let server = FakeApiServer::start().await;
    server.apply("inferencepools", pool("vllm", &[8000]));
    server.apply("pods", pod("vllm-0", "10.0.0.1", true, "vllm"));
    server.apply("pods", pod("vllm-1", "10.0.0.2", false, "vllm"));
    server.apply("pods", pod("other-0", "10.0.0.9", true, "sglang"));
    let (_discovery, mut updates) = start(&server, chat_pool());
    let pool = wait_for(&mut updates, &["10.0.0.1:8000"]).await;
    assert!(pool.ready());
    let endpoint = &pool.endpoints[0];
    assert_eq!(endpoint.pod, "vllm-0");
    assert_eq!(endpoint.labels.get("llm-d.ai/role").map(String::as_str), Some("decode"));
    assert_eq!(pool.endpoint_name(endpoint), "vllm-0");

    // Becoming ready, unready, terminating; changing IP; going away.
    server.apply("pods", pod("vllm-1", "10.0.0.2", true, "vllm"));
    wait_for(&mut updates, &["10.0.0.1:8000", "10.0.0.2:8000"]).await;
    server.apply("pods", pod("vllm-0", "10.0.0.1", false, "vllm"));
    wait_for(&mut updates, &["10.0.0.2:8000"]).await;
    server.apply("pods", pod("vllm-0", "10.0.0.3", true, "vllm"));
    wait_for(&mut updates, &["10.0.0.2:8000", "10.0.0.3:8000"]).await;
    let mut terminating = pod("vllm-1", "10.0.0.2", true, "vllm");
    terminating["metadata"]["deletionTimestamp"] = json!("2026-12-03T00:00:00Z");
    server.apply("pods", terminating);
    wait_for(&mut updates, &["10.0.0.3:8000"]).await;
    assert!(server.delete("v1", "pods", NAMESPACE, "vllm-0"));
    let pool = wait_for(&mut updates, &[]).await;
    assert!(
        pool.ready(),
        "a pool without ready pods still exists: ready, routing fails per request"
    );
}

#[tokio::test]
async fn selector_and_target_port_changes_apply_live() {
    let server = FakeApiServer::start().await;
    server.apply("inferencepools", pool("vllm", &[8000]));
    server.apply("pods", pod("vllm-0", "10.0.0.1", true, "vllm"));
    server.apply("pods", pod("sglang-0", "10.0.0.2", true, "sglang"));
    let (_discovery, mut updates) = start(&server, chat_pool());
    wait_for(&mut updates, &["10.0.0.1:8000"]).await;

    server.apply("inferencepools", pool("sglang", &[8000]));
    wait_for(&mut updates, &["10.0.0.2:8000"]).await;

    // Two data-parallel ranks per pod: one endpoint per port, named by rank.
    server.apply("inferencepools", pool("sglang", &[8000, 8001]));
    let ranked = wait_for(&mut updates, &["10.0.0.2:8000", "10.0.0.2:8001"]).await;
    let names: Vec<String> = ranked.endpoints.iter().map(|e| ranked.endpoint_name(e)).collect();
    assert_eq!(names, ["sglang-0-rank-0", "sglang-0-rank-1"]);
    server.apply("inferencepools", pool("sglang", &[8001]));
    wait_for(&mut updates, &["10.0.0.2:8001"]).await;
}

#[tokio::test]
async fn a_deleted_pool_has_no_endpoints_and_is_not_ready_until_recreated() {
    let server = FakeApiServer::start().await;
    server.apply("pods", pod("vllm-0", "10.0.0.1", true, "vllm"));
    let (_discovery, mut updates) = start(&server, chat_pool());
    // Listed, but no pool yet: synced, not ready.
    let pool_missing = wait_for(&mut updates, &[]).await;
    assert!(!pool_missing.ready());

    server.apply("inferencepools", pool("vllm", &[8000]));
    assert!(wait_for(&mut updates, &["10.0.0.1:8000"]).await.ready());
    assert!(server.delete(POOL_V1, "inferencepools", NAMESPACE, "chat"));
    assert!(!wait_for(&mut updates, &[]).await.ready());
    server.apply("inferencepools", pool("vllm", &[8000]));
    assert!(wait_for(&mut updates, &["10.0.0.1:8000"]).await.ready());
}

#[tokio::test]
async fn a_broken_watch_resumes_and_a_compacted_history_relists() {
    let server = FakeApiServer::start().await;
    server.apply("inferencepools", pool("vllm", &[8000]));
    server.apply("pods", pod("vllm-0", "10.0.0.1", true, "vllm"));
    server.apply("pods", pod("vllm-1", "10.0.0.2", true, "vllm"));
    let (_discovery, mut updates) = start(&server, chat_pool());
    wait_for(&mut updates, &["10.0.0.1:8000", "10.0.0.2:8000"]).await;

    server.disconnect_watches();
    server.apply("pods", pod("vllm-2", "10.0.0.3", true, "vllm"));
    wait_for(&mut updates, &["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]).await;

    // Changes made while no watch is open, then history forgotten: the resumed watch gets
    // 410 Gone and the watcher lists again; the deletion it never saw as an event is applied.
    let lists_before = pod_lists(&server);
    server.compact();
    server.disconnect_watches();
    assert!(server.delete("v1", "pods", NAMESPACE, "vllm-0"));
    server.apply("pods", pod("vllm-3", "10.0.0.4", true, "vllm"));
    server.compact();
    wait_for(&mut updates, &["10.0.0.2:8000", "10.0.0.3:8000", "10.0.0.4:8000"]).await;
    assert!(
        pod_lists(&server) > lists_before,
        "the pods were listed again: {:?}",
        server.requests()
    );
}

/// How many times the pods were listed (not watched).
fn pod_lists(server: &FakeApiServer) -> usize {
    server
        .requests()
        .iter()
        .filter(|request| {
            request.starts_with("GET /api/v1/namespaces/serving/pods")
                && !request.contains("watch=true")
        })
        .count()
}

#[tokio::test]
async fn the_v1alpha2_pool_shape_is_read() {
    let server = FakeApiServer::start().await;
    server.apply(
        "inferencepools",
        json!({
            "apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferencePool",
            "metadata": {"name": "chat", "namespace": NAMESPACE},
            "spec": {"selector": {"app": "vllm"}, "targetPortNumber": 8000, "extensionRef": {"name": "epp"}}
        }),
    );
    server.apply("pods", pod("vllm-0", "10.0.0.1", true, "vllm"));
    let source = PoolSource::InferencePool {
        name: "chat".to_owned(),
        group: POOL_GROUP_V1ALPHA2.to_owned(),
    };
    let (_discovery, mut updates) = start(&server, source);
    wait_for(&mut updates, &["10.0.0.1:8000"]).await;
}

#[tokio::test]
async fn selector_mode_needs_no_pool() {
    let server = FakeApiServer::start().await;
    server.apply("pods", pod("vllm-0", "10.0.0.1", true, "vllm"));
    server.apply("pods", pod("sglang-0", "10.0.0.2", true, "sglang"));
    let source = PoolSource::Selector {
        selector: parse_selector("app in (vllm),llm-d.ai/role=decode").unwrap(),
        target_ports: vec![8000, 8002],
    };
    let (_discovery, mut updates) = start(&server, source);
    assert!(wait_for(&mut updates, &["10.0.0.1:8000", "10.0.0.1:8002"]).await.ready());
    server.apply("pods", pod("vllm-1", "10.0.0.3", true, "vllm"));
    wait_for(&mut updates, &["10.0.0.1:8000", "10.0.0.1:8002", "10.0.0.3:8000", "10.0.0.3:8002"])
        .await;
}

#[tokio::test]
async fn an_unknown_pool_group_is_refused() {
    let server = FakeApiServer::start().await;
    let source =
        PoolSource::InferencePool { name: "chat".to_owned(), group: "example.com".to_owned() };
    let config = DiscoveryConfig { namespace: NAMESPACE.to_owned(), source };
    let error = Discovery::start(server.client(), config).unwrap_err().to_string();
    assert!(error.contains("example.com"), "{error}");
}
