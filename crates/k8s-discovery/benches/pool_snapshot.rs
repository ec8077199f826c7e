//! What one change costs the watch loop in a large pool: reading a pod as it arrives, and
//! rebuilding the endpoint list of 1,000 pods with two ranks each (done on every change).

use criterion::{Criterion, criterion_group, criterion_main};
use k8s_discovery::{PodView, PoolSpec};
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;

fn pod(index: usize) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": format!("vllm-{index}"),
                     "labels": {"app": "vllm", "llm-d.ai/role": "decode", "pod-template-hash": "5d8f9c7b6"},
                     "annotations": {"llm-d.ai/active-ports": "8000,8001"}},
        "status": {"podIP": format!("10.1.{}.{}", index / 250, index % 250 + 1),
                   "conditions": [{"type": "Ready", "status": "True"}]}
    }))
    .unwrap()
}

fn bench(c: &mut Criterion) {
    let spec = PoolSpec::from_spec(&json!({
        "selector": {"matchLabels": {"app": "vllm"}},
        "targetPorts": [{"number": 8000}, {"number": 8001}],
    }))
    .unwrap();
    let pods: Vec<Pod> = (0..1000).map(pod).collect();
    let views: Vec<PodView> = pods.iter().map(PodView::of).collect();
    c.bench_function("read one pod event", |b| {
        b.iter(|| PodView::of(std::hint::black_box(&pods[17])))
    });
    c.bench_function("rebuild 1000 pods x 2 ranks", |b| {
        b.iter(|| {
            let mut endpoints = Vec::with_capacity(2000);
            for view in &views {
                view.endpoints(&spec, &mut endpoints);
            }
            endpoints
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
