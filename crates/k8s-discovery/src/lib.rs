//! Kubernetes discovery for epp: the endpoints of an InferencePool.
//!
//! On Kubernetes, the endpoints an EPP routes to are the ready pods its InferencePool
//! selects, one endpoint per target port. [`Discovery`] lists and watches the pool and the
//! pods of its namespace through the API server and publishes the endpoints as one
//! [`DiscoveredPool`] snapshot per change; `synced` turns true once everything has been
//! listed, which is when readiness may report serving. Without an InferencePool, a label
//! selector and fixed ports ([`PoolSource::Selector`]) choose the pods instead.
//!
//! The rules a pod follows are the Go EPP's: it serves when Ready, not terminating and
//! with an IP; its labels travel with its endpoints (so `llm-d.ai/role` and
//! `llm-d.ai/engine-type` reach the scheduler); its `llm-d.ai/active-ports` annotation can
//! narrow its ranks.
//!
//! ```
//! use k8s_discovery::{PoolSpec, parse_selector};
//!
//! let spec = PoolSpec::from_spec(&serde_json::json!({
//!     "selector": {"matchLabels": {"app": "vllm-llama3-8b"}},
//!     "targetPorts": [{"number": 8000}, {"number": 8001}],
//! }))
//! .unwrap();
//! assert_eq!(spec.target_ports, [8000, 8001]);
//! assert!(parse_selector("app=vllm,tier in (gold,silver)").is_ok());
//! ```

mod discovery;
mod leader;
mod listed;
mod pods;
mod pool;
mod pool_objects;
mod selector;

pub use discovery::{DiscoveredPool, Discovery, DiscoveryConfig, DiscoveryError, PoolSource};
pub use leader::{LeaderElectionConfig, LeaderElector};
pub use pods::{
    ACTIVE_PORTS_ANNOTATION, DiscoveredEndpoint, LEGACY_ACTIVE_PORTS_ANNOTATION, PodView,
};
pub use pool::{
    MAX_TARGET_PORTS, POOL_GROUP_V1, POOL_GROUP_V1ALPHA2, PoolSpec, PoolSpecError, pool_resource,
    validate_ports,
};
pub use pool_objects::{
    OBJECT_GROUPS, OBJECT_VERSION, PoolObjectKind, PoolObjectWatch, PoolObjects,
};
pub use selector::{SelectorError, parse_selector};

/// The Kubernetes client type [`Discovery`] runs on.
pub use kube::Client;

/// A client of the cluster this process runs in, else of `KUBECONFIG` (or `~/.kube/config`),
/// as `kubectl` would pick.
pub async fn connect() -> Result<Client, kube::Error> {
    Client::try_default().await
}
