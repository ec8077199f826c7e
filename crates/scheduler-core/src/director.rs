//! From request bytes to a routing decision: parse the body, resolve the request's priority,
//! admit it (or shed it), schedule it, and say where it goes. Transport-free and
//! runtime-agnostic, so every adapter (ext-proc, tower, C ABI) drives the same logic.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use arc_swap::ArcSwapOption;

use crate::admitter::{AdmissionDenied, Admitter};
use crate::config::registry::PluginRegistry;
use crate::config::{ConfigError, ConstructedPlugins, EndpointPickerConfig};
use crate::flow::{self, Admission, FlowConfigError, ObjectiveResolver, ReleaseOnComplete};
use crate::pool::SharedPool;
use crate::request::InferenceRequest;
use crate::request::body::{ApiKind, BodyError};
use crate::request::parser::ParserTable;
use crate::request_header::RequestHeaderProcessor;
use crate::rewrite::{ModelRewrites, ModelRoute};
use crate::scheduling::result::{CompletionGuard, SchedulingError, SchedulingResult};
use crate::scheduling::scheduler::{Scheduler, collect_subset};

/// What the director needs to know beyond the scheduler and the pool.
#[derive(Clone, Debug)]
pub struct DirectorOptions {
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Which parser reads a body, by the request's path. [`Director::from_config`] takes
    /// them from the config's `requestHandler.parsers` when it lists any.
    pub parsers: ParserTable,
}

impl Default for DirectorOptions {
    fn default() -> Self {
        Self { max_body_bytes: 32 * 1024 * 1024, parsers: ParserTable::default() }
    }
}

/// Why a request is answered by the picker itself instead of being routed.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// The body is not a usable OpenAI request.
    #[error(transparent)]
    BadRequest(#[from] BodyError),
    /// The body exceeds the limit.
    #[error("request body exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// No endpoint can take the request.
    #[error(transparent)]
    NoEndpoint(#[from] SchedulingError),
    /// Flow control did not admit the request (shed, queue full, expired, cancelled).
    #[error(transparent)]
    NotAdmitted(#[from] flow::NotAdmitted),
    /// No parser in force claims the request's path, and none takes unclaimed paths.
    #[error("no request parser claims the path '{path}'")]
    NoParser {
        /// The path (cut to [`MAX_REPORTED_MODEL_BYTES`]).
        path: String,
    },
    /// The model rewrites are strict and no rule names the model.
    #[error("model '{model}' is not served by this pool")]
    UnknownModel {
        /// The model the body named (cut to [`MAX_REPORTED_MODEL_BYTES`]).
        model: String,
    },
    /// An admission plugin (such as `probabilistic-admitter`) refused the request.
    #[error(transparent)]
    AdmissionDenied(#[from] AdmissionDenied),
}

/// Longest model name repeated back in an error (the name comes from the client).
pub const MAX_REPORTED_MODEL_BYTES: usize = 256;

impl Rejection {
    /// The HTTP status the proxy answers with.
    pub fn status(&self) -> u16 {
        match self {
            Self::BadRequest(_) | Self::NoParser { .. } => 400,
            Self::TooLarge { .. } => 413,
            Self::NoEndpoint(_) => 503,
            Self::NotAdmitted(rejection) => rejection.http_status(),
            Self::UnknownModel { .. } => 404,
            // The Go EPP reports an admission plugin's denial as an internal error.
            Self::AdmissionDenied(_) => 500,
        }
    }

    /// Why the request was dropped, in llm-d-router's vocabulary (the value of
    /// [`REQUEST_DROPPED_REASON_HEADER`](crate::protocol::REQUEST_DROPPED_REASON_HEADER) on
    /// the answer); `None` for a request the client got wrong (400, 404, 413), which was not
    /// dropped but refused.
    pub fn dropped_reason(&self) -> Option<&'static str> {
        match self {
            Self::BadRequest(_)
            | Self::NoParser { .. }
            | Self::TooLarge { .. }
            | Self::UnknownModel { .. } => None,
            // The Go EPP sets no dropped-reason header on an admission plugin's denial.
            Self::AdmissionDenied(_) => None,
            Self::NoEndpoint(_) => Some("rejected-no-endpoints"),
            Self::NotAdmitted(flow::NotAdmitted::Shed { .. })
            | Self::NotAdmitted(flow::NotAdmitted::QueueFull { .. }) => Some("rejected-saturated"),
            Self::NotAdmitted(flow::NotAdmitted::Expired { .. }) => Some("rejected-ttl-expired"),
            Self::NotAdmitted(flow::NotAdmitted::NoEndpoints { .. }) => {
                Some("rejected-no-endpoints")
            }
            Self::NotAdmitted(flow::NotAdmitted::Cancelled { .. }) => {
                Some("rejected-context-cancelled")
            }
        }
    }

    /// A stable machine-readable code for the JSON error body and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::NoParser { .. } => "no_parser",
            Self::TooLarge { .. } => "body_too_large",
            Self::NoEndpoint(SchedulingError::AllStale { .. }) => "stale_metrics",
            Self::NoEndpoint(_) => "no_ready_endpoint",
            Self::NotAdmitted(flow::NotAdmitted::Shed { .. }) => "request_shed",
            Self::NotAdmitted(flow::NotAdmitted::QueueFull { .. }) => "queue_full",
            Self::NotAdmitted(flow::NotAdmitted::Expired { .. }) => "queue_timeout",
            Self::NotAdmitted(flow::NotAdmitted::NoEndpoints { .. }) => "no_endpoint_timeout",
            Self::NotAdmitted(flow::NotAdmitted::Cancelled { .. }) => "request_cancelled",
            Self::UnknownModel { .. } => "model_not_found",
            Self::AdmissionDenied(_) => "admission_denied",
        }
    }
}

/// A request routed to an endpoint.
///
/// The addresses are typed; how many fallbacks reach the proxy, and in which wire format, is
/// each adapter's choice (the ext-proc header defaults to the primary alone, which every
/// proxy parses).
#[derive(Debug)]
pub struct Routed {
    /// The endpoint to send the request to.
    pub primary: SocketAddr,
    /// Where to retry if the primary fails, best first: the primary profile's other picks
    /// (as many as its picker's `maxNumOfEndpoints` allows, usually none).
    pub fallbacks: Vec<SocketAddr>,
    /// The weighted total score of the primary, then of each fallback, as the primary
    /// profile scored them; empty when they were not scored (every candidate stale, or a
    /// request without a body).
    pub scores: Vec<f64>,
    /// The request as parsed.
    pub request: InferenceRequest,
    /// Runs the completion hooks when the response ends (or when dropped).
    pub completion: Option<CompletionGuard>,
    /// Headers the plugins write on the response (the session-affinity token, for one), to
    /// be set when the model server's response headers pass.
    pub response_headers: Vec<(String, String)>,
    /// Headers to set on the request on its way to the destination: the prefill endpoint and
    /// encoders of a disaggregated request, the chosen rank under data-parallel serving
    /// (names from [`ROUTING_REQUEST_HEADERS`](crate::protocol::ROUTING_REQUEST_HEADERS);
    /// the adapter removes a client's value of the others).
    pub request_headers: Vec<(&'static str, String)>,
}

/// The destination, fallbacks and routing headers of a decision (see [`Routed`]).
fn routing_of(
    result: &SchedulingResult,
) -> (SocketAddr, Vec<SocketAddr>, Vec<(&'static str, String)>) {
    use crate::protocol::{
        DATA_PARALLEL_ENDPOINT_HEADER, ENCODER_ENDPOINTS_HEADER, PREFILL_ENDPOINT_HEADER,
    };
    let mut primary = result.primary().endpoint.address;
    let mut fallbacks: Vec<SocketAddr> =
        result.fallbacks().map(|fallback| fallback.endpoint.address).collect();
    let mut headers = Vec::new();
    if let Some(prefill) = result.prefill() {
        headers.push((PREFILL_ENDPOINT_HEADER, prefill.endpoint.address.to_string()));
    }
    let mut encoders = result.encoders().map(|encoder| encoder.endpoint.address.to_string());
    if let Some(first) = encoders.next() {
        let list = encoders.fold(first, |list, encoder| list + "," + &encoder);
        headers.push((ENCODER_ENDPOINTS_HEADER, list));
    }
    if let Some(port) = result.data_parallel_port() {
        // The proxy goes to the pod; its sidecar forwards to the rank the header names.
        headers.push((DATA_PARALLEL_ENDPOINT_HEADER, primary.to_string()));
        primary.set_port(port);
        for fallback in &mut fallbacks {
            fallback.set_port(port);
        }
        fallbacks.retain(|fallback| *fallback != primary);
        fallbacks.dedup();
    }
    headers.extend(result.upstream_headers().iter().cloned());
    (primary, fallbacks, headers)
}

impl Director {
    /// Applies the model rewrites: sets the target model (and which rule chose it), or refuses
    /// a model strict rewrites do not know. A rule overrides a rewrite header the gateway set,
    /// as in the Go EPP.
    fn rewrite_model(&self, request: &mut InferenceRequest) -> Result<(), Rejection> {
        let rewrites = self.rewrites.load();
        let Some(rewrites) = rewrites.as_ref() else { return Ok(()) };
        if request.api == ApiKind::Unparsed {
            // The body was not read, so there is no model to rewrite (or to refuse).
            return Ok(());
        }
        match rewrites.route_request(request) {
            ModelRoute::Unchanged => Ok(()),
            ModelRoute::Rewritten(applied) => {
                request.target_model.clear();
                request.target_model.push_str(&applied.target);
                request.model_rewrite = Some(applied.rule_name);
                Ok(())
            }
            ModelRoute::Unknown => {
                Err(Rejection::UnknownModel { model: cut_for_report(&request.model) })
            }
        }
    }
}

/// `text` cut to at most [`MAX_REPORTED_MODEL_BYTES`] on a character boundary: what a client
/// sent is repeated back only that far.
fn cut_for_report(text: &str) -> String {
    let mut end = text.len().min(MAX_REPORTED_MODEL_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// The request's path as llm-d-router reads it: `:path`, else `x-original-path`, else
/// `x-forwarded-path` (proxies that rewrite the path keep the client's there).
fn request_path(headers: &[(String, String)]) -> Option<&str> {
    [":path", "x-original-path", "x-forwarded-path"].iter().find_map(|wanted| {
        headers
            .iter()
            .find(|(name, value)| name.eq_ignore_ascii_case(wanted) && !value.is_empty())
            .map(|(_, value)| value.as_str())
    })
}

/// Why a director could not be built from a config.
#[derive(Debug, thiserror::Error)]
pub enum DirectorBuildError {
    /// The plugins or profiles are invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The saturation detector or flow control section is invalid.
    #[error("invalid flow control config: {0}")]
    FlowControl(#[from] FlowConfigError),
}

/// Turns requests into routing decisions.
#[derive(Debug)]
pub struct Director {
    scheduler: Arc<Scheduler>,
    pool: Arc<SharedPool>,
    options: DirectorOptions,
    flow: Option<Arc<Admission>>,
    rewrites: ArcSwapOption<ModelRewrites>,
    /// Counter behind the random draws of [`Self::route_without_body`].
    bodiless_draws: AtomicU64,
    /// Admission plugins, consulted in order after flow control and before scheduling.
    admitters: Vec<Arc<dyn Admitter>>,
    /// Request-header processors, run in order on each request before flow control.
    header_processors: Vec<Arc<dyn RequestHeaderProcessor>>,
}

impl Director {
    /// A director scheduling with `scheduler` over `pool`, admitting every request.
    /// The scheduler's pool observers are subscribed to `pool`.
    pub fn new(scheduler: Arc<Scheduler>, pool: Arc<SharedPool>, options: DirectorOptions) -> Self {
        scheduler.observe_pool(&pool);
        Self {
            scheduler,
            pool,
            options,
            flow: None,
            rewrites: ArcSwapOption::empty(),
            bodiless_draws: AtomicU64::new(0),
            admitters: Vec::new(),
            header_processors: Vec::new(),
        }
    }

    /// Adds an admission plugin, consulted after those added before it.
    pub fn with_admitter(mut self, admitter: Arc<dyn Admitter>) -> Self {
        self.admitters.push(admitter);
        self
    }

    /// A director for a whole `EndpointPickerConfig`: its scheduler and its request parsers
    /// (replacing `options.parsers`), plus admission by its
    /// saturation detector (shedding sheddable requests, or queueing them when the
    /// `flowControl` gate is on) with priorities from `objectives`. The plugins are constructed
    /// once for both, so a detector that counts requests in its own hooks (the concurrency
    /// detector) is the instance the scheduler informs. With queues, a completion hook that
    /// releases queued requests is registered after the plugins' hooks. Every plugin playing
    /// the request-header processor role runs on each request before flow control, and every
    /// admitter is consulted after it, each in declaration order.
    pub fn from_config(
        config: &EndpointPickerConfig,
        registry: &PluginRegistry,
        pool: Arc<SharedPool>,
        options: DirectorOptions,
        objectives: ObjectiveResolver,
    ) -> Result<Self, DirectorBuildError> {
        let plugins = config.construct_plugins(registry)?;
        Self::from_constructed(config, &plugins, registry, pool, options, objectives)
    }

    /// [`Self::from_config`] with the plugins already constructed from `config` (by
    /// [`EndpointPickerConfig::construct_plugins`]), for a caller that also reads them (the
    /// server configures its data layer from them): each plugin is then one instance, with
    /// one index and one writer thread where it keeps them.
    pub fn from_constructed(
        config: &EndpointPickerConfig,
        plugins: &ConstructedPlugins,
        registry: &PluginRegistry,
        pool: Arc<SharedPool>,
        mut options: DirectorOptions,
        objectives: ObjectiveResolver,
    ) -> Result<Self, DirectorBuildError> {
        let mut scheduler = config.build_with(plugins, registry)?;
        options.parsers = config.parser_table(plugins)?;
        let flow = Admission::from_config(config, plugins, objectives)?;
        if let Some(controller) = flow.controller() {
            let clock: flow::Clock = Arc::new(Instant::now);
            scheduler = scheduler.with_response_complete(Arc::new(ReleaseOnComplete::new(
                controller.clone(),
                Arc::clone(&pool),
                clock,
            )));
        }
        let admitters =
            plugins.iter().filter_map(|declared| declared.plugin.admitter.clone()).collect();
        let header_processors =
            plugins.iter().filter_map(|declared| declared.plugin.request_header.clone()).collect();
        let director = Self::new(Arc::new(scheduler), pool, options);
        Ok(Self { flow: Some(Arc::new(flow)), admitters, header_processors, ..director })
    }

    /// Routes requests through `rewrites` from now on (`None`: no rewriting). Requests in
    /// flight keep the rewrites they started with.
    pub fn set_model_rewrites(&self, rewrites: Option<Arc<ModelRewrites>>) {
        self.rewrites.store(rewrites);
    }

    /// The model rewrites in force, if any.
    pub fn model_rewrites(&self) -> Option<Arc<ModelRewrites>> {
        self.rewrites.load_full()
    }

    /// Flow control, when admission is on.
    pub fn admission(&self) -> Option<&Arc<Admission>> {
        self.flow.as_ref()
    }

    /// The scheduler.
    pub fn scheduler(&self) -> &Arc<Scheduler> {
        &self.scheduler
    }

    /// The options.
    pub fn options(&self) -> &DirectorOptions {
        &self.options
    }

    /// The pool the director schedules over.
    pub fn pool(&self) -> &Arc<SharedPool> {
        &self.pool
    }

    /// Whether the director can take another request now: `Pending` while flow control's
    /// queues are full (the task is woken when a place frees). Advisory, and reserves nothing:
    /// see [`FlowController::poll_capacity`](crate::flow::FlowController::poll_capacity).
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.flow.as_ref().map_or(Poll::Ready(()), |flow| flow.poll_ready(cx))
    }

    /// Decides where the request goes. `body` is the whole request body (empty for a request
    /// without one); `subset` is the proxy's subset hint. [`Director::parse`] then
    /// [`Director::decide_parsed`], for adapters that need no say between the two.
    pub async fn decide(
        &self,
        headers: &[(String, String)],
        body: &[u8],
        subset: Option<Vec<SocketAddr>>,
    ) -> Result<Routed, Rejection> {
        let request = self.parse(headers, body)?;
        self.decide_parsed(request, body.len(), subset).await
    }

    /// Routes a request without a body (`GET /v1/models`, a probe sent through the pool's
    /// route): with no model and no prompt there is nothing to schedule on, so, as the Go EPP
    /// does, it goes to an endpoint drawn at random, without admission or completion hooks.
    /// The draw is among the endpoints with fresh metrics when any has them (all of them
    /// otherwise, unless the stale-metrics policy fails closed), within the proxy's subset.
    pub fn route_without_body(
        &self,
        headers: &[(String, String)],
        subset: Option<Vec<SocketAddr>>,
    ) -> Result<Routed, Rejection> {
        let pool = self.pool.load();
        let in_subset = |address: &SocketAddr| subset.as_ref().is_none_or(|s| s.contains(address));
        let candidates: Vec<&crate::EndpointState> =
            pool.endpoints().iter().filter(|state| in_subset(&state.endpoint.address)).collect();
        if candidates.is_empty() {
            return Err(Rejection::NoEndpoint(match &subset {
                Some(subset) if !pool.is_empty() => {
                    SchedulingError::EmptySubset { requested: subset.len() }
                }
                _ => SchedulingError::EmptyPool,
            }));
        }
        let now = Instant::now();
        let fresh: Vec<&crate::EndpointState> =
            candidates.iter().copied().filter(|state| pool.is_fresh(state, now)).collect();
        let drawn_from = match (fresh.is_empty(), pool.staleness()) {
            (false, _) => &fresh,
            (true, Some(policy)) if !policy.fails_open() => {
                return Err(Rejection::NoEndpoint(SchedulingError::AllStale {
                    candidates: candidates.len(),
                    threshold: policy.threshold,
                }));
            }
            (true, _) => &candidates,
        };
        let draw = crate::hash::split_mix(self.bodiless_draws.fetch_add(1, Ordering::Relaxed));
        let index = ((u128::from(draw) * drawn_from.len() as u128) >> 64) as usize;
        let request_id = headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(crate::protocol::REQUEST_ID_HEADER))
            .map(|(_, value)| value.clone())
            .unwrap_or_default();
        let request = InferenceRequest { request_id, ..InferenceRequest::default() };
        Ok(Routed {
            primary: drawn_from[index].endpoint.address,
            fallbacks: Vec::new(),
            scores: Vec::new(),
            request,
            completion: None,
            response_headers: Vec::new(),
            request_headers: Vec::new(),
        })
    }

    /// The request a body and its headers make: refused when the body exceeds the limit or is
    /// not a usable OpenAI request. CPU-bound and synchronous (linear in the body), so an
    /// adapter may bound how many run at once or run large ones off its async workers.
    pub fn parse(
        &self,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Result<InferenceRequest, Rejection> {
        if body.len() > self.options.max_body_bytes {
            return Err(Rejection::TooLarge { limit: self.options.max_body_bytes });
        }
        // Without a path (a library caller), the body's fields decide between the OpenAI APIs.
        let api = match request_path(headers) {
            Some(path) => match self.options.parsers.resolve(path) {
                Some((_, api)) => Some(api),
                None => return Err(Rejection::NoParser { path: cut_for_report(path) }),
            },
            None => None,
        };
        let header_refs = headers.iter().map(|(name, value)| (name.as_str(), value.as_str()));
        Ok(InferenceRequest::from_body(api, header_refs, body)?)
    }

    /// Admits (or sheds, or queues) a parsed request and schedules it. `body_bytes` is the
    /// size of its body, which flow control counts against its queue limits.
    pub async fn decide_parsed(
        &self,
        mut request: InferenceRequest,
        body_bytes: usize,
        subset: Option<Vec<SocketAddr>>,
    ) -> Result<Routed, Rejection> {
        request.endpoint_subset = subset;
        self.rewrite_model(&mut request)?;
        for processor in &self.header_processors {
            processor.process(&mut request);
        }

        if let Some(flow) = &self.flow {
            // Awaiting the ticket is where a queued request waits; if the caller gives up
            // (stream reset), the ticket is dropped and the queue forgets the request.
            let ticket =
                flow.submit(&mut request, body_bytes as u64, &self.pool.load(), Instant::now());
            ticket.await?;
        }

        let pool = self.pool.load();
        if !self.admitters.is_empty() {
            let candidates: Vec<&crate::EndpointState> = match request.endpoint_subset.as_deref() {
                Some(subset) => {
                    let mut positions = Vec::with_capacity(subset.len());
                    collect_subset(&pool, subset, &mut positions);
                    positions.iter().filter_map(|&position| pool.get(position)).collect()
                }
                None => pool.endpoints().iter().collect(),
            };
            for admitter in &self.admitters {
                admitter.admit(&request, &candidates)?;
            }
        }
        let mut result = self.scheduler.schedule(&request, &pool)?;
        let (primary, fallbacks, request_headers) = routing_of(&result);
        let scores = result.ranked_scores().to_vec();
        let response_headers = self.scheduler.response_headers(&result);
        let completion = result.take_completion();
        Ok(Routed {
            primary,
            fallbacks,
            scores,
            request,
            completion,
            response_headers,
            request_headers,
        })
    }
}
