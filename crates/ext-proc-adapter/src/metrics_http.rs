//! The `/metrics` HTTP endpoint (Prometheus text format).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use scheduler_core::Director;
use tokio::net::TcpListener;

use crate::metrics::EppMetrics;

/// Serves `/metrics` on `listener` until the future is dropped.
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<EppMetrics>,
    director: Arc<Director>,
) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(connection) => connection,
            Err(error) => {
                tracing::warn!(%error, "metrics listener accept failed");
                continue;
            }
        };
        let metrics = Arc::clone(&metrics);
        let director = Arc::clone(&director);
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = answer(&request, &metrics, &director);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(error) =
                http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
            {
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
