//! `disagg-profile-handler` (and the deprecated `pd-profile-handler`): runs a request's
//! stages as scheduling profiles named by stage, decode always and prefill and encode when
//! their deciders say so.
//!
//! In the default `decode-first` order the decode profile runs first; then, each asked with
//! the decode pick, the encode decider (`deciders.encode`) and the prefill decider
//! (`deciders.prefill`) say whether their stage runs. In the `prefill-first` order the prefill
//! profile runs first whenever the config declares it (no prefill decider is allowed), then
//! encode if its decider says so, then decode. Decode is always the primary: the request goes
//! to the decode endpoint, and the prefill and encode picks travel in headers (see
//! [`scheduler_core::protocol`]). A stage that finds no endpoint (no prefill endpoint ready)
//! is left out: the request is served decode-only rather than refused. Only a decode stage
//! without an endpoint fails the request.
//!
//! Parameters (llm-d-router's): `stageOrder` (`decode-first`, `prefill-first`),
//! `profiles.{decode,prefill,encode}` (default the stage's name) and
//! `deciders.{prefill,encode}` (plugin names; a stage without a decider never runs in the
//! decode-first order). The deprecated flat spelling (`decodeProfile`, `prefillProfile`,
//! `encodeProfile`, `prefillDeciderPluginName`, `encodeDeciderPluginName`,
//! `deciderPluginName`) is accepted with a warning; the two spellings cannot be mixed.
//! `pd-profile-handler` takes `decodeProfile`, `prefillProfile`, `deciderPluginName` (default
//! `prefix-based-pd-decider`), `primaryPort` (data-parallel destination port, see
//! [`super::data_parallel`]) and, without effect, `prefixPluginType`, `prefixPluginName` and
//! `prefixMatchInfoProducerName`.
//!
//! The parameters of its first versions (llm-d-inference-scheduler up to v0.3, still in many
//! published configs) keep their meaning, with a warning, where llm-d-router today refuses
//! such a config (its default decider is not declared) or ignores them:
//! - `threshold` (without `deciderPluginName`): 0 prefills every request apart (the
//!   always-disaggregate decider); N > 0 only requests whose prompt has at least N characters
//!   not cached on the decode pick (the prefix-based decider with `nonCachedTokens` N / 4,
//!   rounded up: tokens are estimated at 4 characters).
//! - no `threshold` and no `deciderPluginName`, with no `prefix-based-pd-decider` declared: the
//!   old default, `threshold: 0`.
//! - `hashBlockSize`: accepted without effect (the decider reads the prefix index's own).

use std::sync::{Arc, OnceLock};

use scheduler_core::{
    BindPlugins, CHARACTERS_PER_TOKEN, ConstructedPlugins, CycleState, InferenceRequest,
    PluginError, PluginSpec, ProfileHandler, ProfileProgress, ProfileRun, StageRuns,
};
use serde::Deserialize;

use super::data_parallel::primary_port;
use super::deciders::{
    AlwaysDisaggPdDecider, Decider, DeciderHandle, PREFIX_BASED_PD_TYPE_NAME, PrefixBasedPdDecider,
    PrefixBasedPdParameters,
};

/// llm-d type name of the handler.
pub const TYPE_NAME: &str = "disagg-profile-handler";
/// llm-d type name of the handler's deprecated predecessor (P/D only).
pub const PD_TYPE_NAME: &str = "pd-profile-handler";

/// The default profile name of each stage.
const DECODE: &str = "decode";
const PREFILL: &str = "prefill";
const ENCODE: &str = "encode";

/// Which stage's profile runs first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StageOrder {
    /// Decode, then encode and prefill as their deciders say (llm-d's default).
    #[default]
    DecodeFirst,
    /// Prefill (whenever declared), then encode as its decider says, then decode.
    PrefillFirst,
}

impl StageOrder {
    /// Reads llm-d's spellings: case, `-` and `_` do not matter; `decode`/`prefill` are short
    /// for the two orders; empty is the default.
    pub fn parse(text: &str) -> Result<Self, PluginError> {
        let folded: String =
            text.chars().filter(|c| !matches!(c, '-' | '_')).flat_map(char::to_lowercase).collect();
        match folded.as_str() {
            "" | "decodefirst" | "decode" => Ok(Self::DecodeFirst),
            "prefillfirst" | "prefill" => Ok(Self::PrefillFirst),
            _ => Err(PluginError::InvalidParameters(format!(
                "stageOrder: invalid stage order '{text}', must be 'decode-first' or 'prefill-first'"
            ))),
        }
    }
}

/// `profiles`: the profile of each stage.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct StageProfiles {
    #[serde(default)]
    decode: Option<String>,
    #[serde(default)]
    prefill: Option<String>,
    #[serde(default)]
    encode: Option<String>,
}

/// `deciders`: the decider plugin of each optional stage.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct StageDeciders {
    #[serde(default)]
    prefill: Option<String>,
    #[serde(default)]
    encode: Option<String>,
}

/// The current (nested) parameters of `disagg-profile-handler`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NestedParameters {
    #[serde(default)]
    stage_order: Option<String>,
    #[serde(default)]
    profiles: StageProfiles,
    #[serde(default)]
    deciders: StageDeciders,
}

/// The deprecated flat parameters of `disagg-profile-handler`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FlatParameters {
    #[serde(default)]
    stage_order: Option<String>,
    #[serde(default)]
    decode_profile: Option<String>,
    #[serde(default)]
    prefill_profile: Option<String>,
    #[serde(default)]
    encode_profile: Option<String>,
    #[serde(default)]
    prefill_decider_plugin_name: Option<String>,
    #[serde(default)]
    encode_decider_plugin_name: Option<String>,
    /// `pd-profile-handler`'s name for the prefill decider; loses to the explicit one.
    #[serde(default)]
    decider_plugin_name: Option<String>,
}

/// Parameters of `pd-profile-handler`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PdParameters {
    #[serde(default)]
    decode_profile: Option<String>,
    #[serde(default)]
    prefill_profile: Option<String>,
    #[serde(default)]
    decider_plugin_name: Option<String>,
    #[serde(default)]
    primary_port: Option<i64>,
    /// Accepted without effect: the decider finds the prefix index itself.
    #[serde(default)]
    prefix_plugin_type: Option<String>,
    /// Accepted without effect.
    #[serde(default)]
    prefix_plugin_name: Option<String>,
    /// Accepted without effect.
    #[serde(default)]
    prefix_match_info_producer_name: Option<String>,
    /// The first versions' disaggregation threshold, in prompt characters not cached on the
    /// decode pick (0: always).
    #[serde(default)]
    threshold: Option<i64>,
    /// The first versions' prefix block size; accepted without effect.
    #[serde(default)]
    hash_block_size: Option<i64>,
}

/// One optional stage: its profile and the decider that gates it.
#[derive(Debug)]
struct OptionalStage {
    profile: String,
    /// The decider's plugin name (and the parameter that named it, for errors).
    decider_name: Option<(&'static str, String)>,
    /// A decider built from the handler's own parameters (`pd-profile-handler`'s `threshold`).
    inline: Option<InlineDecider>,
    /// When the named decider is not declared, decide as `pd-profile-handler`'s first
    /// versions did by default (always disaggregate) instead of refusing the config.
    legacy_default: bool,
    decider: OnceLock<Arc<dyn Decider>>,
}

/// A decider the handler builds itself (see the module docs).
#[derive(Debug, Clone)]
enum InlineDecider {
    Always,
    PrefixBased(Arc<PrefixBasedPdDecider>),
}

impl OptionalStage {
    fn new(
        profile: Option<String>,
        default: &str,
        decider: Option<(&'static str, String)>,
    ) -> Self {
        let profile = profile.filter(|name| !name.is_empty()).unwrap_or_else(|| default.to_owned());
        let decider_name = decider.filter(|(_, name)| !name.is_empty());
        Self {
            profile,
            decider_name,
            inline: None,
            legacy_default: false,
            decider: OnceLock::new(),
        }
    }

    /// Whether a decider gates the stage.
    fn has_decider(&self) -> bool {
        self.decider_name.is_some() || self.inline.is_some()
    }

    fn bind(&self, plugins: &ConstructedPlugins) -> Result<(), PluginError> {
        if let Some(inline) = &self.inline {
            let decider: Arc<dyn Decider> = match inline {
                InlineDecider::Always => Arc::new(AlwaysDisaggPdDecider),
                InlineDecider::PrefixBased(decider) => {
                    decider.bind(plugins)?;
                    Arc::clone(decider) as Arc<dyn Decider>
                }
            };
            let _ = self.decider.set(decider);
            return Ok(());
        }
        let Some((parameter, name)) = &self.decider_name else { return Ok(()) };
        let Some(declared) = plugins.get(name) else {
            if self.legacy_default {
                tracing::warn!(
                    "{PD_TYPE_NAME}: no '{name}' is declared; every request is prefilled apart, \
                     as the handler's first versions did (declare a decider and name it in \
                     deciderPluginName to choose)"
                );
                let _ = self.decider.set(Arc::new(AlwaysDisaggPdDecider));
                return Ok(());
            }
            return Err(PluginError::InvalidParameters(format!(
                "{parameter}: no plugin named '{name}' is declared"
            )));
        };
        let handle = declared
            .plugin
            .shared
            .clone()
            .and_then(|shared| shared.downcast::<DeciderHandle>().ok())
            .ok_or_else(|| {
                PluginError::InvalidParameters(format!(
                    "{parameter}: plugin '{name}' (type {}) is not a decider",
                    declared.type_name
                ))
            })?;
        let _ = self.decider.set(Arc::clone(&handle.0));
        Ok(())
    }

    /// Whether the stage runs for this request: its decider says so.
    fn approves(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        progress: &ProfileProgress<'_>,
        decode: Option<u32>,
    ) -> bool {
        self.decider
            .get()
            .is_some_and(|decider| decider.disaggregate(state, request, progress.pool, decode))
    }
}

/// The other stage's endpoint, for the plugins of the stage running now: the decode pick
/// while the prefill profile runs (decode-first order), the prefill pick while the decode
/// profile runs (prefill-first order). llm-d-router publishes it as the request attribute
/// `peer-endpoint`; topology affinity compares candidates with it. Kept in the decision's
/// scratch, stamped with the decision it belongs to.
#[derive(Clone, Copy, Debug, Default)]
pub struct PeerEndpoint {
    decision: u64,
    position: Option<u32>,
}

impl PeerEndpoint {
    /// Publishes `position` (in the decision's pool) as the peer of the stage about to run.
    pub fn publish(state: &mut CycleState, position: u32) {
        let decision = state.decision_stamp();
        *state.scratch::<Self>() = Self { decision, position: Some(position) };
    }

    /// The peer's position in the pool, if this decision published one.
    pub fn of(state: &mut CycleState) -> Option<u32> {
        let decision = state.decision_stamp();
        let peer = *state.scratch::<Self>();
        peer.position.filter(|_| peer.decision == decision)
    }
}

/// Which optional stages a decision's deciders turned down, so that a later round of the same
/// decision does not ask them again. Kept in the decision's scratch.
#[derive(Debug, Default)]
struct Declined {
    decision: u64,
    prefill: bool,
    encode: bool,
}

/// The disaggregating profile handler.
#[derive(Debug)]
pub struct DisaggProfileHandler {
    type_name: &'static str,
    order: StageOrder,
    decode: String,
    prefill: OptionalStage,
    encode: Option<OptionalStage>,
    data_parallel_port: Option<u16>,
}

impl DisaggProfileHandler {
    /// A handler from `disagg-profile-handler`'s parameters (nested, or the deprecated flat
    /// spelling).
    pub fn from_spec(spec: &PluginSpec<'_>) -> Result<Self, PluginError> {
        let nested = match spec.parameters::<NestedParameters>() {
            Ok(nested) => nested,
            Err(nested_error) => match spec.parameters::<FlatParameters>() {
                Ok(flat) => {
                    tracing::warn!(
                        plugin = spec.name,
                        "{TYPE_NAME}: the flat parameters (decodeProfile, prefillDeciderPluginName, ...) are deprecated; use profiles.* and deciders.*"
                    );
                    flat.into_nested()
                }
                Err(flat_error) => {
                    return Err(PluginError::InvalidParameters(format!(
                        "{nested_error}; as the deprecated flat parameters: {flat_error} (use either profiles/deciders or the flat names, not both)"
                    )));
                }
            },
        };
        let order = StageOrder::parse(nested.stage_order.as_deref().unwrap_or(""))?;
        if order == StageOrder::PrefillFirst && nested.deciders.prefill.is_some() {
            return Err(PluginError::InvalidParameters(
                "deciders.prefill: a prefill decider is not supported in the prefill-first stage order (prefill always runs first)".to_owned(),
            ));
        }
        let decider = |parameter: &'static str, name: Option<String>| name.map(|n| (parameter, n));
        Ok(Self {
            type_name: TYPE_NAME,
            order,
            decode: non_empty_or(nested.profiles.decode, DECODE),
            prefill: OptionalStage::new(
                nested.profiles.prefill,
                PREFILL,
                decider("deciders.prefill", nested.deciders.prefill),
            ),
            encode: Some(OptionalStage::new(
                nested.profiles.encode,
                ENCODE,
                decider("deciders.encode", nested.deciders.encode),
            )),
            data_parallel_port: None,
        })
    }

    /// A handler from the deprecated `pd-profile-handler`'s parameters.
    pub fn from_pd_spec(spec: &PluginSpec<'_>) -> Result<Self, PluginError> {
        tracing::warn!(
            plugin = spec.name,
            "{PD_TYPE_NAME} is deprecated; use {TYPE_NAME} (profiles.*, deciders.prefill)"
        );
        let parameters: PdParameters = spec.parameters()?;
        let named = parameters.decider_plugin_name.is_some();
        let decider =
            parameters.decider_plugin_name.unwrap_or_else(|| PREFIX_BASED_PD_TYPE_NAME.to_owned());
        if decider.is_empty() {
            return Err(PluginError::InvalidParameters(
                "deciderPluginName: the decider plugin name is not defined".to_owned(),
            ));
        }
        if parameters.hash_block_size.is_some() {
            tracing::warn!(
                plugin = spec.name,
                "{PD_TYPE_NAME}: hashBlockSize is no longer used (the prefix index's block size is)"
            );
        }
        let inline = match parameters.threshold {
            Some(threshold) if threshold < 0 => {
                return Err(PluginError::InvalidParameters(format!(
                    "threshold: cannot be negative, got {threshold}"
                )));
            }
            Some(_) if named => {
                tracing::warn!(
                    plugin = spec.name,
                    "{PD_TYPE_NAME}: threshold is ignored beside deciderPluginName"
                );
                None
            }
            Some(0) => Some(InlineDecider::Always),
            Some(threshold) => {
                let characters = threshold as u64;
                let tokens = characters.div_ceil(CHARACTERS_PER_TOKEN as u64);
                let decider = PrefixBasedPdDecider::new(PrefixBasedPdParameters {
                    non_cached_tokens: tokens as i64,
                    prompt_tokens: 0,
                })?;
                Some(InlineDecider::PrefixBased(Arc::new(decider)))
            }
            None => None,
        };
        if inline.is_some() {
            tracing::warn!(
                plugin = spec.name,
                "{PD_TYPE_NAME}: threshold is deprecated; declare a decider (always-disagg-pd-decider, \
                 prefix-based-pd-decider) and name it in deciderPluginName"
            );
        }
        let data_parallel_port = match parameters.primary_port {
            None | Some(0) => None,
            Some(port) => {
                tracing::warn!(plugin = spec.name, "{PD_TYPE_NAME}: primaryPort is deprecated");
                Some(primary_port(port)?)
            }
        };
        Ok(Self {
            type_name: PD_TYPE_NAME,
            order: StageOrder::DecodeFirst,
            decode: non_empty_or(parameters.decode_profile, DECODE),
            prefill: OptionalStage {
                inline,
                legacy_default: !named,
                ..OptionalStage::new(
                    parameters.prefill_profile,
                    PREFILL,
                    Some(("deciderPluginName", decider)),
                )
            },
            encode: None,
            data_parallel_port,
        })
    }

    /// The stage order.
    pub fn stage_order(&self) -> StageOrder {
        self.order
    }

    fn position(profile_names: &[Arc<str>], name: &str) -> Option<usize> {
        profile_names.iter().position(|candidate| &**candidate == name)
    }

    fn declined(state: &mut CycleState) -> &mut Declined {
        let decision = state.decision_stamp();
        let declined = state.scratch::<Declined>();
        if declined.decision != decision {
            *declined = Declined { decision, ..Declined::default() };
        }
        declined
    }

    /// The next stage of the decode-first order.
    fn next_decode_first(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        profile_names: &[Arc<str>],
        progress: &ProfileProgress<'_>,
    ) -> Option<usize> {
        if !progress.attempted(&self.decode) {
            return Self::position(profile_names, &self.decode);
        }
        // No decode endpoint: the request fails, so no other stage is worth running.
        let decode = *progress.run(&self.decode)?.picks.first()?;
        if let Some(encode) = &self.encode
            && let Some(at) = Self::position(profile_names, &encode.profile)
            && !progress.attempted(&encode.profile)
            && !Self::declined(state).encode
        {
            if encode.approves(state, request, progress, Some(decode)) {
                return Some(at);
            }
            Self::declined(state).encode = true;
        }
        let prefill = &self.prefill;
        if let Some(at) = Self::position(profile_names, &prefill.profile)
            && !progress.attempted(&prefill.profile)
            && !Self::declined(state).prefill
        {
            if prefill.approves(state, request, progress, Some(decode)) {
                PeerEndpoint::publish(state, decode);
                return Some(at);
            }
            Self::declined(state).prefill = true;
        }
        None
    }

    /// The next stage of the prefill-first order.
    fn next_prefill_first(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        profile_names: &[Arc<str>],
        progress: &ProfileProgress<'_>,
    ) -> Option<usize> {
        if progress.attempted(&self.decode) {
            return None;
        }
        if let Some(at) = Self::position(profile_names, &self.prefill.profile)
            && !progress.attempted(&self.prefill.profile)
        {
            return Some(at);
        }
        if let Some(encode) = &self.encode
            && let Some(at) = Self::position(profile_names, &encode.profile)
            && !progress.attempted(&encode.profile)
            && !Self::declined(state).encode
        {
            if encode.approves(state, request, progress, None) {
                return Some(at);
            }
            Self::declined(state).encode = true;
        }
        if let Some(&prefill) =
            progress.run(&self.prefill.profile).and_then(|run| run.picks.first())
        {
            PeerEndpoint::publish(state, prefill);
        }
        Self::position(profile_names, &self.decode)
    }
}

fn non_empty_or(name: Option<String>, default: &str) -> String {
    name.filter(|name| !name.is_empty()).unwrap_or_else(|| default.to_owned())
}

impl FlatParameters {
    fn into_nested(self) -> NestedParameters {
        NestedParameters {
            stage_order: self.stage_order,
            profiles: StageProfiles {
                decode: self.decode_profile,
                prefill: self.prefill_profile,
                encode: self.encode_profile,
            },
            deciders: StageDeciders {
                prefill: self.prefill_decider_plugin_name.or(self.decider_plugin_name),
                encode: self.encode_decider_plugin_name,
            },
        }
    }
}

impl BindPlugins for DisaggProfileHandler {
    fn bind(&self, plugins: &ConstructedPlugins) -> Result<(), PluginError> {
        self.prefill.bind(plugins)?;
        if let Some(encode) = &self.encode {
            encode.bind(plugins)?;
        }
        Ok(())
    }
}

impl ProfileHandler for DisaggProfileHandler {
    fn next_profiles(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        profile_names: &[Arc<str>],
        progress: &ProfileProgress<'_>,
        next: &mut Vec<usize>,
    ) {
        let stage = match self.order {
            StageOrder::DecodeFirst => {
                self.next_decode_first(state, request, profile_names, progress)
            }
            StageOrder::PrefillFirst => {
                self.next_prefill_first(state, request, profile_names, progress)
            }
        };
        next.extend(stage);
    }

    fn primary_profile(&self, _request: &InferenceRequest, runs: &[ProfileRun]) -> Option<usize> {
        runs.iter().position(|run| *run.profile == *self.decode)
    }

    fn check_profiles(&self, profile_names: &[Arc<str>]) -> Result<(), String> {
        let declared =
            || profile_names.iter().map(|name| format!("'{name}'")).collect::<Vec<_>>().join(", ");
        let missing = |parameter: &str, profile: &str| {
            Err(format!(
                "{parameter} names the profile '{profile}', which is not declared (declared: {})",
                declared()
            ))
        };
        let (decode_parameter, prefill_parameter, encode_parameter) = match self.type_name {
            PD_TYPE_NAME => ("decodeProfile", "prefillProfile", "encodeProfile"),
            _ => ("profiles.decode", "profiles.prefill", "profiles.encode"),
        };
        if Self::position(profile_names, &self.decode).is_none() {
            return missing(decode_parameter, &self.decode);
        }
        // A stage with a decider but no profile would silently never run.
        if self.prefill.has_decider()
            && Self::position(profile_names, &self.prefill.profile).is_none()
        {
            return missing(prefill_parameter, &self.prefill.profile);
        }
        if let Some(encode) = &self.encode
            && encode.has_decider()
            && Self::position(profile_names, &encode.profile).is_none()
        {
            return missing(encode_parameter, &encode.profile);
        }
        Ok(())
    }

    fn stages(&self, runs: &[ProfileRun]) -> StageRuns {
        let position = |profile: &str| runs.iter().position(|run| *run.profile == *profile);
        StageRuns {
            prefill: position(&self.prefill.profile),
            encode: self.encode.as_ref().and_then(|encode| position(&encode.profile)),
            data_parallel_port: self.data_parallel_port,
        }
    }
}
