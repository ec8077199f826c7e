//! Topology-aware disaggregation (llm-d-router's alpha `topology-*` plugins): keep a request's
//! prefill and decode endpoints close, so the KV cache crosses NVLink on one host rather than a
//! rack, zone or region network.
//!
//! - `topology-extractor` reads where each endpoint runs from its labels: `hostname`
//!   (default `kubernetes.io/hostname`), `rack` (`topology.kubernetes.io/rack`), `zone`
//!   (`topology.kubernetes.io/zone`) and `region` (`topology.kubernetes.io/region`), each
//!   parameter naming the label key to read. (llm-d also falls back to the pod's
//!   `spec.hostname` from Kubernetes notifications when the hostname label is missing; here
//!   endpoints carry labels only, so an endpoint without the label has no host.)
//! - The closeness of two endpoints is the first tier they share, in the order host, rack,
//!   zone, region (an empty value matches nothing); sharing none is `none`.
//! - `topology-affinity-filter` keeps the candidates at least as close to the peer endpoint as
//!   `minAffinity` (`host`, the default, `rack`, `zone` or `region`); candidates without a
//!   topology are dropped. When none is left, or there is no peer or no topology for it, every
//!   candidate stays: affinity is a preference, never a reason to fail a stage.
//! - `topology-affinity-scorer` scores host 1.0, rack 0.2, zone 0.05, region 0.02, none 0
//!   (and 0 for every candidate without a peer), llm-d's values.
//!
//! The peer is the other stage's pick, which `disagg-profile-handler` publishes
//! ([`crate::disagg::PeerEndpoint`]): the decode endpoint while the prefill profile runs, the
//! prefill endpoint while the decode profile runs in `prefill-first` order. Both plugins read
//! the topology of the extractor named by `topologyProducerName` (default
//! `topology-extractor`); without such an extractor they have no topology to compare and
//! change nothing, as in llm-d.

use std::sync::{Arc, OnceLock};

use scheduler_core::{
    BindPlugins, Candidates, ConstructedPlugins, CycleState, Endpoint, Filter, InferenceRequest,
    PluginError, PoolSnapshot, Scorer,
};
use serde::Deserialize;

use crate::disagg::PeerEndpoint;

/// llm-d type name of the extractor.
pub const EXTRACTOR_TYPE_NAME: &str = "topology-extractor";
/// llm-d type name of [`TopologyAffinityFilter`].
pub const FILTER_TYPE_NAME: &str = "topology-affinity-filter";
/// llm-d type name of [`TopologyAffinityScorer`].
pub const SCORER_TYPE_NAME: &str = "topology-affinity-scorer";

/// Parameters of `topology-extractor`: the label keys of each tier (empty: the default).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TopologyLabelParameters {
    /// Label naming the node.
    #[serde(default)]
    pub hostname: String,
    /// Label naming the rack.
    #[serde(default)]
    pub rack: String,
    /// Label naming the zone.
    #[serde(default)]
    pub zone: String,
    /// Label naming the region.
    #[serde(default)]
    pub region: String,
}

/// The label keys an extractor reads the tiers from, host first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopologyLabels {
    keys: [String; 4],
}

impl TopologyLabels {
    /// The keys of `parameters`, with Kubernetes' well-known labels for those left empty.
    pub fn new(parameters: TopologyLabelParameters) -> Self {
        let or = |value: String, default: &str| {
            if value.is_empty() { default.to_owned() } else { value }
        };
        Self {
            keys: [
                or(parameters.hostname, "kubernetes.io/hostname"),
                or(parameters.rack, "topology.kubernetes.io/rack"),
                or(parameters.zone, "topology.kubernetes.io/zone"),
                or(parameters.region, "topology.kubernetes.io/region"),
            ],
        }
    }

    /// Whether `endpoint` has a topology: any tier's label set to a non-empty value.
    fn has_topology(&self, endpoint: &Endpoint) -> bool {
        self.keys.iter().any(|key| endpoint.labels.get(key).is_some_and(|v| !v.is_empty()))
    }

    /// How close `candidate` is to `peer`: the first tier both name with the same value.
    pub fn closeness(&self, peer: &Endpoint, candidate: &Endpoint) -> Closeness {
        let shared = self.keys.iter().position(|key| {
            match (peer.labels.get(key), candidate.labels.get(key)) {
                (Some(a), Some(b)) => !a.is_empty() && a == b,
                _ => false,
            }
        });
        match shared {
            Some(0) => Closeness::Host,
            Some(1) => Closeness::Rack,
            Some(2) => Closeness::Zone,
            Some(_) => Closeness::Region,
            None => Closeness::None,
        }
    }
}

/// How close two endpoints are, closest first.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Closeness {
    /// The same node.
    Host,
    /// The same rack.
    Rack,
    /// The same zone.
    Zone,
    /// The same region.
    Region,
    /// No tier in common.
    None,
}

impl Closeness {
    /// llm-d's score of the tier.
    pub fn score(self) -> f64 {
        match self {
            Self::Host => 1.0,
            Self::Rack => 0.2,
            Self::Zone => 0.05,
            Self::Region => 0.02,
            Self::None => 0.0,
        }
    }
}

/// Finds the extractor a consumer reads at bind time.
#[derive(Debug)]
struct ExtractorRef {
    name: String,
    labels: OnceLock<Option<Arc<TopologyLabels>>>,
}

impl ExtractorRef {
    fn new(producer_name: String) -> Self {
        let name =
            if producer_name.is_empty() { EXTRACTOR_TYPE_NAME.to_owned() } else { producer_name };
        Self { name, labels: OnceLock::new() }
    }

    fn bind(&self, plugins: &ConstructedPlugins) {
        let labels = plugins
            .get(&self.name)
            .and_then(|declared| declared.plugin.shared.clone())
            .and_then(|shared| shared.downcast::<TopologyLabels>().ok());
        let _ = self.labels.set(labels);
    }

    /// The extractor's labels and the peer's endpoint, when both exist for this decision.
    fn peer<'p>(
        &self,
        state: &mut CycleState,
        pool: &'p PoolSnapshot,
    ) -> Option<(&TopologyLabels, &'p Endpoint)> {
        let labels = self.labels.get()?.as_deref()?;
        let peer = &pool.get(PeerEndpoint::of(state)?)?.endpoint;
        labels.has_topology(peer).then_some((labels, peer))
    }
}

/// Parameters of [`TopologyAffinityFilter`].
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TopologyFilterParameters {
    /// The farthest tier a candidate may share with the peer (default `host`).
    #[serde(default)]
    pub min_affinity: Option<Closeness>,
    /// Name of the `topology-extractor` to read (default `topology-extractor`).
    #[serde(default)]
    pub topology_producer_name: String,
}

/// Keeps the candidates close enough to the other stage's endpoint (see the module docs).
#[derive(Debug)]
pub struct TopologyAffinityFilter {
    min_affinity: Closeness,
    extractor: ExtractorRef,
}

impl TopologyAffinityFilter {
    /// A filter with `parameters`; `minAffinity: none` is refused (it would keep everything).
    pub fn new(parameters: TopologyFilterParameters) -> Result<Self, PluginError> {
        let min_affinity = parameters.min_affinity.unwrap_or(Closeness::Host);
        if min_affinity == Closeness::None {
            return Err(PluginError::InvalidParameters(
                "minAffinity: must be one of host, rack, zone, region".into(),
            ));
        }
        Ok(Self { min_affinity, extractor: ExtractorRef::new(parameters.topology_producer_name) })
    }
}

impl Filter for TopologyAffinityFilter {
    fn filter(
        &self,
        state: &mut CycleState,
        _request: &InferenceRequest,
        pool: &PoolSnapshot,
        candidates: &mut Vec<u32>,
    ) {
        let Some((labels, peer)) = self.extractor.peer(state, pool) else { return };
        let close_enough = |&position: &u32| {
            pool.get(position).is_some_and(|candidate| {
                labels.has_topology(&candidate.endpoint)
                    && labels.closeness(peer, &candidate.endpoint) <= self.min_affinity
            })
        };
        if candidates.iter().any(close_enough) {
            candidates.retain(close_enough);
        }
    }
}

impl BindPlugins for TopologyAffinityFilter {
    fn bind(&self, plugins: &ConstructedPlugins) -> Result<(), PluginError> {
        self.extractor.bind(plugins);
        Ok(())
    }
}

/// Parameters of [`TopologyAffinityScorer`].
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TopologyScorerParameters {
    /// Name of the `topology-extractor` to read (default `topology-extractor`).
    #[serde(default)]
    pub topology_producer_name: String,
}

/// Scores candidates by how close they are to the other stage's endpoint.
#[derive(Debug)]
pub struct TopologyAffinityScorer {
    extractor: ExtractorRef,
}

impl TopologyAffinityScorer {
    /// A scorer with `parameters`.
    pub fn new(parameters: TopologyScorerParameters) -> Self {
        Self { extractor: ExtractorRef::new(parameters.topology_producer_name) }
    }
}

impl Scorer for TopologyAffinityScorer {
    fn score(
        &self,
        state: &mut CycleState,
        _request: &InferenceRequest,
        candidates: Candidates<'_>,
        scores: &mut [f64],
    ) {
        let Some((labels, peer)) = self.extractor.peer(state, candidates.pool()) else { return };
        for (score, candidate) in scores.iter_mut().zip(candidates.iter()) {
            *score = labels.closeness(peer, &candidate.endpoint).score();
        }
    }
}

impl BindPlugins for TopologyAffinityScorer {
    fn bind(&self, plugins: &ConstructedPlugins) -> Result<(), PluginError> {
        self.extractor.bind(plugins);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(labels: &[(&str, &str)]) -> Endpoint {
        let mut endpoint = Endpoint::new(([10, 0, 0, 1], 8000).into());
        endpoint.labels =
            labels.iter().map(|(key, value)| ((*key).to_owned(), (*value).to_owned())).collect();
        endpoint
    }

    #[test]
    fn closeness_is_the_first_shared_tier_and_empty_values_match_nothing() {
        let labels = TopologyLabels::new(TopologyLabelParameters::default());
        let peer = at(&[
            ("kubernetes.io/hostname", "node-a"),
            ("topology.kubernetes.io/rack", "r1"),
            ("topology.kubernetes.io/zone", "z1"),
            ("topology.kubernetes.io/region", "eu"),
        ]);
        let same_host = at(&[("kubernetes.io/hostname", "node-a")]);
        let same_rack =
            at(&[("kubernetes.io/hostname", "node-b"), ("topology.kubernetes.io/rack", "r1")]);
        let same_zone = at(&[("topology.kubernetes.io/zone", "z1")]);
        let same_region =
            at(&[("topology.kubernetes.io/zone", "z2"), ("topology.kubernetes.io/region", "eu")]);
        let elsewhere = at(&[("topology.kubernetes.io/region", "us")]);
        let closeness = |candidate: &Endpoint| labels.closeness(&peer, candidate);
        assert_eq!(closeness(&same_host), Closeness::Host);
        assert_eq!(closeness(&same_rack), Closeness::Rack);
        assert_eq!(closeness(&same_zone), Closeness::Zone);
        assert_eq!(closeness(&same_region), Closeness::Region);
        assert_eq!(closeness(&elsewhere), Closeness::None);
        let blank = at(&[("kubernetes.io/hostname", "")]);
        assert_eq!(labels.closeness(&blank, &blank), Closeness::None);
        assert!(!labels.has_topology(&blank));
        let scores: Vec<f64> = [same_host, same_rack, same_zone, same_region, elsewhere]
            .iter()
            .map(|candidate| closeness(candidate).score())
            .collect();
        assert_eq!(scores, [1.0, 0.2, 0.05, 0.02, 0.0]);
    }

    #[test]
    fn custom_label_keys_replace_the_defaults() {
        let labels = TopologyLabels::new(TopologyLabelParameters {
            hostname: "example.com/node".into(),
            ..TopologyLabelParameters::default()
        });
        let a = at(&[("example.com/node", "n1"), ("kubernetes.io/hostname", "x")]);
        let b = at(&[("example.com/node", "n1"), ("kubernetes.io/hostname", "y")]);
        assert_eq!(labels.closeness(&a, &b), Closeness::Host);
        let c = at(&[("kubernetes.io/hostname", "x")]);
        assert_eq!(labels.closeness(&a, &c), Closeness::None, "the default key is not read");
    }

    #[test]
    fn min_affinity_takes_llm_d_level_names() {
        let parse = |yaml: serde_json::Value| {
            serde_json::from_value::<TopologyFilterParameters>(yaml)
                .map_err(|error| error.to_string())
                .and_then(|parameters| {
                    TopologyAffinityFilter::new(parameters).map_err(|error| error.to_string())
                })
        };
        let zone = parse(serde_json::json!({"minAffinity": "zone"})).unwrap();
        assert_eq!(zone.min_affinity, Closeness::Zone);
        assert_eq!(parse(serde_json::json!({})).unwrap().min_affinity, Closeness::Host);
        assert!(parse(serde_json::json!({"minAffinity": "none"})).is_err());
        assert!(parse(serde_json::json!({"minAffinity": "planet"})).is_err());
    }
}
