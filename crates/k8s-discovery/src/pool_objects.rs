//! InferenceObjectives and InferenceModelRewrites: the objects of the pool's namespace whose
//! `spec.poolRef` names the pool, watched and published whole on every change.
//!
//! Both kinds live in `llm-d.ai/v1alpha2` and, deprecated, in
//! `inference.networking.x-k8s.io/v1alpha2`. As the Go EPP does, the API server is asked
//! which is installed, and the new group wins when both are; a kind that is not installed
//! is not watched.

use futures::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::listed::{Listed, named};
use crate::pool::POOL_GROUP_V1;

/// The groups that serve these kinds, preferred first.
pub const OBJECT_GROUPS: [&str; 2] = ["llm-d.ai", "inference.networking.x-k8s.io"];
/// Their version.
pub const OBJECT_VERSION: &str = "v1alpha2";

/// A kind of object that refers to a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolObjectKind {
    /// `InferenceObjective`: a priority for the requests that name it.
    Objective,
    /// `InferenceModelRewrite`: rules that send one model name to weighted targets.
    ModelRewrite,
}

impl PoolObjectKind {
    /// The kind's name.
    pub fn kind(self) -> &'static str {
        match self {
            Self::Objective => "InferenceObjective",
            Self::ModelRewrite => "InferenceModelRewrite",
        }
    }

    /// The kind's resource name in URLs.
    pub fn plural(self) -> &'static str {
        match self {
            Self::Objective => "inferenceobjectives",
            Self::ModelRewrite => "inferencemodelrewrites",
        }
    }
}

/// The pool's objects of one kind, as last seen.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolObjects {
    /// Listed in full at least once (or the kind is not installed).
    pub synced: bool,
    /// The objects (`apiVersion`, `kind`, `metadata.name`, `spec`), ordered by name.
    pub objects: Vec<Value>,
}

impl PoolObjects {
    /// The objects as one `kind: List` document (JSON, which YAML readers accept).
    pub fn to_list_document(&self) -> String {
        json!({"apiVersion": "v1", "kind": "List", "items": self.objects}).to_string()
    }
}

/// A running watch of one kind; dropping it stops the watch.
#[derive(Debug)]
pub struct PoolObjectWatch {
    updates: watch::Receiver<PoolObjects>,
    task: Option<JoinHandle<()>>,
}

impl Drop for PoolObjectWatch {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl PoolObjectWatch {
    /// Finds which group serves `kind` and watches the objects of `namespace` that refer to
    /// the pool `pool_name` of `pool_group`. When no group serves it, the result is synced
    /// and empty at once.
    pub async fn start(
        client: kube::Client,
        namespace: &str,
        pool_name: &str,
        pool_group: &str,
        kind: PoolObjectKind,
    ) -> Self {
        let Some(group) = installed_group(&client, kind).await else {
            tracing::info!(kind = kind.kind(), "not installed in the cluster: not watched");
            let (_, updates) = watch::channel(PoolObjects { synced: true, objects: Vec::new() });
            return Self { updates, task: None };
        };
        if group != OBJECT_GROUPS[0] {
            tracing::warn!(kind = kind.kind(), group, "deprecated API group; llm-d.ai replaces it");
        }
        let gvk = GroupVersionKind::gvk(group, OBJECT_VERSION, kind.kind());
        let resource = ApiResource::from_gvk_with_plural(&gvk, kind.plural());
        let api: Api<DynamicObject> = Api::namespaced_with(client, namespace, &resource);
        let reference = PoolReference { name: pool_name.to_owned(), group: pool_group.to_owned() };
        let (sender, updates) = watch::channel(PoolObjects::default());
        let task = tokio::spawn(async move {
            let mut events =
                watcher::watcher(api, watcher::Config::default()).default_backoff().boxed();
            let mut objects: Listed<Value> = Listed::default();
            while let Some(event) = events.next().await {
                let changed = match event {
                    // An object that stops naming the pool leaves it.
                    Ok(event) => objects.apply(named(event, |object| reference.keep(object))),
                    Err(error) => {
                        tracing::warn!(%error, kind = kind.kind(), "watch failed; retrying");
                        false
                    }
                };
                if changed && objects.synced() {
                    let next =
                        PoolObjects { synced: true, objects: objects.values().cloned().collect() };
                    sender.send_if_modified(|current| {
                        let changed = *current != next;
                        *current = next;
                        changed
                    });
                }
            }
        });
        Self { updates, task: Some(task) }
    }

    /// A receiver of every new state (the current one marked seen).
    pub fn subscribe(&self) -> watch::Receiver<PoolObjects> {
        let mut receiver = self.updates.clone();
        receiver.mark_unchanged();
        receiver
    }

    /// The latest state.
    pub fn current(&self) -> PoolObjects {
        self.updates.borrow().clone()
    }
}

/// The first of [`OBJECT_GROUPS`] whose API lists `kind`.
async fn installed_group(client: &kube::Client, kind: PoolObjectKind) -> Option<&'static str> {
    for group in OBJECT_GROUPS {
        let api_version = format!("{group}/{OBJECT_VERSION}");
        match client.list_api_group_resources(&api_version).await {
            Ok(list) if list.resources.iter().any(|resource| resource.name == kind.plural()) => {
                return Some(group);
            }
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => {
                tracing::warn!(%error, api_version, "API discovery failed; assuming not installed");
            }
        }
    }
    None
}

/// The pool objects must name, as `spec.poolRef`.
struct PoolReference {
    name: String,
    group: String,
}

impl PoolReference {
    /// The object's trimmed form, if it refers to this pool and is not being deleted. A
    /// `poolRef` without a group means the GA pool group (the API's default).
    fn keep(&self, object: &DynamicObject) -> Option<Value> {
        if object.metadata.deletion_timestamp.is_some() {
            return None;
        }
        let spec = object.data.get("spec")?;
        let reference = spec.get("poolRef")?;
        let group =
            reference.get("group").and_then(Value::as_str).filter(|group| !group.is_empty());
        let names_pool = reference.get("name").and_then(Value::as_str) == Some(self.name.as_str())
            && group.unwrap_or(POOL_GROUP_V1) == self.group;
        if !names_pool {
            return None;
        }
        let name = object.metadata.name.as_deref()?;
        let types = object.types.as_ref();
        let trimmed = json!({
            "apiVersion": types.map(|types| types.api_version.as_str()),
            "kind": types.map(|types| types.kind.as_str()),
            "metadata": {"name": name},
            "spec": spec,
        });
        Some(trimmed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(value: Value) -> DynamicObject {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn keeps_objects_that_name_the_pool_trimmed() {
        let reference = PoolReference { name: "chat".into(), group: POOL_GROUP_V1.into() };
        let premium = object(json!({
            "apiVersion": "llm-d.ai/v1alpha2", "kind": "InferenceObjective",
            "metadata": {"name": "premium", "namespace": "ns", "managedFields": [{}], "uid": "1"},
            "spec": {"priority": 10, "poolRef": {"name": "chat"}},
            "status": {"conditions": []}
        }));
        let kept = reference.keep(&premium).unwrap();
        assert_eq!(
            kept,
            json!({
                "apiVersion": "llm-d.ai/v1alpha2", "kind": "InferenceObjective",
                "metadata": {"name": "premium"}, "spec": {"priority": 10, "poolRef": {"name": "chat"}}
            })
        );
        for other in [
            json!({"name": "other"}),
            json!({"name": "chat", "group": "inference.networking.x-k8s.io"}),
        ] {
            let mut value = serde_json::to_value(&premium).unwrap();
            value["spec"]["poolRef"] = other.clone();
            assert!(reference.keep(&object(value)).is_none(), "{other}");
        }
        let mut deleting = serde_json::to_value(&premium).unwrap();
        deleting["metadata"]["deletionTimestamp"] = json!("2026-12-03T00:00:00Z");
        assert!(reference.keep(&object(deleting)).is_none());
    }
}
