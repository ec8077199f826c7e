//! Command-line flags, named like the Go reference EPP's where they mean the same.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// The Gateway API Inference Extension endpoint picker.
#[derive(Debug, Parser)]
#[command(name = "epp", version, about)]
pub struct Cli {
    /// What to run; without a subcommand, the server.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Server flags.
    #[command(flatten)]
    pub server: ServerFlags,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the ext-proc server (the default).
    Serve,
    /// Run the picker end to end on loopback: simulated vLLM servers, the ext-proc server, an
    /// Envoy-like proxy and a seeded workload, compared with round-robin.
    Demo(DemoArgs),
    /// Run the body-based router: an ext-proc service in front of the picker that sets
    /// X-Gateway-Model-Name and X-Gateway-Base-Model-Name from the JSON body's `model`. The
    /// server's TLS, keepalive, connection, timeout, --endpoints-file and -v flags apply.
    Bbr(BbrArgs),
}

/// Flags of `epp bbr` that differ from the picker's (the other server flags are shared).
#[derive(Clone, Debug, Args)]
pub struct BbrArgs {
    /// Port of the ext-proc gRPC service.
    #[arg(long, default_value_t = crate::bbr::DEFAULT_GRPC_PORT)]
    pub grpc_port: u16,
    /// Port of the gRPC health service.
    #[arg(long, default_value_t = crate::bbr::DEFAULT_GRPC_HEALTH_PORT)]
    pub grpc_health_port: u16,
    /// Port of the Prometheus `/metrics` endpoint.
    #[arg(long, default_value_t = 9090)]
    pub metrics_port: u16,
    /// Kubernetes ConfigMaps (one, several `---` documents, or a List) whose
    /// `data.baseModel` and `data.adapters` map LoRA adapters to their base model; reloaded
    /// when it changes. Wins over what the model servers report.
    #[arg(long)]
    pub adapters_file: Option<PathBuf>,
    /// How often each endpoint of --endpoints-file is asked for its `/v1/models` (adapters
    /// are the entries with a `parent`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub models_refresh_interval: Duration,
    /// Largest request body read, in bytes (larger ones get 413).
    #[arg(long, default_value_t = crate::bbr::server::DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
}

/// Flags of `epp demo`.
#[derive(Clone, Debug, Args)]
pub struct DemoArgs {
    /// Simulated model servers.
    #[arg(long, default_value_t = 4)]
    pub servers: usize,
    /// Requests in the workload [default: 1500; with --light or --pd, 600].
    #[arg(long)]
    pub requests: Option<usize>,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Seed of the workload (same seed, same requests).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Mean arrival rate, requests per second [default: near the pool's saturation, 100 per
    /// server; with --light or --pd, 75 per server].
    #[arg(long)]
    pub rate: Option<f64>,
    /// A light load (75 requests per second per server, 8 system prompts, 600 requests)
    /// instead of the default near saturation: every policy serves about as fast, so routing
    /// shows little.
    #[arg(long, default_value_t = false, conflicts_with = "rate")]
    pub light: bool,
    /// Distinct shared system prompts of the workload [default: 24; with --light or --pd, 8].
    #[arg(long)]
    pub system_prompts: Option<usize>,
    /// Also run the workload with round-robin routing (with `--pd`: with aggregated serving)
    /// and compare.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub policy_compare: bool,
    /// Prefill/decode disaggregation: prefill servers and decode servers behind a sidecar
    /// that honours `x-prefiller-host-port`, compared with aggregated serving on as many
    /// servers.
    #[arg(long, default_value_t = false)]
    pub pd: bool,
    /// With `--pd`: servers that only prefill [default: a quarter of --servers, at least 1].
    #[arg(long, requires = "pd")]
    pub prefill_servers: Option<usize>,
    /// With `--pd`: disaggregate a request only when its decode server would compute at least
    /// this many prompt tokens (the prefix-based decider's `nonCachedTokens`; 0: every
    /// request, with the always-disaggregate decider).
    #[arg(long, requires = "pd", default_value_t = 64)]
    pub non_cached_tokens: u64,
    /// Picker replicas: above 1, the workload also runs through that many pickers (the proxy
    /// asks each in turn), compared with one picker.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub replicas: u16,
    /// With --replicas: also run the replicas synced through the Redis at ADDR (`host:port` or
    /// a `redis://` URL), under a key prefix unique to the run. Needs an epp built with the
    /// `redis-sync` feature.
    #[arg(long, value_name = "ADDR")]
    pub redis: Option<String>,
}

/// Flags of the server.
#[derive(Clone, Debug, Args)]
pub struct ServerFlags {
    /// EndpointPickerConfig YAML file.
    #[arg(long, global = true)]
    pub config_file: Option<PathBuf>,
    /// EndpointPickerConfig YAML text (instead of a file).
    #[arg(long, global = true, conflicts_with = "config_file")]
    pub config_text: Option<String>,
    /// Model rewrites and traffic splits: InferenceModelRewrite objects (YAML: one object,
    /// `---`-separated documents or a `kind: List`; the `targetModels` of legacy
    /// InferenceModel objects are read as rewrites too).
    #[arg(long, global = true)]
    pub model_rewrites_file: Option<PathBuf>,
    /// Request header whose value pins the rewrite target (a session or user id): requests
    /// carrying the same value get the same target, on every replica.
    #[arg(long, global = true, requires = "model_rewrites_file")]
    pub model_rewrite_sticky_header: Option<String>,
    /// Answer 404 for models that no rewrite rule matches or targets, instead of passing them
    /// through unchanged.
    #[arg(long, global = true, default_value_t = false, action = clap::ArgAction::Set, requires = "model_rewrites_file")]
    pub model_rewrite_strict: bool,
    /// Seed of the weighted draw between rewrite targets (default: from the clock).
    #[arg(long, global = true, requires = "model_rewrites_file")]
    pub model_rewrite_seed: Option<u64>,
    /// Port of the ext-proc gRPC service.
    #[arg(long, default_value_t = 9002, global = true)]
    pub grpc_port: u16,
    /// Port of the gRPC health service.
    #[arg(long, default_value_t = 9003, global = true)]
    pub grpc_health_port: u16,
    /// Port of the Prometheus `/metrics` endpoint.
    #[arg(long, default_value_t = 9090, global = true)]
    pub metrics_port: u16,
    /// Address the listeners bind to.
    #[arg(long, default_value = "0.0.0.0", global = true)]
    pub bind_address: std::net::IpAddr,
    /// Serve ext-proc over TLS (self-signed unless --cert-path is given).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub secure_serving: bool,
    /// Directory holding tls.crt and tls.key.
    #[arg(long, global = true)]
    pub cert_path: Option<PathBuf>,
    /// PEM file of the CA(s) signing client certificates: ext-proc then requires mutual TLS
    /// and refuses clients without a certificate signed by one of them (needs
    /// --secure-serving).
    #[arg(long, global = true)]
    pub client_ca_path: Option<PathBuf>,
    /// A TLS handshake on the ext-proc port not finished in this time closes the connection.
    #[arg(long, default_value = "10s", value_parser = parse_duration, global = true)]
    pub tls_handshake_timeout: Duration,
    /// Interval of HTTP/2 keepalive PINGs on ext-proc connections (0: none). With
    /// --grpc-keepalive-timeout, what notices a proxy that vanished without closing: its
    /// streams end and the requests they held are released.
    #[arg(long, default_value = "30s", value_parser = parse_duration, global = true)]
    pub grpc_keepalive_interval: Duration,
    /// A keepalive PING not acknowledged in this time closes the connection and its streams.
    #[arg(long, default_value = "10s", value_parser = parse_duration, global = true)]
    pub grpc_keepalive_timeout: Duration,
    /// Idle time before TCP keepalive probes on ext-proc connections (0: TCP keepalive off).
    #[arg(long, default_value = "60s", value_parser = parse_duration, global = true)]
    pub tcp_keepalive_time: Duration,
    /// Time between TCP keepalive probes.
    #[arg(long, default_value = "10s", value_parser = parse_duration, global = true)]
    pub tcp_keepalive_interval: Duration,
    /// Unanswered TCP keepalive probes before the connection is dropped.
    #[arg(long, default_value_t = 3, global = true)]
    pub tcp_keepalive_retries: u32,
    /// Concurrent ext-proc streams (requests in progress) per HTTP/2 connection
    /// (SETTINGS_MAX_CONCURRENT_STREAMS); the proxy opens more connections beyond it.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub grpc_max_concurrent_streams: u32,
    /// ext-proc connections open at once; further clients wait in the listen backlog.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..), global = true)]
    pub grpc_max_connections: u64,
    /// On SIGTERM or Ctrl-C: how long readiness reports NotServing (so Kubernetes takes the
    /// pod out of the Service) while ext-proc keeps serving new and open streams, before the
    /// server stops (open streams then get 10 s more). 0 stops at once.
    #[arg(long, default_value = "30s", value_parser = parse_duration, global = true)]
    pub drain_timeout: Duration,
    /// Longest wait for the proxy's next message before a request's routing decision; the
    /// stream is then ended with DEADLINE_EXCEEDED.
    #[arg(long, default_value = "60s", value_parser = parse_duration, global = true)]
    pub request_idle_timeout: Duration,
    /// Longest time from an ext-proc stream's opening until its routing decision, however
    /// the headers and body trickle in and including any wait in flow control's queue; the
    /// stream is then ended with DEADLINE_EXCEEDED and what it held released. Keep it above
    /// flowControl's defaultRequestTTL (60s).
    #[arg(long, default_value = "90s", value_parser = parse_duration, global = true)]
    pub request_decision_timeout: Duration,
    /// How often model-server metrics are refreshed.
    #[arg(long, default_value = "50ms", value_parser = parse_duration, global = true)]
    pub refresh_metrics_interval: Duration,
    /// Metrics older than this mark their endpoint stale [default: 2s]. One threshold for
    /// readiness, admission (the utilization detector) and routing: stale endpoints get no
    /// requests while some endpoint is fresh. A `metricsStalenessThreshold` in the config
    /// applies when this flag is absent, and must equal it when both are given.
    #[arg(long, value_parser = parse_duration, global = true)]
    pub metrics_staleness_threshold: Option<Duration>,
    /// When every endpoint's metrics are stale: `fail-open` routes to the least-loaded
    /// endpoints by last known load (waiting queue + running + requests sent since the last
    /// scrape) and keeps readiness serving; `fail-closed` answers 503 (`stale_metrics`),
    /// counts the pool saturated and reports readiness not serving.
    #[arg(long, value_enum, default_value_t = StaleMetricsPolicy::FailOpen, global = true)]
    pub stale_metrics_policy: StaleMetricsPolicy,
    /// Prometheus metric (with optional {label="value"} selector) of the waiting queue.
    #[arg(long, global = true)]
    pub total_queued_requests_metric: Option<String>,
    /// Prometheus metric of running requests.
    #[arg(long, global = true)]
    pub total_running_requests_metric: Option<String>,
    /// Prometheus metric of KV-cache utilisation.
    #[arg(long, global = true)]
    pub kv_cache_usage_percentage_metric: Option<String>,
    /// Prometheus metric carrying LoRA adapter state.
    #[arg(long, global = true)]
    pub lora_info_metric: Option<String>,
    /// Static pool: YAML/JSON list of endpoints (address, port, name, engine, role, labels),
    /// reloaded when it changes.
    #[arg(long, global = true)]
    pub endpoints_file: Option<PathBuf>,
    /// InferenceObjectives: a YAML list of `{name, priority}` or `{name, criticality}`
    /// (Critical = 1, Standard = 0, Sheddable = -1), and/or `kind: InferenceObjective`, legacy
    /// `kind: InferenceModel` and `kind: List` objects, in documents separated by `---`. The
    /// `x-llm-d-inference-objective` header (or `x-gateway-inference-objective`) names an
    /// objective or a criticality (unknown names get priority 0); a request naming none gets
    /// the criticality of its model's InferenceModel, or 0.
    #[arg(long, global = true)]
    pub objectives_file: Option<PathBuf>,
    /// Name of the pool in metrics; on Kubernetes (the `kubernetes` feature, no
    /// --endpoints-file), the InferencePool whose ready pods are the endpoints.
    #[arg(long, default_value = "default-pool", global = true)]
    pub pool_name: String,
    /// Whether --pool-name was given (rather than defaulted): it then names an InferencePool.
    #[arg(skip)]
    pub pool_name_given: bool,
    /// Namespace of the InferencePool (or of the --endpoint-selector pods); defaults to the
    /// NAMESPACE environment variable, else `default`. Needs the `kubernetes` feature.
    #[arg(long, global = true)]
    pub pool_namespace: Option<String>,
    /// API group of the InferencePool: `inference.networking.k8s.io` (v1) or
    /// `inference.networking.x-k8s.io` (v1alpha2).
    #[arg(long, default_value = "inference.networking.k8s.io", global = true)]
    pub pool_group: String,
    /// Without an InferencePool: the pods of the namespace this Kubernetes label selector
    /// chooses are the endpoints (`app=vllm,env in (prod)`); needs --endpoint-target-ports.
    #[arg(long, global = true, conflicts_with = "endpoints_file")]
    pub endpoint_selector: Option<String>,
    /// Among replicas of this EPP, only the one holding the pool's Lease
    /// (`epp-<namespace>-<pool>.llm-d.ai`) reports ready; the others keep their state warm and
    /// take over when it goes. Needs the `kubernetes` feature.
    #[arg(long, default_value_t = false, global = true)]
    pub ha_enable_leader_election: bool,
    /// The model servers' ports on each --endpoint-selector pod (1 to 8, comma-separated),
    /// one endpoint (data-parallel rank) per port.
    #[arg(long, global = true, value_delimiter = ',', requires = "endpoint_selector")]
    pub endpoint_target_ports: Vec<i64>,
    /// Fallback endpoints emitted after the primary (0: one endpoint; some proxies parse only one).
    #[arg(long, default_value_t = 0, global = true)]
    pub max_fallback_endpoints: usize,
    /// Emit the scheduler's score of each destination endpoint in the `envoy.lb` dynamic
    /// metadata (`x-gateway-destination-endpoint-scores`: `ip:port` -> score).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, global = true)]
    pub emit_endpoint_scores: bool,
    /// Allow plugin types llm-d-router ranks alpha (session and header-label affinity); a
    /// config declaring one is refused without it.
    #[arg(
        long,
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set,
        global = true
    )]
    pub allow_experimental_plugins: bool,
    /// Largest request body accepted, in bytes (larger ones get 413).
    #[arg(long, default_value_t = 32 * 1024 * 1024, global = true)]
    pub max_request_body_bytes: usize,
    /// Log verbosity: -v info, -vv debug, -vvv trace (default: warnings).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Log lines on stderr: `text` (coloured only on a terminal and without `NO_COLOR`), or
    /// `json`, one object per line with `timestamp`, `level`, `target`, `message` and the
    /// event's fields. The Go EPP's `--zap-encoder json|console` is accepted as well.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, alias = "zap-encoder", global = true)]
    pub log_format: LogFormat,
    /// The Go EPP's log verbosity, `--v=N`, as its Helm charts pass it: up to 3 logs info, 4
    /// debug, 5 and more trace. The more verbose of `--v` and `-v` applies.
    #[arg(long = "v", value_name = "N", global = true)]
    pub go_verbosity: Option<u8>,
    /// The Go EPP's OpenTelemetry switch, accepted as its Helm charts pass it: this epp emits
    /// no traces, so only `--tracing=false` is accepted.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, global = true)]
    pub tracing: bool,
    /// The Go EPP's switch for Kubernetes token authentication of `/metrics`, accepted as its
    /// Helm charts pass it when their Prometheus auth is off: this epp's `/metrics` takes no
    /// token, so only `--metrics-endpoint-auth=false` is accepted. Keep the endpoint inside
    /// the cluster network (a NetworkPolicy) where scrapers must be authenticated.
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set, global = true)]
    pub metrics_endpoint_auth: Option<bool>,
}

impl ServerFlags {
    /// The `-v` count that applies: `-v` given that many times, or the Go EPP's `--v=N`
    /// mapped onto it, whichever is more verbose.
    pub fn verbosity(&self) -> u8 {
        let go = match self.go_verbosity {
            None => 0,
            Some(0..=3) => 1,
            Some(4) => 2,
            Some(_) => 3,
        };
        self.verbose.max(go)
    }
}

/// `--log-format`: how log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    #[value(alias = "console")]
    Text,
    /// One JSON object per line.
    Json,
}

/// `--stale-metrics-policy`: what happens when every endpoint's metrics are stale.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum StaleMetricsPolicy {
    /// Route on the last known metrics, stay ready.
    #[default]
    FailOpen,
    /// Answer 503 and report not ready.
    FailClosed,
}

impl From<StaleMetricsPolicy> for scheduler_core::AllStale {
    fn from(policy: StaleMetricsPolicy) -> Self {
        match policy {
            StaleMetricsPolicy::FailOpen => Self::FailOpen,
            StaleMetricsPolicy::FailClosed => Self::FailClosed,
        }
    }
}

/// The one staleness threshold: the flag, else the config's `metricsStalenessThreshold`, else
/// [`scheduler_core::DEFAULT_METRICS_STALENESS_THRESHOLD`]; a flag and a config that disagree
/// are refused rather than one silently winning.
pub fn staleness_threshold(
    flag: Option<Duration>,
    configured: Option<Duration>,
) -> Result<Duration, String> {
    match (flag, configured) {
        (Some(flag), Some(configured)) if flag != configured => Err(format!(
            "--metrics-staleness-threshold {flag:?} differs from metricsStalenessThreshold {configured:?} in the config; one threshold applies to readiness, admission and routing"
        )),
        (Some(value), _) | (None, Some(value)) => Ok(value),
        (None, None) => Ok(scheduler_core::DEFAULT_METRICS_STALENESS_THRESHOLD),
    }
}

/// Parses a duration flag: a Go duration (`50ms`, `2s`, `1m30s`, `250us`), or a bare number of
/// milliseconds. Out-of-range values are refused with a message, never a panic.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if !text.is_empty() && text.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return text
            .parse::<f64>()
            .ok()
            .and_then(|millis| Duration::try_from_secs_f64(millis / 1e3).ok())
            .ok_or_else(|| format!("'{text}' is not a duration in range (e.g. 50ms, 2s, 1m30s)"));
    }
    scheduler_core::flow::parse_go_duration(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_style_durations() {
        assert_eq!(parse_duration("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("200"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("2 weeks").unwrap_err().contains("not a duration"));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("-5s").is_err());
    }

    #[test]
    fn huge_durations_are_errors_not_panics() {
        for huge in ["99999999999999999999h", "99999999999999999999999999", "1e400"] {
            let error = parse_duration(huge).expect_err(huge);
            assert!(error.contains(huge) || error.contains("range"), "{huge}: {error}");
        }
        let parsed =
            Cli::try_parse_from(["epp", "--refresh-metrics-interval", "99999999999999999999h"]);
        let error = parsed.expect_err("refused").to_string();
        assert!(error.contains("out of range"), "{error}");
    }

    #[test]
    fn flags_default_like_the_go_epp() {
        let cli = Cli::parse_from(["epp"]);
        assert_eq!(
            (cli.server.grpc_port, cli.server.grpc_health_port, cli.server.metrics_port),
            (9002, 9003, 9090)
        );
        assert!(cli.server.secure_serving);
        assert_eq!(cli.server.refresh_metrics_interval, Duration::from_millis(50));
        assert_eq!(cli.server.metrics_staleness_threshold, None);
        assert_eq!(cli.server.stale_metrics_policy, StaleMetricsPolicy::FailOpen);
        let cli = Cli::parse_from([
            "epp",
            "--secure-serving=false",
            "-vv",
            "--max-fallback-endpoints",
            "2",
        ]);
        assert!(!cli.server.secure_serving);
        assert_eq!(cli.server.verbose, 2);
        assert_eq!(cli.server.max_fallback_endpoints, 2);
    }

    #[test]
    fn log_format_is_text_unless_json_is_asked_for() {
        assert_eq!(Cli::parse_from(["epp"]).server.log_format, LogFormat::Text);
        let json = Cli::parse_from(["epp", "--log-format", "json", "-vv"]).server;
        assert_eq!((json.log_format, json.verbose), (LogFormat::Json, 2));
        // The Go EPP's spelling, as its Helm chart passes it.
        let zap = Cli::parse_from(["epp", "--zap-encoder", "json"]).server;
        assert_eq!(zap.log_format, LogFormat::Json);
        let console = Cli::parse_from(["epp", "--zap-encoder=console"]).server;
        assert_eq!(console.log_format, LogFormat::Text);
        let error = Cli::try_parse_from(["epp", "--log-format", "xml"]).unwrap_err().to_string();
        assert!(error.contains("--log-format") && error.contains("xml"), "{error}");
    }

    #[test]
    fn the_go_epp_verbosity_maps_onto_v() {
        let verbosity = |args: &[&str]| Cli::parse_from(args).server.verbosity();
        assert_eq!(verbosity(&["epp"]), 0);
        assert_eq!(verbosity(&["epp", "--v=1"]), 1);
        assert_eq!(verbosity(&["epp", "--v=2"]), 1);
        assert_eq!(verbosity(&["epp", "--v", "4"]), 2);
        assert_eq!(verbosity(&["epp", "--v=5"]), 3);
        assert_eq!(verbosity(&["epp", "--v=1", "-vvv"]), 3, "the more verbose applies");
        assert!(!Cli::parse_from(["epp", "--tracing=false"]).server.tracing);
        assert!(Cli::parse_from(["epp", "--tracing=true"]).server.tracing);
        let auth = |args: &[&str]| Cli::parse_from(args).server.metrics_endpoint_auth;
        assert_eq!(auth(&["epp"]), None);
        assert_eq!(auth(&["epp", "--metrics-endpoint-auth=false"]), Some(false));
        assert_eq!(auth(&["epp", "--metrics-endpoint-auth", "true"]), Some(true));
    }

    #[test]
    fn experimental_plugins_are_off_unless_asked_for() {
        assert!(!Cli::parse_from(["epp"]).server.allow_experimental_plugins);
        for asked in [
            &["epp", "--allow-experimental-plugins"][..],
            &["epp", "--allow-experimental-plugins=true"],
        ] {
            assert!(Cli::parse_from(asked).server.allow_experimental_plugins, "{asked:?}");
        }
        let off = Cli::parse_from(["epp", "--allow-experimental-plugins=false"]);
        assert!(!off.server.allow_experimental_plugins);
    }

    #[test]
    fn server_limit_defaults() {
        let flags = Cli::parse_from(["epp"]).server;
        assert_eq!(flags.grpc_keepalive_interval, Duration::from_secs(30));
        assert_eq!(flags.grpc_keepalive_timeout, Duration::from_secs(10));
        assert_eq!(flags.tcp_keepalive_time, Duration::from_secs(60));
        assert_eq!((flags.grpc_max_concurrent_streams, flags.grpc_max_connections), (1024, 1024));
        assert_eq!(flags.request_idle_timeout, Duration::from_secs(60));
        assert_eq!(flags.drain_timeout, Duration::from_secs(30), "the Go EPP's default");
        assert_eq!(flags.request_decision_timeout, Duration::from_secs(90));
        assert_eq!(flags.client_ca_path, None);
        assert!(Cli::try_parse_from(["epp", "--grpc-max-concurrent-streams", "0"]).is_err());
    }

    #[test]
    fn one_staleness_threshold() {
        let cli = Cli::parse_from(["epp", "--stale-metrics-policy", "fail-closed"]);
        assert_eq!(cli.server.stale_metrics_policy, StaleMetricsPolicy::FailClosed);
        let second = Some(Duration::from_secs(1));
        assert_eq!(staleness_threshold(None, None), Ok(Duration::from_secs(2)));
        assert_eq!(staleness_threshold(second, None), second.ok_or(String::new()));
        assert_eq!(staleness_threshold(None, second), second.ok_or(String::new()));
        assert_eq!(staleness_threshold(second, second), second.ok_or(String::new()));
        let error = staleness_threshold(Some(Duration::from_secs(2)), second).unwrap_err();
        assert!(error.contains("differs"), "{error}");
    }

    #[test]
    fn bbr_flags_default_like_the_go_router_and_share_the_server_flags() {
        let cli = Cli::parse_from(["epp", "bbr"]);
        let Some(Command::Bbr(args)) = cli.command else { panic!("bbr is a subcommand") };
        assert_eq!((args.grpc_port, args.grpc_health_port, args.metrics_port), (9004, 9005, 9090));
        assert_eq!(args.models_refresh_interval, Duration::from_secs(10));
        assert_eq!(args.max_body_bytes, 32 * 1024 * 1024);
        assert_eq!(args.adapters_file, None);
        let cli = Cli::parse_from([
            "epp",
            "bbr",
            "--grpc-port",
            "7004",
            "--adapters-file",
            "a.yaml",
            "--endpoints-file",
            "pool.yaml",
            "--secure-serving=false",
            "--models-refresh-interval",
            "2s",
            "-v",
        ]);
        let Some(Command::Bbr(args)) = cli.command else { panic!("bbr is a subcommand") };
        assert_eq!(args.grpc_port, 7004);
        assert_eq!(args.adapters_file, Some(PathBuf::from("a.yaml")));
        assert_eq!(args.models_refresh_interval, Duration::from_secs(2));
        assert_eq!(cli.server.endpoints_file, Some(PathBuf::from("pool.yaml")));
        assert!(!cli.server.secure_serving);
        assert_eq!(cli.server.verbose, 1);
        assert_eq!(Cli::parse_from(["epp"]).server.grpc_port, 9002, "the picker keeps its port");
    }

    #[test]
    fn demo_flags() {
        let Some(Command::Demo(args)) = Cli::parse_from(["epp", "demo"]).command else {
            panic!("demo is a subcommand")
        };
        assert_eq!((args.servers, args.requests, args.seed), (4, None, 42), "requests: per load");
        assert!(args.policy_compare);
        let cli = Cli::parse_from(["epp", "demo", "--servers", "2", "--policy-compare=false"]);
        let Some(Command::Demo(args)) = cli.command else { panic!("demo is a subcommand") };
        assert_eq!(args.servers, 2);
        assert!(!args.policy_compare);
    }
}
