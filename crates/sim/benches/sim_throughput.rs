//! Simulation speed: simulated requests per second of wall time, for a small fixed workload on
//! ten servers, per policy, and on a disaggregated pool.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sim::{Policy, ServerProfile, SimConfig, SyntheticWorkload, WorkloadSource, WorkloadSpec};

const REQUESTS: u64 = 2_000;

fn sim_throughput(c: &mut Criterion) {
    let config = SimConfig::new(10, ServerProfile::h100_llama3_8b());
    let mut group = c.benchmark_group("sim_throughput");
    group.throughput(Throughput::Elements(REQUESTS));
    group.sample_size(10);
    for (name, shape, qps) in [
        ("sharegpt-like", SyntheticWorkload::sharegpt_like(), 150.0),
        ("prefix-heavy", SyntheticWorkload::prefix_heavy(), 60.0),
    ] {
        let workload = WorkloadSpec::new(name, WorkloadSource::Synthetic(shape), qps, REQUESTS);
        for policy in [Policy::RoundRobin, Policy::gie_default(), Policy::Oracle] {
            group.bench_function(format!("{name}/{}", policy.name()), |b| {
                b.iter(|| sim::run(&config, &workload, &policy).map(|report| report.completed))
            });
        }
    }
    // Prefill/decode disaggregation: 2 prefill + 8 decode servers, every request in three
    // stages (prefill, KV transfer, decode) with always-disaggregate.
    let pd = SimConfig::disaggregated(2, 8, ServerProfile::h100_llama3_8b());
    let workload = WorkloadSpec::new(
        "sharegpt-like",
        WorkloadSource::Synthetic(SyntheticWorkload::sharegpt_like()),
        150.0,
        REQUESTS,
    );
    let policy = Policy::pd_always();
    group.bench_function("sharegpt-like/2p8d/epp-pd-always", |b| {
        b.iter(|| sim::run(&pd, &workload, &policy).map(|report| report.completed))
    });
    group.finish();
}

criterion_group!(benches, sim_throughput);
criterion_main!(benches);
