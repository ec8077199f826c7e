//! The demo run: the same seeded workload through the picker, then through round-robin.
//!
//! Each policy run starts fresh simulated vLLM servers ([`crate::model_server`]) so no run
//! inherits another's warm caches. For the `epp` policy a picker started by the caller's
//! [`PickerLauncher`] schedules over them, and the Envoy-like proxy ([`crate::proxy`]) asks it
//! over ext-proc where each request of the workload ([`crate::workload`]) goes; for
//! `round-robin` the proxy rotates endpoints itself. [`crate::report`] compares the two.
//!
//! With [`DemoOptions::replicas`] above 1 the same workload also runs through that many picker
//! replicas, the proxy asking each in turn as a load-balanced ext-proc service would, once
//! with replicas that keep their state to themselves and (with
//! [`DemoOptions::synced_replicas`]) once with replicas sharing it: the report's count of
//! history kept shows how many later turns of a conversation found the endpoint that served
//! the turn before (printed under the table).
//!
//! With [`DemoOptions::disaggregation`] the comparison is prefill/decode disaggregation against
//! aggregated serving on the same servers: first the picker runs [`pd_config`] over a pool of
//! prefill servers and decode servers behind [`crate::sidecar`]s, then [`demo_config`] over
//! the same number of plain servers. Both runs use servers whose prefills stall their decodes
//! (one compute engine per server), the interference disaggregation exists to remove.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Instant;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use indicatif::{ProgressBar, ProgressStyle};
use scheduler_core::{EndpointPickerConfig, EndpointRole, PluginConfig, PluginRef};
use tokio::sync::Semaphore;
use tonic::transport::Channel;

use crate::launcher::{LaunchError, LaunchedPicker, PickerLauncher, PickerSpec};
use crate::model_server::{self, ModelServerConfig, RunningModelServer};
use crate::proxy::{Proxy, Routing};
use crate::report::{PolicyReport, PrefillHandoffs};
use crate::sidecar::RunningSidecar;
use crate::workload::{self, PlannedRequest, WorkloadConfig};

/// How to run the demo.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Simulated model servers.
    pub servers: usize,
    /// Requests in the workload.
    pub requests: usize,
    /// Requests in flight at most.
    pub concurrency: usize,
    /// Seed of the workload.
    pub seed: u64,
    /// Also run the round-robin baseline.
    pub policy_compare: bool,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// The picker's config; `None` uses [`demo_config`].
    pub config: Option<EndpointPickerConfig>,
    /// The simulated model servers.
    pub model_server: ModelServerConfig,
    /// How hard the workload presses on the pool: the arrival rate per server unless
    /// `rate_per_second` is given.
    pub load: Load,
    /// Mean arrival rate; `None` scales with the servers ([`Load::rate_per_server`]).
    pub rate_per_second: Option<f64>,
    /// Distinct shared system prompts; `None` takes the load's ([`Load::system_prompts`]).
    pub system_prompts: Option<usize>,
    /// Compare prefill/decode disaggregation with aggregated serving instead of the picker
    /// with round-robin.
    pub disaggregation: Option<Disaggregation>,
    /// Picker replicas: above 1, the workload also runs through that many independent pickers,
    /// the proxy asking each in turn.
    pub replicas: usize,
    /// With `replicas` above 1: also run the replicas sharing their state (the launcher is
    /// asked for it through [`PickerSpec::shared_state`]).
    pub synced_replicas: bool,
}

/// The offered load of a demo run.
///
/// Routing only shows where servers are busy: at a light load every request finds an idle
/// slot whatever the policy, and a prefix-cache hit saves a few milliseconds of a short
/// prefill. Near saturation, every prefill a cache miss adds queues the requests behind it,
/// so keeping the shared system prompts and conversations on the servers that hold them
/// decides the latency.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Load {
    /// Near the simulated pool's saturation (the default).
    #[default]
    NearSaturation,
    /// A light load (`--light`), where any policy serves requests about as fast.
    Light,
}

impl Load {
    /// Mean arrivals per second per server.
    pub fn rate_per_server(self) -> f64 {
        match self {
            Self::NearSaturation => NEAR_SATURATION_RATE_PER_SERVER,
            Self::Light => LIGHT_RATE_PER_SERVER,
        }
    }

    /// Requests of the workload.
    pub fn requests(self) -> usize {
        match self {
            Self::NearSaturation => NEAR_SATURATION_REQUESTS,
            Self::Light => LIGHT_REQUESTS,
        }
    }

    /// Distinct shared system prompts of the workload.
    pub fn system_prompts(self) -> usize {
        match self {
            Self::NearSaturation => NEAR_SATURATION_SYSTEM_PROMPTS,
            Self::Light => LIGHT_SYSTEM_PROMPTS,
        }
    }

    /// How the demo's output names the load.
    pub fn label(self) -> &'static str {
        match self {
            Self::NearSaturation => "near saturation",
            Self::Light => "light",
        }
    }
}

/// Arrivals per second per server near saturation: about what a default simulated server (4
/// slots, ~0.2 ms per missed 64-character prompt block, 0.5 ms per output token) completes on
/// this workload under round-robin, whose runs then end a few tenths of a second behind the
/// arrivals.
pub const NEAR_SATURATION_RATE_PER_SERVER: f64 = 100.0;
/// Shared system prompts near saturation: 24 prompts of 2-4 KiB are ~1,150 cache blocks, more
/// than one server's 512 but a fraction of the pool's, so affinity decides the hit rate.
pub const NEAR_SATURATION_SYSTEM_PROMPTS: usize = 24;
/// Requests near saturation: enough for the queues to build (~4 s a policy with 4 servers).
pub const NEAR_SATURATION_REQUESTS: usize = 1500;
/// Arrivals per second per server of the light load.
pub const LIGHT_RATE_PER_SERVER: f64 = 75.0;
/// Shared system prompts of the light load.
pub const LIGHT_SYSTEM_PROMPTS: usize = 8;
/// Requests of the light load.
pub const LIGHT_REQUESTS: usize = 600;

/// The pool of a prefill/decode disaggregation demo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Disaggregation {
    /// Servers that only prefill (the first ones); the others decode, each behind a sidecar.
    pub prefill_servers: usize,
    /// The prefix-based decider's `nonCachedTokens`: a request is disaggregated only when its
    /// decode endpoint would have at least this many prompt tokens to compute. 0 disaggregates
    /// every request (`always-disagg-pd-decider`).
    pub non_cached_tokens: u64,
}

impl Disaggregation {
    /// A quarter of `servers` (at least one) prefill, the rest decode; disaggregate requests
    /// with at least 64 uncached prompt tokens (4 blocks of the simulated cache).
    pub fn for_servers(servers: usize) -> Self {
        Self { prefill_servers: (servers / 4).max(1), non_cached_tokens: 64 }
    }
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self::for_load(Load::default())
    }
}

impl DemoOptions {
    /// The defaults at `load`: its rate per server, requests and system prompts.
    pub fn for_load(load: Load) -> Self {
        Self {
            servers: 4,
            requests: load.requests(),
            concurrency: 32,
            seed: 42,
            policy_compare: true,
            progress: true,
            config: None,
            model_server: ModelServerConfig::default(),
            load,
            rate_per_second: None,
            system_prompts: None,
            disaggregation: None,
            replicas: 1,
            synced_replicas: false,
        }
    }

    /// The mean arrival rate: `rate_per_second`, or the load's rate per server times the
    /// servers.
    pub fn rate(&self) -> f64 {
        self.rate_per_second.unwrap_or(self.servers as f64 * self.load.rate_per_server())
    }

    /// The workload these options generate.
    pub fn workload(&self) -> WorkloadConfig {
        WorkloadConfig {
            requests: self.requests,
            seed: self.seed,
            rate_per_second: self.rate(),
            base_model: self.model_server.base_model.clone(),
            system_prompts: self.system_prompts.unwrap_or(self.load.system_prompts()),
            ..WorkloadConfig::default()
        }
    }

    /// The load in one line, as the demo prints it: the rate, the pool, the shared prefixes and
    /// whether that is near saturation (a `--rate` of one's own is named as such).
    pub fn load_line(&self) -> String {
        let workload = self.workload();
        let regime = match self.rate_per_second {
            Some(_) => "a rate of your own",
            None => self.load.label(),
        };
        format!(
            "load: {} requests/s over {} servers ({} per server), {} shared system prompts, at most {} in flight: {}",
            workload.rate_per_second,
            self.servers,
            workload.rate_per_second / self.servers.max(1) as f64,
            workload.system_prompts,
            self.concurrency,
            regime
        )
    }
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A listener could not bind.
    #[error("cannot start a simulated model server: {0}")]
    Bind(#[from] std::io::Error),
    /// The launcher could not start the picker.
    #[error(transparent)]
    Picker(LaunchError),
    /// The proxy could not reach the picker.
    #[error("cannot connect to the picker: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The options make no run possible.
    #[error("{0}")]
    Options(&'static str),
    /// A picker config built from the options is invalid.
    #[error("invalid picker config: {0}")]
    Config(String),
}

/// The picker config of the demo: GIE's default profile plus LoRA affinity and llm-d's
/// in-flight count, with the prefix index sized like the simulated servers' caches so it
/// forgets blocks when they do.
///
/// Why `active-request-scorer`: scraped queues lag by up to the 50 ms refresh, and without it
/// prefix affinity herds a popular system prompt's burst onto one server before the queue
/// shows; the picker's own in-flight count spreads the burst at once (in this demo it roughly
/// halves the p90 time to first token against GIE's default profile).
pub fn demo_config(model_server: &ModelServerConfig) -> EndpointPickerConfig {
    let prefix = serde_json::json!({
        "blockSize": model_server::BLOCK_CHARS,
        "lruCapacityPerServer": model_server.kv_blocks.max(1),
    });
    EndpointPickerConfig::gie_default()
        .with_plugin_parameters("prefix-cache-scorer", prefix)
        .with_profile_plugin("lora-affinity-scorer", 1.0)
        .with_profile_plugin("active-request-scorer", 2.0)
}

/// [`demo_config`] split into llm-d's two disaggregation profiles: `prefill` (prefill-role
/// endpoints) and `decode` (decode-capable ones), each with the same scorers and weights, run by
/// `disagg-profile-handler` with `prefix-based-pd-decider` (`always-disagg-pd-decider` when
/// `non_cached_tokens` is 0, which the prefix-based decider reads as "never").
pub fn pd_config(model_server: &ModelServerConfig, non_cached_tokens: u64) -> EndpointPickerConfig {
    let mut config = demo_config(model_server);
    let mut decode = config.scheduling_profiles.remove(0);
    decode.name = "decode".into();
    let mut prefill = decode.clone();
    prefill.name = "prefill".into();
    for (profile, filter) in [(&mut prefill, "prefill-filter"), (&mut decode, "decode-filter")] {
        profile.plugins.insert(0, PluginRef { plugin_ref: filter.into(), weight: None });
        config.plugins.push(PluginConfig::of_type(filter));
    }
    config.scheduling_profiles = vec![prefill, decode];
    let decider = if non_cached_tokens == 0 {
        PluginConfig::of_type("always-disagg-pd-decider")
    } else {
        PluginConfig {
            name: None,
            type_name: "prefix-based-pd-decider".into(),
            parameters: Some(serde_json::json!({"nonCachedTokens": non_cached_tokens})),
        }
    };
    config.plugins.push(PluginConfig {
        name: None,
        type_name: "disagg-profile-handler".into(),
        parameters: Some(serde_json::json!({"deciders": {"prefill": decider.type_name}})),
    });
    config.plugins.push(decider);
    config
}

/// Runs the workload with a picker from `launcher`, then (if asked) with round-robin; one
/// report each. With [`DemoOptions::disaggregation`]: disaggregated, then (if asked)
/// aggregated.
pub async fn run<L: PickerLauncher>(
    options: &DemoOptions,
    launcher: &L,
) -> Result<Vec<PolicyReport>, DemoError> {
    if options.servers == 0 || options.requests == 0 || options.concurrency == 0 {
        return Err(DemoError::Options("--servers, --requests and --concurrency must be >= 1"));
    }
    let workload = workload::generate(&options.workload());
    let (first, baseline) = match options.disaggregation {
        None => (Policy::Epp, Policy::RoundRobin),
        Some(pd) => {
            if pd.prefill_servers == 0 || pd.prefill_servers >= options.servers {
                return Err(DemoError::Options(
                    "--prefill-servers must be at least 1 and fewer than --servers",
                ));
            }
            (Policy::Disaggregated(pd), Policy::Aggregated)
        }
    };
    if options.replicas == 0 {
        return Err(DemoError::Options("--replicas must be >= 1"));
    }
    if options.replicas > 1 && options.disaggregation.is_some() {
        return Err(DemoError::Options("--replicas does not combine with --pd"));
    }
    if options.synced_replicas && options.replicas < 2 {
        return Err(DemoError::Options("synced replicas need --replicas 2 or more"));
    }
    let mut reports = vec![run_policy(first, options, launcher, &workload).await?];
    if options.replicas > 1 {
        let count = options.replicas;
        let independent = Policy::Replicas { count, synced: false };
        reports.push(run_policy(independent, options, launcher, &workload).await?);
        if options.synced_replicas {
            let synced = Policy::Replicas { count, synced: true };
            reports.push(run_policy(synced, options, launcher, &workload).await?);
        }
    }
    if options.policy_compare {
        reports.push(run_policy(baseline, options, launcher, &workload).await?);
    }
    Ok(reports)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    Epp,
    /// `count` pickers with the same config, the proxy asking each in turn; `synced`: sharing
    /// their state.
    Replicas {
        count: usize,
        synced: bool,
    },
    RoundRobin,
    /// The picker with [`pd_config`] over prefill servers and sidecar-fronted decode servers.
    Disaggregated(Disaggregation),
    /// The picker with [`demo_config`], servers whose prefills stall their decodes.
    Aggregated,
}

impl Policy {
    fn name(self) -> String {
        match self {
            Self::Epp => "epp".into(),
            Self::Replicas { count, synced: false } => format!("epp x{count} independent"),
            Self::Replicas { count, synced: true } => format!("epp x{count} synced"),
            Self::RoundRobin => "round-robin".into(),
            Self::Disaggregated(_) => "epp-pd".into(),
            Self::Aggregated => "epp-aggregated".into(),
        }
    }

    /// Pickers the policy runs, and whether they share their state.
    fn replicas(self) -> (usize, bool) {
        match self {
            Self::Replicas { count, synced } => (count, synced),
            Self::RoundRobin => (0, false),
            Self::Epp | Self::Disaggregated(_) | Self::Aggregated => (1, false),
        }
    }

    fn config(
        self,
        options: &DemoOptions,
        model_server: &ModelServerConfig,
    ) -> EndpointPickerConfig {
        match self {
            Self::Disaggregated(pd) => pd_config(model_server, pd.non_cached_tokens),
            Self::Epp | Self::Replicas { .. } | Self::RoundRobin | Self::Aggregated => {
                options.config.clone().unwrap_or_else(|| demo_config(model_server))
            }
        }
    }
}

async fn run_policy<L: PickerLauncher>(
    policy: Policy,
    options: &DemoOptions,
    launcher: &L,
    workload: &[PlannedRequest],
) -> Result<PolicyReport, DemoError> {
    let mut model_server = options.model_server.clone();
    if options.disaggregation.is_some() {
        model_server.prefill_stalls_decode = true;
    }
    let mut servers = Vec::with_capacity(options.servers);
    for _ in 0..options.servers {
        servers.push(RunningModelServer::start(model_server.clone()).await?);
    }
    let mut endpoints: Vec<SocketAddr> = servers.iter().map(|server| server.address).collect();
    let mut roles = Vec::new();
    let mut sidecars = Vec::new();
    if let Policy::Disaggregated(pd) = policy {
        for (index, endpoint) in endpoints.iter_mut().enumerate() {
            if index < pd.prefill_servers {
                roles.push(EndpointRole::Prefill);
            } else {
                let sidecar = RunningSidecar::start(*endpoint).await?;
                *endpoint = sidecar.address;
                sidecars.push(sidecar);
                roles.push(EndpointRole::Decode);
            }
        }
    }
    let mut pickers = Vec::new();
    let routing = match policy.replicas() {
        (0, _) => Routing::RoundRobin(AtomicUsize::new(0)),
        (count, synced) => {
            let config = policy.config(options, &model_server);
            // Unique per run, so a rerun against the same shared store starts clean.
            let group = synced.then(|| {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |elapsed| elapsed.as_nanos());
                format!("epp-demo-{}-{nanos}", std::process::id())
            });
            let mut clients = Vec::with_capacity(count);
            for replica in 0..count {
                let spec = PickerSpec {
                    config: &config,
                    objectives_yaml: OBJECTIVE_PRIORITIES,
                    endpoints: &endpoints,
                    roles: &roles,
                    replica,
                    shared_state: group.as_deref(),
                };
                match launch(launcher, spec).await {
                    Ok((launched, client)) => {
                        pickers.push(launched);
                        clients.push(client);
                    }
                    Err(error) => {
                        for picker in pickers {
                            picker.shutdown().await;
                        }
                        return Err(error);
                    }
                }
            }
            if count == 1 {
                Routing::Picker(clients.remove(0))
            } else {
                Routing::Replicas(clients, AtomicUsize::new(0))
            }
        }
    };
    let proxy = Arc::new(Proxy::new(routing, endpoints.clone()));
    let bar = progress_bar(options.progress, workload.len() as u64, &policy.name());

    let started = Instant::now();
    let limit = Arc::new(Semaphore::new(options.concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for request in workload {
        tokio::time::sleep_until((started + request.at).into()).await;
        // Arrivals beyond the concurrency bound wait here, as clients with a connection limit.
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else { break };
        let proxy = Arc::clone(&proxy);
        let request = request.clone();
        let bar = bar.clone();
        tasks.spawn(async move {
            let outcome = proxy.serve(&request).await;
            drop(permit);
            bar.inc(1);
            outcome
        });
    }
    let mut outcomes = Vec::with_capacity(workload.len());
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(outcome) => outcomes.push(outcome),
            Err(error) => tracing::warn!(%error, "a demo request task failed"),
        }
    }
    let wall = started.elapsed();
    bar.finish_and_clear();
    outcomes.sort_by_key(|outcome| outcome.index);

    let (hits, queries) = servers.iter().fold((0, 0), |(hits, queries), server| {
        let stats = server.server.stats();
        (hits + stats.prefix_hits, queries + stats.prefix_queries)
    });
    let handoffs = matches!(policy, Policy::Disaggregated(_)).then(|| {
        let count = |read: fn(&RunningSidecar) -> u64| sidecars.iter().map(read).sum::<u64>();
        PrefillHandoffs {
            remote: count(|s| s.stats.remote_prefills.load(std::sync::atomic::Ordering::Relaxed)),
            fallbacks: count(|s| s.stats.fallbacks.load(std::sync::atomic::Ordering::Relaxed)),
            pulled_blocks: servers.iter().map(|server| server.server.stats().pulled_blocks).sum(),
        }
    });
    for picker in pickers {
        picker.shutdown().await;
    }
    for sidecar in &sidecars {
        sidecar.stop();
    }
    for server in &servers {
        server.stop();
    }
    let mut report = PolicyReport::new(&policy.name(), &endpoints, &outcomes, hits, queries, wall);
    report.prefill_handoffs = handoffs;
    report.replicas = policy.replicas().0;
    Ok(report)
}

/// Starts a picker and connects to it; a picker that cannot be reached is shut down again.
async fn launch<L: PickerLauncher>(
    launcher: &L,
    spec: PickerSpec<'_>,
) -> Result<(LaunchedPicker, ExternalProcessorClient<Channel>), DemoError> {
    let launched = launcher.launch(spec).await.map_err(DemoError::Picker)?;
    match ExternalProcessorClient::connect(format!("http://{}", launched.grpc_address)).await {
        Ok(client) => Ok((launched, client)),
        Err(error) => {
            launched.shutdown().await;
            Err(error.into())
        }
    }
}

/// Priorities of the workload's objectives (an `--objectives-file`): `sheddable` is shed when
/// the pool saturates.
pub const OBJECTIVE_PRIORITIES: &str = "- {name: critical, priority: 100}\n- {name: standard, priority: 0}\n- {name: sheddable, priority: -1}\n";

fn progress_bar(show: bool, length: u64, policy: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(length);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix:>12} [{bar:40}] {pos}/{len} requests {elapsed}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(policy.to_owned());
    bar
}
