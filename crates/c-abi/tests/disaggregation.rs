//! Prefill/decode disaggregation through the C API: roles given as labels, the routing headers
//! read back per request, and the prefill endpoint's in-flight count released when the
//! response starts.

mod support;

use std::ffi::{CString, c_char};
use std::ptr;

use epp_c_abi::{
    EPP_OUTCOME_COMPLETED, EppScheduler, EppStatus, epp_endpoint_set_label, epp_request_complete,
    epp_request_response_started, epp_request_upstream_headers,
};
use support::{Picker, add_endpoint, last_error, schedule_request};

const BODY: &str = r#"{"model":"llama","messages":[{"role":"user","content":"Hello"}]}"#;

/// Always prefill apart; both stages prefer the endpoint with the fewest requests in flight.
const PD_CONFIG: &str = "\
plugins:
- type: active-request-scorer
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters: {deciders: {prefill: always-disagg-pd-decider}}
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: active-request-scorer}]
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: active-request-scorer}]
";

const PREFILL_A: &str = "10.0.0.1:8000";
const PREFILL_B: &str = "10.0.0.2:8000";
const DECODE: &str = "10.0.0.3:8000";

fn set_label(epp: &EppScheduler, address: &str, key: &str, value: Option<&str>) -> i32 {
    let (address, key) = (CString::new(address).unwrap(), CString::new(key).unwrap());
    let value = value.map(|value| CString::new(value).unwrap());
    // SAFETY: live handle; NUL-terminated strings (or NULL) that outlive the call.
    unsafe {
        epp_endpoint_set_label(
            epp,
            address.as_ptr(),
            key.as_ptr(),
            value.as_ref().map_or(ptr::null(), |value| value.as_ptr()),
        )
    }
}

fn upstream_headers(epp: &EppScheduler, token: u64, cap: usize) -> Result<String, i32> {
    let mut out = vec![0x55 as c_char; cap];
    // SAFETY: live handle; `out` has `cap` writable bytes.
    let status = unsafe { epp_request_upstream_headers(epp, token, out.as_mut_ptr(), cap) };
    if status != EppStatus::Ok as i32 {
        return Err(status);
    }
    let end = out.iter().position(|&c| c == 0).expect("NUL-terminated");
    Ok(out[..end].iter().map(|&c| c as u8 as char).collect())
}

/// Schedules one request; its token and the prefill endpoint its headers name.
fn schedule(epp: &EppScheduler) -> (u64, Option<String>) {
    let scheduled = schedule_request(epp, BODY, &[]);
    assert_eq!(scheduled.status, 0, "{}", scheduled.error);
    assert_eq!(scheduled.endpoints, DECODE, "the decode endpoint is the destination");
    let headers = upstream_headers(epp, scheduled.token, 256).unwrap();
    let prefill = headers
        .lines()
        .find_map(|line| line.strip_prefix("x-prefiller-host-port: "))
        .map(str::to_owned);
    (scheduled.token, prefill)
}

fn pd_pool() -> Picker {
    let picker = Picker::new(PD_CONFIG, None);
    for (address, role) in [(PREFILL_A, "prefill"), (PREFILL_B, "prefill"), (DECODE, "decode")] {
        add_endpoint(picker.handle(), address, 0, 0.1);
        assert_eq!(set_label(picker.handle(), address, "llm-d.ai/role", Some(role)), 0);
    }
    picker
}

#[test]
fn the_prefill_pick_reaches_the_caller_and_its_count_ends_when_the_response_starts() {
    let picker = pd_pool();
    let epp = picker.handle();
    let (first, first_prefill) = schedule(epp);
    let first_prefill = first_prefill.expect("a prefill endpoint");
    assert!([PREFILL_A, PREFILL_B].contains(&first_prefill.as_str()));
    // The first prefill endpoint has a request in flight: the next one goes to the other.
    let (second, second_prefill) = schedule(epp);
    let other = if first_prefill == PREFILL_A { PREFILL_B } else { PREFILL_A };
    assert_eq!(second_prefill.as_deref(), Some(other));
    // The first response starts: its prefill endpoint is free again, the other still busy.
    // SAFETY: live handle.
    assert_eq!(unsafe { epp_request_response_started(epp, first) }, 0);
    // SAFETY: live handle; a second report does nothing.
    assert_eq!(unsafe { epp_request_response_started(epp, first) }, 0);
    let (third, third_prefill) = schedule(epp);
    assert_eq!(third_prefill.as_deref(), Some(first_prefill.as_str()));
    for token in [first, second, third] {
        // SAFETY: live handle.
        assert_eq!(unsafe { epp_request_complete(epp, token, 1, 1, EPP_OUTCOME_COMPLETED) }, 0);
    }
    // SAFETY: live handle; the token is gone.
    let status = unsafe { epp_request_response_started(epp, first) };
    assert_eq!(status, EppStatus::UnknownToken as i32);
}

#[test]
fn removing_the_prefill_roles_serves_decode_only_and_buffers_are_checked() {
    let picker = pd_pool();
    let epp = picker.handle();
    let (token, _) = schedule(epp);
    let needed = upstream_headers(epp, token, 256).unwrap().len() + 1;
    assert_eq!(upstream_headers(epp, token, needed - 1), Err(EppStatus::BufferTooSmall as i32));
    assert!(last_error().contains(&format!("needs {needed} bytes")), "{}", last_error());
    assert!(upstream_headers(epp, token, needed).is_ok());

    for address in [PREFILL_A, PREFILL_B] {
        assert_eq!(set_label(epp, address, "llm-d.ai/role", Some("encode")), 0);
    }
    let scheduled = schedule_request(epp, BODY, &[]);
    assert_eq!(scheduled.status, 0, "{}", scheduled.error);
    assert_eq!(scheduled.endpoints, DECODE);
    assert_eq!(upstream_headers(epp, scheduled.token, 64).as_deref(), Ok(""), "no prefill");

    // A label removed (NULL value): the endpoint is unlabelled, decode-capable again.
    assert_eq!(set_label(epp, DECODE, "llm-d.ai/role", None), 0);
    assert_eq!(
        set_label(epp, "10.9.9.9:1", "llm-d.ai/role", Some("decode")),
        EppStatus::UnknownEndpoint as i32
    );
    assert_eq!(set_label(epp, DECODE, "", Some("x")), EppStatus::InvalidArgument as i32);
    let long = "x".repeat(2000);
    assert_eq!(set_label(epp, DECODE, "k", Some(&long)), EppStatus::InvalidArgument as i32);
    assert!(last_error().contains("exceeds 1024"), "{}", last_error());
}
