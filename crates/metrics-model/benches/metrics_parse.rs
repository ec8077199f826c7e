//! Parsing a realistic vLLM metrics page (about 800 lines): a full parse, the filtered parse a
//! mapping does, the whole mapping, and the `prometheus-parse` crate on the same page.
//!
//! `prometheus-parse` reads names with `\w+` and so skips every `vllm:`-prefixed line; it is
//! measured both on the page as served and on a copy with `:` replaced in names, where it
//! parses every sample like this crate does. The second is the fair comparison.

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use metrics_model::Engine;

const VLLM_PAGE: &str = include_str!("../tests/data/vllm.prom");

fn without_colons_in_names(page: &str) -> String {
    page.lines()
        .map(|line| {
            if line.starts_with('#') {
                line.replace("vllm:", "vllm_")
            } else {
                let name_end = line.find(['{', ' ']).unwrap_or(line.len());
                format!("{}{}", line[..name_end].replace(':', "_"), &line[name_end..])
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn full_parse(page: &str) -> f64 {
    let mut total = 0.0;
    for sample in metrics_model::text::parse(page).samples() {
        let sample = sample.expect("the page is valid");
        total += sample.value + sample.labels.len() as f64;
    }
    total
}

fn reference_parse(page: &str) -> usize {
    let lines = page.lines().map(|line| Ok(line.to_owned()));
    prometheus_parse::Scrape::parse(lines).expect("reference parse").samples.len()
}

fn bench_vllm_page(c: &mut Criterion) {
    let comparable_page = without_colons_in_names(VLLM_PAGE);
    let mapping = Engine::Vllm.mapping();
    let mut group = c.benchmark_group("vllm_page");
    group.throughput(Throughput::Bytes(VLLM_PAGE.len() as u64));

    group.bench_function("epp_full_parse", |b| b.iter(|| full_parse(black_box(VLLM_PAGE))));
    group.bench_function("epp_filtered_parse", |b| {
        b.iter(|| {
            metrics_model::text::parse(black_box(VLLM_PAGE))
                .with_filter(mapping.filter())
                .samples()
                .map(|s| s.map(|s| s.value).unwrap_or(0.0))
                .sum::<f64>()
        })
    });
    let scraped_at = Instant::now();
    group.bench_function("epp_extract_vllm", |b| {
        b.iter(|| mapping.extract(black_box(VLLM_PAGE), scraped_at).expect("maps"))
    });
    // What a scrape does: the page as received, never decoded as a whole.
    group.bench_function("epp_extract_vllm_received_bytes", |b| {
        b.iter(|| mapping.extract(black_box(VLLM_PAGE.as_bytes()), scraped_at).expect("maps"))
    });
    group.bench_function("epp_full_parse_no_colons", |b| {
        b.iter(|| full_parse(black_box(&comparable_page)))
    });
    group.bench_function("prometheus_parse_no_colons", |b| {
        b.iter(|| reference_parse(black_box(&comparable_page)))
    });
    group.bench_function("prometheus_parse_as_served", |b| {
        b.iter(|| reference_parse(black_box(VLLM_PAGE)))
    });
    group.finish();
}

criterion_group!(benches, bench_vllm_page);
criterion_main!(benches);
