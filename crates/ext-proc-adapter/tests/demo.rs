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

/// Column of the error count.
const ERRORS: usize = 11;

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
        table.starts_with(
            "epp demo: 2 simulated vLLM servers on 127.0.0.1, 60 requests at 200 per second (seed 7"
        ),
        "{table}"
    );
    assert!(
        table.contains(
            "load: 200 requests/s over 2 servers (100 per server), 24 shared system prompts, at most 8 in flight: near saturation"
        ),
        "{table}"
    );
    assert!(table.contains("epp/round-robin: latency ratios over the "), "{table}");
    let epp = row(&table, "epp");
    let round_robin = row(&table, "round-robin");
    // policy, requests/endpoint, prefix hits, TTFT p50/p90, TPOT p50/p90, total p50/p90, pick,
    // shed, errors, wall
    for cells in [&epp, &round_robin] {
        assert_eq!(cells.len(), 13, "{table}");
        let per_endpoint: Vec<usize> = cells[1].split('/').map(|n| n.parse().unwrap()).collect();
        assert_eq!(per_endpoint.len(), 2, "{table}");
        assert_eq!(per_endpoint.iter().sum::<usize>(), 60, "{table}");
        assert_eq!(cells[ERRORS], "0", "no request failed:\n{table}");
        assert!(percent(cells[2]) > 0.0, "{table}");
    }
    assert_eq!(round_robin[1], "30/30", "{table}");
    assert_ne!(epp[9], "-", "the picker's decisions are timed:\n{table}");
    assert!(percent(epp[2]) >= percent(round_robin[2]), "{table}");
    assert!(table.contains("epp/round-robin"), "{table}");
    assert!(table.contains("demo finished in"), "{table}");
}

#[test]
fn the_light_flag_runs_the_light_load() {
    let output = Command::new(env!("CARGO_BIN_EXE_epp"))
        .args(["demo", "--light", "--requests", "20", "--servers", "2", "--seed", "7"])
        .args(["--policy-compare=false"])
        .output()
        .unwrap();
    let table = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success(), "{table}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        table.contains(
            "load: 150 requests/s over 2 servers (75 per server), 8 shared system prompts, at most 32 in flight: light"
        ),
        "{table}"
    );
    // --light and --rate name two different loads.
    let both = Command::new(env!("CARGO_BIN_EXE_epp"))
        .args(["demo", "--light", "--rate", "100"])
        .output()
        .unwrap();
    assert!(!both.status.success());
}

/// Runs `epp demo --pd` with `extra` flags on 4 servers (1 prefill) and returns its output.
fn pd_demo(extra: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_epp"))
        .args(["demo", "--pd", "--requests", "60", "--servers", "4", "--concurrency", "8"])
        .args(["--seed", "7"])
        .args(extra)
        .output()
        .unwrap();
    let table = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success(), "{table}\n{}", String::from_utf8_lossy(&output.stderr));
    table
}

/// The number before `what` in the hand-off line.
fn handoff_count(table: &str, what: &str) -> u64 {
    let line = table.lines().find(|line| line.starts_with("epp-pd: ")).expect("a hand-off line");
    let before = line.split(what).next().unwrap();
    before.split_whitespace().last().unwrap().trim_start_matches('(').parse().unwrap()
}

#[test]
fn a_disaggregated_demo_prefills_on_the_prefill_server_and_decodes_elsewhere() {
    let table = pd_demo(&["--non-cached-tokens", "0"]);
    let pd = row(&table, "epp-pd");
    let aggregated = row(&table, "epp-aggregated");
    for cells in [&pd, &aggregated] {
        assert_eq!(cells.len(), 13, "{table}");
        assert_eq!(cells[ERRORS], "0", "no request failed:\n{table}");
    }
    let destinations: Vec<usize> = pd[1].split('/').map(|n| n.parse().unwrap()).collect();
    assert_eq!(destinations[0], 0, "the prefill server is never the destination:\n{table}");
    assert_eq!(destinations.iter().sum::<usize>(), 60, "{table}");
    // Always disaggregate: every request went through a prefill server, none fell back.
    assert_eq!(handoff_count(&table, " requests prefilled"), 60, "{table}");
    assert_eq!(handoff_count(&table, " fell back"), 0, "{table}");
    assert!(handoff_count(&table, " KV blocks pulled") > 0, "{table}");
    assert!(table.contains("epp-pd/epp-aggregated"), "{table}");
}

#[test]
fn the_prefix_based_decider_keeps_cached_requests_whole() {
    let table = pd_demo(&["--non-cached-tokens", "64"]);
    let prefilled = handoff_count(&table, " requests prefilled");
    // Follow-up turns whose history the decode server holds stay there; cold prompts move.
    assert!(prefilled > 0 && prefilled < 60, "{table}");
    assert_eq!(row(&table, "epp-pd")[ERRORS], "0", "{table}");
}

#[test]
fn a_pool_without_a_decode_server_is_refused_clearly() {
    let output = Command::new(env!("CARGO_BIN_EXE_epp"))
        .args(["demo", "--pd", "--servers", "2", "--prefill-servers", "2"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let errors = String::from_utf8_lossy(&output.stderr);
    assert!(
        errors.contains("--prefill-servers must be at least 1 and fewer than --servers"),
        "{errors}"
    );
}

#[cfg(not(feature = "redis-sync"))]
#[test]
fn synced_replicas_without_the_redis_feature_say_how_to_build_it() {
    let output = Command::new(env!("CARGO_BIN_EXE_epp"))
        .args(["demo", "--replicas", "2", "--redis", "127.0.0.1:6390"])
        .output()
        .unwrap();
    let errors = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(errors.contains("`redis-sync` feature"), "{errors}");
    assert!(errors.contains("--features redis-sync"), "{errors}");
    // Nothing ran: the check comes before the workload.
    assert!(!String::from_utf8_lossy(&output.stdout).contains("policy"));
}
