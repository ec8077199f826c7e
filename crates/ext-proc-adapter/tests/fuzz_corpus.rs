//! Replays the checked-in fuzz corpus (`fuzz/corpus/<target>/`) through the fuzz targets'
//! bodies on stable Rust, so every CI run re-checks the seeds and every past finding without
//! libFuzzer or nightly.

use std::path::Path;

#[allow(unreachable_pub)] // The file is the fuzz crate's library, whose items are `pub`.
#[path = "../../../fuzz/src/lib.rs"]
mod targets;

fn replay(target: &str, body: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "{} has no inputs", dir.display());
    for input in inputs {
        let data = std::fs::read(&input).expect("read corpus input");
        eprintln!("{target}: {}", input.display());
        body(&data);
    }
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
fn c_abi_corpus() {
    replay("c_abi", targets::c_abi);
}
