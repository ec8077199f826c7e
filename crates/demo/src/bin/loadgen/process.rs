//! The measured servers as child processes: started with free loopback ports, waited for until
//! ready, their CPU time read from `/proc`, and killed when dropped (also on error or panic).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use demo::http_client;
use tonic::transport::Channel;

/// Clock ticks per second of `/proc/<pid>/stat` times: `USER_HZ`, 100 on Linux.
const TICKS_PER_SECOND: f64 = 100.0;
/// How long a server may take to become ready (a debug build scraping 100 endpoints included).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between readiness probes.
const PROBE_PERIOD: Duration = Duration::from_millis(50);

/// A server running as a child process; killed when dropped.
#[derive(Debug)]
pub(crate) struct ServerProcess {
    name: &'static str,
    child: Child,
    /// Where its ext-proc service listens.
    pub(crate) grpc_address: SocketAddr,
    /// Where its Prometheus `/metrics` listens (epp only).
    pub(crate) metrics_address: Option<SocketAddr>,
}

impl ServerProcess {
    /// Starts `command` (stdout discarded, stderr to `stderr`) serving ext-proc on
    /// `grpc_address`.
    fn spawn(
        name: &'static str,
        command: &mut Command,
        grpc_address: SocketAddr,
        stderr: Stdio,
    ) -> Result<Self, String> {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|error| format!("cannot start the {name} ({command:?}): {error}"))?;
        Ok(Self { name, child, grpc_address, metrics_address: None })
    }

    /// Its process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User plus system CPU time the process has used so far; `None` where `/proc` is missing.
    pub(crate) fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        // The command name (field 2) is parenthesised and may hold spaces: count from after it.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks = |index: usize| fields.get(index)?.parse::<f64>().ok();
        // Fields 14 (utime) and 15 (stime) of proc(5), 11 and 12 after the name.
        Some((ticks(11)? + ticks(12)?) / TICKS_PER_SECOND)
    }

    /// An error if the process has exited.
    fn check_running(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("the {} exited early ({status})", self.name)),
            Err(error) => Err(format!("cannot watch the {}: {error}", self.name)),
        }
    }

    /// Waits until `ready` says yes, failing if the process exits or time runs out.
    async fn wait_until<F, Fut>(&mut self, what: &str, mut ready: F) -> Result<(), String>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.check_running()?;
            if ready().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("the {} did not {what} within {READY_TIMEOUT:?}", self.name));
            }
            tokio::time::sleep(PROBE_PERIOD).await;
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `count` distinct free loopback ports (all held open until all are chosen).
fn free_ports(count: usize) -> Result<Vec<u16>, String> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("cannot find a free loopback port: {error}"))?;
    listeners
        .iter()
        .map(|listener| listener.local_addr().map(|address| address.port()))
        .collect::<Result<_, _>>()
        .map_err(|error| format!("cannot find a free loopback port: {error}"))
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Whether a gRPC channel to `address` connects.
async fn connects(address: SocketAddr) -> bool {
    match Channel::from_shared(format!("http://{address}")) {
        Ok(endpoint) => endpoint.connect().await.is_ok(),
        Err(_) => false,
    }
}

/// Starts the floor: this executable again, with the hidden `floor` subcommand.
pub(crate) async fn start_floor() -> Result<ServerProcess, String> {
    let port = free_ports(1)?[0];
    let this = std::env::current_exe()
        .map_err(|error| format!("cannot find the load generator's executable: {error}"))?;
    let mut command = Command::new(this);
    command.args(["floor", "--port", &port.to_string()]);
    let mut floor =
        ServerProcess::spawn("floor server", &mut command, loopback(port), Stdio::inherit())?;
    floor.wait_until("accept gRPC connections", || connects(loopback(port))).await?;
    Ok(floor)
}

/// The `epp` next to this executable (where cargo puts both), unless `--epp` names one.
pub(crate) fn default_epp_path() -> Result<PathBuf, String> {
    let this = std::env::current_exe()
        .map_err(|error| format!("cannot find the load generator's executable: {error}"))?;
    let name = format!("epp{}", std::env::consts::EXE_SUFFIX);
    Ok(this.parent().map_or_else(|| PathBuf::from(&name), |directory| directory.join(&name)))
}

/// Starts `epp` over the endpoints listed in `endpoints_file`, plaintext on free loopback
/// ports, with `extra_args` appended; returns once its `/metrics` reports at least `endpoints`
/// endpoints ready (scraped and fresh). Its log goes to `stderr`.
pub(crate) async fn start_epp(
    epp: &Path,
    endpoints_file: &Path,
    endpoints: usize,
    extra_args: &[String],
    stderr: Stdio,
) -> Result<ServerProcess, String> {
    if !epp.is_file() {
        return Err(format!(
            "no epp binary at {} (build it with `cargo build --release -p epp-ext-proc-adapter \
             --bin epp`, or pass --epp PATH)",
            epp.display()
        ));
    }
    let ports = free_ports(3)?;
    let (grpc, health, metrics) = (ports[0], ports[1], ports[2]);
    let mut command = Command::new(epp);
    command
        .arg("--secure-serving=false")
        .args(["--bind-address", "127.0.0.1"])
        .args(["--grpc-port", &grpc.to_string()])
        .args(["--grpc-health-port", &health.to_string()])
        .args(["--metrics-port", &metrics.to_string()])
        .args(["--pool-name", "loadgen"])
        .arg("--endpoints-file")
        .arg(endpoints_file)
        .args(extra_args);
    let mut epp = ServerProcess::spawn("epp server", &mut command, loopback(grpc), stderr)?;
    let metrics = loopback(metrics);
    epp.metrics_address = Some(metrics);
    epp.wait_until("report every endpoint ready", || async move {
        let page = http_client::get_text(metrics, "/metrics").await.unwrap_or_default();
        ready_pods(&page).is_some_and(|ready| ready >= endpoints)
    })
    .await?;
    epp.wait_until("accept gRPC connections", || connects(loopback(grpc))).await?;
    Ok(epp)
}

/// The `inference_pool_ready_pods` gauge of a `/metrics` page.
fn ready_pods(page: &str) -> Option<usize> {
    let line = page.lines().find(|line| line.starts_with("inference_pool_ready_pods"))?;
    line.split_whitespace().last()?.parse().ok()
}

/// A scratch directory removed when dropped.
#[derive(Debug)]
pub(crate) struct ScratchDir(pub(crate) PathBuf);

impl ScratchDir {
    /// Creates a directory for this process under the system's temporary directory.
    pub(crate) fn create() -> Result<Self, String> {
        let path = std::env::temp_dir().join(format!("epp-loadgen-{}", std::process::id()));
        std::fs::create_dir_all(&path)
            .map_err(|error| format!("cannot create {}: {error}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes an `--endpoints-file` (JSON) listing `addresses`; returns its path.
pub(crate) fn write_endpoints_file(
    directory: &Path,
    addresses: &[SocketAddr],
) -> Result<PathBuf, String> {
    let entries: Vec<serde_json::Value> = addresses
        .iter()
        .enumerate()
        .map(|(index, address)| {
            serde_json::json!({
                "address": address.ip().to_string(),
                "port": address.port(),
                "name": format!("stand-in-{index}"),
            })
        })
        .collect();
    // Written whole and renamed into place, so the server never reads half a file.
    let path = directory.join("endpoints.json");
    let partial = directory.join("endpoints.json.partial");
    std::fs::write(&partial, serde_json::Value::Array(entries).to_string())
        .and_then(|()| std::fs::rename(&partial, &path))
        .map_err(|error| format!("cannot write {}: {error}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_ready_pods_gauge() {
        let page = "# HELP inference_pool_ready_pods Endpoints with fresh metrics\n\
                    # TYPE inference_pool_ready_pods gauge\n\
                    inference_pool_ready_pods{name=\"loadgen\"} 100\n";
        assert_eq!(ready_pods(page), Some(100));
        assert_eq!(ready_pods("other 1\n"), None);
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports(3).unwrap();
        assert!(ports[0] != ports[1] && ports[1] != ports[2] && ports[0] != ports[2]);
    }
}
