//! The `envoy.service.ext_proc.v3.ExternalProcessor` gRPC service: one task per stream driving
//! an [`Exchange`], answers sent through a bounded channel.
//!
//! The stream loop is shared with the body-based router: anything that handles one stream's
//! messages as a `StreamExchange` gets the same timeouts and back-pressure.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::exchange::Exchange;
use crate::metrics::EppMetrics;
use scheduler_core::Director;

/// Answers buffered per stream before the task waits for the proxy to read them.
const STREAM_CHANNEL_CAPACITY: usize = 32;

/// Stream-level limits.
#[derive(Clone, Copy, Debug)]
pub struct StreamLimits {
    /// Longest wait for the proxy's next message before the routing decision (headers or
    /// body never completing); the stream is then ended with `DEADLINE_EXCEEDED` and its
    /// state freed. Once routed, a stream may wait as long as the response takes.
    pub request_idle_timeout: Duration,
    /// Longest time from the stream's opening until its routing decision is sent, whatever
    /// arrives meanwhile: a proxy that trickles headers or body, or a request waiting in flow
    /// control's queue, has its stream ended with `DEADLINE_EXCEEDED` and everything it held
    /// (buffered body, queue place) released. Keep it above flow control's
    /// `defaultRequestTTL`, so queued requests get flow control's own answer first.
    pub decision_timeout: Duration,
    /// Fallback endpoints emitted after the primary in the destination header and metadata
    /// (0: one `ip:port`, which every proxy parses; fallbacks are opt-in).
    pub max_fallback_endpoints: usize,
    /// Also emit the scheduler's score of each destination endpoint, in the `envoy.lb`
    /// metadata under `x-gateway-destination-endpoint-scores` (off by default).
    pub emit_endpoint_scores: bool,
}

/// Default [`StreamLimits::request_idle_timeout`].
pub const DEFAULT_REQUEST_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default [`StreamLimits::decision_timeout`]: flow control's default TTL (60 s) plus time to
/// receive a large body.
pub const DEFAULT_DECISION_TIMEOUT: Duration = Duration::from_secs(90);

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            request_idle_timeout: DEFAULT_REQUEST_IDLE_TIMEOUT,
            decision_timeout: DEFAULT_DECISION_TIMEOUT,
            max_fallback_endpoints: 0,
            emit_endpoint_scores: false,
        }
    }
}

/// The ext-proc service.
#[derive(Clone, Debug)]
pub struct EppExtProc {
    director: Arc<Director>,
    metrics: Option<Arc<EppMetrics>>,
    limits: StreamLimits,
}

impl EppExtProc {
    /// A service deciding with `director`, recording into `metrics`.
    pub fn new(
        director: Arc<Director>,
        metrics: Option<Arc<EppMetrics>>,
        limits: StreamLimits,
    ) -> Self {
        Self { director, metrics, limits }
    }

    /// The tonic server wrapper, with gRPC message size bounded by `max_message_bytes`.
    pub fn into_server(self, max_message_bytes: usize) -> ExternalProcessorServer<Self> {
        ExternalProcessorServer::new(self)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes)
    }
}

/// The answers of one ext-proc stream, as tonic sends them.
pub(crate) type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

/// One ext-proc stream's state machine, as [`drive`] runs it.
pub(crate) trait StreamExchange: Send + 'static {
    /// Handles one message from the proxy and pushes the answers onto `out`.
    fn handle(
        &mut self,
        message: ProcessingRequest,
        out: &mut Vec<ProcessingResponse>,
    ) -> impl Future<Output = ()> + Send;
    /// Whether the request headers are still unanswered (the idle and decision timeouts
    /// apply only then: a response may legitimately take long).
    fn is_before_decision(&self) -> bool;
    /// Whether the stream has nothing more to do.
    fn is_done(&self) -> bool;
    /// Completes when flow control evicts the request in flight (default: never).
    fn evicted(&self) -> impl Future<Output = ()> + Send + '_ {
        std::future::pending()
    }
    /// Pushes the answer ending an evicted request onto `out`.
    fn on_evicted(&mut self, _out: &mut Vec<ProcessingResponse>) {}
    /// The request id for log lines, bounded (default: none).
    fn request_id(&self) -> &str {
        ""
    }
}

impl StreamExchange for Exchange {
    fn handle(
        &mut self,
        message: ProcessingRequest,
        out: &mut Vec<ProcessingResponse>,
    ) -> impl Future<Output = ()> + Send {
        Exchange::handle(self, message, out)
    }

    fn is_before_decision(&self) -> bool {
        Exchange::is_before_decision(self)
    }

    fn is_done(&self) -> bool {
        self.phase() == crate::exchange::Phase::Done
    }

    fn evicted(&self) -> impl Future<Output = ()> + Send + '_ {
        Exchange::evicted(self)
    }

    fn on_evicted(&mut self, out: &mut Vec<ProcessingResponse>) {
        Exchange::on_evicted(self, out);
    }

    fn request_id(&self) -> &str {
        Exchange::request_id(self)
    }
}

/// Starts the task driving one stream and returns the stream of its answers.
pub(crate) fn spawn_stream<E: StreamExchange>(
    exchange: E,
    inbound: Streaming<ProcessingRequest>,
    limits: StreamLimits,
) -> ResponseStream {
    let (sender, receiver) = mpsc::channel(STREAM_CHANNEL_CAPACITY);
    tokio::spawn(drive(exchange, inbound, sender, limits));
    Box::pin(ReceiverStream::new(receiver))
}

#[tonic::async_trait]
impl ExternalProcessor for EppExtProc {
    type ProcessStream = ResponseStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let exchange = Exchange::new(Arc::clone(&self.director), self.metrics.clone())
            .with_max_fallback_endpoints(self.limits.max_fallback_endpoints)
            .with_endpoint_scores(self.limits.emit_endpoint_scores);
        Ok(Response::new(spawn_stream(exchange, request.into_inner(), self.limits)))
    }
}

/// Runs one stream to its end. Returning drops the exchange, which runs the completion hooks
/// of an unfinished request as cancelled: stream ended early, proxy reset, idle timeout or
/// decision timeout.
async fn drive<E: StreamExchange>(
    mut exchange: E,
    mut inbound: Streaming<ProcessingRequest>,
    sender: mpsc::Sender<Result<ProcessingResponse, Status>>,
    limits: StreamLimits,
) {
    let decision_deadline = Instant::now() + limits.decision_timeout;
    let past_deadline = || {
        Status::deadline_exceeded(format!(
            "no routing decision within {:?} of the stream opening",
            limits.decision_timeout
        ))
    };
    let mut answers = Vec::with_capacity(4);
    loop {
        let before_decision = exchange.is_before_decision();
        let next = if before_decision {
            let idle_until = Instant::now() + limits.request_idle_timeout;
            let until = idle_until.min(decision_deadline);
            match tokio::time::timeout_at(until, inbound.message()).await {
                Ok(next) => next,
                Err(_) => {
                    let status = if until == decision_deadline {
                        tracing::debug!(
                            request_id = exchange.request_id(),
                            "ext-proc stream not routed in time; closing"
                        );
                        past_deadline()
                    } else {
                        tracing::debug!(
                            request_id = exchange.request_id(),
                            "ext-proc stream idle before its routing decision; closing"
                        );
                        Status::deadline_exceeded("request idle before routing")
                    };
                    let _ = sender.send(Err(status)).await;
                    return;
                }
            }
        } else {
            // Routed: the request may be evicted while the proxy streams it.
            tokio::select! {
                next = inbound.message() => next,
                () = exchange.evicted() => {
                    exchange.on_evicted(&mut answers);
                    for answer in answers.drain(..) {
                        let _ = sender.send(Ok(answer)).await;
                    }
                    return;
                }
            }
        };
        let message = match next {
            Ok(Some(message)) => message,
            Ok(None) => return,
            Err(status) => {
                tracing::debug!(
                    request_id = exchange.request_id(),
                    %status,
                    "ext-proc stream ended by the proxy"
                );
                return;
            }
        };
        // A decision may wait in flow control's queue. If the proxy goes away meanwhile (stream
        // reset, client gone), tonic drops the response stream: stop waiting, which drops the
        // queue ticket and frees the place at once instead of at the TTL. The decision
        // deadline bounds the wait too.
        tokio::select! {
            () = exchange.handle(message, &mut answers) => {}
            () = sender.closed() => {
                tracing::debug!(
                    request_id = exchange.request_id(),
                    "ext-proc stream closed by the proxy while its request waited"
                );
                return;
            }
            () = tokio::time::sleep_until(decision_deadline), if before_decision => {
                tracing::debug!(
                    request_id = exchange.request_id(),
                    "ext-proc request not routed in time while it waited; closing"
                );
                let _ = sender.send(Err(past_deadline())).await;
                return;
            }
        }
        for answer in answers.drain(..) {
            if sender.send(Ok(answer)).await.is_err() {
                return;
            }
        }
        if exchange.is_done() {
            return;
        }
    }
}
