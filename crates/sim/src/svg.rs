//! A small SVG line chart: p90 time to first token against offered rate, one line per policy.
//!
//! Hand-written (no plotting dependency): linear rate axis, logarithmic latency axis (latency
//! spans orders of magnitude near saturation), a legend, and a colour per policy.

use std::fmt::Write as _;

use crate::report::RunReport;

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 460.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 180.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLOURS: &[&str] =
    &["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A chart's document head: the SVG element, a white background and the centred title.
fn open_document(height: f64, title: &str) -> String {
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        LEFT + (WIDTH - LEFT - RIGHT) / 2.0,
        escape(title)
    );
    svg
}

/// A horizontal grid line across the plot at `position`, labelled left of the axis.
fn grid_line(svg: &mut String, position: f64, stroke: &str, label: &str) {
    let _ = writeln!(
        svg,
        r#"<line x1="{LEFT}" y1="{position:.1}" x2="{:.1}" y2="{position:.1}" stroke="{stroke}"/><text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"#,
        WIDTH - RIGHT,
        LEFT - 6.0,
        position + 4.0
    );
}

/// Renders p90 TTFT (seconds, log scale) against QPS for every policy in `reports`.
pub fn p90_ttft_chart(title: &str, reports: &[RunReport]) -> String {
    let mut policies: Vec<&str> = Vec::new();
    for report in reports {
        if !policies.contains(&report.policy.as_str()) {
            policies.push(&report.policy);
        }
    }
    let points = || reports.iter().filter(|r| r.ttft_s.p90 > 0.0 && r.qps.is_finite());
    let (mut qps_min, mut qps_max) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut ttft_min, mut ttft_max) = (f64::INFINITY, f64::NEG_INFINITY);
    for report in points() {
        qps_min = qps_min.min(report.qps);
        qps_max = qps_max.max(report.qps);
        ttft_min = ttft_min.min(report.ttft_s.p90);
        ttft_max = ttft_max.max(report.ttft_s.p90);
    }
    if !qps_min.is_finite() {
        (qps_min, qps_max, ttft_min, ttft_max) = (0.0, 1.0, 0.01, 1.0);
    }
    if qps_max <= qps_min {
        qps_max = qps_min + 1.0;
    }
    let decade_low = ttft_min.log10().floor();
    let decade_high = ttft_max.log10().ceil().max(decade_low + 1.0);
    let plot_width = WIDTH - LEFT - RIGHT;
    let plot_height = HEIGHT - TOP - BOTTOM;
    let x = |qps: f64| LEFT + (qps - qps_min) / (qps_max - qps_min) * plot_width;
    let y = |seconds: f64| {
        TOP + plot_height
            - (seconds.log10() - decade_low) / (decade_high - decade_low) * plot_height
    };

    let mut svg = open_document(HEIGHT, title);
    // Axes, decade grid lines and labels.
    let _ = writeln!(
        svg,
        r#"<rect x="{LEFT}" y="{TOP}" width="{plot_width}" height="{plot_height}" fill="none" stroke="black"/>"#
    );
    let mut decade = decade_low;
    while decade <= decade_high {
        let seconds = 10f64.powf(decade);
        let position = y(seconds);
        let label = if seconds >= 1.0 {
            format!("{seconds:.0} s")
        } else {
            format!("{:.0} ms", seconds * 1e3)
        };
        grid_line(&mut svg, position, "#ddd", &label);
        decade += 1.0;
    }
    for tick in 0..=5 {
        let qps = qps_min + (qps_max - qps_min) * f64::from(tick) / 5.0;
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{qps:.0}</text>"#,
            x(qps),
            TOP + plot_height + 18.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">offered load (requests/s)</text>"#,
        LEFT + plot_width / 2.0,
        HEIGHT - 10.0
    );
    let _ = writeln!(
        svg,
        r#"<text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">p90 time to first token</text>"#,
        TOP + plot_height / 2.0
    );
    for (index, policy) in policies.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let mut line: Vec<(f64, f64)> =
            points().filter(|r| r.policy == *policy).map(|r| (r.qps, r.ttft_s.p90)).collect();
        line.sort_by(|a, b| a.0.total_cmp(&b.0));
        let path: Vec<String> =
            line.iter().map(|&(qps, ttft)| format!("{:.1},{:.1}", x(qps), y(ttft))).collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        for &(qps, ttft) in &line {
            let _ = writeln!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                x(qps),
                y(ttft)
            );
        }
        let legend_y = TOP + 10.0 + index as f64 * 20.0;
        let legend_x = WIDTH - RIGHT + 15.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{legend_x}" y1="{legend_y}" x2="{:.1}" y2="{legend_y}" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            legend_x + 20.0,
            legend_x + 26.0,
            legend_y + 4.0,
            escape(policy)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Round tick values covering `[low, high]`: steps of 1, 2 or 5 times a power of ten, about
/// `target` of them.
pub fn round_ticks(low: f64, high: f64, target: usize) -> Vec<f64> {
    if !(low.is_finite() && high.is_finite()) || high <= low {
        return vec![low];
    }
    let rough = (high - low) / target.max(1) as f64;
    let magnitude = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|factor| factor * magnitude)
        .find(|step| *step >= rough)
        .unwrap_or(10.0 * magnitude);
    let first = (low / step).ceil() as i64;
    let last = (high / step).floor() as i64;
    (first..=last).map(|index| index as f64 * step).collect()
}

/// Dash pattern and marker of the `index`th series, so series that overlap stay apart.
fn series_style(index: usize) -> (&'static str, &'static str) {
    const DASHES: &[&str] = &[
        "",
        r#" stroke-dasharray="6 3""#,
        r#" stroke-dasharray="2 3""#,
        r#" stroke-dasharray="8 3 2 3""#,
    ];
    const MARKERS: &[&str] = &["circle", "square", "triangle", "diamond"];
    (DASHES[index % DASHES.len()], MARKERS[(index / 2) % MARKERS.len()])
}

fn marker(svg: &mut String, shape: &str, x: f64, y: f64, colour: &str) {
    let _ = match shape {
        "square" => writeln!(
            svg,
            r#"<rect x="{:.1}" y="{:.1}" width="6" height="6" fill="{colour}"/>"#,
            x - 3.0,
            y - 3.0
        ),
        "triangle" => writeln!(
            svg,
            r#"<polygon points="{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}" fill="{colour}"/>"#,
            x,
            y - 4.0,
            x - 4.0,
            y + 3.0,
            x + 4.0,
            y + 3.0
        ),
        "diamond" => writeln!(
            svg,
            r#"<polygon points="{:.1},{:.1} {:.1},{:.1} {:.1},{:.1} {:.1},{:.1}" fill="{colour}"/>"#,
            x,
            y - 4.0,
            x + 4.0,
            y,
            x,
            y + 4.0,
            x - 4.0,
            y
        ),
        _ => writeln!(svg, r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{colour}"/>"#),
    };
}

/// What a sweep panel plots.
struct Panel {
    label: &'static str,
    value: fn(&RunReport) -> f64,
    logarithmic: bool,
    unit: fn(f64) -> String,
}

fn latency_label(seconds: f64) -> String {
    if seconds >= 1.0 { format!("{seconds} s") } else { format!("{} ms", seconds * 1e3) }
}

/// A sweep at a glance: p90 TTFT (log scale), p90 TPOT and completed requests per second
/// against offered rate, stacked on one rate axis with round ticks; one colour, dash pattern
/// and marker per policy, so overlapping series stay distinguishable.
pub fn sweep_chart(title: &str, reports: &[RunReport]) -> String {
    const PANEL_HEIGHT: f64 = 190.0;
    const GAP: f64 = 30.0;
    let panels = [
        Panel {
            label: "p90 TTFT",
            value: |r| r.ttft_s.p90,
            logarithmic: true,
            unit: latency_label,
        },
        Panel {
            label: "p90 TPOT",
            value: |r| r.tpot_s.p90,
            logarithmic: false,
            unit: |seconds| format!("{:.0} ms", seconds * 1e3),
        },
        Panel {
            label: "completed/s",
            value: |r| r.throughput_rps,
            logarithmic: false,
            unit: |rate| format!("{rate:.0}"),
        },
    ];
    let mut policies: Vec<&str> = Vec::new();
    for report in reports {
        if !policies.contains(&report.policy.as_str()) {
            policies.push(&report.policy);
        }
    }
    let rates: Vec<f64> = reports.iter().map(|r| r.qps).filter(|q| q.is_finite()).collect();
    let (mut low, mut high) = rates
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &q| (lo.min(q), hi.max(q)));
    if !low.is_finite() {
        (low, high) = (0.0, 1.0);
    }
    let x_ticks = round_ticks(low, high.max(low + 1.0), 6);
    let x_low = x_ticks.first().copied().unwrap_or(low).min(low);
    let x_high = x_ticks.last().copied().unwrap_or(high).max(high).max(x_low + 1.0);
    let plot_width = WIDTH - LEFT - RIGHT;
    let height = TOP + panels.len() as f64 * (PANEL_HEIGHT + GAP) + BOTTOM - GAP;
    let x = |qps: f64| LEFT + (qps - x_low) / (x_high - x_low) * plot_width;

    let mut svg = open_document(height, title);
    for (panel_index, panel) in panels.iter().enumerate() {
        let top = TOP + panel_index as f64 * (PANEL_HEIGHT + GAP);
        let values: Vec<f64> = reports
            .iter()
            .map(|r| (panel.value)(r))
            .filter(|v| v.is_finite() && (!panel.logarithmic || *v > 0.0))
            .collect();
        let (v_low, v_high) = values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let (axis_low, axis_high, ticks) = if panel.logarithmic {
            let (lo, hi) = if v_low.is_finite() { (v_low, v_high) } else { (0.01, 1.0) };
            let decade_low = lo.log10().floor();
            let decade_high = hi.log10().ceil().max(decade_low + 1.0);
            let ticks = (decade_low as i32..=decade_high as i32).map(|d| 10f64.powi(d)).collect();
            (decade_low, decade_high, ticks)
        } else {
            let hi = if v_high.is_finite() && v_high > 0.0 { v_high } else { 1.0 };
            let ticks = round_ticks(0.0, hi, 4);
            let top_tick = ticks.last().copied().unwrap_or(hi);
            let step = if ticks.len() > 1 { ticks[1] - ticks[0] } else { hi };
            let axis_high = if top_tick < hi { top_tick + step } else { top_tick };
            let mut ticks = ticks;
            if top_tick < hi {
                ticks.push(axis_high);
            }
            (0.0, axis_high.max(1e-12), ticks)
        };
        let y = |value: f64| {
            let position = if panel.logarithmic {
                (value.log10() - axis_low) / (axis_high - axis_low)
            } else {
                (value - axis_low) / (axis_high - axis_low)
            };
            top + PANEL_HEIGHT - position.clamp(0.0, 1.0) * PANEL_HEIGHT
        };
        let _ = writeln!(
            svg,
            r#"<rect x="{LEFT}" y="{top}" width="{plot_width}" height="{PANEL_HEIGHT}" fill="none" stroke="black"/>"#
        );
        for &tick in &ticks {
            let position = y(tick);
            grid_line(&mut svg, position, "#ddd", &(panel.unit)(tick));
        }
        let _ = writeln!(
            svg,
            r#"<text transform="translate(14 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            top + PANEL_HEIGHT / 2.0,
            panel.label
        );
        for (index, policy) in policies.iter().enumerate() {
            let colour = COLOURS[index % COLOURS.len()];
            let (dash, shape) = series_style(index);
            let mut line: Vec<(f64, f64)> = reports
                .iter()
                .filter(|r| r.policy == *policy && r.qps.is_finite())
                .map(|r| (r.qps, (panel.value)(r)))
                .filter(|(_, v)| v.is_finite() && (!panel.logarithmic || *v > 0.0))
                .collect();
            line.sort_by(|a, b| a.0.total_cmp(&b.0));
            let path: Vec<String> =
                line.iter().map(|&(q, v)| format!("{:.1},{:.1}", x(q), y(v))).collect();
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{}"/>"#,
                path.join(" ")
            );
            for &(q, v) in &line {
                marker(&mut svg, shape, x(q), y(v), colour);
            }
        }
    }
    let axis_y = TOP + panels.len() as f64 * (PANEL_HEIGHT + GAP) - GAP;
    for &tick in &x_ticks {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{tick}</text>"#,
            x(tick),
            axis_y + 18.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">offered load (requests/s)</text>"#,
        LEFT + plot_width / 2.0,
        height - 10.0
    );
    for (index, policy) in policies.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let (dash, shape) = series_style(index);
        let legend_y = TOP + 10.0 + index as f64 * 20.0;
        let legend_x = WIDTH - RIGHT + 15.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{legend_x}" y1="{legend_y}" x2="{:.1}" y2="{legend_y}" stroke="{colour}" stroke-width="3"{dash}/>"#,
            legend_x + 24.0
        );
        marker(&mut svg, shape, legend_x + 12.0, legend_y, colour);
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            legend_x + 30.0,
            legend_y + 4.0,
            escape(policy)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Renders, per case, each policy's p90 TTFT as a multiple of `reference`'s (log scale, 1x
/// marked): grouped bars, one group per case, one colour per policy.
pub fn relative_ttft_chart(
    title: &str,
    cases: &[(String, Vec<RunReport>)],
    reference: &str,
) -> String {
    let mut policies: Vec<&str> = Vec::new();
    for (_, reports) in cases {
        for report in reports {
            if report.policy != reference && !policies.contains(&report.policy.as_str()) {
                policies.push(&report.policy);
            }
        }
    }
    let ratio = |reports: &[RunReport], policy: &str| -> Option<f64> {
        let base = reports.iter().find(|r| r.policy == reference)?.ttft_s.p90;
        let value = reports.iter().find(|r| r.policy == policy)?.ttft_s.p90;
        (base > 0.0 && value > 0.0).then(|| (value / base).clamp(1e-4, 1e4))
    };
    let decade_low = -3.0_f64;
    let decade_high = 3.0_f64;
    let plot_width = WIDTH - LEFT - RIGHT;
    let plot_height = HEIGHT - TOP - BOTTOM;
    let y = |value: f64| {
        let decade = value.log10().clamp(decade_low, decade_high);
        TOP + plot_height - (decade - decade_low) / (decade_high - decade_low) * plot_height
    };
    let group_width = plot_width / cases.len().max(1) as f64;
    let bar_width = (group_width * 0.8) / policies.len().max(1) as f64;

    let mut svg = open_document(HEIGHT, title);
    let _ = writeln!(
        svg,
        r#"<rect x="{LEFT}" y="{TOP}" width="{plot_width}" height="{plot_height}" fill="none" stroke="black"/>"#
    );
    let mut decade = decade_low;
    while decade <= decade_high {
        let position = y(10f64.powf(decade));
        let label = if decade >= 0.0 {
            format!("{:.0}x", 10f64.powf(decade))
        } else {
            format!("{}x", 10f64.powf(decade))
        };
        let stroke = if decade == 0.0 { "#444" } else { "#ddd" };
        grid_line(&mut svg, position, stroke, &label);
        decade += 1.0;
    }
    let baseline = y(1.0);
    for (group, (case, reports)) in cases.iter().enumerate() {
        let group_x = LEFT + group as f64 * group_width + group_width * 0.1;
        for (index, policy) in policies.iter().enumerate() {
            let Some(value) = ratio(reports, policy) else { continue };
            let colour = COLOURS[index % COLOURS.len()];
            let top = y(value).min(baseline);
            let height = (y(value) - baseline).abs().max(1.0);
            let _ = writeln!(
                svg,
                r#"<rect x="{:.1}" y="{top:.1}" width="{:.1}" height="{height:.1}" fill="{colour}"><title>{}: {} {value:.3}x</title></rect>"#,
                group_x + index as f64 * bar_width,
                bar_width.max(1.0) - 1.0,
                escape(case),
                escape(policy)
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="11">{}</text>"#,
            group_x + group_width * 0.4,
            TOP + plot_height + 16.0 + (group % 2) as f64 * 13.0,
            escape(case)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">p90 TTFT / {}'s</text>"#,
        TOP + plot_height / 2.0,
        escape(reference)
    );
    for (index, policy) in policies.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let legend_y = TOP + 10.0 + index as f64 * 20.0;
        let legend_x = WIDTH - RIGHT + 15.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{legend_x}" y="{:.1}" width="14" height="10" fill="{colour}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            legend_y - 5.0,
            legend_x + 20.0,
            legend_y + 4.0,
            escape(policy)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Percentiles;

    fn report(policy: &str, qps: f64, p90: f64) -> RunReport {
        RunReport {
            policy: policy.to_owned(),
            workload: "w".to_owned(),
            qps,
            servers: 1,
            arrivals: 1,
            completed: 1,
            shed_by_priority: Default::default(),
            rejected: 0,
            duration_s: 1.0,
            throughput_rps: 1.0,
            output_tokens_per_s: 1.0,
            ttft_s: Percentiles { p90, ..Percentiles::default() },
            tpot_s: Percentiles::default(),
            e2e_s: Percentiles::default(),
            ..RunReport::default()
        }
    }

    #[test]
    fn one_line_and_legend_entry_per_policy() {
        let reports = [
            report("a<b", 10.0, 0.02),
            report("oracle", 10.0, 0.01),
            report("a<b", 20.0, 3.0),
            report("oracle", 20.0, 0.05),
        ];
        let svg = p90_ttft_chart("title & more", &reports);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 4);
        assert!(svg.contains("a&lt;b") && svg.contains("title &amp; more"));
        assert!(!p90_ttft_chart("empty", &[]).contains("NaN"));
    }

    #[test]
    fn ticks_are_round_numbers() {
        assert_eq!(round_ticks(60.0, 300.0, 6), vec![100.0, 150.0, 200.0, 250.0, 300.0]);
        assert_eq!(round_ticks(10.0, 60.0, 6), vec![10.0, 20.0, 30.0, 40.0, 50.0, 60.0]);
        assert_eq!(round_ticks(0.0, 0.037, 4), vec![0.0, 0.01, 0.02, 0.03]);
        assert_eq!(round_ticks(5.0, 5.0, 4), vec![5.0]);
    }

    #[test]
    fn the_sweep_chart_has_three_panels_and_a_style_per_policy() {
        let reports = [
            report("epp", 60.0, 0.02),
            report("epp", 120.0, 0.03),
            report("round-robin", 60.0, 0.5),
            report("round-robin", 120.0, 9.0),
        ];
        let svg = sweep_chart("prefix-heavy on 10 servers", &reports);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 3 * 2, "a line per policy in each panel");
        for label in ["p90 TTFT", "p90 TPOT", "completed/s", "offered load"] {
            assert!(svg.contains(label), "{label}");
        }
        assert!(svg.contains(r#"stroke-dasharray="6 3""#), "the second series is dashed");
        assert!(svg.contains(">60<") && svg.contains(">120<"));
        assert!(!svg.contains("NaN") && !sweep_chart("empty", &[]).contains("NaN"));
    }

    #[test]
    fn relative_bars_skip_the_reference_and_mark_one() {
        let cases = vec![
            ("hot".to_owned(), vec![report("load", 1.0, 0.03), report("epp", 1.0, 0.03)]),
            ("many".to_owned(), vec![report("load", 1.0, 4.0), report("epp", 1.0, 0.02)]),
        ];
        let svg = relative_ttft_chart("standard set", &cases, "load");
        assert_eq!(svg.matches("<title>").count(), 2, "one bar per non-reference policy and case");
        assert!(svg.contains("hot: epp 1.000x") && svg.contains("many: epp 0.005x"));
        assert!(svg.contains(">1x<") && !svg.contains("NaN"));
        assert!(!relative_ttft_chart("empty", &[], "load").contains("NaN"));
    }
}
