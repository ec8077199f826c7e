//! The floor: a do-nothing ext-proc server that speaks the picker's protocol and buffers the
//! body like the picker, but decides nothing and routes every request to one fixed destination.
//!
//! The load generator measures the picker against it (same protocol, same transport, no
//! decision) so that only the picker's own cost shows in the ratios; tests use it as a stand-in
//! picker. It answers the full-duplex streamed exchange the way the picker does: the route
//! after the last request body chunk, then the body echoed back, then pass-through answers to
//! the response headers and an echo of the response body.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    ProcessingRequest, ProcessingResponse, processing_request,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use ext_proc_proto::{body_chunk, continue_response_headers, route_to};

/// Largest gRPC message accepted, as the picker accepts.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// Answers buffered per stream before the server waits for the proxy to read.
const ANSWER_BUFFER: usize = 32;

/// The do-nothing ext-proc service.
#[derive(Clone, Debug)]
pub struct Floor {
    destination: Arc<str>,
}

impl Floor {
    /// A floor routing every request to `destination` (an `ip:port`).
    pub fn new(destination: impl Into<Arc<str>>) -> Self {
        Self { destination: destination.into() }
    }

    /// Serves on `listener` until the task is dropped or the listener fails. Accepted sockets
    /// get `TCP_NODELAY`, as `epp`'s do: with Nagle's algorithm and delayed ACKs a small answer
    /// can wait milliseconds, which would make the floor slower than the server it bounds.
    pub async fn serve(self, listener: TcpListener) -> Result<(), tonic::transport::Error> {
        tonic::transport::Server::builder()
            .add_service(
                ExternalProcessorServer::new(self)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            )
            .await
    }

    /// Binds `127.0.0.1:0` and serves in a task; returns the address and the task (abort it to
    /// stop).
    pub async fn start(self) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let address = listener.local_addr()?;
        let task = tokio::spawn(async move {
            if let Err(error) = self.serve(listener).await {
                tracing::warn!(%error, "floor server failed");
            }
        });
        Ok((address, task))
    }
}

#[tonic::async_trait]
impl ExternalProcessor for Floor {
    type ProcessStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let (sender, receiver) = mpsc::channel(ANSWER_BUFFER);
        let destination = Arc::clone(&self.destination);
        tokio::spawn(async move {
            let mut chunks: Vec<Vec<u8>> = Vec::new();
            while let Ok(Some(message)) = inbound.message().await {
                let answers = match message.request {
                    Some(processing_request::Request::RequestHeaders(headers)) => {
                        if headers.end_of_stream {
                            vec![route_to(&destination, &[])]
                        } else {
                            Vec::new()
                        }
                    }
                    Some(processing_request::Request::RequestBody(body)) => {
                        chunks.push(body.body);
                        if !body.end_of_stream {
                            continue;
                        }
                        let count = chunks.len();
                        let mut answers = Vec::with_capacity(count + 1);
                        answers.push(route_to(&destination, &[]));
                        for (index, chunk) in chunks.drain(..).enumerate() {
                            answers.push(body_chunk(true, chunk, index + 1 == count));
                        }
                        answers
                    }
                    Some(processing_request::Request::ResponseHeaders(_)) => {
                        vec![continue_response_headers()]
                    }
                    Some(processing_request::Request::ResponseBody(body)) => {
                        vec![body_chunk(false, body.body, body.end_of_stream)]
                    }
                    _ => Vec::new(),
                };
                for answer in answers {
                    if sender.send(Ok(answer)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;

    use super::*;
    use crate::ext_proc_client::{Decision, ProxyRequest, ProxyStream};

    #[tokio::test]
    async fn routes_echoes_the_body_and_answers_the_response() {
        let (address, task) = Floor::new("10.0.0.1:8000").start().await.unwrap();
        let mut client =
            ExternalProcessorClient::connect(format!("http://{address}")).await.unwrap();
        let body = vec![b'x'; 40_000];
        let mut stream = ProxyStream::open(&mut client).await.unwrap();
        let request = ProxyRequest {
            headers: vec![(":path", "/v1/completions")],
            body: &body,
            chunk_bytes: 16 * 1024,
            subset: None,
        };
        stream.send_request(&request).await.unwrap();
        let expected = Decision::Routed {
            destination: "10.0.0.1:8000".into(),
            metadata_destination: "10.0.0.1:8000".into(),
            body: body.clone(),
            headers: Vec::new(),
        };
        assert_eq!(stream.decision().await.unwrap(), expected);
        let echoed = stream.respond(None, &[b"data: a\n\n", b"data: [DONE]\n\n"]).await.unwrap();
        assert_eq!(echoed, b"data: a\n\ndata: [DONE]\n\n");

        let mut headers_only = ProxyStream::open(&mut client).await.unwrap();
        headers_only.send_headers(&[(":method", "GET")], true, None).await.unwrap();
        assert!(matches!(
            headers_only.headers_only_decision().await.unwrap(),
            Decision::Routed { .. }
        ));
        task.abort();
    }
}
