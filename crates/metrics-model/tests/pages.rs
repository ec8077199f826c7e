//! The engine pages under `tests/data/`: they parse cleanly, agree sample for sample with the
//! `prometheus-parse` crate, and map to the documented load figures.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use metrics_model::{Engine, Record, Sample};

const VLLM: &str = include_str!("data/vllm.prom");
const SGLANG: &str = include_str!("data/sglang.prom");
const TRTLLM: &str = include_str!("data/trtllm.prom");

/// A sample reduced to comparable parts: name, sorted labels, value bits (NaN canonical).
type Flat = (String, Vec<(String, String)>, u64);

fn value_bits(value: f64) -> u64 {
    if value.is_nan() {
        f64::NAN.to_bits()
    } else if value == 0.0 {
        0.0f64.to_bits()
    } else {
        value.to_bits()
    }
}

/// Bucket bounds and quantiles compare as numbers: `1.0` and `1` are the same bound.
fn canonical_label(name: &str, value: &str) -> String {
    if (name == "le" || name == "quantile")
        && let Ok(number) = value.parse::<f64>()
    {
        return format!("{number:?}");
    }
    value.to_owned()
}

fn flatten_ours(sample: &Sample<'_>) -> Flat {
    let labels: BTreeMap<String, String> = sample
        .labels
        .iter()
        .map(|label| (label.name.to_owned(), canonical_label(label.name, &label.value)))
        .collect();
    (sample.name.to_owned(), labels.into_iter().collect(), value_bits(sample.value))
}

/// Label values `prometheus-parse` cannot represent: it splits label text on `,` and `=` and
/// does not decode escapes.
fn reference_can_represent(sample: &Sample<'_>) -> bool {
    sample.labels.iter().all(|label| !label.value.contains([',', '=', '}', '\\', '"']))
}

/// `prometheus-parse` reads names with `\w+`, which excludes the `:` that vLLM and SGLang
/// names contain; such names are spelled with a placeholder for it and restored afterwards.
const COLON: &str = "__colon__";

fn reference_input(page: &str, skipped_lines: &[usize]) -> String {
    let mut out = String::with_capacity(page.len() + 4096);
    for (index, line) in page.lines().enumerate() {
        if skipped_lines.contains(&(index + 1)) {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ").or_else(|| line.strip_prefix("# TYPE ")) {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str(&line[..7]);
            out.push_str(&name.replace(':', COLON));
            out.push(' ');
            out.push_str(tail);
        } else if line.starts_with('#') {
            out.push_str(line);
        } else {
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            out.push_str(&line[..name_end].replace(':', COLON));
            out.push_str(&line[name_end..]);
        }
        out.push('\n');
    }
    out
}

fn flatten_reference(page: &str) -> Vec<Flat> {
    let lines = page.lines().map(|line| Ok(line.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("reference parse");
    let mut flat = Vec::new();
    for sample in scrape.samples {
        let name = sample.metric.replace(COLON, ":");
        let labels: BTreeMap<String, String> =
            sample.labels.iter().map(|(k, v)| (k.clone(), canonical_label(k, v))).collect();
        let with = |extra: (&str, f64)| {
            let mut labels = labels.clone();
            labels.insert(extra.0.to_owned(), format!("{:?}", extra.1));
            labels.into_iter().collect::<Vec<_>>()
        };
        match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => {
                flat.push((name, labels.clone().into_iter().collect(), value_bits(v)));
            }
            prometheus_parse::Value::Histogram(buckets) => {
                for bucket in buckets {
                    flat.push((
                        format!("{name}_bucket"),
                        with(("le", bucket.less_than)),
                        value_bits(bucket.count),
                    ));
                }
            }
            prometheus_parse::Value::Summary(quantiles) => {
                for quantile in quantiles {
                    flat.push((
                        name.clone(),
                        with(("quantile", quantile.quantile)),
                        value_bits(quantile.count),
                    ));
                }
            }
        }
    }
    flat.sort();
    flat
}

/// Parses `page` fully and checks it against `prometheus-parse`; returns the sample count.
fn cross_check(page: &str, max_unrepresentable: usize) -> usize {
    let mut ours = Vec::new();
    let mut skipped_lines = Vec::new();
    let mut line_of_sample = 0;
    for (line_number, line) in page.lines().enumerate() {
        // Line numbers of samples, so unrepresentable ones can be left out of the reference.
        let records: Vec<_> = metrics_model::text::parse(line)
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("line {}: {e}", line_number + 1));
        for record in records {
            if let Record::Sample(sample) = record {
                line_of_sample += 1;
                if reference_can_represent(&sample) {
                    ours.push(flatten_ours(&sample));
                } else {
                    skipped_lines.push(line_number + 1);
                }
            }
        }
    }
    assert!(skipped_lines.len() <= max_unrepresentable, "skipped {skipped_lines:?}");

    // The streaming parser over the whole page sees the same samples as the line-wise walk.
    let whole: Vec<_> = metrics_model::text::parse(page)
        .samples()
        .collect::<Result<Vec<_>, _>>()
        .expect("page parses");
    assert_eq!(whole.len(), line_of_sample);

    ours.sort();
    let reference = flatten_reference(&reference_input(page, &skipped_lines));
    assert_eq!(ours.len(), reference.len(), "sample counts differ");
    for (mine, theirs) in ours.iter().zip(&reference) {
        assert_eq!(mine, theirs);
    }
    whole.len()
}

#[test]
fn vllm_page_agrees_with_prometheus_parse() {
    let samples = cross_check(VLLM, 1);
    assert!(samples > 600, "a realistic page: {samples} samples");
}

#[test]
fn sglang_page_agrees_with_prometheus_parse() {
    assert!(cross_check(SGLANG, 0) > 400);
}

#[test]
fn trtllm_page_agrees_with_prometheus_parse() {
    assert!(cross_check(TRTLLM, 0) > 300);
}

#[test]
fn special_values_and_timestamps_agree_with_prometheus_parse() {
    let page = "# TYPE a gauge\na{x=\"1\"} NaN 1700000000000\na{x=\"2\"} +Inf\na{x=\"3\"} -Inf 17\n\
                # TYPE b summary\nb{quantile=\"0.5\"} 3 1700000000001\nb{quantile=\"0.99\"} 1e-3\n\
                b_sum 7\nb_count 2\nc 0.1\n";
    cross_check(page, 0);
    let ours: Vec<_> =
        metrics_model::text::parse(page).samples().collect::<Result<_, _>>().expect("valid");
    let scrape = prometheus_parse::Scrape::parse(page.lines().map(|l| Ok(l.to_owned())))
        .expect("reference parse");
    let reference_a1 = scrape
        .samples
        .iter()
        .find(|s| s.metric == "a" && s.labels.get("x") == Some("1"))
        .expect("a{x=1}");
    assert_eq!(ours[0].timestamp, Some(reference_a1.timestamp.timestamp_millis() as f64));
}

#[test]
fn mappings_read_each_page() {
    let at = Instant::now();
    let vllm = Engine::Vllm.mapping().extract(VLLM, at).expect("vllm page maps");
    assert_eq!((vllm.waiting_queue, vllm.running, vllm.kv_usage), (6, 21, 0.5873));
    assert_eq!(vllm.active_lora_adapters, [Arc::from("sql-lora"), Arc::from("chat-lora")]);
    assert_eq!(vllm.waiting_lora_adapters, [Arc::from("tool-lora")]);
    assert_eq!(vllm.max_lora_adapters, 4);
    assert_eq!(vllm.kv_capacity_blocks, Some(27153));
    assert_eq!(vllm.updated_at, Some(at));

    let sglang = Engine::Sglang.mapping().extract(SGLANG, at).expect("sglang page maps");
    assert_eq!((sglang.waiting_queue, sglang.running, sglang.kv_usage), (12, 58, 0.61));
    assert!(sglang.active_lora_adapters.is_empty());

    let trtllm = Engine::TrtLlm.mapping().extract(TRTLLM, at).expect("trtllm page maps");
    assert_eq!((trtllm.waiting_queue, trtllm.running, trtllm.kv_usage), (4, 24, 0.71));

    // A page read with another engine's mapping lacks its metrics: a failed scrape, not zeros.
    assert!(Engine::Sglang.mapping().extract(VLLM, at).is_err());
}

#[test]
fn a_custom_mapping_selects_one_model_on_the_trtllm_page() {
    let mapping = metrics_model::MetricMapping::from_flag_specs(&metrics_model::FlagSpecs {
        total_queued_requests: "trtllm_num_requests_waiting{model_name=\"nvidia/Llama-3.1-8B-Instruct-FP8\"}",
        total_running_requests: "trtllm_num_requests_running{model_name=nvidia/Llama-3.1-8B-Instruct-FP8}",
        kv_cache_usage_percentage: "trtllm_kv_cache_utilization{model_name=\"nvidia/Llama-3.1-8B-Instruct-FP8\"}",
        ..Default::default()
    })
    .expect("valid specs");
    let metrics = mapping.extract(TRTLLM, Instant::now()).expect("maps");
    assert_eq!((metrics.waiting_queue, metrics.running, metrics.kv_usage), (1, 16, 0.33));
}

#[test]
fn the_mapping_filter_materialises_only_what_it_reads() {
    let filter = Engine::Vllm.mapping().filter();
    let names: Vec<_> = metrics_model::text::parse(VLLM)
        .with_filter(filter)
        .samples()
        .map(|s| s.map(|s| s.name))
        .collect::<Result<_, _>>()
        .expect("valid");
    assert_eq!(names.len(), 2 + 2 + 2 + 3 + 1, "{names:?}");
}
