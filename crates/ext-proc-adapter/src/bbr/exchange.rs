//! One body-based routing stream, as an explicit state machine.
//!
//! ```text
//! RequestHeaders ─JSON inference API─> RequestBody ─body end─> (find model) ─> Forwarded
//!        │ other path or content type ──> PassthroughBody ─body end─> Forwarded
//!        │ no body ──> Forwarded                    bad body / too large ──> Done (400 / 413)
//! Forwarded ─response end─> Done
//! ```
//!
//! Full-duplex streamed mode, as `epp`'s exchange: the body of a JSON inference request is
//! buffered (up to the limit) before its headers are answered, because the headers to set
//! come from the body; it then goes back unchanged, in chunks of at most
//! [`MAX_CHUNK_BYTES`](crate::exchange::MAX_CHUNK_BYTES). Only the top-level `model` is
//! read ([`scheduler_core::model_field::find_model`]): the prompt is skipped, never built.
//! A passthrough request is answered at its headers and its body chunks are echoed as they
//! come; responses are echoed as they come.

use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse, processing_request,
};
use ext_proc_proto as proto;
use scheduler_core::model_field;

use super::base_models::BaseModels;
use super::metrics::{BbrMetrics, Outcome};
use super::{BASE_MODEL_NAME_HEADER, MAX_MODEL_NAME_BYTES, MODEL_NAME_HEADER, inference_api};
use crate::exchange::{push_request_body, push_split};

/// Where the stream stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BbrPhase {
    /// Waiting for the request headers.
    RequestHeaders,
    /// Buffering a JSON inference request's body.
    RequestBody,
    /// Echoing the body of a request passed through.
    PassthroughBody,
    /// The request went on to the proxy; echoing whatever of the response arrives.
    Forwarded,
    /// Answered with an immediate response, or the response ended.
    Done,
}

/// The state of one body-based routing stream.
#[derive(Debug)]
pub struct BbrExchange {
    models: Arc<BaseModels>,
    metrics: Option<Arc<BbrMetrics>>,
    max_body_bytes: usize,
    phase: BbrPhase,
    /// The request body received so far, in one buffer.
    body: Vec<u8>,
    body_bytes: usize,
}

impl BbrExchange {
    /// A stream looking base models up in `models`, refusing bodies over `max_body_bytes`.
    pub fn new(
        models: Arc<BaseModels>,
        metrics: Option<Arc<BbrMetrics>>,
        max_body_bytes: usize,
    ) -> Self {
        Self {
            models,
            metrics,
            max_body_bytes,
            phase: BbrPhase::RequestHeaders,
            body: Vec::new(),
            body_bytes: 0,
        }
    }

    /// Where the stream stands.
    pub fn phase(&self) -> BbrPhase {
        self.phase
    }

    /// Handles one message from the proxy and pushes the answers onto `out`.
    pub fn handle(&mut self, message: ProcessingRequest, out: &mut Vec<ProcessingResponse>) {
        let Some(request) = message.request else { return };
        match request {
            processing_request::Request::RequestHeaders(headers) => {
                self.on_request_headers(headers, out)
            }
            processing_request::Request::RequestBody(body) => self.on_request_body(body, out),
            processing_request::Request::RequestTrailers(_) => {
                match self.phase {
                    BbrPhase::RequestBody => self.route(out),
                    BbrPhase::PassthroughBody => self.phase = BbrPhase::Forwarded,
                    _ => {}
                }
                if self.phase != BbrPhase::Done {
                    out.push(proto::continue_trailers(true));
                }
            }
            processing_request::Request::ResponseHeaders(headers) => {
                out.push(proto::continue_response_headers());
                if headers.end_of_stream {
                    self.phase = BbrPhase::Done;
                }
            }
            processing_request::Request::ResponseBody(body) => {
                let end = body.end_of_stream;
                push_split(false, body.body, end, out);
                if end {
                    self.phase = BbrPhase::Done;
                }
            }
            processing_request::Request::ResponseTrailers(_) => {
                out.push(proto::continue_trailers(false));
                self.phase = BbrPhase::Done;
            }
        }
    }

    fn on_request_headers(&mut self, headers: HttpHeaders, out: &mut Vec<ProcessingResponse>) {
        if self.phase != BbrPhase::RequestHeaders {
            return;
        }
        let pairs = proto::header_pairs(headers.headers.as_ref());
        if headers.end_of_stream || !inference_api::reads_body(&pairs) {
            self.record(Outcome::Passthrough);
            out.push(proto::continue_request_headers());
            self.phase =
                if headers.end_of_stream { BbrPhase::Forwarded } else { BbrPhase::PassthroughBody };
            return;
        }
        self.phase = BbrPhase::RequestBody;
    }

    fn on_request_body(&mut self, body: HttpBody, out: &mut Vec<ProcessingResponse>) {
        match self.phase {
            BbrPhase::PassthroughBody => {
                let end = body.end_of_stream;
                push_split(true, body.body, end, out);
                if end {
                    self.phase = BbrPhase::Forwarded;
                }
            }
            BbrPhase::RequestBody => {
                self.body_bytes = self.body_bytes.saturating_add(body.body.len());
                if self.body_bytes > self.max_body_bytes {
                    // Refuse before buffering more: the body held so far is released at once.
                    self.body = Vec::new();
                    let message = format!("request body larger than {} bytes", self.max_body_bytes);
                    return self.reject(413, Outcome::TooLarge, &message, out);
                }
                if self.body.is_empty() {
                    // A body in one message is kept as it came.
                    self.body = body.body;
                } else {
                    self.body.extend_from_slice(&body.body);
                }
                if body.end_of_stream {
                    self.route(out);
                }
            }
            _ => {}
        }
    }

    /// Reads the model from the whole body and answers the headers, then the body.
    fn route(&mut self, out: &mut Vec<ProcessingResponse>) {
        let body = std::mem::take(&mut self.body);
        let model = match model_field::find_model(&body) {
            Ok(Some(field)) => field.value.into_owned(),
            Ok(None) => {
                let message = "request body has no `model` field";
                return self.reject(400, Outcome::MissingModel, message, out);
            }
            Err(error) => return self.reject(400, Outcome::BadBody, &error.to_string(), out),
        };
        if let Err(problem) = usable_model_name(&model) {
            return self.reject(400, Outcome::BadBody, &problem, out);
        }
        let base = self.models.base_of(&model);
        tracing::debug!(?model, ?base, "request routed by its body");
        if let Some(metrics) = &self.metrics {
            metrics.record_routed(&base);
        }
        out.push(proto::set_request_headers(&[
            (MODEL_NAME_HEADER, &model),
            (BASE_MODEL_NAME_HEADER, &base),
        ]));
        push_request_body(body, out);
        self.phase = BbrPhase::Forwarded;
    }

    fn reject(
        &mut self,
        status: u16,
        outcome: Outcome,
        message: &str,
        out: &mut Vec<ProcessingResponse>,
    ) {
        tracing::debug!(status, message, "request answered by the body-based router");
        self.record(outcome);
        out.push(proto::immediate(status, outcome.as_str(), message));
        self.phase = BbrPhase::Done;
    }

    fn record(&self, outcome: Outcome) {
        if let Some(metrics) = &self.metrics {
            metrics.record(outcome);
        }
    }
}

/// A model name goes into request headers: it must be one a proxy accepts there.
fn usable_model_name(model: &str) -> Result<(), String> {
    if model.trim().is_empty() {
        return Err("`model` is empty".into());
    }
    if model.len() > MAX_MODEL_NAME_BYTES {
        return Err(format!("`model` is longer than {MAX_MODEL_NAME_BYTES} bytes"));
    }
    if model.chars().any(char::is_control) {
        return Err("`model` holds control characters".into());
    }
    Ok(())
}

impl crate::service::StreamExchange for BbrExchange {
    fn handle(
        &mut self,
        message: ProcessingRequest,
        out: &mut Vec<ProcessingResponse>,
    ) -> impl std::future::Future<Output = ()> + Send {
        BbrExchange::handle(self, message, out);
        std::future::ready(())
    }

    fn is_before_decision(&self) -> bool {
        matches!(self.phase, BbrPhase::RequestHeaders | BbrPhase::RequestBody)
    }

    fn is_done(&self) -> bool {
        self.phase == BbrPhase::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_must_fit_in_a_header() {
        assert!(usable_model_name("meta-llama/Llama-3.1-8B").is_ok());
        assert!(usable_model_name("naïve-模型").is_ok(), "any printable text");
        assert_eq!(usable_model_name(" ").unwrap_err(), "`model` is empty");
        assert!(usable_model_name("a\r\nx-injected: 1").unwrap_err().contains("control"));
        assert!(usable_model_name("a\0").is_err());
        let long = "m".repeat(MAX_MODEL_NAME_BYTES + 1);
        assert!(usable_model_name(&long).unwrap_err().contains("longer"));
        assert!(usable_model_name(&long[1..]).is_ok());
    }
}
