//! The deciders of disaggregated serving: whether a request's optional stage (prefill on an
//! endpoint of its own, encoding multimodal inputs apart) runs, asked by the profile handler
//! once the decode endpoint is picked (llm-d-router's `deciderPlugin`).
//!
//! - `always-disagg-pd-decider`: every request is prefilled apart.
//! - `prefix-based-pd-decider`: prefilled apart only when the decode endpoint would have to
//!   compute at least `nonCachedTokens` prompt tokens itself: the prompt's tokens less those
//!   its prefix-index matches on the decode endpoint cover. `nonCachedTokens: 0` (the default)
//!   disables it; `promptTokens` (default 0: off) keeps prompts shorter than it whole.
//! - `always-disagg-multimodal-decider`: requests with image, audio or video inputs are
//!   encoded apart.
//!
//! Tokens are estimated from characters ([`scheduler_core::CHARACTERS_PER_TOKEN`]), as
//! everywhere on the decision path; the cached part is the matched blocks times the block size
//! of the prefix index the decider reads (the config's `approx-prefix-cache-producer`, else the
//! first `prefix-cache-scorer`'s own index).

use std::fmt::Debug;
use std::sync::{Arc, OnceLock};

use scheduler_core::{
    BindPlugins, CHARACTERS_PER_TOKEN, ConstructedPlugins, CycleState, InferenceRequest,
    PluginError, PoolSnapshot,
};
use serde::Deserialize;

use crate::prefix_cache::PrefixSource;
use crate::prefix_cache::producer::{PRODUCER_TYPE_NAME, declared_source, every_source};

/// llm-d type name of [`AlwaysDisaggPdDecider`].
pub const ALWAYS_DISAGG_PD_TYPE_NAME: &str = "always-disagg-pd-decider";
/// llm-d type name of [`PrefixBasedPdDecider`].
pub const PREFIX_BASED_PD_TYPE_NAME: &str = "prefix-based-pd-decider";
/// llm-d type name of [`AlwaysDisaggMultimodalDecider`].
pub const ALWAYS_DISAGG_MULTIMODAL_TYPE_NAME: &str = "always-disagg-multimodal-decider";

/// Decides whether a request's optional stage runs apart.
pub trait Decider: Send + Sync + Debug {
    /// Whether to run the stage for `request`, whose decode endpoint is `decode` (a position
    /// in `pool`; `None` when decode has not been picked yet, in the prefill-first order).
    fn disaggregate(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        pool: &PoolSnapshot,
        decode: Option<u32>,
    ) -> bool;
}

/// What a decider plugin offers the profile handler that names it
/// ([`scheduler_core::Plugin::shared`]).
#[derive(Debug)]
pub struct DeciderHandle(pub Arc<dyn Decider>);

/// `always-disagg-pd-decider`: always prefill apart.
#[derive(Clone, Copy, Debug, Default)]
pub struct AlwaysDisaggPdDecider;

impl Decider for AlwaysDisaggPdDecider {
    fn disaggregate(
        &self,
        _state: &mut CycleState,
        _request: &InferenceRequest,
        _pool: &PoolSnapshot,
        _decode: Option<u32>,
    ) -> bool {
        true
    }
}

/// `always-disagg-multimodal-decider`: encode apart the requests with multimodal inputs.
#[derive(Clone, Copy, Debug, Default)]
pub struct AlwaysDisaggMultimodalDecider;

impl Decider for AlwaysDisaggMultimodalDecider {
    fn disaggregate(
        &self,
        _state: &mut CycleState,
        request: &InferenceRequest,
        _pool: &PoolSnapshot,
        _decode: Option<u32>,
    ) -> bool {
        request.multimodal
    }
}

/// Parameters of `prefix-based-pd-decider`, with llm-d's names and defaults. Signed, so a
/// negative value is refused by name rather than as a type error.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PrefixBasedPdParameters {
    /// Prompt tokens the decode endpoint must lack in its cache for the request to be
    /// prefilled apart (default 0: never).
    #[serde(default)]
    pub non_cached_tokens: i64,
    /// Prompts shorter than this many tokens are never prefilled apart (default 0: no floor).
    #[serde(default)]
    pub prompt_tokens: i64,
}

/// `prefix-based-pd-decider`: prefill apart when the decode endpoint's cache leaves at least
/// `nonCachedTokens` of the prompt to compute.
#[derive(Debug)]
pub struct PrefixBasedPdDecider {
    non_cached_tokens: u64,
    prompt_tokens: u64,
    source: OnceLock<Arc<PrefixSource>>,
}

impl PrefixBasedPdDecider {
    /// A decider with `parameters`; negative values are refused, naming the parameter.
    pub fn new(parameters: PrefixBasedPdParameters) -> Result<Self, PluginError> {
        let non_negative = |name: &str, value: i64| {
            u64::try_from(value).map_err(|_| {
                PluginError::InvalidParameters(format!("{name}: cannot be negative, got {value}"))
            })
        };
        Ok(Self {
            non_cached_tokens: non_negative("nonCachedTokens", parameters.non_cached_tokens)?,
            prompt_tokens: non_negative("promptTokens", parameters.prompt_tokens)?,
            source: OnceLock::new(),
        })
    }

    /// A decider reading `source`'s prefix matches (for schedulers assembled in code).
    pub fn with_source(self, source: Arc<PrefixSource>) -> Self {
        let _ = self.source.set(source);
        self
    }
}

impl BindPlugins for PrefixBasedPdDecider {
    fn bind(&self, plugins: &ConstructedPlugins) -> Result<(), PluginError> {
        let found = declared_source(plugins, PRODUCER_TYPE_NAME)
            .or_else(|| every_source(plugins).find(|source| source.is_declared_producer()))
            .or_else(|| every_source(plugins).next());
        if let Some(source) = found {
            let _ = self.source.set(source);
        }
        Ok(())
    }
}

impl Decider for PrefixBasedPdDecider {
    fn disaggregate(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        pool: &PoolSnapshot,
        decode: Option<u32>,
    ) -> bool {
        if self.non_cached_tokens == 0 {
            return false;
        }
        let prompt_tokens = request.estimated_prompt_tokens();
        if prompt_tokens < self.prompt_tokens.max(self.non_cached_tokens) {
            return false;
        }
        // Without a decode pick or a prefix index there is nothing to say what is cached:
        // llm-d keeps the request whole when its match attribute is missing.
        let (Some(decode), Some(producer)) =
            (decode, self.source.get().and_then(|source| source.producer()))
        else {
            return false;
        };
        let block_tokens = (producer.block_size() / CHARACTERS_PER_TOKEN).max(1) as u64;
        let Some(matches) = producer.matches(state, request, pool) else { return false };
        let cached_tokens = (matches.matched(decode) as u64).saturating_mul(block_tokens);
        prompt_tokens.saturating_sub(cached_tokens) >= self.non_cached_tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_parameters_are_refused_by_name() {
        let error = PrefixBasedPdDecider::new(PrefixBasedPdParameters {
            non_cached_tokens: -1,
            prompt_tokens: 0,
        })
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid parameters: nonCachedTokens: cannot be negative, got -1"
        );
        let error = PrefixBasedPdDecider::new(PrefixBasedPdParameters {
            non_cached_tokens: 1,
            prompt_tokens: -5,
        })
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid parameters: promptTokens: cannot be negative, got -5"
        );
    }
}
