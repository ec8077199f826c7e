//! The watch loop: lists and watches the pool and the pods of its namespace, and publishes
//! the pool's endpoints as one snapshot per change.
//!
//! kube's watcher does the protocol work: a full list, then a watch from its
//! resourceVersion, a relist when the server answers 410 Gone, reconnection with backoff
//! when a watch breaks. A relist is buffered until it is complete, so a snapshot never
//! holds half a list.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::stream::{self, BoxStream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject};
use kube::core::Selector;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::pods::{DiscoveredEndpoint, PodView};
use crate::pool::{PoolSpec, pool_resource};

/// Where the pool's membership comes from.
#[derive(Clone, Debug)]
pub enum PoolSource {
    /// An InferencePool, by name and API group (`--pool-name`, `--pool-group`).
    InferencePool {
        /// The pool's name.
        name: String,
        /// Its API group: [`crate::POOL_GROUP_V1`] or [`crate::POOL_GROUP_V1ALPHA2`].
        group: String,
    },
    /// Pods chosen by a label selector, served on fixed ports (`--endpoint-selector`,
    /// `--endpoint-target-ports`), without an InferencePool.
    Selector {
        /// The pods.
        selector: Selector,
        /// Their model-server ports, in rank order.
        target_ports: Vec<u16>,
    },
}

/// What to discover.
#[derive(Clone, Debug)]
pub struct DiscoveryConfig {
    /// The namespace of the pool and its pods.
    pub namespace: String,
    /// The pool, or a selector.
    pub source: PoolSource,
}

/// Why discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// `--pool-group` names a group this EPP does not read.
    #[error(
        "unknown InferencePool group {0:?}: expected {g1} or {g2}",
        g1 = crate::POOL_GROUP_V1,
        g2 = crate::POOL_GROUP_V1ALPHA2
    )]
    UnknownGroup(String),
}

/// The pool as last seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiscoveredPool {
    /// The pods (and the pool, when there is one) have been listed in full at least once.
    pub synced: bool,
    /// The pool's spec, when the pool exists and its spec is usable (in selector mode, the
    /// selector and ports given).
    pub spec: Option<PoolSpec>,
    /// The endpoints, ordered by pod name, then rank.
    pub endpoints: Arc<Vec<DiscoveredEndpoint>>,
}

impl DiscoveredPool {
    /// Whether the EPP may take traffic: fully listed, and the pool exists.
    pub fn ready(&self) -> bool {
        self.synced && self.spec.is_some()
    }

    /// The name to give `endpoint` in logs and metrics.
    pub fn endpoint_name(&self, endpoint: &DiscoveredEndpoint) -> String {
        endpoint.name(self.spec.as_ref().map_or(1, |spec| spec.target_ports.len()))
    }
}

/// A running discovery; dropping it stops the watches.
#[derive(Debug)]
pub struct Discovery {
    updates: watch::Receiver<DiscoveredPool>,
    task: JoinHandle<()>,
}

impl Discovery {
    /// Starts watching with `client` (on the current Tokio runtime).
    pub fn start(client: kube::Client, config: DiscoveryConfig) -> Result<Self, DiscoveryError> {
        let pod_api: Api<Pod> = Api::namespaced(client.clone(), &config.namespace);
        let mut pod_watch = watcher::Config::default();
        let (pools, fixed_spec): (BoxStream<'static, Update>, Option<PoolSpec>) =
            match &config.source {
                PoolSource::InferencePool { name, group } => {
                    let resource = pool_resource(group)
                        .ok_or_else(|| DiscoveryError::UnknownGroup(group.clone()))?;
                    let api: Api<DynamicObject> =
                        Api::namespaced_with(client, &config.namespace, &resource);
                    let only_this_pool =
                        watcher::Config::default().fields(&format!("metadata.name={name}"));
                    let stream = watcher::watcher(api, only_this_pool)
                        .default_backoff()
                        .map(|event| Update::Pool(event.map(spec_event)))
                        .boxed();
                    (stream, None)
                }
                PoolSource::Selector { selector, target_ports } => {
                    // The selector is fixed, so the API server filters the pods.
                    pod_watch = pod_watch.labels_from(selector);
                    let spec = PoolSpec {
                        selector: selector.clone(),
                        target_ports: target_ports.clone(),
                        app_protocol: None,
                        failure_mode: None,
                    };
                    (stream::pending().boxed(), Some(spec))
                }
            };
        let pods = watcher::watcher(pod_api, pod_watch)
            .default_backoff()
            .map(|event| Update::Pods(event.map(view_event)))
            .boxed();
        let mut state = State::new(fixed_spec);
        let (sender, updates) = watch::channel(state.snapshot());
        let task = tokio::spawn(async move {
            let mut updates = stream::select(pods, pools);
            while let Some(update) = updates.next().await {
                if state.apply(update) {
                    sender.send_if_modified(|current| {
                        let next = state.snapshot();
                        let changed = *current != next;
                        *current = next;
                        changed
                    });
                }
            }
        });
        Ok(Self { updates, task })
    }

    /// A receiver of every new snapshot (the current one is marked seen).
    pub fn subscribe(&self) -> watch::Receiver<DiscoveredPool> {
        let mut receiver = self.updates.clone();
        receiver.mark_unchanged();
        receiver
    }

    /// The latest snapshot.
    pub fn current(&self) -> DiscoveredPool {
        self.updates.borrow().clone()
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Update {
    /// Pods are reduced to what is kept of them as they arrive.
    Pods(Result<Event<PodView>, watcher::Error>),
    /// The pool is reduced to its usable spec (`None`: unusable, or deleted).
    Pool(Result<Event<Option<PoolSpec>>, watcher::Error>),
}

/// What the watches have told so far.
struct State {
    pods: BTreeMap<String, PodView>,
    /// A relist of pods in progress.
    pods_relist: Option<BTreeMap<String, PodView>>,
    pods_synced: bool,
    /// The spec given in selector mode: never changes.
    fixed_spec: Option<PoolSpec>,
    pool: Option<PoolSpec>,
    /// A relist of the pool in progress (`Some(None)`: nothing listed yet).
    pool_relist: Option<Option<PoolSpec>>,
    pool_synced: bool,
}

impl State {
    fn new(fixed_spec: Option<PoolSpec>) -> Self {
        let pool_synced = fixed_spec.is_some();
        Self {
            pods: BTreeMap::new(),
            pods_relist: None,
            pods_synced: false,
            pool: fixed_spec.clone(),
            fixed_spec,
            pool_relist: None,
            pool_synced,
        }
    }

    /// Folds in one update; true when the published snapshot may change.
    fn apply(&mut self, update: Update) -> bool {
        match update {
            Update::Pods(Ok(event)) => self.apply_pods(event),
            Update::Pool(Ok(event)) => self.apply_pool(event),
            Update::Pods(Err(error)) => {
                tracing::warn!(%error, "watching pods failed; retrying");
                false
            }
            Update::Pool(Err(error)) => {
                tracing::warn!(%error, "watching the InferencePool failed; retrying");
                false
            }
        }
    }

    fn apply_pods(&mut self, event: Event<PodView>) -> bool {
        match event {
            Event::Init => {
                self.pods_relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(view) => {
                if let Some(relist) = &mut self.pods_relist {
                    relist.insert(view.name.clone(), view);
                }
                false
            }
            Event::InitDone => {
                if let Some(relist) = self.pods_relist.take() {
                    self.pods = relist;
                }
                self.pods_synced = true;
                true
            }
            Event::Apply(view) => {
                self.pods.insert(view.name.clone(), view);
                true
            }
            Event::Delete(view) => {
                self.pods.remove(&view.name);
                true
            }
        }
    }

    fn apply_pool(&mut self, event: Event<Option<PoolSpec>>) -> bool {
        if self.fixed_spec.is_some() {
            return false;
        }
        match event {
            Event::Init => {
                self.pool_relist = Some(None);
                false
            }
            Event::InitApply(spec) => {
                if let Some(relist) = &mut self.pool_relist {
                    *relist = spec;
                }
                false
            }
            Event::InitDone => {
                if let Some(relist) = self.pool_relist.take() {
                    self.pool = relist;
                }
                if self.pool.is_none() {
                    tracing::warn!("the InferencePool does not exist (yet): no endpoints");
                }
                self.pool_synced = true;
                true
            }
            Event::Apply(spec) => {
                self.pool = spec;
                true
            }
            Event::Delete(_) => {
                tracing::warn!("the InferencePool was deleted: no endpoints");
                self.pool = None;
                true
            }
        }
    }

    fn snapshot(&self) -> DiscoveredPool {
        let mut endpoints = Vec::new();
        if let Some(spec) = &self.pool {
            for pod in self.pods.values() {
                pod.endpoints(spec, &mut endpoints);
            }
        }
        DiscoveredPool {
            synced: self.pods_synced && self.pool_synced,
            spec: self.pool.clone(),
            endpoints: Arc::new(endpoints),
        }
    }
}

fn view_event(event: Event<Pod>) -> Event<PodView> {
    match event {
        Event::Apply(pod) => Event::Apply(PodView::of(&pod)),
        Event::Delete(pod) => Event::Delete(PodView::of(&pod)),
        Event::Init => Event::Init,
        Event::InitApply(pod) => Event::InitApply(PodView::of(&pod)),
        Event::InitDone => Event::InitDone,
    }
}

fn spec_event(event: Event<DynamicObject>) -> Event<Option<PoolSpec>> {
    match event {
        Event::Apply(pool) => Event::Apply(read_spec(&pool)),
        Event::Delete(_) => Event::Delete(None),
        Event::Init => Event::Init,
        Event::InitApply(pool) => Event::InitApply(read_spec(&pool)),
        Event::InitDone => Event::InitDone,
    }
}

/// The usable spec of a pool object; a spec that cannot be used is logged and counts as
/// no pool (routing to a guess would be worse than not routing).
fn read_spec(pool: &DynamicObject) -> Option<PoolSpec> {
    let spec = pool.data.get("spec").cloned().unwrap_or_default();
    match PoolSpec::from_spec(&spec) {
        Ok(spec) => Some(spec),
        Err(error) => {
            tracing::warn!(%error, pool = pool.metadata.name.as_deref().unwrap_or(""), "InferencePool ignored");
            None
        }
    }
}
