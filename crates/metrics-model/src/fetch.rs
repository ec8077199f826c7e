//! One `GET` of a small page over a fresh HTTP/1 connection, plain or TLS: for the data
//! sources polled once per interval per endpoint (model lists, DCGM exporter pages), where a
//! kept-alive connection is not worth its bookkeeping.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{ACCEPT, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::tls::ScrapeTls;

/// Why a page was not fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No TCP connection.
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    /// The TLS handshake failed (an untrusted certificate, a refused client identity).
    #[error("TLS handshake: {0}")]
    Tls(#[source] std::io::Error),
    /// The HTTP exchange failed.
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built (a path that is not a URI path).
    #[error("request: {0}")]
    Request(#[from] hyper::http::Error),
    /// The server answered with an error status.
    #[error("status {0}")]
    Status(StatusCode),
    /// The answer exceeded the limit.
    #[error("answer larger than {limit} bytes")]
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
}

/// What to fetch.
#[derive(Clone, Copy, Debug)]
pub struct PageRequest<'a> {
    /// The server.
    pub address: SocketAddr,
    /// The server's DNS name, when it is known by one: sent as `Host` and checked against its
    /// certificate. `None` uses the IP for both.
    pub host: Option<&'a str>,
    /// The path (and query) requested.
    pub path: &'a str,
    /// The `Accept` header sent.
    pub accept: &'a str,
    /// TLS client configuration; `None` speaks plain HTTP.
    pub tls: Option<&'a ScrapeTls>,
    /// Most bytes of body read; a longer answer is [`FetchError::TooLarge`].
    pub limit: usize,
}

/// `GET request.path` from `request.address`; the body, when the status is a success.
/// The caller bounds the time (a dropped future closes the connection).
pub async fn get(request: PageRequest<'_>) -> Result<Vec<u8>, FetchError> {
    let stream = TcpStream::connect(request.address).await.map_err(FetchError::Connect)?;
    let _ = stream.set_nodelay(true);
    match request.tls {
        None => exchange(stream, &request).await,
        Some(tls) => {
            let stream = match request.host {
                Some(host) => tls.connect_named(host, stream).await,
                None => tls.connect(request.address, stream).await,
            };
            let stream = stream.map_err(FetchError::Tls)?;
            exchange(stream, &request).await
        }
    }
}

async fn exchange<S>(stream: S, request: &PageRequest<'_>) -> Result<Vec<u8>, FetchError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection ends when the sender is dropped: answer read, or the caller gave up.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let host = match request.host {
        Some(host) => format!("{host}:{}", request.address.port()),
        None => request.address.to_string(),
    };
    let http = Request::get(request.path)
        .header(HOST, host)
        .header(ACCEPT, request.accept)
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(http).await?;
    if !response.status().is_success() {
        return Err(FetchError::Status(response.status()));
    }
    let mut body = response.into_body();
    let mut page = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue }; // trailers carry no page
        if page.len() + data.len() > request.limit {
            return Err(FetchError::TooLarge { limit: request.limit });
        }
        page.extend_from_slice(&data);
    }
    Ok(page)
}
