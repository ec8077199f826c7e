//! The `EndpointPickerConfig` YAML of the Gateway API Inference Extension, accepted unchanged.
//!
//! Loading is strict like the Go loader (unknown keys are errors) and every error names the
//! offending plugin, profile or reference and where it stands. Defaults are injected as the Go
//! EPP injects them: a profile without a picker gets the picker the config declares (else a
//! `max-score-picker`), no profile handler means `single-profile-handler`, a reference
//! without weight weighs 1, no `schedulingProfiles` at all means one `default` profile holding
//! every filter, scorer and picker declared (just a picker when none is: every endpoint is a
//! candidate), and no `requestHandler.parsers` means the OpenAI, Anthropic and vLLM HTTP
//! parsers then passthrough. A profile that lists a plugin playing none of the profile roles
//! (a data producer, a policy) ignores it, as the Go loader does. Errors in the document name
//! the field path (`flowControl.maxBytes: ...`).
//!
//! GIE's default profile is written once, in [`DEFAULT_CONFIG_YAML`]; variants are composed
//! from it in code rather than retyped:
//!
//! ```
//! use scheduler_core::EndpointPickerConfig;
//! use serde_json::json;
//!
//! // The default profile, plus LoRA affinity and in-flight requests, with a smaller prefix index.
//! let composed = EndpointPickerConfig::gie_default()
//!     .with_plugin_parameters("prefix-cache-scorer", json!({"blockSize": 64}))
//!     .with_profile_plugin("lora-affinity-scorer", 1.0)
//!     .with_profile_plugin("active-request-scorer", 2.0);
//! let written = EndpointPickerConfig::from_yaml(
//!     "apiVersion: inference.networking.x-k8s.io/v1alpha1
//! kind: EndpointPickerConfig
//! plugins:
//! - type: queue-scorer
//! - type: kv-cache-utilization-scorer
//! - type: prefix-cache-scorer
//!   parameters: {blockSize: 64}
//! - type: max-score-picker
//! - type: lora-affinity-scorer
//! - type: active-request-scorer
//! schedulingProfiles:
//! - name: default
//!   plugins:
//!   - {pluginRef: queue-scorer, weight: 2}
//!   - {pluginRef: kv-cache-utilization-scorer, weight: 2}
//!   - {pluginRef: prefix-cache-scorer, weight: 3}
//!   - pluginRef: max-score-picker
//!   - {pluginRef: lora-affinity-scorer, weight: 1}
//!   - {pluginRef: active-request-scorer, weight: 2}
//! ",
//! )?;
//! assert_eq!(composed, written);
//! # Ok::<(), scheduler_core::ConfigError>(())
//! ```

pub mod data_layer;
pub(crate) mod gates;
pub(crate) mod registry;

use std::sync::Arc;

use serde::Deserialize;

use crate::config::data_layer::DataLayerConfig;
use crate::config::registry::{Plugin, PluginRegistry, PluginSpec, RegistryError};
use crate::flow::{FlowControlConfig, SaturationDetectorSection};
use crate::request::parser::{ParserTable, RequestParser};
use crate::scheduling::plugin::{PreRequest, ProfileHandler, ResponseComplete};
use crate::scheduling::profile::SchedulerProfile;
use crate::scheduling::scheduler::{SINGLE_PROFILE_HANDLER, Scheduler, SingleProfileHandler};

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

/// Name (and type) of the prefix-cache scorer in [`DEFAULT_CONFIG_YAML`].
const PREFIX_CACHE_SCORER: &str = "prefix-cache-scorer";

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
    /// Feature gates: `name`, `name=true` or `name=false` (see [`KNOWN_GATES`](crate::KNOWN_GATES)).
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
    pub saturation_detector: Option<SaturationDetectorSection>,
    /// Flow control settings (GIE v1.5+).
    #[serde(default)]
    pub flow_control: Option<FlowControlConfig>,
    /// Data-layer settings: `data` in GIE v1.3-v1.4, `dataLayer` from v1.5 (see
    /// [`data_layer`]).
    #[serde(default, alias = "dataLayer")]
    pub data: Option<DataLayerConfig>,
    /// Which parsers read request bodies (llm-d-router).
    #[serde(default)]
    pub request_handler: Option<RequestHandlerConfig>,
    /// The one parser of GIE v1.5 (replaced by `requestHandler.parsers`, which wins when
    /// both are set).
    #[serde(default)]
    pub parser: Option<ParserRef>,
}

/// The `requestHandler` section.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestHandlerConfig {
    /// The parsers, in order; empty means llm-d-router's defaults.
    #[serde(default)]
    pub parsers: Vec<ParserRef>,
}

/// A reference to a parser plugin: a declared plugin's name, or a parser type name.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParserRef {
    /// The parser's name.
    pub plugin_ref: String,
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
    /// A declaration of `type_name`, named after its type, without parameters.
    pub fn of_type(type_name: impl Into<String>) -> Self {
        Self { name: None, type_name: type_name.into(), parameters: None }
    }

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

/// The plugins a config declares, each constructed once. The scheduler takes its profile
/// plugins and hooks from them and flow control its saturation detector, so one plugin that
/// plays several roles (the concurrency detector counts requests in its hooks and answers
/// saturation checks) is one instance everywhere.
#[derive(Clone, Debug, Default)]
pub struct ConstructedPlugins {
    plugins: Vec<ConstructedPlugin>,
}

/// One constructed plugin and its declaration's name and type.
#[derive(Clone, Debug)]
pub struct ConstructedPlugin {
    /// The name it is referenced by.
    pub name: String,
    /// Its type name.
    pub type_name: String,
    /// Its roles.
    pub plugin: Plugin,
}

impl ConstructedPlugins {
    /// The plugin named `name`.
    pub fn get(&self, name: &str) -> Option<&ConstructedPlugin> {
        self.plugins.iter().find(|plugin| plugin.name == name)
    }

    /// Every plugin, in declaration order.
    pub fn iter(&self) -> impl Iterator<Item = &ConstructedPlugin> {
        self.plugins.iter()
    }

    /// How many plugins there are.
    pub fn len(&self) -> usize {
        self.plugins.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.plugins.iter().position(|plugin| plugin.name == name)
    }
}

/// Why a config could not be loaded. Every variant names the offender and its place.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// Not YAML, a key that is not part of the schema, or a value of the wrong type or out of
    /// range; the text starts with the field path when there is one
    /// (`flowControl.priorityBands[1]: unknown field ...`).
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
    /// The picker a profile is given when the config declares none is not a picker (a
    /// registry replaced `max-score-picker` with another kind of plugin).
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
    /// The profile handler's parameters name profiles the config does not declare.
    #[error("profile handler '{handler}': {message}")]
    HandlerProfiles {
        /// The handler's name.
        handler: String,
        /// What does not match.
        message: String,
    },
    /// More than one profile handler is declared.
    #[error("profile handlers '{first}' and '{second}' both declared; declare at most one")]
    TwoProfileHandlers {
        /// The first handler.
        first: String,
        /// The second handler.
        second: String,
    },
    /// The profile handler runs fewer profiles than the config declares.
    #[error(
        "{handler} runs at most {max} profile(s) but {count} are declared; declare a multi-profile handler"
    )]
    TooManyProfiles {
        /// The handler's name (`single-profile-handler` when none is declared).
        handler: String,
        /// How many profiles it runs at most.
        max: usize,
        /// How many profiles are declared.
        count: usize,
    },
    /// A data-layer reference names no declared plugin.
    #[error("{field}: '{plugin_ref}' names no declared plugin")]
    DataLayerDanglingRef {
        /// Where the reference stands (`dataLayer.sources[0].pluginRef`).
        field: String,
        /// The dangling name.
        plugin_ref: String,
    },
    /// A data-layer reference names a plugin of the wrong kind.
    #[error("{field}: '{plugin_ref}' (type '{type_name}') is not {expected}")]
    DataLayerWrongKind {
        /// Where the reference stands.
        field: String,
        /// The referenced plugin.
        plugin_ref: String,
        /// Its type.
        type_name: String,
        /// What the place requires (`a data source`).
        expected: &'static str,
    },
    /// An extractor cannot read what its source produces.
    #[error("{field}: extractor '{extractor}' cannot read what source '{source_name}' produces")]
    DataLayerMismatch {
        /// Where the extractor's reference stands.
        field: String,
        /// The extractor.
        extractor: String,
        /// The source.
        source_name: String,
    },
    /// A parser reference names neither a declared plugin nor a parser type.
    #[error(
        "{field}: pluginRef '{plugin_ref}' names no declared plugin and no parser type (parser types: {})",
        parser_type_names()
    )]
    UnknownParser {
        /// Where the reference stands (`requestHandler.parsers[1]`).
        field: String,
        /// The reference.
        plugin_ref: String,
    },
    /// A parser reference names a declared plugin that is not a parser.
    #[error("{field}: '{plugin_ref}' is not a request parser")]
    NotAParser {
        /// Where the reference stands.
        field: String,
        /// The reference.
        plugin_ref: String,
    },
    /// A `featureGates` entry names an unknown gate or has an unreadable value.
    #[error(transparent)]
    FeatureGate(#[from] gates::GateError),
}

fn parser_type_names() -> String {
    RequestParser::ALL.map(RequestParser::type_name).join(", ")
}

impl EndpointPickerConfig {
    /// Parses a YAML document (no plugin is constructed yet). An empty document is
    /// [`Self::gie_default`], as the Go EPP loads its default config for an empty file.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        if text.trim().is_empty() {
            return Self::from_yaml(DEFAULT_CONFIG_YAML);
        }
        // serde-saphyr reports the line and column; serde_path_to_error adds the field path.
        let options = serde_saphyr::options! { with_snippet: false };
        let mut path = None;
        let parsed =
            serde_saphyr::with_deserializer_from_str_with_options(text, options, |deserializer| {
                serde_path_to_error::deserialize(deserializer).map_err(|error| {
                    path = Some(error.path().to_string());
                    error.into_inner()
                })
            });
        let config: Self = parsed.map_err(|error| {
            ConfigError::Syntax(match path.filter(|path| path != ".") {
                Some(path) => format!("{path}: {error}"),
                None => error.to_string(),
            })
        })?;
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
        gates::validate(&config.feature_gates)?;
        Ok(config)
    }

    /// GIE's default config ([`DEFAULT_CONFIG_YAML`]): queue, KV-cache utilisation and
    /// prefix-cache scorers weighted 2, 2 and 3, max-score picker.
    pub fn gie_default() -> Self {
        match Self::from_yaml(DEFAULT_CONFIG_YAML) {
            Ok(config) => config,
            Err(error) => unreachable!("the built-in default config is valid: {error}"),
        }
    }

    /// GIE's load-only profile from before prefix-cache scoring: the default without the
    /// prefix-cache scorer (queue and KV-cache utilisation scorers weighted 2 and 2), for
    /// benchmarks and comparisons.
    pub fn queue_kv() -> Self {
        Self::gie_default().without_plugin(PREFIX_CACHE_SCORER)
    }

    /// Declares a plugin of `type_name` (named after its type) and references it from every
    /// declared profile with `weight` (only scorers use it). A config without declared profiles
    /// gets it in its implied default profile, where every weight is 1.
    pub fn with_profile_plugin(mut self, type_name: &str, weight: f64) -> Self {
        self.plugins.push(PluginConfig::of_type(type_name));
        for profile in &mut self.scheduling_profiles {
            profile
                .plugins
                .push(PluginRef { plugin_ref: type_name.to_owned(), weight: Some(weight) });
        }
        self
    }

    /// Declares `plugin` without referencing it from a profile (a saturation detector, a
    /// profile handler).
    pub fn with_plugin(mut self, plugin: PluginConfig) -> Self {
        self.plugins.push(plugin);
        self
    }

    /// Replaces the parameters of the plugin named `name`.
    ///
    /// # Panics
    /// When no plugin is named `name`: composing a config is code, and a misspelt name is a bug.
    pub fn with_plugin_parameters(mut self, name: &str, parameters: serde_json::Value) -> Self {
        match self.plugins.iter_mut().find(|plugin| plugin.effective_name() == name) {
            Some(plugin) => plugin.parameters = Some(parameters),
            None => panic!("with_plugin_parameters: no plugin is named '{name}'"),
        }
        self
    }

    /// Sets the weight of every profile's reference to `name`.
    ///
    /// # Panics
    /// When no profile references `name`.
    pub fn with_weight(mut self, name: &str, weight: f64) -> Self {
        let mut found = false;
        for reference in self.profile_refs_mut(name) {
            reference.weight = Some(weight);
            found = true;
        }
        assert!(found, "with_weight: no profile references '{name}'");
        self
    }

    /// Removes the plugin named `name` and every profile's reference to it.
    ///
    /// # Panics
    /// When no plugin is named `name`.
    pub fn without_plugin(mut self, name: &str) -> Self {
        let declared = self.plugins.len();
        self.plugins.retain(|plugin| plugin.effective_name() != name);
        assert!(self.plugins.len() < declared, "without_plugin: no plugin is named '{name}'");
        for profile in &mut self.scheduling_profiles {
            profile.plugins.retain(|reference| reference.plugin_ref != name);
        }
        self
    }

    /// Switches the feature gate `name` on (for example
    /// [`FLOW_CONTROL_FEATURE_GATE`](crate::flow::FLOW_CONTROL_FEATURE_GATE)).
    pub fn with_feature_gate(mut self, name: &str) -> Self {
        if !self.feature_enabled(name) {
            // Entries that switch it off would be overridden anyway; drop them for clarity.
            self.feature_gates.retain(|entry| gates::parse_entry(entry).0 != name);
            self.feature_gates.push(name.to_owned());
        }
        self
    }

    fn profile_refs_mut(&mut self, name: &str) -> impl Iterator<Item = &mut PluginRef> {
        self.scheduling_profiles
            .iter_mut()
            .flat_map(|profile| profile.plugins.iter_mut())
            .filter(move |reference| reference.plugin_ref == name)
    }

    /// Whether the feature gate `name` is on: the last entry naming it decides (`name` and
    /// `name=true` switch it on, `name=false` off), else the gate's default.
    pub fn feature_enabled(&self, name: &str) -> bool {
        gates::enabled(&self.feature_gates, name)
    }

    /// The parsers that read request bodies: `requestHandler.parsers`, else the deprecated
    /// `parser`, else llm-d-router's defaults (OpenAI, Anthropic, vLLM HTTP, then
    /// passthrough for every other path). A reference names a declared parser plugin or,
    /// as the Go EPP registers missing parsers under their type names, a parser type.
    pub fn parser_table(&self, plugins: &ConstructedPlugins) -> Result<ParserTable, ConfigError> {
        let listed = self.request_handler.as_ref().map_or(&[][..], |handler| &handler.parsers);
        let (field, refs) = match (listed, &self.parser) {
            ([], None) => return Ok(ParserTable::default()),
            ([], Some(single)) => ("parser", std::slice::from_ref(single)),
            (listed, _) => ("requestHandler.parsers", listed),
        };
        let mut parsers = Vec::with_capacity(refs.len());
        for (index, reference) in refs.iter().enumerate() {
            let name = reference.plugin_ref.as_str();
            let field =
                if field == "parser" { field.to_owned() } else { format!("{field}[{index}]") };
            let parser = match plugins.get(name) {
                Some(declared) => declared.plugin.request_parser.ok_or_else(|| {
                    ConfigError::NotAParser { field: field.clone(), plugin_ref: name.to_owned() }
                })?,
                None => RequestParser::from_type_name(name).ok_or_else(|| {
                    ConfigError::UnknownParser { field, plugin_ref: name.to_owned() }
                })?,
            };
            parsers.push(parser);
        }
        Ok(ParserTable::new(parsers))
    }

    /// Constructs the plugins with `registry` and assembles the scheduler.
    pub fn build(&self, registry: &PluginRegistry) -> Result<Scheduler, ConfigError> {
        let plugins = self.construct_plugins(registry)?;
        self.build_with(&plugins, registry)
    }

    /// Constructs every declared plugin with `registry`, once, for [`Self::build_with`] and
    /// flow control ([`Admission::from_config`](crate::flow::Admission::from_config)).
    pub fn construct_plugins(
        &self,
        registry: &PluginRegistry,
    ) -> Result<ConstructedPlugins, ConfigError> {
        let mut constructed = ConstructedPlugins::default();
        for (index, config) in self.plugins.iter().enumerate() {
            let name = config.effective_name();
            if let Some(first) = constructed.position(name) {
                return Err(ConfigError::DuplicatePluginName {
                    index,
                    first,
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
            constructed.plugins.push(ConstructedPlugin {
                name: name.to_owned(),
                type_name: config.type_name.clone(),
                plugin,
            });
        }
        // Default producers, as the Go loader creates them: for each type a plugin needs and no
        // plugin is named after, one instance named after its type, in order of first need.
        let mut needed: Vec<&'static str> = Vec::new();
        for declared in constructed.iter() {
            for &type_name in &declared.plugin.default_producers {
                if constructed.get(type_name).is_none() && !needed.contains(&type_name) {
                    needed.push(type_name);
                }
            }
        }
        for type_name in needed {
            let index = constructed.len();
            let plugin = registry.create(&PluginSpec::of_type(type_name)).map_err(|source| {
                ConfigError::Plugin {
                    index,
                    name: type_name.to_owned(),
                    type_name: type_name.to_owned(),
                    source,
                }
            })?;
            constructed.plugins.push(ConstructedPlugin {
                name: type_name.to_owned(),
                type_name: type_name.to_owned(),
                plugin,
            });
        }
        for (index, declared) in constructed.iter().enumerate() {
            if let Some(binder) = &declared.plugin.binder {
                binder.bind(&constructed).map_err(|source| ConfigError::Plugin {
                    index,
                    name: declared.name.clone(),
                    type_name: declared.type_name.clone(),
                    source: source.into(),
                })?;
            }
        }
        Ok(constructed)
    }

    /// Assembles the scheduler from `plugins`, constructed from this config by
    /// [`Self::construct_plugins`]: its profiles, its profile handler, and the pre-request and
    /// completion hooks of every declared plugin. `registry` supplies the implied picker of
    /// profiles that declare none.
    pub fn build_with(
        &self,
        plugins: &ConstructedPlugins,
        registry: &PluginRegistry,
    ) -> Result<Scheduler, ConfigError> {
        // Checked here so that every loader of the config refuses a broken data layer, not only
        // the server that runs it.
        self.data_layer(plugins, registry)?;
        let handler = profile_handler(plugins)?;
        let profiles = if self.scheduling_profiles.is_empty() {
            vec![implied_default_profile(plugins, registry)?]
        } else {
            self.declared_profiles(plugins, registry)?
        };
        let (handler_name, handler_type, handler) = handler;
        if let Some(max) = handler.max_profiles()
            && profiles.len() > max
        {
            return Err(ConfigError::TooManyProfiles {
                handler: handler_name,
                max,
                count: profiles.len(),
            });
        }
        let names: Vec<Arc<str>> = profiles.iter().map(|profile| profile.name().clone()).collect();
        if let Err(message) = handler.check_profiles(&names) {
            return Err(ConfigError::HandlerProfiles { handler: handler_name, message });
        }

        let mut scheduler =
            Scheduler::new(profiles, handler).with_handler_plugin(&handler_name, &handler_type);
        for ConstructedPlugin { name, plugin, .. } in plugins.iter() {
            if let Some(screener) = &plugin.screener {
                scheduler = scheduler.with_screener(name, Arc::clone(screener));
            }
            if let Some(producer) = &plugin.data_producer {
                scheduler = scheduler.with_data_producer(Arc::clone(producer));
            }
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
            if let Some(writer) = &plugin.upstream_headers {
                scheduler = scheduler.with_upstream_headers(Arc::clone(writer));
            }
            if let Some(writer) = &plugin.response_headers {
                scheduler = scheduler.with_response_headers(Arc::clone(writer));
            }
            if let Some(reporter) = &plugin.usage_reporter {
                scheduler = scheduler.with_usage_reporter(Arc::clone(reporter));
            }
        }
        Ok(scheduler)
    }

    fn declared_profiles(
        &self,
        plugins: &ConstructedPlugins,
        registry: &PluginRegistry,
    ) -> Result<Vec<SchedulerProfile>, ConfigError> {
        let mut profiles: Vec<SchedulerProfile> = Vec::new();
        for (index, config) in self.scheduling_profiles.iter().enumerate() {
            if profiles.iter().any(|profile| **profile.name() == *config.name) {
                return Err(ConfigError::DuplicateProfileName { index, name: config.name.clone() });
            }
            profiles.push(build_profile(index, config, plugins, registry)?);
        }
        Ok(profiles)
    }
}

/// The declared profile handler with its name and type, or the implied single-profile one.
fn profile_handler(
    plugins: &ConstructedPlugins,
) -> Result<(String, String, Arc<dyn ProfileHandler>), ConfigError> {
    let mut found: Option<(&ConstructedPlugin, Arc<dyn ProfileHandler>)> = None;
    for declared in plugins.iter() {
        if let Some(handler) = &declared.plugin.profile_handler {
            if let Some((first, _)) = found {
                return Err(ConfigError::TwoProfileHandlers {
                    first: first.name.clone(),
                    second: declared.name.clone(),
                });
            }
            found = Some((declared, Arc::clone(handler)));
        }
    }
    Ok(match found {
        Some((declared, handler)) => (declared.name.clone(), declared.type_name.clone(), handler),
        None => (
            SINGLE_PROFILE_HANDLER.to_owned(),
            SINGLE_PROFILE_HANDLER.to_owned(),
            Arc::new(SingleProfileHandler),
        ),
    })
}

fn implied_default_profile(
    plugins: &ConstructedPlugins,
    registry: &PluginRegistry,
) -> Result<SchedulerProfile, ConfigError> {
    let refs: Vec<PluginRef> = plugins
        .iter()
        .filter(|declared| declared.plugin.is_profile_plugin())
        .map(|declared| PluginRef { plugin_ref: declared.name.clone(), weight: None })
        .collect();
    // With no filter, scorer or picker declared (a config of only a saturation detector and
    // flow control), the Go EPP builds this profile empty: its picker alone, choosing among
    // every endpoint at random.
    let implied = ProfileConfig { name: DEFAULT_PROFILE_NAME.to_owned(), plugins: refs };
    build_profile(0, &implied, plugins, registry)
}

fn build_profile(
    profile_index: usize,
    config: &ProfileConfig,
    plugins: &ConstructedPlugins,
    registry: &PluginRegistry,
) -> Result<SchedulerProfile, ConfigError> {
    let mut filters = Vec::new();
    let mut scorers = Vec::new();
    let mut picker: Option<(&str, Arc<dyn crate::scheduling::plugin::Picker>)> = None;
    for (index, reference) in config.plugins.iter().enumerate() {
        let name = reference.plugin_ref.as_str();
        let Some(ConstructedPlugin { plugin, .. }) = plugins.get(name) else {
            return Err(ConfigError::DanglingPluginRef {
                profile_index,
                profile: config.name.clone(),
                index,
                plugin_ref: name.to_owned(),
            });
        };
        // The Go loader hands every referenced plugin to the profile, which keeps the filters,
        // scorers and picker among them and ignores the rest without a word: a producer or a
        // policy listed in a profile is simply not part of it.
        if !plugin.is_profile_plugin() {
            continue;
        }
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
    // A profile without a picker takes the config's declared picker, as the Go EPP reuses
    // one picker across profiles; only without any does it get a max-score picker.
    let declared_picker = || {
        plugins.iter().find_map(|declared| {
            declared
                .plugin
                .picker
                .as_ref()
                .map(|picker| (declared.name.as_str(), Arc::clone(picker)))
        })
    };
    let (picker_name, picker) = match picker.or_else(declared_picker) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_kv_is_the_default_without_prefix() {
        let written = EndpointPickerConfig::from_yaml(
            "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
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
",
        );
        assert_eq!(Ok(EndpointPickerConfig::queue_kv()), written);
    }

    #[test]
    fn composition_edits_declarations_and_references() {
        let config = EndpointPickerConfig::queue_kv()
            .with_weight("kv-cache-utilization-scorer", 1.0)
            .with_plugin_parameters("max-score-picker", serde_json::json!({"maxNumOfEndpoints": 3}))
            .with_plugin(PluginConfig::of_type("concurrency-detector"))
            .with_feature_gate("flowControl")
            .with_feature_gate("flowControl");
        assert_eq!(config.feature_gates, ["flowControl"]);
        assert_eq!(config.scheduling_profiles[0].plugins[1].weight, Some(1.0));
        assert_eq!(config.plugins[2].parameters, Some(serde_json::json!({"maxNumOfEndpoints": 3})));
        assert_eq!(config.plugins[3].effective_name(), "concurrency-detector");
        assert_eq!(config.scheduling_profiles[0].plugins.len(), 3, "declared, not referenced");
    }

    #[test]
    #[should_panic(expected = "no plugin is named 'prefix-cache-scorer'")]
    fn composing_with_a_missing_plugin_is_a_bug() {
        let _ = EndpointPickerConfig::queue_kv().without_plugin(PREFIX_CACHE_SCORER);
    }
}
