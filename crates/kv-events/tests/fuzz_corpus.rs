//! Replays the checked-in corpus of the `kv_events` fuzz target (`fuzz/corpus/kv_events/`)
//! through its body on stable Rust, so every CI run re-checks the seeds and every past finding
//! without libFuzzer.

use std::path::Path;

// The fuzz crate's own modules, whose items are `pub` there.
#[allow(unreachable_pub, dead_code)] // The input decoders serve other targets.
#[path = "../../../fuzz/src/input.rs"]
mod input;
#[allow(unreachable_pub)]
#[path = "../../../fuzz/src/kv_payload.rs"]
mod kv_payload;

#[test]
fn kv_events_corpus() {
    let fuzz_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    input::replay(&fuzz_dir, "kv_events", kv_payload::kv_events);
}

/// The seeds decode: the corpus exercises the round trip and the index, not only the
/// decoder's refusals.
#[test]
fn every_seed_decodes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/kv_events");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        assert!(kv_events::decode_batch(&data).is_ok(), "{}", path.display());
    }
}
