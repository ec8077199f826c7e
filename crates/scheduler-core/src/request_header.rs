//! Request-header processors: plugins that read a request's headers once it is parsed and
//! before flow control admits it, as llm-d-router's `RequestHeaderProcessor` extension
//! point. Every plugin playing the [`RequestHeaderProcessor`] role runs, in declaration order.
//!
//! `agent-identity` ([`AgentIdentity`]) gives every turn of a coding agent's session the same
//! flow-control fairness id: the first non-empty session header the agent sends becomes the
//! request's fairness id, unless the request names one explicitly
//! (`x-llm-d-inference-fairness-id`, which always wins).

use std::fmt::Debug;

use serde::Deserialize;

use crate::config::registry::PluginError;
use crate::request::InferenceRequest;

/// Type name of [`AgentIdentity`].
pub const AGENT_IDENTITY_TYPE: &str = "agent-identity";

/// The session headers of the agents llm-d knows, in the order they are looked up: Claude
/// Code, OpenCode, Codex, and Codex's older underscored name.
pub const AGENT_SESSION_HEADERS: [&str; 4] =
    ["x-claude-code-session-id", "x-session-affinity", "session-id", "session_id"];

/// Longest fairness id taken from a session header, in bytes. Flow control keeps a queue per
/// fairness id, so an id a client controls is bounded; a longer one is cut (at a character
/// boundary), which keeps one session's turns together.
pub const MAX_AGENT_IDENTITY_BYTES: usize = 256;

/// Runs on each parsed request before admission.
pub trait RequestHeaderProcessor: Send + Sync + Debug {
    /// Reads `request`'s headers and updates what they decide.
    fn process(&self, request: &mut InferenceRequest);
}

/// Parameters of `agent-identity`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentIdentityParameters {
    /// Further session headers, looked up (in order) before the built-in ones.
    pub additional_session_headers: Vec<String>,
}

/// `agent-identity`: a coding agent's session header as the request's fairness id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentIdentity {
    /// Lower-cased header names, in lookup order.
    headers: Vec<String>,
}

impl AgentIdentity {
    /// The plugin with `parameters`; an empty header name is refused.
    pub fn new(parameters: &AgentIdentityParameters) -> Result<Self, PluginError> {
        let mut headers = Vec::new();
        for (index, name) in parameters.additional_session_headers.iter().enumerate() {
            let name = name.trim();
            if name.is_empty() {
                return Err(PluginError::InvalidParameters(format!(
                    "additionalSessionHeaders[{index}]: a header name must not be empty"
                )));
            }
            headers.push(name.to_ascii_lowercase());
        }
        headers.extend(AGENT_SESSION_HEADERS.iter().map(|name| (*name).to_owned()));
        Ok(Self { headers })
    }

    /// The header names looked up, in order.
    pub fn headers(&self) -> &[String] {
        &self.headers
    }
}

impl RequestHeaderProcessor for AgentIdentity {
    fn process(&self, request: &mut InferenceRequest) {
        if request.fairness_id.is_some() {
            return;
        }
        let found = self
            .headers
            .iter()
            .find_map(|name| request.headers.get(name).filter(|value| !value.is_empty()));
        if let Some(identity) = found {
            let mut end = identity.len().min(MAX_AGENT_IDENTITY_BYTES);
            while !identity.is_char_boundary(end) {
                end -= 1;
            }
            request.fairness_id = Some(identity[..end].to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(extra: &[&str]) -> AgentIdentity {
        let parameters = AgentIdentityParameters {
            additional_session_headers: extra.iter().map(|name| (*name).to_owned()).collect(),
        };
        AgentIdentity::new(&parameters).unwrap()
    }

    fn processed(plugin: &AgentIdentity, request: InferenceRequest) -> Option<String> {
        let mut request = request;
        plugin.process(&mut request);
        request.fairness_id
    }

    #[test]
    fn the_first_session_header_becomes_the_fairness_id() {
        let plugin = identity(&[]);
        let request = InferenceRequest::new("m", "p")
            .with_header("session_id", "codex-old")
            .with_header("x-session-affinity", "opencode-1");
        assert_eq!(processed(&plugin, request).as_deref(), Some("opencode-1"));
        let claude = InferenceRequest::new("m", "p")
            .with_header("X-Claude-Code-Session-Id", "claude-7")
            .with_header("session-id", "codex-2");
        assert_eq!(processed(&plugin, claude).as_deref(), Some("claude-7"));
        let empty_then_next = InferenceRequest::new("m", "p")
            .with_header("x-claude-code-session-id", "")
            .with_header("session-id", "codex-2");
        assert_eq!(processed(&plugin, empty_then_next).as_deref(), Some("codex-2"));
        assert_eq!(processed(&plugin, InferenceRequest::new("m", "p")), None);
    }

    #[test]
    fn an_explicit_fairness_id_wins_and_additional_headers_come_first() {
        let plugin = identity(&["X-My-Agent-Session"]);
        assert_eq!(plugin.headers()[0], "x-my-agent-session");
        let mut explicit = InferenceRequest::new("m", "p").with_header("session-id", "codex");
        explicit.fairness_id = Some("tenant-a".into());
        assert_eq!(processed(&plugin, explicit).as_deref(), Some("tenant-a"));
        let both = InferenceRequest::new("m", "p")
            .with_header("x-claude-code-session-id", "claude")
            .with_header("x-my-agent-session", "mine");
        assert_eq!(processed(&plugin, both).as_deref(), Some("mine"));
    }

    #[test]
    fn long_identities_are_cut_at_a_character_boundary() {
        let plugin = identity(&[]);
        let long = "é".repeat(MAX_AGENT_IDENTITY_BYTES);
        let request = InferenceRequest::new("m", "p").with_header("session-id", long);
        let cut = processed(&plugin, request).unwrap();
        assert!(cut.len() <= MAX_AGENT_IDENTITY_BYTES && cut.len() >= MAX_AGENT_IDENTITY_BYTES - 1);
        assert!(cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn an_empty_additional_header_is_refused_by_name() {
        let parameters =
            AgentIdentityParameters { additional_session_headers: vec!["x-a".into(), " ".into()] };
        let error = AgentIdentity::new(&parameters).unwrap_err().to_string();
        assert!(error.contains("additionalSessionHeaders[1]"), "{error}");
    }
}
