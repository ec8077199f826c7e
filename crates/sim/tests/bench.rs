//! The standard set: every case runs every policy, the table reports the default profile
//! against load-only routing, and the verdict follows the bounds.

use sim::bench::{
    CaseResult, GIE_EXACT_TTFT_CEILING, POLICIES, THROUGHPUT_FLOOR, TTFT_CEILING, render_markdown,
    run_set, standard_set,
};
use sim::{Percentiles, RunReport, ServerProfile};

#[test]
fn the_standard_set_names_every_workload_of_the_issue() {
    let cases = standard_set(100, None);
    let names: Vec<&str> = cases.iter().map(|case| case.name).collect();
    assert_eq!(
        names,
        [
            "sharegpt",
            "sharegpt-knee",
            "prefix-heavy",
            "shared-prefix-light",
            "shared-prefix-pressed",
            "hot-prefix",
            "lora-mix",
            "sheddable-mix"
        ]
    );
    assert!(cases.iter().all(|case| case.workload.requests == 100));
    let lora = cases.iter().find(|case| case.name == "lora-mix").unwrap();
    assert!(lora.workload.adapters > 0 && lora.workload.adapter_share > 0.0);
    let sheddable = cases.iter().find(|case| case.name == "sheddable-mix").unwrap();
    assert!(sheddable.workload.sheddable_share > 0.0);
}

#[test]
fn a_small_set_runs_every_policy_and_reports_the_ratios() {
    let cases: Vec<_> = standard_set(400, None)
        .into_iter()
        .filter(|case| case.name == "hot-prefix" || case.name == "shared-prefix-light")
        .collect();
    let mut runs = 0;
    let results =
        run_set(&cases, &ServerProfile::h100_llama3_8b(), 1, |_, _, _| runs += 1).unwrap();
    assert_eq!(runs, 2 * POLICIES.len());
    for result in &results {
        assert_eq!(result.reports.len(), POLICIES.len());
        for report in &result.reports {
            assert_eq!(
                report.completed + report.shed() + report.rejected,
                400,
                "{}",
                report.policy
            );
        }
        assert!(result.default_against_load_only().is_some());
    }
    let table = render_markdown(&results);
    assert!(table.contains("| hot-prefix | 8 | 120/s |"), "{table}");
    assert!(table.contains("| shared-prefix-light | 8 | 80/s |"), "{table}");
    assert_eq!(table.matches(" epp-gie-exact |").count(), 1, "one header column per policy");
}

fn report(policy: &str, throughput_rps: f64, p90: f64) -> RunReport {
    RunReport {
        policy: policy.to_owned(),
        throughput_rps,
        ttft_s: Percentiles { p90, ..Percentiles::default() },
        ..RunReport::default()
    }
}

#[test]
fn the_verdict_follows_both_bounds() {
    let case = |throughput: f64, p90: f64| CaseResult {
        case: "c".to_owned(),
        description: String::new(),
        servers: 1,
        qps: 1.0,
        reports: vec![report("epp-queue-kv", 100.0, 1.0), report("epp-default", throughput, p90)],
    };
    assert!(case(100.0 * THROUGHPUT_FLOOR, TTFT_CEILING).holds());
    assert!(!case(100.0 * THROUGHPUT_FLOOR - 0.5, 1.0).holds());
    assert!(!case(100.0, TTFT_CEILING + 0.01).holds());
    let table = render_markdown(&[case(50.0, 1.0)]);
    assert!(table.contains("0.50x | 1.00x | - | **no** |"), "{table}");
}

#[test]
fn the_default_must_keep_gie_exacts_affinity() {
    // Within the load-only bounds, but slower than GIE's exact formulas by more than allowed.
    let case = |exact_p90: f64| CaseResult {
        case: "c".to_owned(),
        description: String::new(),
        servers: 1,
        qps: 1.0,
        reports: vec![
            report("epp-queue-kv", 100.0, 1.0),
            report("epp-gie-exact", 100.0, exact_p90),
            report("epp-default", 100.0, 0.6),
        ],
    };
    assert!(case(0.6 / GIE_EXACT_TTFT_CEILING).holds());
    assert!(!case(0.4).holds(), "1.5x GIE exact's p90");
    let table = render_markdown(&[case(0.4)]);
    assert!(table.contains("1.00x | 0.60x | 1.50x | **no** |"), "{table}");
}
