//! The ext-proc listener: TCP keepalive on every accepted socket, and at most a fixed number of
//! connections open at once.
//!
//! An accept task takes a permit before each accept and hands the connection, holding its
//! permit, to the gRPC server through a one-slot channel; the permit is returned when the
//! connection is dropped (closed by either side, or by HTTP/2 keepalive). With every permit
//! taken the task stops accepting, so further clients wait in the kernel's listen backlog
//! instead of costing memory and a task each. Accept errors (out of file descriptors) back off
//! instead of spinning.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

/// TCP keepalive of accepted sockets: probes after `idle` without traffic, every `interval`,
/// the connection dropped after `retries` unanswered ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpKeepalive {
    /// Idle time before the first probe.
    pub idle: Duration,
    /// Time between probes.
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped.
    pub retries: u32,
}

/// An accepted connection holding its place under the connection limit.
#[derive(Debug)]
pub struct LimitedConnection {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for LimitedConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for LimitedConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Pause after a failed accept (typically out of file descriptors).
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Connections from `listener`, at most `max_connections` open at once, with `keepalive`.
/// The accept task ends (closing the listener) once the returned stream is dropped.
pub fn limited_incoming(
    listener: TcpListener,
    max_connections: usize,
    keepalive: Option<TcpKeepalive>,
) -> ReceiverStream<io::Result<LimitedConnection>> {
    let mut incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    if let Some(keepalive) = keepalive {
        incoming = incoming
            .with_keepalive(Some(keepalive.idle))
            .with_keepalive_interval(Some(keepalive.interval))
            .with_keepalive_retries(Some(keepalive.retries));
    }
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
    let (sender, receiver) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                permit = Arc::clone(&permits).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                () = sender.closed() => return,
            };
            let accepted = tokio::select! {
                accepted = incoming.next() => accepted,
                () = sender.closed() => return,
            };
            match accepted {
                Some(Ok(stream)) => {
                    let connection = LimitedConnection { stream, _permit: permit };
                    if sender.send(Ok(connection)).await.is_err() {
                        return;
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "ext-proc accept failed; backing off");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
                None => return,
            }
        }
    });
    ReceiverStream::new(receiver)
}
