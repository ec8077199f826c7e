//! The model server over HTTP/1.1: `POST /v1/completions` and `/v1/chat/completions` (SSE
//! when `stream` is set, one JSON body otherwise), `GET /metrics` and `GET /health`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use super::ModelServerConfig;
use super::{CHARS_PER_TOKEN, Job, KvTransfer, MAX_BODY_BYTES, ModelServer, RunningJob};
use crate::http_serve::serve_loopback;

impl ModelServer {
    /// Answers one HTTP request.
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let path = request.uri().path().to_owned();
        match (request.method(), path.as_str()) {
            (&Method::GET, "/metrics") => text_response(StatusCode::OK, self.metrics_text()),
            (&Method::GET, "/health") => text_response(StatusCode::OK, String::new()),
            (&Method::POST, "/v1/completions" | "/v1/chat/completions") => {
                let body = match read_body(request.into_body()).await {
                    Ok(body) => body,
                    Err(status) => return error_response(status, "request body unreadable"),
                };
                match Job::parse(&path, &body) {
                    Ok(job) => self.generate(job).await,
                    Err(message) => error_response(StatusCode::BAD_REQUEST, &message),
                }
            }
            _ => error_response(StatusCode::NOT_FOUND, "no such route"),
        }
    }

    /// Runs `job`: an SSE stream whose chunks follow the simulated timing, or one JSON body
    /// after the whole generation.
    pub async fn generate(self: Arc<Self>, job: Job) -> Response<Body> {
        if job.stream {
            let (sender, receiver) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
            tokio::spawn(async move {
                let Some(running) = self.admit(&job).await else { return };
                stream_tokens(&self, &job, &running, &sender).await;
            });
            let body = StreamBody::new(ReceiverStream::new(receiver)).boxed();
            let mut response = Response::new(body);
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/event-stream"),
            );
            return response;
        }
        let Some(running) = self.admit(&job).await else {
            return error_response(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
        };
        self.until_first_token(&running).await;
        self.decode(job.max_tokens).await;
        let prompt_blocks = running.prompt_blocks;
        drop(running);
        let text = "tok ".repeat(job.max_tokens as usize);
        let choice = if job.chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
        } else {
            json!({"index": 0, "text": text, "finish_reason": "length"})
        };
        let mut body = json!({
            "id": "sim",
            "object": if job.chat { "chat.completion" } else { "text_completion" },
            "model": job.model,
            "choices": [choice],
            "usage": usage(&job),
        });
        if job.kv_transfer == KvTransfer::PrefillForRemoteDecode {
            // The handle a decode server pulls the blocks with, in the NIXL connector's shape.
            body["kv_transfer_params"] = json!({
                "do_remote_prefill": true,
                "do_remote_decode": false,
                "remote_block_ids": (0..prompt_blocks).collect::<Vec<_>>(),
                "remote_engine_id": "sim",
            });
        }
        json_response(StatusCode::OK, body.to_string())
    }
}

fn usage(job: &Job) -> serde_json::Value {
    let prompt_tokens = job.prompt.len().div_ceil(CHARS_PER_TOKEN);
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": job.max_tokens,
        "total_tokens": prompt_tokens as u64 + u64::from(job.max_tokens),
    })
}

async fn stream_tokens(
    server: &ModelServer,
    job: &Job,
    running: &RunningJob,
    sender: &mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
) {
    let object = if job.chat { "chat.completion.chunk" } else { "text_completion" };
    let chunk = |text: &str, finish: Option<&str>| {
        let choice = if job.chat {
            json!({"index": 0, "delta": {"content": text}, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": text, "finish_reason": finish})
        };
        json!({"id": "sim", "object": object, "model": job.model, "choices": [choice]})
    };
    let send = |value: String| {
        let sender = sender.clone();
        async move { sender.send(Ok(Frame::data(Bytes::from(value)))).await.is_ok() }
    };
    server.until_first_token(running).await;
    server.decode(1).await;
    if !send(format!("data: {}\n\n", chunk("tok ", None))).await {
        return;
    }
    let mut left = job.max_tokens.saturating_sub(1);
    let per_chunk = server.config.tokens_per_chunk.max(1);
    while left > 0 {
        let tokens = left.min(per_chunk);
        server.decode(tokens).await;
        left -= tokens;
        if !send(format!("data: {}\n\n", chunk(&"tok ".repeat(tokens as usize), None))).await {
            return;
        }
    }
    let mut last = chunk("", Some("length"));
    last["usage"] = usage(job);
    let _ = send(format!("data: {last}\n\ndata: [DONE]\n\n")).await;
}

/// Response body of the simulated server.
pub type Body = BoxBody<Bytes, Infallible>;

async fn read_body(body: Incoming) -> Result<Bytes, StatusCode> {
    let limited = http_body_util::Limited::new(body, MAX_BODY_BYTES);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(_) => Err(StatusCode::PAYLOAD_TOO_LARGE),
    }
}

fn text_response(status: StatusCode, text: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(text)).boxed());
    *response.status_mut() = status;
    response
}

fn json_response(status: StatusCode, json: String) -> Response<Body> {
    let mut response = text_response(status, json);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn error_response(status: StatusCode, message: &str) -> Response<Body> {
    json_response(
        status,
        json!({"error": {"message": message, "code": status.as_u16()}}).to_string(),
    )
}

/// A simulated server listening on loopback.
#[derive(Debug)]
pub struct RunningModelServer {
    /// Where it listens.
    pub address: SocketAddr,
    /// Its state, for the report.
    pub server: Arc<ModelServer>,
    accept: JoinHandle<()>,
}

impl RunningModelServer {
    /// Binds `127.0.0.1:0` and serves until [`RunningModelServer::stop`].
    pub async fn start(config: ModelServerConfig) -> std::io::Result<Self> {
        let server = ModelServer::new(config);
        let handler = Arc::clone(&server);
        let (address, accept) = serve_loopback("simulated model server", move |request| {
            Arc::clone(&handler).handle(request)
        })
        .await?;
        Ok(Self { address, server, accept })
    }

    /// Stops accepting connections (open ones finish on their own); dropping it does too.
    pub fn stop(&self) {
        self.accept.abort();
    }
}

impl Drop for RunningModelServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{parse_vllm_metrics, quick};
    use super::*;
    use crate::http_client::{get_text, post};

    #[tokio::test]
    async fn speaks_openai_over_http_streamed_and_not() {
        let running = RunningModelServer::start(quick(2)).await.unwrap();
        let streamed = br#"{"model":"llama-3-8b","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":20}"#;
        let response =
            post(running.address, "/v1/chat/completions", streamed.to_vec()).await.unwrap();
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(text.starts_with("data: {"), "{text}");
        assert!(text.ends_with("}}\n\ndata: [DONE]\n\n"), "{text}");
        assert!(text.contains("\"usage\":{\"completion_tokens\":20,"), "{text}");
        assert_eq!(
            text.matches("data: ").count(),
            1 + 3 + 1 + 1,
            "first token, 19 in 3 chunks, usage, done"
        );

        let plain = br#"{"model":"llama-3-8b","prompt":"hello","max_tokens":3}"#;
        let response = post(running.address, "/v1/completions", plain.to_vec()).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["usage"]["completion_tokens"], 3);
        assert_eq!(json["choices"][0]["text"], "tok tok tok ");

        let bad = post(running.address, "/v1/completions", b"{not json".to_vec()).await.unwrap();
        assert_eq!(bad.status(), 400);
        let metrics = get_text(running.address, "/metrics").await.unwrap();
        assert!(parse_vllm_metrics(&metrics).is_some());
        assert_eq!(running.server.stats().served, 2);
        running.stop();
    }
}
