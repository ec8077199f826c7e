//! What the C API tests share: a picker freed on drop, endpoints with metrics, one
//! `epp_schedule` call with its outputs, the last error message.

#![allow(dead_code)] // Each test binary uses its own part.

use std::ffi::{CString, c_char};
use std::ptr;

use epp_c_abi::{
    EppEndpointMetrics, EppHeader, EppScheduler, epp_endpoint_set_metrics, epp_endpoint_upsert,
    epp_last_error_message, epp_schedule, epp_scheduler_free, epp_scheduler_new,
    epp_scheduler_new_with_objectives,
};

/// A picker owned by the test, freed on drop.
pub(crate) struct Picker(*mut EppScheduler);

impl Picker {
    pub(crate) fn new(config: &str, objectives: Option<&str>) -> Self {
        // SAFETY: pointers and lengths describe live strings (or NULL with 0).
        let handle = unsafe {
            match objectives {
                Some(objectives) => epp_scheduler_new_with_objectives(
                    config.as_ptr().cast(),
                    config.len(),
                    objectives.as_ptr().cast(),
                    objectives.len(),
                ),
                None => epp_scheduler_new(config.as_ptr().cast(), config.len()),
            }
        };
        assert!(!handle.is_null(), "{}", last_error());
        Self(handle)
    }

    pub(crate) fn handle(&self) -> &EppScheduler {
        // SAFETY: non-NULL and live until drop.
        unsafe { &*self.0 }
    }
}

impl Drop for Picker {
    fn drop(&mut self) {
        // SAFETY: made by `epp_scheduler_new*`, not used after this.
        unsafe { epp_scheduler_free(self.0) };
    }
}

pub(crate) fn last_error() -> String {
    let mut buffer = [0u8; 512];
    // SAFETY: the buffer is writable for its length.
    unsafe { epp_last_error_message(buffer.as_mut_ptr().cast(), buffer.len()) };
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}

pub(crate) fn add_endpoint(epp: &EppScheduler, address: &str, waiting_queue: u32, kv_usage: f64) {
    let address = CString::new(address).unwrap();
    let metrics = EppEndpointMetrics {
        waiting_queue,
        running: 1,
        kv_usage,
        max_lora: 0,
        kv_capacity_blocks: 0,
        active_loras: ptr::null(),
        waiting_loras: ptr::null(),
    };
    // SAFETY: live handle, NUL-terminated address, valid metrics.
    unsafe {
        assert_eq!(epp_endpoint_upsert(epp, address.as_ptr(), ptr::null()), 0);
        assert_eq!(epp_endpoint_set_metrics(epp, address.as_ptr(), &metrics), 0);
    }
}

/// What one `epp_schedule` call returned.
#[derive(Debug)]
pub(crate) struct Scheduled {
    pub(crate) status: i32,
    pub(crate) http: i32,
    pub(crate) token: u64,
    pub(crate) endpoints: String,
    pub(crate) error: String,
}

/// Schedules a chat completion with `body` and the `extra` headers.
pub(crate) fn schedule_request(
    epp: &EppScheduler,
    body: &str,
    extra: &[(&str, &str)],
) -> Scheduled {
    let header = |name: &str, value: &str| EppHeader {
        name: name.as_ptr().cast(),
        name_len: name.len(),
        value: value.as_ptr().cast(),
        value_len: value.len(),
    };
    let mut headers = vec![header(":path", "/v1/chat/completions")];
    headers.extend(extra.iter().map(|(name, value)| header(name, value)));
    let mut out = [0x55 as c_char; 128];
    let (mut token, mut http) = (u64::MAX, 0);
    // SAFETY: live handle; every pointer covers its length and outlives the call.
    let status = unsafe {
        epp_schedule(
            epp,
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            out.as_mut_ptr(),
            out.len(),
            0,
            &mut token,
            &mut http,
        )
    };
    let end = out.iter().position(|&c| c == 0).expect("NUL-terminated");
    let endpoints = out[..end].iter().map(|&c| c as u8 as char).collect();
    let error = if status == 0 { String::new() } else { last_error() };
    Scheduled { status, http, token, endpoints, error }
}
