//! A real `redis-server` on a free loopback port, and picker replicas syncing through it.

#![allow(dead_code, unreachable_pub)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis_sync::{CrossReplicaSync, SyncOptions, SyncSettings};
use scheduler_core::{
    ConstructedPlugins, Endpoint, EndpointPickerConfig, EndpointState, InferenceRequest,
    PoolSnapshot, ScheduleOptions, Scheduler, SchedulingResult, SharedPool,
};

/// A `redis-server` child process, killed on drop.
pub struct RedisServer {
    pub port: u16,
    /// Arguments for a TLS-only server (`--tls-*`), empty for a plain one.
    tls_args: Vec<String>,
    child: Option<Child>,
}

/// The `redis-server` binary, if installed.
fn binary() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("redis-server")).find(|p| p.is_file())
}

impl RedisServer {
    /// Starts a server on a free port, or prints why not and returns `None` (no binary).
    pub fn start() -> Option<Self> {
        Self::start_with(Vec::new())
    }

    /// Starts a server that listens with TLS only (its plain port off), configured by
    /// `tls_args` (`--tls-cert-file` and the like), or prints why not and returns `None`.
    pub fn start_tls(tls_args: Vec<String>) -> Option<Self> {
        Self::start_with(tls_args)
    }

    fn start_with(tls_args: Vec<String>) -> Option<Self> {
        if binary().is_none() {
            eprintln!("SKIPPED: no redis-server binary on PATH (apt-get install redis-server)");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let mut server = Self { port, tls_args, child: None };
        server.restart();
        Some(server)
    }

    /// The URL clients use.
    pub fn url(&self) -> String {
        let scheme = if self.tls_args.is_empty() { "redis" } else { "rediss" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Kills the server (its data is lost: no persistence).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server (again) on the same port and waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        let port = self.port.to_string();
        let listen: Vec<&str> = if self.tls_args.is_empty() {
            vec!["--port", &port]
        } else {
            let mut listen = vec!["--port", "0", "--tls-port", &port];
            listen.extend(self.tls_args.iter().map(String::as_str));
            listen
        };
        let child = Command::new(binary().expect("redis-server"))
            .args(listen)
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let address = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&address, Duration::from_millis(100)).is_err() {
            // A server that refuses its arguments (a build without TLS, an unreadable
            // certificate) exits at once; say so rather than wait for the deadline.
            if let Some(status) = self.child.as_mut().and_then(|child| child.try_wait().ok()?) {
                panic!("redis-server exited ({status}) with arguments {:?}", self.tls_args);
            }
            assert!(Instant::now() < deadline, "redis-server did not start on {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A plain connection for test set-up.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url()).unwrap().get_multiplexed_async_connection().await.unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Four endpoints, 10.0.0.1:8000..8003.
pub fn endpoints() -> PoolSnapshot {
    PoolSnapshot::new(
        (0..4).map(|i| EndpointState::new(Endpoint::new(([10, 0, 0, 1], 8000 + i).into()))),
    )
}

/// One picker replica: its scheduler, plugins, pool and (optionally) syncer.
pub struct Replica {
    pub scheduler: Scheduler,
    pub plugins: ConstructedPlugins,
    pub pool: Arc<SharedPool>,
    pub sync: Option<CrossReplicaSync>,
}

impl Replica {
    /// A replica of `yaml`, synced through `url` when given.
    pub fn new(yaml: &str, url: Option<&str>, id: &str, tune: impl Fn(&mut SyncSettings)) -> Self {
        let registry = scorers::builtin_registry();
        let config = EndpointPickerConfig::from_yaml(yaml).unwrap();
        let plugins = config.construct_plugins(&registry).unwrap();
        let scheduler = config.build_with(&plugins, &registry).unwrap();
        let pool = Arc::new(SharedPool::new(endpoints()));
        let sync = url.map(|url| {
            let mut settings = SyncSettings::for_url(url);
            settings.replica_id = Some(id.to_owned());
            tune(&mut settings);
            let options = SyncOptions { pool_name: "pool".into(), interval: None };
            CrossReplicaSync::start(&settings, &options, &plugins, Arc::clone(&pool)).unwrap()
        });
        Self { scheduler, plugins, pool, sync }
    }

    pub fn sync(&self) -> &CrossReplicaSync {
        self.sync.as_ref().expect("synced replica")
    }

    /// Schedules `prompt` with `seed`.
    pub fn route(&self, prompt: &str, seed: u64) -> SchedulingResult {
        let request = InferenceRequest::new("m", prompt);
        let options = ScheduleOptions { seed: Some(seed), ..Default::default() };
        self.scheduler.schedule_with(&request, &self.pool.load(), options).unwrap()
    }

    /// Waits until the prefix writers applied what is queued.
    pub fn flush(&self) {
        for (_, producer) in scorers::prefix_producers(&self.plugins) {
            producer.writer().flush();
        }
    }
}

/// Polls `done` every 10 ms until it holds or `limit` passes; returns whether it held.
pub async fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Prefix routing only, so that the prefix index alone decides (ties broken by the seed).
pub const PREFIX_ONLY: &str = "
plugins:
- type: prefix-cache-scorer
  parameters: {blockSize: 16}
- type: max-score-picker
";

/// In-flight counting only.
pub const ACTIVE_REQUESTS: &str = "
plugins:
- type: active-request-scorer
- type: max-score-picker
";
