//! Replays the checked-in fuzz corpora (`fuzz/corpus/<target>/`) through the bodies of the
//! safe fuzz targets on stable Rust, so every CI run re-checks the seeds and every past finding
//! without libFuzzer or nightly. (The C ABI target is replayed by the c-abi crate.)

use std::path::Path;

// The fuzz crate's own modules, whose items are `pub` there.
#[allow(unreachable_pub, dead_code)] // Some decoders serve only the C ABI target.
#[path = "../../../fuzz/src/input.rs"]
mod input;
#[allow(unreachable_pub)]
#[path = "../../../fuzz/src/targets.rs"]
mod targets;

fn replay(target: &str, body: fn(&[u8])) {
    input::replay(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz"), target, body);
}

#[test]
fn request_body_corpus() {
    replay("request_body", targets::request_body);
}

#[test]
fn config_corpus() {
    replay("config", targets::config);
}

#[test]
fn ext_proc_exchange_corpus() {
    replay("ext_proc_exchange", targets::ext_proc_exchange);
}

#[test]
fn prometheus_text_corpus() {
    replay("prometheus_text", targets::prometheus_text);
}
