//! The `saturationDetector` and `flowControl` sections of `EndpointPickerConfig`, as typed
//! serde structs that refuse unknown keys and bad values; the loader names the field path of
//! every error (`flowControl.priorityBands[1].maxBytes: ...`).
//!
//! `flowControl` keys (GIE v1.5 / llm-d names), read into [`FlowControlConfig`]:
//! - `maxRequests`, `maxBytes`: global caps on queued requests and queued bytes; Kubernetes
//!   quantities (`100`, `"2k"`, `"1Gi"`); absent or `0` means unbounded.
//! - `defaultRequestTTL`: queue TTL of a request (Go duration or milliseconds; default 60 s;
//!   `0` means no TTL).
//! - `noEndpointRequestTTL`: how long a queued request may wait while the pool has no
//!   endpoints (re-evaluated as the pool changes; see the controller); absent, the usual TTL
//!   applies in both regimes.
//! - `defaultPriorityBand`: the band template for priorities not listed in `priorityBands`.
//! - `defaultNegativePriorityBand`: the template for unlisted priorities below zero; absent,
//!   they use `defaultPriorityBand`.
//! - `priorityBands`: list of bands ([`BandConfig`]), each with `priority` (required, distinct),
//!   `maxRequests`, `maxBytes`, `defaultRequestTTL`, `fairnessPolicyRef` and `orderingPolicyRef`.
//! - `usageLimitPolicyPluginRef`: the usage limit policy plugin (default: a
//!   `static-usage-limit-policy` with threshold 1, which gates nothing).
//! - `saturationDetector`: `{pluginRef}` naming a declared saturation detector plugin.
//! - `enableEviction`: evict sheddable requests in flight when a higher priority waits.
//!
//! Policy references (`fairnessPolicyRef`, `orderingPolicyRef`, `usageLimitPolicyPluginRef`)
//! name a plugin declared under `plugins:`, or a policy type name, which works undeclared as
//! the Go EPP registers its default policies under their type names. [`resolve_policies`]
//! turns the references into policies once the plugins are constructed.
//!
//! The top-level `saturationDetector` ([`SaturationDetectorSection`]) holds either the
//! utilization detector's thresholds ([`UtilizationThresholds`]: `queueDepthThreshold`,
//! `kvCacheUtilThreshold`, `metricsStalenessThreshold`) or `pluginRef` alone (GIE v1.5 form).
//!
//! Which detector a config names is resolved against the constructed plugins by
//! [`configured_detector`]: a plugin qualifies by playing the saturation detector role, so
//! detector type names are known to the plugin registry alone.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::config::{ConstructedPlugins, EndpointPickerConfig};
use crate::flow::policy::{
    FlowPolicy, UsageLimitPolicy, fairness_by_type, ordering_by_type, usage_limit_by_type,
};
use crate::flow::program_aware::ProgramAwareFairness;
use crate::flow::saturation::{
    SaturationDetector, UTILIZATION_DETECTOR_TYPE, UtilizationDetector, UtilizationThresholds,
};
use crate::flow::units;

/// Name of the feature gate that turns queueing flow control on.
pub const FLOW_CONTROL_FEATURE_GATE: &str = "flowControl";
/// Default `defaultRequestTTL`.
pub const DEFAULT_REQUEST_TTL: Duration = Duration::from_secs(60);

/// A saturation detector reference that cannot be resolved. Every variant names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FlowConfigError {
    /// `pluginRef` names no declared plugin.
    #[error("{field}: '{name}' names no declared plugin")]
    UnknownPlugin {
        /// The field holding the reference, e.g. `saturationDetector.pluginRef`.
        field: &'static str,
        /// The name referenced.
        name: String,
    },
    /// `pluginRef` names a plugin that is not a saturation detector.
    #[error("{field}: '{name}' (type '{type_name}') is not a saturation detector")]
    NotADetector {
        /// The field holding the reference.
        field: &'static str,
        /// The name referenced.
        name: String,
        /// The plugin's type.
        type_name: String,
    },
    /// A policy reference names neither a declared plugin nor a policy type.
    #[error("{field}: '{name}' names no declared plugin and no {expected} type")]
    UnknownPolicy {
        /// The field holding the reference, e.g. `flowControl.priorityBands[0].fairnessPolicyRef`.
        field: String,
        /// The name referenced.
        name: String,
        /// The kind of policy the field takes.
        expected: &'static str,
    },
    /// A policy reference names a declared plugin of another kind.
    #[error("{field}: '{name}' (type '{type_name}') is not a {expected}")]
    WrongPolicyKind {
        /// The field holding the reference.
        field: String,
        /// The name referenced.
        name: String,
        /// The plugin's type.
        type_name: String,
        /// The kind of policy the field takes.
        expected: &'static str,
    },
    /// Two `metricsStalenessThreshold` values in one config: one threshold applies to the pool.
    #[error(
        "metricsStalenessThreshold is {first:?} in {first_field} but {second:?} in {second_field}: one staleness threshold applies to the whole pool"
    )]
    ConflictingStaleness {
        /// Where the first value was found.
        first_field: String,
        /// The first value.
        first: Duration,
        /// Where the second value was found.
        second_field: String,
        /// The second value.
        second: Duration,
    },
}

/// How a band chooses the next flow to serve (`fairnessPolicyRef`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum FairnessPolicy {
    /// `global-strict-fairness-policy`: the best head request across all flows (oldest under
    /// FCFS), as if the band were one queue.
    #[default]
    GlobalStrict,
    /// `round-robin-fairness-policy`: flows take turns, one request each.
    RoundRobin,
    /// `program-aware-fairness`: the flow (program) with the least attained service goes
    /// first, head-of-queue age breaking near ties. Shared with the plugin's request hooks,
    /// which account each program's service.
    ProgramAware(Arc<ProgramAwareFairness>),
}

/// How a flow orders its own requests (`orderingPolicyRef`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OrderingPolicy {
    /// `fcfs-ordering-policy`: first come, first served.
    #[default]
    Fcfs,
    /// `edf-ordering-policy`: earliest TTL deadline first (no deadline last, FCFS among ties).
    Edf,
    /// `slo-deadline-ordering-policy`: earliest arrival plus `x-llm-d-slo-ttft-ms` first (no
    /// valid objective last, FCFS among ties).
    SloDeadline,
}

/// Settings of one priority band: an entry of `priorityBands`, `defaultPriorityBand` or
/// `defaultNegativePriorityBand`.
///
/// Deserialised on its own (as the templates are), `priority` is optional; entries of
/// `priorityBands` require it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(from = "RawBand")]
pub struct BandConfig {
    /// The priority the band serves.
    pub priority: i32,
    /// Cap on queued requests in the band; `None` (or `0` in the config) is unbounded.
    pub max_requests: Option<u64>,
    /// Cap on queued bytes in the band; `None` (or `0` in the config) is unbounded.
    pub max_bytes: Option<u64>,
    /// TTL of the band's requests; `None` falls back to the global default.
    pub default_request_ttl: Option<Duration>,
    /// `fairnessPolicyRef` as written: a plugin name or a fairness policy type.
    pub fairness_ref: Option<String>,
    /// `orderingPolicyRef` as written: a plugin name or an ordering policy type.
    pub ordering_ref: Option<String>,
    /// How flows take turns: the policy `fairness_ref` names (a type name is read at once; a
    /// plugin name once [`resolve_policies`] has run).
    pub fairness: FairnessPolicy,
    /// How a flow orders its requests: the policy `ordering_ref` names.
    pub ordering: OrderingPolicy,
}

/// A band as written, before policy type names are read.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawBand {
    priority: i32,
    #[serde(deserialize_with = "units::cap")]
    max_requests: Option<u64>,
    #[serde(deserialize_with = "units::cap")]
    max_bytes: Option<u64>,
    #[serde(rename = "defaultRequestTTL", deserialize_with = "units::optional_duration")]
    default_request_ttl: Option<Duration>,
    fairness_policy_ref: Option<String>,
    ordering_policy_ref: Option<String>,
}

impl From<RawBand> for BandConfig {
    fn from(raw: RawBand) -> Self {
        // Empty references mean the default, as Go's `omitempty` strings do.
        let fairness_ref = raw.fairness_policy_ref.filter(|name| !name.is_empty());
        let ordering_ref = raw.ordering_policy_ref.filter(|name| !name.is_empty());
        Self {
            priority: raw.priority,
            max_requests: raw.max_requests,
            max_bytes: raw.max_bytes,
            default_request_ttl: raw.default_request_ttl,
            fairness: fairness_ref.as_deref().and_then(fairness_by_type).unwrap_or_default(),
            ordering: ordering_ref.as_deref().and_then(ordering_by_type).unwrap_or_default(),
            fairness_ref,
            ordering_ref,
        }
    }
}

impl BandConfig {
    /// A band for `priority` with this band's other settings (for the default template).
    pub fn for_priority(&self, priority: i32) -> Self {
        Self { priority, ..self.clone() }
    }
}

/// Settings of the flow controller: the `flowControl` section (absent or null: the defaults).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct FlowControlConfig {
    /// Cap on queued requests across bands; `None` (or `0` in the config) is unbounded.
    #[serde(deserialize_with = "units::cap")]
    pub max_requests: Option<u64>,
    /// Cap on queued bytes across bands; `None` (or `0` in the config) is unbounded.
    #[serde(deserialize_with = "units::cap")]
    pub max_bytes: Option<u64>,
    /// TTL of a request without a band or per-request TTL; zero means none.
    #[serde(rename = "defaultRequestTTL", deserialize_with = "units::duration")]
    pub default_request_ttl: Duration,
    /// Queue budget while the pool has no endpoints (`noEndpointRequestTTL`), replacing the
    /// usual TTL for as long as that holds; `None` keeps the usual TTL, zero means none.
    #[serde(rename = "noEndpointRequestTTL", deserialize_with = "units::optional_duration")]
    pub no_endpoint_request_ttl: Option<Duration>,
    /// Template for priorities without a band of their own (`defaultPriorityBand`).
    #[serde(rename = "defaultPriorityBand", deserialize_with = "null_as_default")]
    pub default_band: BandConfig,
    /// Template for negative priorities without a band of their own
    /// (`defaultNegativePriorityBand`); `None` uses `default_band`.
    #[serde(rename = "defaultNegativePriorityBand")]
    pub default_negative_band: Option<BandConfig>,
    /// Bands configured explicitly (`priorityBands`), with distinct priorities.
    #[serde(rename = "priorityBands", deserialize_with = "listed_bands")]
    pub bands: Vec<BandConfig>,
    /// `usageLimitPolicyPluginRef` as written, when given.
    #[serde(rename = "usageLimitPolicyPluginRef")]
    pub usage_limit_ref: Option<String>,
    /// The usage limit policy in force: the one `usage_limit_ref` names once
    /// [`resolve_policies`] has run, else the default (static, threshold 1, no gating).
    #[serde(skip)]
    pub usage_limit: UsageLimitPolicy,
    /// `saturationDetector.pluginRef` inside `flowControl`, when given.
    #[serde(rename = "saturationDetector", deserialize_with = "detector_ref")]
    pub saturation_detector_ref: Option<String>,
    /// Whether sheddable requests in flight may be evicted to make room for a waiting request
    /// of higher priority (`enableEviction`).
    pub enable_eviction: bool,
}

impl Default for FlowControlConfig {
    fn default() -> Self {
        Self {
            max_requests: None,
            max_bytes: None,
            default_request_ttl: DEFAULT_REQUEST_TTL,
            no_endpoint_request_ttl: None,
            default_band: BandConfig::default(),
            default_negative_band: None,
            bands: Vec::new(),
            usage_limit_ref: None,
            usage_limit: UsageLimitPolicy::default(),
            saturation_detector_ref: None,
            enable_eviction: false,
        }
    }
}

impl FlowControlConfig {
    /// The settings for `priority`: its configured band, else the negative template for a
    /// priority below zero when there is one, else the default template.
    pub fn band_for(&self, priority: i32) -> BandConfig {
        if let Some(band) = self.bands.iter().find(|band| band.priority == priority) {
            return band.clone();
        }
        let template = match &self.default_negative_band {
            Some(negative) if priority < 0 => negative,
            _ => &self.default_band,
        };
        template.for_priority(priority)
    }
}

/// Resolves the policy references of `config` against `plugins`: each of `fairnessPolicyRef`,
/// `orderingPolicyRef` (in every band and template) and `usageLimitPolicyPluginRef` names a
/// declared plugin, whose policy is taken, or else a policy type, whose default policy is
/// taken. Errors name the field holding the reference.
pub fn resolve_policies(
    config: &mut FlowControlConfig,
    plugins: &ConstructedPlugins,
) -> Result<(), FlowConfigError> {
    let templates =
        [("defaultPriorityBand".to_owned(), &mut config.default_band)].into_iter().chain(
            config
                .default_negative_band
                .as_mut()
                .map(|band| ("defaultNegativePriorityBand".to_owned(), band)),
        );
    let listed = config
        .bands
        .iter_mut()
        .enumerate()
        .map(|(index, band)| (format!("priorityBands[{index}]"), band));
    for (path, band) in templates.chain(listed) {
        if let Some(name) = &band.fairness_ref {
            let field = format!("flowControl.{path}.fairnessPolicyRef");
            band.fairness = resolve(plugins, name, field, FlowPolicy::fairness, fairness_by_type)?;
        }
        if let Some(name) = &band.ordering_ref {
            let field = format!("flowControl.{path}.orderingPolicyRef");
            band.ordering = resolve(plugins, name, field, FlowPolicy::ordering, ordering_by_type)?;
        }
    }
    if let Some(name) = config.usage_limit_ref.as_deref().filter(|name| !name.is_empty()) {
        let field = "flowControl.usageLimitPolicyPluginRef".to_owned();
        config.usage_limit =
            resolve(plugins, name, field, FlowPolicy::usage_limit, usage_limit_by_type)?;
    }
    Ok(())
}

/// The policy `name` refers to: the declared plugin of that name (which must be a policy of
/// the kind `pick` extracts), else the policy type of that name.
fn resolve<T: PolicyKind>(
    plugins: &ConstructedPlugins,
    name: &str,
    field: String,
    pick: fn(&FlowPolicy) -> Option<T>,
    by_type: fn(&str) -> Option<T>,
) -> Result<T, FlowConfigError> {
    match plugins.get(name) {
        Some(declared) => declared.plugin.flow_policy.as_ref().and_then(pick).ok_or_else(|| {
            FlowConfigError::WrongPolicyKind {
                field,
                name: name.to_owned(),
                type_name: declared.type_name.clone(),
                expected: T::KIND,
            }
        }),
        None => by_type(name).ok_or_else(|| FlowConfigError::UnknownPolicy {
            field,
            name: name.to_owned(),
            expected: T::KIND,
        }),
    }
}

/// A kind of flow-control policy, named in errors.
trait PolicyKind {
    const KIND: &'static str;
}

impl PolicyKind for FairnessPolicy {
    const KIND: &'static str = "fairness policy";
}

impl PolicyKind for OrderingPolicy {
    const KIND: &'static str = "ordering policy";
}

impl PolicyKind for UsageLimitPolicy {
    const KIND: &'static str = "usage limit policy";
}

/// The top-level `saturationDetector` section.
#[derive(Clone, Debug, PartialEq)]
pub enum SaturationDetectorSection {
    /// The thresholds of the utilization detector (GIE v1.3-v1.4 form); absent keys default.
    Thresholds(UtilizationThresholds),
    /// `pluginRef` alone: the name of a declared saturation detector plugin (GIE v1.5 form).
    PluginRef(String),
}

impl Default for SaturationDetectorSection {
    fn default() -> Self {
        Self::Thresholds(UtilizationThresholds::default())
    }
}

impl<'de> Deserialize<'de> for SaturationDetectorSection {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let split: SplitMap<String, UtilizationThresholds> = split_map(deserializer, "pluginRef")?;
        match (split.taken, split.first_other_key) {
            (None, _) => Ok(Self::Thresholds(split.rest)),
            (Some(name), None) => Ok(Self::PluginRef(name)),
            (Some(_), Some(key)) => Err(de::Error::custom(format_args!(
                "{key} next to pluginRef: thresholds belong in the parameters of the plugin named by pluginRef"
            ))),
        }
    }
}

/// The saturation detector `config` asks for: the plugin named by
/// `flowControl.saturationDetector.pluginRef` or, failing that, by the top-level
/// `saturationDetector.pluginRef`; else a utilization detector with the top-level thresholds
/// (or the defaults). The plugin is taken from `plugins`, so the detector is the instance whose
/// hooks the scheduler built from the same plugins runs.
pub fn configured_detector(
    config: &EndpointPickerConfig,
    plugins: &ConstructedPlugins,
) -> Result<Arc<dyn SaturationDetector>, FlowConfigError> {
    let in_flow_control =
        config.flow_control.as_ref().and_then(|flow| flow.saturation_detector_ref.as_deref());
    let (field, name) = match (in_flow_control, &config.saturation_detector) {
        (Some(name), _) => ("flowControl.saturationDetector.pluginRef", name),
        (None, Some(SaturationDetectorSection::PluginRef(name))) => {
            ("saturationDetector.pluginRef", name.as_str())
        }
        (None, Some(SaturationDetectorSection::Thresholds(thresholds))) => {
            return Ok(Arc::new(UtilizationDetector::new(*thresholds)));
        }
        (None, None) => return Ok(Arc::new(UtilizationDetector::default())),
    };
    let declared = plugins
        .get(name)
        .ok_or_else(|| FlowConfigError::UnknownPlugin { field, name: name.to_owned() })?;
    declared.plugin.saturation_detector.clone().ok_or_else(|| FlowConfigError::NotADetector {
        field,
        name: name.to_owned(),
        type_name: declared.type_name.clone(),
    })
}

/// The `metricsStalenessThreshold` a config sets explicitly, in the top-level
/// `saturationDetector` thresholds or in the parameters of a `utilization-detector` plugin;
/// `None` when it sets none. Adapters lift it into the pool's
/// [`StalenessPolicy`](crate::StalenessPolicy), so one threshold applies to readiness,
/// admission and routing; two different values are an error. Unparsable plugin parameters
/// are left to the plugin's construction to report.
pub fn configured_metrics_staleness(
    config: &EndpointPickerConfig,
) -> Result<Option<Duration>, FlowConfigError> {
    let top_level = match &config.saturation_detector {
        Some(SaturationDetectorSection::Thresholds(thresholds)) => {
            thresholds.metrics_staleness.map(|value| ("saturationDetector".to_owned(), value))
        }
        _ => None,
    };
    let plugins = config
        .plugins
        .iter()
        .filter(|plugin| plugin.type_name == UTILIZATION_DETECTOR_TYPE)
        .filter_map(|plugin| {
            let parameters = plugin.parameters.clone()?;
            let thresholds: UtilizationThresholds = serde_json::from_value(parameters).ok()?;
            let value = thresholds.metrics_staleness?;
            Some((format!("plugin '{}'", plugin.effective_name()), value))
        });
    let mut found: Option<(String, Duration)> = None;
    for (field, value) in top_level.into_iter().chain(plugins) {
        match &found {
            None => found = Some((field, value)),
            Some((first_field, first)) if *first != value => {
                return Err(FlowConfigError::ConflictingStaleness {
                    first_field: first_field.clone(),
                    first: *first,
                    second_field: field,
                    second: value,
                });
            }
            Some(_) => {}
        }
    }
    Ok(found.map(|(_, value)| value))
}

/// A map section that may be null (YAML `key:` with nothing after it): null reads as empty.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// `flowControl.saturationDetector`: `{pluginRef}`, empty or null.
fn detector_ref<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct DetectorRef {
        #[serde(default)]
        plugin_ref: Option<String>,
    }
    Ok(Option::<DetectorRef>::deserialize(deserializer)?.and_then(|section| section.plugin_ref))
}

/// `priorityBands`: each entry must carry a `priority` no earlier entry has.
fn listed_bands<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<BandConfig>, D::Error> {
    struct Bands;

    impl<'de> Visitor<'de> for Bands {
        type Value = Vec<BandConfig>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of priority bands")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut bands = Vec::new();
            while let Some(band) = seq.next_element_seed(ListedBand { earlier: &bands })? {
                bands.push(band);
            }
            Ok(bands)
        }
    }

    deserializer.deserialize_seq(Bands)
}

/// One entry of `priorityBands`, checked against the entries before it. The checks run while
/// the entry is read, so errors carry the entry's path (`priorityBands[1]`).
struct ListedBand<'a> {
    earlier: &'a [BandConfig],
}

impl<'de> DeserializeSeed<'de> for ListedBand<'_> {
    type Value = BandConfig;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<BandConfig, D::Error> {
        let split: SplitMap<i32, BandConfig> = split_map(deserializer, "priority")?;
        let priority = split.taken.ok_or_else(|| de::Error::missing_field("priority"))?;
        if self.earlier.iter().any(|band| band.priority == priority) {
            return Err(de::Error::custom(format_args!("priority {priority} already has a band")));
        }
        Ok(BandConfig { priority, ..split.rest })
    }
}

/// A map read in two parts: the entry `key` as a `V`, and every other entry as a `T` (a
/// derived struct). Lets one section accept a key its parameter struct does not own (the
/// top-level `saturationDetector`'s `pluginRef`), or require a key the struct leaves optional
/// (`priority` in `priorityBands`), without declaring the struct's fields twice.
struct SplitMap<V, T> {
    /// The value of `key`, when present.
    taken: Option<V>,
    /// The first key other than `key`, when any.
    first_other_key: Option<String>,
    /// The other entries.
    rest: T,
}

fn split_map<'de, D, V, T>(deserializer: D, key: &'static str) -> Result<SplitMap<V, T>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
    T: Deserialize<'de>,
{
    deserializer.deserialize_map(SplitVisitor { key, marker: PhantomData })
}

struct SplitVisitor<V, T> {
    key: &'static str,
    marker: PhantomData<fn() -> (V, T)>,
}

impl<'de, V: Deserialize<'de>, T: Deserialize<'de>> Visitor<'de> for SplitVisitor<V, T> {
    type Value = SplitMap<V, T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let mut entries =
            OtherEntries { map, key: self.key, fields: &[], taken: None, first_other_key: None };
        let rest = T::deserialize(OtherEntriesDeserializer(&mut entries))?;
        Ok(SplitMap { taken: entries.taken, first_other_key: entries.first_other_key, rest })
    }
}

/// The entries of a map but `key`, whose value is read aside as it goes by.
struct OtherEntries<A, Taken> {
    map: A,
    key: &'static str,
    /// The fields of the struct reading the other entries (known once it asks for them).
    fields: &'static [&'static str],
    taken: Option<Taken>,
    first_other_key: Option<String>,
}

impl<'de, A: MapAccess<'de>, Taken: Deserialize<'de>> MapAccess<'de> for OtherEntries<A, Taken> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let accepted = AcceptedKey { fields: self.fields, taken: self.key };
        while let Some(key) = self.map.next_key_seed(accepted)? {
            if key == self.key {
                self.taken = Some(self.map.next_value()?);
                continue;
            }
            self.first_other_key.get_or_insert_with(|| key.clone());
            return seed.deserialize(key.into_deserializer()).map(Some);
        }
        Ok(None)
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

/// A key of a split map: the taken key or one of the struct's fields. Unknown keys are refused
/// here rather than by the struct, so the accepted keys listed include the taken one, and the
/// error's path ends with the key, as the struct's own would.
#[derive(Clone, Copy)]
struct AcceptedKey {
    fields: &'static [&'static str],
    taken: &'static str,
}

impl<'de> DeserializeSeed<'de> for AcceptedKey {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        let key = String::deserialize(deserializer)?;
        let known = self.fields.is_empty() || self.fields.contains(&key.as_str());
        if key == self.taken || known {
            return Ok(key);
        }
        let mut expected = self.fields.join(", ");
        if !self.fields.contains(&self.taken) {
            expected = format!("{expected}, {}", self.taken);
        }
        Err(de::Error::custom(format_args!("unknown field `{key}`, expected one of {expected}")))
    }
}

/// Hands [`OtherEntries`] to a derived struct as a map, learning the struct's fields.
struct OtherEntriesDeserializer<'a, A, Taken>(&'a mut OtherEntries<A, Taken>);

impl<'de, A: MapAccess<'de>, Taken: Deserialize<'de>> Deserializer<'de>
    for OtherEntriesDeserializer<'_, A, Taken>
{
    type Error = A::Error;

    fn deserialize_any<W: Visitor<'de>>(self, visitor: W) -> Result<W::Value, A::Error> {
        visitor.visit_map(self.0)
    }

    fn deserialize_struct<W: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: W,
    ) -> Result<W::Value, A::Error> {
        self.0.fields = fields;
        visitor.visit_map(self.0)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}
