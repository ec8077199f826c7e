//! An in-process fake Kubernetes API server for tests, on hyper 1 over plain HTTP.
//!
//! It speaks the REST and list/watch protocol as kube-client 5 and kube-runtime 5's `watcher`
//! use it, for any resource: `/api/v1/...` for the core group and `/apis/{group}/{version}/...`
//! otherwise, namespaced (`/namespaces/{ns}/{plural}[/{name}]`) or not (`/{plural}[/{name}]`:
//! a cluster-scoped object, or a list and watch across all namespaces).
//!
//! - One global `resourceVersion` counter, as etcd's revision: every write bumps it.
//! - List: `labelSelector`, `fieldSelector` (see [`selector`]), `limit` + `continue`. A list
//!   always reads the current state; `resourceVersion`/`resourceVersionMatch` are accepted and
//!   ignored, and later pages of a paginated list read the current state too (no snapshot).
//! - Watch (`watch=true|1`): events after `resourceVersion` from the last [`HISTORY_LIMIT`]
//!   events, then live ones, filtered by the selectors. An object that starts or stops matching
//!   the selector arrives as ADDED or DELETED, as from the API server's watch cache. A
//!   `resourceVersion` of "0" or "" starts with the current state as ADDED events;
//!   `sendInitialEvents=true` (with `resourceVersionMatch=NotOlderThan`, kube's
//!   `InitialListStrategy::StreamingList`) does too and then sends the BOOKMARK annotated
//!   `k8s.io/initial-events-end`. A position older than the retained history gets one ERROR
//!   event carrying a 410 `Expired` Status and the stream ends; that holds for an open watch
//!   too once [`FakeApiServer::compact`] has run, like a watch that fell out of the watch cache.
//!   BOOKMARK events every bookmark interval when `allowWatchBookmarks=true`; the stream ends
//!   after `timeoutSeconds` (default 1800, kube sends 290).
//! - Get, create (POST), replace (PUT) and JSON merge patch (PATCH, with the strategic merge
//!   patch content type read as a merge patch), delete; optimistic concurrency on
//!   `metadata.resourceVersion` for PUT and PATCH. Errors are Status JSON with code and reason.
//!
//! Use it from an integration test with `mod fake_api;`:
//!
//! ```ignore
//! let server = FakeApiServer::start().await;
//! server.apply("pods", json!({ "apiVersion": "v1", "kind": "Pod",
//!     "metadata": { "name": "a", "namespace": "default", "labels": { "app": "vllm" } } }));
//! let pods: Api<Pod> = Api::default_namespaced(server.client());
//! let events = kube::runtime::watcher(pods, watcher::Config::default());
//! server.disconnect_watches(); // the watcher resumes from its last resourceVersion
//! server.compact(); // the watcher gets a 410 and relists
//! // Once the watcher has caught up, `server.requests()` shows two lists (GETs without watch=).
//! ```
//!
//! Not supported: server-side apply and JSON patch (415), subresources (`/status`, 404),
//! delete collection, `dryRun`, generation, finalizers, graceful deletion, admission, schemas,
//! and list at an exact old `resourceVersion`.

// Each test crate that includes this module uses a different part of it.
#![allow(dead_code)]

mod selector;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use selector::Selector;

/// How many events the server keeps for watches that resume.
pub(crate) const HISTORY_LIMIT: usize = 1000;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// An object's identity: (apiVersion, plural, namespace, name); the namespace is "" for
/// cluster-scoped objects.
type Key = (String, String, String, String);

/// One change, as a watch replays it.
struct Event {
    resource_version: u64,
    kind: &'static str,
    key: Key,
    object: Value,
    /// The object before a MODIFIED change, to turn it into ADDED or DELETED for selectors.
    previous: Option<Value>,
}

struct Store {
    resource_version: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Event>,
    /// The oldest position a watch can resume from.
    oldest_resumable: u64,
    /// Kind by plural, registered or learnt from stored objects.
    kinds: HashMap<String, String>,
    /// Bumped by `disconnect_watches`: watches opened under an older value end.
    disconnects: u64,
    requests: Vec<String>,
    bookmark_interval: Duration,
    uids: u64,
    /// The resources each installed API group version serves (`/apis/{group}/{version}`).
    installed: BTreeMap<String, Vec<String>>,
}

struct Shared {
    store: Mutex<Store>,
    /// Signalled after every change of the store: open watches rescan it.
    changed: watch::Sender<()>,
}

impl Shared {
    fn notify(&self) {
        self.changed.send_replace(());
    }
}

/// A fake API server on 127.0.0.1; dropping it stops accepting and ends open watches.
pub(crate) struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl FakeApiServer {
    /// Binds 127.0.0.1 on a free port and serves in a background task.
    pub(crate) async fn start() -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let kinds = [
            ("pods", "Pod"),
            ("services", "Service"),
            ("configmaps", "ConfigMap"),
            ("namespaces", "Namespace"),
            ("leases", "Lease"),
            ("inferencepools", "InferencePool"),
            ("inferenceobjectives", "InferenceObjective"),
            ("inferencemodelrewrites", "InferenceModelRewrite"),
        ];
        let store = Store {
            resource_version: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            oldest_resumable: 0,
            kinds: kinds.iter().map(|(p, k)| (p.to_string(), k.to_string())).collect(),
            disconnects: 0,
            requests: Vec::new(),
            bookmark_interval: Duration::from_secs(1),
            uids: 0,
            installed: BTreeMap::new(),
        };
        let shared = Arc::new(Shared { store: Mutex::new(store), changed: watch::channel(()).0 });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        FakeApiServer { addr, shared, accept }
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for this server: no auth, plain HTTP, default namespace "default".
    /// Call it inside a Tokio runtime.
    pub(crate) fn client(&self) -> kube::Client {
        let url = self.url().parse().expect("a valid URL");
        kube::Client::try_from(kube::Config::new(url)).expect("a kube client")
    }

    /// Makes API discovery (`GET /apis/{group}/{version}`) list `plurals` for `group_version`,
    /// as a cluster with those CRDs installed does; other group versions answer 404. Requests
    /// on resources work whether installed or not.
    pub(crate) fn install_api(&self, group_version: &str, plurals: &[&str]) {
        let plurals = plurals.iter().map(|plural| (*plural).to_owned()).collect();
        self.shared.store.lock().installed.insert(group_version.to_owned(), plurals);
    }

    /// Names the kind of a plural, for lists and bookmarks before any object of it is stored.
    pub(crate) fn register(&self, plural: &str, kind: &str) {
        self.shared.store.lock().kinds.insert(plural.to_owned(), kind.to_owned());
    }

    /// Creates or replaces `object` (keyed by its apiVersion, `plural`, metadata.namespace,
    /// absent for cluster-scoped objects, and metadata.name) without any check, records an
    /// ADDED or MODIFIED event and returns the new resourceVersion.
    pub(crate) fn apply(&self, plural: &str, object: Value) -> String {
        let text = |v: &Value| v.as_str().map(str::to_owned);
        let api_version = text(&object["apiVersion"]).expect("apply: an object with apiVersion");
        let name = text(&object["metadata"]["name"]).expect("apply: an object with metadata.name");
        let namespace = text(&object["metadata"]["namespace"]).unwrap_or_default();
        let key = (api_version, plural.to_owned(), namespace, name);
        let stored = self.shared.store.lock().write(key, object);
        self.shared.notify();
        resource_version_of(&stored)
    }

    /// Deletes an object, recording a DELETED event; false when it did not exist.
    pub(crate) fn delete(
        &self,
        api_version: &str,
        plural: &str,
        namespace: &str,
        name: &str,
    ) -> bool {
        let key = key(api_version, plural, namespace, name);
        let removed = self.shared.store.lock().remove(&key).is_some();
        self.shared.notify();
        removed
    }

    /// The stored object, if any.
    pub(crate) fn get(
        &self,
        api_version: &str,
        plural: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        self.shared.store.lock().objects.get(&key(api_version, plural, namespace, name)).cloned()
    }

    /// The current global resourceVersion.
    pub(crate) fn resource_version(&self) -> u64 {
        self.shared.store.lock().resource_version
    }

    /// Ends every open watch stream cleanly; clients resume with a new watch.
    pub(crate) fn disconnect_watches(&self) {
        self.shared.store.lock().disconnects += 1;
        self.shared.notify();
    }

    /// Forgets all history, like an etcd compaction (which itself is a write, so the
    /// resourceVersion moves on): every watch positioned before now, open or resuming, gets a
    /// 410 Expired ERROR event and must relist.
    pub(crate) fn compact(&self) {
        let mut store = self.shared.store.lock();
        store.resource_version += 1;
        store.history.clear();
        store.oldest_resumable = store.resource_version;
        drop(store);
        self.shared.notify();
    }

    /// Every request served so far, as "METHOD path?query" with the query as sent.
    pub(crate) fn requests(&self) -> Vec<String> {
        self.shared.store.lock().requests.clone()
    }

    /// The period of BOOKMARK events on watches that allow them (default 1 s); applies to
    /// watches opened afterwards.
    pub(crate) fn set_bookmark_interval(&self, interval: Duration) {
        self.shared.store.lock().bookmark_interval = interval;
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.accept.abort();
        self.disconnect_watches();
    }
}

fn key(api_version: &str, plural: &str, namespace: &str, name: &str) -> Key {
    (api_version.to_owned(), plural.to_owned(), namespace.to_owned(), name.to_owned())
}

fn resource_version_of(object: &Value) -> String {
    object["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_owned()
}

/// `object.metadata` as a map, creating what is missing.
fn metadata(object: &mut Value) -> &mut Map<String, Value> {
    if !object.is_object() {
        *object = json!({});
    }
    if !object["metadata"].is_object() {
        object["metadata"] = json!({});
    }
    match &mut object["metadata"] {
        Value::Object(map) => map,
        _ => unreachable!("metadata was made a JSON object above"),
    }
}

impl Store {
    fn kind(&self, plural: &str) -> String {
        self.kinds.get(plural).cloned().unwrap_or_else(|| {
            let singular = plural.strip_suffix('s').unwrap_or(plural);
            let mut chars = singular.chars();
            chars.next().map_or_else(String::new, |c| c.to_uppercase().chain(chars).collect())
        })
    }

    /// Stores `object` under `key` with a new resourceVersion and records the event.
    fn write(&mut self, key: Key, mut object: Value) -> Value {
        self.resource_version += 1;
        let previous = self.objects.get(&key).cloned();
        let meta = metadata(&mut object);
        meta.insert("name".into(), json!(key.3));
        if !key.2.is_empty() {
            meta.insert("namespace".into(), json!(key.2));
        }
        meta.insert("resourceVersion".into(), json!(self.resource_version.to_string()));
        match &previous {
            Some(old) => {
                for field in ["uid", "creationTimestamp"] {
                    meta.insert(field.into(), old["metadata"][field].clone());
                }
            }
            None => {
                self.uids += 1;
                let now = k8s_openapi::jiff::Timestamp::now().as_second();
                let now = k8s_openapi::jiff::Timestamp::from_second(now).expect("a valid time");
                meta.insert(
                    "uid".into(),
                    json!(format!("00000000-0000-4000-8000-{:012x}", self.uids)),
                );
                meta.insert("creationTimestamp".into(), json!(now.to_string()));
            }
        }
        if let Some(kind) = object["kind"].as_str() {
            self.kinds.insert(key.1.clone(), kind.to_owned());
        }
        let kind = if previous.is_some() { "MODIFIED" } else { "ADDED" };
        self.objects.insert(key.clone(), object.clone());
        self.record(kind, key, object.clone(), previous);
        object
    }

    /// Removes an object and records a DELETED event carrying it with a new resourceVersion.
    fn remove(&mut self, key: &Key) -> Option<Value> {
        let mut object = self.objects.remove(key)?;
        self.resource_version += 1;
        let resource_version = self.resource_version.to_string();
        metadata(&mut object).insert("resourceVersion".into(), json!(resource_version));
        self.record("DELETED", key.clone(), object.clone(), None);
        Some(object)
    }

    fn record(&mut self, kind: &'static str, key: Key, object: Value, previous: Option<Value>) {
        self.history.push_back(Event {
            resource_version: self.resource_version,
            kind,
            key,
            object,
            previous,
        });
        if self.history.len() > HISTORY_LIMIT
            && let Some(oldest) = self.history.pop_front()
        {
            self.oldest_resumable = oldest.resource_version;
        }
    }
}

/// Which objects a list or watch selects.
struct Filter {
    api_version: String,
    plural: String,
    namespace: Option<String>,
    selector: Selector,
}

impl Filter {
    fn matches(&self, key: &Key, object: &Value) -> bool {
        key.0 == self.api_version
            && key.1 == self.plural
            && self.namespace.as_ref().is_none_or(|ns| *ns == key.2)
            && self.selector.matches(object)
    }
}

/// A request path, resolved.
struct Target {
    api_version: String,
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
}

impl Target {
    fn parse(path: &str) -> Option<Target> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (api_version, rest) = match segments.as_slice() {
            ["api", version, rest @ ..] => (version.to_string(), rest),
            ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
            _ => return None,
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
            _ => (None, rest),
        };
        let (plural, name) = match rest {
            [plural] => (plural, None),
            [plural, name] => (plural, Some(name.to_string())),
            _ => return None,
        };
        Some(Target { api_version, plural: plural.to_string(), namespace, name })
    }

    fn key(&self, name: &str) -> Key {
        let namespace = self.namespace.as_deref().unwrap_or("");
        key(&self.api_version, &self.plural, namespace, name)
    }

    /// `plural.group`, as the API server names a resource in messages.
    fn resource(&self) -> String {
        match self.api_version.split_once('/') {
            Some((group, _)) => format!("{}.{group}", self.plural),
            None => self.plural.clone(),
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(shared.clone(), request));
            // A client that goes away mid-request is no concern of the tests.
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// API discovery of one group version: its resource list when installed, else 404.
fn discovery(store: &Store, method: &Method, path: &str) -> Option<Response<Body>> {
    let group_version = path.strip_prefix("/apis/")?.trim_end_matches('/');
    if method != Method::GET || group_version.split('/').count() != 2 {
        return None;
    }
    let Some(plurals) = store.installed.get(group_version) else {
        let message = "the server could not find the requested resource";
        return Some(status(StatusCode::NOT_FOUND, "NotFound", message.into()));
    };
    let resources: Vec<Value> = plurals
        .iter()
        .map(|plural| {
            let kind = store.kinds.get(plural).cloned().unwrap_or_default();
            json!({"name": plural, "singularName": "", "namespaced": true, "kind": kind,
                   "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]})
        })
        .collect();
    let list = json!({"kind": "APIResourceList", "apiVersion": "v1",
                      "groupVersion": group_version, "resources": resources});
    Some(json_response(StatusCode::OK, &list))
}

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = request.into_parts();
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    shared.store.lock().requests.push(format!("{} {path_and_query}", parts.method));
    if let Some(response) = discovery(&shared.store.lock(), &parts.method, parts.uri.path()) {
        return Ok(response);
    }
    let Some(target) = Target::parse(parts.uri.path()) else {
        let message = "the server could not find the requested resource";
        return Ok(status(StatusCode::NOT_FOUND, "NotFound", message.into()));
    };
    let query: HashMap<String, String> =
        form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes()).into_owned().collect();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return Ok(status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body".into()));
    };
    let content_type =
        parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let response = match (&parts.method, target.name.as_deref()) {
        (&Method::GET, None) if watch => start_watch(&shared, target, &query),
        (&Method::GET, None) => list(&shared.store.lock(), &target, &query),
        (&Method::GET, Some(name)) => match shared.store.lock().objects.get(&target.key(name)) {
            Some(object) => json_response(StatusCode::OK, object),
            None => not_found(&target, name).into_response(),
        },
        (method, name) => {
            let response =
                write_request(&mut shared.store.lock(), method, &target, name, content_type, &body);
            shared.notify();
            response
        }
    };
    Ok(response)
}

fn list(store: &Store, target: &Target, query: &HashMap<String, String>) -> Response<Body> {
    let filter = match parse_filter(target, query) {
        Ok(filter) => filter,
        Err(failure) => return failure.into_response(),
    };
    let limit = query.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0);
    // A continue token is "<resourceVersion of the first page>:<namespace>/<name of the last item>".
    let token = query.get("continue").filter(|t| !t.is_empty());
    let (resource_version, after) = match token.map(|t| parse_continue(t)) {
        None => (store.resource_version, None),
        Some(Some((rv, ns, name))) => (rv, Some((ns, name))),
        Some(None) => {
            return status(StatusCode::BAD_REQUEST, "BadRequest", "invalid continue token".into());
        }
    };
    let mut items = Vec::new();
    let mut next = None;
    let selected = store.objects.iter().filter(|(key, object)| {
        filter.matches(key, object)
            && after.as_ref().is_none_or(|(ns, name)| (key.2.as_str(), key.3.as_str()) > (ns, name))
    });
    for (key, object) in selected {
        if limit.is_some_and(|l| items.len() == l) {
            // More remain: the token names the last item returned.
            next = items
                .last()
                .map(|(k, _): &(&Key, Value)| format!("{resource_version}:{}/{}", k.2, k.3));
            break;
        }
        items.push((key, object.clone()));
    }
    let mut meta = json!({ "resourceVersion": resource_version.to_string() });
    if let Some(next) = next {
        meta["continue"] = json!(next);
    }
    let list = json!({
        "apiVersion": target.api_version,
        "kind": format!("{}List", store.kind(&target.plural)),
        "metadata": meta,
        "items": items.into_iter().map(|(_, o)| o).collect::<Vec<_>>(),
    });
    json_response(StatusCode::OK, &list)
}

fn parse_continue(token: &str) -> Option<(u64, String, String)> {
    let (rv, rest) = token.split_once(':')?;
    let (ns, name) = rest.split_once('/')?;
    Some((rv.parse().ok()?, ns.to_owned(), name.to_owned()))
}

fn parse_filter(target: &Target, query: &HashMap<String, String>) -> Result<Filter, Failure> {
    let selector = Selector::parse(
        query.get("labelSelector").map(String::as_str),
        query.get("fieldSelector").map(String::as_str),
    )
    .map_err(|message| Failure(StatusCode::BAD_REQUEST, "BadRequest", message))?;
    Ok(Filter {
        api_version: target.api_version.clone(),
        plural: target.plural.clone(),
        namespace: target.namespace.clone(),
        selector,
    })
}

/// POST, PUT, PATCH and DELETE.
fn write_request(
    store: &mut Store,
    method: &Method,
    target: &Target,
    name: Option<&str>,
    content_type: &str,
    body: &[u8],
) -> Response<Body> {
    let parsed = || {
        serde_json::from_slice::<Value>(body).ok().filter(Value::is_object).ok_or_else(|| {
            Failure(StatusCode::BAD_REQUEST, "BadRequest", "the body is not a JSON object".into())
        })
    };
    let result = match (method, name) {
        (&Method::POST, None) => parsed().and_then(|object| create(store, target, object)),
        (&Method::PUT, Some(name)) => {
            parsed().and_then(|object| replace(store, target, name, object))
        }
        (&Method::PATCH, Some(name)) => {
            if !matches!(
                content_type,
                "application/merge-patch+json" | "application/strategic-merge-patch+json"
            ) {
                let message = format!("the patch content type {content_type:?} is not supported");
                return status(StatusCode::UNSUPPORTED_MEDIA_TYPE, "UnsupportedMediaType", message);
            }
            parsed().and_then(|patch| {
                let stored =
                    store.objects.get(&target.key(name)).ok_or_else(|| not_found(target, name))?;
                let mut object = stored.clone();
                merge_patch(&mut object, &patch);
                replace(store, target, name, object)
            })
        }
        (&Method::DELETE, Some(name)) => match store.remove(&target.key(name)) {
            Some(object) => Ok(json_response(StatusCode::OK, &object)),
            None => Err(not_found(target, name)),
        },
        _ => {
            let message = format!("{method} is not supported on {}", target.resource());
            Err(Failure(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", message))
        }
    };
    result.unwrap_or_else(Failure::into_response)
}

fn create(
    store: &mut Store,
    target: &Target,
    mut object: Value,
) -> Result<Response<Body>, Failure> {
    let meta = metadata(&mut object);
    let name = match (meta.get("name"), meta.get("generateName")) {
        (Some(Value::String(name)), _) => name.clone(),
        (_, Some(Value::String(prefix))) => format!("{prefix}{:05x}", store.uids + 1),
        _ => {
            return Err(Failure(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "metadata.name is required".into(),
            ));
        }
    };
    let key = target.key(&name);
    if store.objects.contains_key(&key) {
        let message = format!("{} {name:?} already exists", target.resource());
        return Err(Failure(StatusCode::CONFLICT, "AlreadyExists", message));
    }
    object["apiVersion"] = json!(target.api_version);
    Ok(json_response(StatusCode::CREATED, &store.write(key, object)))
}

/// Replaces a stored object, refusing a stale metadata.resourceVersion (when one is given).
fn replace(
    store: &mut Store,
    target: &Target,
    name: &str,
    object: Value,
) -> Result<Response<Body>, Failure> {
    let key = target.key(name);
    let stored = store.objects.get(&key).ok_or_else(|| not_found(target, name))?;
    let expected = &object["metadata"]["resourceVersion"];
    if expected.is_string() && *expected != stored["metadata"]["resourceVersion"] {
        let message = format!(
            "Operation cannot be fulfilled on {} {name:?}: the object has been modified; \
             please apply your changes to the latest version and try again",
            target.resource()
        );
        return Err(Failure(StatusCode::CONFLICT, "Conflict", message));
    }
    Ok(json_response(StatusCode::OK, &store.write(key, object)))
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(target) = target {
        for (field, value) in patch {
            if value.is_null() {
                target.remove(field);
            } else {
                merge_patch(target.entry(field).or_insert(Value::Null), value);
            }
        }
    }
}

fn not_found(target: &Target, name: &str) -> Failure {
    let message = format!("{} {name:?} not found", target.resource());
    Failure(StatusCode::NOT_FOUND, "NotFound", message)
}

/// A refused request: HTTP code, Status reason and message.
struct Failure(StatusCode, &'static str, String);

impl Failure {
    fn into_response(self) -> Response<Body> {
        status(self.0, self.1, self.2)
    }
}

fn status_object(code: StatusCode, reason: &str, message: String) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

fn status(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    json_response(code, &status_object(code, reason, message))
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("a JSON value serialises");
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *response.status_mut() = code;
    let content_type = header::HeaderValue::from_static("application/json");
    response.headers_mut().insert(header::CONTENT_TYPE, content_type);
    response
}

/// One line of a watch stream.
fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({ "type": kind, "object": object }))
        .expect("a JSON value serialises");
    line.push(b'\n');
    Bytes::from(line)
}

/// Validates a watch request, then streams its events from a task of its own.
fn start_watch(
    shared: &Arc<Shared>,
    target: Target,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let filter = match parse_filter(&target, query) {
        Ok(filter) => filter,
        Err(failure) => return failure.into_response(),
    };
    let position = match query.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(rv) => match rv.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => {
                let message = format!("invalid resource version {rv:?}");
                return status(StatusCode::BAD_REQUEST, "BadRequest", message);
            }
        },
    };
    let send_initial_events = query.get("sendInitialEvents").is_some_and(|v| v == "true");
    if send_initial_events && query.get("resourceVersionMatch").is_none_or(|m| m != "NotOlderThan")
    {
        let message = "sendInitialEvents requires resourceVersionMatch=NotOlderThan".to_owned();
        return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message);
    }
    let options = WatchOptions {
        position,
        send_initial_events,
        bookmarks: query.get("allowWatchBookmarks").is_some_and(|v| v == "true"),
        timeout: Duration::from_secs(
            query.get("timeoutSeconds").and_then(|t| t.parse().ok()).unwrap_or(1800),
        ),
    };
    let (tx, mut rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(run_watch(shared.clone(), filter, options, tx));
    let frames = futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|line| line.map(|l| Ok::<_, Infallible>(Frame::data(l))))
    });
    let mut response = Response::new(BodyExt::boxed_unsync(StreamBody::new(frames)));
    let content_type = header::HeaderValue::from_static("application/json");
    response.headers_mut().insert(header::CONTENT_TYPE, content_type);
    response
}

struct WatchOptions {
    /// Events after this resourceVersion; `None` starts from the current state.
    position: Option<u64>,
    send_initial_events: bool,
    bookmarks: bool,
    timeout: Duration,
}

/// Streams one watch until its timeout, a disconnect, an expiry or the client going away.
async fn run_watch(
    shared: Arc<Shared>,
    filter: Filter,
    options: WatchOptions,
    tx: mpsc::Sender<Bytes>,
) {
    let deadline = Instant::now() + options.timeout;
    let mut changes = shared.changed.subscribe();
    changes.borrow_and_update();
    let (mut cursor, initial, generation, interval, kind) = {
        let store = shared.store.lock();
        let initial: Vec<Bytes> = if options.position.is_none() || options.send_initial_events {
            let objects = store.objects.iter().filter(|(key, object)| filter.matches(key, object));
            objects.map(|(_, object)| event_line("ADDED", object)).collect()
        } else {
            Vec::new()
        };
        let cursor = match options.position {
            Some(position) if !options.send_initial_events => position,
            _ => store.resource_version,
        };
        let kind = store.kind(&filter.plural);
        (cursor, initial, store.disconnects, store.bookmark_interval, kind)
    };
    let bookmark = |resource_version: u64, initial_end: bool| {
        let mut meta = json!({ "resourceVersion": resource_version.to_string() });
        if initial_end {
            meta["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
        }
        let object = json!({ "apiVersion": filter.api_version, "kind": kind, "metadata": meta });
        event_line("BOOKMARK", &object)
    };
    let mut lines = initial;
    if options.send_initial_events {
        lines.push(bookmark(cursor, true));
    }
    let mut next_bookmark = Instant::now() + interval;
    loop {
        // Replay what happened after the cursor: history at first, then live changes.
        changes.borrow_and_update();
        let expired = {
            let store = shared.store.lock();
            if store.disconnects != generation {
                return;
            }
            let expired = cursor < store.oldest_resumable;
            if !expired {
                let start = store.history.partition_point(|e| e.resource_version <= cursor);
                let events = store.history.range(start..);
                lines.extend(events.filter_map(|event| watch_line(&filter, event)));
                cursor = store.resource_version;
            }
            expired
        };
        if expired {
            let status =
                status_object(StatusCode::GONE, "Expired", "too old resource version".into());
            // The stream ends after this event whether or not the client still reads it.
            let _ = tx.send(event_line("ERROR", &status)).await;
            return;
        }
        for line in lines.drain(..) {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = sleep_until(next_bookmark), if options.bookmarks => {
                lines.push(bookmark(cursor, false));
                next_bookmark = Instant::now() + interval;
            }
            () = sleep_until(deadline) => return,
            () = tx.closed() => return,
        }
    }
}

/// The line a watch with `filter` sees for `event`, if any: a MODIFIED object that starts
/// matching arrives as ADDED, one that stops matching as DELETED (its old state, new version).
fn watch_line(filter: &Filter, event: &Event) -> Option<Bytes> {
    let now = filter.matches(&event.key, &event.object);
    let before = event.previous.as_ref().is_some_and(|p| filter.matches(&event.key, p));
    match (event.kind, before, now) {
        ("MODIFIED", false, true) => Some(event_line("ADDED", &event.object)),
        ("MODIFIED", true, false) => {
            let mut old = event.previous.clone()?;
            let resource_version = event.resource_version.to_string();
            metadata(&mut old).insert("resourceVersion".into(), json!(resource_version));
            Some(event_line("DELETED", &old))
        }
        (kind, _, true) => Some(event_line(kind, &event.object)),
        _ => None,
    }
}
