//! `epp demo` end to end, small: every request completes, counts add up, and the picker keeps
//! at least round-robin's prefix-cache hit rate.

use ext_proc_adapter::demo::{self, DemoOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_demo_routes_every_request_and_keeps_prefixes_warm() {
    let options = DemoOptions {
        servers: 2,
        requests: 40,
        concurrency: 8,
        seed: 7,
        progress: false,
        ..DemoOptions::default()
    };
    let reports = demo::run(&options).await.unwrap();
    let table = demo::render(&reports);
    let [epp, round_robin] = reports.as_slice() else { panic!("two policies:\n{table}") };
    for report in [epp, round_robin] {
        assert_eq!((report.requests, report.completed, report.errors), (40, 40, 0), "{table}");
        assert_eq!(report.per_endpoint.len(), 2);
        assert_eq!(report.per_endpoint.iter().sum::<usize>(), 40, "{table}");
        assert!(report.prefix_hit_rate > 0.0, "{table}");
    }
    assert_eq!(round_robin.per_endpoint, vec![20, 20]);
    assert!(epp.prefix_hit_rate >= round_robin.prefix_hit_rate, "{table}");
    assert!(table.contains("epp/round-robin"), "{table}");
}
