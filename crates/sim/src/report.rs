//! Run results: latency percentiles, throughput, cache and shedding counters, rendered as a
//! text table (with ratios against round-robin and the oracle) or serialised as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

/// Summary of a latency sample, seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Mean.
    pub mean: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples` (sorted in place); zeros when empty.
    pub fn of(samples: &mut [f64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable_by(f64::total_cmp);
        let rank = |quantile: f64| {
            let index = (quantile * samples.len() as f64).ceil() as usize;
            samples[index.clamp(1, samples.len()) - 1]
        };
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        Self { p50: rank(0.50), p90: rank(0.90), p99: rank(0.99), mean }
    }
}

/// What one policy did on one workload.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RunReport {
    /// Policy name.
    pub policy: String,
    /// Workload name.
    pub workload: String,
    /// Offered arrival rate, requests per second.
    pub qps: f64,
    /// Servers in the pool.
    pub servers: usize,
    /// Requests that arrived.
    pub arrivals: u64,
    /// Requests that finished.
    pub completed: u64,
    /// Requests shed (HTTP 429) by the saturation detector, by priority.
    pub shed_by_priority: BTreeMap<i32, u64>,
    /// Requests refused: no endpoint chosen (503) or too long for a server (400).
    pub rejected: u64,
    /// Responses that ended after the client's timeout (failed, not completed).
    pub timed_out: u64,
    /// From the first arrival to the last completion, simulated seconds.
    pub duration_s: f64,
    /// Completed requests per simulated second.
    pub throughput_rps: f64,
    /// Output tokens per simulated second.
    pub output_tokens_per_s: f64,
    /// Time to first token.
    pub ttft_s: Percentiles,
    /// Time per output token after the first.
    pub tpot_s: Percentiles,
    /// Arrival to last token.
    pub e2e_s: Percentiles,
    /// Share of admitted prompt tokens served from the servers' prefix caches.
    pub prefix_hit_rate: f64,
    /// Sequences preempted (recomputed) because the KV cache was full.
    pub preemptions: u64,
    /// LoRA adapter loads.
    pub adapter_loads: u64,
    /// Servers labelled `prefill` only (0 for a pool that does not disaggregate).
    pub prefill_servers: usize,
    /// Requests whose prefill ran on another server than their decode.
    pub disaggregated: u64,
    /// Prompt tokens whose KV moved from a prefill to a decode server.
    pub kv_transferred_tokens: u64,
    /// Duration of the KV transfers.
    pub kv_transfer_s: Percentiles,
    /// What each server did, in pool order.
    pub per_server: Vec<ServerReport>,
    /// Normalised time per output token: end-to-end latency / output tokens (GIE's NTPOT).
    pub ntpot_s: Percentiles,
    /// One entry per rate-ladder stage (empty without a ladder).
    pub stages: Vec<StageReport>,
    /// EPP replicas the requests were spread over (1 for a single EPP and for the policies
    /// that are not the EPP).
    pub epp_replicas: usize,
    /// Whether those replicas shared prefix records and in-flight counts.
    pub replicas_synced: bool,
}

/// One stage of a rate ladder: its requests (the cohort that arrived in it), measured as the
/// benchmarks report a stage. Latencies leave out the stage's warm-up requests.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StageReport {
    /// Offered rate of the stage.
    pub qps: f64,
    /// Requests of the stage that arrived.
    pub arrivals: u64,
    /// Of those, completed within the client's timeout.
    pub completed: u64,
    /// Of those, answered after the client's timeout.
    pub timed_out: u64,
    /// Completed / arrived.
    pub success_rate: f64,
    /// From the stage's first arrival to its last completion, simulated seconds.
    pub duration_s: f64,
    /// Completed requests of the stage per second of its duration.
    pub throughput_rps: f64,
    /// Output tokens of the stage's completed requests per second of its duration.
    pub output_tokens_per_s: f64,
    /// Time to first token (warm-up excluded).
    pub ttft_s: Percentiles,
    /// Time per output token after the first (warm-up excluded).
    pub tpot_s: Percentiles,
    /// Normalised time per output token (warm-up excluded).
    pub ntpot_s: Percentiles,
}

/// Rate-ladder reports as a table: one row per policy and stage.
pub fn render_ladder_table(reports: &[RunReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:>7} {:>7} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "policy",
        "stage",
        "qps",
        "success",
        "req/s",
        "out tok/s",
        "TTFT50",
        "TTFT90",
        "NTPOT50",
        "NTPOT90"
    );
    let _ = writeln!(
        out,
        "{:<16} {:>7} {:>7} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "", "", "", "%", "", "", "ms", "ms", "ms", "ms"
    );
    for report in reports {
        for (index, stage) in report.stages.iter().enumerate() {
            let _ = writeln!(
                out,
                "{:<16} {:>7} {:>7.1} {:>8.1} {:>8.1} {:>9.0} {:>9.0} {:>9.0} {:>8.1} {:>8.1}",
                report.policy,
                index + 1,
                stage.qps,
                stage.success_rate * 100.0,
                stage.throughput_rps,
                stage.output_tokens_per_s,
                stage.ttft_s.p50 * 1e3,
                stage.ttft_s.p90 * 1e3,
                stage.ntpot_s.p50 * 1e3,
                stage.ntpot_s.p90 * 1e3,
            );
        }
    }
    out
}

/// What one server did over a run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServerReport {
    /// The endpoint's name.
    pub name: String,
    /// Its `llm-d.ai/role` label (empty when unlabelled).
    pub role: String,
    /// Requests it served whole (prefill and decode).
    pub whole_requests: u64,
    /// Prefill stages of disaggregated requests it ran.
    pub prefill_stages: u64,
    /// Decode stages of disaggregated requests it ran.
    pub decode_stages: u64,
    /// Simulated seconds it spent in steps.
    pub busy_s: f64,
}

impl RunReport {
    /// Total requests shed.
    pub fn shed(&self) -> u64 {
        self.shed_by_priority.values().sum()
    }
}

fn milliseconds(seconds: f64) -> String {
    format!("{:.0}", seconds * 1e3)
}

/// Renders `reports` as a fixed-width table, grouped by rate, with each policy's p90 TTFT as a
/// ratio to round-robin's and the oracle's at the same rate (when those ran).
pub fn render_table(reports: &[RunReport]) -> String {
    let mut out = String::new();
    let header = format!(
        "{:>7} {:<16} {:>7} {:>7} {:>7} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6} {:>7} {:>6} {:>7} {:>7}",
        "qps",
        "policy",
        "done",
        "req/s",
        "tok/s",
        "TTFT50",
        "TTFT90",
        "TTFT99",
        "TPOT50",
        "TPOT90",
        "hit%",
        "preempt",
        "shed",
        "p90/RR",
        "p90/orc",
    );
    let _ = writeln!(out, "{header}");
    let _ = writeln!(
        out,
        "{:>7} {:<16} {:>7} {:>7} {:>7} {:>8} {:>8} {:>8} {:>6} {:>6}",
        "", "", "", "", "", "ms", "ms", "ms", "ms", "ms"
    );
    for report in reports {
        let peer = |policy: &str| {
            reports.iter().find(|other| {
                other.policy == policy
                    && other.qps == report.qps
                    && other.workload == report.workload
            })
        };
        let ratio = |policy: &str| match peer(policy) {
            Some(other) if other.ttft_s.p90 > 0.0 => {
                format!("{:.2}", report.ttft_s.p90 / other.ttft_s.p90)
            }
            _ => "-".to_owned(),
        };
        let shed = if report.shed_by_priority.is_empty() {
            "0".to_owned()
        } else {
            report
                .shed_by_priority
                .iter()
                .map(|(priority, count)| format!("{count}@{priority}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let _ = writeln!(
            out,
            "{:>7.1} {:<16} {:>7} {:>7.1} {:>7.0} {:>8} {:>8} {:>8} {:>6.1} {:>6.1} {:>6.1} {:>7} {:>6} {:>7} {:>7}",
            report.qps,
            report.policy,
            report.completed,
            report.throughput_rps,
            report.output_tokens_per_s,
            milliseconds(report.ttft_s.p50),
            milliseconds(report.ttft_s.p90),
            milliseconds(report.ttft_s.p99),
            report.tpot_s.p50 * 1e3,
            report.tpot_s.p90 * 1e3,
            report.prefix_hit_rate * 100.0,
            report.preemptions,
            shed,
            ratio("round-robin"),
            ratio("oracle"),
        );
    }
    out
}

/// Renders a replica comparison ([`crate::compare_replicas`]) as a fixed-width table: per rate
/// and policy, one EPP, N independent replicas and N synced replicas, with TTFT percentiles,
/// prefix-cache hit rate, throughput and p90 TTFT as a ratio to the single EPP's.
pub fn render_replicas_table(reports: &[RunReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>7} {:<22} {:>7} {:>8} {:>8} {:>8} {:>6} {:>7} {:>8}",
        "qps", "policy", "req/s", "TTFT50", "TTFT90", "TTFT99", "hit%", "shed", "p90/one"
    );
    let _ = writeln!(out, "{:>7} {:<22} {:>7} {:>8} {:>8} {:>8}", "", "", "", "ms", "ms", "ms");
    for report in reports {
        let base = report.policy.split(" x").next().unwrap_or(&report.policy);
        let one = reports.iter().find(|other| {
            other.epp_replicas == 1
                && other.policy == base
                && other.qps == report.qps
                && other.workload == report.workload
        });
        let ratio = match one {
            Some(one) if one.ttft_s.p90 > 0.0 => {
                format!("{:.2}", report.ttft_s.p90 / one.ttft_s.p90)
            }
            _ => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:>7.1} {:<22} {:>7.1} {:>8} {:>8} {:>8} {:>6.1} {:>7} {:>8}",
            report.qps,
            report.policy,
            report.throughput_rps,
            milliseconds(report.ttft_s.p50),
            milliseconds(report.ttft_s.p90),
            milliseconds(report.ttft_s.p99),
            report.prefix_hit_rate * 100.0,
            report.shed(),
            ratio,
        );
    }
    out
}

/// Renders a prefill/decode comparison ([`crate::compare_pd`]) as a fixed-width table, grouped
/// by rate: each run's pool, policy, share of requests prefilled apart, TTFT and TPOT
/// percentiles, p90 TTFT and p90 TPOT as ratios to the aggregated run (the one without prefill
/// servers) at the same rate, and the median KV transfer.
pub fn render_pd_table(reports: &[RunReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>7} {:<7} {:<14} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>9} {:>9} {:>6} {:>7}",
        "qps",
        "pool",
        "policy",
        "done",
        "P/D%",
        "TTFT50",
        "TTFT90",
        "TPOT50",
        "TPOT90",
        "tok/s",
        "TTFT90/ag",
        "TPOT90/ag",
        "hit%",
        "xfer50",
    );
    let _ = writeln!(
        out,
        "{:>7} {:<7} {:<14} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>9} {:>9} {:>6} {:>7}",
        "", "", "", "", "", "ms", "ms", "ms", "ms", "", "", "", "", "ms"
    );
    for report in reports {
        let aggregated = reports.iter().find(|other| {
            other.prefill_servers == 0
                && other.qps == report.qps
                && other.workload == report.workload
        });
        let ratio = |pick: fn(&RunReport) -> f64| match aggregated {
            Some(other) if pick(other) > 0.0 => format!("{:.2}", pick(report) / pick(other)),
            _ => "-".to_owned(),
        };
        let pool = if report.prefill_servers == 0 {
            format!("{}", report.servers)
        } else {
            format!("{}P/{}D", report.prefill_servers, report.servers - report.prefill_servers)
        };
        let disaggregated = if report.arrivals > 0 {
            report.disaggregated as f64 / report.arrivals as f64 * 100.0
        } else {
            0.0
        };
        let _ = writeln!(
            out,
            "{:>7.1} {:<7} {:<14} {:>7} {:>7.1} {:>7} {:>7} {:>7.1} {:>7.1} {:>7.0} {:>9} {:>9} {:>6.1} {:>7.1}",
            report.qps,
            pool,
            report.policy,
            report.completed,
            disaggregated,
            milliseconds(report.ttft_s.p50),
            milliseconds(report.ttft_s.p90),
            report.tpot_s.p50 * 1e3,
            report.tpot_s.p90 * 1e3,
            report.output_tokens_per_s,
            ratio(|report| report.ttft_s.p90),
            ratio(|report| report.tpot_s.p90),
            report.prefix_hit_rate * 100.0,
            report.kv_transfer_s.p50 * 1e3,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let summary = Percentiles::of(&mut samples);
        assert_eq!((summary.p50, summary.p90, summary.p99), (50.0, 90.0, 99.0));
        assert_eq!(summary.mean, 50.5);
        assert_eq!(Percentiles::of(&mut []), Percentiles::default());
    }
}
