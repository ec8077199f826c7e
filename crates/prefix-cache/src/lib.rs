//! Prompt block hashing and a bounded index of which endpoints hold which prompt blocks.
//!
//! This is the data structure behind prefix-cache-aware routing: a request whose prompt starts
//! like an earlier one should go where that earlier prompt's KV cache probably still lives.
//!
//! * [`BlockHasher`] cuts a prompt into fixed-size blocks and hashes them as a chain seeded by the
//!   model name ([`hash`] module).
//! * [`PrefixIndex`] remembers, per endpoint, the most recently recorded blocks up to a capacity,
//!   and answers "how many leading blocks of this prompt does each endpoint hold?" ([`index`]
//!   module: sharded, lock order, memory formula). A lookup works in a caller-owned
//!   [`LookupScratch`], one per thread, and allocates nothing once warm.
//! * [`RecordWriter`] applies records on a thread of its own behind a bounded queue, so that
//!   the request path only queues them ([`writer`] module: coalescing, drops, `flush`).
//! * [`mix64`], the SplitMix64 finaliser that spreads block hashes over the index's shards, for
//!   any code that needs to scramble a `u64` the same way.
//!
//! The crate has no async runtime and no dependency on the scheduler: endpoints are any small
//! `Copy` key.
//!
//! ```
//! use prefix_cache::{BlockHasher, BlockHasherConfig, IndexConfig, LookupScratch, PrefixIndex};
//!
//! let hasher = BlockHasher::new(BlockHasherConfig { block_size: 4, max_blocks: 256 });
//! let index: PrefixIndex<u64> = PrefixIndex::new(IndexConfig::default());
//!
//! let mut first = Vec::new();
//! hasher.hash_prompt("llama", b"You are helpful. Say hi", &mut first);
//! assert_eq!(first.len(), 5); // 23 bytes: five whole 4-byte blocks, the tail is not hashed
//! index.record(7, &first); // the request was sent to endpoint 7
//!
//! let mut second = Vec::new();
//! hasher.hash_prompt("llama", b"You are helpful. Tell me", &mut second);
//! let (mut scratch, mut matches) = (LookupScratch::default(), Vec::new()); // kept per thread
//! index.longest_prefix_matches(&second, &mut scratch, &mut matches);
//! assert_eq!(matches, vec![(7, 4)]); // endpoint 7 holds the first four blocks
//!
//! // The score a prefix-cache scorer would give endpoint 7:
//! let score = matches[0].1 as f64 / second.len() as f64;
//! assert!((score - 4.0 / 6.0).abs() < 1e-9);
//! ```

#![forbid(unsafe_code)]

mod block_table;
mod endpoint_lru;
pub mod hash;
pub mod index;
pub mod writer;

pub use hash::{BlockHasher, BlockHasherConfig, mix64};
pub use index::{IndexConfig, InvariantViolation, LookupScratch, PrefixIndex};
pub use writer::{RecordWriter, WriterConfig};
