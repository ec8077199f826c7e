//! `header-profile-handler`: runs the one scheduling profile a request header names.
//!
//! Matches llm-d-router's `profilehandler/headerprofile` (alpha). A caller that already knows
//! which stage of a disaggregated pipeline a call is for (a coordinator calling once per
//! stage) names the profile in a header, and exactly one profile runs:
//! - with a single profile configured, that profile, whatever the header says;
//! - otherwise the profile named by the header (`headerName`, default `EPP-Profile`, read
//!   case-insensitively; its value trimmed and compared case-sensitively with the profile
//!   names);
//! - when the header is missing or blank, `defaultProfile` (default `decode`);
//! - when the header names no configured profile (or the default is not configured), none:
//!   the decision fails with "no profile run", which the adapters answer as the Go EPP does
//!   (it cannot tell a malformed request from exhausted capacity either).
//!
//! The profile that ran is the primary one. Unlike the Go handler, which logs the reason of a
//! failed match, this one has no logger; the decision's error says that no profile ran.

use std::sync::Arc;

use scheduler_core::{
    CycleState, InferenceRequest, PluginError, ProfileHandler, ProfileProgress, ProfileRun,
};
use serde::Deserialize;

/// llm-d type name.
pub const TYPE_NAME: &str = "header-profile-handler";
/// The header read when none is configured (compared lower-cased, as request headers are).
pub const DEFAULT_HEADER: &str = "epp-profile";
/// The profile run when the header is missing or blank and none is configured.
pub const DEFAULT_PROFILE: &str = "decode";

/// Parameters of [`HeaderProfileHandler`].
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderProfileParameters {
    /// The request header naming the profile (default `EPP-Profile`).
    pub header_name: String,
    /// The profile run when the header is missing or blank (default `decode`).
    pub default_profile: String,
}

/// Runs the single profile a request header names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderProfileHandler {
    header: String,
    default_profile: String,
}

impl HeaderProfileHandler {
    /// A handler for `parameters`: blank values take their defaults, the header name is
    /// lower-cased.
    pub fn new(parameters: &HeaderProfileParameters) -> Result<Self, PluginError> {
        let header = parameters.header_name.trim().to_ascii_lowercase();
        let default_profile = parameters.default_profile.trim();
        Ok(Self {
            header: if header.is_empty() { DEFAULT_HEADER.to_owned() } else { header },
            default_profile: if default_profile.is_empty() {
                DEFAULT_PROFILE.to_owned()
            } else {
                default_profile.to_owned()
            },
        })
    }

    /// The header read (lower-cased).
    pub fn header(&self) -> &str {
        &self.header
    }

    /// The profile run when the header is missing or blank.
    pub fn default_profile(&self) -> &str {
        &self.default_profile
    }

    /// The name of the profile `request` asks for: the header's trimmed value, or the default.
    pub fn wanted<'r>(&'r self, request: &'r InferenceRequest) -> &'r str {
        match request.header(&self.header).map(str::trim) {
            Some(value) if !value.is_empty() => value,
            _ => &self.default_profile,
        }
    }
}

impl ProfileHandler for HeaderProfileHandler {
    fn next_profiles(
        &self,
        _state: &mut CycleState,
        request: &InferenceRequest,
        profile_names: &[Arc<str>],
        progress: &ProfileProgress<'_>,
        next: &mut Vec<usize>,
    ) {
        if !progress.runs.is_empty() || !progress.failed.is_empty() {
            return;
        }
        if profile_names.len() == 1 {
            next.push(0);
            return;
        }
        let wanted = self.wanted(request);
        if let Some(at) = profile_names.iter().position(|name| **name == *wanted) {
            next.push(at);
        }
    }

    fn primary_profile(&self, _request: &InferenceRequest, runs: &[ProfileRun]) -> Option<usize> {
        (runs.len() == 1).then_some(0)
    }
}
