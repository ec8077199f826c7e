//! The fake API server against the real kube client and kube-runtime's watcher.

mod fake_api;

use std::collections::BTreeSet;
use std::time::Duration;

use fake_api::FakeApiServer;
use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::watcher::{self, Event, watcher};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(5);

fn pod(namespace: &str, name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": namespace, "labels": labels },
        "spec": { "containers": [{ "name": "server", "image": "vllm" }] },
        "status": { "phase": "Running", "podIP": "10.0.0.1" },
    })
}

/// The next item of `stream`, failing the test after a few seconds.
async fn next<S: Stream + Unpin>(stream: &mut S) -> S::Item {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("an item within the wait")
        .expect("the stream is open")
}

/// The next watcher event that is not an error (errors are followed by a retry).
async fn next_event<S: Stream<Item = Result<Event<Pod>, watcher::Error>> + Unpin>(
    stream: &mut S,
) -> Event<Pod> {
    loop {
        if let Ok(event) = next(stream).await {
            return event;
        }
    }
}

/// Reads a watcher's initial list, from `Init` to `InitDone`, as the set of names.
async fn initial_list<S: Stream<Item = Result<Event<Pod>, watcher::Error>> + Unpin>(
    stream: &mut S,
) -> BTreeSet<String> {
    assert!(matches!(next_event(stream).await, Event::Init));
    let mut names = BTreeSet::new();
    loop {
        match next_event(stream).await {
            Event::InitApply(pod) => {
                names.insert(pod.name_any());
            }
            Event::InitDone => return names,
            other => panic!("unexpected event in the initial list: {other:?}"),
        }
    }
}

fn applied(event: Event<Pod>) -> String {
    match event {
        Event::Apply(pod) => pod.name_any(),
        other => panic!("expected Apply, got {other:?}"),
    }
}

fn deleted(event: Event<Pod>) -> String {
    match event {
        Event::Delete(pod) => pod.name_any(),
        other => panic!("expected Delete, got {other:?}"),
    }
}

fn names(set: &[&str]) -> BTreeSet<String> {
    set.iter().map(|s| s.to_string()).collect()
}

fn count(requests: &[String], predicate: impl Fn(&str) -> bool) -> usize {
    requests.iter().filter(|r| predicate(r)).count()
}

fn is_pod_list(request: &str) -> bool {
    request.starts_with("GET /api/v1/namespaces/default/pods") && !request.contains("watch=")
}

fn is_pod_watch(request: &str) -> bool {
    request.starts_with("GET /api/v1/namespaces/default/pods") && request.contains("watch=true")
}

#[tokio::test]
async fn list_honours_label_and_field_selectors_namespaces_and_pages() {
    let server = FakeApiServer::start().await;
    server.apply("pods", pod("default", "a", json!({ "app": "vllm", "tier": "gpu" })));
    server.apply("pods", pod("default", "b", json!({ "app": "vllm", "tier": "canary" })));
    server.apply("pods", pod("default", "c", json!({ "app": "sglang" })));
    server.apply("pods", pod("other", "d", json!({ "app": "vllm" })));
    let pods: Api<Pod> = Api::default_namespaced(server.client());
    let list_names = |list: kube::core::ObjectList<Pod>| {
        list.items.iter().map(|p| p.name_any()).collect::<BTreeSet<_>>()
    };

    let cases = [
        ("app=vllm", names(&["a", "b"])),
        ("app==vllm,tier!=canary", names(&["a"])),
        ("app in (vllm, sglang),!tier", names(&["c"])),
        ("app notin (vllm)", names(&["c"])),
        ("tier", names(&["a", "b"])),
    ];
    for (selector, expected) in cases {
        let list = pods.list(&ListParams::default().labels(selector)).await.expect("list");
        assert_eq!(list_names(list), expected, "labelSelector {selector}");
    }
    let by_name = pods.list(&ListParams::default().fields("metadata.name=b")).await.expect("list");
    assert_eq!(list_names(by_name), names(&["b"]));

    let everywhere: Api<Pod> = Api::all(server.client());
    let all = everywhere.list(&ListParams::default().labels("app=vllm")).await.expect("list");
    assert_eq!(list_names(all), names(&["a", "b", "d"]));

    // Pages of two: the first page carries a continue token, the last one none.
    let first = pods.list(&ListParams::default().limit(2)).await.expect("list");
    let token = first.metadata.continue_.clone().expect("a continue token");
    assert_eq!(list_names(first), names(&["a", "b"]));
    let second =
        pods.list(&ListParams::default().limit(2).continue_token(&token)).await.expect("list");
    assert!(second.metadata.continue_.as_deref().unwrap_or("").is_empty());
    assert_eq!(list_names(second), names(&["c"]));
}

#[tokio::test]
async fn watcher_lists_then_streams_changes() {
    let server = FakeApiServer::start().await;
    server.apply("pods", pod("default", "a", json!({ "app": "vllm" })));
    server.apply("pods", pod("default", "b", json!({ "app": "vllm" })));
    server.apply("pods", pod("default", "x", json!({ "app": "other" })));
    let pods: Api<Pod> = Api::default_namespaced(server.client());
    let mut events = watcher(pods, watcher::Config::default().labels("app=vllm")).boxed();

    assert_eq!(initial_list(&mut events).await, names(&["a", "b"]));
    server.apply("pods", pod("default", "c", json!({ "app": "vllm" })));
    assert_eq!(applied(next_event(&mut events).await), "c");
    server.apply("pods", pod("default", "a", json!({ "app": "vllm", "ready": "true" })));
    assert_eq!(applied(next_event(&mut events).await), "a");
    assert!(server.delete("v1", "pods", "default", "b"));
    assert_eq!(deleted(next_event(&mut events).await), "b");

    // Relabelling moves a pod out of the selection and back in.
    server.apply("pods", pod("default", "c", json!({ "app": "other" })));
    assert_eq!(deleted(next_event(&mut events).await), "c");
    server.apply("pods", pod("default", "x", json!({ "app": "vllm" })));
    assert_eq!(applied(next_event(&mut events).await), "x");

    let requests = server.requests();
    assert_eq!(count(&requests, is_pod_list), 1, "{requests:#?}");
    let list = requests.iter().find(|r| is_pod_list(r)).expect("a list");
    assert!(list.contains("limit=500") && list.contains("labelSelector=app%3Dvllm"), "{list}");
}

#[tokio::test]
async fn watcher_pages_a_cluster_wide_initial_list() {
    let server = FakeApiServer::start().await;
    server.apply("pods", pod("default", "a", json!({})));
    server.apply("pods", pod("other", "b", json!({})));
    server.apply("pods", pod("other", "c", json!({})));
    let pods: Api<Pod> = Api::all(server.client());
    let mut events = watcher(pods, watcher::Config::default().page_size(1)).boxed();
    assert_eq!(initial_list(&mut events).await, names(&["a", "b", "c"]));
    server.apply("pods", pod("third", "d", json!({})));
    assert_eq!(applied(next_event(&mut events).await), "d");

    let requests = server.requests();
    let lists: Vec<&String> = requests
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch="))
        .collect();
    assert_eq!(lists.len(), 3, "{requests:#?}");
    assert!(lists[1..].iter().all(|r| r.contains("continue=")), "{lists:#?}");
}

#[tokio::test]
async fn watcher_resumes_after_disconnect_without_relisting() {
    let server = FakeApiServer::start().await;
    server.apply("pods", pod("default", "a", json!({})));
    let pods: Api<Pod> = Api::default_namespaced(server.client());
    let mut events = watcher(pods, watcher::Config::default()).boxed();
    assert_eq!(initial_list(&mut events).await, names(&["a"]));

    server.disconnect_watches();
    server.apply("pods", pod("default", "b", json!({})));
    assert_eq!(applied(next_event(&mut events).await), "b");
    server.disconnect_watches();
    assert!(server.delete("v1", "pods", "default", "a"));
    assert_eq!(deleted(next_event(&mut events).await), "a");

    let requests = server.requests();
    assert_eq!(count(&requests, is_pod_list), 1, "{requests:#?}");
    assert!(count(&requests, is_pod_watch) >= 2, "{requests:#?}");
}

#[tokio::test]
async fn watcher_relists_after_compaction() {
    let server = FakeApiServer::start().await;
    server.apply("pods", pod("default", "a", json!({})));
    server.apply("pods", pod("default", "b", json!({})));
    let pods: Api<Pod> = Api::default_namespaced(server.client());
    let mut events = watcher(pods, watcher::Config::default()).boxed();
    assert_eq!(initial_list(&mut events).await, names(&["a", "b"]));

    server.compact();
    server.disconnect_watches();
    server.apply("pods", pod("default", "c", json!({})));
    assert!(server.delete("v1", "pods", "default", "a"));

    // The resumed watch is too old: the watcher reports the 410 and relists.
    match tokio::time::timeout(WAIT, events.next()).await {
        Ok(Some(Err(watcher::Error::WatchError(status)))) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
        }
        other => panic!("expected a 410 watch error, got {other:?}"),
    }
    assert_eq!(initial_list(&mut events).await, names(&["b", "c"]));
    let requests = server.requests();
    assert_eq!(count(&requests, is_pod_list), 2, "{requests:#?}");

    server.apply("pods", pod("default", "d", json!({})));
    assert_eq!(applied(next_event(&mut events).await), "d");
}

#[tokio::test]
async fn streaming_list_watcher_needs_no_list() {
    let server = FakeApiServer::start().await;
    server.apply("pods", pod("default", "a", json!({})));
    let pods: Api<Pod> = Api::default_namespaced(server.client());
    let mut events = watcher(pods, watcher::Config::default().streaming_lists()).boxed();
    assert_eq!(initial_list(&mut events).await, names(&["a"]));
    server.apply("pods", pod("default", "b", json!({})));
    assert_eq!(applied(next_event(&mut events).await), "b");

    let requests = server.requests();
    assert_eq!(count(&requests, is_pod_list), 0, "{requests:#?}");
    assert!(requests[0].contains("sendInitialEvents=true"), "{requests:#?}");
}

#[tokio::test]
async fn raw_watch_sends_bookmarks_and_expiry() {
    let server = FakeApiServer::start().await;
    server.set_bookmark_interval(Duration::from_millis(50));
    let rv = server.apply("pods", pod("default", "a", json!({})));
    let pods: Api<Pod> = Api::default_namespaced(server.client());

    let mut stream = pods.watch(&WatchParams::default(), "0").await.expect("watch").boxed();
    match next(&mut stream).await.expect("an event") {
        WatchEvent::Added(pod) => assert_eq!(pod.resource_version().as_deref(), Some(rv.as_str())),
        other => panic!("expected Added, got {other:?}"),
    }
    match next(&mut stream).await.expect("an event") {
        WatchEvent::Bookmark(bookmark) => {
            assert_eq!(bookmark.metadata.resource_version, rv);
            assert_eq!(bookmark.types.kind, "Pod");
        }
        other => panic!("expected a bookmark, got {other:?}"),
    }

    server.compact();
    let mut stream = pods.watch(&WatchParams::default(), &rv).await.expect("watch").boxed();
    match next(&mut stream).await.expect("an event") {
        WatchEvent::Error(status) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected a 410 error event, got {other:?}"),
    }
    assert!(tokio::time::timeout(WAIT, stream.next()).await.expect("the stream ends").is_none());
}

#[tokio::test]
async fn lease_optimistic_concurrency() {
    let server = FakeApiServer::start().await;
    let leases: Api<Lease> = Api::default_namespaced(server.client());
    let api_error = |result: Result<Lease, kube::Error>| match result {
        Err(kube::Error::Api(status)) => (status.code, status.reason),
        other => panic!("expected an API error, got {other:?}"),
    };

    let missing = leases.get("epp").await;
    assert!(
        matches!(missing, Err(kube::Error::Api(ref s)) if s.code == 404 && s.reason == "NotFound")
    );
    let mut lease: Lease = serde_json::from_value(json!({
        "metadata": { "name": "epp" },
        "spec": { "holderIdentity": "a", "leaseDurationSeconds": 15 },
    }))
    .expect("a lease");
    let created = leases.create(&PostParams::default(), &lease).await.expect("create");
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    assert_eq!(
        api_error(leases.create(&PostParams::default(), &lease).await),
        (409, "AlreadyExists".into())
    );

    let mut current = leases.get("epp").await.expect("get");
    assert_eq!(current.resource_version(), created.resource_version());
    current.spec.as_mut().expect("a spec").holder_identity = Some("b".into());
    let replaced = leases.replace("epp", &PostParams::default(), &current).await.expect("replace");
    assert_ne!(replaced.resource_version(), created.resource_version());

    // A writer still holding the first version loses, by PUT and by patch.
    lease.metadata.resource_version = created.resource_version();
    lease.spec.as_mut().expect("a spec").holder_identity = Some("c".into());
    assert_eq!(
        api_error(leases.replace("epp", &PostParams::default(), &lease).await),
        (409, "Conflict".into())
    );
    let stale = json!({ "metadata": { "resourceVersion": created.resource_version() }, "spec": { "holderIdentity": "c" } });
    let patch = leases.patch("epp", &PatchParams::default(), &Patch::Merge(&stale)).await;
    assert_eq!(api_error(patch), (409, "Conflict".into()));
    let stored = server.get("coordination.k8s.io/v1", "leases", "default", "epp").expect("stored");
    assert_eq!(stored["spec"]["holderIdentity"], "b");

    let fresh = json!({ "spec": { "holderIdentity": "c", "leaseDurationSeconds": null } });
    let patched = leases
        .patch("epp", &PatchParams::default(), &Patch::Strategic(&fresh))
        .await
        .expect("patch");
    let spec = patched.spec.expect("a spec");
    assert_eq!((spec.holder_identity.as_deref(), spec.lease_duration_seconds), (Some("c"), None));

    let apply = leases.patch("epp", &PatchParams::apply("epp"), &Patch::Apply(&fresh)).await;
    assert_eq!(api_error(apply).0, 415);
    leases.delete("epp", &DeleteParams::default()).await.expect("delete");
    assert!(server.get("coordination.k8s.io/v1", "leases", "default", "epp").is_none());
    assert_eq!(api_error(leases.get("epp").await), (404, "NotFound".into()));
}

#[tokio::test]
async fn dynamic_custom_resource() {
    let server = FakeApiServer::start().await;
    let gvk = GroupVersionKind::gvk("inference.networking.k8s.io", "v1", "InferencePool");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "inferencepools");
    let pools: Api<DynamicObject> = Api::default_namespaced_with(server.client(), &resource);

    // An empty list still names its kind and version.
    let empty = pools.list(&ListParams::default()).await.expect("list");
    assert!(empty.items.is_empty());
    assert_eq!(empty.types.kind, "InferencePoolList");

    let pool = DynamicObject::new("pool", &resource).data(json!({
        "spec": { "selector": { "matchLabels": { "app": "vllm" } }, "targetPorts": [{ "number": 8000 }] },
    }));
    pools.create(&PostParams::default(), &pool).await.expect("create");
    let patch = json!({ "spec": { "targetPorts": [{ "number": 9000 }] } });
    pools.patch("pool", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch");
    let list = pools.list(&ListParams::default()).await.expect("list");
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].data["spec"]["targetPorts"][0]["number"], 9000);
    assert_eq!(list.items[0].data["spec"]["selector"]["matchLabels"]["app"], "vllm");

    let requests = server.requests();
    let path = "/apis/inference.networking.k8s.io/v1/namespaces/default/inferencepools";
    assert!(requests.iter().all(|r| r.contains(path)), "{requests:#?}");
}
