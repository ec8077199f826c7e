//! Summaries of a policy run and the comparison table the demo prints.
//!
//! Latencies are compared as ratios against round-robin on the same workload in the same
//! process: absolute times of a simulation on a shared machine mean little on their own. The
//! ratios are taken over the requests both policies served, so a policy that sheds requests
//! (answers 429) is not credited with the latency of the requests it turned away; each row's
//! own percentiles cover every request that policy served, and its sheds are counted apart.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use crate::proxy::RequestOutcome;
use crate::workload::OBJECTIVES;

/// What one policy achieved on the workload.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyReport {
    /// `epp` or `round-robin`.
    pub policy: String,
    /// Requests sent.
    pub requests: usize,
    /// Requests answered 200 by a model server.
    pub completed: usize,
    /// Requests served by each endpoint, in pool order.
    pub per_endpoint: Vec<usize>,
    /// Prefix-cache hits over lookups, summed over the servers' counters.
    pub prefix_hit_rate: f64,
    /// Later turns of conversations served by the endpoint that served the conversation's
    /// previous turn (the one holding its history), and later turns whose previous turn was
    /// served at all.
    pub history_kept: (usize, usize),
    /// Picker replicas the proxy asked: 0 when it routed by itself. [`PolicyReport::new`]
    /// assumes one; the demo run sets it.
    pub replicas: usize,
    /// Median and 90th percentile time to first token of streamed requests.
    pub ttft: (Duration, Duration),
    /// Median and 90th percentile time per output token after the first (TPOT), of streamed
    /// requests with more than one output token.
    pub tpot: (Duration, Duration),
    /// Median and 90th percentile time to the end of the response.
    pub total: (Duration, Duration),
    /// Median and 90th percentile time to the routing decision (zero without a picker).
    pub decision: (Duration, Duration),
    /// Immediate 429s per objective, in [`OBJECTIVES`] order.
    pub shed: [usize; 3],
    /// Proxy failures and statuses other than 200 and 429.
    pub errors: usize,
    /// Wall time of the run.
    pub wall: Duration,
    /// What the decode sidecars did, in a disaggregated run.
    pub prefill_handoffs: Option<PrefillHandoffs>,
    /// Latencies of each request of the workload, by position; `None` for a request this
    /// policy did not serve (shed or failed).
    pub served: Vec<Option<Served>>,
}

/// The latencies of one served request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Served {
    /// Time to first token, of a streamed request.
    pub ttft: Option<Duration>,
    /// Time per output token after the first, of a streamed request with more than one.
    pub tpot: Option<Duration>,
    /// Time to the end of the response.
    pub total: Duration,
}

/// The prefill hand-offs of a disaggregated run, as the decode sidecars counted them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefillHandoffs {
    /// Requests prefilled on a prefill server.
    pub remote: u64,
    /// Requests the picker sent to a prefill server that could not be used.
    pub fallbacks: u64,
    /// Prompt blocks the decode servers pulled from prefill servers.
    pub pulled_blocks: u64,
}

impl PolicyReport {
    /// Summarises `outcomes` of a run over `endpoints` given the servers' prefix counters.
    pub fn new(
        policy: &str,
        endpoints: &[SocketAddr],
        outcomes: &[RequestOutcome],
        prefix_hits: u64,
        prefix_queries: u64,
        wall: Duration,
    ) -> Self {
        let mut per_endpoint = vec![0; endpoints.len()];
        let mut shed = [0; 3];
        let mut errors = 0;
        let mut completed = 0;
        let mut ttfts = Vec::new();
        let mut tpots = Vec::new();
        let mut totals = Vec::new();
        let mut decisions: Vec<Duration> = outcomes.iter().filter_map(|o| o.decision).collect();
        let mut served = vec![None; outcomes.iter().map(|o| o.index + 1).max().unwrap_or(0)];
        let history_kept = history_kept(outcomes);
        for outcome in outcomes {
            match (outcome.status, &outcome.error) {
                (200, None) => {
                    completed += 1;
                    let tpot = outcome
                        .ttft
                        .filter(|_| outcome.output_tokens > 1)
                        .map(|ttft| (outcome.total - ttft) / (outcome.output_tokens - 1));
                    totals.push(outcome.total);
                    ttfts.extend(outcome.ttft);
                    tpots.extend(tpot);
                    served[outcome.index] =
                        Some(Served { ttft: outcome.ttft, tpot, total: outcome.total });
                    let at = outcome.endpoint.and_then(|e| endpoints.iter().position(|x| *x == e));
                    if let Some(at) = at {
                        per_endpoint[at] += 1;
                    }
                }
                (429, None) => {
                    let at = OBJECTIVES.iter().position(|o| *o == outcome.objective);
                    shed[at.unwrap_or(OBJECTIVES.len() - 1)] += 1;
                }
                _ => errors += 1,
            }
        }
        Self {
            policy: policy.to_owned(),
            requests: outcomes.len(),
            completed,
            per_endpoint,
            prefix_hit_rate: if prefix_queries == 0 {
                0.0
            } else {
                prefix_hits as f64 / prefix_queries as f64
            },
            history_kept,
            replicas: 1,
            ttft: percentiles(&mut ttfts),
            tpot: percentiles(&mut tpots),
            total: percentiles(&mut totals),
            decision: percentiles(&mut decisions),
            shed,
            errors,
            wall,
            prefill_handoffs: None,
            served,
        }
    }
}

/// [`PolicyReport::history_kept`] of `outcomes`, taken in workload order.
fn history_kept(outcomes: &[RequestOutcome]) -> (usize, usize) {
    let mut ordered: Vec<&RequestOutcome> = outcomes.iter().collect();
    ordered.sort_by_key(|outcome| outcome.index);
    // Each conversation's last turn seen so far and where it was served, if it was.
    let mut last: HashMap<usize, (usize, Option<SocketAddr>)> = HashMap::new();
    let (mut kept, mut counted) = (0, 0);
    for outcome in ordered {
        let endpoint = (outcome.status == 200 && outcome.error.is_none())
            .then_some(outcome.endpoint)
            .flatten();
        if let Some((turn, Some(previous))) = last.get(&outcome.conversation)
            && turn + 1 == outcome.turn
            && let Some(endpoint) = endpoint
        {
            counted += 1;
            kept += usize::from(endpoint == *previous);
        }
        last.insert(outcome.conversation, (outcome.turn, endpoint));
    }
    (kept, counted)
}

/// p50 and p90 of TTFT, TPOT and total time of the requests both `a` and `b` served, for each
/// of the two, and how many requests that is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommonLatencies {
    /// Requests both policies served.
    pub requests: usize,
    /// `a`'s (TTFT, TPOT, total) percentiles over those requests.
    pub first: [(Duration, Duration); 3],
    /// `b`'s, over the same requests.
    pub second: [(Duration, Duration); 3],
}

impl CommonLatencies {
    /// The latencies of `a` and `b` over the requests both served.
    pub fn of(a: &PolicyReport, b: &PolicyReport) -> Self {
        let both: Vec<(Served, Served)> =
            a.served.iter().zip(&b.served).filter_map(|(x, y)| Some(((*x)?, (*y)?))).collect();
        let side = |pick: fn(&(Served, Served)) -> Served| {
            let of = |read: fn(Served) -> Option<Duration>| {
                percentiles(
                    &mut both.iter().filter_map(|pair| read(pick(pair))).collect::<Vec<_>>(),
                )
            };
            [of(|s| s.ttft), of(|s| s.tpot), of(|s| Some(s.total))]
        };
        Self { requests: both.len(), first: side(|pair| pair.0), second: side(|pair| pair.1) }
    }
}

/// p50 and p90 (nearest rank); zero for no samples.
fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort_unstable();
    let rank = |q: f64| {
        if samples.is_empty() {
            return Duration::ZERO;
        }
        let at = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
        samples[at - 1]
    };
    (rank(0.5), rank(0.9))
}

fn ms(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1e3)
}

fn fine_ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1e3)
}

fn percent((part, whole): (usize, usize)) -> String {
    if whole == 0 { "-".into() } else { format!("{:.1}%", part as f64 * 100.0 / whole as f64) }
}

fn ratio(a: Duration, b: Duration) -> String {
    if b.is_zero() { "-".into() } else { format!("{:.2}x", a.as_secs_f64() / b.as_secs_f64()) }
}

/// The comparison table: one row per policy, then the first policy over the last (epp over
/// round-robin) when there are two.
pub fn render(reports: &[PolicyReport]) -> String {
    let header = [
        "policy",
        "requests/endpoint",
        "prefix hits",
        "TTFT p50",
        "TTFT p90",
        "TPOT p50",
        "TPOT p90",
        "total p50",
        "total p90",
        "pick p50/p90",
        "shed crit/std/shed",
        "errors",
        "wall",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| (*s).to_owned()).collect()];
    for report in reports {
        rows.push(vec![
            report.policy.clone(),
            report.per_endpoint.iter().map(usize::to_string).collect::<Vec<_>>().join("/"),
            format!("{:.1}%", report.prefix_hit_rate * 100.0),
            ms(report.ttft.0),
            ms(report.ttft.1),
            fine_ms(report.tpot.0),
            fine_ms(report.tpot.1),
            ms(report.total.0),
            ms(report.total.1),
            if report.decision.1.is_zero() {
                "-".into()
            } else {
                format!("{}/{}", ms(report.decision.0), ms(report.decision.1))
            },
            format!("{}/{}/{}", report.shed[0], report.shed[1], report.shed[2]),
            report.errors.to_string(),
            format!("{:.2} s", report.wall.as_secs_f64()),
        ]);
    }
    let common = match reports {
        [first, .., last] => Some((first, last, CommonLatencies::of(first, last))),
        _ => None,
    };
    if let Some((first, last, common)) = &common {
        let [ttft, tpot, total] = common.first;
        let [base_ttft, base_tpot, base_total] = common.second;
        let hit_ratio = if last.prefix_hit_rate > 0.0 {
            format!("{:.2}x", first.prefix_hit_rate / last.prefix_hit_rate)
        } else {
            "-".into()
        };
        rows.push(vec![
            format!("{}/{}", first.policy, last.policy),
            String::new(),
            hit_ratio,
            ratio(ttft.0, base_ttft.0),
            ratio(ttft.1, base_ttft.1),
            ratio(tpot.0, base_tpot.0),
            ratio(tpot.1, base_tpot.1),
            ratio(total.0, base_total.0),
            ratio(total.1, base_total.1),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|column| rows.iter().map(|row| row[column].chars().count()).max().unwrap_or(0))
        .collect();
    let mut text = String::new();
    for (index, row) in rows.iter().enumerate() {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        text.push_str(line.trim_end());
        text.push('\n');
        if index == 0 {
            text.push_str(&"-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1)));
            text.push('\n');
        }
    }
    if let Some((first, last, common)) = &common {
        let shed = |report: &PolicyReport| report.shed.iter().sum::<usize>();
        let _ = writeln!(
            text,
            "{}/{}: latency ratios over the {} requests both served ({} shed {}, {} shed {})",
            first.policy,
            last.policy,
            common.requests,
            first.policy,
            shed(first),
            last.policy,
            shed(last)
        );
    }
    // Where replicas are compared, whether a conversation's next turn finds its history is
    // what sharing state changes.
    if reports.iter().any(|report| report.replicas > 1) {
        text.push_str("later turns served where the conversation's previous turn was:");
        for report in reports {
            let (kept, counted) = report.history_kept;
            let _ =
                write!(text, " {} {kept}/{counted} ({})", report.policy, percent((kept, counted)));
        }
        text.push('\n');
    }
    for report in reports {
        if let Some(handoffs) = report.prefill_handoffs {
            let _ = writeln!(
                text,
                "{}: {} requests prefilled on a prefill server ({} fell back to their decode server), {} KV blocks pulled",
                report.policy, handoffs.remote, handoffs.fallbacks, handoffs.pulled_blocks
            );
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(index: usize, status: u16, port: u16, millis: u64) -> RequestOutcome {
        RequestOutcome {
            index,
            conversation: index,
            turn: 0,
            objective: OBJECTIVES[index % 3],
            status,
            endpoint: Some(SocketAddr::from(([127, 0, 0, 1], port))),
            ttft: Some(Duration::from_millis(millis / 2)),
            output_tokens: 6,
            total: Duration::from_millis(millis),
            decision: None,
            error: None,
        }
    }

    #[test]
    fn counts_sheds_errors_and_percentiles() {
        let endpoints =
            [SocketAddr::from(([127, 0, 0, 1], 1)), SocketAddr::from(([127, 0, 0, 1], 2))];
        let outcomes: Vec<RequestOutcome> = (0..10)
            .map(|i| outcome(i, 200, 1 + (i % 2) as u16, 10 * (i as u64 + 1)))
            .chain([outcome(11, 429, 1, 1), outcome(12, 503, 1, 1)])
            .collect();
        let report = PolicyReport::new("epp", &endpoints, &outcomes, 3, 4, Duration::ZERO);
        assert_eq!(report.per_endpoint, vec![5, 5]);
        assert_eq!((report.completed, report.errors, report.shed), (10, 1, [0, 0, 1]));
        assert_eq!(report.total, (Duration::from_millis(50), Duration::from_millis(90)));
        // Half of each total comes after the first token, over 5 more tokens.
        assert_eq!(report.tpot, (Duration::from_millis(5), Duration::from_millis(9)));
        assert!((report.prefix_hit_rate - 0.75).abs() < 1e-9);
        let table =
            render(&[report.clone(), PolicyReport { policy: "round-robin".into(), ..report }]);
        assert!(table.contains("epp/round-robin"), "{table}");
        assert!(table.contains("1.00x"), "{table}");
        assert!(
            table.contains(
                "latency ratios over the 10 requests both served (epp shed 1, round-robin shed 1)"
            ),
            "{table}"
        );
    }

    #[test]
    fn ratios_leave_out_requests_one_side_shed() {
        let endpoints = [SocketAddr::from(([127, 0, 0, 1], 1))];
        // The picker sheds the two slowest requests; round-robin serves them, slowly.
        let picker: Vec<RequestOutcome> = (0..10)
            .map(|i| outcome(i, if i >= 8 { 429 } else { 200 }, 1, 10 * (i as u64 + 1)))
            .collect();
        let round_robin: Vec<RequestOutcome> =
            (0..10).map(|i| outcome(i, 200, 1, 10 * (i as u64 + 1))).collect();
        let epp = PolicyReport::new("epp", &endpoints, &picker, 0, 0, Duration::ZERO);
        let baseline =
            PolicyReport::new("round-robin", &endpoints, &round_robin, 0, 0, Duration::ZERO);
        // Each row alone: the picker's p90 looks better only because it shed the slow ones.
        assert_eq!(epp.total.1, Duration::from_millis(80));
        assert_eq!(baseline.total.1, Duration::from_millis(90));
        let common = CommonLatencies::of(&epp, &baseline);
        assert_eq!(common.requests, 8);
        assert_eq!(common.first, common.second);
        assert_eq!(common.first[2], (Duration::from_millis(40), Duration::from_millis(80)));
        let table = render(&[epp, baseline]);
        let ratios = table.lines().find(|line| line.starts_with("epp/round-robin  ")).unwrap();
        assert_eq!(ratios.matches("1.00x").count(), 6, "{table}");
        assert!(table.contains("over the 8 requests both served (epp shed 2, round-robin shed 0)"));
    }

    #[test]
    fn history_kept_counts_later_turns_on_their_previous_turns_endpoint() {
        let endpoints =
            [SocketAddr::from(([127, 0, 0, 1], 1)), SocketAddr::from(([127, 0, 0, 1], 2))];
        let turn = |index, conversation, turn, status, port| RequestOutcome {
            conversation,
            turn,
            ..outcome(index, status, port, 10)
        };
        let outcomes = [
            turn(0, 0, 0, 200, 1),
            turn(1, 1, 0, 200, 2),
            turn(2, 0, 1, 200, 1), // kept
            turn(3, 1, 1, 200, 1), // moved
            turn(4, 0, 2, 429, 1), // shed: not counted, and its next turn has no history
            turn(5, 0, 3, 200, 1),
            turn(6, 1, 2, 200, 1), // kept: its previous turn moved here
        ];
        let report = PolicyReport::new("epp", &endpoints, &outcomes, 0, 0, Duration::ZERO);
        assert_eq!(report.history_kept, (2, 3));
        assert!(!render(std::slice::from_ref(&report)).contains("later turns"));
        let replicas = PolicyReport { policy: "epp x2".into(), replicas: 2, ..report.clone() };
        let table = render(&[report, replicas]);
        assert!(
            table.contains(
                "later turns served where the conversation's previous turn was: epp 2/3 (66.7%) epp x2 2/3 (66.7%)"
            ),
            "{table}"
        );
    }
}
