//! The `saturationDetector` and `flowControl` sections of `EndpointPickerConfig`, parsed
//! strictly: unknown keys and bad values are errors naming the field path.
//!
//! Accepted `flowControl` keys (GIE v1.5 / llm-d names):
//! - `maxRequests`, `maxBytes`: global caps on queued requests and queued bytes; Kubernetes
//!   quantities (`100`, `"2k"`, `"1Gi"`); absent or `0` means unbounded.
//! - `defaultRequestTTL`: queue TTL of a request (Go duration or milliseconds; default 60 s;
//!   `0` means no TTL).
//! - `defaultPriorityBand`: the band template for priorities not listed in `priorityBands`.
//! - `priorityBands`: list of bands, each with `priority` (required), `maxRequests`,
//!   `maxBytes`, `defaultRequestTTL`, `fairnessPolicyRef` (`global-strict-fairness-policy`,
//!   the default, or `round-robin-fairness-policy`) and `orderingPolicyRef`
//!   (`fcfs-ordering-policy`, the default, or `edf-ordering-policy`).
//! - `saturationDetector`: `{pluginRef}` naming a declared `utilization-detector` or
//!   `concurrency-detector` plugin.
//!
//! Accepted top-level `saturationDetector` keys: `queueDepthThreshold` (integer, default 5),
//! `kvCacheUtilThreshold` (in (0, 1], default 0.8), `metricsStalenessThreshold` (Go duration
//! or milliseconds, default 200 ms); or `pluginRef` alone (GIE v1.5 form).

use std::time::Duration;

use serde_json::{Map, Value};

use crate::config::EndpointPickerConfig;
use crate::flow::saturation::UtilizationThresholds;
use crate::flow::units::{duration_from_value, kind_of, quantity_from_value};

/// Name of the feature gate that turns queueing flow control on.
pub const FLOW_CONTROL_FEATURE_GATE: &str = "flowControl";
/// GIE type name of the utilization detector plugin.
pub const UTILIZATION_DETECTOR_TYPE: &str = "utilization-detector";
/// GIE type name of the concurrency detector plugin.
pub const CONCURRENCY_DETECTOR_TYPE: &str = "concurrency-detector";
/// Default `defaultRequestTTL`.
pub const DEFAULT_REQUEST_TTL: Duration = Duration::from_secs(60);

/// A config section that could not be accepted. Every variant names the field path.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FlowConfigError {
    /// A key that is not part of the section.
    #[error("{section}: unknown key '{key}' (accepted: {accepted})")]
    UnknownKey {
        /// Path of the section, e.g. `flowControl.priorityBands[1]`.
        section: String,
        /// The key found.
        key: String,
        /// The keys the section accepts.
        accepted: String,
    },
    /// A value of the wrong type or out of range.
    #[error("{field}: {reason}")]
    InvalidValue {
        /// Path of the field, e.g. `saturationDetector.kvCacheUtilThreshold`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A required key is missing.
    #[error("{section}: missing required key '{key}'")]
    MissingKey {
        /// Path of the section.
        section: String,
        /// The missing key.
        key: String,
    },
}

fn invalid(field: &str, reason: impl Into<String>) -> FlowConfigError {
    FlowConfigError::InvalidValue { field: field.to_owned(), reason: reason.into() }
}

/// A JSON map being read key by key, with every key checked against the accepted set.
struct Section<'a> {
    path: String,
    map: &'a Map<String, Value>,
}

impl<'a> Section<'a> {
    fn new(path: String, value: &'a Value, accepted: &[&str]) -> Result<Self, FlowConfigError> {
        static EMPTY: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);
        let map = match value {
            Value::Object(map) => map,
            // YAML `section:` with nothing after it reads as null: treat it as empty.
            Value::Null => &*EMPTY,
            other => {
                return Err(invalid(&path, format!("expected a map, found {}", kind_of(other))));
            }
        };
        if let Some(key) = map.keys().find(|key| !accepted.contains(&key.as_str())) {
            return Err(FlowConfigError::UnknownKey {
                section: path,
                key: key.clone(),
                accepted: accepted.join(", "),
            });
        }
        Ok(Self { path, map })
    }

    fn field(&self, key: &str) -> String {
        format!("{}.{key}", self.path)
    }

    fn get(&self, key: &str) -> Option<(String, &'a Value)> {
        self.map.get(key).map(|value| (self.field(key), value))
    }

    fn duration(&self, key: &str) -> Result<Option<Duration>, FlowConfigError> {
        self.get(key)
            .map(|(field, value)| {
                duration_from_value(value).map_err(|reason| invalid(&field, reason))
            })
            .transpose()
    }

    /// A quantity cap; `0` means unbounded and reads as `None`.
    fn cap(&self, key: &str) -> Result<Option<u64>, FlowConfigError> {
        let cap = self
            .get(key)
            .map(|(field, value)| {
                quantity_from_value(value).map_err(|reason| invalid(&field, reason))
            })
            .transpose()?;
        Ok(cap.filter(|cap| *cap > 0))
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>, FlowConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some((_, Value::String(text))) => Ok(Some(text)),
            Some((field, other)) => {
                Err(invalid(&field, format!("expected a string, found {}", kind_of(other))))
            }
        }
    }

    fn integer<T: TryFrom<i64>>(&self, key: &str) -> Result<Option<T>, FlowConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some((field, value)) => value
                .as_i64()
                .and_then(|number| T::try_from(number).ok())
                .map(Some)
                .ok_or_else(|| invalid(&field, format!("{value} is not an integer in range"))),
        }
    }
}

/// How a band chooses the next flow to serve.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FairnessPolicy {
    /// `global-strict-fairness-policy`: the best head request across all flows (oldest under
    /// FCFS), as if the band were one queue.
    #[default]
    GlobalStrict,
    /// `round-robin-fairness-policy`: flows take turns, one request each.
    RoundRobin,
}

impl FairnessPolicy {
    /// The GIE plugin names accepted in `fairnessPolicyRef`.
    pub const NAMES: [&'static str; 2] =
        ["global-strict-fairness-policy", "round-robin-fairness-policy"];

    fn from_ref(field: &str, name: &str) -> Result<Self, FlowConfigError> {
        match name {
            "global-strict-fairness-policy" => Ok(Self::GlobalStrict),
            "round-robin-fairness-policy" => Ok(Self::RoundRobin),
            _ => Err(invalid(
                field,
                format!("unknown fairness policy '{name}' (known: {})", Self::NAMES.join(", ")),
            )),
        }
    }
}

/// How a flow orders its own requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OrderingPolicy {
    /// `fcfs-ordering-policy`: first come, first served.
    #[default]
    Fcfs,
    /// `edf-ordering-policy`: earliest TTL deadline first (no deadline last, FCFS among ties).
    Edf,
}

impl OrderingPolicy {
    /// The GIE plugin names accepted in `orderingPolicyRef`.
    pub const NAMES: [&'static str; 2] = ["fcfs-ordering-policy", "edf-ordering-policy"];

    fn from_ref(field: &str, name: &str) -> Result<Self, FlowConfigError> {
        match name {
            "fcfs-ordering-policy" => Ok(Self::Fcfs),
            "edf-ordering-policy" => Ok(Self::Edf),
            _ => Err(invalid(
                field,
                format!("unknown ordering policy '{name}' (known: {})", Self::NAMES.join(", ")),
            )),
        }
    }
}

/// Settings of one priority band.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BandConfig {
    /// The priority the band serves.
    pub priority: i32,
    /// Cap on queued requests in the band; `None` is unbounded.
    pub max_requests: Option<u64>,
    /// Cap on queued bytes in the band; `None` is unbounded.
    pub max_bytes: Option<u64>,
    /// TTL of the band's requests; `None` falls back to the global default.
    pub default_request_ttl: Option<Duration>,
    /// How flows take turns.
    pub fairness: FairnessPolicy,
    /// How a flow orders its requests.
    pub ordering: OrderingPolicy,
}

impl BandConfig {
    /// A band for `priority` with this band's other settings (for the default template).
    pub fn for_priority(&self, priority: i32) -> Self {
        Self { priority, ..self.clone() }
    }
}

/// Settings of the flow controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowControlConfig {
    /// Cap on queued requests across bands; `None` is unbounded.
    pub max_requests: Option<u64>,
    /// Cap on queued bytes across bands; `None` is unbounded.
    pub max_bytes: Option<u64>,
    /// TTL of a request without a band or per-request TTL; zero means none.
    pub default_request_ttl: Duration,
    /// Template for priorities without a band of their own.
    pub default_band: BandConfig,
    /// Bands configured explicitly.
    pub bands: Vec<BandConfig>,
    /// `saturationDetector.pluginRef` inside `flowControl`, when given.
    pub saturation_detector_ref: Option<String>,
}

impl Default for FlowControlConfig {
    fn default() -> Self {
        Self {
            max_requests: None,
            max_bytes: None,
            default_request_ttl: DEFAULT_REQUEST_TTL,
            default_band: BandConfig::default(),
            bands: Vec::new(),
            saturation_detector_ref: None,
        }
    }
}

const FLOW_CONTROL_KEYS: &[&str] = &[
    "maxRequests",
    "maxBytes",
    "defaultRequestTTL",
    "defaultPriorityBand",
    "priorityBands",
    "saturationDetector",
];
const BAND_KEYS: &[&str] = &[
    "priority",
    "maxRequests",
    "maxBytes",
    "defaultRequestTTL",
    "fairnessPolicyRef",
    "orderingPolicyRef",
];
const THRESHOLD_KEYS: &[&str] =
    &["queueDepthThreshold", "kvCacheUtilThreshold", "metricsStalenessThreshold"];
const SATURATION_KEYS: &[&str] =
    &["queueDepthThreshold", "kvCacheUtilThreshold", "metricsStalenessThreshold", "pluginRef"];

impl FlowControlConfig {
    /// Parses a `flowControl` section (`None` or null gives the defaults).
    pub fn from_value(value: Option<&Value>) -> Result<Self, FlowConfigError> {
        let mut config = Self::default();
        let Some(value) = value else {
            return Ok(config);
        };
        let section = Section::new("flowControl".to_owned(), value, FLOW_CONTROL_KEYS)?;
        config.max_requests = section.cap("maxRequests")?;
        config.max_bytes = section.cap("maxBytes")?;
        if let Some(ttl) = section.duration("defaultRequestTTL")? {
            config.default_request_ttl = ttl;
        }
        if let Some((field, value)) = section.get("defaultPriorityBand") {
            config.default_band = parse_band(field, value, false)?;
        }
        if let Some((field, value)) = section.get("priorityBands") {
            let Value::Array(items) = value else {
                return Err(invalid(&field, format!("expected a list, found {}", kind_of(value))));
            };
            for (index, item) in items.iter().enumerate() {
                let band = parse_band(format!("{field}[{index}]"), item, true)?;
                if config.bands.iter().any(|other| other.priority == band.priority) {
                    return Err(invalid(
                        &format!("{field}[{index}].priority"),
                        format!("priority {} already has a band", band.priority),
                    ));
                }
                config.bands.push(band);
            }
        }
        if let Some((field, value)) = section.get("saturationDetector") {
            let detector = Section::new(field, value, &["pluginRef"])?;
            config.saturation_detector_ref = detector.string("pluginRef")?.map(str::to_owned);
        }
        Ok(config)
    }

    /// The settings for `priority`: its configured band, or the default template.
    pub fn band_for(&self, priority: i32) -> BandConfig {
        self.bands
            .iter()
            .find(|band| band.priority == priority)
            .cloned()
            .unwrap_or_else(|| self.default_band.for_priority(priority))
    }
}

fn parse_band(path: String, value: &Value, explicit: bool) -> Result<BandConfig, FlowConfigError> {
    let section = Section::new(path, value, BAND_KEYS)?;
    let priority = section.integer::<i32>("priority")?;
    if explicit && priority.is_none() {
        return Err(FlowConfigError::MissingKey { section: section.path, key: "priority".into() });
    }
    let fairness = match section.string("fairnessPolicyRef")? {
        Some(name) => FairnessPolicy::from_ref(&section.field("fairnessPolicyRef"), name)?,
        None => FairnessPolicy::default(),
    };
    let ordering = match section.string("orderingPolicyRef")? {
        Some(name) => OrderingPolicy::from_ref(&section.field("orderingPolicyRef"), name)?,
        None => OrderingPolicy::default(),
    };
    Ok(BandConfig {
        priority: priority.unwrap_or(0),
        max_requests: section.cap("maxRequests")?,
        max_bytes: section.cap("maxBytes")?,
        default_request_ttl: section.duration("defaultRequestTTL")?,
        fairness,
        ordering,
    })
}

/// Which saturation detector the config asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum DetectorConfig {
    /// GIE's `utilization-detector` (the default).
    Utilization(UtilizationThresholds),
    /// GIE's `concurrency-detector` with its per-endpoint limit (`maxConcurrency`).
    Concurrency {
        /// Requests in flight allowed per endpoint.
        max_concurrency: u32,
    },
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self::Utilization(UtilizationThresholds::default())
    }
}

/// Default `maxConcurrency` of the concurrency detector.
pub const DEFAULT_MAX_CONCURRENCY: u32 = 100;

impl DetectorConfig {
    /// Reads the detector from a whole config: a `pluginRef` (in `flowControl` or the top-level
    /// `saturationDetector`) naming a declared detector plugin, else the top-level thresholds,
    /// else the defaults.
    pub fn from_endpoint_picker_config(
        config: &EndpointPickerConfig,
    ) -> Result<Self, FlowConfigError> {
        let flow = FlowControlConfig::from_value(config.flow_control.as_ref())?;
        let mut thresholds = UtilizationThresholds::default();
        let mut plugin_ref = flow
            .saturation_detector_ref
            .map(|name| ("flowControl.saturationDetector.pluginRef".to_owned(), name));
        if let Some(value) = &config.saturation_detector {
            let section = Section::new("saturationDetector".to_owned(), value, SATURATION_KEYS)?;
            if let Some(name) = section.string("pluginRef")? {
                if let Some(key) = THRESHOLD_KEYS.iter().find(|key| section.map.contains_key(**key))
                {
                    return Err(invalid(
                        &section.field(key),
                        "thresholds belong in the parameters of the plugin named by pluginRef",
                    ));
                }
                plugin_ref.get_or_insert((section.field("pluginRef"), name.to_owned()));
            } else {
                thresholds = parse_thresholds(&section)?;
            }
        }
        let Some((field, name)) = plugin_ref else {
            return Ok(Self::Utilization(thresholds));
        };
        let Some((index, plugin)) =
            config.plugins.iter().enumerate().find(|(_, plugin)| plugin.effective_name() == name)
        else {
            return Err(invalid(&field, format!("'{name}' names no declared plugin")));
        };
        let path = format!("plugins[{index}].parameters");
        let null = Value::Null;
        let parameters = plugin.parameters.as_ref().unwrap_or(&null);
        match plugin.type_name.as_str() {
            UTILIZATION_DETECTOR_TYPE => {
                let section = Section::new(path, parameters, THRESHOLD_KEYS)?;
                Ok(Self::Utilization(parse_thresholds(&section)?))
            }
            CONCURRENCY_DETECTOR_TYPE => {
                let section = Section::new(path, parameters, &["maxConcurrency"])?;
                let max_concurrency =
                    section.integer::<u32>("maxConcurrency")?.unwrap_or(DEFAULT_MAX_CONCURRENCY);
                Ok(Self::Concurrency { max_concurrency })
            }
            other => Err(invalid(
                &field,
                format!(
                    "'{name}' has type '{other}', not a saturation detector (known: {UTILIZATION_DETECTOR_TYPE}, {CONCURRENCY_DETECTOR_TYPE})"
                ),
            )),
        }
    }
}

fn parse_thresholds(section: &Section<'_>) -> Result<UtilizationThresholds, FlowConfigError> {
    let mut thresholds = UtilizationThresholds::default();
    if let Some(depth) = section.integer::<u32>("queueDepthThreshold")? {
        thresholds.queue_depth = depth;
    }
    if let Some((field, value)) = section.get("kvCacheUtilThreshold") {
        thresholds.kv_cache_util = value
            .as_f64()
            .filter(|kv| *kv > 0.0 && *kv <= 1.0)
            .ok_or_else(|| invalid(&field, format!("{value} is not a number in (0, 1]")))?;
    }
    if let Some(staleness) = section.duration("metricsStalenessThreshold")? {
        thresholds.metrics_staleness = staleness;
    }
    Ok(thresholds)
}
