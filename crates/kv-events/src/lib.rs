//! vLLM KV-cache events and the precise prefix index they feed.
//!
//! Where the approximate prefix index (`epp-prefix-cache`) remembers where prompts were
//! *sent*, this crate learns what each engine really *holds* and evicts, from the events vLLM
//! publishes over ZMQ (`--kv-events-config`):
//!
//! * [`decode_batch`] reads one payload, in both msgspec shapes vLLM has used (array-tagged
//!   and map), with integer or byte-string block hashes ([`event`] module: the field layout).
//! * [`TokenProcessor`] computes llm-d's block keys from token ids: a chained hash over
//!   `blockSizeTokens` chunks seeded with `hashSeed`, the model (or LoRA) name at the root
//!   ([`keys`] module: the exact byte layout of both of llm-d's algorithms).
//! * [`PreciseIndex`] maps each endpoint's engine block hashes to those keys, applies stores,
//!   removals and clears per endpoint, tracks sequence numbers (a gap makes the endpoint
//!   untrusted), stays within a per-endpoint capacity, and answers "how many leading blocks of
//!   this request does each endpoint hold?" ([`index`] module: rules, locking, memory).
//! * With the `zmq` feature, `subscriber` keeps one SUB socket per endpoint publisher, following
//!   pool membership, reconnecting with backoff and filling gaps from vLLM's replay socket, and
//!   `central` binds one SUB socket that the engines connect to (llm-d's `zmqEndpoint`, the
//!   "global socket" mode) and attributes each message to an endpoint by its topic, and
//!   `publisher` emits vLLM's bytes (and serves replays) for tests, demos and simulations,
//!   binding as vLLM does by default or connecting to a central socket.
//!
//! The crate has no async runtime without the `zmq` feature.
//!
//! ```
//! use kv_events::{
//!     BlockStored, Encoding, EndpointMatch, Event, EventBatch, IndexConfig, PreciseIndex,
//!     TokenProcessor, TokenProcessorConfig, encode_batch,
//! };
//!
//! let processor = TokenProcessor::new(&TokenProcessorConfig {
//!     block_size_tokens: 4,
//!     ..TokenProcessorConfig::default()
//! });
//! let index: PreciseIndex<u32> = PreciseIndex::new(processor, IndexConfig::default());
//! index.add_endpoint(7);
//!
//! // Endpoint 7's engine stored two blocks of 4 tokens (engine hashes 101 and 102).
//! let stored = EventBatch {
//!     ts: 1.0,
//!     events: vec![Event::BlockStored(BlockStored {
//!         block_hashes: vec![101, 102],
//!         token_ids: (0..8).collect(),
//!         block_size: 4,
//!         ..BlockStored::default()
//!     })],
//!     data_parallel_rank: None,
//! };
//! let payload = encode_batch(&stored, Encoding::ArrayTagged); // what vLLM sends
//! index.ingest(7, 0, "llama", &payload).unwrap();
//!
//! // A request whose 12 tokens start with the same 8.
//! let mut keys = Vec::new();
//! let tokens: Vec<u32> = (0..12).collect();
//! index.processor().request_keys("llama", &tokens, 1024, &mut keys);
//! assert_eq!(keys.len(), 3);
//! let found = index.longest_prefix(7, &keys);
//! assert_eq!(found, EndpointMatch::Blocks(2));
//! assert_eq!(found.score(keys.len()), Some(2.0 / 3.0));
//!
//! // Sequence number 5 after 0: messages were lost, the endpoint is untrusted.
//! index.ingest(7, 5, "llama", &payload).unwrap();
//! assert_eq!(index.longest_prefix(7, &keys), EndpointMatch::Untrusted);
//! ```

#![forbid(unsafe_code)]

#[cfg(feature = "zmq")]
pub mod central;
pub mod event;
pub mod index;
pub mod keys;
mod lru;
mod msgpack;
#[cfg(feature = "zmq")]
pub mod publisher;
#[cfg(feature = "zmq")]
pub mod subscriber;

pub use event::{
    BlockRemoved, BlockStored, Encoding, Event, EventBatch, decode_batch, encode_batch,
};
pub use index::{
    EndpointMatch, IndexConfig, IndexStats, IndexSummary, IngestError, PreciseIndex, SeqOutcome,
};
pub use keys::{HashAlgorithm, TokenProcessor, TokenProcessorConfig};

/// Why a payload does not decode. Offsets are byte positions in the payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload ends inside a value, or announces more elements than it has bytes.
    #[error("payload ends early (at byte {offset})")]
    UnexpectedEof {
        /// Where the missing bytes were expected.
        offset: usize,
    },
    /// A value of the wrong type.
    #[error("{field}: expected {expected}, found {found} (at byte {offset})")]
    WrongType {
        /// The field being read.
        field: &'static str,
        /// What it should be.
        expected: &'static str,
        /// What the marker says it is.
        found: &'static str,
        /// Where.
        offset: usize,
    },
    /// A string that is not UTF-8.
    #[error("{field}: invalid UTF-8 (at byte {offset})")]
    InvalidUtf8 {
        /// The field being read.
        field: &'static str,
        /// Where.
        offset: usize,
    },
    /// An integer out of its field's range (e.g. a negative token id).
    #[error("{field}: value out of range")]
    OutOfRange {
        /// The field being read.
        field: &'static str,
    },
    /// An empty byte string where a block hash was expected.
    #[error("{field}: empty hash")]
    EmptyHash {
        /// The field being read.
        field: &'static str,
    },
    /// A required field is absent.
    #[error("{event}: missing field {field}")]
    MissingField {
        /// The struct.
        event: &'static str,
        /// The field.
        field: &'static str,
    },
    /// An event whose tag is none of `BlockStored`, `BlockRemoved`, `AllBlocksCleared`.
    #[error("unknown event tag {tag:?}")]
    UnknownTag {
        /// The tag (at most 64 bytes of it).
        tag: String,
    },
    /// A skipped value nested deeper than the decoder follows.
    #[error("value nested too deep (at byte {offset})")]
    TooDeep {
        /// Where.
        offset: usize,
    },
    /// Bytes after the batch.
    #[error("{count} bytes after the batch")]
    TrailingBytes {
        /// How many.
        count: usize,
    },
}
