//! The proxy's side of the ext-proc protocol, as Envoy drives it in full-duplex streamed mode:
//! for the demo's proxy, the load generator, and tests of pickers.
//!
//! One stream per request: headers and every body chunk are sent without waiting for answers;
//! the picker's answers are then read until the decision (route or immediate response) and the
//! echoed body are complete. The header and metadata names are the Gateway API Inference
//! Extension's; the proxy reads the destination as the picker writes it, a comma-separated
//! list of `ip:port` whose first entry is the primary.

use std::net::SocketAddr;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, ImmediateResponse, ProcessingRequest, ProcessingResponse, body_mutation,
    processing_request, processing_response,
};
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use scheduler_core::protocol;

/// What the picker decided for a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Routed: the destination header, the same value from dynamic metadata, and the request
    /// body as streamed back.
    Routed {
        /// `x-gateway-destination-endpoint` header value.
        destination: String,
        /// `envoy.lb` / `x-gateway-destination-endpoint` metadata value.
        metadata_destination: String,
        /// The body streamed back.
        body: Vec<u8>,
        /// The other headers the picker set on the request (name, value), in its order.
        headers: Vec<(String, String)>,
    },
    /// Answered by the picker.
    Immediate {
        /// HTTP status.
        status: u16,
        /// Response body.
        body: Vec<u8>,
        /// Response headers the picker set (name, value), `content-type` included.
        headers: Vec<(String, String)>,
    },
}

/// Why a proxy-side exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The gRPC call failed.
    #[error("ext-proc stream failed: {0}")]
    Status(#[from] Status),
    /// The picker closed the stream.
    #[error("the picker closed the stream before {0}")]
    Closed(&'static str),
    /// The stream's send side is gone.
    #[error("the stream's send side is closed")]
    SendClosed,
}

/// One request's ext-proc stream, proxy side.
#[derive(Debug)]
pub struct ProxyStream {
    sender: mpsc::Sender<ProcessingRequest>,
    answers: Streaming<ProcessingResponse>,
    /// The headers the picker set on the response, from its answer to the response headers.
    response_headers_set: Vec<(String, String)>,
    /// The dynamic metadata the picker put on its answers to the response body.
    response_metadata: Option<Struct>,
}

/// The request side of a proxy exchange.
#[derive(Clone, Debug, Default)]
pub struct ProxyRequest<'a> {
    /// Header pairs (`:path`, `content-type`, the objective header, ...).
    pub headers: Vec<(&'a str, &'a str)>,
    /// The body.
    pub body: &'a [u8],
    /// Bytes per body message (0: the whole body in one message).
    pub chunk_bytes: usize,
    /// The subset hint, if any.
    pub subset: Option<Vec<String>>,
}

impl ProxyStream {
    /// Opens a stream on `client`.
    pub async fn open(client: &mut ExternalProcessorClient<Channel>) -> Result<Self, ClientError> {
        let (sender, receiver) = mpsc::channel(64);
        let answers = client.process(ReceiverStream::new(receiver)).await?.into_inner();
        Ok(Self { sender, answers, response_headers_set: Vec::new(), response_metadata: None })
    }

    /// Sends the request headers; `end_of_stream` says the request has no body.
    pub async fn send_headers(
        &self,
        headers: &[(&str, &str)],
        end_of_stream: bool,
        subset: Option<&[String]>,
    ) -> Result<(), ClientError> {
        let headers = HttpHeaders {
            headers: Some(header_map(headers)),
            end_of_stream,
            ..HttpHeaders::default()
        };
        self.send(ProcessingRequest {
            request: Some(processing_request::Request::RequestHeaders(headers)),
            metadata_context: subset.map(subset_metadata),
            ..ProcessingRequest::default()
        })
        .await
    }

    /// Sends the request headers and body without waiting for answers.
    pub async fn send_request(&self, request: &ProxyRequest<'_>) -> Result<(), ClientError> {
        self.send_headers(&request.headers, request.body.is_empty(), request.subset.as_deref())
            .await?;
        if request.body.is_empty() {
            return Ok(());
        }
        let chunk = if request.chunk_bytes == 0 { request.body.len() } else { request.chunk_bytes };
        let pieces = request.body.len().div_ceil(chunk);
        for (index, piece) in request.body.chunks(chunk).enumerate() {
            self.send_body(true, piece.to_vec(), index + 1 == pieces).await?;
        }
        Ok(())
    }

    /// Sends one body chunk.
    pub async fn send_body(
        &self,
        request_side: bool,
        body: Vec<u8>,
        end_of_stream: bool,
    ) -> Result<(), ClientError> {
        let body = HttpBody { body, end_of_stream, ..HttpBody::default() };
        self.send(ProcessingRequest {
            request: Some(if request_side {
                processing_request::Request::RequestBody(body)
            } else {
                processing_request::Request::ResponseBody(body)
            }),
            ..ProcessingRequest::default()
        })
        .await
    }

    /// Reads answers until the decision and the whole echoed body are in.
    pub async fn decision(&mut self) -> Result<Decision, ClientError> {
        // Destination header, metadata destination, other headers set.
        type Route = (String, String, Vec<(String, String)>);
        let mut routed: Option<Route> = None;
        let mut body = Vec::new();
        loop {
            let answer =
                self.answers.message().await?.ok_or(ClientError::Closed("the decision"))?;
            match answer.response {
                Some(processing_response::Response::ImmediateResponse(immediate)) => {
                    return Ok(immediate_decision(immediate));
                }
                Some(processing_response::Response::RequestHeaders(headers)) => {
                    let mut destination = String::new();
                    let mut others = Vec::new();
                    let set = headers.response.and_then(|common| common.header_mutation);
                    for header in
                        set.into_iter().flat_map(|m| m.set_headers).filter_map(|o| o.header)
                    {
                        let value = String::from_utf8_lossy(&header.raw_value).into_owned();
                        if header.key == protocol::DESTINATION_ENDPOINT_HEADER {
                            destination = value;
                        } else {
                            others.push((header.key, value));
                        }
                    }
                    let from_metadata = answer
                        .dynamic_metadata
                        .as_ref()
                        .and_then(|m| m.fields.get(protocol::LB_METADATA_NAMESPACE))
                        .and_then(|v| match &v.kind {
                            Some(Kind::StructValue(lb)) => {
                                lb.fields.get(protocol::DESTINATION_ENDPOINT_HEADER)
                            }
                            _ => None,
                        })
                        .and_then(|v| match &v.kind {
                            Some(Kind::StringValue(text)) => Some(text.clone()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    routed = Some((destination, from_metadata, others));
                }
                Some(processing_response::Response::RequestBody(response)) => {
                    let streamed = response
                        .response
                        .and_then(|common| common.body_mutation)
                        .and_then(|mutation| mutation.mutation);
                    if let Some(body_mutation::Mutation::StreamedResponse(chunk)) = streamed {
                        body.extend_from_slice(&chunk.body);
                        if chunk.end_of_stream {
                            let (destination, metadata_destination, headers) =
                                routed.take().ok_or(ClientError::Closed("the route"))?;
                            return Ok(Decision::Routed {
                                destination,
                                metadata_destination,
                                body,
                                headers,
                            });
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Reads the route answer of a request sent without a body.
    pub async fn headers_only_decision(&mut self) -> Result<Decision, ClientError> {
        let answer = self.answers.message().await?.ok_or(ClientError::Closed("the decision"))?;
        match answer.response {
            Some(processing_response::Response::ImmediateResponse(immediate)) => {
                Ok(immediate_decision(immediate))
            }
            Some(processing_response::Response::RequestHeaders(headers)) => {
                let mut destination = String::new();
                let mut others = Vec::new();
                let set = headers.response.and_then(|common| common.header_mutation);
                for header in set.into_iter().flat_map(|m| m.set_headers).filter_map(|o| o.header) {
                    let value = String::from_utf8_lossy(&header.raw_value).into_owned();
                    if header.key == protocol::DESTINATION_ENDPOINT_HEADER {
                        destination = value;
                    } else {
                        others.push((header.key, value));
                    }
                }
                Ok(Decision::Routed {
                    metadata_destination: destination.clone(),
                    destination,
                    body: Vec::new(),
                    headers: others,
                })
            }
            _ => Err(ClientError::Closed("a headers answer")),
        }
    }

    /// The headers the picker set on the response when it passed (the session token, for
    /// one), after [`Self::respond`].
    pub fn response_headers_set(&self) -> &[(String, String)] {
        &self.response_headers_set
    }

    /// The number the picker reported as `name` under `namespace` in the dynamic metadata of
    /// its answers to the response body (a usage reporter's value), after [`Self::respond`].
    pub fn response_metadata_number(&self, namespace: &str, name: &str) -> Option<f64> {
        let fields = match &self.response_metadata.as_ref()?.fields.get(namespace)?.kind {
            Some(Kind::StructValue(fields)) => fields,
            _ => return None,
        };
        match fields.fields.get(name)?.kind {
            Some(Kind::NumberValue(number)) => Some(number),
            _ => None,
        }
    }

    /// Whether the picker put any dynamic metadata on its answers to the response body.
    pub fn has_response_metadata(&self) -> bool {
        self.response_metadata.is_some()
    }

    /// Sends the response headers (with the served endpoint in metadata) and body chunks, and
    /// reads the echoed answers; returns the echoed body.
    pub async fn respond(
        &mut self,
        served: Option<SocketAddr>,
        chunks: &[&[u8]],
    ) -> Result<Vec<u8>, ClientError> {
        self.respond_with_status(200, served, chunks).await
    }

    /// [`Self::respond`] with the upstream's HTTP `status` in the response headers.
    pub async fn respond_with_status(
        &mut self,
        status: u16,
        served: Option<SocketAddr>,
        chunks: &[&[u8]],
    ) -> Result<Vec<u8>, ClientError> {
        let status = status.to_string();
        let metadata = served.map(|address| {
            let mut lb = Struct::default();
            lb.fields.insert(
                protocol::SERVED_ENDPOINT_KEY.to_owned(),
                Value { kind: Some(Kind::StringValue(address.to_string())) },
            );
            let mut metadata = Metadata::default();
            metadata.filter_metadata.insert(protocol::LB_METADATA_NAMESPACE.to_owned(), lb);
            metadata
        });
        self.send(ProcessingRequest {
            request: Some(processing_request::Request::ResponseHeaders(HttpHeaders {
                headers: Some(header_map(&[(":status", status.as_str())])),
                end_of_stream: chunks.is_empty(),
                ..HttpHeaders::default()
            })),
            metadata_context: metadata,
            ..ProcessingRequest::default()
        })
        .await?;
        for (index, chunk) in chunks.iter().enumerate() {
            self.send_body(false, chunk.to_vec(), index + 1 == chunks.len()).await?;
        }
        let mut echoed = Vec::new();
        let mut ended = chunks.is_empty();
        let mut headers_answered = false;
        while !(ended && headers_answered) {
            let answer =
                self.answers.message().await?.ok_or(ClientError::Closed("the response"))?;
            if let (Some(metadata), Some(processing_response::Response::ResponseBody(_))) =
                (&answer.dynamic_metadata, &answer.response)
            {
                self.response_metadata = Some(metadata.clone());
            }
            match answer.response {
                Some(processing_response::Response::ResponseHeaders(headers)) => {
                    let set = headers.response.and_then(|common| common.header_mutation);
                    self.response_headers_set = set
                        .into_iter()
                        .flat_map(|mutation| mutation.set_headers)
                        .filter_map(|option| option.header)
                        .map(|h| (h.key, String::from_utf8_lossy(&h.raw_value).into_owned()))
                        .collect();
                    headers_answered = true;
                }
                Some(processing_response::Response::ResponseBody(response)) => {
                    if let Some(body_mutation::Mutation::StreamedResponse(chunk)) = response
                        .response
                        .and_then(|common| common.body_mutation)
                        .and_then(|mutation| mutation.mutation)
                    {
                        echoed.extend_from_slice(&chunk.body);
                        ended |= chunk.end_of_stream;
                    }
                }
                _ => {}
            }
        }
        Ok(echoed)
    }

    async fn send(&self, message: ProcessingRequest) -> Result<(), ClientError> {
        self.sender.send(message).await.map_err(|_| ClientError::SendClosed)
    }
}

fn header_map(headers: &[(&str, &str)]) -> HeaderMap {
    HeaderMap {
        headers: headers
            .iter()
            .map(|(key, value)| HeaderValue {
                key: (*key).to_owned(),
                value: String::new(),
                raw_value: value.as_bytes().to_vec(),
            })
            .collect(),
    }
}

fn subset_metadata(subset: &[String]) -> Metadata {
    let list = ListValue {
        values: subset
            .iter()
            .map(|address| Value { kind: Some(Kind::StringValue(address.clone())) })
            .collect(),
    };
    let mut hint = Struct::default();
    hint.fields
        .insert(protocol::SUBSET_HINT_KEY.to_owned(), Value { kind: Some(Kind::ListValue(list)) });
    let mut metadata = Metadata::default();
    metadata.filter_metadata.insert(protocol::SUBSET_HINT_NAMESPACE.to_owned(), hint);
    metadata
}

/// The decision an immediate response makes.
fn immediate_decision(immediate: ImmediateResponse) -> Decision {
    let headers = immediate
        .headers
        .into_iter()
        .flat_map(|mutation| mutation.set_headers)
        .filter_map(|option| option.header)
        .map(|header| (header.key, String::from_utf8_lossy(&header.raw_value).into_owned()))
        .collect();
    Decision::Immediate {
        status: immediate.status.map_or(0, |s| s.code) as u16,
        body: immediate.body,
        headers,
    }
}
