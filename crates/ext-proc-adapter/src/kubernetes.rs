//! Endpoints from Kubernetes (the `kubernetes` feature): the ready pods of an InferencePool,
//! or of a label selector, fed to the pool writer as they change.
//!
//! Readiness holds at NotServing ([`Hold::Discovery`]) until the pool and its pods have been
//! listed in full, and again whenever the pool does not exist.

use std::sync::Arc;

use k8s_discovery::{DiscoveredPool, Discovery, DiscoveryConfig, PoolSource};
use metrics_model::engines::LEGACY_ENGINE_LABEL_KEY;
use metrics_model::mapping::Engine;
use scheduler_core::data_layer::plugins::DEFAULT_ENGINE_LABEL_KEY;
use tokio::task::JoinHandle;

use crate::endpoints_file::EndpointEntry;
use crate::health::{Hold, ReadinessHolds};
use crate::server::PoolWriter;

/// Where the endpoints come from on Kubernetes.
#[derive(Clone, Debug)]
pub struct KubernetesSettings {
    /// The pool's namespace.
    pub namespace: String,
    /// An InferencePool, or a selector and ports.
    pub source: PoolSource,
}

/// Discovery feeding a running server; dropping it stops both the watches and the feed.
#[derive(Debug)]
pub struct KubernetesEndpoints {
    _discovery: Discovery,
    feed: JoinHandle<()>,
}

impl Drop for KubernetesEndpoints {
    fn drop(&mut self) {
        self.feed.abort();
    }
}

/// Connects to the API server (in-cluster, or `KUBECONFIG` / `~/.kube/config`), starts
/// discovery, and keeps `writer` holding the discovered endpoints.
pub async fn start(
    settings: KubernetesSettings,
    writer: PoolWriter,
    holds: Arc<ReadinessHolds>,
) -> Result<KubernetesEndpoints, String> {
    holds.set(Hold::Discovery, true);
    let client = k8s_discovery::connect()
        .await
        .map_err(|error| format!("cannot reach the Kubernetes API server: {error}"))?;
    let config = DiscoveryConfig { namespace: settings.namespace, source: settings.source };
    let discovery = Discovery::start(client, config).map_err(|error| error.to_string())?;
    let mut updates = discovery.subscribe();
    let first = discovery.current();
    let feed = tokio::spawn(async move {
        let mut applied = None;
        apply(&first, &writer, &holds, &mut applied);
        while updates.changed().await.is_ok() {
            let pool = updates.borrow_and_update().clone();
            apply(&pool, &writer, &holds, &mut applied);
        }
    });
    Ok(KubernetesEndpoints { _discovery: discovery, feed })
}

/// Writes `pool`'s endpoints once it has been listed (a partial view would drop endpoints
/// that are only not listed yet), and sets the readiness hold.
fn apply(
    pool: &DiscoveredPool,
    writer: &PoolWriter,
    holds: &ReadinessHolds,
    applied: &mut Option<Vec<EndpointEntry>>,
) {
    if pool.synced {
        let entries = entries(pool);
        if applied.as_ref() != Some(&entries) {
            match writer.apply(&entries) {
                Ok(()) => {
                    tracing::info!(endpoints = entries.len(), "pool endpoints from Kubernetes")
                }
                Err(error) => tracing::warn!(%error, "discovered endpoints not applied"),
            }
            *applied = Some(entries);
        }
    }
    holds.set(Hold::Discovery, !pool.ready());
}

/// The endpoints-file entries of a discovered pool: named by pod (and rank), engine from the
/// pod's engine label when it names a known engine, role and the rest as labels.
pub fn entries(pool: &DiscoveredPool) -> Vec<EndpointEntry> {
    pool.endpoints
        .iter()
        .map(|endpoint| {
            let engine = endpoint
                .labels
                .get(DEFAULT_ENGINE_LABEL_KEY)
                .or_else(|| endpoint.labels.get(LEGACY_ENGINE_LABEL_KEY))
                .filter(|name| match name.parse::<Engine>() {
                    Ok(_) => true,
                    Err(_) => {
                        tracing::warn!(pod = %endpoint.pod, engine = %name.escape_debug(), "unknown engine label ignored");
                        false
                    }
                })
                .cloned();
            EndpointEntry {
                address: endpoint.address,
                host: None,
                port: endpoint.port,
                name: Some(pool.endpoint_name(endpoint)),
                engine,
                role: None,
                labels: endpoint.labels.clone(),
            }
        })
        .collect()
}
