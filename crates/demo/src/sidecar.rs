//! The decode side of prefill/decode disaggregation: a small routing sidecar in front of a
//! simulated decode server, doing what llm-d's sidecar does beside vLLM.
//!
//! The picker routes a disaggregated request to the decode endpoint (this sidecar) and names
//! the prefill endpoint in `x-prefiller-host-port`. The sidecar then
//! 1. sends the request to that prefill server as a prefill-only request (`max_tokens: 1`,
//!    not streamed, `kv_transfer_params.do_remote_decode: true`);
//! 2. copies the `kv_transfer_params` of the prefill's answer (the handle of its KV blocks)
//!    into the original request and sends that to its decode server, which pulls the blocks
//!    instead of computing them, and streams the answer back.
//!
//! A request without the header goes to the decode server unchanged (the picker decided
//! against disaggregating it). When the prefill server cannot be used (unreachable, an error
//! status, an answer without a handle), the decode server computes the prompt itself: the
//! client still gets its answer, and [`SidecarStats::fallbacks`] counts the miss. A header
//! that is not `host:port` is the caller's error: 400, naming the header.
//!
//! Every other request (`/metrics`, `/health`) is passed through, so the picker scrapes the
//! decode server at the sidecar's address as it would a pod's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use scheduler_core::protocol::PREFILL_ENDPOINT_HEADER;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::http_client::{HttpError, post, send};
use crate::http_serve::serve_loopback;

/// Largest request body the sidecar reads, and largest prefill answer.
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Body of the sidecar's answers: the decode server's, passed through, or its own.
pub type SidecarBody = BoxBody<Bytes, hyper::Error>;

/// What the sidecar did, since start.
#[derive(Debug, Default)]
pub struct SidecarStats {
    /// Requests prefilled on a prefill server, then decoded here.
    pub remote_prefills: AtomicU64,
    /// Requests the picker did not disaggregate.
    pub local: AtomicU64,
    /// Disaggregated requests whose prefill server could not be used; decoded here in full.
    pub fallbacks: AtomicU64,
}

/// Why a remote prefill could not be used.
#[derive(Debug, thiserror::Error)]
enum PrefillError {
    #[error("the request body is not a JSON object")]
    NotAnObject,
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("prefill server {0} answered {1}")]
    Status(SocketAddr, StatusCode),
    #[error("prefill answer unreadable: {0}")]
    Body(String),
    #[error("prefill answer carries no kv_transfer_params")]
    NoHandle,
}

/// A sidecar listening on loopback in front of one decode server.
#[derive(Debug)]
pub struct RunningSidecar {
    /// Where it listens: the decode endpoint the picker sees.
    pub address: SocketAddr,
    /// The decode server behind it.
    pub decode: SocketAddr,
    /// What it did.
    pub stats: Arc<SidecarStats>,
    accept: JoinHandle<()>,
}

impl RunningSidecar {
    /// Binds `127.0.0.1:0` in front of the decode server at `decode`.
    pub async fn start(decode: SocketAddr) -> std::io::Result<Self> {
        let stats = Arc::new(SidecarStats::default());
        let shared = Arc::clone(&stats);
        let (address, accept) = serve_loopback("decode sidecar", move |request| {
            handle(decode, Arc::clone(&shared), request)
        })
        .await?;
        Ok(Self { address, decode, stats, accept })
    }

    /// Stops accepting connections.
    pub fn stop(&self) {
        self.accept.abort();
    }
}

impl Drop for RunningSidecar {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn handle(
    decode: SocketAddr,
    stats: Arc<SidecarStats>,
    request: Request<Incoming>,
) -> Response<SidecarBody> {
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return answer(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
    };
    let path = parts.uri.path().to_owned();
    let generation = parts.method == Method::POST
        && matches!(path.as_str(), "/v1/completions" | "/v1/chat/completions");
    let mut body = body.to_vec();
    if generation {
        match parts.headers.get(PREFILL_ENDPOINT_HEADER) {
            None => {
                stats.local.fetch_add(1, Ordering::Relaxed);
            }
            Some(value) => {
                let Some(prefiller) = value.to_str().ok().and_then(|v| v.trim().parse().ok())
                else {
                    return answer(
                        StatusCode::BAD_REQUEST,
                        &format!("{PREFILL_ENDPOINT_HEADER} must be host:port"),
                    );
                };
                match prefill_remotely(prefiller, &path, &body).await {
                    Ok(handed_off) => {
                        body = handed_off;
                        stats.remote_prefills.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => {
                        tracing::warn!(%error, %prefiller, "remote prefill failed; prefilling locally");
                        stats.fallbacks.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
    let forwarded = if generation {
        post(decode, &path, body).await
    } else {
        match Request::builder()
            .method(parts.method)
            .uri(path.as_str())
            .header(hyper::header::HOST, decode.to_string())
            .body(Full::new(Bytes::from(body)))
        {
            Ok(request) => send(decode, request).await,
            Err(error) => return answer(StatusCode::BAD_REQUEST, &error.to_string()),
        }
    };
    match forwarded {
        Ok(response) => response.map(BodyExt::boxed),
        Err(error) => answer(StatusCode::BAD_GATEWAY, &error.to_string()),
    }
}

/// Runs the prompt of `body` on `prefiller` as a prefill-only request and returns `body` with
/// the handle of the computed blocks, for the decode server to pull them.
async fn prefill_remotely(
    prefiller: SocketAddr,
    path: &str,
    body: &[u8],
) -> Result<Vec<u8>, PrefillError> {
    let mut request: Value = serde_json::from_slice(body).map_err(|_| PrefillError::NotAnObject)?;
    let Value::Object(fields) = &request else { return Err(PrefillError::NotAnObject) };
    let mut prefill = fields.clone();
    prefill.insert("max_tokens".into(), json!(1));
    if prefill.contains_key("max_completion_tokens") {
        prefill.insert("max_completion_tokens".into(), json!(1));
    }
    prefill.insert("stream".into(), json!(false));
    prefill.remove("stream_options");
    prefill.insert(
        "kv_transfer_params".into(),
        json!({"do_remote_decode": true, "do_remote_prefill": false}),
    );
    let prefill = serde_json::to_vec(&prefill).map_err(|e| PrefillError::Body(e.to_string()))?;
    let response = post(prefiller, path, prefill).await?;
    if response.status() != StatusCode::OK {
        return Err(PrefillError::Status(prefiller, response.status()));
    }
    let answer = Limited::new(response.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|error| PrefillError::Body(error.to_string()))?
        .to_bytes();
    let answer: Value =
        serde_json::from_slice(&answer).map_err(|error| PrefillError::Body(error.to_string()))?;
    let handle = match answer.get("kv_transfer_params") {
        Some(handle @ Value::Object(_)) => handle.clone(),
        _ => return Err(PrefillError::NoHandle),
    };
    request["kv_transfer_params"] = handle;
    serde_json::to_vec(&request).map_err(|error| PrefillError::Body(error.to_string()))
}

fn answer(status: StatusCode, message: &str) -> Response<SidecarBody> {
    let body = json!({"error": {"message": message, "code": status.as_u16()}}).to_string();
    let mut response =
        Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::http_client::get_text;
    use crate::model_server::{ModelServerConfig, RunningModelServer};

    fn config() -> ModelServerConfig {
        ModelServerConfig {
            decode_per_token: Duration::from_micros(10),
            prefill_per_block: Duration::from_micros(50),
            ..ModelServerConfig::default()
        }
    }

    async fn text(response: Response<Incoming>) -> (StatusCode, String) {
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    async fn post_with(
        address: SocketAddr,
        header: Option<&str>,
        body: &str,
    ) -> (StatusCode, String) {
        let mut request = Request::post("/v1/completions")
            .header(hyper::header::HOST, address.to_string())
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(value) = header {
            request = request.header(PREFILL_ENDPOINT_HEADER, value);
        }
        let request = request.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
        text(send(address, request).await.unwrap()).await
    }

    #[tokio::test]
    async fn a_named_prefiller_computes_the_prompt_and_the_decode_server_pulls_it() {
        let prefill = RunningModelServer::start(config()).await.unwrap();
        let decode = RunningModelServer::start(config()).await.unwrap();
        let sidecar = RunningSidecar::start(decode.address).await.unwrap();
        let prompt = "word ".repeat(200);
        let body =
            format!(r#"{{"model":"llama-3-8b","prompt":"{prompt}","max_tokens":5,"stream":true}}"#);

        let (status, streamed) =
            post_with(sidecar.address, Some(&prefill.address.to_string()), &body).await;
        assert_eq!(status, StatusCode::OK, "{streamed}");
        assert!(streamed.ends_with("data: [DONE]\n\n"), "the client gets the decode stream");
        let (prefilled, decoded) = (prefill.server.stats(), decode.server.stats());
        assert_eq!(prefilled.prefills_for_remote_decode, 1);
        assert_eq!(prefilled.served, 1);
        // The hasher cuts whole blocks only.
        let blocks = (prompt.len() / crate::model_server::BLOCK_CHARS) as u64;
        assert_eq!(decoded.pulled_blocks, blocks, "every prompt block came from the prefill");
        assert_eq!(decoded.served, 1);
        assert_eq!(sidecar.stats.remote_prefills.load(Ordering::Relaxed), 1);

        // Without the header the decode server serves alone and computes the prompt itself.
        let (status, _) = post_with(sidecar.address, None, &body.replace("word", "other")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(prefill.server.stats().served, 1, "the prefill server saw nothing new");
        assert_eq!(decode.server.stats().pulled_blocks, blocks);
        assert_eq!(sidecar.stats.local.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn an_unusable_prefiller_falls_back_and_a_bad_header_is_refused() {
        let decode = RunningModelServer::start(config()).await.unwrap();
        let sidecar = RunningSidecar::start(decode.address).await.unwrap();
        let body = r#"{"model":"llama-3-8b","prompt":"hello there","max_tokens":3}"#;
        // Nothing listens on port 1: the decode server prefills itself.
        let (status, answer) = post_with(sidecar.address, Some("127.0.0.1:1"), body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(sidecar.stats.fallbacks.load(Ordering::Relaxed), 1);
        assert_eq!(decode.server.stats().pulled_blocks, 0);

        let (status, answer) = post_with(sidecar.address, Some("not an address"), body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(answer.contains(PREFILL_ENDPOINT_HEADER), "{answer}");

        let metrics = get_text(sidecar.address, "/metrics").await.unwrap();
        assert!(metrics.contains("vllm:num_requests_running"), "metrics pass through");
    }
}
