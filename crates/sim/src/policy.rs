//! Routing policies compared by the simulator.
//!
//! - `round-robin`: cycles through the servers (Envoy's ROUND_ROBIN).
//! - `random`: uniform choice (a Kubernetes Service through kube-proxy in iptables mode).
//! - `least-request`: Envoy's LEAST_REQUEST, power of two choices over the requests this
//!   gateway has in flight on each server (exact and instantaneous, as a proxy knows them).
//! - `epp`: the real [`scheduler_core::Scheduler`] built from an `EndpointPickerConfig`, fed the
//!   scraped (so lagging) metrics; its pre-request hooks run at each pick and its completion
//!   hooks when the simulated request ends. Built in: GIE's default profile (`epp`), its older
//!   load-only profile (`epp-queue-kv`), a prefix-heavy weighting (`epp-prefix-heavy`), the
//!   default profile with GIE's exact formulas (`epp-gie-exact`, [`gie_exact_config`]), and
//!   GIE's default on llm-d's precise prefix matches fed by the servers' KV events
//!   (`epp-precise`, [`PRECISE_CONFIG`]), and
//!   llm-d's prefill/decode disaggregation with either decider (`epp-pd-always`,
//!   `epp-pd-prefix`; [`PD_ALWAYS_CONFIG`], [`PD_PREFIX_CONFIG`]), for pools whose servers carry
//!   roles ([`crate::ServerRoles`]).
//! - `oracle`: reads the servers' true state and cache contents and picks the server with the
//!   lowest estimated time to first token: queued prompt work ahead plus the request's own
//!   uncached prompt, in steps of the server's token budget, plus adapter-load and capacity
//!   penalties. It is a greedy reference with perfect information, not an optimum or a bound:
//!   placing each request where it starts soonest can scatter conversations and so lose cache
//!   locality under heavy load, where a policy that keeps affinity does better.

use std::path::Path;

use std::sync::Arc;

use parking_lot::Mutex;
use scheduler_core::{ConfigError, EndpointPickerConfig};
use scorers::precise_prefix::EventFedProducer;

/// The built-in plugins as the simulator builds them. The engine flushes the scheduler after
/// every decision, so the prefix indexes apply their records then, on the simulation's
/// thread, rather than handing each to a writer thread and waiting for it (2-3x the CPU).
pub(crate) fn registry() -> scheduler_core::PluginRegistry {
    registry_feeding(&EventFedProducers::default())
}

/// The precise producers a registry built, for the engine to feed with the servers' events.
pub(crate) type EventFedProducers = Arc<Mutex<Vec<Arc<EventFedProducer>>>>;

/// [`registry`], where `precise-prefix-cache-producer` is fed by the simulated servers' KV
/// events instead of ZMQ subscriptions; every one built is added to `producers`.
pub(crate) fn registry_feeding(producers: &EventFedProducers) -> scheduler_core::PluginRegistry {
    let records = scorers::prefix_cache::RecordApplication::OnFlush;
    let mut registry =
        scorers::builtin_registry_with(scorers::BuiltinOptions { prefix_records: records });
    let built = Arc::clone(producers);
    registry.register(scorers::precise_prefix::PRODUCER_TYPE_NAME, move |spec| {
        let (plugin, producer) = EventFedProducer::plugin(spec, records)?;
        built.lock().push(producer);
        Ok(plugin)
    });
    registry
}

/// GIE's default profile with the prefix-cache scorer reading llm-d's
/// `precise-prefix-cache-producer`: prefix matches from what the servers report holding in
/// their KV-cache events (16-token blocks, as the simulated servers cache), not from where
/// prompts were sent. The engine sends this policy's requests as token ids.
pub const PRECISE_CONFIG: &str = "\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- name: precise
  type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig:
      blockSizeTokens: 16
- type: prefix-cache-scorer
  parameters:
    prefixMatchInfoProducerName: precise
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: max-score-picker
";

/// A prefix-heavy variant of the default profile: prefix-cache affinity weighted 5 against
/// queue 2 and KV-cache utilisation 1, for workloads dominated by long shared prefixes.
pub fn prefix_heavy_config() -> EndpointPickerConfig {
    EndpointPickerConfig::gie_default()
        .with_weight("kv-cache-utilization-scorer", 1.0)
        .with_weight("prefix-cache-scorer", 5.0)
}

/// GIE's default profile with GIE's exact formulas: prefix affinity whatever the load
/// (`affinityLoadTolerance: 0`) and load scorers that read only the scraped metrics
/// (`lagCompensation: false`). epp-rs's defaults depart from both; this is the reference they
/// are measured against.
pub fn gie_exact_config() -> EndpointPickerConfig {
    let no_lag_compensation = serde_json::json!({"lagCompensation": false});
    EndpointPickerConfig::gie_default()
        .with_plugin_parameters(
            "prefix-cache-scorer",
            serde_json::json!({"affinityLoadTolerance": 0}),
        )
        .with_plugin_parameters("queue-scorer", no_lag_compensation.clone())
        .with_plugin_parameters("kv-cache-utilization-scorer", no_lag_compensation)
}

/// llm-d's P/D configuration with `always-disagg-pd-decider`: every request is prefilled on a
/// `prefill` server and decoded on a `decode` one. The shape of llm-d-router's
/// `deploy/config/pd-epp-config.yaml` (approximate prefix-cache producer, prefix-cache scorer
/// weighted 2 and queue scorer 1 in both profiles, role filters, max-score picker), with 16-token
/// blocks as in its `sim-pd-epp-config.yaml`, since the simulated servers cache 16-token blocks.
pub const PD_ALWAYS_CONFIG: &str = "\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
  parameters:
    blockSizeTokens: 16
    maxPrefixTokensToMatch: 16384
    lruCapacityPerServer: 31250
- type: prefix-cache-scorer
- type: queue-scorer
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: disagg-profile-handler
  parameters:
    deciders:
      prefill: always-disagg-pd-decider
- type: always-disagg-pd-decider
schedulingProfiles:
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: max-score-picker
  - pluginRef: prefix-cache-scorer
    weight: 2
  - pluginRef: queue-scorer
    weight: 1
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: max-score-picker
  - pluginRef: prefix-cache-scorer
    weight: 2
  - pluginRef: queue-scorer
    weight: 1
";

/// [`PD_ALWAYS_CONFIG`] with `prefix-based-pd-decider`: a request is prefilled apart only when
/// its decode server's cache (as the prefix index estimates it) leaves at least
/// `nonCachedTokens` prompt tokens to compute; otherwise the decode server runs it whole. The
/// threshold is 512, the value of the decider's example in llm-d-router's
/// `profilehandler/disagg/README.md` (the sample deployment configs use 16, which prefills
/// apart nearly every follow-up turn); [`Policy::pd_prefix_based`] sets another.
pub const PD_PREFIX_CONFIG: &str = "\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
  parameters:
    blockSizeTokens: 16
    maxPrefixTokensToMatch: 16384
    lruCapacityPerServer: 31250
- type: prefix-cache-scorer
- type: queue-scorer
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: disagg-profile-handler
  parameters:
    deciders:
      prefill: prefix-based-pd-decider
- type: prefix-based-pd-decider
  parameters:
    nonCachedTokens: 512
schedulingProfiles:
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: max-score-picker
  - pluginRef: prefix-cache-scorer
    weight: 2
  - pluginRef: queue-scorer
    weight: 1
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: max-score-picker
  - pluginRef: prefix-cache-scorer
    weight: 2
  - pluginRef: queue-scorer
    weight: 1
";

/// The `nonCachedTokens` of [`PD_PREFIX_CONFIG`].
pub const PD_PREFIX_NON_CACHED_TOKENS: u32 = 512;

/// How requests are assigned to servers.
#[derive(Clone, Debug)]
pub enum Policy {
    /// Cycle through the servers.
    RoundRobin,
    /// Uniformly random server.
    Random,
    /// Power of two choices on in-flight requests.
    LeastRequest,
    /// Lowest estimated time to first token from the servers' true state.
    Oracle,
    /// The real scheduler with a configuration.
    Epp {
        /// Name in reports.
        name: String,
        /// The configuration.
        config: Box<EndpointPickerConfig>,
    },
}

/// Why a policy specification was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Not a known policy name.
    #[error(
        "unknown policy '{0}': expected round-robin, random, least-request, oracle, epp (GIE default), epp-queue-kv, epp-prefix-heavy, epp-gie-exact, epp-precise, epp-precise-speculative, epp-pd-always, epp-pd-prefix, or epp:NAME=CONFIG.yaml"
    )]
    Unknown(String),
    /// The configuration file could not be read.
    #[error("cannot read EndpointPickerConfig {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The configuration is invalid or names plugins the registry lacks.
    #[error("EndpointPickerConfig {origin} is not usable: {source}")]
    Config {
        /// The file or built-in configuration.
        origin: String,
        /// What is wrong.
        source: Box<ConfigError>,
    },
}

impl Policy {
    /// The name used in reports.
    pub fn name(&self) -> &str {
        match self {
            Self::RoundRobin => "round-robin",
            Self::Random => "random",
            Self::LeastRequest => "least-request",
            Self::Oracle => "oracle",
            Self::Epp { name, .. } => name,
        }
    }

    /// GIE's default profile (queue, KV-cache utilisation and prefix-cache scorers).
    pub fn gie_default() -> Self {
        Self::Epp {
            name: "epp-default".to_owned(),
            config: Box::new(EndpointPickerConfig::gie_default()),
        }
    }

    /// GIE's default profile on precise prefix matches ([`PRECISE_CONFIG`]), named
    /// `epp-precise`.
    pub fn precise() -> Self {
        Self::builtin("epp-precise", PRECISE_CONFIG)
    }

    /// [`Self::precise`] with llm-d's `speculativeIndexing` (picks count as held for 2 s, or
    /// until the events say otherwise), named `epp-precise-speculative`.
    pub fn precise_speculative() -> Self {
        let yaml = PRECISE_CONFIG.replace(
            "      blockSizeTokens: 16\n",
            "      blockSizeTokens: 16\n    speculativeIndexing: true\n",
        );
        Self::builtin("epp-precise-speculative", &yaml)
    }

    /// P/D with `always-disagg-pd-decider` ([`PD_ALWAYS_CONFIG`]), named `epp-pd-always`.
    pub fn pd_always() -> Self {
        Self::builtin("epp-pd-always", PD_ALWAYS_CONFIG)
    }

    /// P/D with `prefix-based-pd-decider` at `non_cached_tokens` ([`PD_PREFIX_CONFIG`]), named
    /// `epp-pd-prefix`.
    pub fn pd_prefix_based(non_cached_tokens: u32) -> Self {
        let yaml = PD_PREFIX_CONFIG.replace(
            &format!("nonCachedTokens: {PD_PREFIX_NON_CACHED_TOKENS}"),
            &format!("nonCachedTokens: {non_cached_tokens}"),
        );
        Self::builtin("epp-pd-prefix", &yaml)
    }

    fn builtin(name: &str, yaml: &str) -> Self {
        match Self::epp_from_yaml(name, yaml, name) {
            Ok(policy) => policy,
            Err(error) => unreachable!("the built-in {name} config is valid: {error}"),
        }
    }

    /// An EPP policy from YAML text; checks that the built-in registry can build it.
    pub fn epp_from_yaml(name: &str, yaml: &str, origin: &str) -> Result<Self, PolicyError> {
        let config = EndpointPickerConfig::from_yaml(yaml).map_err(|source| {
            PolicyError::Config { origin: origin.to_owned(), source: Box::new(source) }
        })?;
        Self::epp_from_config(name, config, origin)
    }

    /// An EPP policy from a config; checks that the built-in registry can build it.
    pub fn epp_from_config(
        name: &str,
        config: EndpointPickerConfig,
        origin: &str,
    ) -> Result<Self, PolicyError> {
        config.build(&registry()).map_err(|source| PolicyError::Config {
            origin: origin.to_owned(),
            source: Box::new(source),
        })?;
        Ok(Self::Epp { name: name.to_owned(), config: Box::new(config) })
    }

    /// Parses `round-robin`, `random`, `least-request`, `oracle`, `epp` (GIE's default profile),
    /// `epp-queue-kv` ([`EndpointPickerConfig::queue_kv`]), `epp-prefix-heavy`
    /// ([`prefix_heavy_config`]), `epp-gie-exact` ([`gie_exact_config`]), `epp-pd-always`, `epp-pd-prefix`, or `epp:NAME=PATH` / `epp:PATH` (named after the file stem).
    pub fn parse(spec: &str) -> Result<Self, PolicyError> {
        match spec {
            "round-robin" | "rr" => Ok(Self::RoundRobin),
            "random" => Ok(Self::Random),
            "least-request" => Ok(Self::LeastRequest),
            "oracle" => Ok(Self::Oracle),
            "epp" | "epp-default" => Ok(Self::gie_default()),
            "epp-queue-kv" => Self::epp_from_config(
                "epp-queue-kv",
                EndpointPickerConfig::queue_kv(),
                "epp-queue-kv",
            ),
            "epp-prefix-heavy" => {
                Self::epp_from_config("epp-prefix-heavy", prefix_heavy_config(), "epp-prefix-heavy")
            }
            "epp-gie-exact" => {
                Self::epp_from_config("epp-gie-exact", gie_exact_config(), "epp-gie-exact")
            }
            "epp-pd-always" => Ok(Self::pd_always()),
            "epp-precise" => Ok(Self::precise()),
            "epp-precise-speculative" => Ok(Self::precise_speculative()),
            "epp-pd-prefix" => Ok(Self::pd_prefix_based(PD_PREFIX_NON_CACHED_TOKENS)),
            _ => {
                let Some(rest) = spec.strip_prefix("epp:") else {
                    return Err(PolicyError::Unknown(spec.to_owned()));
                };
                let (name, path) = match rest.split_once('=') {
                    Some((name, path)) => (name.to_owned(), path),
                    None => {
                        let stem = Path::new(rest).file_stem().and_then(|stem| stem.to_str());
                        (format!("epp-{}", stem.unwrap_or(rest)), rest)
                    }
                };
                let yaml = std::fs::read_to_string(path)
                    .map_err(|source| PolicyError::Read { path: path.to_owned(), source })?;
                Self::epp_from_yaml(&name, &yaml, path)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_errors_name_the_offender() {
        for spec in [
            "rr",
            "random",
            "least-request",
            "oracle",
            "epp",
            "epp-queue-kv",
            "epp-prefix-heavy",
            "epp-gie-exact",
            "epp-precise",
            "epp-precise-speculative",
            "epp-pd-always",
            "epp-pd-prefix",
        ] {
            assert!(Policy::parse(spec).is_ok(), "{spec}");
        }
        // The threshold is substituted, not left at the default.
        let Policy::Epp { config, .. } = Policy::pd_prefix_based(2048) else { panic!() };
        let yaml = format!("{config:?}");
        assert!(yaml.contains("2048") && !yaml.contains("512"), "{yaml}");
        let error = Policy::parse("fastest").unwrap_err();
        assert!(error.to_string().contains("'fastest'"), "{error}");
        let error = Policy::parse("epp:/nonexistent/config.yaml").unwrap_err();
        assert!(error.to_string().contains("/nonexistent/config.yaml"), "{error}");
        let error =
            Policy::epp_from_yaml("x", "plugins:\n- type: no-such-scorer\n", "inline").unwrap_err();
        assert!(error.to_string().contains("inline"), "{error}");
    }
}
