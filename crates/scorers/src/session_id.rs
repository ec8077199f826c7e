//! `session-id-producer`: publishes each request's session identifier for the decision's
//! affinity plugins.
//!
//! Matches llm-d-router's `dataproducer/sessionid`. Exactly one of two sources is configured:
//! `headerName` (a request header, read case-insensitively) or `cookieName` (one cookie of
//! the `Cookie` header: the header split on `;`, each pair trimmed and cut at its first `=`,
//! the first pair whose name equals `cookieName` exactly). The value, trimmed, is published
//! under the data key `SessionIDDataKey/<plugin name>` ([`data_key`]); an absent or blank
//! value publishes nothing, which readers take as "no session preference".
//!
//! The reader in this crate is the `session_id` strategy of `session-affinity-scorer` and
//! `session-affinity-filter`, whose `sessionIdConfig.sources` name it as
//! `{attribute: SessionIDDataKey, producer: <plugin name>}` ([`crate::session_affinity`]).

use scheduler_core::{CycleState, DataProducer, InferenceRequest, PluginError, PoolSnapshot};
use serde::Deserialize;

/// llm-d type name (also the name a default instance takes).
pub const TYPE_NAME: &str = "session-id-producer";
/// The data type of the published value (llm-d's `SessionIDDataKey`).
pub const DATA_TYPE: &str = "SessionIDDataKey";
/// The standard request header carrying cookies (request header names are lower-cased).
pub const COOKIE_HEADER: &str = "cookie";

/// The key a value of data type `data_type` published by the plugin named `producer` is
/// stored under in the decision's request attributes (llm-d's `DataKey` string).
pub fn data_key(data_type: &str, producer: &str) -> String {
    format!("{data_type}/{producer}")
}

/// Parameters of [`SessionIdProducer`]; exactly one must be set.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct SessionIdParameters {
    /// The request header whose value is the session id.
    pub header_name: String,
    /// The cookie (in the `Cookie` header) whose value is the session id.
    pub cookie_name: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Source {
    Header(String),
    Cookie(String),
}

/// Reads the session id from a header or a cookie and publishes it for the decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionIdProducer {
    source: Source,
    key: String,
}

impl SessionIdProducer {
    /// The producer named `name` (its data key's producer part) for `parameters`; refuses
    /// both or neither source.
    pub fn new(name: &str, parameters: &SessionIdParameters) -> Result<Self, PluginError> {
        let header = parameters.header_name.trim().to_ascii_lowercase();
        let cookie = parameters.cookie_name.trim();
        let source = match (header.is_empty(), cookie.is_empty()) {
            (false, true) => Source::Header(header),
            (true, false) => Source::Cookie(cookie.to_owned()),
            (true, true) => {
                return Err(PluginError::InvalidParameters(
                    "exactly one of 'headerName' or 'cookieName' must be set".into(),
                ));
            }
            (false, false) => {
                return Err(PluginError::InvalidParameters(
                    "exactly one of 'headerName' or 'cookieName' must be set, not both".into(),
                ));
            }
        };
        Ok(Self { source, key: data_key(DATA_TYPE, name) })
    }

    /// The key the session id is published under.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The session id `request` carries, trimmed; `None` when absent or blank.
    pub fn session_id<'r>(&self, request: &'r InferenceRequest) -> Option<&'r str> {
        let value = match &self.source {
            Source::Header(name) => request.header(name)?,
            Source::Cookie(name) => cookie_value(request.header(COOKIE_HEADER)?, name)?,
        };
        Some(value.trim()).filter(|value| !value.is_empty())
    }
}

/// The value of cookie `name` in a `Cookie` header: the first `name=value` pair (pairs split
/// on `;` and trimmed) whose name is exactly `name`.
pub fn cookie_value<'h>(header: &'h str, name: &str) -> Option<&'h str> {
    if name.is_empty() {
        return None;
    }
    header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find_map(|(key, value)| (key == name).then_some(value))
}

impl DataProducer for SessionIdProducer {
    fn produce(&self, state: &mut CycleState, request: &InferenceRequest, _pool: &PoolSnapshot) {
        if let Some(id) = self.session_id(request) {
            state.put_request_attribute(&self.key, id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn producer(header: &str, cookie: &str) -> Result<SessionIdProducer, PluginError> {
        let parameters =
            SessionIdParameters { header_name: header.into(), cookie_name: cookie.into() };
        SessionIdProducer::new(TYPE_NAME, &parameters)
    }

    #[test]
    fn exactly_one_source() {
        assert!(producer("", "").unwrap_err().to_string().contains("exactly one"));
        assert!(producer("  ", " ").is_err(), "blank counts as unset");
        assert!(producer("x-session-id", "s").unwrap_err().to_string().contains("not both"));
        assert_eq!(
            producer(" X-Session-ID ", "").unwrap().source,
            Source::Header("x-session-id".into())
        );
        assert_eq!(
            producer("", " llm-d-session ").unwrap().source,
            Source::Cookie("llm-d-session".into())
        );
        assert_eq!(producer("h", "").unwrap().key(), "SessionIDDataKey/session-id-producer");
    }

    #[test]
    fn header_values_are_trimmed_and_blank_is_absent() {
        let producer = producer("X-Session-Id", "").unwrap();
        let request = InferenceRequest::new("m", "p").with_header("x-session-id", "  abc ");
        assert_eq!(producer.session_id(&request), Some("abc"));
        let blank = InferenceRequest::new("m", "p").with_header("x-session-id", "   ");
        assert_eq!(producer.session_id(&blank), None);
        assert_eq!(producer.session_id(&InferenceRequest::new("m", "p")), None);
    }

    #[test]
    fn cookies_are_matched_by_exact_name() {
        assert_eq!(cookie_value("a=1; llm-d-session=s42; b=2", "llm-d-session"), Some("s42"));
        assert_eq!(cookie_value("a=1;llm-d-session=x=y", "llm-d-session"), Some("x=y"));
        assert_eq!(cookie_value("LLM-D-SESSION=s", "llm-d-session"), None, "names are exact");
        assert_eq!(cookie_value("flag; s=1; s=2", "s"), Some("1"), "the first wins");
        assert_eq!(cookie_value("s=1", ""), None);
        let producer = producer("", "llm-d-session").unwrap();
        let request =
            InferenceRequest::new("m", "p").with_header("Cookie", "theme=dark; llm-d-session= s7 ");
        assert_eq!(producer.session_id(&request), Some("s7"));
        let empty = InferenceRequest::new("m", "p").with_header("cookie", "llm-d-session=");
        assert_eq!(producer.session_id(&empty), None);
    }
}
