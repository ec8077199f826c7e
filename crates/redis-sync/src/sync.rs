//! The running syncer: three background tasks on the caller's tokio runtime.
//!
//! * **publisher**: takes the queued prefix records ([`Outbound`]), encodes them in messages
//!   of at most [`MAX_MESSAGE_BYTES`](crate::wire::MAX_MESSAGE_BYTES) and appends each to the
//!   pool's stream (`XADD key MAXLEN ~ cap * d <message>`). A failed append drops its records
//!   (counted) and waits a backoff; meanwhile the bounded queue drops what does not fit.
//! * **reader**: replays the newest `snapshotBatches` entries of the stream (`XREVRANGE`),
//!   then follows it (`XREAD BLOCK`) from the last id it saw, on a connection of its own so
//!   that the blocking read delays no other command. After an error it retries with
//!   exponential backoff (50 ms to 2 s) from the same id, so a replica that was cut off
//!   catches up on whatever the stream still holds.
//! * **in-flight**: every interval, writes this replica's own counts under a key of its own
//!   with a TTL (`SET key msg PX ttl`), marks itself live in the pool's replica set
//!   (`ZADD`, scored by time; entries older than the TTL are removed), reads the live peers'
//!   keys (`MGET`) and installs their sums in the counting plugins. A replica that dies
//!   stops refreshing its key, which expires within the TTL: its share is gone. When Redis
//!   cannot be reached for longer than the TTL, the peers' counts are cleared and the
//!   replica routes on its own counts alone.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};
use redis::{IntoConnectionInfo, Value};
use scheduler_core::{ConstructedPlugins, EndpointId, EndpointMap, SharedPool};
use scorers::{InFlightCounts, PrefixCacheProducer, SharedInFlight};
use tokio::task::JoinHandle;

use crate::config::{DEFAULT_SYNC_INTERVAL, SyncSettings, TlsSettings};
use crate::metrics::{Ignored, SyncMetrics};
use crate::outbound::{Batch, Outbound, ProducerSink};
use crate::wire::{self, Count, Header, Message, WireError};

/// Most peers read per interval.
pub const MAX_PEERS: usize = 64;
/// How long the reader blocks in one `XREAD`.
const READ_BLOCK: Duration = Duration::from_millis(1000);
/// Entries read per `XREAD`.
const READ_COUNT: usize = 256;
/// Timeout of one command (other than the blocking read) and of one connection attempt.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a syncer could not start.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The Redis address or credentials are unusable.
    #[error("redis address '{url}': {source}")]
    Address {
        /// The URL.
        url: String,
        /// What the client said.
        source: redis::RedisError,
    },
    /// A prefix producer already reports to another syncer.
    #[error("the prefix index '{0}' is already synced by another syncer")]
    AlreadySynced(String),
    /// More plugins than a message can name.
    #[error("{0} plugins to sync; at most {max} are supported", max = wire::MAX_PLUGINS)]
    TooManyPlugins(usize),
}

/// A client for `info`, with the custom certificates of `tls` when there are any.
#[cfg(feature = "tls")]
fn client(info: redis::ConnectionInfo, tls: &TlsSettings) -> redis::RedisResult<redis::Client> {
    if tls.is_empty() {
        return redis::Client::open(info);
    }
    let certificates = redis::TlsCertificates {
        client_tls: tls.client.as_ref().map(|identity| redis::ClientTlsConfig {
            client_cert: identity.cert_chain.clone(),
            client_key: identity.key.clone(),
        }),
        root_cert: tls.ca.clone(),
    };
    redis::Client::build_with_tls(info, certificates)
}

/// A client for `info`. Settings from [`SyncerParameters::resolve`](crate::SyncerParameters::resolve)
/// carry no certificates in a build without the `tls` feature, but an embedder's may.
#[cfg(not(feature = "tls"))]
fn client(info: redis::ConnectionInfo, tls: &TlsSettings) -> redis::RedisResult<redis::Client> {
    if !tls.is_empty() {
        return Err(redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "TLS certificates given, but this build has no TLS client (epp-redis-sync feature `tls`)",
        )));
    }
    redis::Client::open(info)
}

/// What the picker around the syncer decides.
#[derive(Clone, Debug)]
pub struct SyncOptions {
    /// The pool name when the plugin's parameters give none (the picker's `--pool-name`).
    pub pool_name: String,
    /// `dataLayer.crossReplicaSyncInterval`, which wins over the plugin's `syncInterval`.
    pub interval: Option<Duration>,
}

/// The keys of one pool.
#[derive(Clone, Debug)]
struct Keys {
    stream: String,
    replicas: String,
    in_flight_prefix: String,
}

impl Keys {
    fn in_flight(&self, replica: &str) -> String {
        format!("{}{replica}", self.in_flight_prefix)
    }
}

#[derive(Debug)]
struct Shared {
    replica: String,
    pool_name: String,
    keys: Keys,
    interval: Duration,
    ttl: Duration,
    stream_max_len: usize,
    snapshot_batches: usize,
    metrics: Arc<SyncMetrics>,
    outbound: Arc<Outbound>,
    producers: Vec<(String, Arc<PrefixCacheProducer>)>,
    in_flight: Vec<(String, Arc<dyn SharedInFlight>)>,
    pool: Arc<SharedPool>,
    /// Set once the stream's snapshot has been replayed.
    warm: std::sync::atomic::AtomicBool,
}

/// A running syncer (see the [module docs](self)); dropping it stops its tasks.
#[derive(Debug)]
pub struct CrossReplicaSync {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    publisher: ConnectionManager,
}

impl CrossReplicaSync {
    /// Starts syncing the prefix indexes and in-flight counts of `plugins` (the constructed
    /// plugins of the scheduler that routes on `pool`). Must be called on a tokio runtime.
    /// Never waits for Redis: connections are made in the background, and an unreachable
    /// Redis only means the replica routes on its own state until it is back.
    pub fn start(
        settings: &SyncSettings,
        options: &SyncOptions,
        plugins: &ConstructedPlugins,
        pool: Arc<SharedPool>,
    ) -> Result<Self, SyncError> {
        let address = |source| SyncError::Address { url: settings.url.clone(), source };
        let mut info = settings.url.as_str().into_connection_info().map_err(address)?;
        let mut redis_settings = info.redis_settings().clone();
        if let Some(user) = &settings.username {
            redis_settings = redis_settings.set_username(user);
        }
        if let Some(password) = &settings.password {
            redis_settings = redis_settings.set_password(password);
        }
        info = info.set_redis_settings(redis_settings);
        let client = client(info, &settings.tls).map_err(address)?;
        let base = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(2))
            .set_number_of_retries(2);
        let publisher = ConnectionManager::new_lazy_with_config(
            client.clone(),
            base.clone().set_response_timeout(Some(COMMAND_TIMEOUT)),
        )
        .map_err(address)?;
        let reader = ConnectionManager::new_lazy_with_config(
            client,
            base.set_response_timeout(Some(READ_BLOCK + COMMAND_TIMEOUT)),
        )
        .map_err(address)?;

        let producers = scorers::prefix_producers(plugins);
        let in_flight = scorers::shared_in_flight(plugins);
        for count in [producers.len(), in_flight.len()] {
            if count > wire::MAX_PLUGINS {
                return Err(SyncError::TooManyPlugins(count));
            }
        }
        let outbound = Arc::new(Outbound::new(settings.max_queued_blocks));
        for (position, (name, producer)) in producers.iter().enumerate() {
            let sink = ProducerSink { plugin: position as u8, outbound: Arc::clone(&outbound) };
            if !producer.set_record_sink(Arc::new(sink)) {
                return Err(SyncError::AlreadySynced(name.clone()));
            }
        }
        let interval = options.interval.or(settings.interval).unwrap_or(DEFAULT_SYNC_INTERVAL);
        let ttl = settings.in_flight_ttl.unwrap_or((interval * 3).max(Duration::from_secs(1)));
        let pool_name = settings.pool_name.clone().unwrap_or_else(|| options.pool_name.clone());
        let base_key = format!("{}:{}", settings.key_prefix, pool_name);
        let shared = Arc::new(Shared {
            replica: settings.replica_id.clone().unwrap_or_else(default_replica_id),
            keys: Keys {
                stream: format!("{base_key}:records"),
                replicas: format!("{base_key}:replicas"),
                in_flight_prefix: format!("{base_key}:inflight:"),
            },
            pool_name,
            interval,
            ttl,
            stream_max_len: settings.stream_max_len,
            snapshot_batches: settings.snapshot_batches,
            metrics: Arc::new(SyncMetrics::default()),
            outbound,
            producers,
            in_flight,
            pool,
            warm: std::sync::atomic::AtomicBool::new(false),
        });
        tracing::info!(
            replica = %shared.replica,
            pool = %shared.pool_name,
            url = %settings.url,
            ?interval,
            ?ttl,
            indexes = shared.producers.len(),
            counters = shared.in_flight.len(),
            "cross-replica sync through redis"
        );
        let tasks = vec![
            tokio::spawn(publish(Arc::clone(&shared), publisher.clone())),
            tokio::spawn(follow(Arc::clone(&shared), reader)),
            tokio::spawn(exchange_in_flight(Arc::clone(&shared), publisher.clone())),
        ];
        Ok(Self { shared, tasks, publisher })
    }

    /// The syncer's counters.
    pub fn metrics(&self) -> &Arc<SyncMetrics> {
        &self.shared.metrics
    }

    /// Whether the stream's recent records have been replayed into the local indexes (they
    /// are queued on the indexes' writers, which apply them a moment later).
    pub fn is_warm(&self) -> bool {
        self.shared.warm.load(Ordering::Acquire)
    }

    /// This replica's id.
    pub fn replica_id(&self) -> &str {
        &self.shared.replica
    }

    /// The pool name in keys and messages.
    pub fn pool_name(&self) -> &str {
        &self.shared.pool_name
    }

    /// The stream holding the pool's prefix records.
    pub fn stream_key(&self) -> &str {
        &self.shared.keys.stream
    }

    /// A renderer of the metrics for the picker's `/metrics` page.
    pub fn metrics_renderer(&self) -> impl Fn(&mut String) + Send + Sync + 'static {
        let metrics = Arc::clone(&self.shared.metrics);
        let pool = self.shared.pool_name.clone();
        move |out: &mut String| metrics.render(&pool, out)
    }

    /// Stops the tasks and removes this replica's in-flight key and liveness entry (best
    /// effort, within a second), so that peers stop counting its requests at once.
    pub async fn shutdown(mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        let keys = &self.shared.keys;
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(keys.in_flight(&self.shared.replica)).ignore();
        pipe.cmd("ZREM").arg(&keys.replicas).arg(&self.shared.replica).ignore();
        let cleanup = pipe.query_async::<()>(&mut self.publisher);
        let _ = tokio::time::timeout(COMMAND_TIMEOUT, cleanup).await;
    }
}

impl Drop for CrossReplicaSync {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Microseconds since the Unix epoch.
pub(crate) fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| u64::try_from(since.as_micros()).unwrap_or(u64::MAX))
}

fn default_replica_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|host| host.trim().to_owned())
        .filter(|host| !host.is_empty())
        .unwrap_or_else(|| "epp".to_owned());
    let host: String = host.chars().take(200).collect();
    format!("{host}-{}-{:x}", std::process::id(), now_micros() & 0xff_ffff)
}

fn failed(shared: &Shared, error: &redis::RedisError, what: &str) {
    shared.metrics.redis_errors.fetch_add(1, Ordering::Relaxed);
    shared.metrics.redis_up.store(0, Ordering::Relaxed);
    tracing::debug!(%error, what, "cross-replica sync: redis command failed");
}

fn succeeded(shared: &Shared) {
    shared.metrics.redis_up.store(1, Ordering::Relaxed);
}

/// The publisher task.
async fn publish(shared: Arc<Shared>, mut connection: ConnectionManager) {
    let names: Vec<String> = shared.producers.iter().map(|(name, _)| name.clone()).collect();
    let mut batch = Batch::default();
    let mut message = Vec::new();
    let mut backoff = Duration::from_millis(50);
    loop {
        shared.outbound.take(&mut batch).await;
        let header = Header {
            replica: shared.replica.clone(),
            pool: shared.pool_name.clone(),
            sent_at_micros: batch.oldest_micros,
            plugins: names.clone(),
        };
        let total = batch.entries.len();
        let mut done = 0;
        while done < total {
            let written = wire::encode_records(&mut message, &header, batch.records().skip(done));
            if written == 0 {
                break;
            }
            done += written;
            let appended = redis::cmd("XADD")
                .arg(&shared.keys.stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(shared.stream_max_len)
                .arg("*")
                .arg("d")
                .arg(message.as_slice())
                .query_async::<Value>(&mut connection)
                .await;
            match appended {
                Ok(_) => {
                    succeeded(&shared);
                    shared.metrics.published.fetch_add(written as u64, Ordering::Relaxed);
                    backoff = Duration::from_millis(50);
                }
                Err(error) => {
                    failed(&shared, &error, "XADD");
                    shared.metrics.dropped.fetch_add(written as u64, Ordering::Relaxed);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        let skipped = total.saturating_sub(done) as u64;
        shared.metrics.dropped.fetch_add(skipped, Ordering::Relaxed);
    }
}

/// The reader task.
async fn follow(shared: Arc<Shared>, mut connection: ConnectionManager) {
    let mut last: Option<String> = None;
    let mut backoff = Duration::from_millis(50);
    loop {
        match read_once(&shared, &mut connection, &mut last).await {
            Ok(()) => {
                succeeded(&shared);
                backoff = Duration::from_millis(50);
            }
            Err(error) => {
                failed(&shared, &error, "XREAD");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

async fn read_once(
    shared: &Shared,
    connection: &mut ConnectionManager,
    last: &mut Option<String>,
) -> redis::RedisResult<()> {
    let Some(from) = last.clone() else {
        // Warm start: the newest entries, oldest first, then follow from the newest.
        let snapshot: StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(&shared.keys.stream)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(shared.snapshot_batches)
            .query_async(connection)
            .await?;
        for entry in snapshot.ids.iter().rev() {
            apply_entry(shared, entry);
        }
        *last = Some(snapshot.ids.first().map_or_else(|| "0-0".to_owned(), |e| e.id.clone()));
        shared.warm.store(true, Ordering::Release);
        return Ok(());
    };
    let reply: Option<StreamReadReply> = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(READ_COUNT)
        .arg("BLOCK")
        .arg(READ_BLOCK.as_millis() as u64)
        .arg("STREAMS")
        .arg(&shared.keys.stream)
        .arg(&from)
        .query_async(connection)
        .await?;
    for key in reply.into_iter().flat_map(|reply| reply.keys) {
        for entry in &key.ids {
            apply_entry(shared, entry);
            *last = Some(entry.id.clone());
        }
    }
    Ok(())
}

/// Applies one stream entry: a peer's batch of prefix records.
fn apply_entry(shared: &Shared, entry: &StreamId) {
    let Some(Value::BulkString(bytes)) = entry.map.get("d") else {
        shared.metrics.ignore(Ignored::Malformed);
        return;
    };
    apply_message(shared, bytes);
}

fn decode_counted(shared: &Shared, bytes: &[u8]) -> Option<Message> {
    match wire::decode(bytes) {
        Ok(message) if message.header().pool == shared.pool_name => Some(message),
        Ok(_) => {
            shared.metrics.ignore(Ignored::Foreign);
            None
        }
        Err(WireError::Version(_)) => {
            shared.metrics.ignore(Ignored::Version);
            None
        }
        Err(_) => {
            shared.metrics.ignore(Ignored::Malformed);
            None
        }
    }
}

fn apply_message(shared: &Shared, bytes: &[u8]) {
    let Some(message) = decode_counted(shared, bytes) else { return };
    let Message::Records(header, records) = message else {
        shared.metrics.ignore(Ignored::Malformed);
        return;
    };
    if header.replica == shared.replica {
        return;
    }
    // The sender's plugin positions, mapped to this replica's producers by name.
    let local: Vec<Option<&Arc<PrefixCacheProducer>>> = header
        .plugins
        .iter()
        .map(|name| shared.producers.iter().find(|(own, _)| own == name).map(|(_, p)| p))
        .collect();
    if local.iter().all(Option::is_none) {
        shared.metrics.ignore(Ignored::Foreign);
        return;
    }
    let pool = shared.pool.load();
    let mut applied = 0;
    for record in &records {
        let endpoint = EndpointId(record.endpoint);
        let producer = local.get(usize::from(record.plugin)).copied().flatten();
        if let Some(producer) = producer
            && pool.index_of(endpoint).is_some()
            && producer.apply_remote(endpoint, &record.hashes)
        {
            applied += 1;
        }
    }
    shared.metrics.applied.fetch_add(applied, Ordering::Relaxed);
    let lag = now_micros().saturating_sub(header.sent_at_micros);
    shared.metrics.observe_lag(Duration::from_micros(lag));
}

/// The in-flight task.
async fn exchange_in_flight(shared: Arc<Shared>, mut connection: ConnectionManager) {
    let names: Vec<String> = shared.in_flight.iter().map(|(name, _)| name.clone()).collect();
    let mut ticker = tokio::time::interval(shared.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_ok = Instant::now();
    let mut local = Vec::new();
    let mut counts = Vec::new();
    let mut message = Vec::new();
    loop {
        ticker.tick().await;
        counts.clear();
        for (position, (_, plugin)) in shared.in_flight.iter().enumerate() {
            local.clear();
            plugin.local_in_flight(&mut local);
            counts.extend(local.iter().map(|(endpoint, count)| Count {
                plugin: position as u8,
                endpoint: endpoint.0,
                requests: count.requests,
                tokens: count.tokens,
            }));
        }
        let header = Header {
            replica: shared.replica.clone(),
            pool: shared.pool_name.clone(),
            sent_at_micros: now_micros(),
            plugins: names.clone(),
        };
        wire::encode_in_flight(&mut message, &header, &counts);
        match exchange_once(&shared, &mut connection, &message).await {
            Ok(()) => {
                succeeded(&shared);
                last_ok = Instant::now();
            }
            Err(error) => {
                failed(&shared, &error, "in-flight exchange");
                if last_ok.elapsed() > shared.ttl {
                    // The peers' counts are older than they may be: route on our own.
                    for (_, plugin) in &shared.in_flight {
                        plugin.peers().clear();
                    }
                    shared.metrics.peers.store(0, Ordering::Relaxed);
                }
            }
        }
    }
}

async fn exchange_once(
    shared: &Shared,
    connection: &mut ConnectionManager,
    message: &[u8],
) -> redis::RedisResult<()> {
    let keys = &shared.keys;
    let now_ms = now_micros() / 1000;
    let ttl_ms = u64::try_from(shared.ttl.as_millis()).unwrap_or(u64::MAX).max(1);
    let (members,): (Vec<String>,) = redis::pipe()
        .cmd("SET")
        .arg(keys.in_flight(&shared.replica))
        .arg(message)
        .arg("PX")
        .arg(ttl_ms)
        .ignore()
        .cmd("ZADD")
        .arg(&keys.replicas)
        .arg(now_ms)
        .arg(&shared.replica)
        .ignore()
        .cmd("ZREMRANGEBYSCORE")
        .arg(&keys.replicas)
        .arg("-inf")
        .arg(format!("({}", now_ms.saturating_sub(ttl_ms)))
        .ignore()
        .cmd("ZRANGE")
        .arg(&keys.replicas)
        .arg(0)
        .arg(MAX_PEERS as i64)
        .query_async(connection)
        .await?;
    let peers: Vec<&String> = members.iter().filter(|member| **member != shared.replica).collect();
    let values: Vec<Option<Vec<u8>>> = if peers.is_empty() {
        Vec::new()
    } else {
        let mut mget = redis::cmd("MGET");
        for peer in &peers {
            mget.arg(keys.in_flight(peer));
        }
        mget.query_async(connection).await?
    };
    let mut sums: Vec<EndpointMap<InFlightCounts>> =
        shared.in_flight.iter().map(|_| EndpointMap::default()).collect();
    let mut live = 0;
    for (peer, value) in peers.iter().zip(&values) {
        let Some(bytes) = value else { continue };
        let Some(message) = decode_counted(shared, bytes) else { continue };
        let Message::InFlight(header, counts) = message else {
            shared.metrics.ignore(Ignored::Malformed);
            continue;
        };
        if header.replica != **peer {
            shared.metrics.ignore(Ignored::Foreign);
            continue;
        }
        live += 1;
        let local: Vec<Option<usize>> = header
            .plugins
            .iter()
            .map(|name| shared.in_flight.iter().position(|(own, _)| own == name))
            .collect();
        for count in counts {
            let Some(Some(position)) = local.get(usize::from(count.plugin)) else { continue };
            let Some(sum) = sums.get_mut(*position) else { continue };
            let entry = sum.entry(EndpointId(count.endpoint)).or_default();
            entry.requests = entry.requests.saturating_add(count.requests);
            entry.tokens = entry.tokens.saturating_add(count.tokens);
        }
    }
    for ((_, plugin), sum) in shared.in_flight.iter().zip(sums) {
        plugin.peers().replace(sum);
    }
    shared.metrics.peers.store(live, Ordering::Relaxed);
    Ok(())
}
