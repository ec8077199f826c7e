//! The body-based router (`epp bbr`): an ext-proc service in front of the endpoint picker
//! that reads the `model` of each OpenAI-style JSON request body and sets the headers that
//! HTTPRoutes match on to choose the InferencePool:
//!
//! - [`MODEL_NAME_HEADER`]: the model as the client named it;
//! - [`BASE_MODEL_NAME_HEADER`]: for a LoRA adapter, its base model; for any other model,
//!   the model itself.
//!
//! The answer clears the proxy's route cache, so routes are matched again on the new headers;
//! the body goes on unchanged. Adapters are mapped to base models by the adapters file
//! ([`adapters_file`], Kubernetes ConfigMaps), else by what the model servers list on
//! `/v1/models` ([`models_poller`]); the file wins ([`base_models`]).
//!
//! Requests that are not JSON inference requests ([`inference_api`]), and requests without a
//! body, pass through untouched. A body without a usable `model` is answered 400, one over the
//! size limit 413, each with a JSON error.
//!
//! ```
//! use std::sync::Arc;
//! use envoy_types::pb::envoy::service::ext_proc::v3::{
//!     HttpBody, HttpHeaders, ProcessingRequest, processing_request::Request,
//!     processing_response::Response,
//! };
//! use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
//! use ext_proc_adapter::bbr::{BaseModels, BbrExchange};
//!
//! let models = Arc::new(BaseModels::new([("sql-lora", "llama-8b")].into_iter().collect()));
//! let mut exchange = BbrExchange::new(models, None, 1 << 20);
//! let path = HeaderValue { key: ":path".into(), value: "/v1/completions".into(), ..Default::default() };
//! let headers = HttpHeaders { headers: Some(HeaderMap { headers: vec![path] }), ..Default::default() };
//! let body = HttpBody { body: br#"{"model":"sql-lora","prompt":"hi"}"#.to_vec(), end_of_stream: true, ..Default::default() };
//! let mut out = Vec::new();
//! for request in [Request::RequestHeaders(headers), Request::RequestBody(body)] {
//!     exchange.handle(ProcessingRequest { request: Some(request), ..Default::default() }, &mut out);
//! }
//! let Some(Response::RequestHeaders(answer)) = &out[0].response else { unreachable!() };
//! let common = answer.response.as_ref().unwrap();
//! assert!(common.clear_route_cache);
//! let set: Vec<_> = common.header_mutation.as_ref().unwrap().set_headers.iter()
//!     .map(|option| option.header.as_ref().unwrap())
//!     .map(|header| (header.key.as_str(), String::from_utf8_lossy(&header.raw_value).into_owned()))
//!     .collect();
//! assert_eq!(set, [
//!     ("x-gateway-model-name", "sql-lora".to_owned()),
//!     ("x-gateway-base-model-name", "llama-8b".to_owned()),
//! ]);
//! ```

pub mod adapters_file;
pub mod base_models;
pub mod exchange;
pub mod inference_api;
pub mod metrics;
pub mod models_poller;
pub mod server;
pub mod service;

pub use base_models::{AdapterMap, BaseModels};
pub use exchange::{BbrExchange, BbrPhase};
pub use metrics::{BbrMetrics, Outcome};
pub use server::{BbrConfig, BbrError, RunningBbr, start};
pub use service::BbrExtProc;

/// Header set to the model as the client named it.
pub const MODEL_NAME_HEADER: &str = "x-gateway-model-name";
/// Header set to the model's base model (the model itself unless it is a known adapter).
pub const BASE_MODEL_NAME_HEADER: &str = "x-gateway-base-model-name";
/// Longest model name accepted from a request body or learned from a model server: names go
/// into request headers, which proxies bound.
pub const MAX_MODEL_NAME_BYTES: usize = 1024;
/// Default port of `epp bbr`'s ext-proc service (the Go body-based router's).
pub const DEFAULT_GRPC_PORT: u16 = 9004;
/// Default port of `epp bbr`'s gRPC health service.
pub const DEFAULT_GRPC_HEALTH_PORT: u16 = 9005;
