//! InferenceObjectives and InferenceModelRewrites naming the pool, watched on a fake API
//! server: added, changed, re-pointed at another pool, removed; the installed group is
//! found by API discovery, llm-d.ai first.

mod fake_api;

use std::time::Duration;

use fake_api::FakeApiServer;
use k8s_discovery::{POOL_GROUP_V1, PoolObjectKind, PoolObjectWatch, PoolObjects};
use serde_json::{Value, json};
use tokio::sync::watch;

fn objective(api_version: &str, name: &str, priority: i64, pool: &str) -> Value {
    json!({
        "apiVersion": api_version, "kind": "InferenceObjective",
        "metadata": {"name": name, "namespace": "serving"},
        "spec": {"priority": priority, "poolRef": {"name": pool}}
    })
}

/// Waits for the watched objects to be, as `name=priority`, exactly `expected`.
async fn wait_for(updates: &mut watch::Receiver<PoolObjects>, expected: &[&str]) {
    let render = |objects: &PoolObjects| -> Vec<String> {
        objects
            .objects
            .iter()
            .map(|object| {
                format!(
                    "{}={}",
                    object["metadata"]["name"].as_str().unwrap(),
                    object["spec"]["priority"]
                )
            })
            .collect()
    };
    let result = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if render(&updates.borrow_and_update()) == expected {
                return;
            }
            updates.changed().await.unwrap();
        }
    })
    .await;
    assert!(result.is_ok(), "expected {expected:?}, saw {:?}", render(&updates.borrow()));
}

/// Watches the objectives naming the pool `chat` of namespace `serving`; the receiver
/// starts marked changed, so the first wait reads the state at once.
async fn watch_objectives(
    server: &FakeApiServer,
) -> (PoolObjectWatch, watch::Receiver<PoolObjects>) {
    let watch = PoolObjectWatch::start(
        server.client(),
        "serving",
        "chat",
        POOL_GROUP_V1,
        PoolObjectKind::Objective,
    )
    .await;
    let mut updates = watch.subscribe();
    updates.mark_changed();
    (watch, updates)
}

#[tokio::test]
async fn objectives_of_the_pool_follow_the_api() {
    let server = FakeApiServer::start().await;
    server.install_api("llm-d.ai/v1alpha2", &["inferenceobjectives", "inferencemodelrewrites"]);
    const V: &str = "llm-d.ai/v1alpha2";
    server.apply("inferenceobjectives", objective(V, "premium", 10, "chat"));
    server.apply("inferenceobjectives", objective(V, "elsewhere", 5, "other"));
    let (watch, mut updates) = watch_objectives(&server).await;
    wait_for(&mut updates, &["premium=10"]).await;

    server.apply("inferenceobjectives", objective(V, "batch", -1, "chat"));
    wait_for(&mut updates, &["batch=-1", "premium=10"]).await;
    server.apply("inferenceobjectives", objective(V, "premium", 20, "chat"));
    wait_for(&mut updates, &["batch=-1", "premium=20"]).await;
    server.apply("inferenceobjectives", objective(V, "batch", -1, "other"));
    wait_for(&mut updates, &["premium=20"]).await;
    server.apply("inferenceobjectives", objective(V, "elsewhere", 5, "chat"));
    wait_for(&mut updates, &["elsewhere=5", "premium=20"]).await;
    assert!(server.delete(V, "inferenceobjectives", "serving", "premium"));
    wait_for(&mut updates, &["elsewhere=5"]).await;
    let document = watch.current().to_list_document();
    assert!(document.contains("\"kind\":\"List\"") && document.contains("elsewhere"), "{document}");
}

#[tokio::test]
async fn the_deprecated_group_is_used_when_only_it_is_installed() {
    let server = FakeApiServer::start().await;
    const LEGACY: &str = "inference.networking.x-k8s.io/v1alpha2";
    server.install_api(LEGACY, &["inferenceobjectives"]);
    server.apply("inferenceobjectives", objective(LEGACY, "premium", 10, "chat"));
    let (_watch, mut updates) = watch_objectives(&server).await;
    wait_for(&mut updates, &["premium=10"]).await;
}

#[tokio::test]
async fn a_kind_that_is_not_installed_is_empty_and_synced() {
    let server = FakeApiServer::start().await;
    let watch = PoolObjectWatch::start(
        server.client(),
        "serving",
        "chat",
        POOL_GROUP_V1,
        PoolObjectKind::ModelRewrite,
    )
    .await;
    let current = watch.current();
    assert!(current.synced && current.objects.is_empty());
    assert!(
        !server.requests().iter().any(|request| request.contains("inferencemodelrewrites")),
        "no list or watch of a kind the cluster lacks: {:?}",
        server.requests()
    );
}
