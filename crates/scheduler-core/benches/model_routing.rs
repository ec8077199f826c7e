//! Cost of model routing on the request path:
//! - `route/*`: choosing a rewrite target (an exact rule with a 90/10 split, the same with a
//!   sticky header, and a model no rule names, among 100 objects of rules);
//! - `find_model/*`: reading only the body's `model` (what a body-based router needs) against
//!   `ParsedBody::parse` (what the picker needs), on 16 KB and 220 KB chat bodies;
//! - `rewrite_body/*`: writing a new model into those bodies.

#[path = "support/bodies.rs"]
mod bodies;

use std::hint::black_box;

use bodies::chat_body;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use scheduler_core::rewrite::ModelRewrites;
use scheduler_core::{InferenceRequest, ParsedBody, model_field};

/// 100 rewrite objects: `model-{i}` split 90/10 between two versions, plus a catch-all-free
/// pool so unknown models pass through.
fn rewrites() -> ModelRewrites {
    let mut yaml = String::new();
    for index in 0..100 {
        yaml.push_str(&format!(
            "---\nkind: InferenceModelRewrite\nmetadata: {{name: r{index}}}\nspec:\n  rules:\n  - matches: [{{model: {{value: model-{index}}}}}]\n    targets:\n    - {{modelRewrite: model-{index}-v1, weight: 90}}\n    - {{modelRewrite: model-{index}-v2, weight: 10}}\n"
        ));
    }
    ModelRewrites::from_yaml(&yaml).unwrap().with_seed(1).with_sticky_header("x-session-id")
}

fn route(c: &mut Criterion) {
    let rewrites = rewrites();
    let mut group = c.benchmark_group("route");
    let split = InferenceRequest::new("model-42", "");
    group.bench_function("split", |b| b.iter(|| rewrites.route_request(black_box(&split))));
    let sticky = InferenceRequest::new("model-42", "").with_header("x-session-id", "user-1234");
    group.bench_function("sticky", |b| b.iter(|| rewrites.route_request(black_box(&sticky))));
    let unknown = InferenceRequest::new("llama", "");
    group.bench_function("unknown", |b| b.iter(|| rewrites.route_request(black_box(&unknown))));
    group.finish();
}

fn bodies() -> Vec<(&'static str, Vec<u8>)> {
    vec![("chat_16k", chat_body(16_000)), ("chat_220k", chat_body(220_000))]
}

fn find_model(c: &mut Criterion) {
    let mut group = c.benchmark_group("find_model");
    for (name, body) in bodies() {
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new("scan", name), &body, |b, body| {
            b.iter(|| model_field::find_model(black_box(body)).unwrap().unwrap().span.len())
        });
        group.bench_with_input(BenchmarkId::new("full_parse", name), &body, |b, body| {
            b.iter(|| {
                ParsedBody::parse(Some("/v1/chat/completions"), black_box(body))
                    .unwrap()
                    .model
                    .len()
            })
        });
    }
    group.finish();
}

fn rewrite_body(c: &mut Criterion) {
    let mut group = c.benchmark_group("rewrite_body");
    for (name, body) in bodies() {
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), &body, |b, body| {
            b.iter(|| model_field::rewrite_model(black_box(body), "llama-v2").unwrap().unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, route, find_model, rewrite_body);
criterion_main!(benches);
