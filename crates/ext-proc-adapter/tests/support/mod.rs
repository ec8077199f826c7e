//! Helpers the server tests share: a fresh scratch directory and a plain HTTP GET.

// Each test file uses the helpers it needs.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A new empty directory under the system's temporary directory, unique to this call.
pub(crate) fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "epp-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The whole HTTP/1.1 response (status line, headers, body) to `GET path`.
pub(crate) async fn http_get(address: SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}
