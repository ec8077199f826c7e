//! `session-affinity-scorer` and `session-affinity-filter`: send a session's requests to the
//! endpoint that served its first one.
//!
//! Matches llm-d-router's `scorer/sessionaffinity` and `filter/sessionaffinity` with both of
//! their strategies. The scorer gives the session's endpoint 1 and every other 0 (a soft
//! preference); the filter narrows the candidates to that endpoint alone when it is among
//! them, and otherwise leaves them unchanged (a hard pin that never empties the set).
//!
//! `encoded_endpoint_header` (the default): the client echoes back, in request header
//! `x-session-token` (or `encodedEndpointHeaderConfig.header`), the base64 (standard alphabet,
//! padded) of the endpoint that served it. A missing, oversized or undecodable token
//! expresses no preference. Go identifies an endpoint by `namespace/name`; epp-rs endpoints
//! carry a name only, so a decoded token matches an endpoint whose name equals it, or equals
//! its part after the last `/`. Both plugins write the token on the response
//! ([`ResponseHeaders`]; once when both are used): the header
//! ([`SessionAffinityParameters::header`]) set to [`session_token`] of the endpoint chosen by
//! profile `profileName` (the primary profile when empty), as Go's `ResponseHeader` hook does.
//!
//! `session_id`: the client sends an opaque session id and the plugin keeps, server side, the
//! endpoint each session is bound to ([`SessionBindings`]). The id is the first non-blank
//! value among `sessionIdConfig.sources`, in order: a request header (`header`), or a value a
//! data producer published for the decision (`attribute`, with `producer` naming the plugin
//! that published it, e.g. `{attribute: SessionIDDataKey, producer: session-id-producer}` for
//! [`crate::session_id`]); without sources, header `x-session-id`. A session with no binding,
//! or bound to an endpoint that is not a candidate, expresses no preference. After the
//! decision, the pre-request hook binds an unbound session to the endpoint picked (by profile
//! `profileName`, else the primary one), refreshes the binding when that is its endpoint, and
//! moves it only when this decision saw its endpoint missing from the candidates (so a picker
//! choosing another endpoint among several never breaks the pin). Bindings unused for
//! `evictionTtlSeconds` (default 300) are forgotten; expired ones are swept when a binding is
//! written, at most every `evictionSweepSeconds` (default 10). Go sweeps on a timer and
//! honours an expired binding until its sweep; here an expired binding is ignored at once.
//! Nothing is written on the response: the client owns its session id.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use scheduler_core::{Candidates, CycleState, Filter, InferenceRequest, PluginError, PoolSnapshot};
use scheduler_core::{EndpointId, PreRequest, ResponseHeaders, SchedulingResult, Scorer};
use serde::Deserialize;

use crate::session_id::data_key;

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
    /// `encoded_endpoint_header` (default) or `session_id`.
    #[serde(default)]
    pub strategy: Option<String>,
    /// Settings of the `encoded_endpoint_header` strategy.
    #[serde(default)]
    pub encoded_endpoint_header_config: EncodedEndpointHeaderConfig,
    /// Settings of the `session_id` strategy.
    #[serde(default)]
    pub session_id_config: SessionIdConfig,
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

/// The header the `session_id` strategy reads when no source is configured.
pub const DEFAULT_SESSION_ID_HEADER: &str = "x-session-id";
/// How long an unused binding lasts when `evictionTtlSeconds` is unset.
pub const DEFAULT_EVICTION_TTL_SECONDS: f64 = 300.0;
/// How often expired bindings are swept when `evictionSweepSeconds` is unset.
pub const DEFAULT_EVICTION_SWEEP_SECONDS: f64 = 10.0;

/// `sessionIdConfig`: where the session id comes from and how long bindings last.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct SessionIdConfig {
    /// Where the id is read, in order; the first non-blank value wins. Empty: header
    /// `x-session-id`.
    pub sources: Vec<SessionIdSource>,
    /// Seconds an unused binding lasts; 0 or unset: 300. Must not be negative.
    pub eviction_ttl_seconds: f64,
    /// Seconds between sweeps of expired bindings; 0 or unset: 10. Must not be negative.
    pub eviction_sweep_seconds: f64,
}

/// One place the session id is read from: exactly one of `header` and `attribute`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct SessionIdSource {
    /// A request header.
    pub header: String,
    /// The data type of a value a producer published for the decision.
    pub attribute: String,
    /// The plugin that published `attribute` (empty: a key without producer).
    pub producer: String,
}

impl SessionIdConfig {
    /// The sources (lower-cased headers and attribute keys) and the TTL and sweep interval,
    /// defaults applied; refuses a source with both or neither field and a negative or
    /// non-finite duration.
    fn resolve(&self) -> Result<(Vec<Source>, Duration, Duration), PluginError> {
        let invalid = |message: String| Err(PluginError::InvalidParameters(message));
        let mut sources = Vec::with_capacity(self.sources.len().max(1));
        for (index, source) in self.sources.iter().enumerate() {
            match (source.header.is_empty(), source.attribute.is_empty()) {
                (false, true) => {
                    let header = source.header.trim().to_ascii_lowercase();
                    // Go's header normalisation: a blank name reads the default token header.
                    let header = if header.is_empty() { DEFAULT_HEADER.to_owned() } else { header };
                    sources.push(Source::Header(header));
                }
                (true, false) => {
                    let producer = source.producer.as_str();
                    sources.push(Source::Attribute(data_key(&source.attribute, producer)));
                }
                _ => {
                    return invalid(format!(
                        "sessionIdConfig.sources[{index}]: exactly one of header or attribute must be set"
                    ));
                }
            }
        }
        if sources.is_empty() {
            sources.push(Source::Header(DEFAULT_SESSION_ID_HEADER.to_owned()));
        }
        let seconds = |value: f64, default: f64, field: &str| {
            let value = if value == 0.0 { default } else { value };
            if value.is_finite() && value > 0.0 {
                Ok(Duration::from_secs_f64(value))
            } else {
                Err(PluginError::InvalidParameters(format!(
                    "sessionIdConfig.{field} must be > 0, got {value}"
                )))
            }
        };
        let ttl =
            seconds(self.eviction_ttl_seconds, DEFAULT_EVICTION_TTL_SECONDS, "evictionTtlSeconds")?;
        let sweep = seconds(
            self.eviction_sweep_seconds,
            DEFAULT_EVICTION_SWEEP_SECONDS,
            "evictionSweepSeconds",
        )?;
        Ok((sources, ttl, sweep))
    }
}

/// A resolved place to read the session id from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Source {
    /// A request header (lower-cased).
    Header(String),
    /// A request attribute key (`<data type>/<producer>`).
    Attribute(String),
}

impl SessionAffinityParameters {
    /// The header name, trimmed and lowercased as Go's `NormalizeHeader` does.
    pub fn header(&self) -> String {
        let header = self.encoded_endpoint_header_config.header.trim().to_ascii_lowercase();
        if header.is_empty() { DEFAULT_HEADER.to_owned() } else { header }
    }

    fn strategy(&self) -> Result<Strategy, PluginError> {
        match self.strategy.as_deref().unwrap_or(ENCODED_ENDPOINT_HEADER) {
            ENCODED_ENDPOINT_HEADER => Ok(Strategy::Token(SessionToken {
                header: self.header(),
                profile_name: self.profile_name.clone(),
            })),
            SESSION_ID => {
                let (sources, ttl, sweep) = self.session_id_config.resolve()?;
                Ok(Strategy::Bindings(Arc::new(SessionBindings::new(
                    sources,
                    self.profile_name.clone(),
                    ttl,
                    sweep,
                ))))
            }
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

/// How a plugin finds the session's endpoint.
#[derive(Clone, Debug)]
enum Strategy {
    /// `encoded_endpoint_header`: the client sends the endpoint back.
    Token(SessionToken),
    /// `session_id`: the client sends a session id, the endpoint is kept here.
    Bindings(Arc<SessionBindings>),
}

impl Strategy {
    /// The position among `candidates` of the session's endpoint, if any.
    fn choose(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        candidates: Candidates<'_>,
    ) -> Option<usize> {
        match self {
            Strategy::Token(token) => token
                .with_wanted(request, |wanted| {
                    candidates.iter().position(|state| names(wanted, &state.endpoint.name))
                })
                .flatten(),
            Strategy::Bindings(bindings) => bindings.choose(state, request, candidates),
        }
    }

    fn write(&self, result: &SchedulingResult, headers: &mut Vec<(String, String)>) {
        if let Strategy::Token(token) = self {
            token.write(result, headers);
        }
    }

    fn pre_request(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        result: &SchedulingResult,
    ) {
        if let Strategy::Bindings(bindings) = self {
            bindings.bind(state, request, result);
        }
    }
}

/// Scores 1 for the session's endpoint, 0 for the others.
#[derive(Clone, Debug)]
pub struct SessionAffinityScorer {
    strategy: Strategy,
}

impl SessionAffinityScorer {
    /// A scorer for `parameters`; refuses unknown strategies and invalid `sessionIdConfig`.
    pub fn new(parameters: SessionAffinityParameters) -> Result<Self, PluginError> {
        Ok(Self { strategy: parameters.strategy()? })
    }
}

impl ResponseHeaders for SessionAffinityScorer {
    fn response_headers(&self, result: &SchedulingResult, headers: &mut Vec<(String, String)>) {
        self.strategy.write(result, headers);
    }
}

impl PreRequest for SessionAffinityScorer {
    fn pre_request(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        result: &SchedulingResult,
    ) {
        self.strategy.pre_request(state, request, result);
    }
}

impl Scorer for SessionAffinityScorer {
    fn score(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        candidates: Candidates<'_>,
        scores: &mut [f64],
    ) {
        if let Some(score) =
            self.strategy.choose(state, request, candidates).and_then(|at| scores.get_mut(at))
        {
            *score = 1.0;
        }
    }
}

/// Narrows the candidates to the session's endpoint when it is one of them.
#[derive(Clone, Debug)]
pub struct SessionAffinityFilter {
    strategy: Strategy,
}

impl SessionAffinityFilter {
    /// A filter for `parameters`; refuses unknown strategies and invalid `sessionIdConfig`.
    pub fn new(parameters: SessionAffinityParameters) -> Result<Self, PluginError> {
        Ok(Self { strategy: parameters.strategy()? })
    }
}

impl ResponseHeaders for SessionAffinityFilter {
    fn response_headers(&self, result: &SchedulingResult, headers: &mut Vec<(String, String)>) {
        self.strategy.write(result, headers);
    }
}

impl PreRequest for SessionAffinityFilter {
    fn pre_request(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        result: &SchedulingResult,
    ) {
        self.strategy.pre_request(state, request, result);
    }
}

impl Filter for SessionAffinityFilter {
    fn filter(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        pool: &PoolSnapshot,
        candidates: &mut Vec<u32>,
    ) {
        let chosen = self.strategy.choose(state, request, Candidates::new(pool, candidates));
        if let Some(index) = chosen.map(|at| candidates[at]) {
            candidates.clear();
            candidates.push(index);
        }
    }
}

/// The `session_id` strategy's store: the endpoint each session is bound to and when the
/// binding was last used. Bounded by the TTL: expired bindings are swept as bindings are
/// written, so it holds at most the sessions seen within a TTL and a sweep interval.
#[derive(Debug)]
pub struct SessionBindings {
    sources: Vec<Source>,
    profile_name: String,
    ttl: Duration,
    sweep_every: Duration,
    store: RwLock<Store>,
}

#[derive(Debug, Default)]
struct Store {
    bindings: HashMap<String, Binding>,
    last_sweep: Option<Instant>,
}

#[derive(Clone, Copy, Debug)]
struct Binding {
    endpoint: EndpointId,
    last_seen: Instant,
}

/// What each `session_id` plugin saw of its session's endpoint in the current decision:
/// whether the bound endpoint was among the candidates. Keyed by the plugin's store.
#[derive(Debug, Default)]
struct Presence {
    seen: Vec<(usize, u64, bool)>,
}

impl SessionBindings {
    fn new(
        sources: Vec<Source>,
        profile_name: String,
        ttl: Duration,
        sweep_every: Duration,
    ) -> Self {
        Self { sources, profile_name, ttl, sweep_every, store: RwLock::default() }
    }

    fn key(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    /// The session id of `request`: the first non-blank value among the sources.
    fn session_id(&self, state: &mut CycleState, request: &InferenceRequest) -> Option<String> {
        self.sources.iter().find_map(|source| {
            let value = match source {
                Source::Header(name) => request.header(name),
                Source::Attribute(key) => state.request_attribute(key),
            };
            value.map(str::trim).filter(|value| !value.is_empty()).map(str::to_owned)
        })
    }

    /// The endpoint `session` is bound to at `now`, unless the binding expired.
    pub fn bound(&self, session: &str, now: Instant) -> Option<EndpointId> {
        let store = self.store.read();
        let binding = store.bindings.get(session)?;
        (now.saturating_duration_since(binding.last_seen) <= self.ttl).then_some(binding.endpoint)
    }

    /// How many bindings are stored (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.store.read().bindings.len()
    }

    /// Whether no binding is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn choose(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        candidates: Candidates<'_>,
    ) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        let session = self.session_id(state, request)?;
        let bound = self.bound(&session, state.now())?;
        let position = candidates.iter().position(|state| state.id() == bound);
        let (key, stamp) = (self.key(), state.decision_stamp());
        let presence = state.scratch::<Presence>();
        presence.seen.retain(|&(_, seen_in, _)| seen_in == stamp);
        presence.seen.retain(|&(owner, _, _)| owner != key);
        presence.seen.push((key, stamp, position.is_some()));
        position
    }

    /// Whether this decision saw the session's endpoint among the candidates; `None` when it
    /// did not look (the session was unbound when it did).
    fn seen(&self, state: &mut CycleState) -> Option<bool> {
        let (key, stamp) = (self.key(), state.decision_stamp());
        state
            .scratch::<Presence>()
            .seen
            .iter()
            .find(|&&(owner, seen_in, _)| owner == key && seen_in == stamp)
            .map(|&(_, _, present)| present)
    }

    fn bind(&self, state: &mut CycleState, request: &InferenceRequest, result: &SchedulingResult) {
        let Some(session) = self.session_id(state, request) else { return };
        let picked = if self.profile_name.is_empty() {
            Some(result.primary().id())
        } else {
            result
                .profile_runs()
                .iter()
                .find(|run| &*run.profile == self.profile_name.as_str())
                .and_then(|run| run.picks.first())
                .and_then(|&at| result.pool().get(at))
                .map(|state| state.id())
        };
        let Some(endpoint) = picked else { return };
        let now = state.now();
        let seen = self.seen(state);
        let mut store = self.store.write();
        if store
            .last_sweep
            .is_none_or(|last| now.saturating_duration_since(last) >= self.sweep_every)
        {
            let ttl = self.ttl;
            store
                .bindings
                .retain(|_, binding| now.saturating_duration_since(binding.last_seen) <= ttl);
            store.last_sweep = Some(now);
        }
        let fresh = Binding { endpoint, last_seen: now };
        match store.bindings.get_mut(&session) {
            None => {
                store.bindings.insert(session, fresh);
            }
            Some(existing) if now.saturating_duration_since(existing.last_seen) > self.ttl => {
                *existing = fresh;
            }
            Some(existing) if existing.endpoint == endpoint => existing.last_seen = now,
            // Moved only when this decision saw the bound endpoint missing; a decision that
            // did not look (it found the session unbound, and another request bound it since)
            // leaves the first binding in place.
            Some(existing) if seen == Some(false) => *existing = fresh,
            Some(_) => {}
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
