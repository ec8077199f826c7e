//! From request bytes to a routing decision: parse the body, resolve the request's priority,
//! admit it (or shed it), schedule it, and say where it goes. Transport-free and
//! runtime-agnostic, so every adapter (ext-proc, tower, C ABI) drives the same logic.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::body::BodyError;
use crate::pool::SharedPool;
use crate::request::InferenceRequest;
use crate::scheduler::{CompletionGuard, Scheduler, SchedulingError};

/// What the director needs to know beyond the scheduler and the pool.
#[derive(Clone, Debug)]
pub struct DirectorOptions {
    /// Fallback endpoints to emit after the primary (0: one endpoint, which every proxy parses).
    pub max_fallback_endpoints: usize,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
}

impl Default for DirectorOptions {
    fn default() -> Self {
        Self { max_fallback_endpoints: 0, max_body_bytes: 32 * 1024 * 1024 }
    }
}

/// Why a request is answered by the picker itself instead of being routed.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// The body is not a usable OpenAI request.
    #[error(transparent)]
    BadRequest(#[from] BodyError),
    /// The body exceeds the limit.
    #[error("request body exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// No endpoint can take the request.
    #[error(transparent)]
    NoEndpoint(#[from] SchedulingError),
    /// The pool is saturated and the request is sheddable.
    #[error("pool is saturated and the request (priority {priority}) is sheddable")]
    Shed {
        /// The request's priority.
        priority: i32,
    },
}

impl Rejection {
    /// The HTTP status the proxy answers with.
    pub fn status(&self) -> u16 {
        match self {
            Self::BadRequest(_) => 400,
            Self::TooLarge { .. } => 413,
            Self::NoEndpoint(_) => 503,
            Self::Shed { .. } => 429,
        }
    }

    /// A stable machine-readable code for the JSON error body and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::TooLarge { .. } => "body_too_large",
            Self::NoEndpoint(_) => "no_ready_endpoint",
            Self::Shed { .. } => "request_shed",
        }
    }
}

/// A request routed to an endpoint.
#[derive(Debug)]
pub struct Routed {
    /// `ip:port` of the primary, then of each fallback, comma-separated.
    pub destination: String,
    /// The primary endpoint.
    pub primary: SocketAddr,
    /// The request as parsed.
    pub request: InferenceRequest,
    /// Runs the completion hooks when the response ends (or when dropped).
    pub completion: Option<CompletionGuard>,
}

/// Turns requests into routing decisions.
#[derive(Debug)]
pub struct Director {
    scheduler: Arc<Scheduler>,
    pool: Arc<SharedPool>,
    options: DirectorOptions,
}

impl Director {
    /// A director scheduling with `scheduler` over `pool`.
    pub fn new(scheduler: Arc<Scheduler>, pool: Arc<SharedPool>, options: DirectorOptions) -> Self {
        Self { scheduler, pool, options }
    }

    /// The options.
    pub fn options(&self) -> &DirectorOptions {
        &self.options
    }

    /// The pool the director schedules over.
    pub fn pool(&self) -> &Arc<SharedPool> {
        &self.pool
    }

    /// Decides where the request goes. `body` is the whole request body (empty for a request
    /// without one); `subset` is the proxy's subset hint.
    pub async fn decide(
        &self,
        headers: &[(String, String)],
        body: &[u8],
        subset: Option<Vec<SocketAddr>>,
    ) -> Result<Routed, Rejection> {
        if body.len() > self.options.max_body_bytes {
            return Err(Rejection::TooLarge { limit: self.options.max_body_bytes });
        }
        let path = headers.iter().find(|(name, _)| name == ":path").map(|(_, v)| v.as_str());
        let header_refs = headers.iter().map(|(name, value)| (name.as_str(), value.as_str()));
        let mut request = InferenceRequest::from_openai(path, header_refs, body)?;
        request.endpoint_subset = subset;

        let pool = self.pool.load();
        let mut result = self.scheduler.schedule(&request, &pool)?;
        let primary = result.primary().endpoint.address;
        let mut destination = primary.to_string();
        for fallback in result.fallbacks().take(self.options.max_fallback_endpoints) {
            destination.push(',');
            destination.push_str(&fallback.endpoint.address.to_string());
        }
        let completion = result.take_completion();
        Ok(Routed { destination, primary, request, completion })
    }
}
