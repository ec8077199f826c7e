//! The bodies of the fuzz targets, as plain functions.
//!
//! Each `fuzz_targets/<name>.rs` is a one-line libFuzzer entry calling the function of the same
//! name here. Keeping the bodies in a library lets the main workspace replay the checked-in
//! corpus (`fuzz/corpus/<name>/`) on stable Rust in an ordinary test, so the targets cannot rot
//! between fuzzing sessions.
//!
//! Every function must return normally for every input: a panic, an abort or a broken
//! invariant (checked with `assert!`) is a finding.

use std::collections::HashSet;
use std::ffi::{CString, c_char};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, HttpTrailers, ProcessingRequest, ProcessingResponse, processing_request,
    processing_response,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use ext_proc_adapter::{Director, DirectorOptions, Exchange, proto};
use scheduler_core::{
    Endpoint, EndpointMetrics, EndpointPickerConfig, EndpointState, InferenceRequest, PoolSnapshot,
    SharedPool,
};
use scorers::ActiveRequestScorer;

/// A cursor over the fuzz input; reads past the end yield zeros and empty slices, so every
/// input decodes to something.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&first, rest)) => {
                self.data = rest;
                first
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }

    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// A chunk prefixed by its little-endian u16 length (cut short at the end of the input).
    fn chunk(&mut self) -> &'a [u8] {
        let len = usize::from(self.u16()).min(self.data.len());
        let (chunk, rest) = self.data.split_at(len);
        self.data = rest;
        chunk
    }
}

const PATHS: [Option<&str>; 5] = [
    None,
    Some("/v1/completions"),
    Some("/v1/chat/completions"),
    Some("/v1/models"),
    Some("/v1/chat/completions?stream=true"),
];

/// Target `request_body`: the first byte picks the `:path`, the rest is the body.
pub fn request_body(data: &[u8]) {
    let mut input = Reader { data };
    let path = PATHS[usize::from(input.byte()) % PATHS.len()];
    if let Ok(request) = InferenceRequest::from_openai(path, [], input.data) {
        assert!(!request.target_model.is_empty(), "a parsed request always names its model");
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
    let Ok(config) = EndpointPickerConfig::from_yaml(text) else { return };
    let Ok(scheduler) = config.build(&scorers::builtin_registry()) else { return };
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
            "subset" => (proto::SUBSET_HINT_NAMESPACE, proto::SUBSET_HINT_KEY),
            "subset-list" => (proto::SUBSET_HINT_NAMESPACE, proto::SUBSET_HINT_KEY),
            _ => (proto::LB_METADATA_NAMESPACE, proto::SERVED_ENDPOINT_KEY),
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
                if header.key == proto::DESTINATION_ENDPOINT_KEY {
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

/// Target `ext_proc_exchange`: the input is a sequence of ext-proc messages, each framed as
/// `opcode, flags, u16-LE length, payload` (headers payloads are `name: value` lines; a name
/// starting with `@` becomes dynamic metadata), driven through one [`Exchange`] over a small
/// pool. Whatever the sequence, answers must be well formed and no request may stay in flight
/// once the exchange is dropped.
pub fn ext_proc_exchange(data: &[u8]) {
    let harness = harness();
    let mut input = Reader { data };
    let max_body_bytes = 64 + usize::from(input.byte()) * 64;
    let in_flight = Arc::new(ActiveRequestScorer::new());
    let scheduler = match scorers::default_scheduler() {
        Ok(scheduler) => scheduler,
        Err(error) => panic!("the default scheduler builds: {error}"),
    }
    .with_pre_request(in_flight.clone())
    .with_response_complete(in_flight.clone());
    let snapshot = small_pool();
    let pool = Arc::new(SharedPool::new(snapshot.clone()));
    let director = Arc::new(Director::new(
        Arc::new(scheduler),
        pool,
        DirectorOptions { max_fallback_endpoints: usize::from(input.byte() % 3), max_body_bytes },
    ));

    harness.runtime.block_on(async {
        let mut exchange = Exchange::new(director, None);
        let mut out = Vec::new();
        let mut frames = 0;
        while !input.is_empty() && frames < 64 {
            frames += 1;
            let message = decode_frame(&mut input);
            out.clear();
            exchange.handle(message, &mut out).await;
            for response in &out {
                check_response(response, &snapshot);
            }
        }
    });
    assert_eq!(in_flight.total_in_flight(), 0, "a dropped exchange releases its request");
}

const C_CONFIG: &str = "\
plugins:
- type: queue-scorer
- type: active-request-scorer
- type: lora-affinity-scorer
- type: prefix-cache-scorer
- type: max-score-picker
  parameters:
    maxNumOfEndpoints: 3
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: active-request-scorer
  - pluginRef: lora-affinity-scorer
  - pluginRef: prefix-cache-scorer
  - pluginRef: max-score-picker
";

const C_ADDRESSES: [&str; 4] = ["10.0.0.1:8000", "10.0.0.2:8000", "[::1]:9000", "10.0.0.1:8001"];

/// Target `c_abi`: drives the C entry points with arbitrary arguments. The first byte picks
/// the config (the default, a fixed one, or YAML read from the input); each later byte is an
/// operation (upsert, remove, metrics, schedule, served endpoint, complete) with its arguments
/// read from the input. Every call must return a documented status, scheduled endpoints must
/// be NUL-terminated within the buffer and be in the pool, and the in-flight count must match.
pub fn c_abi(data: &[u8]) {
    use epp_c_abi::*;
    let mut input = Reader { data };
    let yaml: Vec<u8> = match input.byte() % 3 {
        0 => Vec::new(),
        1 => C_CONFIG.as_bytes().to_vec(),
        _ => input.chunk().to_vec(),
    };
    // SAFETY: pointer and length describe `yaml`.
    let handle = unsafe { epp_scheduler_new(yaml.as_ptr().cast(), yaml.len()) };
    if handle.is_null() {
        // SAFETY: a NULL buffer with capacity 0 only asks for the length.
        assert!(unsafe { epp_last_error_message(std::ptr::null_mut(), 0) } > 0);
        return;
    }
    let mut tokens: Vec<u64> = Vec::new();
    let mut present: HashSet<SocketAddr> = HashSet::new();
    let mut steps = 0;
    while !input.is_empty() && steps < 64 {
        steps += 1;
        let op = input.byte() % 6;
        let address = address_arg(&mut input);
        let status = match op {
            0 => {
                let name = CString::new(input.chunk().to_vec()).ok();
                // SAFETY: live handle; NUL-terminated strings or NULL.
                let status = unsafe {
                    epp_endpoint_upsert(
                        handle,
                        address.as_ptr(),
                        name.as_ref().map_or(std::ptr::null(), |name| name.as_ptr()),
                    )
                };
                if status == EppStatus::Ok as i32 {
                    present.insert(parse_address(&address));
                }
                status
            }
            1 => {
                // SAFETY: live handle; NUL-terminated address.
                let status = unsafe { epp_endpoint_remove(handle, address.as_ptr()) };
                if status == EppStatus::Ok as i32 {
                    assert!(present.remove(&parse_address(&address)));
                }
                status
            }
            2 => {
                let active = CString::new(input.chunk().to_vec()).ok();
                let metrics = EppEndpointMetrics {
                    waiting_queue: input.u32(),
                    running: input.u32(),
                    kv_usage: f64::from_bits(input.u64()),
                    max_lora: input.u32(),
                    kv_capacity_blocks: input.u64(),
                    active_loras: active.as_ref().map_or(std::ptr::null(), |a| a.as_ptr()),
                    waiting_loras: std::ptr::null(),
                };
                // SAFETY: live handle; valid strings and struct.
                unsafe { epp_endpoint_set_metrics(handle, address.as_ptr(), &metrics) }
            }
            3 => schedule_call(handle, &mut input, &present, &mut tokens),
            4 => {
                let token = token_arg(&mut input, &tokens);
                // SAFETY: live handle; NUL-terminated address.
                unsafe { epp_request_set_served_endpoint(handle, token, address.as_ptr()) }
            }
            _ => {
                let token = token_arg(&mut input, &tokens);
                let outcome = i32::from(input.byte() % 4);
                // SAFETY: live handle.
                let status = unsafe {
                    epp_request_complete(handle, token, input.u64(), input.u64(), outcome)
                };
                if status == EppStatus::Ok as i32 {
                    tokens.retain(|&t| t != token);
                }
                status
            }
        };
        assert_ne!(status, EppStatus::Panic as i32, "a call panicked");
        assert!((0..=12).contains(&status), "undocumented status {status}");
        // SAFETY: live handle.
        assert_eq!(unsafe { epp_in_flight_count(handle) }, tokens.len());
    }
    // SAFETY: the handle is not used again.
    unsafe { epp_scheduler_free(handle) };
}

fn address_arg(input: &mut Reader<'_>) -> CString {
    let choice = input.byte();
    let text: Vec<u8> = match C_ADDRESSES.get(usize::from(choice % 8)) {
        Some(address) => address.as_bytes().to_vec(),
        None => input.chunk().to_vec(),
    };
    CString::new(text).unwrap_or_default()
}

fn parse_address(address: &CString) -> SocketAddr {
    match address.to_str().ok().and_then(|text| text.trim().parse().ok()) {
        Some(address) => address,
        None => panic!("an accepted address parses: {address:?}"),
    }
}

fn token_arg(input: &mut Reader<'_>, tokens: &[u64]) -> u64 {
    let choice = usize::from(input.byte());
    tokens.get(choice % 4).copied().unwrap_or(choice as u64)
}

fn schedule_call(
    handle: *mut epp_c_abi::EppScheduler,
    input: &mut Reader<'_>,
    present: &HashSet<SocketAddr>,
    tokens: &mut Vec<u64>,
) -> i32 {
    use epp_c_abi::*;
    let cap = usize::from(input.byte());
    let max_endpoints = usize::from(input.byte() % 4);
    let path = PATHS[usize::from(input.byte()) % PATHS.len()];
    let body = input.chunk();
    let header_bytes = input.chunk();
    let mut headers: Vec<EppHeader> = Vec::new();
    if let Some(path) = path {
        headers.push(header(b":path", path.as_bytes()));
    }
    for line in header_bytes.split(|&b| b == b'\n') {
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(at) => (&line[..at], &line[at + 1..]),
            None => (line, &[][..]),
        };
        headers.push(header(name, value));
    }
    let mut out = vec![0xaa_u8; cap];
    let (mut token, mut http) = (u64::MAX, 0);
    // SAFETY: every pointer covers its length and outlives the call.
    let status = unsafe {
        epp_schedule(
            handle,
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            out.as_mut_ptr().cast::<c_char>(),
            out.len(),
            max_endpoints,
            &mut token,
            &mut http,
        )
    };
    if status == EppStatus::Ok as i32 {
        assert_eq!(http, 200);
        assert!(token != 0 && !tokens.contains(&token), "tokens are fresh");
        tokens.push(token);
        let end = out.iter().position(|&b| b == 0).expect("endpoints are NUL-terminated");
        let text = std::str::from_utf8(&out[..end]).expect("endpoints are ASCII");
        let picks: Vec<&str> = text.split(',').collect();
        assert!(max_endpoints == 0 || picks.len() <= max_endpoints);
        for pick in picks {
            let address: SocketAddr = pick.parse().expect("endpoints are ip:port");
            assert!(present.contains(&address), "{address} is in the pool");
        }
    } else {
        assert_eq!(token, 0, "failed calls issue no token");
        assert!([400, 413, 500, 503].contains(&http), "status {status} gave HTTP {http}");
        if let Some(&first) = out.first() {
            assert_eq!(first, 0, "failed calls leave an empty string");
        }
    }
    status
}

fn header(name: &[u8], value: &[u8]) -> epp_c_abi::EppHeader {
    epp_c_abi::EppHeader {
        name: name.as_ptr().cast(),
        name_len: name.len(),
        value: value.as_ptr().cast(),
        value_len: value.len(),
    }
}
