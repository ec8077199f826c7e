//! The InferencePool: which pods serve (a label selector) and on which ports (one endpoint
//! per target port, a data-parallel rank each).
//!
//! Two API versions are read: `inference.networking.k8s.io/v1` (`selector.matchLabels`,
//! `targetPorts: [{number}]` up to 8, `appProtocol`, `endpointPickerRef`) and the older
//! `inference.networking.x-k8s.io/v1alpha2` (`selector` as a flat map, one
//! `targetPortNumber`, `extensionRef`).

use std::collections::BTreeMap;

use kube::core::{ApiResource, GroupVersionKind, Selector};
use serde::Deserialize;

/// The group of the GA InferencePool, the default of `--pool-group`.
pub const POOL_GROUP_V1: &str = "inference.networking.k8s.io";
/// The group of the v1alpha2 InferencePool.
pub const POOL_GROUP_V1ALPHA2: &str = "inference.networking.x-k8s.io";
/// Most target ports a pool may list.
pub const MAX_TARGET_PORTS: usize = 8;

/// What the EPP needs from an InferencePool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolSpec {
    /// The pods that belong to the pool.
    pub selector: Selector,
    /// The model servers' ports on each pod, in rank order.
    pub target_ports: Vec<u16>,
    /// The protocol the gateway speaks to the model servers (`http`, `kubernetes.io/h2c`).
    pub app_protocol: Option<String>,
    /// What the gateway does when the EPP cannot answer (`FailOpen`, `FailClose`).
    pub failure_mode: Option<String>,
}

/// Why a pool's spec cannot be used (the pool is then treated as having no endpoints).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolSpecError {
    /// The spec does not have the expected shape.
    #[error("InferencePool spec: {0}")]
    Shape(String),
    /// No port, too many, or one out of range.
    #[error("InferencePool targetPorts: {0}")]
    Ports(String),
}

/// The API resource of the InferencePool in `group`, or `None` for a group this EPP does not
/// know.
pub fn pool_resource(group: &str) -> Option<ApiResource> {
    let version = match group {
        POOL_GROUP_V1 => "v1",
        POOL_GROUP_V1ALPHA2 => "v1alpha2",
        _ => return None,
    };
    let kind = GroupVersionKind::gvk(group, version, "InferencePool");
    Some(ApiResource::from_gvk_with_plural(&kind, "inferencepools"))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSpec {
    #[serde(default)]
    selector: Option<RawSelector>,
    #[serde(default)]
    target_ports: Option<Vec<RawPort>>,
    #[serde(default)]
    target_port_number: Option<i64>,
    #[serde(default)]
    app_protocol: Option<String>,
    #[serde(default)]
    endpoint_picker_ref: Option<RawPickerRef>,
    #[serde(default)]
    extension_ref: Option<RawPickerRef>,
}

/// v1 nests the labels under `matchLabels`; v1alpha2 gives them flat.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSelector {
    Nested {
        #[serde(rename = "matchLabels")]
        match_labels: BTreeMap<String, String>,
    },
    Flat(BTreeMap<String, String>),
}

#[derive(Deserialize)]
struct RawPort {
    number: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPickerRef {
    #[serde(default)]
    failure_mode: Option<String>,
}

impl PoolSpec {
    /// Reads the `spec` of an InferencePool object of either version.
    pub fn from_spec(spec: &serde_json::Value) -> Result<Self, PoolSpecError> {
        let raw =
            RawSpec::deserialize(spec).map_err(|error| PoolSpecError::Shape(error.to_string()))?;
        let labels = match raw.selector {
            Some(RawSelector::Nested { match_labels }) => match_labels,
            Some(RawSelector::Flat(labels)) => labels,
            None => BTreeMap::new(),
        };
        // An empty selector would select every pod in the namespace: the API rejects it, and
        // so does this reader rather than route to unrelated pods.
        if labels.is_empty() {
            return Err(PoolSpecError::Shape("selector has no labels".to_owned()));
        }
        let numbers: Vec<i64> = match (raw.target_ports, raw.target_port_number) {
            (Some(ports), _) => ports.into_iter().map(|port| port.number).collect(),
            (None, Some(number)) => vec![number],
            (None, None) => Vec::new(),
        };
        let target_ports = validate_ports(&numbers)?;
        let failure_mode = raw
            .endpoint_picker_ref
            .or(raw.extension_ref)
            .and_then(|reference| reference.failure_mode);
        Ok(Self {
            selector: labels.into_iter().collect(),
            target_ports,
            app_protocol: raw.app_protocol,
            failure_mode,
        })
    }
}

/// Checks 1 to [`MAX_TARGET_PORTS`] ports in 1..=65535, without repeats (order kept: it is
/// the rank order).
pub fn validate_ports(numbers: &[i64]) -> Result<Vec<u16>, PoolSpecError> {
    if numbers.is_empty() || numbers.len() > MAX_TARGET_PORTS {
        return Err(PoolSpecError::Ports(format!(
            "{} given, 1 to {MAX_TARGET_PORTS} needed",
            numbers.len()
        )));
    }
    let mut ports = Vec::with_capacity(numbers.len());
    for &number in numbers {
        let port = u16::try_from(number)
            .ok()
            .filter(|&port| port != 0)
            .ok_or_else(|| PoolSpecError::Ports(format!("{number} is not a port number")))?;
        if ports.contains(&port) {
            return Err(PoolSpecError::Ports(format!("{port} is listed twice")));
        }
        ports.push(port);
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use kube::core::SelectorExt;
    use serde_json::json;

    use super::*;

    #[test]
    fn reads_the_v1_shape() {
        let spec = PoolSpec::from_spec(&json!({
            "selector": {"matchLabels": {"app": "vllm"}},
            "targetPorts": [{"number": 8000}, {"number": 8001}],
            "appProtocol": "kubernetes.io/h2c",
            "endpointPickerRef": {"name": "epp", "port": {"number": 9002}, "failureMode": "FailClose"}
        }))
        .unwrap();
        assert_eq!(spec.target_ports, [8000, 8001]);
        assert_eq!(spec.app_protocol.as_deref(), Some("kubernetes.io/h2c"));
        assert_eq!(spec.failure_mode.as_deref(), Some("FailClose"));
        let app = |value: &str| [("app".to_owned(), value.to_owned())].into_iter().collect();
        assert!(spec.selector.matches(&app("vllm")));
        assert!(!spec.selector.matches(&app("sglang")));
    }

    #[test]
    fn reads_the_v1alpha2_shape() {
        let spec = PoolSpec::from_spec(&json!({
            "selector": {"app": "vllm"},
            "targetPortNumber": 8000,
            "extensionRef": {"name": "epp", "failureMode": "FailOpen"}
        }))
        .unwrap();
        assert_eq!(spec.target_ports, [8000]);
        assert_eq!(spec.failure_mode.as_deref(), Some("FailOpen"));
    }

    #[test]
    fn refuses_specs_that_cannot_route() {
        let bad = [
            (json!({"targetPorts": [{"number": 8000}]}), "selector"),
            (json!({"selector": {"matchLabels": {}}, "targetPorts": [{"number": 1}]}), "selector"),
            (json!({"selector": {"app": "x"}}), "0 given"),
            (json!({"selector": {"app": "x"}, "targetPorts": [{"number": 70000}]}), "70000"),
            (
                json!({"selector": {"app": "x"}, "targetPorts": [{"number": 1}, {"number": 1}]}),
                "twice",
            ),
            (
                json!({"selector": {"app": "x"}, "targetPorts": (1..=9).map(|n| json!({"number": n})).collect::<Vec<_>>()}),
                "9 given",
            ),
            (json!({"selector": "app"}), "spec"),
        ];
        for (spec, expected) in bad {
            let error = PoolSpec::from_spec(&spec).unwrap_err().to_string();
            assert!(error.contains(expected), "{spec}: {error}");
        }
    }

    #[test]
    fn resources_by_group() {
        assert_eq!(
            pool_resource(POOL_GROUP_V1).unwrap().api_version,
            "inference.networking.k8s.io/v1"
        );
        assert_eq!(pool_resource(POOL_GROUP_V1ALPHA2).unwrap().version, "v1alpha2");
        assert_eq!(pool_resource(POOL_GROUP_V1).unwrap().plural, "inferencepools");
        assert!(pool_resource("example.com").is_none());
    }
}
