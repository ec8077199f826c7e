//! Endpoints of an inference pool and the metrics the scheduler reads about them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::hash::{FNV_OFFSET_BASIS, fnv1a, mix64};
use crate::pool::dispatch_log::DispatchLog;

/// Stable, cheap-to-copy identity of an endpoint.
///
/// Derived from the endpoint's socket address by default, so the same replica keeps the same id
/// across pool updates and every component (prefix index, in-flight counters, metrics collector)
/// agrees on it without a shared allocator.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(pub u64);

impl EndpointId {
    /// The id of the endpoint serving at `address`.
    pub fn from_address(address: SocketAddr) -> Self {
        // FNV-1a over the address bytes: stable across runs and platforms.
        let hash = match address.ip() {
            std::net::IpAddr::V4(ip) => fnv1a(FNV_OFFSET_BASIS, &ip.octets()),
            std::net::IpAddr::V6(ip) => fnv1a(FNV_OFFSET_BASIS, &ip.octets()),
        };
        Self(fnv1a(hash, &address.port().to_be_bytes()))
    }
}

impl fmt::Debug for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EndpointId({:016x})", self.0)
    }
}

/// A hasher for [`EndpointId`] keys: the id already is a 64-bit hash, so one finalising mix
/// spreads it instead of running SipHash per lookup (scorers look ids up per candidate).
#[derive(Clone, Copy, Debug, Default)]
pub struct EndpointIdHasher(u64);

impl std::hash::Hasher for EndpointIdHasher {
    fn finish(&self) -> u64 {
        mix64(self.0)
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached for keys other than EndpointId; fold the bytes in to stay correct.
        self.0 = fnv1a(self.0, bytes);
    }

    fn write_u64(&mut self, value: u64) {
        self.0 ^= value;
    }
}

/// A map keyed by endpoint id, with the cheap [`EndpointIdHasher`].
pub type EndpointMap<V> =
    std::collections::HashMap<EndpointId, V, std::hash::BuildHasherDefault<EndpointIdHasher>>;

/// The pod label that says an endpoint's part in disaggregated serving (llm-d's `RoleLabel`).
pub const ROLE_LABEL: &str = "llm-d.ai/role";

/// What part of disaggregated serving an endpoint performs, read from its [`ROLE_LABEL`]
/// label with llm-d-router's vocabulary (`filter/bylabel/roles.go`).
///
/// An endpoint without the label counts as a decode endpoint only, as in llm-d: the decode
/// filter lets it through and the prefill and encode filters do not, so a pool without roles
/// serves every request aggregated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum EndpointRole {
    /// No role label: decode-capable only.
    #[default]
    Unlabeled,
    /// `prefill`: prefill stage only.
    Prefill,
    /// `decode`: decode stage only.
    Decode,
    /// `encode`: encode stage (multimodal encoders) only.
    Encode,
    /// `prefill-decode`, or its deprecated spelling `both`: prefill and decode.
    PrefillDecode,
    /// `encode-prefill`: encode and prefill.
    EncodePrefill,
    /// `encode-prefill-decode`: every stage.
    EncodePrefillDecode,
    /// A label value llm-d does not know: no role filter lets it through.
    Unrecognized,
}

impl EndpointRole {
    /// Every role a label value can name (not [`Self::Unlabeled`] or [`Self::Unrecognized`]).
    pub const NAMED: [Self; 6] = [
        Self::Prefill,
        Self::Decode,
        Self::Encode,
        Self::PrefillDecode,
        Self::EncodePrefill,
        Self::EncodePrefillDecode,
    ];

    /// The role a label value names; `None` (no label) is [`Self::Unlabeled`].
    pub fn from_label(value: Option<&str>) -> Self {
        match value {
            None => Self::Unlabeled,
            Some("prefill") => Self::Prefill,
            Some("decode") => Self::Decode,
            Some("encode") => Self::Encode,
            Some("prefill-decode" | "both") => Self::PrefillDecode,
            Some("encode-prefill") => Self::EncodePrefill,
            Some("encode-prefill-decode") => Self::EncodePrefillDecode,
            Some(_) => Self::Unrecognized,
        }
    }

    /// The label value that names this role (`None` for the two roles no value names).
    pub const fn label_value(self) -> Option<&'static str> {
        match self {
            Self::Prefill => Some("prefill"),
            Self::Decode => Some("decode"),
            Self::Encode => Some("encode"),
            Self::PrefillDecode => Some("prefill-decode"),
            Self::EncodePrefill => Some("encode-prefill"),
            Self::EncodePrefillDecode => Some("encode-prefill-decode"),
            Self::Unlabeled | Self::Unrecognized => None,
        }
    }

    /// Whether the endpoint may run a request's prefill stage (what `prefill-filter` keeps).
    pub const fn serves_prefill(self) -> bool {
        matches!(
            self,
            Self::Prefill | Self::PrefillDecode | Self::EncodePrefill | Self::EncodePrefillDecode
        )
    }

    /// Whether the endpoint may run a request's decode stage (what `decode-filter` keeps).
    pub const fn serves_decode(self) -> bool {
        matches!(
            self,
            Self::Unlabeled | Self::Decode | Self::PrefillDecode | Self::EncodePrefillDecode
        )
    }

    /// Whether the endpoint may encode a request's multimodal inputs (what `encode-filter`
    /// keeps).
    pub const fn serves_encode(self) -> bool {
        matches!(self, Self::Encode | Self::EncodePrefill | Self::EncodePrefillDecode)
    }
}

/// A model-server replica that can receive requests.
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    /// Stable identity.
    pub id: EndpointId,
    /// Human-readable name (for example the pod name), used in logs and metrics.
    pub name: Arc<str>,
    /// Where the proxy sends the request.
    pub address: SocketAddr,
    /// The DNS name `address` was resolved from, when the endpoint was declared by name (a
    /// peer cluster's gateway): scrapes of it send this name as `Host` and check the server
    /// certificate against it.
    pub host: Option<Arc<str>>,
    /// Labels, as on the Kubernetes pod; label filters read them.
    pub labels: BTreeMap<String, String>,
    /// Requests picked for this endpoint, for lag-compensated load scoring.
    dispatches: DispatchLog,
}

impl Endpoint {
    /// An endpoint at `address` with no labels, named after its address.
    pub fn new(address: SocketAddr) -> Self {
        Self {
            id: EndpointId::from_address(address),
            name: Arc::from(address.to_string()),
            address,
            host: None,
            labels: BTreeMap::new(),
            dispatches: DispatchLog::default(),
        }
    }

    /// Takes over `other`'s dispatch log (the same server, re-declared).
    pub(crate) fn share_dispatches_of(&mut self, other: &Endpoint) {
        self.dispatches = other.dispatches.clone();
    }

    /// The requests this picker sent here recently (shared by every clone of the endpoint,
    /// so it survives metrics updates of the pool).
    pub fn dispatches(&self) -> &DispatchLog {
        &self.dispatches
    }

    /// Sets the name.
    pub fn with_name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the DNS name the address was resolved from.
    pub fn with_host(mut self, host: impl Into<Arc<str>>) -> Self {
        self.host = Some(host.into());
        self
    }

    /// Adds a label.
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Sets the role: writes (or, for a role no label value names, removes) the
    /// [`ROLE_LABEL`] label, which is where the role lives, as on a Kubernetes pod.
    pub fn with_role(mut self, role: EndpointRole) -> Self {
        match role.label_value() {
            Some(value) => self.labels.insert(ROLE_LABEL.to_owned(), value.to_owned()),
            None => self.labels.remove(ROLE_LABEL),
        };
        self
    }

    /// The role in disaggregated serving, from the [`ROLE_LABEL`] label.
    pub fn role(&self) -> EndpointRole {
        EndpointRole::from_label(self.labels.get(ROLE_LABEL).map(String::as_str))
    }
}

/// The latest metrics known for an endpoint, as scraped from its model server.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EndpointMetrics {
    /// Requests waiting in the server's queue.
    pub waiting_queue: u32,
    /// Requests currently running (in the batch).
    pub running: u32,
    /// KV-cache utilisation in `[0, 1]`.
    pub kv_usage: f64,
    /// LoRA adapters currently loaded and running.
    pub active_lora_adapters: Vec<Arc<str>>,
    /// LoRA adapters requested but waiting for a slot.
    pub waiting_lora_adapters: Vec<Arc<str>>,
    /// How many LoRA adapters the server can hold at once (0 when unknown or LoRA is off).
    pub max_lora_adapters: u32,
    /// KV-cache capacity in blocks, when the server reports it.
    pub kv_capacity_blocks: Option<u64>,
    /// When these metrics were observed; `None` means never scraped.
    pub updated_at: Option<Instant>,
}

impl EndpointMetrics {
    /// Whether these metrics are too old (or missing) to be trusted at `now`.
    pub fn is_stale(&self, now: Instant, threshold: Duration) -> bool {
        match self.updated_at {
            None => true,
            Some(at) => now.saturating_duration_since(at) > threshold,
        }
    }

    /// Whether `adapter` is loaded and running on the endpoint.
    pub fn has_active_adapter(&self, adapter: &str) -> bool {
        self.active_lora_adapters.iter().any(|a| &**a == adapter)
    }

    /// Whether `adapter` is queued for loading on the endpoint.
    pub fn has_waiting_adapter(&self, adapter: &str) -> bool {
        self.waiting_lora_adapters.iter().any(|a| &**a == adapter)
    }

    /// Whether the endpoint can load one more adapter without evicting one.
    pub fn has_free_adapter_slot(&self) -> bool {
        (self.active_lora_adapters.len() as u64) < u64::from(self.max_lora_adapters)
    }
}

/// An endpoint together with its latest metrics: what plugins read.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointState {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// Its latest metrics.
    pub metrics: EndpointMetrics,
}

impl EndpointState {
    /// An endpoint with default (never scraped) metrics.
    pub fn new(endpoint: Endpoint) -> Self {
        Self { endpoint, metrics: EndpointMetrics::default() }
    }

    /// Replaces the metrics.
    pub fn with_metrics(mut self, metrics: EndpointMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Shorthand for the endpoint id.
    pub fn id(&self) -> EndpointId {
        self.endpoint.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_ids_follow_the_address() {
        let a: SocketAddr = "10.0.0.1:8000".parse().unwrap();
        let b: SocketAddr = "10.0.0.1:8001".parse().unwrap();
        assert_eq!(EndpointId::from_address(a), Endpoint::new(a).id);
        assert_ne!(EndpointId::from_address(a), EndpointId::from_address(b));
    }

    #[test]
    fn staleness_counts_from_the_update_time() {
        let now = Instant::now();
        let threshold = Duration::from_millis(200);
        let mut metrics = EndpointMetrics::default();
        assert!(metrics.is_stale(now, threshold), "never scraped is stale");
        metrics.updated_at = Some(now);
        assert!(!metrics.is_stale(now + threshold, threshold));
        assert!(metrics.is_stale(now + threshold + Duration::from_millis(1), threshold));
    }

    #[test]
    fn adapter_slots() {
        let metrics = EndpointMetrics {
            active_lora_adapters: vec![Arc::from("a")],
            waiting_lora_adapters: vec![Arc::from("b")],
            max_lora_adapters: 1,
            ..Default::default()
        };
        assert!(metrics.has_active_adapter("a"));
        assert!(metrics.has_waiting_adapter("b"));
        assert!(!metrics.has_free_adapter_slot());
    }
}
