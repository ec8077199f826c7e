//! libFuzzer entry of the `kv_events` target; the body is [`epp_fuzz::kv_events`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| epp_fuzz::kv_events(data));
