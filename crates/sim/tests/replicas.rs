//! Several EPP replicas behind one gateway: independent replicas split what they learn and lose
//! prefix affinity; replicas that share their records (as through Redis) route as one EPP.

use sim::{
    EppReplicas, Policy, ReplicaSync, RunReport, ServerProfile, SimConfig, SyntheticWorkload,
    WorkloadSource, WorkloadSpec,
};

/// Prefix-heavy chat (150 shared system prompts) at 100 requests/s on ten servers.
fn prefix_heavy(requests: u64) -> WorkloadSpec {
    let source = WorkloadSource::Synthetic(SyntheticWorkload::prefix_heavy());
    WorkloadSpec::new("prefix-heavy", source, 100.0, requests)
}

fn run_with(replicas: EppReplicas, workload: &WorkloadSpec) -> RunReport {
    let config = SimConfig { replicas, ..SimConfig::new(10, ServerProfile::h100_llama3_8b()) };
    sim::run(&config, workload, &Policy::gie_default()).unwrap()
}

#[test]
fn synced_replicas_keep_the_affinity_independent_ones_lose() {
    let workload = prefix_heavy(4000);
    let one = run_with(EppReplicas::default(), &workload);
    let independent = run_with(EppReplicas::independent(4), &workload);
    let synced = run_with(EppReplicas::synced(4, ReplicaSync::default()), &workload);
    assert_eq!((independent.epp_replicas, independent.replicas_synced), (4, false));
    assert_eq!((synced.epp_replicas, synced.replicas_synced), (4, true));
    assert_eq!(synced.policy, "epp-default x4 synced");

    let hit = |report: &RunReport| report.prefix_hit_rate * 100.0;
    assert!(
        hit(&independent) < hit(&one) - 4.0,
        "independent replicas should each miss what the others learned: hit {:.1}% against one EPP's {:.1}%",
        hit(&independent),
        hit(&one)
    );
    assert!(
        hit(&synced) >= hit(&one) - 0.5,
        "synced hit {:.1}% against one EPP's {:.1}%",
        hit(&synced),
        hit(&one)
    );
    assert!(
        synced.ttft_s.p90 <= 1.1 * one.ttft_s.p90,
        "synced p90 TTFT {:.3} s against one EPP's {:.3} s",
        synced.ttft_s.p90,
        one.ttft_s.p90
    );
    assert!(
        independent.ttft_s.p90 > 2.0 * synced.ttft_s.p90,
        "independent p90 TTFT {:.3} s against synced {:.3} s",
        independent.ttft_s.p90,
        synced.ttft_s.p90
    );
}

#[test]
fn records_that_never_arrive_leave_replicas_independent() {
    let workload = prefix_heavy(2000);
    let independent = run_with(EppReplicas::independent(3), &workload);
    let never = ReplicaSync { record_delay_s: 1e6, ..ReplicaSync::default() };
    let late = run_with(EppReplicas::synced(3, never), &workload);
    // GIE's default profile counts no requests in flight, so records are all that is shared.
    assert_eq!(late.prefix_hit_rate, independent.prefix_hit_rate);
    assert_eq!(late.ttft_s, independent.ttft_s);
    let prompt = run_with(EppReplicas::synced(3, ReplicaSync::default()), &workload);
    assert!(prompt.prefix_hit_rate > independent.prefix_hit_rate);
}

#[test]
fn synced_runs_repeat_exactly() {
    let workload = prefix_heavy(1500);
    let synced = EppReplicas::synced(3, ReplicaSync { record_delay_s: 0.003, interval_s: 0.05 });
    let random = EppReplicas { spread: sim::ReplicaSpread::Random, ..synced };
    for replicas in [synced, random] {
        assert_eq!(run_with(replicas, &workload), run_with(replicas, &workload));
    }
}

#[test]
fn replica_settings_that_cannot_run_are_refused() {
    let workload = prefix_heavy(10);
    let config =
        |replicas| SimConfig { replicas, ..SimConfig::new(2, ServerProfile::small_test()) };
    for replicas in [
        EppReplicas::independent(0),
        EppReplicas::synced(2, ReplicaSync { record_delay_s: -1.0, interval_s: 0.2 }),
        EppReplicas::synced(2, ReplicaSync { record_delay_s: 0.0, interval_s: 0.0 }),
        EppReplicas::synced(2, ReplicaSync { record_delay_s: f64::NAN, interval_s: 0.2 }),
    ] {
        let error = sim::run(&config(replicas), &workload, &Policy::gie_default()).unwrap_err();
        assert!(error.to_string().contains("EPP replicas"), "{error}");
    }
    // Zero delay is an immediate delivery, not an error.
    let immediate = EppReplicas::synced(2, ReplicaSync { record_delay_s: 0.0, interval_s: 0.2 });
    assert!(sim::run(&config(immediate), &workload, &Policy::gie_default()).is_ok());
}

/// With records delivered at once, every replica's index sees every pick in the same order as
/// one EPP's would: N synced replicas route exactly as one EPP.
#[test]
fn instantly_synced_replicas_route_exactly_as_one_epp() {
    let workload = prefix_heavy(1500);
    let one = run_with(EppReplicas::default(), &workload);
    let instant = ReplicaSync { record_delay_s: 0.0, ..ReplicaSync::default() };
    let synced = run_with(EppReplicas::synced(4, instant), &workload);
    let as_one = RunReport {
        policy: one.policy.clone(),
        epp_replicas: 1,
        replicas_synced: false,
        ..synced.clone()
    };
    assert_eq!(as_one, one);
    assert_eq!(synced.epp_replicas, 4);
}
