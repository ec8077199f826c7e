//! One ext-proc stream, as an explicit state machine.
//!
//! ```text
//! RequestHeaders ─headers─> RequestBody ─body end─> (decide) ─routed─> AwaitingResponse
//!        │ headers with end_of_stream ──> (decide)        │ rejected ──> Done (immediate response)
//! AwaitingResponse ─response headers─> ResponseBody ─body end─> Done (completion hooks run)
//! ```
//!
//! Full-duplex streamed mode: the request headers are answered only once the whole body is in
//! and a destination chosen; the buffered body chunks are then streamed back unchanged (moved,
//! not copied, unless one exceeds the proxy's message limit). Response chunks are echoed as they
//! come; only a bounded tail is kept to read the token usage. Dropping the exchange at any
//! point drops its completion guard, which releases everything the request held.

use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse, processing_request,
};
use scheduler_core::protocol::MODEL_REWRITE_HEADER;
use scheduler_core::{EndpointId, Outcome};

use crate::metrics::{EppMetrics, RequestLabels};
use crate::usage::ResponseTail;
use ext_proc_proto as proto;
use scheduler_core::{Director, Rejection, Routed};

/// Largest body chunk sent back in one message; larger ones are split (the proxy's gRPC
/// message limit; the Go EPP uses the same bound).
pub const MAX_CHUNK_BYTES: usize = 62_000;

/// Where the exchange stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the request headers.
    RequestHeaders,
    /// Buffering the request body.
    RequestBody,
    /// Routed; waiting for the response headers.
    AwaitingResponse,
    /// Echoing the response body.
    ResponseBody,
    /// Finished: answered with an immediate response, or the response ended.
    Done,
}

/// The state of one ext-proc stream.
#[derive(Debug)]
pub struct Exchange {
    director: Arc<Director>,
    metrics: Option<Arc<EppMetrics>>,
    phase: Phase,
    headers: Vec<(String, String)>,
    subset: Option<Vec<std::net::SocketAddr>>,
    body_chunks: Vec<Vec<u8>>,
    body_bytes: usize,
    request_has_body: bool,
    routed: Option<Routed>,
    labels: Option<RequestLabels>,
    tail: ResponseTail,
    started: Instant,
    max_fallback_endpoints: usize,
    /// The upstream's HTTP status, from the response headers.
    response_status: Option<u16>,
}

impl Exchange {
    /// A new exchange deciding with `director`.
    pub fn new(director: Arc<Director>, metrics: Option<Arc<EppMetrics>>) -> Self {
        Self {
            director,
            metrics,
            phase: Phase::RequestHeaders,
            headers: Vec::new(),
            subset: None,
            body_chunks: Vec::new(),
            body_bytes: 0,
            request_has_body: false,
            routed: None,
            labels: None,
            tail: ResponseTail::default(),
            started: Instant::now(),
            max_fallback_endpoints: 0,
            response_status: None,
        }
    }

    /// Emits up to `count` fallback endpoints after the primary in the destination (default
    /// 0: one `ip:port`, which every proxy parses).
    pub fn with_max_fallback_endpoints(mut self, count: usize) -> Self {
        self.max_fallback_endpoints = count;
        self
    }

    /// Where the exchange stands.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether the request is still waiting for its routing decision (the stream's idle
    /// timeout applies only then: a response may legitimately take long).
    pub fn is_before_decision(&self) -> bool {
        matches!(self.phase, Phase::RequestHeaders | Phase::RequestBody)
    }

    /// Handles one message from the proxy and pushes the answers onto `out`.
    pub async fn handle(&mut self, message: ProcessingRequest, out: &mut Vec<ProcessingResponse>) {
        let Some(request) = message.request else { return };
        match request {
            processing_request::Request::RequestHeaders(headers) => {
                self.on_request_headers(headers, message.metadata_context.as_ref(), out).await
            }
            processing_request::Request::RequestBody(body) => self.on_request_body(body, out).await,
            processing_request::Request::RequestTrailers(_) => {
                if self.phase == Phase::RequestBody {
                    self.decide(out).await;
                }
                out.push(proto::continue_trailers(true));
            }
            processing_request::Request::ResponseHeaders(headers) => {
                self.on_response_headers(headers, message.metadata_context.as_ref(), out)
            }
            processing_request::Request::ResponseBody(body) => self.on_response_body(body, out),
            processing_request::Request::ResponseTrailers(_) => {
                out.push(proto::continue_trailers(false));
                self.finish(Outcome::Completed);
            }
        }
    }

    async fn on_request_headers(
        &mut self,
        headers: HttpHeaders,
        metadata: Option<&envoy_types::pb::envoy::config::core::v3::Metadata>,
        out: &mut Vec<ProcessingResponse>,
    ) {
        if self.phase != Phase::RequestHeaders {
            return;
        }
        self.headers = proto::header_pairs(headers.headers.as_ref());
        self.subset = proto::subset_hint(metadata);
        self.phase = Phase::RequestBody;
        self.request_has_body = !headers.end_of_stream;
        if headers.end_of_stream {
            self.decide(out).await;
        }
    }

    async fn on_request_body(&mut self, body: HttpBody, out: &mut Vec<ProcessingResponse>) {
        if self.phase != Phase::RequestBody {
            return;
        }
        self.body_bytes = self.body_bytes.saturating_add(body.body.len());
        let limit = self.director.options().max_body_bytes;
        if self.body_bytes > limit {
            // Refuse before buffering more: the chunks held so far are released at once.
            self.body_chunks = Vec::new();
            self.reject(Rejection::TooLarge { limit }, out);
            return;
        }
        if !body.body.is_empty() {
            self.body_chunks.push(body.body);
        }
        if body.end_of_stream {
            self.decide(out).await;
        }
    }

    async fn decide(&mut self, out: &mut Vec<ProcessingResponse>) {
        let chunks = std::mem::take(&mut self.body_chunks);
        let joined;
        let body: &[u8] = match chunks.as_slice() {
            [] => &[],
            [only] => only,
            many => {
                joined = many.concat();
                &joined
            }
        };
        let subset = self.subset.take();
        match self.director.decide(&self.headers, body, subset).await {
            Ok(routed) => {
                if let Some(metrics) = &self.metrics {
                    let labels = metrics.request_labels(&routed.request);
                    metrics.record_request(&labels, self.body_bytes);
                    self.labels = Some(labels);
                }
                let destination = proto::destination_value(
                    routed.primary,
                    &routed.fallbacks,
                    self.max_fallback_endpoints,
                );
                out.push(proto::route_to(&destination, &[]));
                if self.request_has_body {
                    push_body_chunks(chunks, out);
                }
                self.routed = Some(routed);
                self.phase = Phase::AwaitingResponse;
            }
            Err(rejection) => self.reject(rejection, out),
        }
    }

    fn reject(&mut self, rejection: Rejection, out: &mut Vec<ProcessingResponse>) {
        tracing::debug!(status = rejection.status(), error = %rejection, "request answered by the picker");
        if let Some(metrics) = &self.metrics {
            let model = self.headers.iter().find(|(n, _)| n == MODEL_REWRITE_HEADER);
            metrics.record_rejection(model.map_or("", |(_, v)| v.as_str()), rejection.code());
        }
        out.push(proto::immediate(rejection.status(), rejection.code(), &rejection.to_string()));
        self.phase = Phase::Done;
    }

    fn on_response_headers(
        &mut self,
        headers: HttpHeaders,
        metadata: Option<&envoy_types::pb::envoy::config::core::v3::Metadata>,
        out: &mut Vec<ProcessingResponse>,
    ) {
        if let (Some(served), Some(routed)) = (proto::served_endpoint(metadata), &mut self.routed)
            && let Some(guard) = routed.completion.as_mut()
        {
            guard.set_served_endpoint(EndpointId::from_address(served));
        }
        self.response_status = proto::response_status(headers.headers.as_ref());
        out.push(proto::continue_response_headers());
        if headers.end_of_stream {
            self.finish(self.response_outcome());
        } else if self.phase == Phase::AwaitingResponse {
            self.phase = Phase::ResponseBody;
        }
    }

    fn on_response_body(&mut self, body: HttpBody, out: &mut Vec<ProcessingResponse>) {
        self.tail.push(&body.body);
        let end = body.end_of_stream;
        push_split(false, body.body, end, out);
        if end {
            self.finish(self.response_outcome());
        }
    }

    /// How a response that ended counts: a server error (5xx) failed the request.
    fn response_outcome(&self) -> Outcome {
        match self.response_status {
            Some(status) if status >= 500 => Outcome::Failed,
            _ => Outcome::Completed,
        }
    }

    fn finish(&mut self, outcome: Outcome) {
        if self.phase == Phase::Done {
            return;
        }
        self.phase = Phase::Done;
        let usage = self.tail.usage();
        if let Some(mut routed) = self.routed.take()
            && let Some(mut guard) = routed.completion.take()
        {
            if let Some(usage) = usage {
                guard.set_usage(usage.prompt_tokens, usage.completion_tokens);
            }
            guard.finish(outcome);
        }
        if let (Some(metrics), Some(labels)) = (&self.metrics, &self.labels) {
            metrics.record_completion(labels, self.started.elapsed(), usage);
            if let Some(status) = self.response_status.filter(|status| *status >= 400) {
                metrics.record_response_error(labels, status);
            }
        }
    }
}

fn push_body_chunks(chunks: Vec<Vec<u8>>, out: &mut Vec<ProcessingResponse>) {
    if chunks.is_empty() {
        // A body that ended empty (or by trailers) still needs its end sent on.
        out.push(proto::body_chunk(true, Vec::new(), true));
        return;
    }
    let count = chunks.len();
    for (index, chunk) in chunks.into_iter().enumerate() {
        push_split(true, chunk, index + 1 == count, out);
    }
}

fn push_split(request_side: bool, chunk: Vec<u8>, end: bool, out: &mut Vec<ProcessingResponse>) {
    if chunk.len() <= MAX_CHUNK_BYTES {
        out.push(proto::body_chunk(request_side, chunk, end));
        return;
    }
    let pieces = chunk.len().div_ceil(MAX_CHUNK_BYTES);
    for (index, piece) in chunk.chunks(MAX_CHUNK_BYTES).enumerate() {
        out.push(proto::body_chunk(request_side, piece.to_vec(), end && index + 1 == pieces));
    }
}
