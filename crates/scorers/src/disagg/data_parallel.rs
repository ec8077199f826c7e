//! `data-parallel-profile-handler` (deprecated in llm-d-router in favour of the single-profile
//! handler behind Istio 1.28.1 or later): data-parallel serving, where one pod runs several
//! engine ranks, each listening on a port of its own, behind one primary port.
//!
//! Each rank is an endpoint of the pool (pod IP, rank port), so the profile's filters and
//! scorers choose among ranks, and load spreads over them. The proxy, though, is sent to the
//! pod: the destination is the chosen rank's IP with `primaryPort` (default 8000), and the
//! chosen rank's own `ip:port` travels in the `x-data-parallel-host-port` request header, for
//! the pod's sidecar to forward to. The handler runs exactly one profile.

use std::sync::Arc;

use scheduler_core::{
    CycleState, InferenceRequest, PluginError, ProfileHandler, ProfileProgress, ProfileRun,
    StageRuns,
};
use serde::Deserialize;

/// llm-d type name.
pub const TYPE_NAME: &str = "data-parallel-profile-handler";

/// llm-d's default primary port.
const DEFAULT_PRIMARY_PORT: i64 = 8000;

/// Parameters of `data-parallel-profile-handler`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DataParallelParameters {
    /// The pod port the proxy sends to (default 8000).
    #[serde(default)]
    pub primary_port: Option<i64>,
}

/// `port` as a primary port, or an error naming `primaryPort`.
pub(crate) fn primary_port(port: i64) -> Result<u16, PluginError> {
    u16::try_from(port).ok().filter(|&port| port != 0).ok_or_else(|| {
        PluginError::InvalidParameters(format!(
            "primaryPort: must be between 1 and 65535, got {port}"
        ))
    })
}

/// Runs the one profile and sends the proxy to the pod's primary port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataParallelProfileHandler {
    primary_port: u16,
}

impl DataParallelProfileHandler {
    /// A handler with `parameters`.
    pub fn new(parameters: DataParallelParameters) -> Result<Self, PluginError> {
        let port = parameters.primary_port.unwrap_or(DEFAULT_PRIMARY_PORT);
        Ok(Self { primary_port: primary_port(port)? })
    }

    /// The pod port the destination takes.
    pub fn primary_port(&self) -> u16 {
        self.primary_port
    }
}

impl ProfileHandler for DataParallelProfileHandler {
    fn next_profiles(
        &self,
        _state: &mut CycleState,
        _request: &InferenceRequest,
        profile_names: &[Arc<str>],
        progress: &ProfileProgress<'_>,
        next: &mut Vec<usize>,
    ) {
        if progress.runs.is_empty() && progress.failed.is_empty() && !profile_names.is_empty() {
            next.push(0);
        }
    }

    fn primary_profile(&self, _request: &InferenceRequest, runs: &[ProfileRun]) -> Option<usize> {
        (!runs.is_empty()).then_some(0)
    }

    fn max_profiles(&self) -> Option<usize> {
        Some(1)
    }

    fn stages(&self, _runs: &[ProfileRun]) -> StageRuns {
        StageRuns { data_parallel_port: Some(self.primary_port), ..StageRuns::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_primary_port_defaults_to_8000_and_is_checked_by_name() {
        let handler = DataParallelProfileHandler::new(DataParallelParameters::default()).unwrap();
        assert_eq!(handler.primary_port(), 8000);
        for port in [0, -1, 65_536] {
            let parameters = DataParallelParameters { primary_port: Some(port) };
            assert_eq!(
                DataParallelProfileHandler::new(parameters).unwrap_err().to_string(),
                format!("invalid parameters: primaryPort: must be between 1 and 65535, got {port}")
            );
        }
    }
}
