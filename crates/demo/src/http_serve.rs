//! Serving HTTP/1.1 on a loopback listener: the accept loop the simulated model servers and
//! the decode-side sidecar share.

use std::convert::Infallible;
use std::error::Error;
use std::future::Future;
use std::net::SocketAddr;

use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Binds `127.0.0.1:0` and answers every connection's requests with `handle` until the
/// returned task is aborted.
pub(crate) async fn serve_loopback<H, F, B>(
    what: &'static str,
    handle: H,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn Error + Send + Sync>>,
{
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let address = listener.local_addr()?;
    let accept = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, what, "accept failed");
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let handle = handle.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let response = handle(request);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                if let Err(error) =
                    http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
                {
                    tracing::debug!(%error, what, "connection ended with an error");
                }
            });
        }
    });
    Ok((address, accept))
}
