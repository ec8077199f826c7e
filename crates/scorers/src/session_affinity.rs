//! `session-affinity-scorer` and `session-affinity-filter`: send a session's requests to the
//! endpoint that served its first one.
//!
//! Matches llm-d-router's `scorer/sessionaffinity` and `filter/sessionaffinity` with their
//! default strategy, `encoded_endpoint_header`: the client echoes back, in request header
//! `x-session-token` (or `encodedEndpointHeaderConfig.header`), the base64 (standard alphabet,
//! padded) of the endpoint that served it. The scorer gives that endpoint 1 and every other
//! 0 (a soft preference); the filter narrows the candidates to that endpoint alone when it is
//! among them, and otherwise leaves them unchanged (a hard pin that never empties the set).
//! A missing, oversized or undecodable token expresses no preference.
//!
//! Go identifies an endpoint by `namespace/name`; epp-rs endpoints carry a name only, so a
//! decoded token matches an endpoint whose name equals it, or equals its part after the last
//! `/`. Both plugins write the token on the response ([`ResponseHeaders`]; once when both
//! are used): the header ([`SessionAffinityParameters::header`]) set to [`session_token`] of
//! the endpoint chosen by profile `profileName` (the primary profile when empty), as Go's
//! `ResponseHeader` hook does; the ext-proc and tower adapters set it on the response.
//!
//! Go's stateful `session_id` strategy (a server-side, TTL-evicted session binding) is not
//! implemented: configuring it is refused rather than silently degraded.

use scheduler_core::{Candidates, CycleState, Filter, InferenceRequest, PluginError, PoolSnapshot};
use scheduler_core::{ResponseHeaders, SchedulingResult, Scorer};
use serde::Deserialize;

/// llm-d type name of the scorer.
pub const SCORER_TYPE_NAME: &str = "session-affinity-scorer";
/// llm-d type name of the filter.
pub const FILTER_TYPE_NAME: &str = "session-affinity-filter";
/// The header carrying the token when none is configured (Go `DefaultHeader`).
pub const DEFAULT_HEADER: &str = "x-session-token";
/// The longest token decoded, in characters. A client controls the header: a longer value is
/// ignored rather than decoded, and decoding needs no allocation. 512 base64 characters hold
/// 384 bytes, more than a Kubernetes `namespace/name` (63 + 1 + 253).
pub const MAX_TOKEN_LEN: usize = 512;

const ENCODED_ENDPOINT_HEADER: &str = "encoded_endpoint_header";
const SESSION_ID: &str = "session_id";

/// Parameters shared by the scorer and the filter (Go `parameters`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SessionAffinityParameters {
    /// `encoded_endpoint_header` (default) or `session_id` (refused: not implemented).
    #[serde(default)]
    pub strategy: Option<String>,
    /// Settings of the `encoded_endpoint_header` strategy.
    #[serde(default)]
    pub encoded_endpoint_header_config: EncodedEndpointHeaderConfig,
    /// Settings of the `session_id` strategy (accepted so that Go configs parse).
    #[serde(default)]
    pub session_id_config: Option<serde::de::IgnoredAny>,
    /// The profile whose endpoint the response token names; empty means the primary one.
    #[serde(default)]
    pub profile_name: String,
}

/// `encodedEndpointHeaderConfig`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EncodedEndpointHeaderConfig {
    /// The request and response header carrying the token (default `x-session-token`).
    #[serde(default)]
    pub header: String,
}

impl SessionAffinityParameters {
    /// The header name, trimmed and lowercased as Go's `NormalizeHeader` does.
    pub fn header(&self) -> String {
        let header = self.encoded_endpoint_header_config.header.trim().to_ascii_lowercase();
        if header.is_empty() { DEFAULT_HEADER.to_owned() } else { header }
    }

    fn validate(&self) -> Result<(), PluginError> {
        match self.strategy.as_deref().unwrap_or(ENCODED_ENDPOINT_HEADER) {
            ENCODED_ENDPOINT_HEADER => Ok(()),
            SESSION_ID => Err(PluginError::InvalidParameters(
                "strategy: 'session_id' is not supported by this endpoint picker; \
                 use 'encoded_endpoint_header'"
                    .into(),
            )),
            other => Err(PluginError::InvalidParameters(format!(
                "strategy: must be '{ENCODED_ENDPOINT_HEADER}' or '{SESSION_ID}', got '{other}'"
            ))),
        }
    }
}

/// The token naming an endpoint: the base64 of its name, for the response header.
pub fn session_token(endpoint_name: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut token = String::with_capacity(endpoint_name.len().div_ceil(3) * 4);
    for chunk in endpoint_name.as_bytes().chunks(3) {
        let bytes = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let group = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]);
        for position in 0..4 {
            if position <= chunk.len() {
                token.push(ALPHABET[(group >> (18 - 6 * position) & 63) as usize] as char);
            } else {
                token.push('=');
            }
        }
    }
    token
}

/// The endpoint name `token` designates, decoded into `buffer`; `None` unless it is valid
/// padded standard base64 of UTF-8, at most [`MAX_TOKEN_LEN`] characters.
fn decode_token<'b>(token: &str, buffer: &'b mut [u8; MAX_TOKEN_LEN / 4 * 3]) -> Option<&'b str> {
    let token = token.as_bytes();
    if token.is_empty() || token.len() > MAX_TOKEN_LEN || !token.len().is_multiple_of(4) {
        return None;
    }
    let value = |byte: u8| match byte {
        b'A'..=b'Z' => Some(byte - b'A'),
        b'a'..=b'z' => Some(byte - b'a' + 26),
        b'0'..=b'9' => Some(byte - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let groups = token.len() / 4;
    let mut length = 0;
    for (index, group) in token.chunks_exact(4).enumerate() {
        // Padding is only allowed at the very end, as in Go's StdEncoding.
        let padding = if index + 1 == groups {
            group.iter().rev().take_while(|&&b| b == b'=').count()
        } else {
            0
        };
        if padding > 2 {
            return None;
        }
        let mut bits = 0u32;
        for &byte in &group[..4 - padding] {
            bits = bits << 6 | u32::from(value(byte)?);
        }
        bits <<= 6 * padding as u32;
        let [_, a, b, c] = bits.to_be_bytes();
        for byte in [a, b, c].into_iter().take(3 - padding) {
            buffer[length] = byte;
            length += 1;
        }
    }
    std::str::from_utf8(&buffer[..length]).ok()
}

/// Whether the decoded token `wanted` names the endpoint called `name`.
fn names(wanted: &str, name: &str) -> bool {
    wanted == name || wanted.rsplit_once('/').is_some_and(|(_, pod)| pod == name)
}

/// What both plugins share: where the token is read, and whose endpoint it names on the
/// response.
#[derive(Clone, Debug)]
struct SessionToken {
    header: String,
    profile_name: String,
}

impl SessionToken {
    fn new(parameters: &SessionAffinityParameters) -> Result<Self, PluginError> {
        parameters.validate()?;
        Ok(Self { header: parameters.header(), profile_name: parameters.profile_name.clone() })
    }

    /// The token of the endpoint chosen, for the response; once, when both plugins are used.
    fn write(&self, result: &SchedulingResult, headers: &mut Vec<(String, String)>) {
        if headers.iter().any(|(name, _)| *name == self.header) {
            return;
        }
        let chosen = endpoint_to_write(result, &self.profile_name).filter(|name| !name.is_empty());
        if let Some(name) = chosen {
            headers.push((self.header.clone(), session_token(name)));
        }
    }

    /// Calls `found` with the endpoint name the request's token designates, if any.
    fn with_wanted<R>(
        &self,
        request: &InferenceRequest,
        found: impl FnOnce(&str) -> R,
    ) -> Option<R> {
        let mut buffer = [0u8; MAX_TOKEN_LEN / 4 * 3];
        request.header(&self.header).and_then(|token| decode_token(token, &mut buffer)).map(found)
    }
}

/// Scores 1 for the endpoint named by the session token, 0 for the others.
#[derive(Clone, Debug)]
pub struct SessionAffinityScorer {
    token: SessionToken,
}

impl SessionAffinityScorer {
    /// A scorer for `parameters`; refuses the `session_id` strategy and unknown strategies.
    pub fn new(parameters: SessionAffinityParameters) -> Result<Self, PluginError> {
        Ok(Self { token: SessionToken::new(&parameters)? })
    }
}

impl ResponseHeaders for SessionAffinityScorer {
    fn response_headers(&self, result: &SchedulingResult, headers: &mut Vec<(String, String)>) {
        self.token.write(result, headers);
    }
}

impl Scorer for SessionAffinityScorer {
    fn score(
        &self,
        _state: &mut CycleState,
        request: &InferenceRequest,
        candidates: Candidates<'_>,
        scores: &mut [f64],
    ) {
        self.token.with_wanted(request, |wanted| {
            for (score, state) in scores.iter_mut().zip(candidates.iter()) {
                if names(wanted, &state.endpoint.name) {
                    *score = 1.0;
                }
            }
        });
    }
}

/// Narrows the candidates to the endpoint named by the session token when it is one of them.
#[derive(Clone, Debug)]
pub struct SessionAffinityFilter {
    token: SessionToken,
}

impl SessionAffinityFilter {
    /// A filter for `parameters`; refuses the `session_id` strategy and unknown strategies.
    pub fn new(parameters: SessionAffinityParameters) -> Result<Self, PluginError> {
        Ok(Self { token: SessionToken::new(&parameters)? })
    }
}

impl ResponseHeaders for SessionAffinityFilter {
    fn response_headers(&self, result: &SchedulingResult, headers: &mut Vec<(String, String)>) {
        self.token.write(result, headers);
    }
}

impl Filter for SessionAffinityFilter {
    fn filter(
        &self,
        _state: &mut CycleState,
        request: &InferenceRequest,
        pool: &PoolSnapshot,
        candidates: &mut Vec<u32>,
    ) {
        let session = self.token.with_wanted(request, |wanted| {
            candidates.iter().copied().find(|&index| {
                pool.get(index).is_some_and(|state| names(wanted, &state.endpoint.name))
            })
        });
        if let Some(Some(index)) = session {
            candidates.clear();
            candidates.push(index);
        }
    }
}

/// The name of the endpoint that profile `profile_name` (the primary profile when empty)
/// chose in `result`: what the adapter encodes with [`session_token`] into the response.
pub fn endpoint_to_write<'r>(result: &'r SchedulingResult, profile_name: &str) -> Option<&'r str> {
    if profile_name.is_empty() {
        return Some(&result.primary().endpoint.name);
    }
    let run = result.profile_runs().iter().find(|run| &*run.profile == profile_name)?;
    let state = result.pool().get(*run.picks.first()?)?;
    Some(&state.endpoint.name)
}
