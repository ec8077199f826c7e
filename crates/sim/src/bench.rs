//! The standard set (`epp-sim bench`): every policy on every workload users meet, near each
//! workload's saturation, with the default profile checked against load-only routing.
//!
//! The guarantees checked on every case: the default profile (`epp`) serves at least
//! [`THROUGHPUT_FLOOR`] of the load-only profile's (`epp-queue-kv`) throughput, with a p90 TTFT
//! at most [`TTFT_CEILING`] times its own, and keeps the affinity of GIE's exact formulas: a
//! p90 TTFT at most [`GIE_EXACT_TTFT_CEILING`] times theirs (`epp-gie-exact`), so spreading
//! load never costs the prefix wins where they matter. [`render_markdown`] prints one row per
//! case with the three ratios and whether the case holds.

use std::fmt::Write as _;

use serde::Serialize;

use crate::engine::{SimConfig, SimError, run};
use crate::policy::{Policy, PolicyError};
use crate::profile::ServerProfile;
use crate::report::RunReport;
use crate::workload::{SyntheticWorkload, WorkloadSource, WorkloadSpec};

/// Least share of load-only throughput the default profile must serve.
pub const THROUGHPUT_FLOOR: f64 = 0.9;
/// Most p90 TTFT the default profile may take, as a multiple of load-only's.
pub const TTFT_CEILING: f64 = 1.2;

/// Most p90 TTFT the default profile may take, as a multiple of GIE's exact formulas'.
pub const GIE_EXACT_TTFT_CEILING: f64 = 1.2;

/// The policies every case runs, in table order.
pub const POLICIES: &[&str] =
    &["round-robin", "random", "least-request", "epp-queue-kv", "epp-gie-exact", "epp", "oracle"];

/// One workload of the standard set, with its pool size and offered rate.
#[derive(Clone, Debug)]
pub struct BenchCase {
    /// Short name.
    pub name: &'static str,
    /// What it stands for, for the table.
    pub description: &'static str,
    /// Model servers.
    pub servers: usize,
    /// The workload at its rate.
    pub workload: WorkloadSpec,
}

fn synthetic(name: &str, shape: SyntheticWorkload, qps: f64, requests: u64) -> WorkloadSpec {
    WorkloadSpec::new(name, WorkloadSource::Synthetic(shape), qps, requests)
}

/// The standard set at `requests` requests per run. `sharegpt` replaces the ShareGPT-like
/// synthetic conversations with a trace when given.
pub fn standard_set(requests: u64, sharegpt: Option<WorkloadSource>) -> Vec<BenchCase> {
    let conversations =
        sharegpt.unwrap_or_else(|| WorkloadSource::Synthetic(SyntheticWorkload::sharegpt_like()));
    let mut lora = WorkloadSpec::new("lora-mix", conversations.clone(), 80.0, requests);
    lora.adapters = 8;
    lora.adapter_share = 0.5;
    let mut sheddable =
        synthetic("sheddable-mix", SyntheticWorkload::prefix_heavy(), 90.0, requests);
    sheddable.sheddable_share = 0.3;
    vec![
        BenchCase {
            name: "sharegpt",
            description: "multi-turn chat, ~3 turns, answers of a few hundred tokens",
            servers: 10,
            workload: WorkloadSpec::new("sharegpt", conversations.clone(), 200.0, requests),
        },
        BenchCase {
            name: "sharegpt-knee",
            description: "the same chat at its knee: every server busy, load-only far past saturation",
            servers: 10,
            workload: WorkloadSpec::new("sharegpt-knee", conversations.clone(), 270.0, requests),
        },
        BenchCase {
            name: "prefix-heavy",
            description: "150 system prompts of 6,000 tokens, short questions",
            servers: 10,
            workload: synthetic("prefix-heavy", SyntheticWorkload::prefix_heavy(), 60.0, requests),
        },
        BenchCase {
            name: "shared-prefix-light",
            description: "32 groups x 16 questions, 2,000-token system prompts: caches hold all",
            servers: 8,
            workload: synthetic(
                "shared-prefix-light",
                SyntheticWorkload::shared_prefix(32, 16, 2000, 200, 200),
                80.0,
                requests,
            ),
        },
        BenchCase {
            name: "shared-prefix-pressed",
            description: "600 groups x 5 questions, 6,000-token system prompts: more than the caches hold",
            servers: 8,
            workload: synthetic(
                "shared-prefix-pressed",
                SyntheticWorkload::shared_prefix(600, 5, 6000, 200, 200),
                40.0,
                requests,
            ),
        },
        BenchCase {
            name: "hot-prefix",
            description: "one 6,000-token system prompt on every request",
            servers: 8,
            workload: synthetic("hot-prefix", SyntheticWorkload::hot_prefix(), 120.0, requests),
        },
        BenchCase {
            name: "lora-mix",
            description: "chat, half of it on 8 LoRA adapters",
            servers: 10,
            workload: lora,
        },
        BenchCase {
            name: "sheddable-mix",
            description: "prefix-heavy past saturation, 30% sheddable",
            servers: 10,
            workload: sheddable,
        },
    ]
}

/// One case's reports, one per policy in [`POLICIES`] order.
#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    /// The case's name.
    pub case: String,
    /// What it stands for.
    pub description: String,
    /// Model servers.
    pub servers: usize,
    /// Offered rate.
    pub qps: f64,
    /// The reports.
    pub reports: Vec<RunReport>,
}

impl CaseResult {
    fn report(&self, policy: &str) -> Option<&RunReport> {
        self.reports.iter().find(|report| report.policy == policy)
    }

    /// The default profile's throughput and p90 TTFT as ratios to load-only's.
    pub fn default_against_load_only(&self) -> Option<(f64, f64)> {
        let default = self.report("epp-default")?;
        let load = self.report("epp-queue-kv")?;
        Some((
            default.throughput_rps / load.throughput_rps.max(1e-12),
            default.ttft_s.p90 / load.ttft_s.p90.max(1e-12),
        ))
    }

    /// The default profile's p90 TTFT as a ratio to GIE's exact formulas'.
    pub fn default_against_gie_exact(&self) -> Option<f64> {
        let default = self.report("epp-default")?;
        let exact = self.report("epp-gie-exact")?;
        Some(default.ttft_s.p90 / exact.ttft_s.p90.max(1e-12))
    }

    /// Whether the default profile holds the guarantees on this case. A case without a GIE
    /// exact run is judged against load-only routing alone.
    pub fn holds(&self) -> bool {
        let against_load = self.default_against_load_only().is_some_and(|(throughput, ttft)| {
            throughput >= THROUGHPUT_FLOOR && ttft <= TTFT_CEILING
        });
        let against_exact =
            self.default_against_gie_exact().is_none_or(|ttft| ttft <= GIE_EXACT_TTFT_CEILING);
        against_load && against_exact
    }
}

/// Why the standard set could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A policy name did not parse.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A run failed.
    #[error(transparent)]
    Sim(#[from] SimError),
}

/// Runs every policy on every case with `profile` and `seed`, calling `progress(done, total,
/// report)` after each run.
pub fn run_set(
    cases: &[BenchCase],
    profile: &ServerProfile,
    seed: u64,
    mut progress: impl FnMut(usize, usize, &RunReport),
) -> Result<Vec<CaseResult>, BenchError> {
    let policies: Vec<Policy> =
        POLICIES.iter().map(|spec| Policy::parse(spec)).collect::<Result<_, _>>()?;
    let total = cases.len() * policies.len();
    let mut done = 0;
    let mut results = Vec::with_capacity(cases.len());
    for case in cases {
        let mut config = SimConfig::new(case.servers, profile.clone());
        config.seed = seed;
        let mut workload = case.workload.clone();
        workload.max_context_tokens = workload.max_context_tokens.min(profile.max_model_len);
        let mut reports = Vec::with_capacity(policies.len());
        for policy in &policies {
            let report = run(&config, &workload, policy)?;
            done += 1;
            progress(done, total, &report);
            reports.push(report);
        }
        results.push(CaseResult {
            case: case.name.to_owned(),
            description: case.description.to_owned(),
            servers: case.servers,
            qps: case.workload.qps,
            reports,
        });
    }
    Ok(results)
}

fn milliseconds(seconds: f64) -> String {
    let ms = seconds * 1e3;
    if ms >= 10_000.0 { format!("{:.0} s", seconds) } else { format!("{ms:.0} ms") }
}

/// The results as markdown: per case, each policy's throughput and p90 TTFT, then the default
/// profile's ratios to load-only and whether the guarantee holds.
pub fn render_markdown(results: &[CaseResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Throughput (completed requests/s) and p90 TTFT per policy; the last columns compare \
         the default profile (`epp`) with load-only routing (`epp-queue-kv`) and with GIE's \
         exact formulas (`epp-gie-exact`): it holds when throughput >= {THROUGHPUT_FLOOR}x and \
         p90 TTFT <= {TTFT_CEILING}x load-only's, and p90 TTFT <= {GIE_EXACT_TTFT_CEILING}x \
         GIE exact's.\n"
    );
    let _ = write!(out, "| case | servers | rate |");
    for policy in POLICIES {
        let _ = write!(out, " {policy} |");
    }
    let _ = writeln!(
        out,
        " epp / load-only: throughput | p90 TTFT | epp / GIE exact: p90 TTFT | holds |"
    );
    let _ = write!(out, "|---|---|---|");
    for _ in POLICIES {
        let _ = write!(out, "---|");
    }
    let _ = writeln!(out, "---|---|---|---|");
    for result in results {
        let _ = write!(out, "| {} | {} | {}/s |", result.case, result.servers, result.qps);
        for report in &result.reports {
            let _ = write!(
                out,
                " {:.1}/s, {} |",
                report.throughput_rps,
                milliseconds(report.ttft_s.p90)
            );
        }
        let verdict = if result.holds() { "yes" } else { "**no**" };
        match result.default_against_load_only() {
            Some((throughput, ttft)) => {
                let _ = write!(out, " {throughput:.2}x | {ttft:.2}x |");
            }
            None => {
                let _ = write!(out, " - | - |");
            }
        }
        match result.default_against_gie_exact() {
            Some(ttft) => {
                let _ = writeln!(out, " {ttft:.2}x | {verdict} |");
            }
            None => {
                let _ = writeln!(out, " - | {verdict} |");
            }
        }
    }
    let _ = writeln!(out);
    for result in results {
        let _ = writeln!(out, "- `{}`: {}", result.case, result.description);
    }
    out
}
