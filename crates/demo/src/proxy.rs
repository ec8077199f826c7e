//! A small Envoy-like proxy: asks the picker over ext-proc where each request goes (or rotates
//! endpoints, for the round-robin baseline), forwards it over HTTP/1.1, streams the response
//! back through the picker's response path so its completion hooks run, and times it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use http_body_util::BodyExt;
use scheduler_core::protocol::OBJECTIVE_HEADER;
use tonic::transport::Channel;

use crate::ext_proc_client::{Decision, ProxyRequest, ProxyStream};
use crate::http_client::post_with_headers;
use crate::workload::PlannedRequest;

/// Request body bytes per ext-proc message, as Envoy's default buffer sends them.
pub const BODY_CHUNK_BYTES: usize = 16 * 1024;

/// How the proxy chooses an endpoint.
#[derive(Debug)]
pub enum Routing {
    /// Ask the picker over ext-proc.
    Picker(ExternalProcessorClient<Channel>),
    /// Ask one of several picker replicas over ext-proc, each request the next replica in
    /// turn, as a load-balanced ext-proc service spreads streams: the turns of a conversation
    /// meet different replicas.
    Replicas(Vec<ExternalProcessorClient<Channel>>, AtomicUsize),
    /// Rotate over the endpoints, ignoring load and caches.
    RoundRobin(AtomicUsize),
}

/// What happened to one request.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestOutcome {
    /// Position in the workload.
    pub index: usize,
    /// The conversation of the request ([`PlannedRequest::conversation`]).
    pub conversation: usize,
    /// Its turn in the conversation ([`PlannedRequest::turn`]).
    pub turn: usize,
    /// Its objective.
    pub objective: &'static str,
    /// HTTP status the client saw (0 when the proxy failed before any status).
    pub status: u16,
    /// The endpoint that served it.
    pub endpoint: Option<SocketAddr>,
    /// Time to the first response chunk, for streamed requests.
    pub ttft: Option<Duration>,
    /// Output tokens the request asked for.
    pub output_tokens: u32,
    /// Time to the end of the response.
    pub total: Duration,
    /// Time to the routing decision (the picker's overhead as the proxy sees it).
    pub decision: Option<Duration>,
    /// Why the proxy failed, if it did.
    pub error: Option<String>,
}

/// The proxy.
#[derive(Debug)]
pub struct Proxy {
    routing: Routing,
    endpoints: Vec<SocketAddr>,
}

impl Proxy {
    /// A proxy over `endpoints` routing with `routing`.
    pub fn new(routing: Routing, endpoints: Vec<SocketAddr>) -> Self {
        Self { routing, endpoints }
    }

    /// Serves one request end to end; never fails, the outcome says what went wrong.
    pub async fn serve(&self, request: &PlannedRequest) -> RequestOutcome {
        let started = Instant::now();
        let mut outcome = RequestOutcome {
            index: request.index,
            conversation: request.conversation,
            turn: request.turn,
            objective: request.objective,
            status: 0,
            endpoint: None,
            ttft: None,
            output_tokens: request.max_tokens,
            total: Duration::ZERO,
            decision: None,
            error: None,
        };
        if let Err(error) = self.serve_inner(request, started, &mut outcome).await {
            outcome.error = Some(error);
        }
        outcome.total = started.elapsed();
        outcome
    }

    /// The picker to ask for the next request; `None` when the proxy routes by itself.
    fn picker(&self) -> Option<&ExternalProcessorClient<Channel>> {
        match &self.routing {
            Routing::RoundRobin(_) => None,
            Routing::Picker(client) => Some(client),
            Routing::Replicas(clients, next) => {
                clients.get(next.fetch_add(1, Ordering::Relaxed) % clients.len().max(1))
            }
        }
    }

    async fn serve_inner(
        &self,
        request: &PlannedRequest,
        started: Instant,
        outcome: &mut RequestOutcome,
    ) -> Result<(), String> {
        // The headers the picker set on the request, as Envoy would apply them upstream (the
        // prefill endpoint of a disaggregated request, for one).
        let mut upstream_headers = Vec::new();
        let (address, mut stream) = match self.picker() {
            None => {
                let Routing::RoundRobin(next) = &self.routing else {
                    return Err("no picker replicas".into());
                };
                if self.endpoints.is_empty() {
                    return Err("no endpoints".into());
                }
                let turn = next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
                (self.endpoints[turn], None)
            }
            Some(client) => {
                let mut client = client.clone();
                let stream = ProxyStream::open(&mut client).await.map_err(|e| e.to_string())?;
                stream
                    .send_request(&ProxyRequest {
                        headers: vec![
                            (":method", "POST"),
                            (":path", request.path),
                            (":authority", "epp-demo"),
                            ("content-type", "application/json"),
                            (OBJECTIVE_HEADER, request.objective),
                        ],
                        body: &request.body,
                        chunk_bytes: BODY_CHUNK_BYTES,
                        subset: None,
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                let mut stream = stream;
                let decision = stream.decision().await.map_err(|e| e.to_string())?;
                outcome.decision = Some(started.elapsed());
                match decision {
                    Decision::Immediate { status, .. } => {
                        outcome.status = status;
                        return Ok(());
                    }
                    Decision::Routed { destination, headers, .. } => {
                        upstream_headers = headers
                            .into_iter()
                            .filter(|(name, _)| {
                                !name.starts_with(':')
                                    && !name.eq_ignore_ascii_case("content-length")
                            })
                            .collect();
                        let primary = destination.split(',').next().unwrap_or_default();
                        let address = primary
                            .parse()
                            .map_err(|_| format!("unusable destination '{destination}'"))?;
                        (address, Some(stream))
                    }
                }
            }
        };
        outcome.endpoint = Some(address);
        let response =
            post_with_headers(address, request.path, request.body.clone(), &upstream_headers)
                .await
                .map_err(|e| e.to_string())?;
        outcome.status = response.status().as_u16();
        let mut body = response.into_body();
        let mut chunks: Vec<Bytes> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("response body failed: {e}"))?;
            if let Ok(data) = frame.into_data() {
                if request.stream && outcome.ttft.is_none() && !data.is_empty() {
                    outcome.ttft = Some(started.elapsed());
                }
                chunks.push(data);
            }
        }
        if let Some(stream) = stream.as_mut() {
            let slices: Vec<&[u8]> = chunks.iter().map(|chunk| chunk.as_ref()).collect();
            stream.respond(Some(address), &slices).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}
