//! libFuzzer entry of the `request_body` target; the body is [`epp_fuzz::request_body`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| epp_fuzz::request_body(data));
