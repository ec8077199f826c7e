//! Prefill/decode disaggregation in the simulator: where each stage runs, what the KV transfer
//! costs, what the deciders change, and the comparison with aggregated serving.

use sim::{
    KvLink, LengthDistribution, Policy, RunReport, ServerProfile, SimConfig, SyntheticWorkload,
    WorkloadSource, WorkloadSpec,
};

/// Long shared documents, short questions and answers, follow-up turns: the shape P/D is for,
/// small enough for debug builds.
fn long_prompts(qps: f64, requests: u64) -> WorkloadSpec {
    let shape = SyntheticWorkload {
        message_tokens: LengthDistribution::LogNormal {
            median: 120.0,
            sigma: 0.5,
            min: 8,
            max: 512,
        },
        output_tokens: LengthDistribution::LogNormal { median: 80.0, sigma: 0.5, min: 4, max: 256 },
        system_prompts: 200,
        system_prompt_tokens: 2500,
        system_prompt_share: 1.0,
        mean_turns: 2.5,
        prompts_per_group: 0,
    };
    WorkloadSpec::new("long-prompts", WorkloadSource::Synthetic(shape), qps, requests)
}

fn pd_pool(prefill: usize, decode: usize) -> SimConfig {
    SimConfig::disaggregated(prefill, decode, ServerProfile::h100_llama3_8b())
}

fn total(report: &RunReport, stage: fn(&sim::ServerReport) -> u64) -> u64 {
    report.per_server.iter().map(stage).sum()
}

#[test]
fn prefill_stages_run_on_prefill_servers_and_decode_on_decode_servers() {
    let config = pd_pool(2, 4);
    let workload = long_prompts(15.0, 600);
    for policy in [Policy::pd_always(), Policy::pd_prefix_based(512)] {
        let report = sim::run(&config, &workload, &policy).unwrap();
        assert_eq!(report.completed, 600, "{}", policy.name());
        assert_eq!(report.per_server.len(), 6);
        for (index, server) in report.per_server.iter().enumerate() {
            if index < 2 {
                assert_eq!(server.role, "prefill", "{}", server.name);
                assert_eq!((server.whole_requests, server.decode_stages), (0, 0), "{server:?}");
            } else {
                assert_eq!(server.role, "decode", "{}", server.name);
                assert_eq!(server.prefill_stages, 0, "{server:?}");
            }
        }
        // Each disaggregated request ran exactly one prefill and one decode stage; the rest ran
        // whole on a decode server.
        assert_eq!(total(&report, |s| s.prefill_stages), report.disaggregated);
        assert_eq!(total(&report, |s| s.decode_stages), report.disaggregated);
        assert_eq!(total(&report, |s| s.whole_requests), 600 - report.disaggregated);
        assert!(report.per_server[..2].iter().all(|s| s.prefill_stages > 0), "{report:?}");
    }
    let always = sim::run(&config, &workload, &Policy::pd_always()).unwrap();
    assert_eq!(always.disaggregated, 600);
    assert!(always.kv_transferred_tokens > 0);
}

#[test]
fn a_dearer_kv_transfer_delays_the_first_token() {
    let workload = long_prompts(8.0, 400);
    let links = [
        KvLink { gbps: f64::INFINITY, latency_s: 0.0 },
        KvLink { gbps: 50.0, latency_s: 0.001 },
        KvLink { gbps: 5.0, latency_s: 0.005 },
        KvLink { gbps: 0.5, latency_s: 0.020 },
    ];
    for seed in 1..=3 {
        let reports: Vec<RunReport> = links
            .iter()
            .map(|&kv_link| {
                let config = SimConfig { kv_link, seed, ..pd_pool(2, 4) };
                sim::run(&config, &workload, &Policy::pd_always()).unwrap()
            })
            .collect();
        check_transfer_costs(&links, &reports);
    }
}

fn check_transfer_costs(links: &[KvLink], reports: &[RunReport]) {
    assert_eq!(reports[0].kv_transfer_s.p90, 0.0, "a free link costs nothing");
    for pair in reports.windows(2) {
        let (cheap, dear) = (&pair[0], &pair[1]);
        assert!(dear.kv_transfer_s.mean > cheap.kv_transfer_s.mean);
        assert!(
            dear.ttft_s.mean > cheap.ttft_s.mean,
            "{} vs {}",
            dear.ttft_s.mean,
            cheap.ttft_s.mean
        );
        assert!(dear.ttft_s.p90 > cheap.ttft_s.p90, "{} vs {}", dear.ttft_s.p90, cheap.ttft_s.p90);
    }
    // Each transfer costs latency + tokens × 128 KiB / bandwidth.
    for (report, link) in reports.iter().zip(links) {
        let transfers = report.disaggregated as f64;
        let expected = transfers * link.latency_s
            + report.kv_transferred_tokens as f64 * 131_072.0 / (link.gbps * 1e9);
        let measured = report.kv_transfer_s.mean * transfers;
        assert!((measured - expected).abs() <= 1e-6 * transfers + 1e-9, "{measured} vs {expected}");
    }
}

#[test]
fn the_prefix_based_decider_keeps_cached_conversations_on_their_decode_server() {
    let config = pd_pool(2, 4);
    let workload = long_prompts(10.0, 800);
    let always = sim::run(&config, &workload, &Policy::pd_always()).unwrap();
    let prefix = sim::run(&config, &workload, &Policy::pd_prefix_based(512)).unwrap();
    assert_eq!(always.disaggregated, always.arrivals);
    // Follow-up turns and repeated documents find their prefix on the decode server: those
    // stay whole, first sightings of a document are prefilled apart.
    assert!(prefix.disaggregated < always.disaggregated * 3 / 4, "{}", prefix.disaggregated);
    assert!(prefix.disaggregated > 0);
    // A threshold no prompt reaches never disaggregates; no prefill server then works.
    let never = sim::run(&config, &workload, &Policy::pd_prefix_based(100_000)).unwrap();
    assert_eq!(never.disaggregated, 0);
    assert!(never.per_server[..2].iter().all(|s| s.busy_s == 0.0), "{:?}", never.per_server);
}

#[test]
fn every_request_is_completed_shed_or_refused_once_under_disaggregation() {
    let mut profile = ServerProfile::h100_llama3_8b();
    profile.kv_blocks = 900;
    profile.max_model_len = 3000;
    let config = SimConfig::disaggregated(2, 2, profile);
    let mut workload = long_prompts(60.0, 900);
    workload.sheddable_share = 0.4;
    workload.max_context_tokens = 6000; // some requests exceed max_model_len
    let mut shed = 0;
    for policy in [Policy::pd_always(), Policy::pd_prefix_based(512), Policy::gie_default()] {
        let report = sim::run(&config, &workload, &policy).unwrap();
        assert_eq!(report.arrivals, 900);
        assert_eq!(
            report.completed + report.shed() + report.rejected,
            900,
            "{}: {report:?}",
            policy.name()
        );
        assert!(report.rejected > 0, "{}: {report:?}", policy.name());
        shed += report.shed();
    }
    assert!(shed > 0, "the overload sheds somewhere");
}

#[test]
fn pd_against_aggregated_reports_both_ratios_and_helps_tpot_under_long_prompts() {
    let base = SimConfig::new(1, ServerProfile::h100_llama3_8b());
    let workload = long_prompts(40.0, 1000);
    let reports = sim::compare_pd(&base, 2, 6, 512, &workload, &[40.0], |_, _, _| {}).unwrap();
    let names: Vec<&str> = reports.iter().map(|r| r.policy.as_str()).collect();
    assert_eq!(names, ["epp-default", "epp-pd-always", "epp-pd-prefix"]);
    let (aggregated, always, prefix) = (&reports[0], &reports[1], &reports[2]);
    // Decode servers that never prefill a whole prompt run shorter steps: long prompts and
    // short answers at load is where disaggregation pays on time per output token, whatever
    // the seed.
    for seed in 2..=4 {
        let reseeded = SimConfig { seed, ..base.clone() };
        let runs = sim::compare_pd(&reseeded, 2, 6, 512, &workload, &[40.0], |_, _, _| {}).unwrap();
        assert!(runs[1].tpot_s.p90 < runs[0].tpot_s.p90, "seed {seed}: {:?}", runs[1].tpot_s);
    }
    assert_eq!((aggregated.servers, aggregated.prefill_servers), (8, 0));
    assert!(aggregated.per_server.iter().all(|s| s.role == "prefill-decode"));
    assert_eq!(aggregated.disaggregated, 0);
    assert_eq!((always.servers, always.prefill_servers), (8, 2));
    assert!(
        always.tpot_s.p90 < aggregated.tpot_s.p90,
        "{} vs {}",
        always.tpot_s.p90,
        aggregated.tpot_s.p90
    );
    // The prefix-based decider prefills apart less often.
    assert!(prefix.disaggregated < always.disaggregated);

    let table = sim::render_pd_table(&reports);
    let ratio = |report: &RunReport, pick: fn(&RunReport) -> f64| {
        format!("{:.2}", pick(report) / pick(aggregated))
    };
    let always_row = table.lines().find(|line| line.contains("epp-pd-always")).unwrap();
    assert!(always_row.contains("2P/6D"), "{table}");
    assert!(always_row.contains(&ratio(always, |r| r.ttft_s.p90)), "{table}");
    assert!(always_row.contains(&ratio(always, |r| r.tpot_s.p90)), "{table}");
    assert!(table.lines().any(|line| line.contains("epp-default") && line.contains("1.00")));

    // Deterministic: the same inputs give the same table.
    let again = sim::compare_pd(&base, 2, 6, 512, &workload, &[40.0], |_, _, _| {}).unwrap();
    assert_eq!(sim::render_pd_table(&again), table);
}

#[test]
fn a_disaggregated_pool_needs_both_roles_and_a_usable_link() {
    let workload = long_prompts(1.0, 10);
    let error = sim::run(&pd_pool(3, 0), &workload, &Policy::pd_always()).unwrap_err();
    assert!(error.to_string().contains("3 prefill of 3 servers"), "{error}");
    let base = SimConfig::new(1, ServerProfile::h100_llama3_8b());
    let error = sim::compare_pd(&base, 0, 4, 512, &workload, &[1.0], |_, _, _| {
        panic!("nothing runs before the pool is checked")
    })
    .unwrap_err();
    assert!(error.to_string().contains("0 prefill of 4 servers"), "{error}");
    let config = SimConfig { kv_link: KvLink { gbps: 0.0, latency_s: 0.0 }, ..pd_pool(1, 1) };
    let error = sim::run(&config, &workload, &Policy::pd_always()).unwrap_err();
    assert!(error.to_string().contains("0 GB/s"), "{error}");
}
