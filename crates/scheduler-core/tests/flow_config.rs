//! The `saturationDetector` and `flowControl` sections: typed parsing with errors that name the
//! field path, detector resolution through the plugin registry, and admission built from a
//! whole `EndpointPickerConfig`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use scheduler_core::ConstructedPlugins;
use scheduler_core::flow::{
    Admission, AdmissionMode, BandConfig, ConcurrencyDetector, ConcurrencyParameters,
    FairnessPolicy, FlowConfigError, FlowControlConfig, FlowMetrics, InferenceObjectiveConfig,
    LocalInFlight, NotAdmitted, ObjectiveResolver, OrderingPolicy, SaturationDetector,
    SaturationDetectorSection, UtilizationDetector, UtilizationThresholds, configured_detector,
};
use scheduler_core::{
    Candidates, CycleState, Endpoint, EndpointMetrics, EndpointPickerConfig, EndpointState,
    InferenceRequest, Picker, Plugin, PluginRegistry, PoolSnapshot,
};

const HEADER: &str =
    "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n";

fn parse(yaml_tail: &str) -> Result<EndpointPickerConfig, String> {
    EndpointPickerConfig::from_yaml(&format!("{HEADER}{yaml_tail}")).map_err(|e| e.to_string())
}

fn config(yaml_tail: &str) -> EndpointPickerConfig {
    parse(yaml_tail).expect("valid EndpointPickerConfig")
}

/// Why the document is refused, without the loader's common prefix.
fn error_text(yaml_tail: &str) -> String {
    let error = parse(yaml_tail).expect_err("must be refused");
    error
        .strip_prefix("config is not a valid EndpointPickerConfig: ")
        .unwrap_or_else(|| panic!("a syntax error: {error}"))
        .to_owned()
}

fn saturation(yaml_tail: &str) -> Option<SaturationDetectorSection> {
    config(yaml_tail).saturation_detector
}

fn flow(yaml_tail: &str) -> FlowControlConfig {
    config(yaml_tail).flow_control.unwrap_or_default()
}

/// Picks the first candidate, so configs in these tests can build a scheduler.
#[derive(Debug)]
struct First;

impl Picker for First {
    fn pick(&self, _: &mut CycleState, _: Candidates<'_>, _: &[f64], picked: &mut Vec<u32>) {
        picked.push(0);
    }
}

fn registry() -> PluginRegistry {
    let mut registry = PluginRegistry::new();
    registry.register("first-picker", |_| Ok(Plugin::picker(First)));
    registry.register("queue-scorer", |_| Ok(Plugin::default()));
    registry
}

fn plugins(config: &EndpointPickerConfig) -> ConstructedPlugins {
    config.construct_plugins(&registry()).expect("plugins construct")
}

fn detector(yaml_tail: &str) -> Result<Arc<dyn SaturationDetector>, FlowConfigError> {
    let config = config(yaml_tail);
    configured_detector(&config, &plugins(&config))
}

fn debug(detector: &dyn SaturationDetector) -> String {
    format!("{detector:?}")
}

#[test]
fn saturation_thresholds_with_go_durations_and_milliseconds() {
    let parsed = saturation(
        "saturationDetector:\n  queueDepthThreshold: 8\n  kvCacheUtilThreshold: 0.9\n  metricsStalenessThreshold: 2s\n",
    );
    let thresholds = UtilizationThresholds {
        queue_depth: 8,
        kv_cache_util: 0.9,
        metrics_staleness: Some(Duration::from_secs(2)),
    };
    assert_eq!(parsed, Some(SaturationDetectorSection::Thresholds(thresholds)));
    let millis = saturation("saturationDetector: {metricsStalenessThreshold: 150}\n");
    assert_eq!(
        millis,
        Some(SaturationDetectorSection::Thresholds(UtilizationThresholds {
            metrics_staleness: Some(Duration::from_millis(150)),
            ..UtilizationThresholds::default()
        }))
    );
    assert_eq!(saturation(""), None);
    assert_eq!(saturation("saturationDetector: {}\n"), Some(SaturationDetectorSection::default()));
    assert_eq!(saturation("saturationDetector:\n"), None);
    let default = debug(&UtilizationDetector::default());
    assert_eq!(debug(&*detector("").unwrap()), default);
    assert_eq!(debug(&*detector("saturationDetector: {}\n").unwrap()), default);
    assert_eq!(debug(&*detector("saturationDetector:\n").unwrap()), default);
    assert_eq!(
        debug(&*detector("saturationDetector: {queueDepthThreshold: 8, kvCacheUtilThreshold: 0.9, metricsStalenessThreshold: 2s}\n").unwrap()),
        debug(&UtilizationDetector::new(thresholds))
    );
}

#[test]
fn saturation_errors_name_the_field() {
    assert_eq!(
        error_text("saturationDetector: {queueDepth: 3}\n"),
        "saturationDetector.queueDepth: unknown field `queueDepth`, expected one of queueDepthThreshold, kvCacheUtilThreshold, metricsStalenessThreshold, pluginRef at line 3, column 22"
    );
    assert_eq!(
        error_text("saturationDetector: {kvCacheUtilThreshold: 1.5}\n"),
        "saturationDetector.kvCacheUtilThreshold: 1.5 is not a number in (0, 1] at line 3, column 44"
    );
    assert_eq!(
        error_text("saturationDetector: {kvCacheUtilThreshold: 0}\n"),
        "saturationDetector.kvCacheUtilThreshold: 0 is not a number in (0, 1] at line 3, column 44"
    );
    assert_eq!(
        error_text("saturationDetector: {queueDepthThreshold: -1}\n"),
        "saturationDetector.queueDepthThreshold: invalid u32 at line 3, column 43"
    );
    assert_eq!(
        error_text("saturationDetector: {metricsStalenessThreshold: 2 seconds}\n"),
        "saturationDetector.metricsStalenessThreshold: '2 seconds' is not a duration (expected e.g. \"200ms\", \"2s\", \"1m30s\") at line 3, column 49"
    );
    assert_eq!(
        error_text("saturationDetector: [1]\n"),
        "saturationDetector: expected mapping start at line 3, column 21"
    );
}

#[test]
fn detector_plugin_refs() {
    let concurrency =
        "plugins:\n- type: concurrency-detector\n  name: cd\n  parameters: {maxConcurrency: 4}\n";
    for tail in [
        format!("{concurrency}flowControl:\n  saturationDetector: {{pluginRef: cd}}\n"),
        format!("{concurrency}saturationDetector: {{pluginRef: cd}}\n"),
    ] {
        let config = config(&tail);
        let plugins = plugins(&config);
        let detector = configured_detector(&config, &plugins).expect("a detector");
        let expected = ConcurrencyParameters { max_concurrency: 4, ..Default::default() };
        let expected = ConcurrencyDetector::new(expected).expect("valid");
        expected.bind_source(Arc::new(LocalInFlight::default()));
        assert_eq!(debug(&*detector), debug(&expected));
        let role = plugins.get("cd").and_then(|cd| cd.plugin.saturation_detector.clone());
        assert!(Arc::ptr_eq(&detector, &role.expect("a detector role")), "the plugin's instance");
    }
    assert_eq!(
        config(&format!("{concurrency}saturationDetector: {{pluginRef: cd}}\n"))
            .saturation_detector,
        Some(SaturationDetectorSection::PluginRef("cd".to_owned()))
    );
    let utilization =
        "plugins:\n- type: utilization-detector\n  parameters: {queueDepthThreshold: 2}\n";
    assert_eq!(
        debug(
            &*detector(&format!(
                "{utilization}saturationDetector: {{pluginRef: utilization-detector}}\n"
            ))
            .unwrap()
        ),
        debug(&UtilizationDetector::new(UtilizationThresholds {
            queue_depth: 2,
            ..UtilizationThresholds::default()
        }))
    );
    assert_eq!(
        detector("saturationDetector: {pluginRef: nope}\n").unwrap_err().to_string(),
        "saturationDetector.pluginRef: 'nope' names no declared plugin"
    );
    assert_eq!(
        detector("plugins:\n- type: queue-scorer\nsaturationDetector: {pluginRef: queue-scorer}\n")
            .unwrap_err()
            .to_string(),
        "saturationDetector.pluginRef: 'queue-scorer' (type 'queue-scorer') is not a saturation detector"
    );
    let misspelt = config(
        "plugins:\n- type: concurrency-detector\n  parameters: {maxConcurency: 4}\nsaturationDetector: {pluginRef: concurrency-detector}\n",
    );
    assert_eq!(
        misspelt.construct_plugins(&registry()).unwrap_err().to_string(),
        "plugins[0] (name 'concurrency-detector', type 'concurrency-detector'): invalid parameters: maxConcurency: unknown field `maxConcurency`, expected one of `maxConcurrency`, `maxTokenConcurrency`, `headroom`, `concurrencyMode`, `inFlightLoadProducerName`"
    );
    assert_eq!(
        error_text("saturationDetector: {pluginRef: x, queueDepthThreshold: 3}\n"),
        "saturationDetector: queueDepthThreshold next to pluginRef: thresholds belong in the parameters of the plugin named by pluginRef at line 3, column 21"
    );
    assert_eq!(
        error_text("saturationDetector: {queueDepthThreshold: 3, pluginRef: x}\n"),
        "saturationDetector: queueDepthThreshold next to pluginRef: thresholds belong in the parameters of the plugin named by pluginRef at line 3, column 21"
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
    );
    assert_eq!(parsed.max_requests, Some(1000));
    assert_eq!(parsed.max_bytes, Some(2 << 30));
    assert_eq!(parsed.default_request_ttl, Duration::from_secs(30));
    assert_eq!(
        parsed.default_band,
        BandConfig {
            max_requests: Some(500),
            fairness: FairnessPolicy::RoundRobin,
            fairness_ref: Some("round-robin-fairness-policy".to_owned()),
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
            BandConfig {
                priority: -1,
                ordering: OrderingPolicy::Edf,
                ordering_ref: Some("edf-ordering-policy".to_owned()),
                fairness_ref: Some("global-strict-fairness-policy".to_owned()),
                ..BandConfig::default()
            },
        ]
    );
    assert_eq!(parsed.band_for(7).max_requests, Some(500), "unlisted priorities use the template");
    assert_eq!(parsed.band_for(7).priority, 7);
    assert_eq!(flow(""), FlowControlConfig::default());
    assert_eq!(config("flowControl:\n").flow_control, None, "null is the defaults");
    assert_eq!(flow("flowControl: {defaultPriorityBand: }\n"), FlowControlConfig::default());
    assert_eq!(
        flow("flowControl: {maxRequests: 0, maxBytes: 0Gi}\n"),
        FlowControlConfig::default()
    );
    assert_eq!(
        flow("flowControl: {defaultPriorityBand: {priority: 3}}\n").default_band.priority,
        3,
        "accepted, though the template's priority is always replaced"
    );
    assert_eq!(
        flow("flowControl: {defaultRequestTTL: 0}\n").default_request_ttl,
        Duration::ZERO,
        "no TTL"
    );
}

#[test]
fn flow_control_errors_name_the_key() {
    assert_eq!(
        error_text("flowControl: {maxQueue: 3}\n"),
        "flowControl.maxQueue: unknown field `maxQueue`, expected one of maxRequests, maxBytes, defaultRequestTTL, noEndpointRequestTTL, defaultPriorityBand, defaultNegativePriorityBand, priorityBands, usageLimitPolicyPluginRef, saturationDetector, enableEviction at line 3, column 15"
    );
    assert_eq!(
        error_text(
            "flowControl:\n  priorityBands:\n  - {priority: 1}\n  - {priority: 2, maxBytess: 1}\n"
        ),
        "flowControl.priorityBands[1].maxBytess: unknown field `maxBytess`, expected one of priority, maxRequests, maxBytes, defaultRequestTTL, fairnessPolicyRef, orderingPolicyRef at line 6, column 19"
    );
    assert_eq!(
        error_text("flowControl:\n  priorityBands:\n  - {maxRequests: 1}\n"),
        "flowControl.priorityBands[0]: missing field `priority` at line 5, column 5"
    );
    assert_eq!(
        error_text("flowControl:\n  priorityBands:\n  - {priority: 1}\n  - {priority: 1}\n"),
        "flowControl.priorityBands[1]: priority 1 already has a band at line 6, column 5"
    );
    assert_eq!(
        error_text("flowControl: {maxBytes: 1XB}\n"),
        "flowControl.maxBytes: '1XB' is not a quantity (expected e.g. 100, \"2k\", \"1Gi\") at line 3, column 25"
    );
    assert_eq!(
        error_text("flowControl: {maxRequests: -3}\n"),
        "flowControl.maxRequests: '-3' is not a non-negative quantity in range at line 3, column 28"
    );
    assert_eq!(
        error_text("flowControl: {defaultRequestTTL: -5s}\n"),
        "flowControl.defaultRequestTTL: '-5s' is not a duration (expected e.g. \"200ms\", \"2s\", \"1m30s\") at line 3, column 34"
    );
    assert_eq!(
        error_text("flowControl: {defaultRequestTTL: true}\n"),
        "flowControl.defaultRequestTTL: invalid type: boolean `true`, expected a duration such as \"200ms\" or a number of milliseconds at line 3, column 15"
    );
    assert_eq!(
        error_text("flowControl: {priorityBands: {priority: 1}}\n"),
        "flowControl.priorityBands: expected sequence start at line 3, column 30"
    );
    assert_eq!(
        error_text("flowControl: {saturationDetector: {name: x}}\n"),
        "flowControl.saturationDetector.name: unknown field `name`, expected one of pluginRef at line 3, column 36"
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

fn flow_control(config: &EndpointPickerConfig) -> Admission {
    Admission::from_config(config, &plugins(config), objectives()).expect("valid admission config")
}

#[test]
fn without_the_gate_only_sheddable_requests_are_shed() {
    let flow_control = flow_control(&config(""));
    assert!(matches!(flow_control.mode(), AdmissionMode::Shed(_)));
    let now = Instant::now();
    let pool = saturated_pool(now);
    let mut batch = request("batch");
    let shed = flow_control.submit(&mut batch, 10, &pool, now);
    assert_eq!(shed.try_outcome(), Some(Err(NotAdmitted::Shed { priority: -1 })));
    assert_eq!(NotAdmitted::Shed { priority: -1 }.http_status(), 429);
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
    let flow_control = flow_control(&config(
        "featureGates: [flowControl]\nflowControl: {defaultRequestTTL: 1s}\n",
    ));
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
fn the_concurrency_detector_counts_through_the_schedulers_hooks() {
    let config = config(
        "plugins:\n- type: concurrency-detector\n  parameters: {maxConcurrency: 1}\n- type: first-picker\nsaturationDetector: {pluginRef: concurrency-detector}\n",
    );
    let plugins = plugins(&config);
    let scheduler = config.build_with(&plugins, &registry()).expect("a scheduler");
    let detector = configured_detector(&config, &plugins).expect("a detector");
    let now = Instant::now();
    let pool = Arc::new(PoolSnapshot::new([EndpointState::new(Endpoint::new(
        ([10, 0, 0, 1], 8000).into(),
    ))]));
    assert!(!detector.is_saturated(&pool, now));
    let mut result = scheduler.schedule(&InferenceRequest::new("m", "p"), &pool).expect("a pick");
    assert!(detector.is_saturated(&pool, now), "the pre-request hook counted the request");
    drop(result.take_completion());
    assert!(!detector.is_saturated(&pool, now), "the completion hook released it");
}

#[test]
fn one_staleness_threshold_per_config() {
    use scheduler_core::flow::configured_metrics_staleness;
    let staleness = |tail: &str| configured_metrics_staleness(&config(tail));
    assert_eq!(staleness(""), Ok(None));
    assert_eq!(staleness("saturationDetector: {queueDepthThreshold: 3}\n"), Ok(None));
    assert_eq!(
        staleness("saturationDetector: {metricsStalenessThreshold: 500ms}\n"),
        Ok(Some(Duration::from_millis(500)))
    );
    let plugin = "plugins:\n- {name: util, type: utilization-detector, parameters: {metricsStalenessThreshold: 1s}}\n";
    assert_eq!(staleness(plugin), Ok(Some(Duration::from_secs(1))));
    let same = format!("{plugin}saturationDetector: {{metricsStalenessThreshold: 1000}}\n");
    assert_eq!(staleness(&same), Ok(Some(Duration::from_secs(1))));
    let differ = format!("{plugin}saturationDetector: {{metricsStalenessThreshold: 2s}}\n");
    assert_eq!(
        staleness(&differ).unwrap_err().to_string(),
        "metricsStalenessThreshold is 2s in saturationDetector but 1s in plugin 'util': one staleness threshold applies to the whole pool"
    );
}
