//! Active-active picker replicas that share what they learn through Redis (or Valkey).
//!
//! With approximate prefix routing, independent replicas each learn only the requests they
//! routed: a conversation whose turns land on different replicas loses its cache affinity,
//! and each replica counts only its own requests in flight. A [`CrossReplicaSync`] shares
//! both through one Redis, which every replica of a pool points at (several pools can share
//! one Redis: every key and message carries the pool name).
//!
//! # What is shared, and how
//! * **Prefix-index records** ("endpoint E was sent a prompt with blocks h1..hn"): appended in
//!   batches to one **Redis Stream per pool** (`{keyPrefix}:{pool}:records`, `XADD MAXLEN ~`).
//!   A stream rather than pub/sub because a stream keeps the recent past: a replica that
//!   starts, or comes back after losing Redis, replays the newest entries (a bounded
//!   snapshot, `snapshotBatches`) and then follows from where it is, so it is warm on its
//!   first request; pub/sub delivers only to whoever listens at that moment. `MAXLEN ~`
//!   bounds the stream's memory in Redis. Records are idempotent (recording a prefix twice
//!   leaves the LRU as recording it once, apart from recency), so replay needs no
//!   exactly-once bookkeeping.
//! * **In-flight counts** per endpoint: each replica writes its own counts, every
//!   `crossReplicaSyncInterval`, under a **key with a TTL** of its own
//!   (`{keyPrefix}:{pool}:inflight:{replica}`), and lists itself in a sorted set of live
//!   replicas scored by time (`{keyPrefix}:{pool}:replicas`). A count is a level, not an
//!   event: publishing the level (rather than +1/-1 deltas) means a lost message is
//!   corrected by the next one, and a replica that dies simply stops refreshing its key,
//!   which expires within the TTL, taking its share with it. Each replica sums the live
//!   peers' counts and adds them to its own (`active-request-scorer`,
//!   `inflight-load-producer`), as llm-d-router's cross-replica aggregate does.
//!
//! Every message starts with a magic, a format version, the sender's replica id, the pool
//! name and the send time ([`wire`]). Messages of another pool or version, or that do not
//! decode, are ignored and counted ([`SyncMetrics`]); a replica ignores its own records.
//!
//! # Never on the request path
//! A decision hands its record to a [`RecordSink`](scorers::RecordSink) that copies the
//! hashes into a bounded queue and returns (a mutex held for the copy, no I/O); a full
//! queue drops the record and counts it. Background tasks publish, read and exchange
//! counts. When Redis is down or slow every replica keeps routing on its own state; the
//! connections reconnect with backoff and sync resumes where the stream still reaches.
//!
//! # Configuration
//! The `redis-cross-replica-syncer` plugin type ([`config`]), referenced by llm-d-router's
//! `dataLayer.crossReplicaSyncerPluginRef`, with `dataLayer.crossReplicaSyncInterval`.
//! `dataLayer.peerDiscovery` is not needed: replicas find each other through Redis.
//! TLS (`rediss://`) needs the crate's `tls` feature; `caFile` trusts a private CA (instead of
//! the public roots) and `certFile`/`keyFile` present a client certificate
//! ([`config`](config#tls)).
//!
//! ```
//! use scheduler_core::EndpointPickerConfig;
//!
//! let yaml = "
//! plugins:
//! - type: prefix-cache-scorer
//! - name: sync
//!   type: redis-cross-replica-syncer
//!   parameters: {address: 'redis-0.redis:6379', keyPrefix: epp, poolName: chat}
//! dataLayer:
//!   crossReplicaSyncerPluginRef: sync
//!   crossReplicaSyncInterval: 100ms
//! ";
//! let mut registry = scorers::builtin_registry();
//! redis_sync::register(&mut registry);
//! let config = EndpointPickerConfig::from_yaml(yaml).unwrap();
//! let plugins = config.construct_plugins(&registry).unwrap();
//! let layer = config.data_layer(&plugins, &registry).unwrap();
//! let syncer = layer.cross_replica_syncer.expect("named");
//! let settings = redis_sync::settings_of(&plugins, &syncer.name).unwrap();
//! assert_eq!(settings.url, "redis://redis-0.redis:6379");
//! assert_eq!(layer.cross_replica_sync_interval, Some(std::time::Duration::from_millis(100)));
//! // On a tokio runtime, with the picker's pool:
//! // let sync = CrossReplicaSync::start(&settings, &options, &plugins, pool)?;
//! ```
//!
//! # Cost
//! `cargo bench -p epp-redis-sync --bench request_path`: queueing one record costs a decision
//! about 45 ns for 16 blocks, 60 ns for 256 and 290 ns for 2048 (medians of three runs on a
//! shared 2-core machine at load 5; 60 to 340 ns with a second thread queueing at the same
//! time). Replication lag on loopback (`cargo test -p epp-redis-sync --test replicas
//! replication_lag -- --nocapture`, 1000 decisions at 500 a second): p50 about 0.6 ms, p99
//! about 4 ms on the same machine.
//!
//! # Bounds
//! Outbound queue: `maxQueuedBlocks` hashes (8 bytes each). One message: 1 MiB. The stream
//! in Redis: about `streamMaxLen` batches. A starting replica replays at most
//! `snapshotBatches` batches. Peers read per interval: [`MAX_PEERS`].

#![forbid(unsafe_code)]

pub mod config;
pub mod metrics;
pub mod outbound;
mod sync;
pub mod wire;

pub use config::{
    ClientIdentity, SyncSettings, SyncerParameters, TYPE_NAME, TlsSettings, register, settings_of,
};
pub use metrics::{Ignored, SyncMetrics};
pub use outbound::Outbound;
pub use sync::{CrossReplicaSync, MAX_PEERS, SyncError, SyncOptions};

pub(crate) use sync::now_micros;
