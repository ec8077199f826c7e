//! The `EndpointPickerConfig` YAML of the Gateway API Inference Extension, accepted unchanged.
//!
//! Loading is strict like the Go loader (unknown keys are errors) and every error names the
//! offending plugin, profile or reference and where it stands. Defaults are injected as the Go
//! EPP injects them: a profile without a picker gets `max-score-picker`, no profile handler
//! means `single-profile-handler`, a reference without weight weighs 1, and no
//! `schedulingProfiles` at all means one `default` profile holding every filter, scorer and
//! picker declared.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;

use crate::plugin::{PreRequest, ProfileHandler, ResponseComplete};
use crate::profile::SchedulerProfile;
use crate::registry::{Plugin, PluginRegistry, PluginSpec, RegistryError};
use crate::scheduler::{Scheduler, SingleProfileHandler};

/// The `apiVersion` values accepted, from GIE and llm-d releases.
pub const ACCEPTED_API_VERSIONS: &[&str] = &[
    "inference.networking.x-k8s.io/v1alpha1",
    "config.apix.gateway-api-inference-extension.sigs.k8s.io/v1alpha1",
    "llm-d.ai/v1alpha1",
    "llm-d.ai/v1",
];

/// The `kind` of the document.
pub const CONFIG_KIND: &str = "EndpointPickerConfig";

/// Type name of the picker injected into profiles that declare none.
pub const DEFAULT_PICKER_TYPE: &str = "max-score-picker";

/// Name of the profile built when the config declares none.
pub const DEFAULT_PROFILE_NAME: &str = "default";

/// The configuration used when none is given: GIE's default profile (queue, KV-cache
/// utilisation and prefix-cache scorers weighted 2, 2 and 3, max-score picker).
pub const DEFAULT_CONFIG_YAML: &str = "\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
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

/// GIE's load-only profile from before prefix-cache scoring (queue and KV-cache utilisation
/// scorers, weighted 2 and 2): the default minus prefix, for benchmarks and comparisons.
pub const QUEUE_KV_CONFIG_YAML: &str = "\
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: max-score-picker
";

/// The parsed document, before plugins are constructed.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointPickerConfig {
    /// One of [`ACCEPTED_API_VERSIONS`].
    #[serde(default)]
    pub api_version: Option<String>,
    /// [`CONFIG_KIND`].
    #[serde(default)]
    pub kind: Option<String>,
    /// Experimental features switched on (for example `flowControl`).
    #[serde(default)]
    pub feature_gates: Vec<String>,
    /// Plugin declarations.
    #[serde(default)]
    pub plugins: Vec<PluginConfig>,
    /// Scheduling profiles.
    #[serde(default)]
    pub scheduling_profiles: Vec<ProfileConfig>,
    /// Saturation detector settings (GIE v1.3+), interpreted by flow control.
    #[serde(default)]
    pub saturation_detector: Option<serde_json::Value>,
    /// Flow control settings (GIE v1.5+).
    #[serde(default)]
    pub flow_control: Option<serde_json::Value>,
    /// Data-layer settings: `data` in GIE v1.3-v1.4, `dataLayer` from v1.5.
    #[serde(default, alias = "dataLayer")]
    pub data: Option<serde_json::Value>,
    /// Request parser settings (GIE v1.5+).
    #[serde(default)]
    pub parser: Option<serde_json::Value>,
}

/// One entry of `plugins`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Name to reference the plugin by; defaults to its type.
    #[serde(default)]
    pub name: Option<String>,
    /// The plugin type (GIE type name).
    #[serde(rename = "type")]
    pub type_name: String,
    /// Type-specific parameters.
    #[serde(default)]
    pub parameters: Option<serde_json::Value>,
}

impl PluginConfig {
    /// The name the plugin is referenced by.
    pub fn effective_name(&self) -> &str {
        self.name.as_deref().filter(|name| !name.is_empty()).unwrap_or(&self.type_name)
    }
}

/// One entry of `schedulingProfiles`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// The profile's name.
    pub name: String,
    /// References to declared plugins.
    #[serde(default)]
    pub plugins: Vec<PluginRef>,
}

/// A reference from a profile to a declared plugin.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PluginRef {
    /// The referenced plugin's name.
    pub plugin_ref: String,
    /// Weight of a scorer's score (integer before GIE v1.4, float after; both accepted).
    #[serde(default)]
    pub weight: Option<f64>,
}

/// Why a config could not be loaded. Every variant names the offender and its place.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// Not YAML, a key that is not part of the schema, or a value of the wrong type.
    #[error("config is not a valid EndpointPickerConfig: {0}")]
    Syntax(String),
    /// The `apiVersion` is not one of the accepted ones.
    #[error("unsupported apiVersion '{found}' (accepted: {})", ACCEPTED_API_VERSIONS.join(", "))]
    ApiVersion {
        /// The value found.
        found: String,
    },
    /// The `kind` is not `EndpointPickerConfig`.
    #[error("unsupported kind '{found}' (expected EndpointPickerConfig)")]
    Kind {
        /// The value found.
        found: String,
    },
    /// Two plugins share a name.
    #[error("plugins[{index}]: name '{name}' is already used by plugins[{first}]")]
    DuplicatePluginName {
        /// Position of the second declaration.
        index: usize,
        /// Position of the first.
        first: usize,
        /// The name.
        name: String,
    },
    /// A plugin could not be constructed (unknown type or bad parameters).
    #[error("plugins[{index}] (name '{name}', type '{type_name}'): {source}")]
    Plugin {
        /// Position of the declaration.
        index: usize,
        /// The plugin's name.
        name: String,
        /// The plugin's type.
        type_name: String,
        /// What went wrong.
        source: RegistryError,
    },
    /// Two profiles share a name.
    #[error("schedulingProfiles[{index}]: profile name '{name}' is used twice")]
    DuplicateProfileName {
        /// Position of the second declaration.
        index: usize,
        /// The name.
        name: String,
    },
    /// A profile references a plugin that is not declared.
    #[error(
        "schedulingProfiles[{profile_index}] '{profile}' plugins[{index}]: pluginRef '{plugin_ref}' names no declared plugin"
    )]
    DanglingPluginRef {
        /// The profile's position.
        profile_index: usize,
        /// The profile's name.
        profile: String,
        /// The reference's position.
        index: usize,
        /// The dangling name.
        plugin_ref: String,
    },
    /// A weight is negative, NaN or infinite.
    #[error(
        "schedulingProfiles[{profile_index}] '{profile}' plugins[{index}] ('{plugin_ref}'): weight {weight} must be a finite number >= 0"
    )]
    InvalidWeight {
        /// The profile's position.
        profile_index: usize,
        /// The profile's name.
        profile: String,
        /// The reference's position.
        index: usize,
        /// The referenced plugin.
        plugin_ref: String,
        /// The weight found.
        weight: f64,
    },
    /// A profile references a plugin that is not a filter, scorer or picker.
    #[error(
        "schedulingProfiles[{profile_index}] '{profile}' plugins[{index}]: '{plugin_ref}' is not a filter, scorer or picker"
    )]
    NotAProfilePlugin {
        /// The profile's position.
        profile_index: usize,
        /// The profile's name.
        profile: String,
        /// The reference's position.
        index: usize,
        /// The referenced plugin.
        plugin_ref: String,
    },
    /// A profile references two pickers.
    #[error(
        "schedulingProfiles[{profile_index}] '{profile}': pickers '{first}' and '{second}' both declared; a profile has one picker"
    )]
    TwoPickers {
        /// The profile's position.
        profile_index: usize,
        /// The profile's name.
        profile: String,
        /// The first picker.
        first: String,
        /// The second picker.
        second: String,
    },
    /// More than one profile handler is declared.
    #[error("profile handlers '{first}' and '{second}' both declared; declare at most one")]
    TwoProfileHandlers {
        /// The first handler.
        first: String,
        /// The second handler.
        second: String,
    },
    /// The single-profile handler is used with several profiles.
    #[error(
        "single-profile-handler runs one profile but {count} are declared; declare a multi-profile handler"
    )]
    SingleHandlerManyProfiles {
        /// How many profiles are declared.
        count: usize,
    },
    /// The config declares no scheduling profile and no plugin a profile could be built from.
    #[error(
        "the config declares no scheduling profile and no filter, scorer or picker to build one"
    )]
    NoProfiles,
}

impl EndpointPickerConfig {
    /// Parses a YAML document (no plugin is constructed yet).
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: Self =
            serde_saphyr::from_str(text).map_err(|error| ConfigError::Syntax(error.to_string()))?;
        if let Some(found) = &config.api_version
            && !ACCEPTED_API_VERSIONS.contains(&found.as_str())
        {
            return Err(ConfigError::ApiVersion { found: found.clone() });
        }
        if let Some(found) = &config.kind
            && found != CONFIG_KIND
        {
            return Err(ConfigError::Kind { found: found.clone() });
        }
        Ok(config)
    }

    /// GIE's default config ([`DEFAULT_CONFIG_YAML`]).
    pub fn gie_default() -> Self {
        match Self::from_yaml(DEFAULT_CONFIG_YAML) {
            Ok(config) => config,
            Err(error) => unreachable!("the built-in default config is valid: {error}"),
        }
    }

    /// Whether the feature gate `name` is on.
    pub fn feature_enabled(&self, name: &str) -> bool {
        self.feature_gates.iter().any(|gate| gate == name)
    }

    /// Constructs the plugins with `registry` and assembles the scheduler.
    pub fn build(&self, registry: &PluginRegistry) -> Result<Scheduler, ConfigError> {
        let mut by_name: HashMap<&str, (usize, Plugin)> = HashMap::new();
        let mut declared: Vec<(&str, Plugin)> = Vec::with_capacity(self.plugins.len());
        for (index, config) in self.plugins.iter().enumerate() {
            let name = config.effective_name();
            if let Some((first, _)) = by_name.get(name) {
                return Err(ConfigError::DuplicatePluginName {
                    index,
                    first: *first,
                    name: name.to_owned(),
                });
            }
            let spec = PluginSpec {
                name,
                type_name: &config.type_name,
                parameters: config.parameters.as_ref(),
            };
            let plugin = registry.create(&spec).map_err(|source| ConfigError::Plugin {
                index,
                name: name.to_owned(),
                type_name: config.type_name.clone(),
                source,
            })?;
            by_name.insert(name, (index, plugin.clone()));
            declared.push((name, plugin));
        }

        let handler = self.profile_handler(&declared)?;
        let profiles = if self.scheduling_profiles.is_empty() {
            vec![self.implied_default_profile(&declared, registry)?]
        } else {
            self.declared_profiles(&by_name, registry)?
        };
        if profiles.len() > 1 && handler.1 {
            return Err(ConfigError::SingleHandlerManyProfiles { count: profiles.len() });
        }

        let mut scheduler = Scheduler::new(profiles, handler.0);
        for (_, plugin) in &declared {
            if let Some(hook) = &plugin.pre_request {
                scheduler = scheduler.with_pre_request(Arc::clone(hook) as Arc<dyn PreRequest>);
            }
            if let Some(hook) = &plugin.response_complete {
                scheduler =
                    scheduler.with_response_complete(Arc::clone(hook) as Arc<dyn ResponseComplete>);
            }
            if let Some(observer) = &plugin.pool_observer {
                scheduler = scheduler.with_pool_observer(Arc::clone(observer));
            }
        }
        Ok(scheduler)
    }

    /// The declared handler, or the implied single-profile one; `true` when single-profile.
    fn profile_handler(
        &self,
        declared: &[(&str, Plugin)],
    ) -> Result<(Arc<dyn ProfileHandler>, bool), ConfigError> {
        let mut found: Option<(&str, &str, Arc<dyn ProfileHandler>)> = None;
        for ((name, plugin), config) in declared.iter().zip(&self.plugins) {
            if let Some(handler) = &plugin.profile_handler {
                if let Some((first, _, _)) = found {
                    return Err(ConfigError::TwoProfileHandlers {
                        first: first.to_owned(),
                        second: (*name).to_owned(),
                    });
                }
                found = Some((name, &config.type_name, Arc::clone(handler)));
            }
        }
        Ok(match found {
            Some((_, type_name, handler)) => {
                (handler, type_name == crate::scheduler::SINGLE_PROFILE_HANDLER)
            }
            None => (Arc::new(SingleProfileHandler), true),
        })
    }

    fn implied_default_profile(
        &self,
        declared: &[(&str, Plugin)],
        registry: &PluginRegistry,
    ) -> Result<SchedulerProfile, ConfigError> {
        let mut refs = Vec::new();
        for (name, plugin) in declared {
            if plugin.is_profile_plugin() {
                refs.push(PluginRef { plugin_ref: (*name).to_owned(), weight: None });
            }
        }
        if refs.is_empty() {
            return Err(ConfigError::NoProfiles);
        }
        let implied = ProfileConfig { name: DEFAULT_PROFILE_NAME.to_owned(), plugins: refs };
        let by_name = declared
            .iter()
            .enumerate()
            .map(|(index, (name, plugin))| (*name, (index, plugin.clone())))
            .collect();
        build_profile(0, &implied, &by_name, registry)
    }

    fn declared_profiles(
        &self,
        by_name: &HashMap<&str, (usize, Plugin)>,
        registry: &PluginRegistry,
    ) -> Result<Vec<SchedulerProfile>, ConfigError> {
        let mut profiles: Vec<SchedulerProfile> = Vec::new();
        for (index, config) in self.scheduling_profiles.iter().enumerate() {
            if profiles.iter().any(|profile| **profile.name() == *config.name) {
                return Err(ConfigError::DuplicateProfileName { index, name: config.name.clone() });
            }
            profiles.push(build_profile(index, config, by_name, registry)?);
        }
        Ok(profiles)
    }
}

fn build_profile(
    profile_index: usize,
    config: &ProfileConfig,
    by_name: &HashMap<&str, (usize, Plugin)>,
    registry: &PluginRegistry,
) -> Result<SchedulerProfile, ConfigError> {
    let mut filters = Vec::new();
    let mut scorers = Vec::new();
    let mut picker: Option<(&str, Arc<dyn crate::plugin::Picker>)> = None;
    for (index, reference) in config.plugins.iter().enumerate() {
        let name = reference.plugin_ref.as_str();
        let Some((_, plugin)) = by_name.get(name) else {
            return Err(ConfigError::DanglingPluginRef {
                profile_index,
                profile: config.name.clone(),
                index,
                plugin_ref: name.to_owned(),
            });
        };
        let weight = reference.weight.unwrap_or(1.0);
        if !weight.is_finite() || weight < 0.0 {
            return Err(ConfigError::InvalidWeight {
                profile_index,
                profile: config.name.clone(),
                index,
                plugin_ref: name.to_owned(),
                weight,
            });
        }
        if !plugin.is_profile_plugin() {
            return Err(ConfigError::NotAProfilePlugin {
                profile_index,
                profile: config.name.clone(),
                index,
                plugin_ref: name.to_owned(),
            });
        }
        if let Some(filter) = &plugin.filter {
            filters.push((name, Arc::clone(filter)));
        }
        if let Some(scorer) = &plugin.scorer {
            scorers.push((name, weight, Arc::clone(scorer)));
        }
        if let Some(new_picker) = &plugin.picker {
            if let Some((first, _)) = picker {
                return Err(ConfigError::TwoPickers {
                    profile_index,
                    profile: config.name.clone(),
                    first: first.to_owned(),
                    second: name.to_owned(),
                });
            }
            picker = Some((name, Arc::clone(new_picker)));
        }
    }
    let (picker_name, picker) = match picker {
        Some(picker) => picker,
        None => {
            let plugin =
                registry.create(&PluginSpec::of_type(DEFAULT_PICKER_TYPE)).map_err(|source| {
                    ConfigError::Plugin {
                        index: usize::MAX,
                        name: DEFAULT_PICKER_TYPE.to_owned(),
                        type_name: DEFAULT_PICKER_TYPE.to_owned(),
                        source,
                    }
                })?;
            match plugin.picker {
                Some(picker) => (DEFAULT_PICKER_TYPE, picker),
                None => {
                    return Err(ConfigError::NotAProfilePlugin {
                        profile_index,
                        profile: config.name.clone(),
                        index: config.plugins.len(),
                        plugin_ref: DEFAULT_PICKER_TYPE.to_owned(),
                    });
                }
            }
        }
    };
    let mut profile = SchedulerProfile::new(config.name.as_str(), picker_name, picker);
    for (name, filter) in filters {
        profile = profile.with_filter(name, filter);
    }
    for (name, weight, scorer) in scorers {
        profile = profile.with_scorer(name, weight, scorer);
    }
    Ok(profile)
}
