//! A publisher that emits what vLLM's `ZmqEventPublisher` emits: on a PUB socket, multipart
//! messages `[topic, seq as 8 bytes big-endian, msgpack EventBatch]`, `seq` counting from 0.
//!
//! For tests, demos and simulations of engines: it lets the whole path run over real ZMQ
//! sockets. It does not serve vLLM's replay socket.

use zeromq::{PubSocket, Socket, SocketSend, ZmqMessage};

use crate::event::{Encoding, EventBatch, encode_batch};

/// Why a publisher could not bind or send.
#[derive(Debug, thiserror::Error)]
#[error("zmq publisher: {0}")]
pub struct PublishError(#[from] zeromq::ZmqError);

/// A vLLM-like KV-event publisher.
pub struct Publisher {
    socket: PubSocket,
    topic: String,
    endpoint: String,
    next_seq: u64,
    encoding: Encoding,
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
        })
    }

    /// The bound address, with the port the system chose (`tcp://127.0.0.1:PORT`).
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

    /// Publishes an already encoded payload with the next sequence number.
    pub async fn publish_raw(&mut self, payload: Vec<u8>) -> Result<u64, PublishError> {
        let seq = self.next_seq;
        let mut msg = ZmqMessage::from(self.topic.clone().into_bytes());
        msg.push_back(bytes::Bytes::copy_from_slice(&seq.to_be_bytes()));
        msg.push_back(bytes::Bytes::from(payload));
        self.socket.send(msg).await?;
        self.next_seq += 1;
        Ok(seq)
    }
}
