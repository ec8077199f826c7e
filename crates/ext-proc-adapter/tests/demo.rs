//! `epp demo` end to end, small, through the real binary as a user runs it: every request
//! completes, counts add up, and the picker keeps at least round-robin's prefix-cache hit rate.

use std::process::Command;

/// The cells of the table row that starts with `policy`.
fn row<'a>(table: &'a str, policy: &str) -> Vec<&'a str> {
    let line = table
        .lines()
        .find(|line| line.split("  ").next() == Some(policy))
        .unwrap_or_else(|| panic!("no '{policy}' row in:\n{table}"));
    line.split("  ").map(str::trim).filter(|cell| !cell.is_empty()).collect()
}

fn percent(cell: &str) -> f64 {
    cell.trim_end_matches('%').parse().unwrap()
}

#[test]
fn a_tiny_demo_routes_every_request_and_keeps_prefixes_warm() {
    let output = Command::new(env!("CARGO_BIN_EXE_epp"))
        .args(["demo", "--requests", "60", "--servers", "2", "--concurrency", "8", "--seed", "7"])
        .output()
        .unwrap();
    let table = String::from_utf8(output.stdout).unwrap();
    let errors = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{table}\n{errors}");
    assert!(
        table.starts_with("epp demo: 2 simulated vLLM servers on 127.0.0.1, 60 requests (seed 7"),
        "{table}"
    );
    let epp = row(&table, "epp");
    let round_robin = row(&table, "round-robin");
    // policy, requests/endpoint, prefix hits, TTFT p50/p90, total p50/p90, pick, shed, errors, wall
    for cells in [&epp, &round_robin] {
        assert_eq!(cells.len(), 11, "{table}");
        let per_endpoint: Vec<usize> = cells[1].split('/').map(|n| n.parse().unwrap()).collect();
        assert_eq!(per_endpoint.len(), 2, "{table}");
        assert_eq!(per_endpoint.iter().sum::<usize>(), 60, "{table}");
        assert_eq!(cells[9], "0", "no request failed:\n{table}");
        assert!(percent(cells[2]) > 0.0, "{table}");
    }
    assert_eq!(round_robin[1], "30/30", "{table}");
    assert_ne!(epp[7], "-", "the picker's decisions are timed:\n{table}");
    assert!(percent(epp[2]) >= percent(round_robin[2]), "{table}");
    assert!(table.contains("epp/round-robin"), "{table}");
    assert!(table.contains("demo finished in"), "{table}");
}
