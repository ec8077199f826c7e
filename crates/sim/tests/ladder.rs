//! Rate ladders: stages continue from one another, each stage is reported on its own cohort,
//! warm-up is marked, and NTPOT is end-to-end latency over output tokens.

use sim::{Policy, ServerProfile, SimConfig, SyntheticWorkload, WorkloadSource, WorkloadSpec};

fn prefix_heavy(qps: f64, requests: u64) -> WorkloadSpec {
    WorkloadSpec::new(
        "prefix-heavy",
        WorkloadSource::Synthetic(SyntheticWorkload::prefix_heavy()),
        qps,
        requests,
    )
}

#[test]
fn a_ladder_of_equal_rates_is_one_uninterrupted_run() {
    // No restart between stages: two stages at the same rate replay exactly the run of their
    // requests together.
    let config = SimConfig::new(4, ServerProfile::h100_llama3_8b());
    let plain = prefix_heavy(20.0, 600);
    let ladder = plain.with_ladder(&[20.0, 20.0], 300, 0.0);
    let whole = sim::run(&config, &plain, &Policy::gie_default()).unwrap();
    let staged = sim::run(&config, &ladder, &Policy::gie_default()).unwrap();
    assert_eq!(staged.completed, whole.completed);
    assert_eq!(staged.ttft_s, whole.ttft_s);
    assert_eq!(staged.prefix_hit_rate, whole.prefix_hit_rate);
    assert!(whole.stages.is_empty(), "no ladder, no stage reports");
    assert_eq!(staged.stages.len(), 2);
    assert_eq!(staged.stages.iter().map(|stage| stage.arrivals).sum::<u64>(), 600);
    assert_eq!(staged.stages.iter().map(|stage| stage.completed).sum::<u64>(), staged.completed);
}

#[test]
fn stages_follow_their_rates_and_mark_their_warm_up() {
    let ladder = prefix_heavy(1.0, 0).with_ladder(&[10.0, 40.0, 20.0], 400, 0.25);
    let requests: Vec<_> = ladder.generate(3).collect();
    assert_eq!(requests.len(), 1200);
    assert!(requests.windows(2).all(|pair| pair[0].arrival_s <= pair[1].arrival_s));
    for (stage, rate) in [10.0, 40.0, 20.0].into_iter().enumerate() {
        let cohort: Vec<_> = requests.iter().filter(|r| r.stage == stage as u32).collect();
        assert_eq!(cohort.len(), 400);
        let span = cohort.last().unwrap().arrival_s - cohort.first().unwrap().arrival_s;
        let measured = 399.0 / span;
        assert!((measured / rate - 1.0).abs() < 0.15, "stage {stage}: {measured:.1}/s");
        let warm: Vec<bool> = cohort.iter().map(|r| r.warmup).collect();
        assert!(warm[..100].iter().all(|&w| w) && warm[100..].iter().all(|&w| !w));
    }
}

#[test]
fn an_overloaded_stage_shows_in_its_own_cohort() {
    let config = SimConfig::new(2, ServerProfile::h100_llama3_8b());
    let ladder = prefix_heavy(1.0, 0).with_ladder(&[4.0, 60.0], 300, 0.1);
    let report = sim::run(&config, &ladder, &Policy::RoundRobin).unwrap();
    let (light, heavy) = (&report.stages[0], &report.stages[1]);
    assert_eq!((light.qps, heavy.qps), (4.0, 60.0));
    assert_eq!(light.success_rate, 1.0);
    assert!(heavy.ttft_s.p90 > 5.0 * light.ttft_s.p90, "{light:?} {heavy:?}");
    assert!(heavy.ntpot_s.p90 > light.ntpot_s.p90);
    assert!(heavy.throughput_rps < 60.0, "two servers cannot keep up: {heavy:?}");
}

#[test]
fn ntpot_is_end_to_end_latency_over_output_tokens() {
    let config = SimConfig::new(1, ServerProfile::small_test());
    let shape = SyntheticWorkload::shared_prefix(1, 1, 20, 10, 8);
    let workload = WorkloadSpec::new("one", WorkloadSource::Synthetic(shape), 1.0, 1);
    let report = sim::run(&config, &workload, &Policy::RoundRobin).unwrap();
    assert_eq!(report.completed, 1);
    let expected = report.e2e_s.p50 / 8.0;
    assert!((report.ntpot_s.p50 - expected).abs() < 1e-9, "{:?}", report.ntpot_s);
}

#[test]
fn the_client_concurrency_limit_holds_requests_back() {
    // One small server, a burst of requests: with one request in flight at a time none ever
    // waits at the server, so every TTFT is a lone prefill (the first one's longer: it also
    // computes the shared prefix the others find cached).
    let config = SimConfig::new(1, ServerProfile::small_test());
    let shape = SyntheticWorkload::shared_prefix(1, 0, 20, 10, 4);
    let mut workload = WorkloadSpec::new("burst", WorkloadSource::Synthetic(shape), 500.0, 40);
    let open = sim::run(&config, &workload, &Policy::RoundRobin).unwrap();
    workload.max_concurrency = Some(1);
    let limited = sim::run(&config, &workload, &Policy::RoundRobin).unwrap();
    assert_eq!(limited.completed, 40);
    assert!(
        (limited.ttft_s.p90 - limited.ttft_s.p50).abs() < 1e-9,
        "every TTFT the same lone prefill: {:?}",
        limited.ttft_s
    );
    assert!(open.ttft_s.p90 > 2.0 * limited.ttft_s.p90, "{:?} {:?}", open.ttft_s, limited.ttft_s);
    assert!(limited.duration_s >= open.duration_s);
}

#[test]
fn late_responses_fail_and_lower_the_success_rate() {
    let config = SimConfig::new(2, ServerProfile::h100_llama3_8b());
    let mut ladder = prefix_heavy(1.0, 0).with_ladder(&[4.0, 80.0], 300, 0.0);
    ladder.timeout_s = Some(10.0);
    let report = sim::run(&config, &ladder, &Policy::RoundRobin).unwrap();
    assert!(report.timed_out > 0);
    assert_eq!(report.completed + report.timed_out + report.shed() + report.rejected, 600);
    let (light, heavy) = (&report.stages[0], &report.stages[1]);
    // The light stage's last requests meet the heavy stage's backlog: carried-over state.
    assert!(light.success_rate >= 0.9, "{light:?}");
    assert!(heavy.success_rate < light.success_rate - 0.2, "{light:?} {heavy:?}");
    assert_eq!(heavy.completed + heavy.timed_out, heavy.arrivals);
    assert!(heavy.ttft_s.p99 <= 10.0, "only responses within the timeout are measured");
}
