//! The collector against real HTTP servers on 127.0.0.1: healthy, hanging, failing, garbage,
//! resetting and oversized pages, recovery, and endpoints coming and going.
//!
//! Every wait polls the snapshot until an expected state holds, within a generous deadline, so
//! the tests stay reliable on a loaded machine.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_model::{CollectorConfig, Engine, MetricsCollector};
use parking_lot::Mutex;
use scheduler_core::{Endpoint, EndpointId, EndpointMetrics, PoolSnapshot, SharedPool};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const DEADLINE: Duration = Duration::from_secs(20);

/// What a fake model server does with the next request.
#[derive(Clone, Debug)]
enum Behaviour {
    Page(String),
    Hang,
    ServerError,
    Garbage,
    NotUtf8,
    Reset,
}

struct FakeServer {
    address: SocketAddr,
    behaviour: Arc<Mutex<Behaviour>>,
    requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl FakeServer {
    async fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind an ephemeral port");
        let address = listener.local_addr().expect("local address");
        let behaviour = Arc::new(Mutex::new(behaviour));
        let requests = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(serve(listener, Arc::clone(&behaviour), Arc::clone(&requests)));
        Self { address, behaviour, requests, task }
    }

    fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock() = behaviour;
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::new(self.address)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    listener: TcpListener,
    behaviour: Arc<Mutex<Behaviour>>,
    requests: Arc<AtomicUsize>,
) {
    let mut connections = tokio::task::JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        if matches!(*behaviour.lock(), Behaviour::Reset) {
            requests.fetch_add(1, Ordering::SeqCst);
            // Close with RST instead of FIN: the client sees "connection reset".
            let _ = stream.set_zero_linger();
            drop(stream);
            continue;
        }
        let behaviour = Arc::clone(&behaviour);
        let requests = Arc::clone(&requests);
        let service = service_fn(move |_request| {
            let behaviour = behaviour.lock().clone();
            requests.fetch_add(1, Ordering::SeqCst);
            async move {
                let response = match behaviour {
                    Behaviour::Page(page) => Response::new(Full::new(Bytes::from(page))),
                    Behaviour::Hang => std::future::pending().await,
                    Behaviour::ServerError => {
                        let mut response = Response::new(Full::new(Bytes::from("boom")));
                        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                        response
                    }
                    Behaviour::Garbage => Response::new(Full::new(Bytes::from(
                        "<html><body>{\"not\": \"metrics\"}</body></html>\n",
                    ))),
                    Behaviour::NotUtf8 => {
                        Response::new(Full::new(Bytes::from_static(&[0xff, 0xfe, b' ', 0x80])))
                    }
                    // Existing keep-alive connections also get reset on their next request.
                    Behaviour::Reset => return Err("reset"),
                };
                Ok::<_, &'static str>(response)
            }
        });
        connections.spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn vllm_page(waiting: u32) -> String {
    format!(
        "# TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{model_name=\"m\"}} {waiting}.0\n\
         vllm:num_requests_running{{model_name=\"m\"}} 2.0\n\
         vllm:kv_cache_usage_perc{{model_name=\"m\"}} 0.5\n"
    )
}

fn test_config() -> CollectorConfig {
    CollectorConfig {
        interval: Duration::from_millis(20),
        scrape_timeout: Duration::from_millis(150),
        staleness_threshold: Duration::from_millis(500),
        ..CollectorConfig::default()
    }
}

fn metrics_of(pool: &SharedPool, id: EndpointId) -> Option<EndpointMetrics> {
    pool.load().by_id(id).map(|state| state.metrics.clone())
}

fn is_fresh(pool: &SharedPool, id: EndpointId, threshold: Duration) -> bool {
    metrics_of(pool, id).is_some_and(|m| !m.is_stale(Instant::now(), threshold))
}

/// Polls `condition` until it holds; fails the test with `what` after the deadline.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn start_collector(config: CollectorConfig) -> (Arc<SharedPool>, MetricsCollector) {
    let pool = Arc::new(SharedPool::new(PoolSnapshot::default()));
    let collector = MetricsCollector::start(Arc::clone(&pool), config).expect("inside a runtime");
    (pool, collector)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_pages_fill_the_snapshot() {
    let vllm = FakeServer::start(Behaviour::Page(include_str!("data/vllm.prom").into())).await;
    let sglang = FakeServer::start(Behaviour::Page(include_str!("data/sglang.prom").into())).await;
    let trtllm = FakeServer::start(Behaviour::Page(include_str!("data/trtllm.prom").into())).await;
    let (pool, collector) = start_collector(test_config());
    collector.upsert_endpoint(vllm.endpoint(), Engine::Vllm);
    collector.upsert_endpoint(sglang.endpoint(), "sglang".parse().expect("known engine"));
    collector.upsert_endpoint(trtllm.endpoint(), Engine::TrtLlm);
    assert_eq!(pool.load().len(), 3, "endpoints are in the pool before their first scrape");

    let ids = [vllm.endpoint().id, sglang.endpoint().id, trtllm.endpoint().id];
    eventually("every endpoint has metrics", || {
        ids.iter().all(|&id| metrics_of(&pool, id).is_some_and(|m| m.updated_at.is_some()))
    })
    .await;
    let figures = |id| {
        let m = metrics_of(&pool, id).expect("present");
        (m.waiting_queue, m.running, m.kv_usage)
    };
    assert_eq!(figures(ids[0]), (6, 21, 0.5873));
    assert_eq!(figures(ids[1]), (12, 58, 0.61));
    assert_eq!(figures(ids[2]), (4, 24, 0.71));
    let vllm_metrics = metrics_of(&pool, ids[0]).expect("present");
    assert_eq!(vllm_metrics.kv_capacity_blocks, Some(27153));
    assert_eq!(vllm_metrics.max_lora_adapters, 4);

    // Scrapes keep coming on the interval: the update time moves forward.
    let first = metrics_of(&pool, ids[0]).and_then(|m| m.updated_at);
    eventually("a newer scrape is published", || {
        metrics_of(&pool, ids[0]).and_then(|m| m.updated_at) > first
    })
    .await;
    collector.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_endpoints_keep_their_last_metrics_and_go_stale_then_recover() {
    let config = test_config();
    let threshold = config.staleness_threshold;
    let healthy = FakeServer::start(Behaviour::Page(vllm_page(1))).await;
    let failing = [
        FakeServer::start(Behaviour::Page(vllm_page(2))).await,
        FakeServer::start(Behaviour::Page(vllm_page(3))).await,
        FakeServer::start(Behaviour::Page(vllm_page(4))).await,
        FakeServer::start(Behaviour::Page(vllm_page(5))).await,
        FakeServer::start(Behaviour::Page(vllm_page(6))).await,
    ];
    let (pool, collector) = start_collector(config);
    collector.upsert_endpoint(healthy.endpoint(), Engine::Vllm);
    for server in &failing {
        collector.upsert_endpoint(server.endpoint(), Engine::Vllm);
    }
    let healthy_id = healthy.endpoint().id;
    let failing_ids: Vec<EndpointId> = failing.iter().map(|s| s.endpoint().id).collect();
    eventually("all endpoints are fresh", || {
        is_fresh(&pool, healthy_id, threshold)
            && failing_ids.iter().all(|&id| is_fresh(&pool, id, threshold))
    })
    .await;

    let breakages = [
        Behaviour::Hang,
        Behaviour::ServerError,
        Behaviour::Garbage,
        Behaviour::NotUtf8,
        Behaviour::Reset,
    ];
    for (server, behaviour) in failing.iter().zip(breakages) {
        server.set(behaviour);
    }
    eventually("the broken endpoints are stale while the healthy one stays fresh", || {
        is_fresh(&pool, healthy_id, threshold)
            && failing_ids.iter().all(|&id| !is_fresh(&pool, id, threshold))
    })
    .await;
    for (index, &id) in failing_ids.iter().enumerate() {
        let kept = metrics_of(&pool, id).expect("still in the pool");
        assert_eq!(kept.waiting_queue, index as u32 + 2, "the last good metrics are kept");
        assert!(kept.updated_at.is_some());
    }
    assert!(
        failing.iter().all(|server| server.requests() > 0),
        "the collector kept scraping the broken endpoints"
    );

    for (index, server) in failing.iter().enumerate() {
        server.set(Behaviour::Page(vllm_page(100 + index as u32)));
    }
    eventually("every endpoint recovered with new metrics", || {
        failing_ids.iter().enumerate().all(|(index, &id)| {
            is_fresh(&pool, id, threshold)
                && metrics_of(&pool, id).is_some_and(|m| m.waiting_queue == 100 + index as u32)
        })
    })
    .await;
    collector.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_are_added_and_removed_at_runtime() {
    let first = FakeServer::start(Behaviour::Page(vllm_page(1))).await;
    let second = FakeServer::start(Behaviour::Page(
        "sglang:num_queue_reqs 8\nsglang:num_running_reqs 1\nsglang:token_usage 0.1\n".into(),
    ))
    .await;
    let (pool, collector) = start_collector(test_config());
    let (first_id, second_id) = (first.endpoint().id, second.endpoint().id);

    collector.upsert_endpoint(first.endpoint().with_name("pod-a"), Engine::Vllm);
    eventually("the first endpoint is scraped", || {
        metrics_of(&pool, first_id).is_some_and(|m| m.waiting_queue == 1)
    })
    .await;
    collector.upsert_endpoint(second.endpoint(), Engine::Sglang);
    eventually("the second endpoint is scraped", || {
        metrics_of(&pool, second_id).is_some_and(|m| m.waiting_queue == 8)
    })
    .await;

    assert!(collector.remove_endpoint(first_id));
    assert!(!collector.remove_endpoint(first_id), "already gone");
    assert_eq!(collector.endpoints(), [second_id], "no scrape task is left for it");
    assert!(pool.load().by_id(first_id).is_none());

    // Let several more scrapes of the other endpoint land: the removed one never comes back,
    // and its server stops being asked.
    let requests_after_removal = first.requests();
    for _ in 0..3 {
        let seen = metrics_of(&pool, second_id).and_then(|m| m.updated_at);
        eventually("the remaining endpoint is scraped again", || {
            metrics_of(&pool, second_id).and_then(|m| m.updated_at) > seen
        })
        .await;
        assert!(pool.load().by_id(first_id).is_none(), "a removed endpoint stays removed");
    }
    assert!(first.requests() <= requests_after_removal + 1, "at most an in-flight scrape");

    // Upserting a known endpoint keeps its metrics and switches its engine.
    second.set(Behaviour::Page(vllm_page(9)));
    collector.upsert_endpoint(second.endpoint().with_name("renamed"), Engine::Vllm);
    let state = pool.load().by_id(second_id).cloned().expect("present");
    assert_eq!(&*state.endpoint.name, "renamed");
    assert_eq!(state.metrics.waiting_queue, 8, "metrics survive the upsert");
    eventually("the new engine's mapping is used", || {
        metrics_of(&pool, second_id).is_some_and(|m| m.waiting_queue == 9)
    })
    .await;
    assert_eq!(collector.endpoints().len(), 1);

    // Re-adding the removed endpoint starts over from its server.
    collector.upsert_endpoint(first.endpoint(), Engine::Vllm);
    eventually("the re-added endpoint is scraped", || {
        metrics_of(&pool, first_id).is_some_and(|m| m.updated_at.is_some())
    })
    .await;
    assert_eq!(pool.load().len(), 2);
    collector.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_pages_are_refused() {
    let big = FakeServer::start(Behaviour::Page(include_str!("data/vllm.prom").into())).await;
    let small = FakeServer::start(Behaviour::Page(vllm_page(1))).await;
    let config = CollectorConfig { max_body_bytes: 4096, ..test_config() };
    let (pool, collector) = start_collector(config);
    collector.upsert_endpoint(big.endpoint(), Engine::Vllm);
    collector.upsert_endpoint(small.endpoint(), Engine::Vllm);
    let small_id = small.endpoint().id;
    for _ in 0..3 {
        let seen = metrics_of(&pool, small_id).and_then(|m| m.updated_at);
        eventually("the small page is scraped", || {
            metrics_of(&pool, small_id).and_then(|m| m.updated_at) > seen
        })
        .await;
    }
    eventually("the big server was asked", || big.requests() >= 2).await;
    let big_metrics = metrics_of(&pool, big.endpoint().id).expect("in the pool");
    assert_eq!(big_metrics.updated_at, None, "an oversized page is never used");
    collector.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_collector_stops_scraping() {
    let server = FakeServer::start(Behaviour::Page(vllm_page(1))).await;
    let (pool, collector) = start_collector(test_config());
    collector.upsert_endpoint(server.endpoint(), Engine::Vllm);
    eventually("scraping has started", || server.requests() >= 2).await;
    drop(collector);
    // Give an in-flight scrape time to finish, then check that no new ones start.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let generation = pool.load().generation();
    let requests = server.requests();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.requests(), requests, "no scrapes after the drop");
    assert_eq!(pool.load().generation(), generation, "no publishes after the drop");
}

/// Records the size of every snapshot published with a different set of endpoints.
#[derive(Debug, Default)]
struct MembershipLog(Mutex<Vec<usize>>);

impl scheduler_core::PoolObserver for MembershipLog {
    fn membership_changed(&self, pool: &PoolSnapshot) {
        self.0.lock().push(pool.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_endpoint_set_is_one_snapshot_and_unchanged_endpoints_keep_their_scraper() {
    let servers = [
        FakeServer::start(Behaviour::Page(vllm_page(1))).await,
        FakeServer::start(Behaviour::Page(vllm_page(2))).await,
        FakeServer::start(Behaviour::Page(vllm_page(3))).await,
    ];
    let (pool, collector) = start_collector(test_config());
    let log = Arc::new(MembershipLog::default());
    pool.subscribe(log.clone());
    let vllm = |server: &FakeServer| (server.endpoint(), Engine::Vllm);

    collector.set_endpoints(vec![vllm(&servers[0]), vllm(&servers[1])]);
    assert_eq!(collector.scrapers_started(), 2);
    let kept = servers[1].endpoint().id;
    eventually("the kept endpoint is scraped", || {
        metrics_of(&pool, kept).is_some_and(|m| m.updated_at.is_some())
    })
    .await;

    // Replace one endpoint and keep the other (with a new label: a re-declaration).
    let relabelled = servers[1].endpoint().with_label("tier", "gold");
    collector.set_endpoints(vec![(relabelled, Engine::Vllm), vllm(&servers[2])]);
    assert_eq!(collector.scrapers_started(), 3, "only the new endpoint starts a scraper");
    assert_eq!(*log.0.lock(), vec![2, 2], "one snapshot per change, never a partial pool");
    let snapshot = pool.load();
    assert!(snapshot.by_id(servers[0].endpoint().id).is_none());
    let kept_state = snapshot.by_id(kept).expect("kept");
    assert_eq!(kept_state.endpoint.labels["tier"], "gold");
    assert!(kept_state.metrics.updated_at.is_some(), "the kept endpoint keeps its metrics");
    let mut scraped: Vec<EndpointId> = collector.endpoints();
    scraped.sort();
    let mut expected = vec![kept, servers[2].endpoint().id];
    expected.sort();
    assert_eq!(scraped, expected);

    // A changed engine is a new scraper.
    collector.set_endpoints(vec![(servers[1].endpoint(), Engine::Sglang), vllm(&servers[2])]);
    assert_eq!(collector.scrapers_started(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_pages_are_parsed_off_the_runtime_workers_and_still_read() {
    let mut page = vllm_page(4);
    for index in 0..12_000 {
        page.push_str(&format!("unrelated_series{{index=\"{index}\"}} 1\n"));
    }
    assert!(page.len() > 256 * 1024, "exercises the blocking parse");
    let server = FakeServer::start(Behaviour::Page(page)).await;
    let (pool, collector) = start_collector(test_config());
    collector.upsert_endpoint(server.endpoint(), Engine::Vllm);
    let id = server.endpoint().id;
    eventually("the large page's metrics arrive", || {
        metrics_of(&pool, id).is_some_and(|metrics| metrics.waiting_queue == 4)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_port_reads_metrics_apart_from_the_serving_port() {
    let metrics = FakeServer::start(Behaviour::Page(vllm_page(7))).await;
    // The endpoint serves on a port where nothing answers; its metrics live on another.
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind an ephemeral port");
    let serving = closed.local_addr().expect("local address");
    drop(closed);
    let config = CollectorConfig { scrape_port: Some(metrics.address.port()), ..test_config() };
    let (pool, collector) = start_collector(config);
    let endpoint = Endpoint::new(serving);
    let id = endpoint.id;
    collector.upsert_endpoint(endpoint, Engine::Vllm);
    eventually("the metrics port is scraped", || {
        metrics_of(&pool, id).is_some_and(|m| m.waiting_queue == 7)
    })
    .await;
    assert_eq!(pool.load().by_id(id).map(|state| state.endpoint.address), Some(serving));
    collector.shutdown().await;
}
