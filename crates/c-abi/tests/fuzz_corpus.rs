//! Replays the checked-in `c_abi` fuzz corpus (`fuzz/corpus/c_abi/`) through the fuzz
//! target's body on stable Rust, so every CI run re-checks the seeds and every past finding.

use std::path::Path;

// The fuzz crate's own modules, whose items are `pub` there.
#[allow(unreachable_pub)]
#[path = "../../../fuzz/src/c_abi.rs"]
mod c_abi;
#[allow(unreachable_pub)]
#[path = "../../../fuzz/src/input.rs"]
mod input;

#[test]
fn c_abi_corpus() {
    let fuzz_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    input::replay(&fuzz_dir, "c_abi", c_abi::c_abi);
}
