//! The watch loop: lists and watches the pool and the pods of its namespace, and publishes
//! the pool's endpoints as one snapshot per change.
//!
//! kube's watcher does the protocol work: a full list, then a watch from its
//! resourceVersion, a relist when the server answers 410 Gone, reconnection with backoff
//! when a watch breaks. A relist is buffered until it is complete, so a snapshot never
//! holds half a list.

use std::sync::Arc;

use futures::stream::{self, BoxStream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject};
use kube::core::Selector;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::listed::{Listed, Named, named};
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
                        .map(|event| Update::Pool(event.map(|event| named(event, read_spec))))
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
            .map(|event| {
                Update::Pods(event.map(|event| named(event, |pod| Some(PodView::of(pod)))))
            })
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
    Pods(Result<Event<Named<PodView>>, watcher::Error>),
    /// The pool is reduced to its usable spec (`None`: unusable, or deleted).
    Pool(Result<Event<Named<PoolSpec>>, watcher::Error>),
}

/// What the watches have told so far.
struct State {
    pods: Listed<PodView>,
    /// The spec given in selector mode: never changes, and no pool is watched.
    fixed_spec: Option<PoolSpec>,
    /// The watched pool (only the one named is listed).
    pool: Listed<PoolSpec>,
}

impl State {
    fn new(fixed_spec: Option<PoolSpec>) -> Self {
        Self { pods: Listed::default(), fixed_spec, pool: Listed::default() }
    }

    /// Folds in one update; true when the published snapshot may change.
    fn apply(&mut self, update: Update) -> bool {
        match update {
            Update::Pods(Ok(event)) => self.pods.apply(event),
            Update::Pool(Ok(event)) => {
                let changed = self.pool.apply(event);
                if changed && self.pool.synced() && self.spec().is_none() {
                    tracing::warn!(
                        "no usable InferencePool (absent, deleted or invalid): no endpoints"
                    );
                }
                changed
            }
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

    fn spec(&self) -> Option<&PoolSpec> {
        self.fixed_spec.as_ref().or_else(|| self.pool.values().next())
    }

    fn snapshot(&self) -> DiscoveredPool {
        let spec = self.spec();
        let mut endpoints = Vec::new();
        if let Some(spec) = spec {
            for pod in self.pods.values() {
                pod.endpoints(spec, &mut endpoints);
            }
        }
        let pool_synced = self.fixed_spec.is_some() || self.pool.synced();
        DiscoveredPool {
            synced: self.pods.synced() && pool_synced,
            spec: spec.cloned(),
            endpoints: Arc::new(endpoints),
        }
    }
}

/// The usable spec of a pool object; a spec that cannot be used is logged and counts as
/// no pool (routing to a guess would be worse than not routing).
fn read_spec(pool: &DynamicObject) -> Option<PoolSpec> {
    let spec = pool.data.get("spec").unwrap_or(&serde_json::Value::Null);
    match PoolSpec::from_spec(spec) {
        Ok(spec) => Some(spec),
        Err(error) => {
            tracing::warn!(%error, pool = pool.metadata.name.as_deref().unwrap_or(""), "InferencePool ignored");
            None
        }
    }
}
