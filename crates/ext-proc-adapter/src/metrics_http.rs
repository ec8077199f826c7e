//! The `/metrics` HTTP endpoint (Prometheus text format), for `epp` and `epp bbr`: each
//! passes the function that renders its page.

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

/// Renders the `/metrics` page at each scrape.
pub(crate) type RenderPage = Arc<dyn Fn() -> String + Send + Sync>;

/// `epp`'s page: pool, scheduler and admission gauges observed at the scrape, then every
/// metric encoded.
pub(crate) fn epp_page(metrics: Arc<EppMetrics>, director: Arc<Director>) -> RenderPage {
    Arc::new(move || {
        metrics.observe_pool(&director.pool().load(), Instant::now());
        metrics.observe_scheduler(director.scheduler());
        if let Some(admission) = director.admission() {
            metrics.observe_admission(admission);
        }
        metrics.encode()
    })
}

/// Most `/metrics` connections served at once; further ones wait to be accepted.
pub(crate) const MAX_METRICS_CONNECTIONS: usize = 64;
/// How long a connection may take to send its request headers before it is closed.
pub(crate) const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `/metrics` on `listener` until the future is dropped.
pub(crate) async fn serve(listener: TcpListener, render: RenderPage) {
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
        let render = Arc::clone(&render);
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |request: Request<Incoming>| {
                let response = answer(&request, &*render);
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
    render: &(dyn Fn() -> String + Send + Sync),
) -> Response<Full<Bytes>> {
    if request.uri().path() != "/metrics" {
        let mut response = Response::new(Full::new(Bytes::from_static(b"not found\n")));
        *response.status_mut() = StatusCode::NOT_FOUND;
        return response;
    }
    let mut response = Response::new(Full::new(Bytes::from(render())));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
