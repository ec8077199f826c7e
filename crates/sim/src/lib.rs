//! A discrete-event simulator of an LLM inference pool that measures how well an endpoint
//! picking policy serves a workload.
//!
//! The pool is N model servers modelled on vLLM ([`server`]): continuous batching under a
//! token budget, chunked prefill, a paged KV cache with automatic prefix caching, preemption
//! by recomputation, and LoRA adapter slots; step times come from a roofline-style
//! [`profile`]. The gateway sees the servers only through periodic metric scrapes, so the
//! staleness a real EPP lives with is part of the model ([`engine`]). Requests come from a
//! synthetic or ShareGPT-trace [`workload`], and every [`policy`] (round-robin, random,
//! least-request, the real `Scheduler` from any `EndpointPickerConfig`, an oracle) is run on
//! the same requests and seed. Servers may carry llm-d's prefill/decode roles: a request the
//! EPP disaggregates is prefilled on one server, its KV moved over a modelled link, and decoded
//! on another ([`engine`], [`compare_pd`]). The EPP may run as several replicas behind the
//! gateway, each on its own or sharing prefix records and in-flight counts as the Redis syncer
//! does ([`replicas`], [`compare_replicas`]). Runs are deterministic: no wall clock, every random draw from
//! the seed, and work the scheduler defers to a background thread flushed after each decision.
//!
//! ```
//! use sim::{Policy, ServerProfile, SimConfig, SyntheticWorkload, WorkloadSource, WorkloadSpec};
//!
//! let config = SimConfig::new(4, ServerProfile::h100_llama3_8b());
//! let source = WorkloadSource::Synthetic(SyntheticWorkload::sharegpt_like());
//! let workload = WorkloadSpec::new("sharegpt-like", source, 20.0, 200);
//! let policies = [Policy::RoundRobin, Policy::gie_default(), Policy::Oracle];
//! let reports = sim::compare(&config, &workload, &policies)?;
//! for report in &reports {
//!     assert_eq!(report.completed + report.shed() + report.rejected, 200);
//! }
//! println!("{}", sim::render_table(&reports));
//! # Ok::<(), sim::SimError>(())
//! ```

#![forbid(unsafe_code)]

pub mod bench;
pub mod engine;
pub mod hashing;
mod kv;
pub mod kv_events;
pub mod policy;
pub mod profile;
pub mod replicas;
pub mod report;
pub mod server;
pub mod svg;
pub mod workload;

pub use engine::{KvLink, ServerRoles, ShedThresholds, SimConfig, SimError, compare, run};
pub use kv_events::KvEventLink;
pub use policy::{Policy, PolicyError};
pub use profile::{ProfileError, ServerProfile};
pub use replicas::{EppReplicas, ReplicaSpread, ReplicaSync};
pub use report::{
    Percentiles, RunReport, ServerReport, StageReport, render_ladder_table, render_pd_table,
    render_replicas_table, render_table,
};
pub use svg::{p90_ttft_chart, relative_ttft_chart, sweep_chart};
pub use workload::{
    LengthDistribution, SyntheticWorkload, TraceWorkload, WorkloadError, WorkloadRequest,
    WorkloadSource, WorkloadSpec,
};

/// Compares prefill/decode disaggregation with aggregated serving at equal server count: at
/// every rate in `qps`, GIE's default profile on `prefill + decode` servers labelled
/// `prefill-decode` (aggregated), then llm-d's P/D with `always-disagg-pd-decider` and with
/// `prefix-based-pd-decider` at `non_cached_tokens` on `prefill` servers labelled `prefill` and
/// `decode` labelled `decode`. `base` gives the profile, KV link, seed, scrape interval and
/// shedding; its server count and roles are replaced. Same workload and seed for all three;
/// reports are ordered by rate, then aggregated, always, prefix-based
/// ([`render_pd_table`] prints them with the P/D ÷ aggregated ratios).
pub fn compare_pd(
    base: &SimConfig,
    prefill: usize,
    decode: usize,
    non_cached_tokens: u32,
    workload: &WorkloadSpec,
    qps: &[f64],
    mut progress: impl FnMut(usize, usize, &RunReport),
) -> Result<Vec<RunReport>, SimError> {
    if prefill == 0 || decode == 0 {
        return Err(SimError::Roles { prefill, servers: prefill + decode });
    }
    let aggregated =
        SimConfig { servers: prefill + decode, roles: ServerRoles::Both, ..base.clone() };
    let disaggregated = SimConfig {
        servers: prefill + decode,
        roles: ServerRoles::Disaggregated { prefill_servers: prefill },
        ..base.clone()
    };
    let runs = [
        (&aggregated, Policy::gie_default()),
        (&disaggregated, Policy::pd_always()),
        (&disaggregated, Policy::pd_prefix_based(non_cached_tokens)),
    ];
    let total = qps.len() * runs.len();
    let mut reports = Vec::with_capacity(total);
    for &rate in qps {
        let at_rate = workload.with_qps(rate);
        for (config, policy) in &runs {
            let report = run(config, &at_rate, policy)?;
            progress(reports.len() + 1, total, &report);
            reports.push(report);
        }
    }
    Ok(reports)
}

/// Compares one EPP with `count` EPP replicas, each on its own and then synced as `sync`
/// says: at every rate in `qps`, for every EPP policy of `policies` (the others are skipped:
/// they keep no state to split), three runs on the same workload and seed. `base` gives the
/// pool; its replicas are replaced. Reports are ordered by rate, policy, then one, independent,
/// synced ([`render_replicas_table`] prints them with the ratios to one EPP).
pub fn compare_replicas(
    base: &SimConfig,
    count: usize,
    sync: ReplicaSync,
    workload: &WorkloadSpec,
    qps: &[f64],
    policies: &[Policy],
    mut progress: impl FnMut(usize, usize, &RunReport),
) -> Result<Vec<RunReport>, SimError> {
    let setups = [
        EppReplicas { count: 1, sync: None, ..base.replicas },
        EppReplicas { count, sync: None, ..base.replicas },
        EppReplicas { count, sync: Some(sync), ..base.replicas },
    ];
    let epp: Vec<&Policy> =
        policies.iter().filter(|policy| matches!(policy, Policy::Epp { .. })).collect();
    let total = qps.len() * epp.len() * setups.len();
    let mut reports = Vec::with_capacity(total);
    for &rate in qps {
        let at_rate = workload.with_qps(rate);
        for policy in &epp {
            for replicas in setups {
                let config = SimConfig { replicas, ..base.clone() };
                let report = run(&config, &at_rate, policy)?;
                progress(reports.len() + 1, total, &report);
                reports.push(report);
            }
        }
    }
    Ok(reports)
}

/// Runs every policy at every rate in `qps` (same workload shape and seed), calling
/// `progress(done, total, report)` after each run; reports are ordered by rate, then policy.
pub fn sweep(
    config: &SimConfig,
    workload: &WorkloadSpec,
    qps: &[f64],
    policies: &[Policy],
    mut progress: impl FnMut(usize, usize, &RunReport),
) -> Result<Vec<RunReport>, SimError> {
    let total = qps.len() * policies.len();
    let mut reports = Vec::with_capacity(total);
    for &rate in qps {
        let at_rate = workload.with_qps(rate);
        for policy in policies {
            let report = run(config, &at_rate, policy)?;
            progress(reports.len() + 1, total, &report);
            reports.push(report);
        }
    }
    Ok(reports)
}
