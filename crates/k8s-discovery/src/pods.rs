//! Which of a pool's pods serve, and the endpoints each contributes.
//!
//! A pod serves when it is Ready, not terminating and has an IP. It contributes one endpoint
//! per target port (its data-parallel ranks), less the ports its `llm-d.ai/active-ports`
//! annotation leaves out.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use kube::core::SelectorExt;

use crate::pool::PoolSpec;

/// The annotation naming the ports of a pod that take traffic (comma-separated).
pub const ACTIVE_PORTS_ANNOTATION: &str = "llm-d.ai/active-ports";
/// The same annotation under GIE's older name.
pub const LEGACY_ACTIVE_PORTS_ANNOTATION: &str = "inference.networking.k8s.io/active-ports";

/// One model server the pool routes to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DiscoveredEndpoint {
    /// The pod's name.
    pub pod: String,
    /// The index of `port` in the pool's target ports.
    pub rank: usize,
    /// The pod's IP.
    pub address: IpAddr,
    /// The model server's port.
    pub port: u16,
    /// The pod's labels (role, engine and the rest).
    pub labels: BTreeMap<String, String>,
}

impl DiscoveredEndpoint {
    /// The name logs and metrics use: the pod's, with the rank when the pool has several.
    pub fn name(&self, ranks: usize) -> String {
        if ranks > 1 { format!("{}-rank-{}", self.pod, self.rank) } else { self.pod.clone() }
    }
}

/// What is kept of a pod: enough to decide whether and where it serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    /// The pod's name.
    pub name: String,
    /// Ready, not terminating, with an IP.
    pub ip: Option<IpAddr>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// The active-ports annotation, when present.
    pub active_ports: Option<String>,
}

impl PodView {
    /// The view of `pod`: `ip` is `None` unless the pod can serve.
    pub fn of(pod: &Pod) -> Self {
        let metadata = &pod.metadata;
        let annotations = metadata.annotations.as_ref();
        let active_ports = annotations.and_then(|annotations| {
            annotations
                .get(ACTIVE_PORTS_ANNOTATION)
                .or_else(|| annotations.get(LEGACY_ACTIVE_PORTS_ANNOTATION))
                .cloned()
        });
        let serving = metadata.deletion_timestamp.is_none() && is_ready(pod);
        let ip = pod
            .status
            .as_ref()
            .and_then(|status| status.pod_ip.as_deref())
            .and_then(|ip| ip.parse::<IpAddr>().ok())
            .filter(|_| serving);
        Self {
            name: metadata.name.clone().unwrap_or_default(),
            ip,
            labels: metadata.labels.clone().unwrap_or_default(),
            active_ports,
        }
    }

    /// The endpoints this pod contributes to a pool with `spec`, appended to `out`.
    pub fn endpoints(&self, spec: &PoolSpec, out: &mut Vec<DiscoveredEndpoint>) {
        let Some(address) = self.ip else { return };
        if !spec.selector.matches(&self.labels) {
            return;
        }
        let active = self.active_ports.as_deref().map(parse_port_list);
        for (rank, &port) in spec.target_ports.iter().enumerate() {
            if active.as_ref().is_some_and(|active| !active.contains(&port)) {
                continue;
            }
            out.push(DiscoveredEndpoint {
                pod: self.name.clone(),
                rank,
                address,
                port,
                labels: self.labels.clone(),
            });
        }
    }
}

fn is_ready(pod: &Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|status| status.conditions.as_ref());
    conditions
        .and_then(|conditions| conditions.iter().find(|condition| condition.type_ == "Ready"))
        .is_some_and(|ready| ready.status == "True")
}

/// The ports of an active-ports annotation; entries that are not ports are skipped.
fn parse_port_list(text: &str) -> BTreeSet<u16> {
    text.split(',')
        .filter_map(|entry| entry.trim().parse::<u16>().ok())
        .filter(|&port| port != 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    fn ready_pod(name: &str, ip: &str) -> serde_json::Value {
        json!({
            "metadata": {"name": name, "labels": {"app": "vllm"}},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}
        })
    }

    fn spec(ports: &[i64]) -> PoolSpec {
        let targets: Vec<_> = ports.iter().map(|port| json!({"number": port})).collect();
        PoolSpec::from_spec(
            &json!({"selector": {"matchLabels": {"app": "vllm"}}, "targetPorts": targets}),
        )
        .unwrap()
    }

    fn endpoints(value: serde_json::Value, ports: &[i64]) -> Vec<(usize, u16)> {
        let mut out = Vec::new();
        PodView::of(&pod(value)).endpoints(&spec(ports), &mut out);
        out.into_iter().map(|endpoint| (endpoint.rank, endpoint.port)).collect()
    }

    #[test]
    fn a_ready_pod_serves_on_every_target_port() {
        assert_eq!(endpoints(ready_pod("a", "10.0.0.1"), &[8000, 8001]), [(0, 8000), (1, 8001)]);
    }

    #[test]
    fn unready_terminating_ipless_or_unselected_pods_do_not_serve() {
        let mut unready = ready_pod("a", "10.0.0.1");
        unready["status"]["conditions"][0]["status"] = json!("False");
        let mut terminating = ready_pod("a", "10.0.0.1");
        terminating["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        let mut no_ip = ready_pod("a", "10.0.0.1");
        no_ip["status"].as_object_mut().unwrap().remove("podIP");
        let mut other_app = ready_pod("a", "10.0.0.1");
        other_app["metadata"]["labels"]["app"] = json!("sglang");
        let no_conditions = json!({"metadata": {"name": "a", "labels": {"app": "vllm"}}, "status": {"podIP": "10.0.0.1"}});
        for value in [unready, terminating, no_ip, other_app, no_conditions] {
            assert!(endpoints(value.clone(), &[8000]).is_empty(), "{value}");
        }
    }

    #[test]
    fn the_active_ports_annotation_narrows_the_ranks() {
        let mut value = ready_pod("a", "10.0.0.1");
        value["metadata"]["annotations"] = json!({ACTIVE_PORTS_ANNOTATION: "8001, 9999,x"});
        assert_eq!(endpoints(value.clone(), &[8000, 8001]), [(1, 8001)]);
        value["metadata"]["annotations"] = json!({LEGACY_ACTIVE_PORTS_ANNOTATION: "8000"});
        assert_eq!(endpoints(value, &[8000, 8001]), [(0, 8000)]);
    }

    #[test]
    fn names_carry_the_rank_only_when_there_are_several() {
        let mut out = Vec::new();
        PodView::of(&pod(ready_pod("vllm-0", "10.0.0.1")))
            .endpoints(&spec(&[8000, 8001]), &mut out);
        assert_eq!(out[1].name(2), "vllm-0-rank-1");
        assert_eq!(out[0].name(1), "vllm-0");
    }
}
