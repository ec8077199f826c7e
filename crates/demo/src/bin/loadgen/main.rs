//! `epp-loadgen`: measures a real `epp` process over loopback the way Envoy drives it (one
//! ext-proc stream per request, body chunks sent without waiting for answers), and the same load
//! against a do-nothing ext-proc server process (the floor: same protocol, transport and
//! buffering, no decision) in the same run, and prints every figure with its ratio to the floor.
//!
//! Both servers run as child processes, started alike, so each one's CPU time is its own
//! (`/proc/<pid>/stat`, per routed request). `epp` routes over N in-process stand-ins for vLLM
//! servers (default 100) listed in an `--endpoints-file`, and scrapes their `/metrics` every
//! 50 ms as in production; the stand-ins are idle, so that scraping is the only background
//! work, shown as the idle CPU line before the table. Client and servers share the machine's
//! cores, so only the ratios carry over between machines.
//!
//! ```sh
//! cargo build --release -p epp-ext-proc-adapter --bin epp
//! cargo run --release -p epp-demo --bin epp-loadgen              # every scenario, 5 s each
//! cargo run --release -p epp-demo --bin epp-loadgen -- quick     # a short smoke run
//! ```
//!
//! Flags: `--epp PATH` (default: the `epp` next to this executable, where cargo builds both),
//! `--endpoints N` (100); arguments after `--` go to `epp` (e.g. `-- --config-file my.yaml`).

mod load;
mod process;
mod soak;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use demo::floor::Floor;
use demo::{ModelServerConfig, RunningModelServer};

use crate::load::{Clients, Figures, closed_loop, open_loop};
use crate::process::ServerProcess;

/// Where the floor routes every request (never contacted: the load stops at the decision).
const FLOOR_DESTINATION: &str = "10.0.0.1:8000";
/// gRPC connections per server, shared by the load tasks.
const CONNECTIONS: usize = 4;
/// How long the idle CPU (background work, scraping) of each server is measured.
const IDLE_SAMPLE: Duration = Duration::from_secs(1);

const USAGE: &str = "usage: epp-loadgen [quick] [--epp PATH] [--endpoints N] [-- EPP_ARGS...]\n       epp-loadgen soak [--seconds N] [--epp PATH]";

/// What the command line asks for.
#[derive(Debug)]
enum Mode {
    /// Measure epp against the floor.
    Measure(Options),
    /// Be the floor server (hidden: the load generator starts itself this way).
    Floor { port: u16 },
    /// Run epp under mixed, partly hostile traffic, then check it returns to idle.
    Soak { seconds: u64, epp: Option<PathBuf> },
}

#[derive(Debug)]
struct Options {
    quick: bool,
    epp: Option<PathBuf>,
    endpoints: usize,
    epp_args: Vec<String>,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Mode, String> {
    let args: Vec<String> = args.collect();
    if args.first().map(String::as_str) == Some("floor") {
        return match &args[1..] {
            [flag, port] if flag == "--port" => {
                Ok(Mode::Floor { port: port.parse().map_err(|_| format!("bad port '{port}'"))? })
            }
            _ => Err("usage: epp-loadgen floor --port PORT".into()),
        };
    }
    if args.first().map(String::as_str) == Some("soak") {
        let (mut seconds, mut epp) = (60, None);
        let mut rest = args[1..].iter();
        while let Some(flag) = rest.next() {
            let mut value = || rest.next().ok_or(format!("{flag} needs a value"));
            match flag.as_str() {
                "--seconds" => {
                    let text = value()?;
                    seconds = text.parse().map_err(|_| format!("bad --seconds '{text}'"))?;
                }
                "--epp" => epp = Some(PathBuf::from(value()?)),
                other => return Err(format!("unknown soak argument '{other}'")),
            }
        }
        return Ok(Mode::Soak { seconds, epp });
    }
    let mut options = Options { quick: false, epp: None, endpoints: 100, epp_args: Vec::new() };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| args.next().ok_or(format!("{flag} needs a value"));
        match arg.as_str() {
            "quick" => options.quick = true,
            "--epp" => options.epp = Some(PathBuf::from(value("--epp")?)),
            "--endpoints" => {
                options.endpoints = value("--endpoints")?
                    .parse()
                    .ok()
                    .filter(|&count| count > 0)
                    .ok_or("--endpoints needs a positive number")?;
            }
            "--" => {
                options.epp_args = args.collect();
                break;
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    Ok(Mode::Measure(options))
}

fn main() -> ExitCode {
    let mode = match parse_args(std::env::args().skip(1)) {
        Ok(mode) => mode,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("epp-loadgen: {message}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("epp-loadgen: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = match mode {
        Mode::Floor { port } => runtime.block_on(serve_floor(port)),
        Mode::Measure(options) => runtime.block_on(measure(&options)),
        Mode::Soak { seconds, epp } => runtime.block_on(async move {
            let epp = match epp {
                Some(path) => path,
                None => process::default_epp_path()?,
            };
            soak::soak(&epp, seconds).await
        }),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("epp-loadgen: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve_floor(port: u16) -> Result<(), String> {
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|error| format!("floor cannot bind {address}: {error}"))?;
    Floor::new(FLOOR_DESTINATION).serve(listener).await.map_err(|error| error.to_string())
}

/// A measured server and its connections.
struct Server {
    process: ServerProcess,
    clients: Clients,
}

impl Server {
    async fn connect(process: ServerProcess) -> Result<Self, String> {
        let clients = Clients::connect(process.grpc_address, CONNECTIONS).await?;
        Ok(Self { process, clients })
    }
}

async fn measure(options: &Options) -> Result<(), String> {
    let epp_path = match &options.epp {
        Some(path) => path.clone(),
        None => process::default_epp_path()?,
    };
    let mut stand_ins = Vec::with_capacity(options.endpoints);
    for _ in 0..options.endpoints {
        let server = RunningModelServer::start(ModelServerConfig::default())
            .await
            .map_err(|error| format!("cannot start a model-server stand-in: {error}"))?;
        stand_ins.push(server);
    }
    let addresses: Vec<SocketAddr> = stand_ins.iter().map(|server| server.address).collect();
    let scratch = process::ScratchDir::create()?;
    let endpoints_file = process::write_endpoints_file(&scratch.0, &addresses)?;

    // Each process is killed when its guard drops, also when a later step fails.
    let floor = Server::connect(process::start_floor().await?).await?;
    let epp = process::start_epp(
        &epp_path,
        &endpoints_file,
        addresses.len(),
        &options.epp_args,
        std::process::Stdio::inherit(),
    )
    .await?;
    let epp = Server::connect(epp).await?;

    println!(
        "epp: {} (pid {}), floor: pid {}; {} idle vLLM stand-ins (scraped every 50 ms by default)",
        epp_path.display(),
        epp.process.pid(),
        floor.process.pid(),
        addresses.len()
    );
    let idle_floor = idle_cpu(&floor.process).await;
    let idle_epp = idle_cpu(&epp.process).await;
    println!(
        "idle CPU: floor {idle_floor:.1} ms/s, epp {idle_epp:.1} ms/s (included in the µs/request)"
    );
    let profile = if options.epp_args.is_empty() {
        "GIE default profile (queue 2, kv-cache 2, prefix 3)".to_owned()
    } else {
        format!("epp flags: {}", options.epp_args.join(" "))
    };
    run_cases(&floor, &epp, &profile, options.quick).await;
    Ok(())
}

/// Milliseconds of CPU per second a server uses with no load.
async fn idle_cpu(server: &ServerProcess) -> f64 {
    let before = server.cpu_seconds();
    tokio::time::sleep(IDLE_SAMPLE).await;
    match (before, server.cpu_seconds()) {
        (Some(before), Some(after)) => (after - before) / IDLE_SAMPLE.as_secs_f64() * 1e3,
        _ => f64::NAN,
    }
}

async fn run_cases(floor: &Server, epp: &Server, profile: &str, quick: bool) {
    // Open loops share 8 KB system prompts across requests; closed loops send only new prompts.
    let small = load::bodies(16 * 1024, 256);
    let large = load::bodies(220 * 1024, 32);
    let huge = load::bodies(400 * 1024, 8);
    let seconds = Duration::from_secs(if quick { 1 } else { 5 });
    println!("{profile}; {seconds:?} per case");
    println!(
        "{:<34} {:>9} {:>9} {:>7} | {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} | {:>7} {:>7} | failed",
        "case",
        "floor/s",
        "epp/s",
        "ratio",
        "p50 fl",
        "p50 epp",
        "ratio",
        "p99 fl",
        "p99 epp",
        "ratio",
        "cpu fl",
        "cpu epp"
    );
    println!(
        "{:<34} {:>27} | {:>23} | {:>23} | {:>15} |",
        "", "(requests per second)", "(decision ms)", "(decision ms)", "(µs/request)"
    );
    for rate in [1_000.0, 5_000.0] {
        let f = open_loop(&floor.process, &floor.clients, &small, rate, seconds).await;
        let e = open_loop(&epp.process, &epp.clients, &small, rate, seconds).await;
        print_row(&format!("open loop {rate} req/s, 16 KB"), f, e);
    }
    let (small_unique, large_unique) = (small.unique(), large.unique());
    let f = closed_loop(&floor.process, &floor.clients, &small_unique, 64, seconds).await;
    let e = closed_loop(&epp.process, &epp.clients, &small_unique, 64, seconds).await;
    print_row("closed loop 64 streams, 16 KB new", f, e);
    let f = closed_loop(&floor.process, &floor.clients, &large_unique, 150, seconds).await;
    let e = closed_loop(&epp.process, &epp.clients, &large_unique, 150, seconds).await;
    print_row("closed loop 150 streams, 220 KB new", f, e);
    // About 100k tokens per prompt, each new: what the server's CPU costs at a realistic rate.
    let rate = 100.0;
    let huge = huge.unique();
    let f = open_loop(&floor.process, &floor.clients, &huge, rate, seconds).await;
    let e = open_loop(&epp.process, &epp.clients, &huge, rate, seconds).await;
    print_row("open loop 100 req/s, 400 KB new", f, e);
    let cores = |figures: &Figures| figures.cpu_us_per_request * rate / 1e6;
    println!(
        "{:<34} server CPU at 100 req/s of 400 KB prompts: floor {:.3} cores, epp {:.3} cores",
        "",
        cores(&f),
        cores(&e)
    );
}

fn print_row(name: &str, floor: Figures, epp: Figures) {
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    println!(
        "{name:<34} {:>9.0} {:>9.0} {:>6.2}x | {:>7.3} {:>7.3} {:>6.2}x | {:>7.3} {:>7.3} {:>6.2}x | {:>7.0} {:>7.0} | {}/{}",
        floor.requests_per_second,
        epp.requests_per_second,
        ratio(epp.requests_per_second, floor.requests_per_second),
        floor.p50_ms,
        epp.p50_ms,
        ratio(epp.p50_ms, floor.p50_ms),
        floor.p99_ms,
        epp.p99_ms,
        ratio(epp.p99_ms, floor.p99_ms),
        floor.cpu_us_per_request,
        epp.cpu_us_per_request,
        floor.failed,
        epp.failed,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Mode, String> {
        parse_args(args.iter().map(|arg| (*arg).to_owned()))
    }

    #[test]
    fn flags_and_the_hidden_floor_subcommand() {
        let Ok(Mode::Measure(options)) =
            parse(&["quick", "--epp", "/x/epp", "--endpoints", "3", "--", "-v"])
        else {
            panic!("a measure run")
        };
        assert!(options.quick);
        assert_eq!(options.epp, Some(PathBuf::from("/x/epp")));
        assert_eq!((options.endpoints, options.epp_args), (3, vec!["-v".to_owned()]));
        assert!(matches!(parse(&["floor", "--port", "9"]), Ok(Mode::Floor { port: 9 })));
        assert!(parse(&["--endpoints", "0"]).is_err());
        assert!(parse(&["quick", "floor"]).is_err());
    }
}
