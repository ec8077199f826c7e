//! HTTPS scrapes against a TLS metrics server on 127.0.0.1 with a certificate made in the test:
//! accepted without verification, refused when the certificate is not trusted, verified against
//! a CA file, and a client identity presented to a server that requires one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use metrics_model::{
    CollectorConfig, Engine, MetricsCollector, ScrapeTls, TlsSettings, TlsSettingsError,
};
use rcgen::CertifiedKey;
use scheduler_core::{Endpoint, EndpointId, PoolSnapshot, SharedPool};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};

const DEADLINE: Duration = Duration::from_secs(20);

const PAGE: &str = "# TYPE vllm:num_requests_waiting gauge\n\
                    vllm:num_requests_waiting{model_name=\"m\"} 7.0\n\
                    vllm:num_requests_running{model_name=\"m\"} 2.0\n\
                    vllm:kv_cache_usage_perc{model_name=\"m\"} 0.25\n";

/// A certificate for 127.0.0.1 with its key, and the PEM files holding them.
struct Identity {
    certified: CertifiedKey<rcgen::KeyPair>,
    cert_path: PathBuf,
    key_path: PathBuf,
    _dir: TempDir,
}

impl Identity {
    fn new(name: &str) -> Self {
        let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])
            .expect("generate a certificate");
        let dir = TempDir::new(name);
        let cert_path = dir.0.join("cert.pem");
        let key_path = dir.0.join("key.pem");
        std::fs::write(&cert_path, certified.cert.pem()).expect("write the certificate");
        std::fs::write(&key_path, certified.signing_key.serialize_pem()).expect("write the key");
        Self { certified, cert_path, key_path, _dir: dir }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.certified.cert.der().clone()
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivatePkcs8KeyDer::from(self.certified.signing_key.serialize_der()).into()
    }
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "epp-metrics-tls-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&path).expect("create a temporary directory");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A vLLM stand-in serving its metrics page over TLS only.
struct TlsServer {
    address: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl TlsServer {
    /// Serves with `server`'s identity; with `client_ca`, a client certificate issued by it is
    /// required.
    async fn start(server: &Identity, client_ca: Option<&Identity>) -> Self {
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("protocol versions");
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                roots.add(ca.der()).expect("a usable client CA");
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::clone(&provider),
                )
                .build()
                .expect("a verifier");
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(vec![server.der()], server.key())
            .expect("a server configuration");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind an ephemeral port");
        let address = listener.local_addr().expect("local address");
        let handshakes = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let task =
            tokio::spawn(serve(listener, acceptor, Arc::clone(&handshakes), Arc::clone(&requests)));
        Self { address, handshakes, requests, task }
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::new(self.address)
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
) {
    let mut connections = tokio::task::JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        handshakes.fetch_add(1, Ordering::SeqCst);
        let acceptor = acceptor.clone();
        let requests = Arc::clone(&requests);
        connections.spawn(async move {
            // A refused handshake just ends the connection, as a real server would.
            let Ok(stream) = acceptor.accept(stream).await else { return };
            let service = service_fn(move |_request| {
                requests.fetch_add(1, Ordering::SeqCst);
                async {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(PAGE))))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn config(tls: ScrapeTls) -> CollectorConfig {
    CollectorConfig {
        interval: Duration::from_millis(20),
        scrape_timeout: Duration::from_millis(500),
        staleness_threshold: Duration::from_secs(2),
        tls: Some(tls),
        ..CollectorConfig::default()
    }
}

fn start_collector(config: CollectorConfig) -> (Arc<SharedPool>, MetricsCollector) {
    let pool = Arc::new(SharedPool::new(PoolSnapshot::default()));
    let collector = MetricsCollector::start(Arc::clone(&pool), config).expect("inside a runtime");
    (pool, collector)
}

fn waiting(pool: &SharedPool, id: EndpointId) -> Option<u32> {
    pool.load()
        .by_id(id)
        .filter(|state| state.metrics.updated_at.is_some())
        .map(|state| state.metrics.waiting_queue)
}

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn settings(insecure_skip_verify: bool, ca: Option<&Path>) -> TlsSettings {
    TlsSettings {
        insecure_skip_verify,
        ca_cert_path: ca.map(Path::to_path_buf),
        ..TlsSettings::default()
    }
}

/// Scrapes `server` with `tls` until its page is in the pool.
async fn scrapes(server: &TlsServer, tls: ScrapeTls) {
    let (pool, collector) = start_collector(config(tls));
    let endpoint = server.endpoint();
    collector.upsert_endpoint(endpoint.clone(), Engine::Vllm);
    eventually("the page is scraped over TLS", || waiting(&pool, endpoint.id) == Some(7)).await;
    collector.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_skip_verify_accepts_a_self_signed_server() {
    let server_identity = Identity::new("skip");
    let server = TlsServer::start(&server_identity, None).await;
    let tls = ScrapeTls::load(&settings(true, None)).expect("settings load");
    scrapes(&server, tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_server_is_not_scraped() {
    let server_identity = Identity::new("untrusted");
    let server = TlsServer::start(&server_identity, None).await;
    // Verifying, with no CA file: the self-signed certificate is in no trusted bundle.
    let tls = ScrapeTls::load(&settings(false, None)).expect("settings load");
    let (pool, collector) = start_collector(config(tls));
    let endpoint = server.endpoint();
    collector.upsert_endpoint(endpoint.clone(), Engine::Vllm);
    // Several handshakes are tried (one per interval) and every one fails: no request is sent
    // and the endpoint's metrics stay unscraped.
    eventually("the scraper retries the handshake", || {
        server.handshakes.load(Ordering::SeqCst) >= 3
    })
    .await;
    assert_eq!(server.requests.load(Ordering::SeqCst), 0);
    assert_eq!(waiting(&pool, endpoint.id), None, "no metrics from an untrusted server");
    collector.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_file_verifies_the_server() {
    let server_identity = Identity::new("ca");
    let server = TlsServer::start(&server_identity, None).await;
    let tls =
        ScrapeTls::load(&settings(false, Some(&server_identity.cert_path))).expect("settings load");
    scrapes(&server, tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_identity_is_presented_for_mutual_tls() {
    let server_identity = Identity::new("mtls-server");
    let client_identity = Identity::new("mtls-client");
    let server = TlsServer::start(&server_identity, Some(&client_identity)).await;
    let with_identity = TlsSettings {
        client_cert_path: Some(client_identity.cert_path.clone()),
        client_key_path: Some(client_identity.key_path.clone()),
        ..settings(false, Some(&server_identity.cert_path))
    };
    scrapes(&server, ScrapeTls::load(&with_identity).expect("settings load")).await;

    // Without the identity the server ends every handshake: nothing is scraped.
    let without = ScrapeTls::load(&settings(true, None)).expect("settings load");
    let (pool, collector) = start_collector(config(without));
    let endpoint = server.endpoint();
    let before = server.requests.load(Ordering::SeqCst);
    collector.upsert_endpoint(endpoint.clone(), Engine::Vllm);
    let handshakes = server.handshakes.load(Ordering::SeqCst);
    eventually("the scraper retries the handshake", || {
        server.handshakes.load(Ordering::SeqCst) >= handshakes + 3
    })
    .await;
    assert_eq!(server.requests.load(Ordering::SeqCst), before);
    assert_eq!(waiting(&pool, endpoint.id), None);
    collector.shutdown().await;
}

#[test]
fn bad_files_are_errors_naming_the_path() {
    let missing = PathBuf::from("/nonexistent/ca.pem");
    let error = ScrapeTls::load(&settings(false, Some(&missing))).expect_err("missing file");
    assert!(
        matches!(&error, TlsSettingsError::File { what: "caCertPath", path, .. } if *path == missing)
    );
    assert!(error.to_string().contains("/nonexistent/ca.pem"), "{error}");

    let dir = TempDir::new("bad");
    let not_pem = dir.0.join("not.pem");
    std::fs::write(&not_pem, "not a certificate\n").expect("write");
    let error = ScrapeTls::load(&settings(false, Some(&not_pem))).expect_err("no certificate");
    assert!(error.to_string().contains("not.pem"), "{error}");

    let identity = Identity::new("bad-key");
    let wrong_key = TlsSettings {
        client_cert_path: Some(identity.cert_path.clone()),
        client_key_path: Some(identity.cert_path.clone()),
        ..TlsSettings::default()
    };
    let error = ScrapeTls::load(&wrong_key).expect_err("a certificate is no key");
    assert!(matches!(&error, TlsSettingsError::File { what: "clientKeyPath", .. }), "{error}");

    let half = TlsSettings {
        client_cert_path: Some(identity.cert_path.clone()),
        ..TlsSettings::default()
    };
    assert_eq!(ScrapeTls::load(&half).expect_err("half"), TlsSettingsError::HalfClientIdentity);
}
