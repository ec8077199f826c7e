//! The body-based router's `ExternalProcessor` gRPC service: one [`BbrExchange`] per stream,
//! driven by the same loop, timeouts and bounded channel as `epp`'s.

use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use tonic::{Request, Response, Status, Streaming};

use super::base_models::BaseModels;
use super::exchange::BbrExchange;
use super::metrics::BbrMetrics;
use crate::service::{ResponseStream, StreamLimits, spawn_stream};

/// The body-based router's ext-proc service.
#[derive(Clone, Debug)]
pub struct BbrExtProc {
    models: Arc<BaseModels>,
    metrics: Option<Arc<BbrMetrics>>,
    max_body_bytes: usize,
    limits: StreamLimits,
}

impl BbrExtProc {
    /// A service looking base models up in `models`, recording into `metrics`, refusing
    /// request bodies over `max_body_bytes` (413), under `limits` (the idle and decision
    /// timeouts apply until the request headers are answered).
    pub fn new(
        models: Arc<BaseModels>,
        metrics: Option<Arc<BbrMetrics>>,
        max_body_bytes: usize,
        limits: StreamLimits,
    ) -> Self {
        Self { models, metrics, max_body_bytes, limits }
    }

    /// The tonic server wrapper, with gRPC message size bounded by `max_message_bytes`.
    pub fn into_server(self, max_message_bytes: usize) -> ExternalProcessorServer<Self> {
        ExternalProcessorServer::new(self)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes)
    }
}

#[tonic::async_trait]
impl ExternalProcessor for BbrExtProc {
    type ProcessStream = ResponseStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let exchange =
            BbrExchange::new(Arc::clone(&self.models), self.metrics.clone(), self.max_body_bytes);
        Ok(Response::new(spawn_stream(exchange, request.into_inner(), self.limits)))
    }
}
