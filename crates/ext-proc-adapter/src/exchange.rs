//! One ext-proc stream, as an explicit state machine.
//!
//! ```text
//! RequestHeaders ─headers─> RequestBody ─body end─> (decide) ─routed─> AwaitingResponse
//!        │ headers with end_of_stream ──> (decide)        │ rejected ──> Done (immediate response)
//! AwaitingResponse ─response headers─> ResponseBody ─body end─> Done (completion hooks run)
//! ```
//!
//! Full-duplex streamed mode: the request headers are answered only once the whole body is in
//! and a destination chosen; the body is then streamed back unchanged. Response chunks are
//! echoed as they come; only a bounded tail is kept to read the token usage. Dropping the
//! exchange at any point drops its completion guard, which releases everything the request
//! held.
//!
//! The request body is held once: the first chunk is kept as it came (moved, not copied) and
//! later ones are appended to it, the parser reads that buffer in place, and the same buffer
//! goes back to the proxy, its own allocation as the first piece (only the pieces beyond the
//! proxy's message limit are copied out, cut from the end while the buffer shrinks). Once
//! routed, the exchange keeps only what the response path needs (the completion guard and the
//! metric labels): the parsed request, its prompt and its header map are dropped.
//!
//! Parsing is CPU-bound and linear in the body, so it is bounded by [`BodyParsing`]: at most
//! one parse per core at a time, and large bodies parse on tokio's blocking pool so that the
//! runtime's workers keep serving the other streams.

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse, processing_request,
};
use scheduler_core::model_field;
use scheduler_core::protocol::{
    LLM_D_MODEL_REWRITE_HEADER, MODEL_REWRITE_HEADER, REQUEST_DROPPED_REASON_HEADER,
    REQUEST_ID_HEADER, ROUTING_REQUEST_HEADERS,
};
use scheduler_core::{CompletionGuard, EndpointId, InferenceRequest, Outcome};
use tokio::sync::Semaphore;

use crate::logging::bounded;
use crate::metrics::{EppMetrics, RequestLabels, RunningRequest};
use crate::usage::ResponseTail;
use ext_proc_proto as proto;
use scheduler_core::flow::InFlightGuard;
use scheduler_core::{Director, Rejection};

/// `x-llm-d-request-dropped-reason` of an evicted request (the Go EPP's value).
pub const EVICTED_REASON: &str = "evicted";
/// Error code in the body of an evicted request's answer.
pub const EVICTED_CODE: &str = "request_evicted";

/// Largest body chunk sent back in one message; larger ones are split (the proxy's gRPC
/// message limit; the Go EPP uses the same bound).
pub const MAX_CHUNK_BYTES: usize = 62_000;

/// Bounds the CPU the server spends parsing request bodies: at most as many parses at once as
/// it has permits (one per core by default; a stream waits for a permit before it parses), and
/// bodies larger than a threshold parse on tokio's blocking pool, so a few large bodies cannot
/// stall the runtime's workers and every other stream with them.
#[derive(Debug)]
pub struct BodyParsing {
    permits: Arc<Semaphore>,
    capacity: usize,
    blocking_above: usize,
}

impl BodyParsing {
    /// Bodies larger than this parse on the blocking pool by default (a 256 KiB body parses
    /// in about half a millisecond; smaller ones cost less than a hop to another thread).
    pub const DEFAULT_BLOCKING_ABOVE: usize = 256 * 1024;

    /// At most `permits` parses at once (at least one); bodies larger than `blocking_above`
    /// bytes parse on the blocking pool.
    pub fn new(permits: usize, blocking_above: usize) -> Self {
        let capacity = permits.max(1);
        Self { permits: Arc::new(Semaphore::new(capacity)), capacity, blocking_above }
    }

    /// One permit per core ([`std::thread::available_parallelism`]), large bodies on the
    /// blocking pool from [`Self::DEFAULT_BLOCKING_ABOVE`].
    pub fn per_core() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self::new(cores, Self::DEFAULT_BLOCKING_ABOVE)
    }

    /// The process-wide [`Self::per_core`] bound, shared by every exchange that is not given
    /// its own: the cores are the process's, so the bound is too.
    pub fn shared() -> Arc<Self> {
        static SHARED: LazyLock<Arc<BodyParsing>> =
            LazyLock::new(|| Arc::new(BodyParsing::per_core()));
        Arc::clone(&SHARED)
    }

    /// How many parses may run at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many more parses could start now.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// Parses `body` with `headers` once a permit is free. The headers and body are handed
    /// back (the body is streamed back to the proxy; the headers name the model for metrics on
    /// a rejection). `None` only if the runtime shut down before a blocking parse ran.
    async fn parse(
        &self,
        director: &Arc<Director>,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    ) -> Option<Parsed> {
        // The semaphore is never closed; were it, parsing would go on unbounded rather than
        // fail the request.
        let permit = Arc::clone(&self.permits).acquire_owned().await.ok();
        if body.len() <= self.blocking_above {
            let request = director.parse(&headers, &body);
            drop(permit);
            return Some(Parsed { headers, body, request });
        }
        let director = Arc::clone(director);
        // The permit moves with the work: if this stream goes away while the parse runs, the
        // permit is still held until the parse ends.
        let parse = tokio::task::spawn_blocking(move || {
            let request = director.parse(&headers, &body);
            drop(permit);
            Parsed { headers, body, request }
        });
        match parse.await {
            Ok(parsed) => Some(parsed),
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(_) => None,
        }
    }
}

/// A parse's result, with the headers and body it read.
struct Parsed {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    request: Result<InferenceRequest, Rejection>,
}

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
    parsing: Arc<BodyParsing>,
    /// The request headers, until the request is routed.
    headers: Vec<(String, String)>,
    subset: Option<Vec<std::net::SocketAddr>>,
    /// The request body received so far, in one buffer.
    body: Vec<u8>,
    body_bytes: usize,
    request_has_body: bool,
    /// Runs the completion hooks; taken when the response ends.
    completion: Option<CompletionGuard>,
    labels: Option<RequestLabels>,
    /// Counts the request as running from the decision until the response ends.
    running: Option<RunningRequest>,
    tail: ResponseTail,
    started: Instant,
    max_fallback_endpoints: usize,
    emit_endpoint_scores: bool,
    /// The upstream's HTTP status, from the response headers.
    response_status: Option<u16>,
    /// Tracks the routed request for in-flight eviction (`enableEviction`), until it ends.
    in_flight: Option<InFlightGuard>,
    /// Headers the plugins write on the response (the session token), set when it passes.
    response_headers: Vec<(String, String)>,
    /// The request id once routed (moved out of the routed request, for log lines).
    request_id: String,
    /// The endpoint picked, once routed (for log lines).
    endpoint: Option<std::net::SocketAddr>,
}

impl Exchange {
    /// A new exchange deciding with `director`.
    pub fn new(director: Arc<Director>, metrics: Option<Arc<EppMetrics>>) -> Self {
        Self {
            director,
            metrics,
            phase: Phase::RequestHeaders,
            parsing: BodyParsing::shared(),
            headers: Vec::new(),
            subset: None,
            body: Vec::new(),
            body_bytes: 0,
            request_has_body: false,
            completion: None,
            labels: None,
            running: None,
            tail: ResponseTail::default(),
            started: Instant::now(),
            max_fallback_endpoints: 0,
            emit_endpoint_scores: false,
            response_status: None,
            in_flight: None,
            response_headers: Vec::new(),
            request_id: String::new(),
            endpoint: None,
        }
    }

    /// The request's `x-request-id` as the proxy sent it, cut to
    /// [`MAX_LOGGED_CHARS`](crate::logging::MAX_LOGGED_CHARS) for log lines; empty when there
    /// is none (or while the headers are with the body parser). Meant for log fields, which
    /// are evaluated only when their level is enabled.
    pub fn request_id(&self) -> &str {
        let id = if self.request_id.is_empty() {
            let sent = self.headers.iter().find(|(name, _)| name == REQUEST_ID_HEADER);
            sent.map_or("", |(_, value)| value.as_str())
        } else {
            self.request_id.as_str()
        };
        bounded(id)
    }

    /// Completes when flow control evicts the routed request (never without eviction, or
    /// before the request is routed). The driver then calls [`Self::on_evicted`].
    pub async fn evicted(&self) {
        match &self.in_flight {
            Some(guard) => guard.evicted().await,
            None => std::future::pending().await,
        }
    }

    /// Ends an evicted request as the Go EPP does: an immediate 429 with
    /// `x-llm-d-request-dropped-reason: evicted`, which makes the proxy reset the upstream
    /// request. The request counts as cancelled for the completion hooks.
    pub fn on_evicted(&mut self, out: &mut Vec<ProcessingResponse>) {
        if self.phase == Phase::Done {
            return;
        }
        // Untracked first, so the next eviction is not held back by this one.
        self.in_flight = None;
        tracing::info!(
            request_id = self.request_id(),
            endpoint = self.endpoint.map(tracing::field::display),
            phase = ?self.phase,
            elapsed = ?self.started.elapsed(),
            "request evicted by flow control to make room for a higher priority"
        );
        out.push(proto::immediate_with_headers(
            429,
            EVICTED_CODE,
            "request evicted by flow control",
            &[(REQUEST_DROPPED_REASON_HEADER, EVICTED_REASON)],
        ));
        self.finish(Outcome::Cancelled);
    }

    /// Emits up to `count` fallback endpoints after the primary in the destination (default
    /// 0: one `ip:port`, which every proxy parses).
    pub fn with_max_fallback_endpoints(mut self, count: usize) -> Self {
        self.max_fallback_endpoints = count;
        self
    }

    /// Also emits the scheduler's score of each destination endpoint in the `envoy.lb`
    /// metadata (default off).
    pub fn with_endpoint_scores(mut self, emit: bool) -> Self {
        self.emit_endpoint_scores = emit;
        self
    }

    /// Parses bodies within `parsing`'s bound instead of the process-wide one.
    pub fn with_body_parsing(mut self, parsing: Arc<BodyParsing>) -> Self {
        self.parsing = parsing;
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
            // Refuse before buffering more: the body held so far is released at once.
            self.body = Vec::new();
            self.reject(Rejection::TooLarge { limit }, out);
            return;
        }
        if self.body.is_empty() {
            // A body in one message is kept as it came.
            self.body = body.body;
        } else {
            self.body.extend_from_slice(&body.body);
        }
        if body.end_of_stream {
            self.decide(out).await;
        }
    }

    async fn decide(&mut self, out: &mut Vec<ProcessingResponse>) {
        if !self.request_has_body {
            return self.route_without_body(out);
        }
        let headers = std::mem::take(&mut self.headers);
        let body = std::mem::take(&mut self.body);
        let Some(parsed) = self.parsing.parse(&self.director, headers, body).await else {
            // The runtime is shutting down; the stream goes with it.
            self.phase = Phase::Done;
            return;
        };
        let Parsed { headers, body, request } = parsed;
        self.headers = headers;
        let request = match request {
            Ok(request) => request,
            Err(rejection) => return self.reject(rejection, out),
        };
        let subset = self.subset.take();
        match self.director.decide_parsed(request, body.len(), subset).await {
            Ok(mut routed) => {
                tracing::debug!(
                    request_id = self.request_id(),
                    endpoint = %routed.primary,
                    model = bounded(&routed.request.target_model),
                    fallbacks = routed.fallbacks.len(),
                    "request routed"
                );
                if let Some(metrics) = &self.metrics {
                    let labels = metrics.request_labels(&routed.request);
                    metrics.record_request(&labels, self.body_bytes);
                    metrics.record_rewrite(&routed.request, &labels);
                    metrics.record_disagg_decision(
                        self.director.scheduler().handler_plugin(),
                        &labels,
                        &routed.request_headers,
                    );
                    self.running = Some(metrics.start_running(&labels));
                    self.labels = Some(labels);
                }
                let destination = proto::destination_value(
                    routed.primary,
                    &routed.fallbacks,
                    self.max_fallback_endpoints,
                );
                let scores = if self.emit_endpoint_scores {
                    endpoint_scores(&routed, self.max_fallback_endpoints)
                } else {
                    Vec::new()
                };
                let request = &routed.request;
                let rewritten = (self.request_has_body && request.target_model != request.model)
                    .then(|| rewrite_body_model(&body, &request.target_model))
                    .flatten();
                let length = rewritten.as_ref().map(|body| body.len().to_string());
                let target = request.target_model.as_str();
                let mut headers: Vec<(&str, &str)> = Vec::new();
                if let Some(length) = &length {
                    headers.extend([
                        ("content-length", length.as_str()),
                        (LLM_D_MODEL_REWRITE_HEADER, target),
                        (MODEL_REWRITE_HEADER, target),
                    ]);
                }
                headers.extend(
                    routed.request_headers.iter().map(|(name, value)| (*name, value.as_str())),
                );
                // A routing header the decision does not set must not reach the sidecar from
                // the client.
                let unset: Vec<&str> = ROUTING_REQUEST_HEADERS
                    .into_iter()
                    .filter(|name| !routed.request_headers.iter().any(|(set, _)| set == name))
                    .collect();
                out.push(proto::with_removed_request_headers(
                    proto::route_to_with_scores(&destination, &headers, &scores),
                    &unset,
                ));
                match rewritten {
                    Some(rewritten) => {
                        // The original body is released before the new one is streamed.
                        drop(body);
                        push_request_body(rewritten, out);
                    }
                    None => {
                        if self.request_has_body {
                            push_request_body(body, out);
                        }
                    }
                }
                // Only requests admitted by the flow controller are tracked: those are the ones
                // whose priority went through admission.
                self.in_flight = self
                    .director
                    .admission()
                    .and_then(|admission| admission.controller())
                    .and_then(|controller| controller.in_flight())
                    .map(|in_flight| in_flight.track(routed.request.priority));
                // The response path needs the guard and the labels; the request (prompt,
                // header map) and the headers are released here.
                self.completion = routed.completion;
                self.response_headers = routed.response_headers;
                self.request_id = std::mem::take(&mut routed.request.request_id);
                self.endpoint = Some(routed.primary);
                self.headers = Vec::new();
                self.phase = Phase::AwaitingResponse;
            }
            Err(rejection) => self.reject(rejection, out),
        }
    }

    /// A request without a body is not parsed or scheduled: it goes to an endpoint drawn at
    /// random (see [`Director::route_without_body`]).
    fn route_without_body(&mut self, out: &mut Vec<ProcessingResponse>) {
        let subset = self.subset.take();
        match self.director.route_without_body(&self.headers, subset) {
            Ok(mut routed) => {
                tracing::debug!(
                    request_id = self.request_id(),
                    endpoint = %routed.primary,
                    "request without a body routed"
                );
                self.request_id = std::mem::take(&mut routed.request.request_id);
                self.endpoint = Some(routed.primary);
                let destination = proto::destination_value(routed.primary, &[], 0);
                out.push(proto::with_removed_request_headers(
                    proto::route_to(&destination, &[]),
                    &ROUTING_REQUEST_HEADERS,
                ));
                self.headers = Vec::new();
                self.phase = Phase::AwaitingResponse;
            }
            Err(rejection) => self.reject(rejection, out),
        }
    }

    fn reject(&mut self, rejection: Rejection, out: &mut Vec<ProcessingResponse>) {
        tracing::debug!(
            request_id = self.request_id(),
            status = rejection.status(),
            error = %rejection,
            "request answered by the picker"
        );
        if let Some(metrics) = &self.metrics {
            let model = [LLM_D_MODEL_REWRITE_HEADER, MODEL_REWRITE_HEADER]
                .iter()
                .find_map(|name| self.headers.iter().find(|(n, _)| n == name));
            metrics.record_rejection(model.map_or("", |(_, v)| v.as_str()), rejection.code());
        }
        let reason =
            rejection.dropped_reason().map(|reason| (REQUEST_DROPPED_REASON_HEADER, reason));
        out.push(proto::immediate_with_headers(
            rejection.status(),
            rejection.code(),
            &rejection.to_string(),
            reason.as_slice(),
        ));
        self.phase = Phase::Done;
    }

    fn on_response_headers(
        &mut self,
        headers: HttpHeaders,
        metadata: Option<&envoy_types::pb::envoy::config::core::v3::Metadata>,
        out: &mut Vec<ProcessingResponse>,
    ) {
        if let Some(guard) = self.completion.as_mut() {
            // The response started; the decode endpoint answers only once the prefill endpoint
            // handed its KV cache over, so a disaggregated request's prefill stage is over.
            guard.response_started();
            if let Some(served) = proto::served_endpoint(metadata) {
                guard.set_served_endpoint(EndpointId::from_address(served));
            }
            let report = proto::served_report(metadata);
            self.director.scheduler().served_response_headers(report, &mut self.response_headers);
        }
        self.response_status = proto::response_status(headers.headers.as_ref());
        if self.response_headers.is_empty() {
            out.push(proto::continue_response_headers());
        } else {
            let written = std::mem::take(&mut self.response_headers);
            let pairs: Vec<(&str, &str)> =
                written.iter().map(|(name, value)| (name.as_str(), value.as_str())).collect();
            out.push(proto::set_response_headers(&pairs));
        }
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
            self.report_usage(out);
            self.finish(self.response_outcome());
        }
    }

    /// Puts what the usage reporters compute from the response's usage (zero counts when it
    /// reported none, as llm-d-router hands them) on the last body message, as dynamic
    /// metadata for the proxy.
    fn report_usage(&self, out: &mut [ProcessingResponse]) {
        let scheduler = self.director.scheduler();
        if self.phase == Phase::Done || !scheduler.reports_usage() {
            return;
        }
        let usage = self.tail.usage().unwrap_or_default().to_response_usage();
        let reported = scheduler.report_usage(&usage);
        if let (false, Some(last)) = (reported.is_empty(), out.last_mut()) {
            let numbers = reported.iter().map(|attribute| {
                (attribute.namespace.as_str(), attribute.name.as_str(), attribute.value)
            });
            proto::add_dynamic_numbers(last, numbers);
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
        tracing::debug!(
            request_id = self.request_id(),
            endpoint = self.endpoint.map(tracing::field::display),
            ?outcome,
            status = self.response_status,
            elapsed = ?self.started.elapsed(),
            "request finished"
        );
        self.running = None;
        // Untracked before the completion hooks run, which may start a flow-control pass.
        self.in_flight = None;
        let usage = self.tail.usage();
        if let Some(mut guard) = self.completion.take() {
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

/// The score of each endpoint named in the destination (the primary and up to
/// `max_fallbacks` fallbacks), when the scheduler scored them.
fn endpoint_scores(routed: &scheduler_core::Routed, max_fallbacks: usize) -> Vec<(String, f64)> {
    let named = std::iter::once(&routed.primary).chain(routed.fallbacks.iter().take(max_fallbacks));
    named.zip(&routed.scores).map(|(address, score)| (address.to_string(), *score)).collect()
}

/// `body` with its `model` set to `target`, for a request whose model was rewritten; `None`
/// when the body names no model to replace (the request then goes on as it came: the target
/// still steers scheduling, and the rewrite header tells the upstream).
fn rewrite_body_model(body: &[u8], target: &str) -> Option<Vec<u8>> {
    match model_field::rewrite_model(body, target) {
        Ok(rewritten) => rewritten,
        Err(error) => {
            // The body parsed for scheduling, so this is not expected; routing goes on.
            tracing::debug!(%error, "the model of a rewritten request was left in its body");
            None
        }
    }
}

/// Streams the request body back: in one message when it fits, else in pieces of at most
/// [`MAX_CHUNK_BYTES`]. The pieces are cut from the end, so the body's own allocation becomes the
/// first piece and only the others are copied; the buffer is shrunk each time it is less than
/// half used (a few times in all), so the body is held about once throughout, not twice.
pub(crate) fn push_request_body(mut body: Vec<u8>, out: &mut Vec<ProcessingResponse>) {
    if body.len() <= MAX_CHUNK_BYTES {
        // Also a body that ended empty (or by trailers): its end still needs sending on.
        out.push(proto::body_chunk(true, body, true));
        return;
    }
    let mut tail = Vec::with_capacity(body.len().div_ceil(MAX_CHUNK_BYTES) - 1);
    while body.len() > MAX_CHUNK_BYTES {
        let start = (body.len() - 1) / MAX_CHUNK_BYTES * MAX_CHUNK_BYTES;
        tail.push(body.split_off(start));
        if body.len() < body.capacity() / 2 {
            body.shrink_to_fit();
        }
    }
    out.push(proto::body_chunk(true, body, false));
    let last = tail.len() - 1;
    for (index, piece) in tail.into_iter().rev().enumerate() {
        out.push(proto::body_chunk(true, piece, index == last));
    }
}

pub(crate) fn push_split(
    request_side: bool,
    chunk: Vec<u8>,
    end: bool,
    out: &mut Vec<ProcessingResponse>,
) {
    if chunk.len() <= MAX_CHUNK_BYTES {
        out.push(proto::body_chunk(request_side, chunk, end));
        return;
    }
    let pieces = chunk.len().div_ceil(MAX_CHUNK_BYTES);
    for (index, piece) in chunk.chunks(MAX_CHUNK_BYTES).enumerate() {
        out.push(proto::body_chunk(request_side, piece.to_vec(), end && index + 1 == pieces));
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::task::Poll;

    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use envoy_types::pb::envoy::service::ext_proc::v3::{
        HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse, body_mutation,
        processing_response,
    };
    use scheduler_core::{DirectorOptions, Endpoint, EndpointState, PoolSnapshot, SharedPool};

    use super::*;

    fn director() -> Arc<Director> {
        let pool = Arc::new(SharedPool::new(PoolSnapshot::new([EndpointState::new(
            Endpoint::new(([10, 0, 0, 1], 8000).into()),
        )])));
        let scheduler = scorers::default_scheduler().expect("the default scheduler builds");
        Arc::new(Director::new(Arc::new(scheduler), pool, DirectorOptions::default()))
    }

    fn headers() -> ProcessingRequest {
        let header = |key: &str, value: &str| HeaderValue {
            key: key.to_owned(),
            value: value.to_owned(),
            raw_value: Vec::new(),
        };
        let headers = HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![header(":path", "/v1/completions"), header("x-request-id", "r1")],
            }),
            end_of_stream: false,
            ..HttpHeaders::default()
        };
        ProcessingRequest {
            request: Some(processing_request::Request::RequestHeaders(headers)),
            ..ProcessingRequest::default()
        }
    }

    fn body(chunk: Vec<u8>, end_of_stream: bool) -> ProcessingRequest {
        let body = HttpBody { body: chunk, end_of_stream, ..HttpBody::default() };
        ProcessingRequest {
            request: Some(processing_request::Request::RequestBody(body)),
            ..ProcessingRequest::default()
        }
    }

    /// A completions body of about `len` bytes.
    fn completions_body(len: usize) -> Vec<u8> {
        let mut body = br#"{"model":"m","prompt":""#.to_vec();
        body.resize(len.max(body.len()), b'a');
        body.extend_from_slice(b"\"}");
        body
    }

    /// The request-body chunks the exchange sent back, and whether the last one ended the body.
    fn echoed(out: &[ProcessingResponse]) -> Vec<(Vec<u8>, bool)> {
        out.iter()
            .filter_map(|response| match &response.response {
                Some(processing_response::Response::RequestBody(body)) => {
                    let mutation = body.response.as_ref()?.body_mutation.as_ref()?;
                    match mutation.mutation.as_ref()? {
                        body_mutation::Mutation::StreamedResponse(streamed) => {
                            Some((streamed.body.clone(), streamed.end_of_stream))
                        }
                        _ => None,
                    }
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn one_parse_per_core_by_default() {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let parsing = BodyParsing::per_core();
        assert_eq!((parsing.capacity(), parsing.available()), (cores, cores));
        assert_eq!(BodyParsing::new(0, 0).capacity(), 1, "never zero permits");
    }

    #[tokio::test]
    async fn a_body_waits_for_a_parse_permit() {
        let parsing = Arc::new(BodyParsing::new(1, BodyParsing::DEFAULT_BLOCKING_ABOVE));
        let mut exchange = Exchange::new(director(), None).with_body_parsing(Arc::clone(&parsing));
        let mut out = Vec::new();
        exchange.handle(headers(), &mut out).await;
        // Another stream is parsing: the only permit is taken.
        let held = Arc::clone(&parsing.permits).acquire_owned().await.expect("open semaphore");
        assert_eq!(parsing.available(), 0);
        {
            let mut handling =
                std::pin::pin!(exchange.handle(body(completions_body(64), true), &mut out));
            let first = std::future::poll_fn(|cx| Poll::Ready(handling.as_mut().poll(cx))).await;
            assert!(first.is_pending(), "the parse waits for the permit");
            drop(held);
            handling.await;
        }
        assert_eq!(exchange.phase(), Phase::AwaitingResponse);
        assert_eq!(echoed(&out), vec![(completions_body(64), true)]);
        assert_eq!(parsing.available(), 1, "the permit is returned");
    }

    #[tokio::test]
    async fn large_bodies_parse_on_the_blocking_pool() {
        // Every body counts as large.
        let parsing = Arc::new(BodyParsing::new(1, 0));
        let mut exchange = Exchange::new(director(), None).with_body_parsing(Arc::clone(&parsing));
        let mut out = Vec::new();
        exchange.handle(headers(), &mut out).await;
        exchange.handle(body(completions_body(1_000), true), &mut out).await;
        assert_eq!(exchange.phase(), Phase::AwaitingResponse);
        assert_eq!(echoed(&out), vec![(completions_body(1_000), true)]);
        assert_eq!(parsing.available(), 1);

        let mut exchange = Exchange::new(director(), None).with_body_parsing(Arc::clone(&parsing));
        exchange.handle(headers(), &mut out).await;
        out.clear();
        exchange.handle(body(b"{not json".to_vec(), true), &mut out).await;
        assert_eq!(exchange.phase(), Phase::Done, "a bad body is answered by the picker");
        assert!(echoed(&out).is_empty());
    }

    /// The `envoy.lb` scores the route answer carries, if any.
    fn emitted_scores(out: &[ProcessingResponse]) -> Option<Vec<(String, f64)>> {
        use envoy_types::pb::google::protobuf::value::Kind;
        let lb = out.first()?.dynamic_metadata.as_ref()?.fields.get("envoy.lb")?;
        let Some(Kind::StructValue(lb)) = &lb.kind else { return None };
        let scores = lb.fields.get("x-gateway-destination-endpoint-scores")?;
        let Some(Kind::StructValue(scores)) = &scores.kind else { return None };
        let mut scores: Vec<(String, f64)> = scores
            .fields
            .iter()
            .map(|(endpoint, value)| match value.kind {
                Some(Kind::NumberValue(score)) => (endpoint.clone(), score),
                _ => panic!("a score is a number: {value:?}"),
            })
            .collect();
        scores.sort_by(|a, b| a.0.cmp(&b.0));
        Some(scores)
    }

    #[tokio::test]
    async fn endpoint_scores_are_emitted_only_when_asked() {
        for emit in [false, true] {
            let mut exchange = Exchange::new(director(), None).with_endpoint_scores(emit);
            let mut out = Vec::new();
            exchange.handle(headers(), &mut out).await;
            exchange.handle(body(completions_body(64), true), &mut out).await;
            let scores = emitted_scores(&out);
            if !emit {
                assert_eq!(scores, None);
                continue;
            }
            let scores = scores.expect("scores in the metadata");
            assert_eq!(scores.len(), 1, "only the endpoints in the destination: {scores:?}");
            assert_eq!(scores[0].0, "10.0.0.1:8000");
            // GIE's default profile: queue 2, KV-cache 2, prefix 3; an idle endpoint with no
            // cached prefix scores 2 + 2.
            assert!((scores[0].1 - 4.0).abs() < 1e-9, "{scores:?}");
        }
    }

    #[tokio::test]
    async fn a_body_in_one_message_goes_back_without_a_copy() {
        let mut exchange = Exchange::new(director(), None);
        let mut out = Vec::new();
        exchange.handle(headers(), &mut out).await;
        let chunk = completions_body(4_000);
        let address = chunk.as_ptr();
        exchange.handle(body(chunk, true), &mut out).await;
        let Some(processing_response::Response::RequestBody(response)) =
            out.last().and_then(|response| response.response.as_ref())
        else {
            panic!("the body is sent back: {out:?}");
        };
        let mutation = response.response.as_ref().and_then(|r| r.body_mutation.as_ref());
        let Some(body_mutation::Mutation::StreamedResponse(streamed)) =
            mutation.and_then(|m| m.mutation.as_ref())
        else {
            panic!("a streamed body: {response:?}");
        };
        assert_eq!(streamed.body.as_ptr(), address, "the same buffer, moved");
    }

    #[tokio::test]
    async fn a_chunked_body_is_held_once_and_goes_back_whole() {
        let mut exchange = Exchange::new(director(), None);
        let mut out = Vec::new();
        exchange.handle(headers(), &mut out).await;
        let whole = completions_body(3 * MAX_CHUNK_BYTES + 1_234);
        let chunks: Vec<&[u8]> = whole.chunks(40_000).collect();
        for (index, chunk) in chunks.iter().enumerate() {
            exchange.handle(body(chunk.to_vec(), index + 1 == chunks.len()), &mut out).await;
        }
        assert_eq!(exchange.phase(), Phase::AwaitingResponse);
        let pieces = echoed(&out);
        assert_eq!(pieces.len(), whole.len().div_ceil(MAX_CHUNK_BYTES));
        assert!(pieces.iter().all(|(piece, _)| piece.len() <= MAX_CHUNK_BYTES));
        let ends: Vec<bool> = pieces.iter().map(|(_, end)| *end).collect();
        assert_eq!(ends.iter().filter(|end| **end).count(), 1);
        assert_eq!(ends.last(), Some(&true), "only the last piece ends the body");
        assert_eq!(pieces.into_iter().flat_map(|(piece, _)| piece).collect::<Vec<u8>>(), whole);
        // After the decision only the response path's state is left.
        assert!(exchange.body.is_empty() && exchange.body.capacity() == 0);
        assert!(exchange.headers.is_empty());
        assert!(exchange.completion.is_some());
    }
}
