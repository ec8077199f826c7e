//! ZMQ subscriptions to the engines' KV-event publishers, one SUB socket per endpoint.
//!
//! # Behaviour
//! * [`Subscribers::set_endpoints`] makes the subscriptions follow pool membership: a new
//!   endpoint gets an index entry and a task with its own SUB socket; a departed one has its
//!   task aborted and its blocks dropped; an endpoint whose publisher address changed is
//!   resubscribed from scratch.
//! * A task connects (bounded by `connect_timeout`), subscribes to `topic_filter` and applies
//!   every message to the [`PreciseIndex`] with its sequence number. A failed connection is
//!   retried with exponential backoff (`backoff_initial` doubling up to `backoff_max`); once
//!   connected the socket itself reconnects to a publisher that went away and came back.
//! * A message is `[topic, seq (8 bytes big-endian), payload]`. The model the publisher
//!   serves is read from an llm-d topic `kv@<pod>@<model>`, else `default_model` is used.
//!   A message of another shape means a batch was lost: the endpoint is marked untrusted.
//! * Sequence numbers are checked by the index ([`PreciseIndex::ingest`]): a gap makes the
//!   endpoint untrusted; a publisher that restarted (numbering went back) has an empty cache,
//!   so its blocks are dropped and it is trusted again.
//!
//! * With `replay_port` set, a gap is first filled from the engine's replay socket (vLLM's
//!   `--kv-events-config` `replay_endpoint`, a ROUTER): before the message that reveals the
//!   gap is applied, a DEALER asks for every batch from the expected number on and the ones
//!   received before the gap's end are applied in order, within `replay_timeout`. When the
//!   engine's buffer still held them the index never sees the gap; otherwise (or without a
//!   replay socket) the endpoint stays untrusted until the engine clears or restarts, or until
//!   the caller calls [`PreciseIndex::mark_rebuilt`].
//!
//! No lock is held across an await: the membership map is locked only to add or take tasks,
//! and the index's methods are synchronous.

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use zeromq::{DealerSocket, Socket, SocketOptions, SocketRecv, SocketSend, SubSocket, ZmqMessage};

use crate::index::PreciseIndex;

/// Settings of the subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberConfig {
    /// ZMQ subscription prefix (llm-d's `topicFilter`, e.g. `kv@`); empty takes every topic.
    pub topic_filter: String,
    /// The model name when the topic does not carry one.
    pub default_model: String,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// First retry delay after a failed connection.
    pub backoff_initial: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// The engines' replay (ROUTER) port, on the publisher's host; `None` disables replay.
    pub replay_port: Option<u16>,
    /// How long one replay may take before the gap is taken as final.
    pub replay_timeout: Duration,
}

impl Default for SubscriberConfig {
    fn default() -> Self {
        Self {
            topic_filter: String::new(),
            default_model: String::new(),
            connect_timeout: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            replay_port: None,
            replay_timeout: Duration::from_secs(2),
        }
    }
}

/// Counters of the subscriptions, all monotonic.
#[derive(Debug, Default)]
struct Counters {
    connects: AtomicU64,
    connect_failures: AtomicU64,
    disconnects: AtomicU64,
    messages: AtomicU64,
    malformed_messages: AtomicU64,
    replays: AtomicU64,
    replayed_messages: AtomicU64,
}

/// A snapshot of the subscriptions' counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubscriberStats {
    /// Successful connections (first ones and re-connections by a task).
    pub connects: u64,
    /// Failed connection attempts.
    pub connect_failures: u64,
    /// Sockets that returned an error and were replaced.
    pub disconnects: u64,
    /// Well-formed messages handed to the index.
    pub messages: u64,
    /// Messages not of the form `[topic, 8-byte seq, payload]`.
    pub malformed_messages: u64,
    /// Replays requested after a gap.
    pub replays: u64,
    /// Messages received by replays and applied.
    pub replayed_messages: u64,
}

struct Task {
    address: String,
    handle: JoinHandle<()>,
}

/// The set of subscriptions, one per endpoint.
pub struct Subscribers<K> {
    index: Arc<PreciseIndex<K>>,
    config: Arc<SubscriberConfig>,
    runtime: Handle,
    tasks: Mutex<HashMap<K, Task>>,
    counters: Arc<Counters>,
}

impl<K: Debug> Debug for Subscribers<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscribers").field("config", &self.config).finish_non_exhaustive()
    }
}

impl<K> Subscribers<K>
where
    K: Copy + Eq + Hash + Debug + Send + Sync + 'static,
{
    /// Subscriptions feeding `index`, their tasks spawned on `runtime`.
    pub fn new(index: Arc<PreciseIndex<K>>, config: SubscriberConfig, runtime: Handle) -> Self {
        Self {
            index,
            config: Arc::new(config),
            runtime,
            tasks: Mutex::new(HashMap::new()),
            counters: Arc::new(Counters::default()),
        }
    }

    /// The index the subscriptions feed.
    pub fn index(&self) -> &Arc<PreciseIndex<K>> {
        &self.index
    }

    /// Subscribes to exactly these endpoints (key, publisher address such as
    /// `tcp://10.0.0.7:5557`): adds the new ones, drops the departed ones, resubscribes the
    /// ones whose address changed.
    pub fn set_endpoints<I: IntoIterator<Item = (K, String)>>(&self, endpoints: I) {
        let wanted: HashMap<K, String> = endpoints.into_iter().collect();
        let mut tasks = self.tasks.lock();
        tasks.retain(|key, task| {
            let keep = wanted.get(key) == Some(&task.address);
            if !keep {
                task.handle.abort();
                self.index.remove_endpoint(*key);
            }
            keep
        });
        for (key, address) in wanted {
            if let std::collections::hash_map::Entry::Vacant(slot) = tasks.entry(key) {
                slot.insert(self.spawn(key, address));
            }
        }
    }

    /// Subscribes to one endpoint (replacing its subscription if the address changed).
    pub fn add(&self, key: K, address: &str) {
        let mut tasks = self.tasks.lock();
        if tasks.get(&key).is_some_and(|t| t.address == address) {
            return;
        }
        if let Some(old) = tasks.remove(&key) {
            old.handle.abort();
            self.index.remove_endpoint(key);
        }
        let task = self.spawn(key, address.to_owned());
        tasks.insert(key, task);
    }

    /// Unsubscribes from one endpoint and drops its blocks. False if it was not subscribed.
    pub fn remove(&self, key: K) -> bool {
        let Some(task) = self.tasks.lock().remove(&key) else { return false };
        task.handle.abort();
        self.index.remove_endpoint(key);
        true
    }

    /// The endpoints subscribed to.
    pub fn endpoints(&self) -> Vec<K> {
        self.tasks.lock().keys().copied().collect()
    }

    /// The counters so far.
    pub fn stats(&self) -> SubscriberStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SubscriberStats {
            connects: get(&c.connects),
            connect_failures: get(&c.connect_failures),
            disconnects: get(&c.disconnects),
            messages: get(&c.messages),
            malformed_messages: get(&c.malformed_messages),
            replays: get(&c.replays),
            replayed_messages: get(&c.replayed_messages),
        }
    }

    fn spawn(&self, key: K, address: String) -> Task {
        self.index.add_endpoint(key);
        let run = run(
            key,
            address.clone(),
            Arc::clone(&self.index),
            Arc::clone(&self.config),
            Arc::clone(&self.counters),
        );
        Task { address, handle: self.runtime.spawn(run) }
    }
}

impl<K> Drop for Subscribers<K> {
    fn drop(&mut self) {
        for (_, task) in self.tasks.lock().drain() {
            task.handle.abort();
        }
    }
}

/// The model in an llm-d topic `kv@<pod>@<model>`.
pub fn model_from_topic(topic: &[u8]) -> Option<&str> {
    let topic = std::str::from_utf8(topic).ok()?;
    let mut parts = topic.split('@');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(_), Some(_), Some(model), None) if !model.is_empty() => Some(model),
        _ => None,
    }
}

async fn run<K>(
    key: K,
    address: String,
    index: Arc<PreciseIndex<K>>,
    config: Arc<SubscriberConfig>,
    counters: Arc<Counters>,
) where
    K: Copy + Eq + Hash + Debug + Send + Sync + 'static,
{
    let mut backoff = config.backoff_initial;
    let replay_address = config.replay_port.map(|port| with_port(&address, port));
    loop {
        let mut options = SocketOptions::default();
        options.connect_timeout(config.connect_timeout);
        let mut socket = SubSocket::with_options(options);
        let connected = async {
            socket.connect(&address).await?;
            socket.subscribe(&config.topic_filter).await
        };
        if let Err(error) = connected.await {
            counters.connect_failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(endpoint = ?key, %address, %error, ?backoff, "kv-events connect failed");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(config.backoff_max);
            continue;
        }
        counters.connects.fetch_add(1, Ordering::Relaxed);
        backoff = config.backoff_initial;
        loop {
            match socket.recv().await {
                Ok(message) => {
                    if let Some(replay) = replay_address.as_deref() {
                        fill_gap(key, &message, replay, &index, &config, &counters).await;
                    }
                    handle(key, &message, &index, &config, &counters);
                }
                Err(error) => {
                    counters.disconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(endpoint = ?key, %address, %error, "kv-events socket failed");
                    break;
                }
            }
        }
        tokio::time::sleep(backoff).await;
    }
}

fn handle<K>(
    key: K,
    message: &ZmqMessage,
    index: &PreciseIndex<K>,
    config: &SubscriberConfig,
    counters: &Counters,
) where
    K: Copy + Eq + Hash + Debug,
{
    let frames = (message.get(0), message.get(1), message.get(2), message.get(3));
    let (Some(topic), Some(seq), Some(payload), None) = frames else {
        counters.malformed_messages.fetch_add(1, Ordering::Relaxed);
        index.mark_gap(key);
        return;
    };
    let Ok(seq) = <[u8; 8]>::try_from(seq.as_ref()) else {
        counters.malformed_messages.fetch_add(1, Ordering::Relaxed);
        index.mark_gap(key);
        return;
    };
    counters.messages.fetch_add(1, Ordering::Relaxed);
    let model = model_from_topic(topic).unwrap_or(&config.default_model);
    if let Err(error) = index.ingest(key, u64::from_be_bytes(seq), model, payload) {
        tracing::debug!(endpoint = ?key, %error, "kv-events message not applied");
    }
}

/// `tcp://host:port` with another port.
fn with_port(address: &str, port: u16) -> String {
    match address.rfind(':') {
        Some(at) if !address[..at].ends_with('/') => format!("{}:{port}", &address[..at]),
        _ => format!("{address}:{port}"),
    }
}

/// Most messages one replay applies.
const MAX_REPLAYED: u64 = 100_000;

/// When `message` comes after a gap, asks the replay socket for the missing messages and
/// applies those it gets, in order, before `message` is handled.
async fn fill_gap<K>(
    key: K,
    message: &ZmqMessage,
    replay: &str,
    index: &PreciseIndex<K>,
    config: &SubscriberConfig,
    counters: &Counters,
) where
    K: Copy + Eq + Hash + Debug,
{
    let seq = message.get(1).and_then(|s| <[u8; 8]>::try_from(s.as_ref()).ok());
    let (Some(seq), Some(expected)) = (seq.map(u64::from_be_bytes), index.expected_seq(key)) else {
        return;
    };
    if seq <= expected || seq - expected > MAX_REPLAYED {
        return;
    }
    counters.replays.fetch_add(1, Ordering::Relaxed);
    let topic = message.get(0).map(|t| t.to_vec()).unwrap_or_default();
    let model = model_from_topic(&topic).unwrap_or(&config.default_model).to_owned();
    let fetched = tokio::time::timeout(config.replay_timeout, fetch(replay, expected, seq)).await;
    let Ok(Ok(batches)) = fetched else {
        tracing::debug!(endpoint = ?key, %replay, "kv-events replay failed");
        return;
    };
    for (s, payload) in batches {
        if index.ingest(key, s, &model, &payload).is_ok() {
            counters.replayed_messages.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The replayed messages numbered `from..until`, in order.
async fn fetch(
    address: &str,
    from: u64,
    until: u64,
) -> Result<Vec<(u64, bytes::Bytes)>, zeromq::ZmqError> {
    let mut dealer = DealerSocket::new();
    dealer.connect(address).await?;
    let mut request = ZmqMessage::from(Vec::<u8>::new());
    request.push_back(bytes::Bytes::copy_from_slice(&from.to_be_bytes()));
    dealer.send(request).await?;
    let mut out = Vec::new();
    loop {
        let reply = dealer.recv().await?;
        // ["", seq, payload]; seq -1 ends the replay.
        let Some(seq) = reply.get(1).and_then(|s| <[u8; 8]>::try_from(s.as_ref()).ok()) else {
            continue;
        };
        let seq = i64::from_be_bytes(seq);
        if seq < 0 {
            return Ok(out);
        }
        let seq = seq as u64;
        if (from..until).contains(&seq)
            && let Some(payload) = reply.get(2)
        {
            out.push((seq, payload.clone()));
        }
    }
}
