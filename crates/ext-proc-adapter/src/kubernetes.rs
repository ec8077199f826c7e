//! Endpoints from Kubernetes (the `kubernetes` feature): the ready pods of an InferencePool,
//! or of a label selector, fed to the pool writer as they change.
//!
//! Readiness holds at NotServing ([`Hold::Discovery`]) until the pool and its pods have been
//! listed in full, and again whenever the pool does not exist.
//!
//! With an InferencePool, the InferenceObjectives and InferenceModelRewrites that name it
//! are watched too and applied live (unless `--objectives-file` or `--model-rewrites-file`
//! supplies that kind). An object the server refuses is left out with a warning naming
//! it; the others apply.

use std::sync::Arc;

use k8s_discovery::{
    DiscoveredPool, Discovery, DiscoveryConfig, LeaderElectionConfig, LeaderElector,
    PoolObjectKind, PoolObjectWatch, PoolObjects, PoolSource,
};
use metrics_model::engines::LEGACY_ENGINE_LABEL_KEY;
use metrics_model::mapping::Engine;
use scheduler_core::Director;
use scheduler_core::data_layer::plugins::DEFAULT_ENGINE_LABEL_KEY;
use scheduler_core::flow::ObjectiveResolver;
use scheduler_core::rewrite::ModelRewrites;
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::metrics::EppMetrics;

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
    /// Campaign for this Lease; readiness holds at NotServing while another replica leads.
    pub leader_election: Option<LeaderElectionConfig>,
}

/// Where watched InferenceObjectives and InferenceModelRewrites go; `None` leaves a kind
/// unwatched.
#[derive(Clone, Debug, Default)]
pub struct PoolObjectSinks {
    /// The resolver the director reads priorities from (clones share its table).
    pub objectives: Option<ObjectiveResolver>,
    /// The director whose rewrites are replaced, and the metrics that admit their names.
    pub rewrites: Option<(Arc<Director>, Arc<EppMetrics>)>,
}

/// Discovery feeding a running server; dropping it stops the watches and the feeds.
#[derive(Debug)]
pub struct KubernetesEndpoints {
    _discovery: Discovery,
    _objects: Vec<PoolObjectWatch>,
    elector: Option<LeaderElector>,
    feeds: Vec<JoinHandle<()>>,
}

impl KubernetesEndpoints {
    /// Gives up leadership, if held, so another replica takes over at once (on shutdown,
    /// before draining, as the Go EPP does).
    pub async fn release_leadership(&mut self) {
        if let Some(elector) = self.elector.take() {
            elector.release().await;
        }
    }
}

impl Drop for KubernetesEndpoints {
    fn drop(&mut self) {
        for feed in &self.feeds {
            feed.abort();
        }
    }
}

/// Connects to the API server (in-cluster, or `KUBECONFIG` / `~/.kube/config`), starts
/// discovery, and keeps `writer` holding the discovered endpoints.
pub async fn start(
    settings: KubernetesSettings,
    writer: PoolWriter,
    holds: Arc<ReadinessHolds>,
    sinks: PoolObjectSinks,
) -> Result<KubernetesEndpoints, String> {
    holds.set(Hold::Discovery, true);
    let client = k8s_discovery::connect()
        .await
        .map_err(|error| format!("cannot reach the Kubernetes API server: {error}"))?;
    let namespace = settings.namespace.clone();
    let pool_reference = match &settings.source {
        PoolSource::InferencePool { name, group } => Some((name.clone(), group.clone())),
        PoolSource::Selector { .. } => None,
    };
    let elector = settings.leader_election.map(|config| {
        holds.set(Hold::Standby, true);
        LeaderElector::start(client.clone(), config)
    });
    let config = DiscoveryConfig { namespace: settings.namespace, source: settings.source };
    let discovery = Discovery::start(client.clone(), config).map_err(|error| error.to_string())?;
    let mut updates = discovery.subscribe();
    let first = discovery.current();
    let mut feeds = Vec::new();
    if let Some(elector) = &elector {
        let mut leading = elector.subscribe();
        let holds = Arc::clone(&holds);
        // Read the state current at subscription too: the first round may already be won.
        let mut leads = elector.is_leader();
        feeds.push(tokio::spawn(async move {
            loop {
                holds.set(Hold::Standby, !leads);
                if leading.changed().await.is_err() {
                    return;
                }
                leads = *leading.borrow_and_update();
            }
        }));
    }
    feeds.push(tokio::spawn(async move {
        let mut applied = None;
        apply(&first, &writer, &holds, &mut applied);
        while updates.changed().await.is_ok() {
            let pool = updates.borrow_and_update().clone();
            apply(&pool, &writer, &holds, &mut applied);
        }
    }));
    let mut objects = Vec::new();
    if let Some((pool, group)) = pool_reference {
        let watch = |kind| PoolObjectWatch::start(client.clone(), &namespace, &pool, &group, kind);
        if let Some(resolver) = sinks.objectives {
            let objectives = watch(PoolObjectKind::Objective).await;
            feeds.push(follow(&objectives, move |objects| apply_objectives(objects, &resolver)));
            objects.push(objectives);
        }
        if let Some((director, metrics)) = sinks.rewrites {
            let rewrites = watch(PoolObjectKind::ModelRewrite).await;
            let seed = clock_seed();
            feeds.push(follow(&rewrites, move |objects| {
                apply_rewrites(objects, &director, &metrics, seed)
            }));
            objects.push(rewrites);
        }
    }
    Ok(KubernetesEndpoints { _discovery: discovery, _objects: objects, elector, feeds })
}

/// Calls `apply` with the current objects once listed, then on every change.
fn follow(
    watch: &PoolObjectWatch,
    mut apply: impl FnMut(&PoolObjects) + Send + 'static,
) -> JoinHandle<()> {
    let mut updates = watch.subscribe();
    let first = watch.current();
    tokio::spawn(async move {
        if first.synced {
            apply(&first);
        }
        while updates.changed().await.is_ok() {
            let objects = updates.borrow_and_update().clone();
            apply(&objects);
        }
    })
}

/// The objects `parse` accepts one by one; each refused object is logged by name.
fn accepted<E: std::fmt::Display>(
    objects: &PoolObjects,
    parse: impl Fn(&str) -> Result<(), E>,
) -> PoolObjects {
    let kept = objects
        .objects
        .iter()
        .filter(|object| {
            let single = PoolObjects { synced: true, objects: vec![(*object).clone()] };
            match parse(&single.to_list_document()) {
                Ok(()) => true,
                Err(error) => {
                    let name = object["metadata"]["name"].as_str().unwrap_or("");
                    tracing::warn!(%error, name = %name.escape_debug(), "object refused");
                    false
                }
            }
        })
        .cloned()
        .collect::<Vec<Value>>();
    PoolObjects { synced: true, objects: kept }
}

fn apply_objectives(objects: &PoolObjects, resolver: &ObjectiveResolver) {
    let metrics = Arc::clone(resolver.metrics());
    let parse = |text: &str| ObjectiveResolver::from_yaml(text, Arc::clone(&metrics));
    let kept = accepted(objects, |text| parse(text).map(|_| ()));
    match parse(&kept.to_list_document()) {
        Ok(next) => {
            resolver.replace_with(&next);
            tracing::info!(objectives = next.len(), "InferenceObjectives applied");
        }
        // Objects valid alone can still clash (one name twice): keep the last good table.
        Err(error) => tracing::warn!(%error, "InferenceObjectives not applied"),
    }
}

fn apply_rewrites(objects: &PoolObjects, director: &Director, metrics: &EppMetrics, seed: u64) {
    let kept = accepted(objects, |text| ModelRewrites::from_yaml(text).map(|_| ()));
    let rewrites = if kept.objects.is_empty() {
        Ok(None)
    } else {
        ModelRewrites::from_yaml(&kept.to_list_document())
            .map(|rewrites| Some(rewrites.with_seed(seed)))
    };
    match rewrites {
        Ok(Some(rewrites)) => {
            let rules = crate::model_rewrites::publish(director, metrics, rewrites);
            tracing::info!(rules, "InferenceModelRewrites applied");
        }
        Ok(None) => director.set_model_rewrites(None),
        Err(error) => tracing::warn!(%error, "InferenceModelRewrites not applied"),
    }
}

fn clock_seed() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map_or(0, |since| since.as_nanos() as u64)
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
