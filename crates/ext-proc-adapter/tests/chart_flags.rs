//! Flags the Go EPP's Helm charts pass that this epp takes only in their harmless form: the
//! real binary accepts `--metrics-endpoint-auth=false` and refuses `=true`, naming the flag.

use std::process::Command;

fn epp(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_epp"))
        .args(args)
        .args(["--grpc-port", "0", "--grpc-health-port", "0", "--metrics-port", "0"])
        .output()
        .unwrap();
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn metrics_endpoint_auth_true_is_refused_naming_the_flag() {
    let (ok, stderr) = epp(&["--metrics-endpoint-auth=true"]);
    assert!(!ok);
    assert!(stderr.contains("--metrics-endpoint-auth=true"), "{stderr}");
}

#[test]
fn metrics_endpoint_auth_false_is_accepted() {
    // A config file that does not exist stops the start-up after the flags were checked, so
    // the error named is the file's, not the flag's.
    let (ok, stderr) =
        epp(&["--metrics-endpoint-auth=false", "--config-file", "/nonexistent/epp-config.yaml"]);
    assert!(!ok);
    assert!(!stderr.contains("metrics-endpoint-auth"), "{stderr}");
    assert!(stderr.contains("epp-config.yaml"), "{stderr}");
}
