//! The `c_abi` target: the C entry points driven from Rust with arbitrary arguments. Apart
//! from the other targets because it needs `unsafe`, which the crates replaying the safe
//! targets' corpora forbid.

use std::collections::HashSet;
use std::ffi::{CString, c_char};
use std::net::SocketAddr;

use crate::input::{PATHS, Reader};

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
/// Configs with the `flowControl` gate are skipped: a queued request blocks its call up to its
/// TTL, which would read as a hang.
pub fn c_abi(data: &[u8]) {
    use epp_c_abi::*;
    let mut input = Reader { data };
    let yaml: Vec<u8> = match input.byte() % 3 {
        0 => Vec::new(),
        1 => C_CONFIG.as_bytes().to_vec(),
        _ => input.chunk().to_vec(),
    };
    if queues(&yaml) {
        return;
    }
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
        assert!((0..=13).contains(&status), "undocumented status {status}");
        // SAFETY: live handle.
        assert_eq!(unsafe { epp_in_flight_count(handle) }, tokens.len());
    }
    // SAFETY: the handle is not used again.
    unsafe { epp_scheduler_free(handle) };
}

/// Whether `yaml` is a config that turns on queueing flow control.
fn queues(yaml: &[u8]) -> bool {
    std::str::from_utf8(yaml)
        .ok()
        .and_then(|text| scheduler_core::EndpointPickerConfig::from_yaml(text).ok())
        .is_some_and(|config| {
            config.feature_enabled(scheduler_core::flow::FLOW_CONTROL_FEATURE_GATE)
        })
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
        assert!([400, 413, 429, 500, 503].contains(&http), "status {status} gave HTTP {http}");
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
