//! The `epp` binary: the endpoint picker server, and `epp demo`, the picker end to end.

#[cfg(feature = "demo")]
mod demo_launcher;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ext_proc_adapter::cli::{self, BbrArgs, Cli, Command, DemoArgs, ServerFlags};
use ext_proc_adapter::cross_replica::CrossReplica;
use ext_proc_adapter::model_rewrites::ModelRewriteSettings;
use ext_proc_adapter::server::{
    self, CollectorSettings, ConnectionLimits, ServerConfig, TcpKeepalive,
};
use ext_proc_adapter::tls::PemIdentity;
use ext_proc_adapter::{DirectorOptions, StreamLimits};
use ext_proc_adapter::{bbr, data_layer, logging};
use metrics_model::collector::CollectorConfig;
use metrics_model::mapping::{Engine, FlagSpecs, MetricMapping};
use scheduler_core::Director;
use scheduler_core::flow::{FlowMetrics, ObjectiveResolver};
use scheduler_core::{EndpointPickerConfig, SharedPool};

fn main() -> ExitCode {
    let cli = parse_command_line();
    init_logging(&cli.server);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("epp: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    if cli.server.tracing {
        eprintln!("epp: --tracing=true: this epp emits no OpenTelemetry traces; drop the flag");
        return ExitCode::FAILURE;
    }
    if cli.server.metrics_endpoint_auth == Some(true) {
        eprintln!(
            "epp: --metrics-endpoint-auth=true: this epp's /metrics takes no Kubernetes token; \
             drop the flag (or pass =false) and keep the endpoint inside the cluster network"
        );
        return ExitCode::FAILURE;
    }
    let outcome = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => runtime.block_on(serve(cli.server)),
        Command::Demo(args) => runtime.block_on(run_demo(args, &cli.server)),
        Command::Bbr(args) => runtime.block_on(serve_bbr(args, cli.server)),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("epp: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The flags, noting whether --pool-name was given (it then names an InferencePool).
fn parse_command_line() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    let given = |matches: &clap::ArgMatches| {
        matches.value_source("pool_name") == Some(clap::parser::ValueSource::CommandLine)
    };
    cli.server.pool_name_given =
        given(&matches) || matches.subcommand().is_some_and(|(_, sub)| given(sub));
    cli
}

/// Logs on stderr at the `-v` level, in the `--log-format` (see [`logging`]).
fn init_logging(flags: &ServerFlags) {
    logging::init(flags.verbosity(), flags.log_format);
}

fn load_config(flags: &ServerFlags) -> Result<EndpointPickerConfig, String> {
    let text = match (&flags.config_text, &flags.config_file) {
        (Some(text), _) => text.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read --config-file {}: {error}", path.display()))?,
        (None, None) => return Ok(EndpointPickerConfig::gie_default()),
    };
    EndpointPickerConfig::from_yaml(&text).map_err(|error| format!("invalid config: {error}"))
}

fn load_objectives(flags: &ServerFlags) -> Result<ObjectiveResolver, String> {
    let metrics = std::sync::Arc::new(FlowMetrics::new());
    match &flags.objectives_file {
        None => ObjectiveResolver::new(Vec::new(), metrics).map_err(|error| error.to_string()),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|error| {
                format!("cannot read --objectives-file {}: {error}", path.display())
            })?;
            ObjectiveResolver::from_yaml(&text, metrics)
                .map_err(|error| format!("invalid --objectives-file {}: {error}", path.display()))
        }
    }
}

fn model_rewrite_settings(flags: &ServerFlags) -> Option<ModelRewriteSettings> {
    let path = flags.model_rewrites_file.clone()?;
    let seed = flags.model_rewrite_seed.unwrap_or_else(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        now.map_or(0, |since| since.as_nanos() as u64)
    });
    Some(ModelRewriteSettings {
        path,
        sticky_header: flags.model_rewrite_sticky_header.clone(),
        strict: flags.model_rewrite_strict,
        seed,
    })
}

async fn serve(flags: ServerFlags) -> Result<(), String> {
    let config = load_config(&flags)?;
    let configured = scheduler_core::flow::configured_metrics_staleness(&config)
        .map_err(|error| format!("invalid config: {error}"))?;
    let staleness = cli::staleness_threshold(flags.metrics_staleness_threshold, configured)?;
    let objectives = load_objectives(&flags)?;
    let tls = tls_identity(&flags)?;
    let client_ca = client_ca(&flags)?;
    let connections = connection_limits(&flags);
    let address = |port| SocketAddr::new(flags.bind_address, port);
    let collector = CollectorSettings {
        config: CollectorConfig {
            interval: flags.refresh_metrics_interval,
            staleness_threshold: staleness,
            ..CollectorConfig::default()
        },
        default_engine: default_engine(&flags)?,
        engines: None,
    };
    let mut server_config = ServerConfig {
        grpc_address: address(flags.grpc_port),
        health_address: address(flags.grpc_health_port),
        metrics_address: address(flags.metrics_port),
        tls,
        client_ca,
        connections,
        director: DirectorOptions {
            max_body_bytes: flags.max_request_body_bytes,
            ..DirectorOptions::default()
        },
        limits: StreamLimits {
            max_fallback_endpoints: flags.max_fallback_endpoints,
            emit_endpoint_scores: flags.emit_endpoint_scores,
            request_idle_timeout: flags.request_idle_timeout,
            decision_timeout: flags.request_decision_timeout,
        },
        pool_name: flags.pool_name.clone(),
        staleness_threshold: Some(staleness),
        when_all_stale: flags.stale_metrics_policy.into(),
        endpoints_file: flags.endpoints_file.clone(),
        watch_endpoints_file: true,
        collector: Some(collector),
        models: None,
        model_rewrites: model_rewrite_settings(&flags),
        gpu: None,
        cluster_metrics: None,
    };
    let mut registry = scorers::builtin_registry();
    registry.allow_experimental_plugins(flags.allow_experimental_plugins);
    ext_proc_adapter::cross_replica::register(&mut registry);
    let plugins =
        config.construct_plugins(&registry).map_err(|error| format!("invalid config: {error}"))?;
    let layer = config
        .data_layer(&plugins, &registry)
        .map_err(|error| format!("invalid config: {error}"))?;
    data_layer::apply(&layer, &mut server_config)
        .map_err(|error| format!("invalid config: {error}"))?;
    if layer.declared && default_engine(&flags)?.name() == "custom" {
        // The config's extractor decides metric names once it has a data layer.
        tracing::warn!("dataLayer is configured: the metric-name flags are ignored");
    }
    let pool = Arc::new(SharedPool::default());
    // Clones share the table, so objectives watched on Kubernetes reach the director.
    let objective_table = objectives.clone();
    let director = Arc::new(
        Director::from_constructed(
            &config,
            &plugins,
            &registry,
            Arc::clone(&pool),
            server_config.director.clone(),
            objectives,
        )
        .map_err(|error| format!("invalid config: {error}"))?,
    );
    let pool_name = server_config.pool_name.clone();
    let running = server::start_with_director(Arc::clone(&director), server_config)
        .await
        .map_err(|error| error.to_string())?;
    ext_proc_adapter::kv_events::attach_metrics(&plugins, &running.metrics);
    ext_proc_adapter::token_metrics::attach_metrics(&plugins, &running.metrics);
    let cross_replica = CrossReplica::start(&layer, &plugins, pool, &pool_name, &running.metrics)?;
    let mut kubernetes = start_kubernetes(&flags, &running, objective_table, director).await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    if let Some(kubernetes) = &mut kubernetes {
        kubernetes.release_leadership().await;
    }
    running.drain(flags.drain_timeout, Duration::from_secs(10)).await;
    if let Some(sync) = cross_replica {
        sync.shutdown().await;
    }
    Ok(())
}

/// Kubernetes discovery, when the flags ask for it: no --endpoints-file, and --pool-name,
/// --pool-namespace or --endpoint-selector given.
#[cfg(feature = "kubernetes")]
async fn start_kubernetes(
    flags: &ServerFlags,
    running: &server::RunningServer,
    objectives: ObjectiveResolver,
    director: Arc<Director>,
) -> Result<Option<ext_proc_adapter::kubernetes::KubernetesEndpoints>, String> {
    use ext_proc_adapter::kubernetes::{self, KubernetesSettings, PoolObjectSinks};
    use k8s_discovery::PoolSource;
    let Some(settings) = kubernetes_settings(flags)? else { return Ok(None) };
    let source = match &settings {
        PoolSource::InferencePool { name, group } => format!("InferencePool {group}/{name}"),
        PoolSource::Selector { selector, .. } => format!("pods matching {selector}"),
    };
    let namespace = pool_namespace(flags);
    tracing::info!(%namespace, %source, "endpoints from Kubernetes");
    let leader_election = flags
        .ha_enable_leader_election
        .then(|| k8s_discovery::LeaderElectionConfig::for_pool(&namespace, &flags.pool_name));
    let settings = KubernetesSettings { namespace, source: settings, leader_election };
    let writer = running.pool_writer.clone();
    // A file given for a kind wins over the API for that kind.
    let sinks = PoolObjectSinks {
        objectives: flags.objectives_file.is_none().then_some(objectives),
        rewrites: flags
            .model_rewrites_file
            .is_none()
            .then(|| (director, Arc::clone(&running.metrics))),
    };
    kubernetes::start(settings, writer, running.readiness_holds(), sinks).await.map(Some)
}

#[cfg(feature = "kubernetes")]
fn kubernetes_settings(flags: &ServerFlags) -> Result<Option<k8s_discovery::PoolSource>, String> {
    use k8s_discovery::{PoolSource, parse_selector, pool_resource, validate_ports};
    if let Some(selector) = &flags.endpoint_selector {
        let selector =
            parse_selector(selector).map_err(|error| format!("--endpoint-selector: {error}"))?;
        let target_ports = validate_ports(&flags.endpoint_target_ports)
            .map_err(|error| format!("--endpoint-target-ports: {error}"))?;
        return Ok(Some(PoolSource::Selector { selector, target_ports }));
    }
    if flags.endpoints_file.is_some() || !(flags.pool_name_given || flags.pool_namespace.is_some())
    {
        return Ok(None);
    }
    // Checked before connecting, so a typo is named before any credentials problem.
    if pool_resource(&flags.pool_group).is_none() {
        let error = k8s_discovery::DiscoveryError::UnknownGroup(flags.pool_group.clone());
        return Err(format!("--pool-group: {error}"));
    }
    Ok(Some(PoolSource::InferencePool {
        name: flags.pool_name.clone(),
        group: flags.pool_group.clone(),
    }))
}

/// --pool-namespace, else the NAMESPACE environment variable, else `default` (the Go EPP's
/// order).
#[cfg(feature = "kubernetes")]
fn pool_namespace(flags: &ServerFlags) -> String {
    flags
        .pool_namespace
        .clone()
        .or_else(|| std::env::var("NAMESPACE").ok().filter(|namespace| !namespace.is_empty()))
        .unwrap_or_else(|| "default".to_owned())
}

/// What a binary without the `kubernetes` feature starts: nothing.
#[cfg(not(feature = "kubernetes"))]
struct NoKubernetes;

#[cfg(not(feature = "kubernetes"))]
impl NoKubernetes {
    async fn release_leadership(&mut self) {}
}

/// Without the `kubernetes` feature, the Kubernetes flags are refused rather than ignored.
#[cfg(not(feature = "kubernetes"))]
async fn start_kubernetes(
    flags: &ServerFlags,
    _running: &server::RunningServer,
    _objectives: ObjectiveResolver,
    _director: Arc<Director>,
) -> Result<Option<NoKubernetes>, String> {
    if flags.pool_namespace.is_some()
        || flags.endpoint_selector.is_some()
        || flags.ha_enable_leader_election
    {
        return Err("--pool-namespace, --endpoint-selector and --ha-enable-leader-election need an epp built with the `kubernetes` feature".to_owned());
    }
    Ok(None)
}

/// The ext-proc TLS identity: none without --secure-serving, else from --cert-path, else
/// self-signed.
fn tls_identity(flags: &ServerFlags) -> Result<Option<PemIdentity>, String> {
    if !flags.secure_serving {
        return Ok(None);
    }
    match &flags.cert_path {
        Some(directory) => PemIdentity::from_directory(directory),
        None => PemIdentity::self_signed(),
    }
    .map(Some)
    .map_err(|error| error.to_string())
}

/// The CA bundle of --client-ca-path, which needs --secure-serving.
fn client_ca(flags: &ServerFlags) -> Result<Option<String>, String> {
    match &flags.client_ca_path {
        None => Ok(None),
        Some(_) if !flags.secure_serving => {
            Err("--client-ca-path needs --secure-serving=true".into())
        }
        Some(path) => std::fs::read_to_string(path)
            .map(Some)
            .map_err(|error| format!("cannot read --client-ca-path {}: {error}", path.display())),
    }
}

/// Keepalive and connection limits of the ext-proc listener (a zero interval turns one off).
fn connection_limits(flags: &ServerFlags) -> ConnectionLimits {
    let nonzero = |duration: Duration| (!duration.is_zero()).then_some(duration);
    ConnectionLimits {
        http2_keepalive_interval: nonzero(flags.grpc_keepalive_interval),
        http2_keepalive_timeout: flags.grpc_keepalive_timeout,
        tcp_keepalive: nonzero(flags.tcp_keepalive_time).map(|idle| TcpKeepalive {
            idle,
            interval: flags.tcp_keepalive_interval,
            retries: flags.tcp_keepalive_retries,
        }),
        max_concurrent_streams: flags.grpc_max_concurrent_streams,
        max_connections: usize::try_from(flags.grpc_max_connections).unwrap_or(usize::MAX),
        tls_handshake_timeout: flags.tls_handshake_timeout,
    }
}

/// `epp bbr`: the body-based router, until a shutdown signal.
async fn serve_bbr(args: BbrArgs, flags: ServerFlags) -> Result<(), String> {
    let address = |port| SocketAddr::new(flags.bind_address, port);
    let config = bbr::BbrConfig {
        grpc_address: address(args.grpc_port),
        health_address: address(args.grpc_health_port),
        metrics_address: address(args.metrics_port),
        tls: tls_identity(&flags)?,
        client_ca: client_ca(&flags)?,
        connections: connection_limits(&flags),
        limits: StreamLimits {
            request_idle_timeout: flags.request_idle_timeout,
            decision_timeout: flags.request_decision_timeout,
            ..StreamLimits::default()
        },
        max_body_bytes: args.max_body_bytes,
        adapters_file: args.adapters_file,
        endpoints_file: flags.endpoints_file,
        models_refresh_interval: args.models_refresh_interval,
    };
    let running = bbr::start(config).await.map_err(|error| error.to_string())?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    running.shutdown(Duration::from_secs(10)).await;
    Ok(())
}

/// vLLM, unless metric-name flags ask for a custom mapping (unset flags keep vLLM's names).
fn default_engine(flags: &ServerFlags) -> Result<Engine, String> {
    let custom = [
        &flags.total_queued_requests_metric,
        &flags.total_running_requests_metric,
        &flags.kv_cache_usage_percentage_metric,
        &flags.lora_info_metric,
    ];
    if custom.iter().all(|flag| flag.is_none()) {
        return Ok(Engine::Vllm);
    }
    let specs = FlagSpecs {
        total_queued_requests: flags
            .total_queued_requests_metric
            .as_deref()
            .unwrap_or("vllm:num_requests_waiting"),
        total_running_requests: flags
            .total_running_requests_metric
            .as_deref()
            .unwrap_or("vllm:num_requests_running"),
        kv_cache_usage_percentage: flags
            .kv_cache_usage_percentage_metric
            .as_deref()
            .unwrap_or("vllm:kv_cache_usage_perc"),
        lora_info: flags.lora_info_metric.as_deref().unwrap_or("vllm:lora_requests_info"),
        cache_info: "vllm:cache_config_info",
    };
    MetricMapping::from_flag_specs(&specs)
        .map(|mapping| Engine::Custom(std::sync::Arc::new(mapping)))
        .map_err(|error| format!("invalid metric flag: {error}"))
}

#[cfg(feature = "demo")]
async fn run_demo(args: DemoArgs, flags: &ServerFlags) -> Result<(), String> {
    let config = match (&flags.config_text, &flags.config_file) {
        (None, None) => None,
        _ => Some(load_config(flags)?),
    };
    // The disaggregation comparison keeps the light load its README figures were taken at.
    if args.redis.is_some() && !cfg!(feature = "redis-sync") {
        return Err("--redis needs an epp built with the `redis-sync` feature: cargo run --release -p epp-ext-proc-adapter --bin epp --features redis-sync -- demo --replicas 2 --redis ADDR".into());
    }
    if args.redis.is_some() && args.replicas < 2 {
        return Err("--redis syncs picker replicas: give --replicas 2 or more".into());
    }
    if args.replicas > 1 && args.pd {
        return Err("--replicas does not combine with --pd".into());
    }
    let load = if args.light || args.pd { demo::Load::Light } else { demo::Load::NearSaturation };
    let defaults = demo::DemoOptions::for_load(load);
    let options = demo::DemoOptions {
        servers: args.servers,
        requests: args.requests.unwrap_or(defaults.requests),
        concurrency: args.concurrency,
        seed: args.seed,
        policy_compare: args.policy_compare,
        config,
        rate_per_second: args.rate,
        system_prompts: args.system_prompts,
        disaggregation: args.pd.then(|| demo::Disaggregation {
            prefill_servers: args
                .prefill_servers
                .unwrap_or(demo::Disaggregation::for_servers(args.servers).prefill_servers),
            non_cached_tokens: args.non_cached_tokens,
        }),
        replicas: usize::from(args.replicas),
        synced_replicas: args.redis.is_some(),
        ..defaults
    };
    if let Some(rate) = options.rate_per_second
        && !(rate.is_finite() && rate > 0.0)
    {
        return Err(format!("--rate must be a positive number of requests per second, got {rate}"));
    }
    if options.disaggregation.is_some() && options.config.is_some() {
        return Err(
            "--pd builds its own prefill/decode config; drop --config-file/--config-text".into()
        );
    }
    println!(
        "epp demo: {} simulated vLLM servers on 127.0.0.1, {} requests at {} per second (seed {}, at most {} in flight)",
        options.servers,
        options.requests,
        options.rate(),
        options.seed,
        options.concurrency
    );
    println!("{}", options.load_line());
    if let Some(pd) = options.disaggregation {
        println!(
            "prefill/decode disaggregation: {} prefill + {} decode servers (decode behind a sidecar), disaggregating at >= {} uncached prompt tokens, against {} aggregated servers; each server's prefills stall its decodes",
            pd.prefill_servers,
            options.servers.saturating_sub(pd.prefill_servers),
            pd.non_cached_tokens,
            options.servers
        );
    }
    if options.replicas > 1 {
        match &args.redis {
            Some(redis) => println!(
                "picker replicas: 1, then {n} independent, then {n} synced through Redis at {redis}; the proxy asks the replicas in turn",
                n = options.replicas
            ),
            None => println!(
                "picker replicas: 1, then {} independent; the proxy asks the replicas in turn",
                options.replicas
            ),
        }
    }
    if let Some(redis) = &args.redis {
        // The syncer never waits for Redis, so an unreachable one would only show as synced
        // replicas that are not: refuse before the run instead.
        demo_launcher::check_redis(redis).await?;
    }
    let started = std::time::Instant::now();
    let launcher = demo_launcher::InProcessPicker { redis: args.redis.clone() };
    let reports = demo::run(&options, &launcher).await.map_err(|error| error.to_string())?;
    print!("{}", demo::render(&reports));
    println!("demo finished in {:.1} s", started.elapsed().as_secs_f64());
    // A failed request means the pipeline is broken somewhere: make scripts and CI notice.
    let failed: usize = reports.iter().map(|report| report.errors).sum();
    if failed > 0 {
        return Err(format!("{failed} demo requests failed"));
    }
    Ok(())
}

#[cfg(not(feature = "demo"))]
async fn run_demo(_: DemoArgs, _: &ServerFlags) -> Result<(), String> {
    Err("this epp was built without the `demo` feature".into())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
