//! libFuzzer entry of the `ext_proc_exchange` target; the body is [`epp_fuzz::ext_proc_exchange`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| epp_fuzz::ext_proc_exchange(data));
