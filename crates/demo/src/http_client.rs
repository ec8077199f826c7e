//! A minimal HTTP/1.1 client over loopback: one fresh connection per request, as the demo's
//! proxy, the examples and the load generator need it (no pooling, no TLS).

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why an HTTP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The TCP connection could not be opened.
    #[error("connect to {address}: {source}")]
    Connect {
        /// The server.
        address: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The handshake, the request or the response body failed.
    #[error("HTTP exchange with {address} failed: {source}")]
    Exchange {
        /// The server.
        address: SocketAddr,
        /// The protocol error.
        source: hyper::Error,
    },
    /// The request could not be built (a path that is not a URI).
    #[error("invalid request to {address}: {source}")]
    Request {
        /// The server.
        address: SocketAddr,
        /// What is wrong with it.
        source: hyper::http::Error,
    },
    /// A GET was answered with a status other than 2xx.
    #[error("{address}{path} answered {status}")]
    Status {
        /// The server.
        address: SocketAddr,
        /// The path asked for.
        path: String,
        /// The status it answered.
        status: StatusCode,
    },
    /// A GET body that should be text is not UTF-8.
    #[error("{address}{path} is not UTF-8")]
    NotText {
        /// The server.
        address: SocketAddr,
        /// The path asked for.
        path: String,
    },
}

/// Sends `request` to `address` over a fresh HTTP/1 connection.
pub async fn send(
    address: SocketAddr,
    request: Request<Full<Bytes>>,
) -> Result<Response<Incoming>, HttpError> {
    let stream = TcpStream::connect(address)
        .await
        .map_err(|source| HttpError::Connect { address, source })?;
    let _ = stream.set_nodelay(true);
    let exchange = |source| HttpError::Exchange { address, source };
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(exchange)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "upstream connection ended with an error");
        }
    });
    sender.send_request(request).await.map_err(exchange)
}

/// POSTs a JSON body to `address` on a fresh connection.
pub async fn post(
    address: SocketAddr,
    path: &str,
    body: Vec<u8>,
) -> Result<Response<Incoming>, HttpError> {
    post_with_headers(address, path, body, &[]).await
}

/// POSTs a JSON body to `address` on a fresh connection with extra `headers`.
pub async fn post_with_headers(
    address: SocketAddr,
    path: &str,
    body: Vec<u8>,
    headers: &[(String, String)],
) -> Result<Response<Incoming>, HttpError> {
    let mut request = Request::post(path)
        .header(hyper::header::HOST, address.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .map_err(|source| HttpError::Request { address, source })?;
    send(address, request).await
}

/// GETs `path` from `address` and returns the body as text.
pub async fn get_text(address: SocketAddr, path: &str) -> Result<String, HttpError> {
    let request = Request::get(path)
        .header(hyper::header::HOST, address.to_string())
        .body(Full::new(Bytes::new()))
        .map_err(|source| HttpError::Request { address, source })?;
    let response = send(address, request).await?;
    let status = response.status();
    if !status.is_success() {
        return Err(HttpError::Status { address, path: path.to_owned(), status });
    }
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|source| HttpError::Exchange { address, source })?
        .to_bytes();
    String::from_utf8(body.to_vec())
        .map_err(|_| HttpError::NotText { address, path: path.to_owned() })
}
