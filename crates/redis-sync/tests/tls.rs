//! Replicas syncing through a real `redis-server` that listens with TLS only, with a private
//! CA, a server certificate and a client certificate made by the `openssl` CLI for each test
//! (skipped, with a printed reason, when `openssl` or `redis-server` is not installed).

#![cfg(feature = "tls")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{ACTIVE_REQUESTS, PREFIX_ONLY, RedisServer, Replica, eventually};
use redis_sync::{SyncSettings, SyncerParameters};
use scorers::{ActiveRequestScorer, SharedInFlight};

const WAIT: Duration = Duration::from_secs(5);
/// Long enough for a failing replica's background tasks to try, fail and retry a few times.
const FAILING: Duration = Duration::from_secs(10);

/// The extensions of each kind of certificate, as a real deployment's would have them: the
/// client verifies the server's IP SAN, the server verifies the client's key usage.
const OPENSSL_CONFIG: &str = "
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
authorityKeyIdentifier = keyid
[elsewhere]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:elsewhere.example
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
";

/// A private CA with a server certificate, a client certificate and a certificate for another
/// server name (`elsewhere`) it signed, plus a second CA that signed nothing, in a directory
/// removed on drop.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Makes the keys and certificates, or prints why not and returns `None` (no `openssl`).
    fn generate(test: &str) -> Option<Self> {
        let found = Command::new("openssl")
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !found {
            eprintln!("SKIPPED: no openssl binary on PATH (apt-get install openssl)");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("epp-redis-tls-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Self { dir };
        std::fs::write(pki.path("openssl.cnf"), OPENSSL_CONFIG).unwrap();
        pki.authority("ca", "epp test CA");
        pki.authority("other-ca", "unrelated CA");
        pki.leaf("server", "redis", "ca", 2);
        pki.leaf("client", "epp", "ca", 3);
        pki.leaf("elsewhere", "elsewhere", "ca", 4);
        Some(pki)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn openssl(&self, args: &[&str]) {
        let output =
            Command::new("openssl").args(args).current_dir(&self.dir).output().expect("openssl");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// A self-signed CA: `{name}.key`, `{name}.crt`.
    fn authority(&self, name: &str, common_name: &str) {
        let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
        let subject = format!("/CN={common_name}");
        self.openssl(&[
            "req",
            "-x509",
            "-config",
            "openssl.cnf",
            "-extensions",
            "ca",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &crt,
            "-days",
            "2",
            "-subj",
            &subject,
        ]);
    }

    /// A key and a certificate with the `extensions` section of the same name, signed by `ca`.
    fn leaf(&self, extensions: &str, common_name: &str, ca: &str, serial: u32) {
        let (key, csr, crt) =
            (format!("{extensions}.key"), format!("{extensions}.csr"), format!("{extensions}.crt"));
        let subject = format!("/CN={common_name}");
        self.openssl(&[
            "req",
            "-new",
            "-config",
            "openssl.cnf",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &subject,
        ]);
        let (ca_crt, ca_key, serial) =
            (format!("{ca}.crt"), format!("{ca}.key"), serial.to_string());
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-set_serial",
            &serial,
            "-days",
            "2",
            "-extfile",
            "openssl.cnf",
            "-extensions",
            extensions,
            "-out",
            &crt,
        ]);
    }

    /// A TLS-only `redis-server` with the server certificate; `auth_clients` is
    /// `tls-auth-clients` (client certificates must be signed by the CA).
    fn server(&self, auth_clients: bool) -> Option<RedisServer> {
        self.server_as("server", auth_clients)
    }

    /// A TLS-only `redis-server` presenting `{certificate}.crt`.
    fn server_as(&self, certificate: &str, auth_clients: bool) -> Option<RedisServer> {
        let file = |name: &str| self.path(name).display().to_string();
        RedisServer::start_tls(vec![
            "--tls-cert-file".into(),
            file(&format!("{certificate}.crt")),
            "--tls-key-file".into(),
            file(&format!("{certificate}.key")),
            "--tls-ca-cert-file".into(),
            file("ca.crt"),
            "--tls-auth-clients".into(),
            if auth_clients { "yes" } else { "no" }.into(),
        ])
    }

    /// The settings the plugin's parameters give for `server` with these files, read through
    /// the same path as a configuration file's.
    fn settings(
        &self,
        server: &RedisServer,
        ca_file: Option<&str>,
        client: bool,
    ) -> Result<SyncSettings, String> {
        SyncerParameters {
            address: Some(server.url()),
            ca_file: ca_file.map(|name| self.path(name)),
            cert_file: client.then(|| self.path("client.crt")),
            key_file: client.then(|| self.path("client.key")),
            ..SyncerParameters::default()
        }
        .resolve()
        .map_err(|error| error.to_string())
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A replica of `yaml` syncing with `settings`' URL and certificates.
fn replica(yaml: &str, settings: &SyncSettings, id: &str) -> Replica {
    let tls = settings.tls.clone();
    Replica::new(yaml, Some(&settings.url), id, move |s: &mut SyncSettings| {
        s.tls = tls.clone();
        s.interval = Some(Duration::from_millis(50));
    })
}

/// The replica's `epp_cross_replica_redis_up` as rendered for `/metrics`.
fn redis_up(replica: &Replica) -> Option<i64> {
    let mut text = String::new();
    (replica.sync().metrics_renderer())(&mut text);
    let line = text.lines().find(|line| line.starts_with("epp_cross_replica_redis_up{"))?;
    line.rsplit(' ').next()?.parse().ok()
}

/// Routes `prompts` on `from` and checks that `to` routes a continuation of each to the same
/// endpoint under another seed, which only the shared prefix index explains. `from` is the
/// only other replica publishing; on return, `to`'s follow-ups have reached `from` as well.
async fn shares_prefixes(from: &Replica, to: &Replica, prompts: &[String]) {
    let published = from.sync().metrics().published() + prompts.len() as u64;
    let followed_up = to.sync().metrics().published() + prompts.len() as u64;
    let holders: Vec<_> =
        prompts.iter().enumerate().map(|(n, p)| from.route(p, n as u64).primary().id()).collect();
    let (sent, applied) = (|| from.sync().metrics().published(), || to.sync().metrics().applied());
    assert!(
        eventually(WAIT, || sent() == published && applied() == published).await,
        "published {} applied {} of {published}",
        sent(),
        applied()
    );
    to.flush();
    for (n, (prompt, holder)) in prompts.iter().zip(holders).enumerate() {
        let follow_up = to.route(&format!("{prompt} and a follow-up"), 1000 + n as u64);
        assert_eq!(follow_up.primary().id(), holder, "prompt {n}");
    }
    let (sent, applied) = (|| to.sync().metrics().published(), || from.sync().metrics().applied());
    assert!(
        eventually(WAIT, || sent() == followed_up && applied() == followed_up).await,
        "follow-ups published {} applied {} of {followed_up}",
        sent(),
        applied()
    );
}

fn prompts(tag: &str) -> Vec<String> {
    (0..6)
        .map(|n| format!("{tag} conversation {n:03}: a system prompt long enough for blocks"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_prefixes_and_in_flight_counts_over_tls_with_a_private_ca() {
    let Some(pki) = Pki::generate("shared") else { return };
    let Some(server) = pki.server(false) else { return };
    let settings = pki.settings(&server, Some("ca.crt"), false).unwrap();
    assert!(settings.url.starts_with("rediss://127.0.0.1:"), "{}", settings.url);
    assert!(settings.tls.ca.is_some() && settings.tls.client.is_none());

    let a = replica(PREFIX_ONLY, &settings, "a");
    let b = replica(PREFIX_ONLY, &settings, "b");
    assert!(eventually(WAIT, || a.sync().is_warm() && b.sync().is_warm()).await);
    shares_prefixes(&a, &b, &prompts("a")).await;
    shares_prefixes(&b, &a, &prompts("b")).await;
    assert_eq!(redis_up(&a), Some(1));

    let c = replica(ACTIVE_REQUESTS, &settings, "c");
    let d = replica(ACTIVE_REQUESTS, &settings, "d");
    let on_d = d
        .plugins
        .get("active-request-scorer")
        .and_then(|declared| declared.plugin.shared.clone())
        .and_then(|shared| shared.downcast::<ActiveRequestScorer>().ok())
        .unwrap();
    let guards: Vec<_> =
        (0..3).map(|n| c.route("in flight on c", n).take_completion().unwrap()).collect();
    let heard =
        || d.pool.load().endpoints().iter().map(|s| on_d.peers().get(s.id()).requests).sum::<u64>();
    assert!(eventually(WAIT, || heard() == 3).await, "d hears c's three: {}", heard());
    drop(guards);
    assert!(eventually(WAIT, || heard() == 0).await, "and their completion: {}", heard());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_no_trusted_ca_signed_is_refused() {
    let Some(pki) = Pki::generate("refused") else { return };
    let Some(server) = pki.server(false) else { return };
    let trusting = pki.settings(&server, Some("ca.crt"), false).unwrap();
    // The public roots (no caFile), and a private CA that is not the server's.
    let public_roots = pki.settings(&server, None, false).unwrap();
    assert!(public_roots.tls.is_empty());
    let other_ca = pki.settings(&server, Some("other-ca.crt"), false).unwrap();

    let good = replica(PREFIX_ONLY, &trusting, "good");
    let refused = [
        replica(PREFIX_ONLY, &public_roots, "public-roots"),
        replica(PREFIX_ONLY, &other_ca, "other-ca"),
    ];
    let holders: Vec<_> = prompts("good")
        .iter()
        .enumerate()
        .map(|(n, p)| good.route(p, n as u64).primary().id())
        .collect();
    assert!(eventually(WAIT, || good.sync().metrics().published() == 6).await);
    for replica in &refused {
        let metrics = replica.sync().metrics();
        // It keeps routing on its own state, promptly, and publishes nothing.
        let started = std::time::Instant::now();
        for (n, prompt) in prompts(replica.sync().replica_id()).iter().enumerate() {
            replica.route(prompt, n as u64);
        }
        assert!(started.elapsed() < Duration::from_secs(1), "routing waited on redis");
        assert!(
            eventually(FAILING, || metrics.redis_errors() >= 3).await,
            "{}: errors {}",
            replica.sync().replica_id(),
            metrics.redis_errors()
        );
        assert_eq!(redis_up(replica), Some(0));
        assert_eq!(metrics.published(), 0);
        assert_eq!(metrics.applied(), 0, "nothing of good's came through");
        assert!(!replica.sync().is_warm());
    }
    // Meanwhile the server is fine for a replica that trusts its CA: good's records reach a
    // replica started now, and nothing from the refused ones is in the stream.
    let late = replica(PREFIX_ONLY, &trusting, "late");
    assert!(eventually(WAIT, || late.sync().is_warm()).await);
    late.flush();
    assert_eq!(late.sync().metrics().applied(), 6);
    for (n, (prompt, holder)) in prompts("good").iter().zip(holders).enumerate() {
        let follow_up = late.route(&format!("{prompt} and a follow-up"), 1000 + n as u64);
        assert_eq!(follow_up.primary().id(), holder, "prompt {n}");
    }
    assert_eq!(redis_up(&good), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_server_name_is_refused() {
    let Some(pki) = Pki::generate("name") else { return };
    // Signed by the trusted CA, but for elsewhere.example, not 127.0.0.1.
    let Some(server) = pki.server_as("elsewhere", false) else { return };
    let settings = pki.settings(&server, Some("ca.crt"), false).unwrap();
    let replica = replica(PREFIX_ONLY, &settings, "name");
    let metrics = replica.sync().metrics();
    replica.route("a prompt routed on its own state", 0);
    assert!(
        eventually(FAILING, || metrics.redis_errors() >= 3).await,
        "errors {}",
        metrics.redis_errors()
    );
    assert_eq!(redis_up(&replica), Some(0));
    assert_eq!(metrics.published(), 0);
    assert!(!replica.sync().is_warm());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_auth_clients_only_a_replica_with_a_client_certificate_syncs() {
    let Some(pki) = Pki::generate("mutual") else { return };
    let Some(server) = pki.server(true) else { return };
    let with_certificate = pki.settings(&server, Some("ca.crt"), true).unwrap();
    assert!(with_certificate.tls.client.is_some());
    let without = pki.settings(&server, Some("ca.crt"), false).unwrap();

    let a = replica(PREFIX_ONLY, &with_certificate, "a");
    let b = replica(PREFIX_ONLY, &with_certificate, "b");
    let anonymous = replica(PREFIX_ONLY, &without, "anonymous");
    shares_prefixes(&a, &b, &prompts("mutual")).await;
    assert_eq!(redis_up(&a), Some(1));

    let metrics = anonymous.sync().metrics();
    anonymous.route("a prompt routed on its own state", 0);
    assert!(
        eventually(FAILING, || metrics.redis_errors() >= 3).await,
        "errors {}",
        metrics.redis_errors()
    );
    assert_eq!(redis_up(&anonymous), Some(0));
    assert_eq!((metrics.published(), metrics.applied()), (0, 0));
    assert_eq!(b.sync().metrics().applied(), 6, "b heard only a");
}

#[test]
fn parameters_name_the_file_that_is_wrong() {
    let Some(pki) = Pki::generate("parameters") else { return };
    let resolve = |ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>| {
        SyncerParameters {
            address: Some("rediss://127.0.0.1:6380".into()),
            ca_file: ca.map(Path::to_path_buf),
            cert_file: cert.map(Path::to_path_buf),
            key_file: key.map(Path::to_path_buf),
            ..SyncerParameters::default()
        }
        .resolve()
        .map_err(|error| error.to_string())
    };
    let (ca, cert, key) = (pki.path("ca.crt"), pki.path("client.crt"), pki.path("client.key"));
    let settings = resolve(Some(&ca), Some(&cert), Some(&key)).unwrap();
    assert_eq!(settings.tls.ca.as_deref(), Some(std::fs::read(&ca).unwrap().as_slice()));
    let key_text = std::fs::read_to_string(&key).unwrap();
    let printed = format!("{settings:?}");
    let key_body = key_text.lines().nth(1).unwrap();
    assert!(!printed.contains(key_body), "the key is not printed: {printed}");
    assert!(printed.contains("<redacted>"), "{printed}");

    // Another key than the certificate's.
    let error = resolve(None, Some(&cert), Some(&pki.path("server.key"))).unwrap_err();
    assert!(error.contains("certFile, keyFile") && error.contains("client.crt"), "{error}");
    // A key where the CA bundle goes, a certificate where the key goes.
    let error = resolve(Some(&key), None, None).unwrap_err();
    assert!(error.contains("caFile") && error.contains("holds no PEM certificate"), "{error}");
    let error = resolve(None, Some(&cert), Some(&cert)).unwrap_err();
    assert!(error.contains("keyFile") && error.contains("no PEM private key"), "{error}");
}
