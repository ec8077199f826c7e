//! The targets that need no `unsafe`: request bodies, configs, ext-proc exchanges and
//! Prometheus text.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, HttpTrailers, ProcessingRequest, ProcessingResponse, processing_request,
    processing_response,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use ext_proc_adapter::{Director, DirectorOptions, Exchange};
use scheduler_core::{
    ApiKind, Endpoint, EndpointMetrics, EndpointPickerConfig, EndpointState, InferenceRequest,
    PoolSnapshot, SharedPool, flow::ObjectiveResolver, protocol,
};
use scorers::ActiveRequestScorer;

use crate::input::{PATHS, Reader};

/// Target `request_body`: the first byte picks the `:path`, the rest is the body.
pub fn request_body(data: &[u8]) {
    // The same bytes as a vLLM gRPC message: read or refused, never a panic.
    let grpc = if data.first().is_some_and(|byte| byte & 1 == 1) {
        ApiKind::VllmGrpcEmbed
    } else {
        ApiKind::VllmGrpcGenerate
    };
    if let Ok(request) = InferenceRequest::from_body(Some(grpc), [], data) {
        assert!(request.model.is_empty(), "vLLM's gRPC messages name no model");
    }
    let mut input = Reader { data };
    let path = PATHS[usize::from(input.byte()) % PATHS.len()];
    if let Ok(request) = InferenceRequest::from_openai(path, [], input.data) {
        assert!(!request.target_model.is_empty(), "a parsed request always names its model");
        // What the parser read as the model, the scan finds; a rewrite changes only that.
        // (The scan reads objects; serde's array form of a struct is no client's format.)
        if input.data.trim_ascii_start().first() != Some(&b'{') {
            return;
        }
        let found = scheduler_core::model_field::find_model(input.data);
        let found = found.expect("a body that parsed scans").expect("and names a model");
        assert_eq!(found.value, request.model);
        let rewritten = scheduler_core::model_field::rewrite_model(input.data, "rewritten\"model")
            .expect("scans")
            .expect("has a model");
        let reparsed = InferenceRequest::from_openai(path, [], &rewritten).expect("still parses");
        assert_eq!(reparsed.model, "rewritten\"model");
        assert_eq!(reparsed.prompt, request.prompt, "only the model changed");
    }
}

fn small_pool() -> PoolSnapshot {
    PoolSnapshot::new((0..3u8).map(|i| {
        EndpointState::new(Endpoint::new(([10, 0, 0, i + 1], 8000).into())).with_metrics(
            EndpointMetrics {
                waiting_queue: u32::from(i) * 3,
                running: 1,
                kv_usage: f64::from(i) / 4.0,
                active_lora_adapters: vec!["sql-lora".into()],
                max_lora_adapters: 2,
                updated_at: Some(Instant::now()),
                ..EndpointMetrics::default()
            },
        )
    }))
}

/// Target `config`: the input is an EndpointPickerConfig YAML document; a config that loads
/// and builds must then schedule a request over a small pool.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // The same text as model rewrites and objectives: refused or loaded, never a panic, and a
    // rewrite only ever names a configured target.
    if let Ok(rewrites) = scheduler_core::rewrite::ModelRewrites::from_yaml(text) {
        let targets: HashSet<&str> = rewrites.model_names().collect();
        if let scheduler_core::rewrite::ModelRoute::Rewritten(applied) =
            rewrites.route("sql-lora", Some("session"))
        {
            assert!(targets.contains(&*applied.target), "a target the rules name");
        }
    }
    // And as an endpoints file (either shape): refused or parsed, every port a real one.
    if let Ok(entries) = ext_proc_adapter::endpoints_file::parse_bytes("fuzz.yaml".as_ref(), data) {
        assert!(entries.iter().all(|entry| entry.port > 0), "ports are 1-65535");
    }
    let metrics = Arc::new(scheduler_core::flow::FlowMetrics::new());
    let _ = scheduler_core::flow::ObjectiveResolver::from_yaml(text, Arc::clone(&metrics));
    let Ok(config) = EndpointPickerConfig::from_yaml(text) else { return };
    let mut registry = scorers::builtin_registry();
    registry.allow_experimental_plugins(true);
    whole_config(&config, &registry, metrics);
    let Ok(scheduler) = config.build(&registry) else { return };
    let pool = Arc::new(small_pool());
    let request = InferenceRequest::new("sql-lora", "Hello, world");
    if let Ok(result) = scheduler.schedule(&request, &pool) {
        let mut seen = HashSet::new();
        for endpoint in result.ranked() {
            assert!(pool.by_id(endpoint.id()).is_some(), "picks come from the pool");
            assert!(seen.insert(endpoint.id()), "picks are not repeated");
        }
    }
}

/// The sections beyond the profiles (data layer, request parsers, flow control): resolved
/// or refused, never a panic; a director built from them routes each path to a listed
/// parser, or refuses it by name.
fn whole_config(
    config: &EndpointPickerConfig,
    registry: &scheduler_core::PluginRegistry,
    metrics: Arc<scheduler_core::flow::FlowMetrics>,
) {
    let Ok(plugins) = config.construct_plugins(registry) else { return };
    let _ = config.data_layer(&plugins, registry);
    let Ok(parsers) = config.parser_table(&plugins) else { return };
    let listed: HashSet<_> = parsers.parsers().collect();
    let Ok(objectives) = scheduler_core::flow::ObjectiveResolver::new(Vec::new(), metrics) else {
        return;
    };
    let pool = Arc::new(scheduler_core::SharedPool::new(small_pool()));
    let Ok(director) =
        Director::from_config(config, registry, pool, DirectorOptions::default(), objectives)
    else {
        return;
    };
    let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"token_ids":[1]}"#;
    for path in ["/v1/chat/completions", "/v1/messages", "/inference/v1/generate", "/v1/models"] {
        if let Some((parser, _)) = parsers.resolve(path) {
            assert!(listed.contains(&parser), "{path}: a listed parser");
        }
        let headers = vec![(":path".to_owned(), path.to_owned())];
        match director.parse(&headers, body) {
            Err(scheduler_core::Rejection::NoParser { .. }) => {
                assert!(parsers.resolve(path).is_none(), "{path}: refused only when unclaimed");
            }
            _ => assert!(parsers.resolve(path).is_some(), "{path}: parsed only when claimed"),
        }
    }
}

/// Frame opcodes of the `ext_proc_exchange` input, in order: request headers, request body,
/// request trailers, response headers, response body, response trailers, an empty message.
const OPCODES: u8 = 7;

struct ExchangeHarness {
    runtime: tokio::runtime::Runtime,
}

fn harness() -> &'static ExchangeHarness {
    static HARNESS: OnceLock<ExchangeHarness> = OnceLock::new();
    HARNESS.get_or_init(|| ExchangeHarness {
        runtime: match tokio::runtime::Builder::new_current_thread().build() {
            Ok(runtime) => runtime,
            Err(error) => panic!("cannot build the fuzz runtime: {error}"),
        },
    })
}

fn header_map(lines: &[u8]) -> (HeaderMap, Vec<(String, String)>) {
    let mut map = HeaderMap::default();
    let mut metadata = Vec::new();
    for line in lines.split(|&b| b == b'\n') {
        let line = String::from_utf8_lossy(line);
        let (name, value) = line.split_once(':').map_or((line.as_ref(), ""), |(n, v)| (n, v));
        let (name, value) = (name.trim(), value.trim());
        // `:path` keeps its leading colon: split at the second one.
        let (name, value) = if name.is_empty() {
            match value.split_once(':') {
                Some((n, v)) => (format!(":{}", n.trim()), v.trim().to_owned()),
                None => (format!(":{value}"), String::new()),
            }
        } else {
            (name.to_owned(), value.to_owned())
        };
        if let Some(key) = name.strip_prefix('@') {
            metadata.push((key.to_owned(), value));
        } else if name.len() % 2 == 0 {
            map.headers.push(HeaderValue { key: name, value, raw_value: Vec::new() });
        } else {
            // Both encodings Envoy uses: `value` (older) and `raw_value` (newer).
            map.headers.push(HeaderValue {
                key: name,
                value: String::new(),
                raw_value: value.into_bytes(),
            });
        }
    }
    (map, metadata)
}

/// `@subset: a,b` and `@served: a` lines become the proxy's dynamic metadata.
fn metadata(entries: &[(String, String)]) -> Option<Metadata> {
    if entries.is_empty() {
        return None;
    }
    let mut metadata = Metadata::default();
    for (key, value) in entries {
        let (namespace, field) = match key.as_str() {
            "subset" => (protocol::SUBSET_HINT_NAMESPACE, protocol::SUBSET_HINT_KEY),
            "subset-list" => (protocol::SUBSET_HINT_NAMESPACE, protocol::SUBSET_HINT_KEY),
            _ => (protocol::LB_METADATA_NAMESPACE, protocol::SERVED_ENDPOINT_KEY),
        };
        let value = if key == "subset-list" {
            Value {
                kind: Some(Kind::ListValue(envoy_types::pb::google::protobuf::ListValue {
                    values: value
                        .split(',')
                        .map(|part| Value { kind: Some(Kind::StringValue(part.to_owned())) })
                        .collect(),
                })),
            }
        } else {
            Value { kind: Some(Kind::StringValue(value.clone())) }
        };
        metadata
            .filter_metadata
            .entry(namespace.to_owned())
            .or_insert_with(Struct::default)
            .fields
            .insert(field.to_owned(), value);
    }
    Some(metadata)
}

fn decode_frame(input: &mut Reader<'_>) -> ProcessingRequest {
    use processing_request::Request;
    let opcode = input.byte() % OPCODES;
    let end_of_stream = input.byte() & 1 == 1;
    let payload = input.chunk();
    let (headers, entries) = header_map(payload);
    let metadata_context = metadata(&entries);
    let body = || HttpBody { body: payload.to_vec(), end_of_stream, ..HttpBody::default() };
    let request = match opcode {
        0 => Some(Request::RequestHeaders(HttpHeaders {
            headers: Some(headers),
            end_of_stream,
            ..HttpHeaders::default()
        })),
        1 => Some(Request::RequestBody(body())),
        2 => Some(Request::RequestTrailers(HttpTrailers::default())),
        3 => Some(Request::ResponseHeaders(HttpHeaders {
            headers: Some(headers),
            end_of_stream,
            ..HttpHeaders::default()
        })),
        4 => Some(Request::ResponseBody(body())),
        5 => Some(Request::ResponseTrailers(HttpTrailers::default())),
        _ => None,
    };
    ProcessingRequest { request, metadata_context, ..ProcessingRequest::default() }
}

fn check_response(response: &ProcessingResponse, pool: &PoolSnapshot) {
    use processing_response::Response;
    match &response.response {
        Some(Response::ImmediateResponse(immediate)) => {
            let status = immediate.status.as_ref().map_or(0, |status| status.code);
            assert!(
                [400, 413, 429, 503].contains(&status),
                "immediate responses are client or capacity errors, got {status}"
            );
        }
        Some(Response::RequestHeaders(headers)) => {
            let mutations = headers.response.as_ref().and_then(|r| r.header_mutation.as_ref());
            for option in mutations.map_or(&[][..], |m| &m.set_headers) {
                let Some(header) = &option.header else { continue };
                if header.key == protocol::DESTINATION_ENDPOINT_HEADER {
                    let value = String::from_utf8_lossy(&header.raw_value);
                    for part in value.split(',') {
                        let address: SocketAddr = match part.parse() {
                            Ok(address) => address,
                            Err(_) => panic!("destination '{value}' is not ip:port"),
                        };
                        assert!(
                            pool.endpoints().iter().any(|e| e.endpoint.address == address),
                            "destination {address} is in the pool"
                        );
                    }
                }
            }
        }
        _ => {}
    }
}

/// How flow control is set up for one `ext_proc_exchange` input.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FlowMode {
    /// No admission: every request is scheduled.
    Off,
    /// A saturated pool without the flowControl gate: sheddable requests are shed (429).
    Shed,
    /// A saturated pool with the gate: requests queue; saturation then lifts and they go out.
    QueueThenLift,
    /// A saturated pool with the gate: requests queue, then the stream goes away.
    QueueThenReset,
}

const FLOW_OBJECTIVES: &str = "- {name: critical, priority: 10}\n- {name: batch, priority: -1}\n";
const SHED_CONFIG: &str = "plugins:\n- type: queue-scorer\nsaturationDetector: {queueDepthThreshold: 5, metricsStalenessThreshold: 1h}\n";
const QUEUE_CONFIG: &str = "featureGates: [flowControl]\nplugins:\n- type: queue-scorer\nsaturationDetector: {queueDepthThreshold: 5, metricsStalenessThreshold: 1h}\nflowControl: {defaultRequestTTL: 1h}\n";

fn pool_with_waiting_queue(waiting_queue: u32) -> PoolSnapshot {
    PoolSnapshot::new((0..3u8).map(|i| {
        EndpointState::new(Endpoint::new(([10, 0, 0, i + 1], 8000).into())).with_metrics(
            EndpointMetrics {
                waiting_queue,
                running: 1,
                updated_at: Some(Instant::now()),
                ..EndpointMetrics::default()
            },
        )
    }))
}

fn flow_director(config: &str, pool: Arc<SharedPool>, max_body_bytes: usize) -> Director {
    let parsed = match EndpointPickerConfig::from_yaml(config) {
        Ok(parsed) => parsed,
        Err(error) => panic!("the fuzz flow config parses: {error}"),
    };
    let objectives = match ObjectiveResolver::from_yaml(
        FLOW_OBJECTIVES,
        Arc::new(scheduler_core::flow::FlowMetrics::new()),
    ) {
        Ok(objectives) => objectives,
        Err(error) => panic!("the fuzz objectives parse: {error}"),
    };
    match Director::from_config(
        &parsed,
        &scorers::builtin_registry(),
        pool,
        DirectorOptions { max_body_bytes, ..DirectorOptions::default() },
        objectives,
    ) {
        Ok(director) => director,
        Err(error) => panic!("the fuzz flow director builds: {error}"),
    }
}

/// Resolves once the controller holds a queued request.
async fn until_queued(controller: &scheduler_core::flow::FlowController) {
    while controller.queued_requests() == 0 {
        tokio::task::yield_now().await;
    }
}

/// Target `ext_proc_exchange`: the input is a sequence of ext-proc messages, each framed as
/// `opcode, flags, u16-LE length, payload` (headers payloads are `name: value` lines; a name
/// starting with `@` becomes dynamic metadata), driven through one [`Exchange`] over a small
/// pool. The second byte picks the fallback count (low bits) and the flow-control setup
/// (bits 4-5: off, shedding, queueing then lifting saturation, queueing then a stream reset).
/// Whatever the sequence, answers must be well formed, no request may stay in flight once the
/// exchange is dropped, and no request may stay queued.
pub fn ext_proc_exchange(data: &[u8]) {
    let harness = harness();
    let mut input = Reader { data };
    let max_body_bytes = 64 + usize::from(input.byte()) * 64;
    let setup = input.byte();
    let max_fallback_endpoints = usize::from(setup % 3);
    let mode = match (setup >> 4) & 3 {
        0 => FlowMode::Off,
        1 => FlowMode::Shed,
        2 => FlowMode::QueueThenLift,
        _ => FlowMode::QueueThenReset,
    };
    let in_flight = Arc::new(ActiveRequestScorer::new());
    let (snapshot, pool, director) = if mode == FlowMode::Off {
        let scheduler = match scorers::default_scheduler() {
            Ok(scheduler) => scheduler,
            Err(error) => panic!("the default scheduler builds: {error}"),
        }
        .with_pre_request(in_flight.clone())
        .with_response_complete(in_flight.clone());
        let snapshot = small_pool();
        let pool = Arc::new(SharedPool::new(snapshot.clone()));
        let director = Director::new(
            Arc::new(scheduler),
            Arc::clone(&pool),
            DirectorOptions { max_body_bytes, ..DirectorOptions::default() },
        );
        (snapshot, pool, director)
    } else {
        let snapshot = pool_with_waiting_queue(9);
        let pool = Arc::new(SharedPool::new(snapshot.clone()));
        let config = if mode == FlowMode::Shed { SHED_CONFIG } else { QUEUE_CONFIG };
        let director = flow_director(config, Arc::clone(&pool), max_body_bytes);
        (snapshot, pool, director)
    };
    let director = Arc::new(director);
    let controller = director.admission().and_then(|admission| admission.controller()).cloned();

    harness.runtime.block_on(async {
        let mut exchange = Exchange::new(Arc::clone(&director), None)
            .with_max_fallback_endpoints(max_fallback_endpoints);
        let mut out = Vec::new();
        let mut frames = 0;
        while !input.is_empty() && frames < 64 {
            frames += 1;
            let message = decode_frame(&mut input);
            out.clear();
            let stream_reset = {
                let mut handling = std::pin::pin!(exchange.handle(message, &mut out));
                match &controller {
                    None => {
                        handling.await;
                        false
                    }
                    Some(controller) => {
                        let queued = tokio::select! {
                            biased;
                            () = &mut handling => false,
                            () = until_queued(controller) => true,
                        };
                        if queued && mode == FlowMode::QueueThenLift {
                            pool.update(|pool| {
                                for endpoint in pool_with_waiting_queue(0).endpoints() {
                                    pool.upsert(endpoint.clone());
                                }
                            });
                            if let Some(admission) = director.admission() {
                                admission.tick(&pool.load(), Instant::now());
                            }
                            handling.await;
                        }
                        // With QueueThenReset the stream goes away while its request waits.
                        queued && mode == FlowMode::QueueThenReset
                    }
                }
            };
            if stream_reset {
                break;
            }
            for response in &out {
                check_response(response, &snapshot);
            }
        }
    });
    assert_eq!(in_flight.total_in_flight(), 0, "a dropped exchange releases its request");
    if let Some(controller) = controller {
        assert_eq!(controller.queued_requests(), 0, "no request stays queued");
        assert_eq!(controller.queued_bytes(), 0, "no queued bytes stay accounted");
    }
}

/// Target `prometheus_text`: the input is a metrics page. Every sample the parser yields must
/// decode its labels; every engine's mapping (and a flag-spec mapping selecting by label) must
/// extract without panicking, and what it extracts must be usable by the scorers.
pub fn prometheus_text(data: &[u8]) {
    use metrics_model::{Engine, FlagSpecs, MetricMapping};
    let Ok(page) = std::str::from_utf8(data) else { return };
    for sample in metrics_model::text::parse(page).samples().flatten() {
        for label in sample.labels.iter() {
            assert!(!label.name.is_empty(), "label names are never empty");
        }
    }
    let custom = MetricMapping::from_flag_specs(&FlagSpecs {
        total_queued_requests: "vllm:num_requests_waiting{model_name=\"llama\"}",
        total_running_requests: "vllm:num_requests_running",
        kv_cache_usage_percentage: "vllm:kv_cache_usage_perc",
        ..FlagSpecs::default()
    });
    // A peer cluster's page, as the multi-cluster extractor reads it.
    let averages =
        ["llm_d_epp_average_kv_cache_utilization", "llm_d_epp_average_queue_size{name=\"pool\"}"]
            .map(|spec| metrics_model::mapping::MetricSpec::parse(spec).expect("a valid spec"));
    if let Ok(values) = metrics_model::latest::latest_values(data, &[&averages[0], &averages[1]]) {
        assert_eq!(values.len(), 2, "one value slot per spec");
    }
    let now = Instant::now();
    let engines = [Engine::Vllm, Engine::Sglang, Engine::TrtLlm];
    for mapping in engines.iter().map(Engine::mapping).chain(custom.as_ref().ok()) {
        if let Ok(metrics) = mapping.extract(page, now) {
            assert!(metrics.kv_usage.is_finite(), "kv usage is a number: {}", metrics.kv_usage);
            assert_eq!(metrics.updated_at, Some(now));
        }
    }
}
