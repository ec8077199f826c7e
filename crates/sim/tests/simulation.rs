//! Whole-run properties: determinism, conservation of requests, and the oracle's advantage.

use std::path::Path;

use scheduler_core::EndpointPickerConfig;
use sim::{
    Policy, RunReport, ServerProfile, SimConfig, SyntheticWorkload, TraceWorkload, WorkloadSource,
    WorkloadSpec,
};

fn sample_trace() -> TraceWorkload {
    TraceWorkload::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sharegpt-sample.json"))
        .expect("the checked-in sample parses")
}

fn synthetic(name: &str, shape: SyntheticWorkload, qps: f64, requests: u64) -> WorkloadSpec {
    WorkloadSpec::new(name, WorkloadSource::Synthetic(shape), qps, requests)
}

fn baselines() -> Vec<Policy> {
    vec![
        Policy::RoundRobin,
        Policy::Random,
        Policy::LeastRequest,
        Policy::gie_default(),
        Policy::Oracle,
    ]
}

fn by_policy<'a>(reports: &'a [RunReport], policy: &str) -> &'a RunReport {
    reports.iter().find(|report| report.policy == policy).expect("policy ran")
}

#[test]
fn the_same_seed_gives_the_same_table_and_another_seed_does_not() {
    let config = SimConfig::new(3, ServerProfile::h100_llama3_8b());
    let workload = synthetic("sharegpt-like", SyntheticWorkload::sharegpt_like(), 30.0, 600);
    let first = sim::compare(&config, &workload, &baselines()).unwrap();
    let second = sim::compare(&config, &workload, &baselines()).unwrap();
    assert_eq!(first, second);
    assert_eq!(sim::render_table(&first), sim::render_table(&second));
    let reseeded = SimConfig { seed: 2, ..config };
    let third = sim::compare(&reseeded, &workload, &baselines()).unwrap();
    assert_ne!(sim::render_table(&first), sim::render_table(&third));
}

#[test]
fn every_request_finishes_or_is_shed_or_refused_exactly_once() {
    // Small KV cache, adapters and a sheddable share at overload: every path is exercised.
    let mut profile = ServerProfile::h100_llama3_8b();
    profile.kv_blocks = 1200;
    profile.max_loras = 2;
    let config = SimConfig::new(3, profile);
    let mut workload = synthetic("mixed", SyntheticWorkload::sharegpt_like(), 120.0, 1500);
    workload.adapters = 5;
    workload.adapter_share = 0.5;
    workload.sheddable_share = 0.3;
    workload.max_context_tokens = 20_000; // lets a few requests exceed max_model_len
    let mut total_preemptions = 0;
    for report in sim::compare(&config, &workload, &baselines()).unwrap() {
        assert_eq!(report.arrivals, 1500, "{}", report.policy);
        assert_eq!(
            report.completed + report.shed() + report.rejected,
            report.arrivals,
            "{report:#?}"
        );
        assert!(report.shed_by_priority.keys().all(|&priority| priority < 0), "{report:#?}");
        assert!(report.adapter_loads > 0);
        total_preemptions += report.preemptions;
    }
    assert!(total_preemptions > 0, "the small cache forces preemptions");
}

#[test]
fn trace_replay_runs_the_sample_file() {
    let config = SimConfig::new(2, ServerProfile::h100_llama3_8b());
    let workload = WorkloadSpec::new("sample", WorkloadSource::Trace(sample_trace()), 5.0, 300);
    let report = sim::run(&config, &workload, &Policy::RoundRobin).unwrap();
    assert_eq!(report.completed, 300);
    assert!(report.prefix_hit_rate > 0.0, "later turns reuse earlier ones");
}

#[test]
fn first_turns_replay_single_requests_without_history() {
    let trace = sample_trace();
    let openings: Vec<String> =
        trace.conversations.iter().map(|conversation| conversation.turns[0].0.clone()).collect();
    let is_opening = |prompt: &str| {
        // A replayed pass over the file prefixes "[replay N] ".
        openings.iter().any(|m| prompt.ends_with(m.as_str()) && prompt.len() <= m.len() + 16)
    };
    let mut workload = WorkloadSpec::new("sample", WorkloadSource::Trace(trace), 5.0, 200);
    workload.first_turns_only = true;
    let requests: Vec<_> = workload.generate(1).collect();
    assert_eq!(requests.len(), 200);
    for request in &requests {
        assert!(is_opening(&request.prompt), "not a first turn: {:?}", request.prompt);
    }
    workload.first_turns_only = false;
    assert!(
        workload.generate(1).any(|request| !is_opening(&request.prompt)),
        "without the flag, later turns carry their history"
    );
}

fn assert_oracle_not_worse(config: &SimConfig, workload: &WorkloadSpec) {
    let reports = sim::compare(config, workload, &[Policy::RoundRobin, Policy::Oracle]).unwrap();
    let (round_robin, oracle) = (by_policy(&reports, "round-robin"), by_policy(&reports, "oracle"));
    assert!(
        oracle.ttft_s.p90 <= round_robin.ttft_s.p90,
        "{} at {} qps: oracle p90 TTFT {:.3} s > round-robin {:.3} s",
        workload.name,
        workload.qps,
        oracle.ttft_s.p90,
        round_robin.ttft_s.p90
    );
}

#[test]
fn the_oracle_is_never_worse_than_round_robin_on_p90_ttft() {
    let config = SimConfig::new(4, ServerProfile::h100_llama3_8b());
    // Moderate load and near saturation for each standard workload (4 servers).
    for qps in [30.0, 70.0] {
        let workload = synthetic("sharegpt-like", SyntheticWorkload::sharegpt_like(), qps, 1500);
        assert_oracle_not_worse(&config, &workload);
    }
    for qps in [10.0, 25.0] {
        let workload = synthetic("prefix-heavy", SyntheticWorkload::prefix_heavy(), qps, 800);
        assert_oracle_not_worse(&config, &workload);
    }
    let trace = WorkloadSpec::new("sample", WorkloadSource::Trace(sample_trace()), 40.0, 1500);
    assert_oracle_not_worse(&config, &trace);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let workload = synthetic("w", SyntheticWorkload::sharegpt_like(), 1.0, 1);
    let no_servers = SimConfig::new(0, ServerProfile::small_test());
    assert!(matches!(
        sim::run(&no_servers, &workload, &Policy::Random),
        Err(sim::SimError::NoServers)
    ));
    let mut bad_scrape = SimConfig::new(1, ServerProfile::small_test());
    bad_scrape.scrape_interval_s = 0.0;
    assert!(sim::run(&bad_scrape, &workload, &Policy::Random).is_err());
    let mut no_budget = SimConfig::new(1, ServerProfile::small_test());
    no_budget.profile.max_batched_tokens = 0;
    assert!(matches!(
        sim::run(&no_budget, &workload, &Policy::Random),
        Err(sim::SimError::Profile(_))
    ));
    for rate in [f64::NAN, f64::INFINITY, -1.0] {
        let odd = WorkloadSpec { qps: rate, conversation_gap_s: f64::NAN, ..workload.clone() };
        assert_eq!(odd.generate(1).count(), 0, "rate {rate}");
    }
    let empty = WorkloadSpec { qps: 0.0, ..workload };
    let report =
        sim::run(&SimConfig::new(1, ServerProfile::small_test()), &empty, &Policy::Oracle).unwrap();
    assert_eq!(report.arrivals, 0);
}

#[test]
fn prefix_affinity_halves_p90_ttft_on_the_prefix_heavy_load() {
    let config = SimConfig::new(4, ServerProfile::h100_llama3_8b());
    let workload = synthetic("prefix-heavy", SyntheticWorkload::prefix_heavy(), 25.0, 800);
    let policies = [Policy::RoundRobin, Policy::gie_default()];
    let reports = sim::compare(&config, &workload, &policies).unwrap();
    let (round_robin, prefix) =
        (by_policy(&reports, "round-robin"), by_policy(&reports, "epp-default"));
    assert!(
        prefix.ttft_s.p90 <= 0.5 * round_robin.ttft_s.p90,
        "epp-default p90 {:.3} s vs round-robin {:.3} s",
        prefix.ttft_s.p90,
        round_robin.ttft_s.p90
    );
    assert!(prefix.prefix_hit_rate > round_robin.prefix_hit_rate);
}

#[test]
fn lag_compensation_stops_the_load_only_profile_herding_between_scrapes() {
    // Without it, every decision between two scrapes sees the same metrics and the load-only
    // profile sends the burst to one server: worse than round-robin. With it, it spreads.
    let load_only = |lag_compensation: bool| {
        let parameters = serde_json::json!({"lagCompensation": lag_compensation});
        let config = EndpointPickerConfig::queue_kv()
            .with_plugin_parameters("queue-scorer", parameters.clone())
            .with_plugin_parameters("kv-cache-utilization-scorer", parameters);
        Policy::epp_from_config(&format!("lag-{lag_compensation}"), config, "test").unwrap()
    };
    let config = SimConfig::new(4, ServerProfile::h100_llama3_8b());
    let workload = synthetic("sharegpt-like", SyntheticWorkload::sharegpt_like(), 70.0, 1500);
    let reports =
        sim::compare(&config, &workload, &[Policy::RoundRobin, load_only(true), load_only(false)])
            .unwrap();
    let p90 = |policy| by_policy(&reports, policy).ttft_s.p90;
    assert!(p90("lag-true") <= 1.2 * p90("round-robin"), "{reports:#?}");
    assert!(p90("lag-false") > 1.5 * p90("round-robin"), "{reports:#?}");
}
