//! The `/metrics` HTTP endpoint (Prometheus text format).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use scheduler_core::Director;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::metrics::EppMetrics;

/// Serves `/metrics` on `listener` until the future is dropped.
/// Most `/metrics` connections served at once; further ones wait to be accepted.
pub(crate) const MAX_METRICS_CONNECTIONS: usize = 64;
/// How long a connection may take to send its request headers before it is closed.
pub(crate) const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<EppMetrics>,
    director: Arc<Director>,
) {
    let slots = Arc::new(Semaphore::new(MAX_METRICS_CONNECTIONS));
    let mut backoff = Duration::from_millis(5);
    loop {
        // A slot first: beyond the cap, connections wait in the listen backlog instead of
        // each holding a task and a file descriptor.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else { return };
        let (stream, _) = match listener.accept().await {
            Ok(connection) => {
                backoff = Duration::from_millis(5);
                connection
            }
            Err(error) => {
                // Out of file descriptors and the like: retrying at once would spin.
                tracing::warn!(%error, "metrics listener accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let metrics = Arc::clone(&metrics);
        let director = Arc::clone(&director);
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |request: Request<Incoming>| {
                let response = answer(&request, &metrics, &director);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(METRICS_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                tracing::debug!(%error, "metrics connection ended with an error");
            }
        });
    }
}

fn answer(
    request: &Request<Incoming>,
    metrics: &EppMetrics,
    director: &Director,
) -> Response<Full<Bytes>> {
    if request.uri().path() != "/metrics" {
        let mut response = Response::new(Full::new(Bytes::from_static(b"not found\n")));
        *response.status_mut() = StatusCode::NOT_FOUND;
        return response;
    }
    metrics.observe_pool(&director.pool().load(), Instant::now());
    metrics.observe_scheduler(director.scheduler());
    if let Some(admission) = director.admission() {
        metrics.observe_admission(admission);
    }
    let mut response = Response::new(Full::new(Bytes::from(metrics.encode())));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
