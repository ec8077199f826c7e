//! Lag compensation, shared by the load scorers: the `lagCompensation` parameter, and what
//! this picker sent to an endpoint after its metrics were scraped (the endpoint's
//! [`DispatchLog`](scheduler_core::DispatchLog)).

use scheduler_core::{EndpointState, PendingDispatches};
use serde::Deserialize;

/// Parameters of `queue-scorer` and `kv-cache-utilization-scorer`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadScorerParameters {
    /// Add the requests this picker sent to an endpoint after its metrics were scraped to the
    /// scraped numbers (default true). Without it, every decision between two scrapes sees
    /// the same load and a burst lands on one endpoint; `false` scores exactly like GIE.
    pub lag_compensation: bool,
}

impl Default for LoadScorerParameters {
    fn default() -> Self {
        Self { lag_compensation: true }
    }
}

/// vLLM's default KV block size, for turning pending prompt tokens into blocks.
pub(crate) const TOKENS_PER_KV_BLOCK: u64 = 16;

/// The picks sent to `state`'s endpoint after its metrics were scraped, when `compensate` is
/// on (else none): the requests the scraped numbers do not count yet.
pub(crate) fn pending_since_scrape(state: &EndpointState, compensate: bool) -> PendingDispatches {
    if compensate {
        state.endpoint.dispatches().pending_since(state.metrics.updated_at)
    } else {
        PendingDispatches::default()
    }
}
