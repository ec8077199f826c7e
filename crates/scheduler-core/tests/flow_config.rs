//! Parsing of the `saturationDetector` and `flowControl` sections, and admission built from a
//! whole `EndpointPickerConfig`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use scheduler_core::flow::{
    AdmissionMode, BandConfig, DetectorConfig, FairnessPolicy, FlowConfigError, FlowControl,
    FlowControlConfig, FlowMetrics, InferenceObjectiveConfig, ObjectiveResolver, OrderingPolicy,
    Rejection, UtilizationThresholds,
};
use scheduler_core::{
    Endpoint, EndpointMetrics, EndpointPickerConfig, EndpointState, InferenceRequest, PoolSnapshot,
};

fn config(yaml_tail: &str) -> EndpointPickerConfig {
    let yaml = format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n{yaml_tail}"
    );
    EndpointPickerConfig::from_yaml(&yaml).expect("valid EndpointPickerConfig")
}

fn detector(yaml_tail: &str) -> Result<DetectorConfig, FlowConfigError> {
    DetectorConfig::from_endpoint_picker_config(&config(yaml_tail))
}

fn flow(yaml_tail: &str) -> Result<FlowControlConfig, FlowConfigError> {
    FlowControlConfig::from_value(config(yaml_tail).flow_control.as_ref())
}

fn error_text(result: Result<impl std::fmt::Debug, FlowConfigError>) -> String {
    result.expect_err("must be refused").to_string()
}

#[test]
fn saturation_thresholds_with_go_durations_and_milliseconds() {
    let parsed = detector(
        "saturationDetector:\n  queueDepthThreshold: 8\n  kvCacheUtilThreshold: 0.9\n  metricsStalenessThreshold: 2s\n",
    );
    assert_eq!(
        parsed,
        Ok(DetectorConfig::Utilization(UtilizationThresholds {
            queue_depth: 8,
            kv_cache_util: 0.9,
            metrics_staleness: Duration::from_secs(2),
        }))
    );
    let millis = detector("saturationDetector: {metricsStalenessThreshold: 150}\n");
    assert_eq!(
        millis,
        Ok(DetectorConfig::Utilization(UtilizationThresholds {
            metrics_staleness: Duration::from_millis(150),
            ..UtilizationThresholds::default()
        }))
    );
    assert_eq!(detector(""), Ok(DetectorConfig::default()));
    assert_eq!(detector("saturationDetector: {}\n"), Ok(DetectorConfig::default()));
    assert_eq!(detector("saturationDetector:\n"), Ok(DetectorConfig::default()));
}

#[test]
fn saturation_errors_name_the_field() {
    assert_eq!(
        error_text(detector("saturationDetector: {queueDepth: 3}\n")),
        "saturationDetector: unknown key 'queueDepth' (accepted: queueDepthThreshold, kvCacheUtilThreshold, metricsStalenessThreshold, pluginRef)"
    );
    assert_eq!(
        error_text(detector("saturationDetector: {kvCacheUtilThreshold: 1.5}\n")),
        "saturationDetector.kvCacheUtilThreshold: 1.5 is not a number in (0, 1]"
    );
    assert_eq!(
        error_text(detector("saturationDetector: {queueDepthThreshold: -1}\n")),
        "saturationDetector.queueDepthThreshold: -1 is not an integer in range"
    );
    assert_eq!(
        error_text(detector("saturationDetector: {metricsStalenessThreshold: 2 seconds}\n")),
        "saturationDetector.metricsStalenessThreshold: '2 seconds' is not a duration (expected e.g. \"200ms\", \"2s\", \"1m30s\")"
    );
    assert_eq!(
        error_text(detector("saturationDetector: [1]\n")),
        "saturationDetector: expected a map, found a list"
    );
}

#[test]
fn detector_plugin_refs() {
    let concurrency =
        "plugins:\n- type: concurrency-detector\n  name: cd\n  parameters: {maxConcurrency: 4}\n";
    assert_eq!(
        detector(&format!("{concurrency}flowControl:\n  saturationDetector: {{pluginRef: cd}}\n")),
        Ok(DetectorConfig::Concurrency { max_concurrency: 4 })
    );
    assert_eq!(
        detector(&format!("{concurrency}saturationDetector: {{pluginRef: cd}}\n")),
        Ok(DetectorConfig::Concurrency { max_concurrency: 4 })
    );
    let utilization =
        "plugins:\n- type: utilization-detector\n  parameters: {queueDepthThreshold: 2}\n";
    assert_eq!(
        detector(&format!(
            "{utilization}saturationDetector: {{pluginRef: utilization-detector}}\n"
        )),
        Ok(DetectorConfig::Utilization(UtilizationThresholds {
            queue_depth: 2,
            ..UtilizationThresholds::default()
        }))
    );
    assert_eq!(
        error_text(detector("saturationDetector: {pluginRef: nope}\n")),
        "saturationDetector.pluginRef: 'nope' names no declared plugin"
    );
    assert_eq!(
        error_text(detector(
            "plugins:\n- type: queue-scorer\nsaturationDetector: {pluginRef: queue-scorer}\n"
        )),
        "saturationDetector.pluginRef: 'queue-scorer' has type 'queue-scorer', not a saturation detector (known: utilization-detector, concurrency-detector)"
    );
    assert_eq!(
        error_text(detector(
            "plugins:\n- type: concurrency-detector\n  parameters: {maxConcurency: 4}\nsaturationDetector: {pluginRef: concurrency-detector}\n"
        )),
        "plugins[0].parameters: unknown key 'maxConcurency' (accepted: maxConcurrency)"
    );
    assert_eq!(
        error_text(detector("saturationDetector: {pluginRef: x, queueDepthThreshold: 3}\n")),
        "saturationDetector.queueDepthThreshold: thresholds belong in the parameters of the plugin named by pluginRef"
    );
}

#[test]
fn flow_control_section_in_full() {
    let parsed = flow(
        r#"flowControl:
  maxRequests: 1k
  maxBytes: "2Gi"
  defaultRequestTTL: 30s
  defaultPriorityBand: {maxRequests: 500, fairnessPolicyRef: round-robin-fairness-policy}
  priorityBands:
  - {priority: 10, maxRequests: "300", maxBytes: 0, defaultRequestTTL: 1500ms}
  - priority: -1
    orderingPolicyRef: edf-ordering-policy
    fairnessPolicyRef: global-strict-fairness-policy
"#,
    )
    .expect("valid flowControl");
    assert_eq!(parsed.max_requests, Some(1000));
    assert_eq!(parsed.max_bytes, Some(2 << 30));
    assert_eq!(parsed.default_request_ttl, Duration::from_secs(30));
    assert_eq!(
        parsed.default_band,
        BandConfig {
            max_requests: Some(500),
            fairness: FairnessPolicy::RoundRobin,
            ..BandConfig::default()
        }
    );
    assert_eq!(
        parsed.bands,
        [
            BandConfig {
                priority: 10,
                max_requests: Some(300),
                max_bytes: None,
                default_request_ttl: Some(Duration::from_millis(1500)),
                ..BandConfig::default()
            },
            BandConfig { priority: -1, ordering: OrderingPolicy::Edf, ..BandConfig::default() },
        ]
    );
    assert_eq!(parsed.band_for(7).max_requests, Some(500), "unlisted priorities use the template");
    assert_eq!(parsed.band_for(7).priority, 7);
    assert_eq!(flow(""), Ok(FlowControlConfig::default()));
}

#[test]
fn flow_control_errors_name_the_key() {
    assert_eq!(
        error_text(flow("flowControl: {maxQueue: 3}\n")),
        "flowControl: unknown key 'maxQueue' (accepted: maxRequests, maxBytes, defaultRequestTTL, defaultPriorityBand, priorityBands, saturationDetector)"
    );
    assert_eq!(
        error_text(flow(
            "flowControl:\n  priorityBands:\n  - {priority: 1}\n  - {priority: 2, maxBytess: 1}\n"
        )),
        "flowControl.priorityBands[1]: unknown key 'maxBytess' (accepted: priority, maxRequests, maxBytes, defaultRequestTTL, fairnessPolicyRef, orderingPolicyRef)"
    );
    assert_eq!(
        error_text(flow("flowControl:\n  priorityBands:\n  - {maxRequests: 1}\n")),
        "flowControl.priorityBands[0]: missing required key 'priority'"
    );
    assert_eq!(
        error_text(flow("flowControl:\n  priorityBands:\n  - {priority: 1}\n  - {priority: 1}\n")),
        "flowControl.priorityBands[1].priority: priority 1 already has a band"
    );
    assert_eq!(
        error_text(flow("flowControl: {defaultPriorityBand: {fairnessPolicyRef: lottery}}\n")),
        "flowControl.defaultPriorityBand.fairnessPolicyRef: unknown fairness policy 'lottery' (known: global-strict-fairness-policy, round-robin-fairness-policy)"
    );
    assert_eq!(
        error_text(flow("flowControl: {maxBytes: 1XB}\n")),
        "flowControl.maxBytes: '1XB' is not a quantity (expected e.g. 100, \"2k\", \"1Gi\")"
    );
    assert_eq!(
        error_text(flow("flowControl: {defaultRequestTTL: -5s}\n")),
        "flowControl.defaultRequestTTL: '-5s' is not a duration (expected e.g. \"200ms\", \"2s\", \"1m30s\")"
    );
    assert_eq!(
        error_text(flow("flowControl: {priorityBands: {priority: 1}}\n")),
        "flowControl.priorityBands: expected a list, found a map"
    );
    assert_eq!(
        error_text(flow("flowControl: {saturationDetector: {name: x}}\n")),
        "flowControl.saturationDetector: unknown key 'name' (accepted: pluginRef)"
    );
}

fn saturated_pool(now: Instant) -> PoolSnapshot {
    let metrics =
        EndpointMetrics { waiting_queue: 50, updated_at: Some(now), ..Default::default() };
    PoolSnapshot::new([
        EndpointState::new(Endpoint::new(([10, 0, 0, 1], 8000).into())).with_metrics(metrics)
    ])
}

fn objectives() -> ObjectiveResolver {
    ObjectiveResolver::new(
        [
            InferenceObjectiveConfig { name: "batch".into(), priority: -1 },
            InferenceObjectiveConfig { name: "chat".into(), priority: 2 },
        ],
        Arc::new(FlowMetrics::new()),
    )
    .expect("valid objectives")
}

fn request(objective: &str) -> InferenceRequest {
    let mut request = InferenceRequest::new("m", "p");
    request.objective = Some(objective.to_owned());
    request
}

#[test]
fn without_the_gate_only_sheddable_requests_are_shed() {
    let flow_control =
        FlowControl::from_config(&config(""), objectives()).expect("valid admission config");
    assert!(matches!(flow_control.mode(), AdmissionMode::Shed(_)));
    let now = Instant::now();
    let pool = saturated_pool(now);
    let mut batch = request("batch");
    let shed = flow_control.submit(&mut batch, 10, &pool, now);
    assert_eq!(shed.try_outcome(), Some(Err(Rejection::Shed { priority: -1 })));
    assert_eq!(Rejection::Shed { priority: -1 }.http_status(), 429);
    let mut chat = request("chat");
    assert!(matches!(flow_control.submit(&mut chat, 10, &pool, now).try_outcome(), Some(Ok(_))));
    assert_eq!(chat.priority, 2);
    let mut unknown = request("mystery");
    assert!(matches!(flow_control.submit(&mut unknown, 10, &pool, now).try_outcome(), Some(Ok(_))));
    assert_eq!(flow_control.objectives().metrics().unknown_objectives(), 1);
    let healthy = PoolSnapshot::new([EndpointState::new(Endpoint::new(([10, 0, 0, 1], 1).into()))
        .with_metrics(EndpointMetrics { updated_at: Some(now), ..Default::default() })]);
    let mut batch = request("batch");
    assert!(matches!(
        flow_control.submit(&mut batch, 10, &healthy, now).try_outcome(),
        Some(Ok(_))
    ));
}

#[test]
fn with_the_gate_requests_queue_until_saturation_lifts() {
    let flow_control = FlowControl::from_config(
        &config("featureGates: [flowControl]\nflowControl: {defaultRequestTTL: 1s}\n"),
        objectives(),
    )
    .expect("valid admission config");
    assert!(flow_control.controller().is_some());
    let now = Instant::now();
    let mut batch = request("batch");
    let ticket = flow_control.submit(&mut batch, 10, &saturated_pool(now), now);
    assert!(ticket.try_outcome().is_none(), "queued, not shed, with flow control on");
    let later = now + Duration::from_millis(100);
    let healthy = PoolSnapshot::new([EndpointState::new(Endpoint::new(([10, 0, 0, 1], 1).into()))
        .with_metrics(EndpointMetrics { updated_at: Some(later), ..Default::default() })]);
    assert_eq!(flow_control.tick(&healthy, later).admitted, 1);
    assert!(matches!(ticket.try_outcome(), Some(Ok(_))));
}

#[test]
fn concurrency_detector_from_config_is_exposed_for_hooks() {
    let flow_control = FlowControl::from_config(
        &config(
            "plugins:\n- type: concurrency-detector\n  parameters: {maxConcurrency: 1}\nsaturationDetector: {pluginRef: concurrency-detector}\n",
        ),
        objectives(),
    )
    .expect("valid admission config");
    let detector = flow_control.concurrency_detector().expect("a concurrency detector");
    assert_eq!(detector.max_concurrency(), 1);
}
