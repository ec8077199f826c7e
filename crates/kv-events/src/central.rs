//! llm-d's "global socket" mode: one SUB socket that the engines connect to, instead of (or
//! besides) one subscription per engine.
//!
//! # Behaviour
//! * The socket **binds** `zmqEndpoint` (llm-d binds there too; the engines' vLLM
//!   `--kv-events-config` then names it as their `endpoint` and connect). A host of `*` means
//!   every interface, as in libzmq. The address is bound when [`CentralSubscriber::bind`]
//!   returns, so a port already in use is reported at configuration time.
//! * Each message is attributed to an endpoint by its topic, llm-d's `kv@<pod>@<model>`: a
//!   topic of exactly three `@`-separated parts names the pod in its middle part and the model
//!   in its last; any other topic is taken as the pod identifier as a whole (llm-d's
//!   `parseTopic`). The pod identifier is looked up among the names the caller routes with
//!   [`CentralSubscriber::set_routes`] (typically the endpoint's `ip:port`, its IP and its pod
//!   name); a name shared by two endpoints routes to neither.
//! * A message whose pod is not routed is counted ([`CentralStats::unknown_publishers`]) and
//!   dropped. Nothing is remembered per topic, so unknown or hostile topics cost no memory.
//! * Sequence numbers are checked per endpoint by the index ([`PreciseIndex::ingest`]): every
//!   publisher has its own numbering, so a gap in one publisher's stream untrusts only its
//!   endpoint. A message with a bad sequence frame untrusts the endpoint its topic names.
//! * There is no replay in this mode (llm-d has none there either): a gap stays until the
//!   engine clears or restarts.

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use zeromq::{Socket, SocketRecv, SubSocket, ZmqMessage};

use crate::index::PreciseIndex;

/// Settings of the central socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CentralConfig {
    /// Where to bind, `tcp://<host>:<port>` (llm-d's `zmqEndpoint`, e.g. `tcp://*:5557`).
    pub endpoint: String,
    /// ZMQ subscription prefix (llm-d's `topicFilter`); empty takes every topic.
    pub topic_filter: String,
    /// The model name when the topic does not carry one.
    pub default_model: String,
}

/// Why the central socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CentralError {
    /// Not a `tcp://host:port` address.
    #[error("zmqEndpoint {0:?}: expected tcp://<host>:<port>")]
    Address(String),
    /// The address could not be bound.
    #[error("zmqEndpoint {endpoint:?}: {source}")]
    Bind {
        /// The configured address.
        endpoint: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A snapshot of the central socket's counters, all monotonic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CentralStats {
    /// Messages received (of any shape).
    pub messages: u64,
    /// Messages not of the form `[topic, 8-byte seq, payload]`.
    pub malformed_messages: u64,
    /// Messages whose topic names no routed endpoint.
    pub unknown_publishers: u64,
    /// Times the socket failed and was bound again.
    pub rebinds: u64,
}

#[derive(Debug, Default)]
struct Counters {
    messages: AtomicU64,
    malformed_messages: AtomicU64,
    unknown_publishers: AtomicU64,
    rebinds: AtomicU64,
}

/// Pod identifier to endpoint.
type Routes<K> = ArcSwap<HashMap<String, K>>;

/// The central SUB socket and the routing of its topics to endpoints.
pub struct CentralSubscriber<K> {
    local: std::net::SocketAddr,
    routes: Arc<Routes<K>>,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl<K> Debug for CentralSubscriber<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CentralSubscriber")
            .field("local", &self.local)
            .field("routes", &self.routes.load().len())
            .finish_non_exhaustive()
    }
}

impl<K> Drop for CentralSubscriber<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The socket address a `tcp://host:port` endpoint binds, `*` meaning every interface.
fn bind_target(endpoint: &str) -> Option<String> {
    let rest = endpoint.strip_prefix("tcp://")?;
    let (host, port) = rest.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    match host {
        "" => None,
        "*" => Some(format!("0.0.0.0:{port}")),
        _ => Some(rest.to_owned()),
    }
}

impl<K> CentralSubscriber<K>
where
    K: Copy + Eq + Hash + Debug + Send + Sync + 'static,
{
    /// Binds `config.endpoint` now and receives on `runtime`, feeding `index`. No topic is
    /// routed until [`set_routes`](Self::set_routes).
    pub fn bind(
        index: Arc<PreciseIndex<K>>,
        config: CentralConfig,
        runtime: &Handle,
    ) -> Result<Self, CentralError> {
        let target = bind_target(&config.endpoint)
            .ok_or_else(|| CentralError::Address(config.endpoint.clone()))?;
        let bind_error = |source| CentralError::Bind { endpoint: config.endpoint.clone(), source };
        let listener = std::net::TcpListener::bind(target.as_str()).map_err(bind_error)?;
        let local = listener.local_addr().map_err(bind_error)?;
        let routes: Arc<Routes<K>> = Arc::new(ArcSwap::from_pointee(HashMap::new()));
        let counters = Arc::new(Counters::default());
        let task = runtime.spawn(run(
            listener,
            local,
            index,
            Arc::new(config),
            Arc::clone(&routes),
            Arc::clone(&counters),
        ));
        Ok(Self { local, routes, counters, task })
    }

    /// The bound address (with the port the system chose when the configured one was 0).
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.local
    }

    /// Routes topics to endpoints: each endpoint with the pod identifiers its publishers may
    /// use. An identifier given for two different endpoints is ambiguous and routes nowhere.
    pub fn set_routes<I, N>(&self, endpoints: I)
    where
        I: IntoIterator<Item = (K, N)>,
        N: IntoIterator<Item = String>,
    {
        let mut routes: HashMap<String, Option<K>> = HashMap::new();
        for (key, names) in endpoints {
            for name in names {
                routes
                    .entry(name)
                    .and_modify(|slot| {
                        if *slot != Some(key) {
                            *slot = None;
                        }
                    })
                    .or_insert(Some(key));
            }
        }
        let routes = routes.into_iter().filter_map(|(name, key)| Some((name, key?))).collect();
        self.routes.store(Arc::new(routes));
    }

    /// The endpoint a topic is attributed to, if it is routed.
    pub fn route(&self, topic: &[u8]) -> Option<K> {
        route(&self.routes.load(), topic)
    }

    /// The counters so far.
    pub fn stats(&self) -> CentralStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CentralStats {
            messages: get(&c.messages),
            malformed_messages: get(&c.malformed_messages),
            unknown_publishers: get(&c.unknown_publishers),
            rebinds: get(&c.rebinds),
        }
    }
}

/// The pod identifier and the model of an llm-d topic, as llm-d's `parseTopic` reads them.
pub fn parse_topic(topic: &str) -> (&str, Option<&str>) {
    let mut parts = topic.split('@');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(_), Some(pod), Some(model), None) => (pod, Some(model).filter(|m| !m.is_empty())),
        _ => (topic, None),
    }
}

fn route<K: Copy>(routes: &HashMap<String, K>, topic: &[u8]) -> Option<K> {
    let topic = std::str::from_utf8(topic).ok()?;
    routes.get(parse_topic(topic).0).copied()
}

async fn run<K>(
    listener: std::net::TcpListener,
    local: std::net::SocketAddr,
    index: Arc<PreciseIndex<K>>,
    config: Arc<CentralConfig>,
    routes: Arc<Routes<K>>,
    counters: Arc<Counters>,
) where
    K: Copy + Eq + Hash + Debug + Send + Sync + 'static,
{
    let mut listener = Some(listener);
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut socket = SubSocket::new();
        let bound = match listener.take() {
            Some(listener) => socket.bind_listener(listener).await.map(drop),
            None => socket.bind(&format!("tcp://{local}")).await.map(drop),
        };
        if let Err(error) = bound {
            tracing::warn!(%local, %error, "kv-events central socket: bind failed");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
            continue;
        }
        if let Err(error) = socket.subscribe(&config.topic_filter).await {
            tracing::warn!(%local, %error, "kv-events central socket: subscribe failed");
            tokio::time::sleep(backoff).await;
            continue;
        }
        backoff = Duration::from_millis(100);
        loop {
            match socket.recv().await {
                Ok(message) => handle(&message, &index, &config, &routes, &counters),
                Err(error) => {
                    tracing::warn!(%local, %error, "kv-events central socket failed");
                    break;
                }
            }
        }
        counters.rebinds.fetch_add(1, Ordering::Relaxed);
        // The old socket must release the port before it is bound again.
        drop(socket);
        tokio::time::sleep(backoff).await;
    }
}

fn handle<K>(
    message: &ZmqMessage,
    index: &PreciseIndex<K>,
    config: &CentralConfig,
    routes: &Routes<K>,
    counters: &Counters,
) where
    K: Copy + Eq + Hash + Debug,
{
    counters.messages.fetch_add(1, Ordering::Relaxed);
    let Some(topic) = message.get(0) else {
        counters.malformed_messages.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let Some(key) = route(&routes.load(), topic) else {
        counters.unknown_publishers.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let frames = (message.get(1), message.get(2), message.get(3));
    let (Some(seq), Some(payload), None) = frames else {
        counters.malformed_messages.fetch_add(1, Ordering::Relaxed);
        index.mark_gap(key);
        return;
    };
    let Ok(seq) = <[u8; 8]>::try_from(seq.as_ref()) else {
        counters.malformed_messages.fetch_add(1, Ordering::Relaxed);
        index.mark_gap(key);
        return;
    };
    // The topic is UTF-8: it was routed.
    let topic = std::str::from_utf8(topic).unwrap_or_default();
    let model = parse_topic(topic).1.unwrap_or(&config.default_model);
    if let Err(error) = index.ingest(key, u64::from_be_bytes(seq), model, payload) {
        tracing::debug!(endpoint = ?key, %error, "kv-events message not applied");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_parse_as_llm_d_parses_them() {
        assert_eq!(parse_topic("kv@10.0.0.1:8000@llama"), ("10.0.0.1:8000", Some("llama")));
        assert_eq!(parse_topic("kv@pod-a@"), ("pod-a", None));
        assert_eq!(parse_topic("kv@a@b@c"), ("kv@a@b@c", None));
        assert_eq!(parse_topic("pod-a"), ("pod-a", None));
        assert_eq!(parse_topic(""), ("", None));
    }

    #[test]
    fn bind_targets() {
        assert_eq!(bind_target("tcp://*:5557").as_deref(), Some("0.0.0.0:5557"));
        assert_eq!(bind_target("tcp://0.0.0.0:5557").as_deref(), Some("0.0.0.0:5557"));
        assert_eq!(bind_target("tcp://[::]:5557").as_deref(), Some("[::]:5557"));
        assert_eq!(bind_target("tcp://epp:5557").as_deref(), Some("epp:5557"));
        for bad in ["ipc:///tmp/x", "tcp://:5557", "tcp://host", "tcp://host:99999", "", "tcp://"] {
            assert_eq!(bind_target(bad), None, "{bad}");
        }
    }

    fn subscriber(runtime: &tokio::runtime::Runtime) -> CentralSubscriber<u32> {
        let processor = crate::TokenProcessor::new(&crate::TokenProcessorConfig::default());
        let index = Arc::new(PreciseIndex::new(processor, crate::IndexConfig::default()));
        let config = CentralConfig {
            endpoint: "tcp://127.0.0.1:0".into(),
            topic_filter: String::new(),
            default_model: String::new(),
        };
        CentralSubscriber::bind(index, config, runtime.handle()).unwrap()
    }

    #[test]
    fn routes_resolve_and_ambiguous_names_route_nowhere() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let central = subscriber(&runtime);
        let names =
            |addr: &str, ip: &str, pod: &str| vec![addr.to_owned(), ip.to_owned(), pod.to_owned()];
        central.set_routes([
            (1, names("10.0.0.1:8000", "10.0.0.1", "pod-a")),
            (2, names("10.0.0.1:8001", "10.0.0.1", "pod-b")),
            (3, names("10.0.0.3:8000", "10.0.0.3", "pod-c")),
        ]);
        assert_eq!(central.route(b"kv@10.0.0.1:8000@m"), Some(1));
        assert_eq!(central.route(b"kv@10.0.0.1:8001@m"), Some(2));
        assert_eq!(central.route(b"kv@10.0.0.1@m"), None, "shared by two endpoints");
        assert_eq!(central.route(b"kv@10.0.0.3@m"), Some(3));
        assert_eq!(central.route(b"kv@pod-c@m"), Some(3));
        assert_eq!(central.route(b"pod-c"), Some(3));
        assert_eq!(central.route(b"kv@10.0.0.9:8000@m"), None);
        assert_eq!(central.route(b"kv@\xff\xfe@m"), None);
        assert_eq!(central.route(b""), None);
        // Routes are replaced, not merged.
        central.set_routes([(3, vec!["pod-c".to_owned()])]);
        assert_eq!(central.route(b"kv@10.0.0.1:8000@m"), None);
        assert_eq!(central.route(b"kv@pod-c@m"), Some(3));
    }

    #[test]
    fn a_bad_address_or_a_port_in_use_is_an_error() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let processor = crate::TokenProcessor::new(&crate::TokenProcessorConfig::default());
        let index = Arc::new(PreciseIndex::<u32>::new(processor, crate::IndexConfig::default()));
        let config = |endpoint: String| CentralConfig {
            endpoint,
            topic_filter: String::new(),
            default_model: String::new(),
        };
        let error = CentralSubscriber::bind(
            Arc::clone(&index),
            config("ipc:///x".into()),
            runtime.handle(),
        )
        .unwrap_err();
        assert!(matches!(error, CentralError::Address(_)), "{error}");
        let first = CentralSubscriber::bind(
            Arc::clone(&index),
            config("tcp://127.0.0.1:0".into()),
            runtime.handle(),
        )
        .unwrap();
        let taken = format!("tcp://127.0.0.1:{}", first.local_addr().port());
        let error = CentralSubscriber::bind(index, config(taken), runtime.handle()).unwrap_err();
        assert!(matches!(error, CentralError::Bind { .. }), "{error}");
    }
}
