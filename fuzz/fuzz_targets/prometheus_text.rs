//! libFuzzer entry of the `prometheus_text` target; the body is [`epp_fuzz::prometheus_text`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| epp_fuzz::prometheus_text(data));
