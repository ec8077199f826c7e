//! Disaggregated serving (llm-d-router's P/D, E/P/D and data-parallel routing): the profile
//! handlers that run a request's stages as profiles, and the deciders that gate the optional
//! stages. The role filters (`decode-filter`, `prefill-filter`, `encode-filter`) that give each
//! stage's profile its endpoints are in [`crate::label_filter`].
//!
//! | type | what |
//! |---|---|
//! | `disagg-profile-handler` | decode, then prefill and encode as the deciders say ([`handler`]) |
//! | `pd-profile-handler` (deprecated) | the same, P/D only, older parameters |
//! | `data-parallel-profile-handler` (deprecated in llm-d) | one profile over the ranks; destination the pod's primary port ([`data_parallel`]) |
//! | `always-disagg-pd-decider`, `prefix-based-pd-decider`, `always-disagg-multimodal-decider` | deciders ([`deciders`]) |
//! | `disagg-headers-handler`, `prefill-header-handler` (deprecated) | accepted; the headers are written for every disaggregated decision anyway |
//!
//! The decision reaches the proxy as headers on the request: the decode endpoint is the
//! destination, the prefill endpoint is `x-prefiller-host-port` and the encoders
//! `x-encoder-hosts-ports` (the adapters write them from [`scheduler_core::SchedulingResult`]).

pub mod data_parallel;
pub mod deciders;
pub mod handler;

use std::sync::Arc;

use scheduler_core::{NoParameters, Plugin, PluginRegistry};
use serde::Deserialize;

pub use data_parallel::{DataParallelParameters, DataParallelProfileHandler};
pub use deciders::{
    AlwaysDisaggMultimodalDecider, AlwaysDisaggPdDecider, Decider, DeciderHandle,
    PrefixBasedPdDecider, PrefixBasedPdParameters,
};
pub use handler::PeerEndpoint;
pub use handler::{DisaggProfileHandler, StageOrder};

/// llm-d type name of the deprecated pre-request plugin that wrote the disaggregation headers.
pub const DISAGG_HEADERS_HANDLER_TYPE_NAME: &str = "disagg-headers-handler";
/// The older, deprecated alias of [`DISAGG_HEADERS_HANDLER_TYPE_NAME`].
pub const PREFILL_HEADER_HANDLER_TYPE_NAME: &str = "prefill-header-handler";

/// Parameters of the deprecated header handlers: the profiles whose picks they wrote.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HeadersHandlerParameters {
    #[serde(default)]
    prefill_profile: Option<String>,
    #[serde(default)]
    encode_profile: Option<String>,
}

/// Registers the handlers, the deciders and the deprecated header handlers.
pub fn register(registry: &mut PluginRegistry) {
    registry.register(handler::TYPE_NAME, |spec| {
        let handler = Arc::new(DisaggProfileHandler::from_spec(spec)?);
        Ok(Plugin {
            profile_handler: Some(handler.clone()),
            binder: Some(handler),
            ..Plugin::default()
        })
    });
    registry.register(handler::PD_TYPE_NAME, |spec| {
        let handler = Arc::new(DisaggProfileHandler::from_pd_spec(spec)?);
        Ok(Plugin {
            profile_handler: Some(handler.clone()),
            binder: Some(handler),
            ..Plugin::default()
        })
    });
    registry.register(data_parallel::TYPE_NAME, |spec| {
        tracing::warn!(
            plugin = spec.name,
            "{} is deprecated in llm-d-router (single-profile-handler with Istio >= 1.28.1)",
            data_parallel::TYPE_NAME
        );
        Ok(Plugin::profile_handler(DataParallelProfileHandler::new(spec.parameters()?)?))
    });
    registry.register(deciders::ALWAYS_DISAGG_PD_TYPE_NAME, |spec| {
        spec.parameters::<NoParameters>()?;
        Ok(decider_plugin(Arc::new(AlwaysDisaggPdDecider)))
    });
    registry.register(deciders::ALWAYS_DISAGG_MULTIMODAL_TYPE_NAME, |spec| {
        spec.parameters::<NoParameters>()?;
        Ok(decider_plugin(Arc::new(AlwaysDisaggMultimodalDecider)))
    });
    registry.register(deciders::PREFIX_BASED_PD_TYPE_NAME, |spec| {
        let decider = Arc::new(PrefixBasedPdDecider::new(spec.parameters()?)?);
        Ok(Plugin { binder: Some(decider.clone()), ..decider_plugin(decider) })
    });
    for name in [DISAGG_HEADERS_HANDLER_TYPE_NAME, PREFILL_HEADER_HANDLER_TYPE_NAME] {
        registry.register(name, move |spec| {
            spec.parameters::<HeadersHandlerParameters>()?;
            tracing::warn!(
                plugin = spec.name,
                "{name} is deprecated: the disaggregation headers are written from the profile handler's stages; declare {} instead",
                handler::TYPE_NAME
            );
            Ok(Plugin::default())
        });
    }
}

fn decider_plugin(decider: Arc<dyn Decider>) -> Plugin {
    Plugin { shared: Some(Arc::new(DeciderHandle(decider))), ..Plugin::default() }
}
