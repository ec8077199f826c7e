//! A publisher that emits what vLLM's `ZmqEventPublisher` emits: on a PUB socket, multipart
//! messages `[topic, seq as 8 bytes big-endian, msgpack EventBatch]`, `seq` counting from 0.
//!
//! The socket binds (vLLM's default, one subscription per engine) or connects to a central
//! SUB socket (llm-d's `zmqEndpoint`).
//!
//! For tests, demos and simulations of engines: it lets the whole path run over real ZMQ
//! sockets. [`Publisher::serve_replay`] adds vLLM's replay socket: a ROUTER that answers a
//! request `["", start seq]` with every buffered message `["", seq, payload]` from `start`
//! on, then `["", -1, ""]`.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::task::JoinHandle;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::event::{Encoding, EventBatch, encode_batch};

/// Why a publisher could not bind or send.
#[derive(Debug, thiserror::Error)]
#[error("zmq publisher: {0}")]
pub struct PublishError(#[from] zeromq::ZmqError);

/// The replay buffer: the last messages by sequence number.
type ReplayBuffer = Arc<Mutex<VecDeque<(u64, Vec<u8>)>>>;

/// A vLLM-like KV-event publisher.
pub struct Publisher {
    socket: PubSocket,
    topic: String,
    endpoint: String,
    next_seq: u64,
    encoding: Encoding,
    /// The last messages, for the replay socket (when it is served).
    replay: Option<(ReplayBuffer, usize, JoinHandle<()>)>,
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if let Some((_, _, task)) = &self.replay {
            task.abort();
        }
    }
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("endpoint", &self.endpoint)
            .field("topic", &self.topic)
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

impl Publisher {
    /// Binds a PUB socket (e.g. `tcp://127.0.0.1:0` for any free port) publishing on `topic`
    /// (vLLM's default is the empty topic; llm-d deployments use `kv@<pod>@<model>`).
    pub async fn bind(
        endpoint: &str,
        topic: &str,
        encoding: Encoding,
    ) -> Result<Self, PublishError> {
        let mut socket = PubSocket::new();
        let bound = socket.bind(endpoint).await?;
        Ok(Self {
            socket,
            topic: topic.to_owned(),
            endpoint: bound.to_string(),
            next_seq: 0,
            encoding,
            replay: None,
        })
    }

    /// Connects a PUB socket to a central SUB socket at `endpoint` (vLLM's `--kv-events-config`
    /// naming the EPP's `zmqEndpoint`), publishing on `topic`, typically `kv@<ip:port>@<model>`
    /// so that the central socket can tell the publishers apart.
    pub async fn connect(
        endpoint: &str,
        topic: &str,
        encoding: Encoding,
    ) -> Result<Self, PublishError> {
        let mut socket = PubSocket::new();
        socket.connect(endpoint).await?;
        Ok(Self {
            socket,
            topic: topic.to_owned(),
            endpoint: endpoint.to_owned(),
            next_seq: 0,
            encoding,
            replay: None,
        })
    }

    /// The bound address, with the port the system chose (`tcp://127.0.0.1:PORT`), or the
    /// address connected to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The sequence number the next message will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Skips sequence numbers, as if `n` messages had been dropped on the way (tests).
    pub fn skip(&mut self, n: u64) {
        self.next_seq += n;
    }

    /// Encodes and publishes one batch; returns its sequence number.
    pub async fn publish(&mut self, batch: &EventBatch) -> Result<u64, PublishError> {
        let payload = encode_batch(batch, self.encoding);
        self.publish_raw(payload).await
    }

    /// Serves vLLM's replay socket at `endpoint` (a ROUTER), keeping the last
    /// `buffer_steps` messages; returns the bound address. Must run inside a tokio runtime.
    pub async fn serve_replay(
        &mut self,
        endpoint: &str,
        buffer_steps: usize,
    ) -> Result<String, PublishError> {
        let mut router = RouterSocket::new();
        let bound = router.bind(endpoint).await?.to_string();
        let buffer = Arc::new(Mutex::new(VecDeque::with_capacity(buffer_steps.min(1024))));
        let task = tokio::spawn(serve(router, Arc::clone(&buffer)));
        self.replay = Some((buffer, buffer_steps.max(1), task));
        Ok(bound)
    }

    /// Records a batch in the replay buffer under the next sequence number without sending
    /// it, as if the PUB socket had dropped it (tests).
    pub fn publish_lost(&mut self, batch: &EventBatch) -> u64 {
        let seq = self.next_seq;
        self.remember(seq, encode_batch(batch, self.encoding));
        self.next_seq += 1;
        seq
    }

    fn remember(&self, seq: u64, payload: Vec<u8>) {
        if let Some((buffer, steps, _)) = &self.replay {
            let mut buffer = buffer.lock();
            if buffer.len() == *steps {
                buffer.pop_front();
            }
            buffer.push_back((seq, payload));
        }
    }

    /// Publishes an already encoded payload with the next sequence number.
    pub async fn publish_raw(&mut self, payload: Vec<u8>) -> Result<u64, PublishError> {
        let seq = self.next_seq;
        if self.replay.is_some() {
            self.remember(seq, payload.clone());
        }
        let mut msg = ZmqMessage::from(self.topic.clone().into_bytes());
        msg.push_back(bytes::Bytes::copy_from_slice(&seq.to_be_bytes()));
        msg.push_back(bytes::Bytes::from(payload));
        self.socket.send(msg).await?;
        self.next_seq += 1;
        Ok(seq)
    }
}

/// vLLM's end-of-replay marker: sequence -1.
const END_SEQ: [u8; 8] = (-1i64).to_be_bytes();

async fn serve(mut router: RouterSocket, buffer: ReplayBuffer) {
    while let Ok(request) = router.recv().await {
        // [client identity, "", start seq]
        let (Some(client), Some(start), 3) = (request.get(0), request.get(2), request.len()) else {
            continue;
        };
        let Ok(start) = <[u8; 8]>::try_from(start.as_ref()) else { continue };
        let start = u64::from_be_bytes(start);
        // Copied out so that no lock is held while sending.
        let batches: Vec<(u64, Vec<u8>)> =
            buffer.lock().iter().filter(|(seq, _)| *seq >= start).cloned().collect();
        for (seq, payload) in
            batches.into_iter().map(|(s, p)| (s.to_be_bytes(), p)).chain([(END_SEQ, Vec::new())])
        {
            let mut reply = ZmqMessage::from(client.clone());
            reply.push_back(bytes::Bytes::new());
            reply.push_back(bytes::Bytes::copy_from_slice(&seq));
            reply.push_back(bytes::Bytes::from(payload));
            if router.send(reply).await.is_err() {
                break;
            }
        }
    }
}
