//! Admission through the C API: sheddable requests are refused with 429 on a saturated pool,
//! and with the `flowControl` gate a request waits in `epp_schedule` until room frees or its
//! TTL passes, with nothing but the waiting call itself driving flow control.

mod support;

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use epp_c_abi::{
    EPP_OUTCOME_COMPLETED, EppScheduler, EppStatus, epp_in_flight_count, epp_request_complete,
    epp_scheduler_new_with_objectives,
};
use support::{Picker, Scheduled, add_endpoint, last_error, schedule_request};

const BODY: &str = r#"{"model":"llama","messages":[{"role":"user","content":"Hello"}]}"#;
const OBJECTIVES: &str = "- name: batch\n  priority: -1\n- name: chat\n  priority: 2\n";

/// Utilization detector with a staleness window a slow machine cannot outlast mid-test.
const SHED_CONFIG: &str = "\
plugins:
- type: queue-scorer
- type: max-score-picker
  parameters: {maxNumOfEndpoints: 3}
saturationDetector: {queueDepthThreshold: 5, kvCacheUtilThreshold: 0.8, metricsStalenessThreshold: 1m}
";

/// One endpoint that holds one request at a time; queued requests may wait 30 s. The implied
/// default profile takes the scorer and the picker, and the detector as a filter (as in Go),
/// which passes every request flow control admits.
const QUEUE_CONFIG: &str = "\
featureGates: [flowControl]
plugins:
- type: concurrency-detector
  parameters: {maxConcurrency: 1}
- type: queue-scorer
- type: max-score-picker
saturationDetector: {pluginRef: concurrency-detector}
flowControl: {defaultRequestTTL: 30s}
";

fn schedule(epp: &EppScheduler, objective: Option<&str>) -> Scheduled {
    schedule_with_header(
        epp,
        objective.map(|objective| ("x-gateway-inference-objective", objective)),
    )
}

fn schedule_with_header(epp: &EppScheduler, extra: Option<(&'static str, &str)>) -> Scheduled {
    schedule_request(epp, BODY, extra.as_slice())
}

fn complete(epp: &EppScheduler, token: u64) {
    // SAFETY: live handle.
    let status = unsafe { epp_request_complete(epp, token, 1, 1, EPP_OUTCOME_COMPLETED) };
    assert_eq!(status, 0, "{}", last_error());
}

fn in_flight(epp: &EppScheduler) -> usize {
    // SAFETY: live handle.
    unsafe { epp_in_flight_count(epp) }
}

#[test]
fn a_sheddable_request_on_a_saturated_pool_is_refused_with_429() {
    let picker = Picker::new(SHED_CONFIG, Some(OBJECTIVES));
    let epp = picker.handle();
    add_endpoint(epp, "10.0.0.1:8000", 5, 0.1);
    add_endpoint(epp, "10.0.0.2:8000", 0, 0.8);

    let shed = schedule(epp, Some("batch"));
    assert_eq!(shed.status, EppStatus::NotAdmitted as i32, "{shed:?}");
    assert_eq!(shed.http, 429);
    assert_eq!(shed.token, 0);
    assert_eq!(shed.endpoints, "");
    assert_eq!(shed.error, "pool saturated: sheddable request (priority -1) shed");
    assert_eq!(in_flight(epp), 0);

    for objective in [Some("chat"), None, Some("unknown")] {
        let kept = schedule(epp, objective);
        assert_eq!(kept.status, 0, "{objective:?} is not sheddable: {kept:?}");
        assert_eq!((kept.http, kept.endpoints.split(',').count()), (200, 2));
        complete(epp, kept.token);
    }

    // Room on one endpoint is room in the pool.
    add_endpoint(epp, "10.0.0.2:8000", 0, 0.5);
    let admitted = schedule(epp, Some("batch"));
    assert_eq!(admitted.status, 0, "{admitted:?}");
    assert_eq!(admitted.endpoints, "10.0.0.2:8000,10.0.0.1:8000");
    complete(epp, admitted.token);
    assert_eq!(in_flight(epp), 0);
}

#[test]
fn kubernetes_objects_and_legacy_criticality_decide_what_is_shed() {
    // The body's model is `llama`: its legacy InferenceModel makes it sheddable unless the
    // request names an objective.
    let objectives = "\
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModel
metadata: {name: llama}
spec: {modelName: llama, criticality: Sheddable, poolRef: {name: pool}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: chat}
spec: {priority: 2}
";
    let picker = Picker::new(SHED_CONFIG, Some(objectives));
    let epp = picker.handle();
    add_endpoint(epp, "10.0.0.1:8000", 5, 0.1);

    let by_model = schedule(epp, None);
    assert_eq!(by_model.http, 429, "{by_model:?}");
    assert_eq!(by_model.error, "pool saturated: sheddable request (priority -1) shed");
    let by_header = schedule_with_header(epp, Some(("x-llm-d-inference-objective", "Sheddable")));
    assert_eq!(by_header.http, 429, "{by_header:?}");

    for header in
        [("x-llm-d-inference-objective", "chat"), ("x-gateway-inference-objective", "Critical")]
    {
        let kept = schedule_with_header(epp, Some(header));
        assert_eq!(kept.status, 0, "{header:?} wins over the model's criticality: {kept:?}");
        complete(epp, kept.token);
    }
    assert_eq!(in_flight(epp), 0);
}

#[test]
fn without_objectives_nothing_is_shed() {
    let picker = Picker::new(SHED_CONFIG, None);
    let epp = picker.handle();
    add_endpoint(epp, "10.0.0.1:8000", 50, 0.99);
    let scheduled = schedule(epp, Some("batch"));
    assert_eq!(scheduled.status, 0, "{scheduled:?}");
    complete(epp, scheduled.token);
}

#[test]
fn bad_objectives_are_an_invalid_config() {
    let objectives = "- name: batch\n  priorty: -1\n";
    // SAFETY: pointers and lengths describe live strings.
    let handle = unsafe {
        epp_scheduler_new_with_objectives(
            SHED_CONFIG.as_ptr().cast(),
            SHED_CONFIG.len(),
            objectives.as_ptr().cast(),
            objectives.len(),
        )
    };
    assert!(handle.is_null());
    assert!(last_error().contains("priorty"), "{}", last_error());
}

#[test]
fn a_queued_request_waits_until_the_request_ahead_completes() {
    let picker = Picker::new(QUEUE_CONFIG, None);
    let epp = picker.handle();
    add_endpoint(epp, "10.0.0.1:8000", 0, 0.0);

    let first = schedule(epp, None);
    assert_eq!(first.status, 0, "{first:?}");
    thread::scope(|scope| {
        let (done, finished) = mpsc::channel();
        scope.spawn(move || done.send(schedule(epp, None)).unwrap());
        assert!(
            finished.recv_timeout(Duration::from_millis(200)).is_err(),
            "the second request waits while the only endpoint is busy"
        );
        assert_eq!(in_flight(epp), 1);

        let completer = scope.spawn(|| complete(epp, first.token));
        completer.join().unwrap();
        let second = finished.recv_timeout(Duration::from_secs(10)).expect("admitted");
        assert_eq!(second.status, 0, "{second:?}");
        assert_eq!((second.http, second.endpoints.as_str()), (200, "10.0.0.1:8000"));
        assert_ne!(second.token, first.token);
        complete(epp, second.token);
    });
    assert_eq!(in_flight(epp), 0);
}

#[test]
fn a_queued_request_expires_at_its_ttl_with_nobody_else_calling_in() {
    let config = QUEUE_CONFIG.replace("defaultRequestTTL: 30s", "defaultRequestTTL: 50ms");
    let picker = Picker::new(&config, None);
    let epp = picker.handle();
    add_endpoint(epp, "10.0.0.1:8000", 0, 0.0);
    let first = schedule(epp, None);
    assert_eq!(first.status, 0, "{first:?}");

    let started = Instant::now();
    let expired = schedule(epp, None);
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_eq!(expired.status, EppStatus::NotAdmitted as i32, "{expired:?}");
    assert_eq!((expired.http, expired.token), (429, 0));
    assert!(expired.error.contains("expired"), "{}", expired.error);
    assert_eq!(in_flight(epp), 1);
    complete(epp, first.token);
}

#[test]
fn a_queued_request_goes_out_when_metrics_show_room() {
    let config = "\
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: max-score-picker
saturationDetector: {queueDepthThreshold: 5, metricsStalenessThreshold: 1m}
flowControl: {defaultRequestTTL: 30s}
";
    let picker = Picker::new(config, None);
    let epp = picker.handle();
    add_endpoint(epp, "10.0.0.1:8000", 9, 0.0);
    thread::scope(|scope| {
        let (done, finished) = mpsc::channel();
        scope.spawn(move || done.send(schedule(epp, None)).unwrap());
        assert!(
            finished.recv_timeout(Duration::from_millis(200)).is_err(),
            "queued while the pool is saturated"
        );
        // Only the metrics change: no request completes and no other call schedules.
        add_endpoint(epp, "10.0.0.1:8000", 1, 0.0);
        let admitted = finished.recv_timeout(Duration::from_secs(10)).expect("admitted");
        assert_eq!(admitted.status, 0, "{admitted:?}");
        complete(epp, admitted.token);
    });
}
