//! Cost of one request through the flow controller, over 1, 10 and 1,000 flows:
//! - `enqueue_then_dispatch`: enqueue behind a saturated pool, then free one slot and release,
//!   against a steady backlog of 4 requests per flow (tickets are held until well after their
//!   dispatch, so dropping them cancels nothing);
//! - `queue_idle`: the same with an empty backlog, so each request opens and closes its flow;
//! - `admitted_on_arrival`: room available, admitted on enqueue.

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use scheduler_core::PoolSnapshot;
use scheduler_core::flow::{
    BandConfig, FairnessPolicy, FlowControlConfig, FlowController, FlowMetrics, FlowRequest,
    NeverSaturated, PermitDetector, Ticket,
};

const FLOW_COUNTS: [usize; 3] = [1, 10, 1_000];
/// Requests queued per flow before measuring, so dispatch works against a real backlog.
const BACKLOG_PER_FLOW: usize = 4;

fn flow_names(count: usize) -> Vec<String> {
    (0..count).map(|index| format!("tenant-{index}")).collect()
}

fn request(flow_id: &str) -> FlowRequest<'_> {
    FlowRequest { priority: 0, flow_id, size_bytes: 1_024, ttl: None, slo_ttft: None }
}

fn queued_then_dispatched(c: &mut Criterion) {
    let mut group = c.benchmark_group("flow_control/enqueue_then_dispatch");
    group.throughput(Throughput::Elements(1));
    for fairness in [FairnessPolicy::RoundRobin, FairnessPolicy::GlobalStrict] {
        for flows in FLOW_COUNTS {
            let config = FlowControlConfig {
                default_band: BandConfig { fairness: fairness.clone(), ..BandConfig::default() },
                ..FlowControlConfig::default()
            };
            let permits = Arc::new(PermitDetector::new(0));
            let controller =
                FlowController::new(config, permits.clone(), Arc::new(FlowMetrics::new()));
            let pool = PoolSnapshot::default();
            let now = Instant::now();
            let names = flow_names(flows);
            let backlog_len = flows * BACKLOG_PER_FLOW;
            let mut held: VecDeque<Ticket> = (0..backlog_len)
                .map(|index| controller.enqueue(request(&names[index % flows]), &pool, now))
                .collect();
            let mut next = 0usize;
            let label = format!("{fairness:?}");
            group.bench_function(BenchmarkId::new(label, flows), |b| {
                b.iter(|| {
                    let ticket = controller.enqueue(request(&names[next % flows]), &pool, now);
                    next = next.wrapping_add(1);
                    permits.adjust(1);
                    let report = controller.release(&pool, now);
                    held.push_back(ticket);
                    // Twice the backlog back, the request was dispatched long ago.
                    if held.len() > 2 * backlog_len {
                        drop(held.pop_front());
                    }
                    black_box(report)
                });
            });
            assert_eq!(controller.queued_requests(), backlog_len as u64, "backlog held steady");
            drop(held);
        }
    }
    group.finish();
}

fn queue_idle(c: &mut Criterion) {
    let mut group = c.benchmark_group("flow_control/queue_idle");
    group.throughput(Throughput::Elements(1));
    for flows in FLOW_COUNTS {
        let permits = Arc::new(PermitDetector::new(0));
        let controller = FlowController::new(
            FlowControlConfig::default(),
            permits.clone(),
            Arc::new(FlowMetrics::new()),
        );
        let pool = PoolSnapshot::default();
        let now = Instant::now();
        let names = flow_names(flows);
        let mut next = 0usize;
        group.bench_function(BenchmarkId::from_parameter(flows), |b| {
            b.iter(|| {
                let ticket = controller.enqueue(request(&names[next % flows]), &pool, now);
                next = next.wrapping_add(1);
                permits.adjust(1);
                controller.release(&pool, now);
                black_box(ticket)
            });
        });
    }
    group.finish();
}

fn admitted_on_arrival(c: &mut Criterion) {
    let mut group = c.benchmark_group("flow_control/admitted_on_arrival");
    group.throughput(Throughput::Elements(1));
    for flows in FLOW_COUNTS {
        let controller = FlowController::new(
            FlowControlConfig::default(),
            Arc::new(NeverSaturated),
            Arc::new(FlowMetrics::new()),
        );
        let pool = PoolSnapshot::default();
        let now = Instant::now();
        let names = flow_names(flows);
        let mut next = 0usize;
        group.bench_function(BenchmarkId::from_parameter(flows), |b| {
            b.iter(|| {
                let ticket = controller.enqueue(request(&names[next % flows]), &pool, now);
                next = next.wrapping_add(1);
                black_box(ticket)
            });
        });
    }
    group.finish();
}

criterion_group!(benches, queued_then_dispatched, queue_idle, admitted_on_arrival);
criterion_main!(benches);
