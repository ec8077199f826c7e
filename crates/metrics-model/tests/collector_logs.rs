//! A failing endpoint is logged when it starts failing and when its metrics turn stale, not on
//! every scrape; recovery is logged once.
//!
//! Its own test binary, because it installs a process-wide log subscriber.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use metrics_model::{CollectorConfig, Engine, MetricsCollector};
use scheduler_core::{Endpoint, PoolSnapshot, SharedPool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{Event, Level, Metadata, Subscriber, span};

/// Counts warn and info events of the collector module.
struct CountingSubscriber {
    warnings: Arc<AtomicUsize>,
    infos: Arc<AtomicUsize>,
}

impl Subscriber for CountingSubscriber {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.target().starts_with("metrics_model")
    }
    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }
    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, event: &Event<'_>) {
        match *event.metadata().level() {
            Level::WARN => self.warnings.fetch_add(1, Ordering::SeqCst),
            Level::INFO => self.infos.fetch_add(1, Ordering::SeqCst),
            _ => 0,
        };
    }
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}

/// A minimal HTTP/1.0-style server: one response per connection, 500 or a page.
async fn start_server(healthy: Arc<AtomicBool>, requests: Arc<AtomicUsize>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let healthy = healthy.load(Ordering::SeqCst);
            requests.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buffer = [0u8; 4096];
                let _ = stream.read(&mut buffer).await;
                let (status, body) = if healthy {
                    (
                        "200 OK",
                        "vllm:num_requests_waiting 1\nvllm:num_requests_running 2\n\
                         vllm:kv_cache_usage_perc 0.5\n",
                    )
                } else {
                    ("500 Internal Server Error", "boom")
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    address
}

async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < Duration::from_secs(20), "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_logged_on_change_not_on_every_scrape() {
    let warnings = Arc::new(AtomicUsize::new(0));
    let infos = Arc::new(AtomicUsize::new(0));
    tracing::subscriber::set_global_default(CountingSubscriber {
        warnings: Arc::clone(&warnings),
        infos: Arc::clone(&infos),
    })
    .expect("the only subscriber in this binary");

    let healthy = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicUsize::new(0));
    let address = start_server(Arc::clone(&healthy), Arc::clone(&requests)).await;
    let pool = Arc::new(SharedPool::new(PoolSnapshot::default()));
    let config = CollectorConfig {
        interval: Duration::from_millis(10),
        scrape_timeout: Duration::from_millis(100),
        staleness_threshold: Duration::from_millis(200),
        ..CollectorConfig::default()
    };
    let collector = MetricsCollector::start(Arc::clone(&pool), config).expect("in a runtime");
    collector.upsert_endpoint(Endpoint::new(address), Engine::Vllm);

    // Dozens of failed scrapes spanning the staleness threshold.
    let start = Instant::now();
    eventually("many scrapes have failed", || {
        requests.load(Ordering::SeqCst) >= 40 && start.elapsed() > Duration::from_millis(400)
    })
    .await;
    let warned = warnings.load(Ordering::SeqCst);
    assert!((1..=2).contains(&warned), "first failure and stale crossing only, got {warned}");

    healthy.store(true, Ordering::SeqCst);
    let id = Endpoint::new(address).id;
    eventually("metrics arrive", || {
        pool.load().by_id(id).is_some_and(|state| state.metrics.updated_at.is_some())
    })
    .await;
    eventually("recovery is logged", || infos.load(Ordering::SeqCst) == 1).await;
    let before = requests.load(Ordering::SeqCst);
    eventually("more healthy scrapes", || requests.load(Ordering::SeqCst) >= before + 10).await;
    assert_eq!(infos.load(Ordering::SeqCst), 1, "recovery is logged once");
    assert_eq!(warnings.load(Ordering::SeqCst), warned, "no warnings while healthy");
    collector.shutdown().await;
}
