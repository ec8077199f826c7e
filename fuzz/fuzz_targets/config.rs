//! libFuzzer entry of the `config` target; the body is [`epp_fuzz::config`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| epp_fuzz::config(data));
