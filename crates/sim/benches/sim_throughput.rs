//! Simulation speed: simulated requests per second of wall time, for a small fixed workload on
//! ten servers, per policy.

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
    group.finish();
}

criterion_group!(benches, sim_throughput);
criterion_main!(benches);
