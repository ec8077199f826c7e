//! Two `epp` processes built with the `redis-sync` feature, syncing through a real
//! `redis-server` (skipped, with a printed reason, when none is installed): each sees the
//! other as a peer, and a replica killed without a goodbye stops counting within its TTL.

#![cfg(feature = "redis-sync")]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn has_redis() -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| dir.join("redis-server").is_file())
    })
}

/// `epp_cross_replica_peers` on the metrics page at `port`, if the page answers.
fn peers(port: u16) -> Option<f64> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut page = String::new();
    stream.read_to_string(&mut page).ok()?;
    let line = page.lines().find(|line| line.starts_with("epp_cross_replica_peers{"))?;
    line.rsplit(' ').next()?.parse().ok()
}

fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done()
}

#[test]
fn two_epp_processes_see_each_other_and_a_killed_one_expires() {
    if !has_redis() {
        eprintln!("SKIPPED: no redis-server binary on PATH (apt-get install redis-server)");
        return;
    }
    let redis_port = free_port();
    let _redis = Killed(
        Command::new("redis-server")
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let dir = std::env::temp_dir().join(format!("epp-cross-replica-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pool = dir.join("pool.yaml");
    std::fs::write(&pool, "- address: 127.0.0.1\n  port: 1\n").unwrap();
    let config = dir.join("sync.yaml");
    std::fs::write(
        &config,
        format!(
            "plugins:
- type: active-request-scorer
- name: sync
  type: redis-cross-replica-syncer
  parameters: {{address: '127.0.0.1:{redis_port}', inFlightTtl: 1s}}
dataLayer:
  crossReplicaSyncerPluginRef: sync
  crossReplicaSyncInterval: 100ms
"
        ),
    )
    .unwrap();
    let start = |metrics: u16| {
        Killed(
            Command::new(env!("CARGO_BIN_EXE_epp"))
                .arg("--config-file")
                .arg(&config)
                .arg("--endpoints-file")
                .arg(&pool)
                .args(["--secure-serving=false", "--bind-address", "127.0.0.1"])
                .args(["--grpc-port", &free_port().to_string()])
                .args(["--grpc-health-port", &free_port().to_string()])
                .args(["--metrics-port", &metrics.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let (metrics_a, metrics_b) = (free_port(), free_port());
    let a = start(metrics_a);
    let _b = start(metrics_b);
    assert!(
        wait_for(Duration::from_secs(20), || peers(metrics_a) == Some(1.0)
            && peers(metrics_b) == Some(1.0)),
        "peers: a {:?} b {:?}",
        peers(metrics_a),
        peers(metrics_b)
    );
    drop(a); // SIGKILL: no goodbye
    let killed = Instant::now();
    assert!(wait_for(Duration::from_secs(10), || peers(metrics_b) == Some(0.0)));
    assert!(killed.elapsed() < Duration::from_secs(3), "expired after {:?}", killed.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}
