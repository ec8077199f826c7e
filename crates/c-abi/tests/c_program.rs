//! Compiles `tests/c/epp_test.c` with the system C compiler against the static library, runs
//! it, and requires it to pass: the C API exercised from C, as its users call it.
//!
//! The compiled program is left at `$CARGO_TARGET_TMPDIR/epp_test` so CI can also run it under
//! valgrind.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The static library cargo built alongside this test (all of the crate's types are built in
/// one go): the newest of the one under `deps/` and the one uplifted into the profile
/// directory. `cargo test` refreshes only the former, so a copy uplifted by an earlier
/// `cargo build` may be stale.
fn static_library() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps directory");
    let profile = deps.parent().expect("profile directory");
    let in_deps = std::fs::read_dir(deps)
        .expect("read deps")
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|name| name.starts_with("libepp_c_abi") && name.ends_with(".a"))
        });
    let newest = in_deps
        .chain(Some(profile.join("libepp_c_abi.a")))
        .filter_map(|path| Some((path.metadata().and_then(|m| m.modified()).ok()?, path)))
        .max_by_key(|(modified, _)| *modified);
    newest.expect("libepp_c_abi.a next to the test executable (crate-type staticlib)").1
}

#[test]
fn the_c_program_passes() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let binary = Path::new(env!("CARGO_TARGET_TMPDIR")).join("epp_test");
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let compiled = Command::new(&compiler)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g", "-o"])
        .arg(&binary)
        .arg(crate_dir.join("tests/c/epp_test.c"))
        .arg("-I")
        .arg(crate_dir.join("include"))
        .arg(static_library())
        .args(["-lpthread", "-ldl", "-lm"])
        .status()
        .unwrap_or_else(|error| panic!("running {compiler}: {error}"));
    assert!(compiled.success(), "{compiler} failed to build the C test program");

    let output = Command::new(&binary).output().expect("run the C test program");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "C test program failed\n{stdout}\n{stderr}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
}
