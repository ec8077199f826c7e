//! The discrete-event loop: arrivals, server steps and metric scrapes on simulated time.
//!
//! Time is an integer count of nanoseconds; events are kept in a binary heap ordered by time,
//! then by the order they were scheduled, so a run is a pure function of its inputs and seed.
//! Nothing reads the clock during a run: the [`Instant`]s handed to the scheduler are one base
//! instant, taken when the run starts, plus simulated time, and plugins only use their
//! differences. The only wait is [`Scheduler::flush`] after each decision, for the work the
//! scheduler hands to background writers (the prefix index's records), so that the next
//! decision sees it as the simulated time says it should.
//!
//! The gateway sees the servers only through scrapes: every `scrape_interval_s` each server's
//! waiting and running counts, KV usage and adapters are copied into a fresh [`PoolSnapshot`],
//! which is what the EPP scheduler and the saturation detector read until the next scrape.
//! Network and proxy delays are not modelled, except the KV transfer of disaggregated serving.
//!
//! Prefill/decode disaggregation (llm-d's P/D, `docs/disaggregation.md` there): servers carry
//! the `llm-d.ai/role` label the EPP's role filters read ([`ServerRoles`]). When a decision
//! names a prefill endpoint besides the decode endpoint (the primary), the request runs in three
//! stages, as the decode sidecar drives them:
//! 1. prefill: the prefill server runs the prompt with one output token (the sidecar's
//!    `max_tokens: 1` request), its own prefix cache applying; that token is not the client's;
//! 2. KV transfer: the prompt's KV blocks the decode server does not already cache move over
//!    the [`KvLink`] in `latency + tokens × kv_bytes_per_token / bandwidth`;
//! 3. decode: the decode server admits the request with the prompt's KV present (it needs the
//!    blocks, and computes only the last prompt token) and produces every output token.
//!
//! TTFT runs from arrival to the first output token of the decode server. A decision without a
//! prefill endpoint runs whole on its one server. Policies other than the EPP ignore roles but
//! only pick servers that may decode.
//!
//! Bounds: the heap holds one pending arrival (requests are generated lazily), one scrape, at
//! most one step end per server and one transfer end per request whose KV is in transit; memory
//! grows with the requests in flight plus one latency sample per completed request (for exact
//! percentiles).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use scheduler_core::flow::{self, UtilizationDetector, UtilizationThresholds};
use scheduler_core::{
    CompletionGuard, ConfigError, Endpoint, EndpointMetrics, EndpointRole, EndpointState,
    InferenceRequest, Outcome, PoolSnapshot, ScheduleOptions,
};
use serde::Serialize;

use crate::hashing::{BLOCK_CHARS, BLOCK_TOKENS};
use crate::kv_events::{KvEventFeed, KvEventLink};
use crate::policy::Policy;
use crate::profile::ServerProfile;
use crate::replicas::{EppReplicas, ReplicaSet};
use crate::report::{Percentiles, RunReport, ServerReport, StageReport};
use crate::server::{ModelServer, Sequence, StepOutput};
use crate::workload::{WorkloadRequest, WorkloadSpec};

/// When the simulated gateway sheds: the thresholds of GIE's utilization detector (the pool is
/// saturated when every endpoint with fresh metrics has a queue of at least `queue_threshold`
/// or KV usage of at least `kv_threshold`, or no endpoint has fresh metrics). Sheddable
/// requests arriving then are shed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ShedThresholds {
    /// Waiting requests at which an endpoint counts as saturated.
    pub queue_threshold: u32,
    /// KV usage at which an endpoint counts as saturated.
    pub kv_threshold: f64,
    /// Metrics older than this are ignored, seconds.
    pub staleness_s: f64,
}

impl Default for ShedThresholds {
    fn default() -> Self {
        Self { queue_threshold: 5, kv_threshold: 0.8, staleness_s: 0.2 }
    }
}

impl ShedThresholds {
    fn is_saturated(&self, pool: &PoolSnapshot, now: Instant) -> bool {
        // The core's detector, so the simulated gateway sheds exactly as the flow controller.
        let detector = UtilizationDetector::new(UtilizationThresholds {
            queue_depth: self.queue_threshold,
            kv_cache_util: self.kv_threshold,
            metrics_staleness: Some(
                Duration::try_from_secs_f64(self.staleness_s.max(0.0)).unwrap_or(Duration::MAX),
            ),
        });
        flow::SaturationDetector::is_saturated(&detector, pool, now)
    }
}

/// The `llm-d.ai/role` labels of the pool's servers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum ServerRoles {
    /// No label: every server counts as decode-capable and serves requests whole.
    #[default]
    Unlabeled,
    /// Every server labelled `prefill-decode` (llm-d's `both`): it may run either stage.
    Both,
    /// The first `prefill_servers` servers labelled `prefill`, the rest `decode`.
    Disaggregated {
        /// Servers labelled `prefill`.
        prefill_servers: usize,
    },
}

impl ServerRoles {
    /// The role of server `index`.
    pub fn role_of(self, index: usize) -> EndpointRole {
        match self {
            Self::Unlabeled => EndpointRole::Unlabeled,
            Self::Both => EndpointRole::PrefillDecode,
            Self::Disaggregated { prefill_servers } if index < prefill_servers => {
                EndpointRole::Prefill
            }
            Self::Disaggregated { .. } => EndpointRole::Decode,
        }
    }

    /// Servers labelled `prefill` only.
    pub fn prefill_servers(self) -> usize {
        match self {
            Self::Disaggregated { prefill_servers } => prefill_servers,
            Self::Unlabeled | Self::Both => 0,
        }
    }
}

/// The link a prefill server sends a prompt's KV cache over to a decode server (NIXL over
/// RDMA in llm-d).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct KvLink {
    /// Bandwidth, gigabytes (10⁹ bytes) per second; infinity makes the transfer free of
    /// bandwidth cost.
    pub gbps: f64,
    /// Fixed cost of each transfer (the sidecar's round trip and the transfer setup), seconds.
    pub latency_s: f64,
}

impl Default for KvLink {
    /// 50 GB/s (a 400 Gb/s RDMA NIC) and 1 ms.
    fn default() -> Self {
        Self { gbps: 50.0, latency_s: 0.001 }
    }
}

impl KvLink {
    /// Seconds to move the KV of `tokens` tokens at `bytes_per_token` bytes each.
    pub fn transfer_s(&self, tokens: u32, bytes_per_token: u64) -> f64 {
        let bytes = f64::from(tokens) * bytes_per_token as f64;
        self.latency_s + bytes / (self.gbps * 1e9)
    }

    fn is_valid(&self) -> bool {
        self.gbps > 0.0 && self.latency_s >= 0.0 && self.latency_s.is_finite()
    }
}

/// The pool and the gateway around it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SimConfig {
    /// Model servers in the pool.
    pub servers: usize,
    /// Their (identical) profile.
    pub profile: ServerProfile,
    /// Time between metric scrapes, seconds (GIE's default refresh is 50 ms).
    pub scrape_interval_s: f64,
    /// Seed of the workload and of every random decision.
    pub seed: u64,
    /// Sheds sheddable requests when saturated, whatever the policy; `None` never sheds.
    pub saturation: Option<ShedThresholds>,
    /// The servers' roles in disaggregated serving.
    pub roles: ServerRoles,
    /// The KV-transfer link between prefill and decode servers.
    pub kv_link: KvLink,
    /// The EPP replicas the gateway spreads requests over (EPP policies only).
    pub replicas: EppReplicas,
    /// How the servers' KV-cache events reach a precise prefix producer (EPP policies whose
    /// config has one).
    pub kv_events: KvEventLink,
}

impl SimConfig {
    /// `servers` unlabelled servers of `profile`, 50 ms scrapes, seed 1, GIE's saturation
    /// detector, the default [`KvLink`].
    pub fn new(servers: usize, profile: ServerProfile) -> Self {
        Self {
            servers,
            profile,
            scrape_interval_s: 0.05,
            seed: 1,
            saturation: Some(ShedThresholds::default()),
            roles: ServerRoles::Unlabeled,
            kv_link: KvLink::default(),
            replicas: EppReplicas::default(),
            kv_events: KvEventLink::default(),
        }
    }

    /// `prefill` prefill servers and `decode` decode servers of `profile`, otherwise as
    /// [`Self::new`].
    pub fn disaggregated(prefill: usize, decode: usize, profile: ServerProfile) -> Self {
        Self {
            roles: ServerRoles::Disaggregated { prefill_servers: prefill },
            ..Self::new(prefill + decode, profile)
        }
    }
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The pool has no servers.
    #[error("the pool needs at least one server")]
    NoServers,
    /// The scrape interval is not a positive number of seconds.
    #[error("the scrape interval must be positive, got {0} s")]
    ScrapeInterval(f64),
    /// A disaggregated pool needs at least one prefill and one decode server.
    #[error(
        "a disaggregated pool needs at least one prefill and one decode server, got {prefill} prefill of {servers} servers"
    )]
    Roles {
        /// Prefill servers asked for.
        prefill: usize,
        /// Servers in the pool.
        servers: usize,
    },
    /// The KV link's bandwidth is not positive or its latency not a finite non-negative time.
    #[error(
        "the KV link needs a positive bandwidth and a non-negative latency, got {gbps} GB/s and {latency_s} s"
    )]
    KvLink {
        /// Bandwidth, GB/s.
        gbps: f64,
        /// Latency, seconds.
        latency_s: f64,
    },
    /// The server profile could never run a request.
    #[error("server profile '{0}' needs a positive token budget, sequence limit and KV-cache size")]
    Profile(String),
    /// No replicas, or a sync delay or interval that is not a time.
    #[error(
        "EPP replicas need a count of at least 1, a non-negative record delay and a positive sync interval, got {0:?}"
    )]
    Replicas(EppReplicas),
    /// The KV-event link's delay is not a time or its loss not a probability.
    #[error(
        "KV events need a non-negative delay and a loss probability in [0, 1], got {delay_s} s and {loss}"
    )]
    KvEvents {
        /// Delay, seconds.
        delay_s: f64,
        /// Loss probability.
        loss: f64,
    },
    /// An EPP policy's configuration could not be built.
    #[error("policy '{policy}': {source}")]
    Config {
        /// The policy.
        policy: String,
        /// What is wrong.
        source: Box<ConfigError>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    Scrape,
    Arrival,
    StepEnd(u32),
    /// The KV of a request's prompt has reached its decode server.
    TransferEnd(u32),
    /// Prefix records of synced replicas reach the other replicas.
    SyncRecords,
    /// Synced replicas exchange their in-flight counts.
    SyncInFlight,
    /// The servers' KV-cache events reach the precise prefix index.
    KvEvents,
}

#[derive(Debug)]
struct Scheduled {
    at_ns: u64,
    order: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at_ns, self.order) == (other.at_ns, other.order)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reversed: BinaryHeap is a max-heap and the earliest event must come first.
        (other.at_ns, other.order).cmp(&(self.at_ns, self.order))
    }
}

fn nanos(seconds: f64) -> u64 {
    (seconds * 1e9).round().max(1.0) as u64
}

/// `seconds` in nanoseconds, where zero stays zero (an immediate delivery).
pub(crate) fn nanos_or_zero(seconds: f64) -> u64 {
    (seconds * 1e9).round().max(0.0) as u64
}

/// A request between arrival and completion.
#[derive(Debug)]
struct InFlight {
    arrival_ns: u64,
    /// The request's ladder stage, and whether it is warm-up.
    stage: u32,
    warmup: bool,
    first_token_ns: u64,
    prompt_tokens: u32,
    output_tokens: u32,
    /// The server that produces the output tokens.
    server: u32,
    guard: Option<CompletionGuard>,
    /// While the prefill stage runs on another server or the KV is in transit: the sequence
    /// the decode server will run.
    decode_stage: Option<Sequence>,
}

/// Where a decision sends a request.
struct Routed {
    decode: usize,
    prefill: Option<usize>,
    guard: Option<CompletionGuard>,
}

/// Requests each server took, by stage.
#[derive(Clone, Copy, Debug, Default)]
struct Placements {
    whole: u64,
    prefill: u64,
    decode: u64,
}

enum Router {
    RoundRobin { next: usize },
    Random { rng: SmallRng },
    LeastRequest { rng: SmallRng, in_flight: Vec<u32> },
    Oracle,
    Epp { replicas: Box<ReplicaSet>, seed: u64, decisions: u64 },
}

impl Router {
    fn new(
        policy: &Policy,
        seed: u64,
        servers: usize,
        replicas: &EppReplicas,
    ) -> Result<Self, SimError> {
        Ok(match policy {
            Policy::RoundRobin => Self::RoundRobin { next: 0 },
            Policy::Random => Self::Random { rng: SmallRng::seed_from_u64(seed ^ 0x5eed) },
            Policy::LeastRequest => Self::LeastRequest {
                rng: SmallRng::seed_from_u64(seed ^ 0x1ea5),
                in_flight: vec![0; servers],
            },
            Policy::Oracle => Self::Oracle,
            Policy::Epp { name, config } => {
                let replicas = ReplicaSet::build(config, replicas, seed).map_err(|source| {
                    SimError::Config { policy: name.clone(), source: Box::new(source) }
                })?;
                Self::Epp { replicas: Box::new(replicas), seed, decisions: 0 }
            }
        })
    }
}

/// Runs `workload` through `policy` and reports what happened.
pub fn run(
    config: &SimConfig,
    workload: &WorkloadSpec,
    policy: &Policy,
) -> Result<RunReport, SimError> {
    if config.servers == 0 {
        return Err(SimError::NoServers);
    }
    if !(config.scrape_interval_s > 0.0 && config.scrape_interval_s.is_finite()) {
        return Err(SimError::ScrapeInterval(config.scrape_interval_s));
    }
    let profile = &config.profile;
    if profile.max_batched_tokens == 0 || profile.max_running == 0 || profile.kv_blocks == 0 {
        return Err(SimError::Profile(profile.name.clone()));
    }
    let prefill = config.roles.prefill_servers();
    if matches!(config.roles, ServerRoles::Disaggregated { .. })
        && (prefill == 0 || prefill >= config.servers)
    {
        return Err(SimError::Roles { prefill, servers: config.servers });
    }
    if !config.kv_link.is_valid() {
        return Err(SimError::KvLink {
            gbps: config.kv_link.gbps,
            latency_s: config.kv_link.latency_s,
        });
    }
    if config.replicas.count == 0 || config.replicas.sync.is_some_and(|sync| !sync.is_valid()) {
        return Err(SimError::Replicas(config.replicas));
    }
    if !config.kv_events.is_valid() {
        return Err(SimError::KvEvents {
            delay_s: config.kv_events.delay_s,
            loss: config.kv_events.loss,
        });
    }
    let router = Router::new(policy, config.seed, config.servers, &config.replicas)?;
    let mut simulation = Simulation::new(config, workload, router);
    simulation.run(workload);
    Ok(simulation.report(config, workload, policy))
}

/// Runs every policy on the same workload and seed.
pub fn compare(
    config: &SimConfig,
    workload: &WorkloadSpec,
    policies: &[Policy],
) -> Result<Vec<RunReport>, SimError> {
    policies.iter().map(|policy| run(config, workload, policy)).collect()
}

struct Simulation<'a> {
    config: &'a SimConfig,
    servers: Vec<ModelServer>,
    /// The servers that may decode: what the policies other than the EPP choose from.
    decode_capable: Vec<usize>,
    placements: Vec<Placements>,
    endpoints: Vec<Endpoint>,
    adapter_names: Vec<Arc<str>>,
    snapshot: Arc<PoolSnapshot>,
    router: Router,
    /// The servers' KV events on their way to the precise prefix index, when the policy has one.
    kv_feed: Option<KvEventFeed>,
    events: BinaryHeap<Scheduled>,
    next_order: u64,
    base: Instant,
    now_ns: u64,
    in_flight: Vec<Option<InFlight>>,
    vacant: Vec<u32>,
    step_output: StepOutput,
    // Outcomes.
    arrivals: u64,
    completed: u64,
    rejected: u64,
    timed_out: u64,
    shed_by_priority: BTreeMap<i32, u64>,
    /// Arrivals waiting for the client's concurrency limit, in order.
    client_backlog: VecDeque<WorkloadRequest>,
    max_concurrency: Option<usize>,
    timeout_ns: Option<u64>,
    output_tokens: u64,
    disaggregated: u64,
    kv_transferred_tokens: u64,
    kv_transfer_s: Vec<f64>,
    first_arrival_ns: Option<u64>,
    last_completion_ns: u64,
    ttft_s: Vec<f64>,
    tpot_s: Vec<f64>,
    e2e_s: Vec<f64>,
    ntpot_s: Vec<f64>,
    /// Per ladder stage (one without a ladder).
    stages: Vec<StageAccumulator>,
}

/// What one ladder stage's requests did.
#[derive(Default)]
struct StageAccumulator {
    arrivals: u64,
    completed: u64,
    timed_out: u64,
    output_tokens: u64,
    first_arrival_ns: Option<u64>,
    last_completion_ns: u64,
    ttft_s: Vec<f64>,
    tpot_s: Vec<f64>,
    ntpot_s: Vec<f64>,
}

impl<'a> Simulation<'a> {
    fn new(config: &'a SimConfig, workload: &WorkloadSpec, router: Router) -> Self {
        let endpoints: Vec<Endpoint> = (0..config.servers)
            .map(|index| {
                let ip = Ipv4Addr::new(10, 0, (index / 250) as u8, (index % 250 + 1) as u8);
                Endpoint::new(SocketAddr::new(ip.into(), 8000))
                    .with_name(format!("{}-{index}", config.profile.name))
                    .with_role(config.roles.role_of(index))
            })
            .collect();
        let snapshot =
            Arc::new(PoolSnapshot::new(endpoints.iter().cloned().map(EndpointState::new)));
        let expected = usize::try_from(workload.requests).unwrap_or(0).min(1 << 24);
        let mut servers: Vec<ModelServer> =
            (0..config.servers).map(|_| ModelServer::new(config.profile.clone())).collect();
        let producers = match &router {
            Router::Epp { replicas, .. } => replicas.precise_producers().to_vec(),
            _ => Vec::new(),
        };
        let kv_feed = (!producers.is_empty()).then(|| {
            for server in &mut servers {
                server.record_kv_changes();
            }
            KvEventFeed::new(
                producers,
                endpoints.iter().map(|endpoint| endpoint.id).collect(),
                config.kv_events,
                workload.model.clone(),
                workload.adapter_names(),
                config.seed,
            )
        });
        Self {
            config,
            servers,
            kv_feed,
            decode_capable: (0..config.servers)
                .filter(|&index| config.roles.role_of(index).serves_decode())
                .collect(),
            placements: vec![Placements::default(); config.servers],
            endpoints,
            adapter_names: workload.adapter_names(),
            snapshot,
            router,
            events: BinaryHeap::new(),
            next_order: 0,
            base: Instant::now(),
            now_ns: 0,
            in_flight: Vec::new(),
            vacant: Vec::new(),
            step_output: StepOutput::default(),
            arrivals: 0,
            completed: 0,
            rejected: 0,
            timed_out: 0,
            client_backlog: VecDeque::new(),
            max_concurrency: workload.max_concurrency.map(|limit| limit.max(1) as usize),
            timeout_ns: workload
                .timeout_s
                .filter(|seconds| *seconds > 0.0 && seconds.is_finite())
                .map(nanos),
            shed_by_priority: BTreeMap::new(),
            output_tokens: 0,
            disaggregated: 0,
            kv_transferred_tokens: 0,
            kv_transfer_s: Vec::new(),
            first_arrival_ns: None,
            last_completion_ns: 0,
            ttft_s: Vec::with_capacity(expected),
            tpot_s: Vec::with_capacity(expected),
            e2e_s: Vec::with_capacity(expected),
            ntpot_s: Vec::with_capacity(expected),
            stages: (0..workload.stage_count()).map(|_| StageAccumulator::default()).collect(),
        }
    }

    fn schedule(&mut self, at_ns: u64, event: Event) {
        self.events.push(Scheduled { at_ns, order: self.next_order, event });
        self.next_order += 1;
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_nanos(self.now_ns)
    }

    fn run(&mut self, workload: &WorkloadSpec) {
        let mut requests = workload.generate(self.config.seed);
        let mut next_request = requests.next();
        self.schedule(0, Event::Scrape);
        if let Some(request) = &next_request {
            self.schedule(nanos(request.arrival_s), Event::Arrival);
        }
        let scrape_ns = nanos(self.config.scrape_interval_s);
        let sync_ns = self.replica_sync().map(|sync| nanos(sync.interval_s));
        if let Some(sync_ns) = sync_ns {
            self.schedule(sync_ns, Event::SyncInFlight);
        }
        while let Some(Scheduled { at_ns, event, .. }) = self.events.pop() {
            self.now_ns = at_ns;
            match event {
                Event::Scrape => {
                    self.scrape();
                    if self.has_work(next_request.is_some()) {
                        self.schedule(at_ns + scrape_ns, Event::Scrape);
                    }
                }
                Event::SyncRecords => {
                    if let Router::Epp { replicas, .. } = &mut self.router {
                        replicas.deliver(at_ns);
                    }
                }
                Event::SyncInFlight => {
                    if let Router::Epp { replicas, .. } = &mut self.router {
                        replicas.exchange_in_flight();
                    }
                    if let Some(sync_ns) = sync_ns
                        && self.has_work(next_request.is_some())
                    {
                        self.schedule(at_ns + sync_ns, Event::SyncInFlight);
                    }
                }
                Event::Arrival => {
                    if let Some(request) = next_request.take() {
                        if self.at_concurrency_limit() {
                            self.client_backlog.push_back(request);
                        } else {
                            self.arrive(request);
                        }
                    }
                    next_request = requests.next();
                    if let Some(request) = &next_request {
                        self.schedule(nanos(request.arrival_s).max(at_ns), Event::Arrival);
                    }
                }
                Event::StepEnd(server) => {
                    let mut output = std::mem::take(&mut self.step_output);
                    output.clear();
                    self.servers[server as usize].end_step(&mut output);
                    for &request in &output.first_tokens {
                        // A prefill stage's token is the sidecar's, not the client's.
                        if let Some(Some(flight)) = self.in_flight.get_mut(request as usize)
                            && flight.decode_stage.is_none()
                        {
                            flight.first_token_ns = at_ns;
                        }
                    }
                    for &request in &output.finished {
                        self.finish(request);
                    }
                    self.step_output = output;
                    self.publish_kv_events(server as usize);
                    self.start_step(server as usize);
                }
                Event::TransferEnd(request) => self.transferred(request),
                Event::KvEvents => {
                    if let Some(feed) = &mut self.kv_feed {
                        feed.deliver(at_ns);
                    }
                }
            }
            while !self.client_backlog.is_empty() && !self.at_concurrency_limit() {
                if let Some(request) = self.client_backlog.pop_front() {
                    self.arrive(request);
                }
            }
        }
    }

    /// Sends the KV events of `server`'s step that just ended towards the precise index.
    fn publish_kv_events(&mut self, server: usize) {
        let Some(feed) = &mut self.kv_feed else { return };
        let source = &mut self.servers[server];
        let Some(due_ns) = feed.publish(server, self.now_ns, |out| source.drain_kv_changes(out))
        else {
            return;
        };
        if due_ns <= self.now_ns {
            feed.deliver(self.now_ns);
        } else {
            self.schedule(due_ns, Event::KvEvents);
        }
    }

    /// Whether requests are in flight or still to come.
    fn has_work(&self, more_requests: bool) -> bool {
        more_requests || self.in_flight.len() > self.vacant.len()
    }

    /// The replicas' sync settings, when several EPP replicas share state.
    fn replica_sync(&self) -> Option<crate::replicas::ReplicaSync> {
        match &self.router {
            Router::Epp { replicas, .. } => replicas.sync(),
            _ => None,
        }
    }

    /// Whether the client holds as many requests in flight as its limit allows.
    fn at_concurrency_limit(&self) -> bool {
        self.max_concurrency.is_some_and(|limit| self.in_flight.len() - self.vacant.len() >= limit)
    }

    fn start_step(&mut self, server: usize) {
        if self.servers[server].in_step() {
            return;
        }
        if let Some(duration) = self.servers[server].begin_step() {
            self.schedule(self.now_ns + nanos(duration), Event::StepEnd(server as u32));
        }
    }

    fn scrape(&mut self) {
        let updated_at = Some(self.instant());
        let max_lora_adapters = self.config.profile.max_loras;
        let mut pool = PoolSnapshot::default();
        for (server, endpoint) in self.servers.iter().zip(&self.endpoints) {
            let names = |ids: &mut dyn Iterator<Item = u16>| -> Vec<Arc<str>> {
                ids.filter_map(|id| self.adapter_names.get(id as usize).cloned()).collect()
            };
            let metrics = EndpointMetrics {
                waiting_queue: server.waiting_len() as u32,
                running: server.running_len() as u32,
                kv_usage: server.kv_usage(),
                active_lora_adapters: names(&mut server.running_adapters()),
                waiting_lora_adapters: names(&mut server.waiting_adapters()),
                max_lora_adapters,
                kv_capacity_blocks: Some(u64::from(self.config.profile.kv_blocks)),
                updated_at,
            };
            pool.upsert(EndpointState { endpoint: endpoint.clone(), metrics });
        }
        self.snapshot = Arc::new(pool);
    }

    fn arrive(&mut self, mut request: WorkloadRequest) {
        self.arrivals += 1;
        self.first_arrival_ns.get_or_insert(self.now_ns);
        if let Some(stage) = self.stages.get_mut(request.stage as usize) {
            stage.arrivals += 1;
            stage.first_arrival_ns.get_or_insert(self.now_ns);
        }
        if request.priority < 0
            && let Some(detector) = &self.config.saturation
            && detector.is_saturated(&self.snapshot, self.instant())
        {
            *self.shed_by_priority.entry(request.priority).or_default() += 1;
            return;
        }
        let Some(Routed { decode: server, prefill, guard }) = self.route(&mut request) else {
            self.rejected += 1;
            return;
        };
        let slot = match self.vacant.pop() {
            Some(slot) => slot,
            None => {
                self.in_flight.push(None);
                (self.in_flight.len() - 1) as u32
            }
        };
        let prefill = prefill.filter(|&prefill| prefill != server);
        let fits =
            |server: &ModelServer, output: u32| server.accepts(request.prompt_tokens, output);
        let accepted = fits(&self.servers[server], request.output_tokens)
            && prefill.is_none_or(|prefill| fits(&self.servers[prefill], 1));
        if !accepted {
            self.refuse(slot, server, guard);
            return;
        }
        let sequence = Sequence::new(
            slot,
            request.prompt_tokens,
            request.output_tokens,
            request.block_hashes,
            request.adapter,
        );
        let mut flight = InFlight {
            arrival_ns: self.now_ns,
            stage: request.stage,
            warmup: request.warmup,
            first_token_ns: 0,
            prompt_tokens: request.prompt_tokens,
            output_tokens: request.output_tokens.max(1),
            server: server as u32,
            guard,
            decode_stage: None,
        };
        let (runs_now, enqueued) = match prefill {
            None => {
                self.placements[server].whole += 1;
                (server, self.servers[server].enqueue(sequence))
            }
            Some(prefill) => {
                // The sidecar's prefill request: the prompt, one output token.
                let prompt_blocks = (request.prompt_tokens / BLOCK_TOKENS) as usize;
                let hashes = sequence.block_hashes
                    [..prompt_blocks.min(sequence.block_hashes.len())]
                    .to_vec();
                let stage = Sequence::new(slot, request.prompt_tokens, 1, hashes, request.adapter);
                flight.decode_stage = Some(sequence);
                self.disaggregated += 1;
                self.placements[prefill].prefill += 1;
                (prefill, self.servers[prefill].enqueue(stage))
            }
        };
        debug_assert!(enqueued.is_ok(), "the servers' limits were checked above");
        self.in_flight[slot as usize] = Some(flight);
        self.start_step(runs_now);
    }

    /// Refuses a routed request (a real server answers 400 to a request it can never fit).
    fn refuse(&mut self, slot: u32, server: usize, guard: Option<CompletionGuard>) {
        self.rejected += 1;
        self.vacant.push(slot);
        if let Some(guard) = guard {
            guard.finish(Outcome::Failed);
        }
        if let Router::LeastRequest { in_flight, .. } = &mut self.router {
            in_flight[server] -= 1;
        }
    }

    /// The prefill stage of `request` ended: its KV starts moving to the decode server.
    fn start_transfer(&mut self, request: u32) {
        let Some(Some(flight)) = self.in_flight.get(request as usize) else { return };
        let Some(stage) = &flight.decode_stage else { return };
        let decode = &self.servers[flight.server as usize];
        // The decode server pulls only the blocks its prefix cache lacks (vLLM's KV connector
        // asks for the tokens after the local hit).
        let matchable = ((flight.prompt_tokens.max(1) - 1) / BLOCK_TOKENS) as usize;
        let hashes = &stage.block_hashes[..matchable.min(stage.block_hashes.len())];
        let cached = decode.cached_prefix_blocks(hashes) * BLOCK_TOKENS;
        let tokens = flight.prompt_tokens.saturating_sub(cached);
        let seconds =
            self.config.kv_link.transfer_s(tokens, self.config.profile.kv_bytes_per_token);
        self.kv_transferred_tokens += u64::from(tokens);
        self.kv_transfer_s.push(seconds);
        let at_ns = self.now_ns + nanos(seconds);
        self.schedule(at_ns, Event::TransferEnd(request));
    }

    /// The KV of `request` reached its decode server, which now queues it.
    fn transferred(&mut self, request: u32) {
        let Some(Some(flight)) = self.in_flight.get_mut(request as usize) else { return };
        let Some(stage) = flight.decode_stage.take() else { return };
        let server = flight.server as usize;
        self.placements[server].decode += 1;
        let enqueued = self.servers[server].enqueue(stage.with_transferred_kv());
        debug_assert!(enqueued.is_ok(), "the decode server's limits were checked at arrival");
        self.start_step(server);
    }

    /// The servers for `request` (decode, and prefill when the decision disaggregates it) and,
    /// for the EPP, the guard that runs its completion hooks.
    fn route(&mut self, request: &mut WorkloadRequest) -> Option<Routed> {
        let candidates = &self.decode_capable;
        let count = candidates.len();
        let whole = |decode: usize| Some(Routed { decode, prefill: None, guard: None });
        match &mut self.router {
            Router::RoundRobin { next } => {
                let at = *next % count;
                *next = (at + 1) % count;
                whole(candidates[at])
            }
            Router::Random { rng } => whole(candidates[rng.random_range(0..count)]),
            Router::LeastRequest { rng, in_flight } => {
                let first = candidates[rng.random_range(0..count)];
                let second = candidates[rng.random_range(0..count)];
                let server = if in_flight[second] < in_flight[first] { second } else { first };
                in_flight[server] += 1;
                whole(server)
            }
            Router::Oracle => whole(oracle_pick(&self.servers, candidates, request)),
            Router::Epp { replicas, seed, decisions } => {
                *decisions += 1;
                let replica = replicas.choose();
                let scheduler = replicas.scheduler(replica);
                let options = ScheduleOptions {
                    now: Some(self.base + Duration::from_nanos(self.now_ns)),
                    seed: Some(scheduler_core::hash::mix64(*seed ^ *decisions)),
                    explain: false,
                };
                let prompt = match &self.kv_feed {
                    // A precise index matches token ids: the prompt's full blocks as tokens.
                    Some(_) => {
                        let blocks =
                            (request.prompt.len() / BLOCK_CHARS).min(request.block_hashes.len());
                        crate::kv_events::token_prompt(&request.block_hashes[..blocks])
                    }
                    None => std::mem::take(&mut request.prompt),
                };
                let inference =
                    InferenceRequest::new(&*request.model, prompt).with_priority(request.priority);
                let result = scheduler.schedule_with(&inference, &self.snapshot, options);
                // Work the scheduler defers to background writers (the prefix index's
                // records) takes effect before the next event, so a run stays a function of
                // its inputs and seed.
                scheduler.flush();
                let mut result = result.ok()?;
                if let Some(due_ns) = replicas.dispatch(replica, self.now_ns) {
                    if due_ns <= self.now_ns {
                        replicas.deliver(self.now_ns);
                    } else {
                        self.events.push(Scheduled {
                            at_ns: due_ns,
                            order: self.next_order,
                            event: Event::SyncRecords,
                        });
                        self.next_order += 1;
                    }
                }
                let decode = self.snapshot.index_of(result.primary().id())? as usize;
                let prefill = result
                    .prefill()
                    .and_then(|prefill| self.snapshot.index_of(prefill.id()))
                    .map(|index| index as usize);
                Some(Routed { decode, prefill, guard: result.take_completion() })
            }
        }
    }

    fn finish(&mut self, request: u32) {
        let Some(slot) = self.in_flight.get_mut(request as usize) else { return };
        if slot.as_ref().is_some_and(|flight| flight.decode_stage.is_some()) {
            self.start_transfer(request);
            return;
        }
        let Some(flight) = slot.take() else { return };
        self.vacant.push(request);
        if let Router::LeastRequest { in_flight, .. } = &mut self.router {
            in_flight[flight.server as usize] -= 1;
        }
        let late = self.timeout_ns.is_some_and(|timeout| self.now_ns - flight.arrival_ns > timeout);
        if late {
            self.timed_out += 1;
            if let Some(stage) = self.stages.get_mut(flight.stage as usize) {
                stage.timed_out += 1;
            }
            if let Some(guard) = flight.guard {
                guard.finish(Outcome::Completed);
            }
            return;
        }
        self.completed += 1;
        self.output_tokens += u64::from(flight.output_tokens);
        self.last_completion_ns = self.now_ns;
        let ttft = (flight.first_token_ns - flight.arrival_ns) as f64 * 1e-9;
        let e2e = (self.now_ns - flight.arrival_ns) as f64 * 1e-9;
        let ntpot = e2e / f64::from(flight.output_tokens);
        self.ttft_s.push(ttft);
        self.e2e_s.push(e2e);
        self.ntpot_s.push(ntpot);
        let tpot = (flight.output_tokens > 1).then(|| {
            let decode = (self.now_ns - flight.first_token_ns) as f64 * 1e-9;
            decode / f64::from(flight.output_tokens - 1)
        });
        if let Some(tpot) = tpot {
            self.tpot_s.push(tpot);
        }
        if let Some(stage) = self.stages.get_mut(flight.stage as usize) {
            stage.completed += 1;
            stage.output_tokens += u64::from(flight.output_tokens);
            stage.last_completion_ns = self.now_ns;
            if !flight.warmup {
                stage.ttft_s.push(ttft);
                stage.ntpot_s.push(ntpot);
                stage.tpot_s.extend(tpot);
            }
        }
        if let Some(mut guard) = flight.guard {
            guard.set_usage(u64::from(flight.prompt_tokens), u64::from(flight.output_tokens));
            guard.finish(Outcome::Completed);
        }
    }

    fn report(
        &mut self,
        config: &SimConfig,
        workload: &WorkloadSpec,
        policy: &Policy,
    ) -> RunReport {
        let duration_s = self
            .first_arrival_ns
            .map_or(0.0, |first| self.last_completion_ns.saturating_sub(first) as f64 * 1e-9);
        let per_second =
            |count: u64| if duration_s > 0.0 { count as f64 / duration_s } else { 0.0 };
        let (mut prompt_tokens, mut cached_tokens, mut preemptions, mut adapter_loads) =
            (0, 0, 0, 0);
        let mut servers = Vec::with_capacity(self.servers.len());
        for ((server, endpoint), placed) in
            self.servers.iter().zip(&self.endpoints).zip(&self.placements)
        {
            let stats = server.stats();
            // Hit rate over the prompts each server would otherwise compute: a decode stage's
            // transferred prompt is neither a hit nor a miss.
            prompt_tokens += stats.prompt_tokens - stats.transferred_prompt_tokens;
            cached_tokens += stats.cached_prompt_tokens;
            preemptions += stats.preemptions;
            adapter_loads += stats.adapter_loads;
            servers.push(ServerReport {
                name: endpoint.name.to_string(),
                role: endpoint.role().label_value().unwrap_or_default().to_owned(),
                whole_requests: placed.whole,
                prefill_stages: placed.prefill,
                decode_stages: placed.decode,
                busy_s: stats.busy_s,
            });
        }
        RunReport {
            policy: match policy {
                Policy::Epp { .. } => format!("{}{}", policy.name(), config.replicas.label()),
                _ => policy.name().to_owned(),
            },
            workload: workload.name.clone(),
            qps: workload.qps,
            servers: config.servers,
            arrivals: self.arrivals,
            completed: self.completed,
            shed_by_priority: std::mem::take(&mut self.shed_by_priority),
            rejected: self.rejected,
            timed_out: self.timed_out,
            duration_s,
            throughput_rps: per_second(self.completed),
            output_tokens_per_s: per_second(self.output_tokens),
            ttft_s: Percentiles::of(&mut self.ttft_s),
            tpot_s: Percentiles::of(&mut self.tpot_s),
            e2e_s: Percentiles::of(&mut self.e2e_s),
            prefix_hit_rate: if prompt_tokens > 0 {
                cached_tokens as f64 / prompt_tokens as f64
            } else {
                0.0
            },
            preemptions,
            adapter_loads,
            prefill_servers: config.roles.prefill_servers(),
            disaggregated: self.disaggregated,
            kv_transferred_tokens: self.kv_transferred_tokens,
            kv_transfer_s: Percentiles::of(&mut self.kv_transfer_s),
            per_server: servers,
            ntpot_s: Percentiles::of(&mut self.ntpot_s),
            epp_replicas: match policy {
                Policy::Epp { .. } => config.replicas.count,
                _ => 1,
            },
            replicas_synced: matches!(policy, Policy::Epp { .. })
                && config.replicas.count > 1
                && config.replicas.sync.is_some(),
            stages: if workload.ladder.is_empty() {
                Vec::new()
            } else {
                self.stage_reports(workload)
            },
        }
    }

    fn stage_reports(&mut self, workload: &WorkloadSpec) -> Vec<StageReport> {
        let mut reports = Vec::with_capacity(self.stages.len());
        for (index, stage) in self.stages.iter_mut().enumerate() {
            let duration_s = stage
                .first_arrival_ns
                .map_or(0.0, |first| stage.last_completion_ns.saturating_sub(first) as f64 * 1e-9);
            let per_second =
                |count: u64| if duration_s > 0.0 { count as f64 / duration_s } else { 0.0 };
            reports.push(StageReport {
                qps: workload.stage_qps(index),
                arrivals: stage.arrivals,
                completed: stage.completed,
                timed_out: stage.timed_out,
                success_rate: if stage.arrivals > 0 {
                    stage.completed as f64 / stage.arrivals as f64
                } else {
                    0.0
                },
                duration_s,
                throughput_rps: per_second(stage.completed),
                output_tokens_per_s: per_second(stage.output_tokens),
                ttft_s: Percentiles::of(&mut stage.ttft_s),
                tpot_s: Percentiles::of(&mut stage.tpot_s),
                ntpot_s: Percentiles::of(&mut stage.ntpot_s),
            });
        }
        reports
    }
}

/// The server with the lowest estimated time to first token for `request`, from the servers'
/// true state (see [`crate::policy`]). Ties go to the server with fewer running requests, then
/// to the lower index.
fn oracle_pick(servers: &[ModelServer], candidates: &[usize], request: &WorkloadRequest) -> usize {
    let mut best = (f64::INFINITY, usize::MAX, 0);
    for &index in candidates {
        let server = &servers[index];
        let estimate = estimated_ttft(server, request);
        let key = (estimate, server.running_len(), index);
        if key.0 < best.0 || (key.0 == best.0 && key.1 < best.1) {
            best = key;
        }
    }
    best.2
}

fn estimated_ttft(server: &ModelServer, request: &WorkloadRequest) -> f64 {
    let profile = server.profile();
    let matchable = ((request.prompt_tokens.max(1) - 1) / BLOCK_TOKENS) as usize;
    let hashes = &request.block_hashes[..matchable.min(request.block_hashes.len())];
    let cached_tokens = server.cached_prefix_blocks(hashes) * BLOCK_TOKENS;
    let own_tokens = u64::from(request.prompt_tokens.saturating_sub(cached_tokens).max(1));
    let prefill_tokens = server.pending_prefill_tokens() + own_tokens;
    let steps = prefill_tokens.div_ceil(u64::from(profile.max_batched_tokens.max(1)));
    let decode_seqs = server.running_len().min(profile.max_running as usize) as u32;
    let step_time = profile.step_time(0, decode_seqs, 0);
    let mut estimate = steps as f64 * step_time + prefill_tokens as f64 * profile.prefill_token_s;
    // The uncached prompt also delays every request queued behind it on that server: counting
    // it once more keeps a greedy choice from trading the pool's cache locality for one
    // request's queue position, which collapses throughput under load.
    estimate += own_tokens as f64 * profile.prefill_token_s;

    // Beyond the sequence limit a request waits for running ones to finish: about one decode
    // step's worth per request ahead of it over the limit.
    let queued = server.running_len() + server.waiting_len() + 1;
    if let Some(excess) = queued.checked_sub(profile.max_running as usize) {
        estimate += excess as f64 * step_time;
    }
    // Not enough free KV for the uncached prompt: something will be preempted or wait.
    let needed_blocks = (own_tokens + u64::from(request.output_tokens)).div_ceil(16);
    if needed_blocks > u64::from(server.allocatable_blocks()) {
        estimate += own_tokens as f64 * profile.prefill_token_s * 2.0 + step_time;
    }
    if let Some(adapter) = request.adapter.filter(|_| profile.max_loras > 0)
        && !server.is_adapter_resident(adapter)
    {
        estimate += profile.lora_load_s;
        if !server.has_adapter_slot_for(adapter) {
            estimate += 1.0;
        }
    }
    estimate
}
