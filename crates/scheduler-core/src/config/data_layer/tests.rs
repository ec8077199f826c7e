use super::plugins::{EngineConfig, MetricsSourceParameters, Scheme, SourceTls};
use super::*;

const HEAD: &str =
    "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n";

fn resolve(body: &str) -> Result<ResolvedDataLayer, ConfigError> {
    let config = EndpointPickerConfig::from_yaml(&format!("{HEAD}{body}"))?;
    let registry = PluginRegistry::new();
    let plugins = config.construct_plugins(&registry)?;
    config.data_layer(&plugins, &registry)
}

fn names(layer: &ResolvedDataLayer) -> Vec<(String, Vec<String>)> {
    layer
        .sources
        .iter()
        .map(|source| {
            let extractors = source.extractors.iter().map(|e| e.name.clone()).collect();
            (source.source.name.clone(), extractors)
        })
        .collect()
}

fn pair(source: &str, extractors: &[&str]) -> (String, Vec<String>) {
    (source.to_owned(), extractors.iter().map(|e| (*e).to_owned()).collect())
}

#[test]
fn no_section_injects_the_default_metrics_source() {
    let layer = resolve("plugins: []\n").unwrap();
    assert!(!layer.declared);
    assert_eq!(names(&layer), [pair(METRICS_DATA_SOURCE_TYPE, &[CORE_METRICS_EXTRACTOR_TYPE])]);
    let DataLayerPlugin::MetricsSource(parameters) = &*layer.sources[0].source.plugin else {
        panic!("not a metrics source: {layer:?}");
    };
    assert_eq!(
        *parameters,
        MetricsSourceParameters {
            scheme: Scheme::Http,
            path: "/metrics".into(),
            port: None,
            tls: SourceTls { insecure_skip_verify: true, ..SourceTls::default() },
            interval: None,
        },
        "the Go factory's defaults"
    );
}

#[test]
fn declared_sources_come_first_and_the_default_is_appended() {
    let layer = resolve(
        "plugins:
- type: models-data-source
  parameters: {path: /models, interval: 2s}
- type: models-data-extractor
- name: my-metrics
  type: metrics-data-source
  parameters: {path: /custom}
- type: core-metrics-extractor
dataLayer:
  sources:
  - pluginRef: models-data-source
    extractors: [{pluginRef: models-data-extractor}]
",
    )
    .unwrap();
    assert!(layer.declared);
    assert_eq!(
        names(&layer),
        [
            pair("models-data-source", &["models-data-extractor"]),
            // The declared extractor named after its type is reused, as Go looks it up by name.
            pair(METRICS_DATA_SOURCE_TYPE, &[CORE_METRICS_EXTRACTOR_TYPE]),
        ]
    );
    let DataLayerPlugin::ModelsSource(models) = &*layer.sources[0].source.plugin else {
        panic!("not a models source");
    };
    assert_eq!((models.path.as_str(), models.interval), ("/models", Some(Duration::from_secs(2))));
}

#[test]
fn a_listed_metrics_source_or_opting_out_injects_nothing() {
    let listed = resolve(
        "plugins:
- type: metrics-data-source
  parameters: {scheme: http, path: /stats, insecureSkipVerify: false}
- name: extract
  type: core-metrics-extractor
data:
  sources:
  - pluginRef: metrics-data-source
    extractors: [{pluginRef: extract}]
",
    )
    .unwrap();
    assert_eq!(names(&listed), [pair(METRICS_DATA_SOURCE_TYPE, &["extract"])]);
    let opted_out = resolve("plugins: []\ndataLayer: {injectDefaults: false}\n").unwrap();
    assert!(opted_out.sources.is_empty());
    assert!(opted_out.declared);
}

#[test]
fn unknown_keys_name_their_path() {
    let error =
        resolve("dataLayer:\n  sources:\n  - pluginRef: a\n    extractor: []\n").unwrap_err();
    let text = error.to_string();
    assert!(text.contains("dataLayer.sources[0].extractor: unknown field `extractor`"), "{text}");
    let error = resolve("dataLayer: {injectDefault: false}\n").unwrap_err().to_string();
    assert!(error.contains("dataLayer.injectDefault: unknown field `injectDefault`"), "{error}");
}

#[test]
fn references_must_be_declared_and_of_the_right_kind() {
    let dangling = resolve("dataLayer:\n  sources: [{pluginRef: nowhere}]\n").unwrap_err();
    assert_eq!(
        dangling.to_string(),
        "dataLayer.sources[0].pluginRef: 'nowhere' names no declared plugin"
    );
    let wrong = resolve(
        "plugins: [{type: concurrency-detector}, {type: core-metrics-extractor}]
dataLayer:
  sources: [{pluginRef: core-metrics-extractor}]
",
    )
    .unwrap_err();
    assert_eq!(
        wrong.to_string(),
        "dataLayer.sources[0].pluginRef: 'core-metrics-extractor' (type 'core-metrics-extractor') is not a data source"
    );
    let detector = resolve(
        "plugins: [{type: concurrency-detector}]
dataLayer:
  discovery: {pluginRef: concurrency-detector}
",
    )
    .unwrap_err();
    assert!(matches!(
        detector,
        ConfigError::DataLayerWrongKind { expected: "an endpoint discovery", .. }
    ));
    let mismatch = resolve(
        "plugins: [{type: models-data-source}, {type: core-metrics-extractor}]
dataLayer:
  sources:
  - pluginRef: models-data-source
    extractors: [{pluginRef: core-metrics-extractor}]
",
    )
    .unwrap_err();
    assert_eq!(
        mismatch.to_string(),
        "dataLayer.sources[0].extractors[0].pluginRef: extractor 'core-metrics-extractor' cannot read what source 'models-data-source' produces"
    );
    let peers = resolve("dataLayer: {peerDiscovery: {pluginRef: gossip}}\n").unwrap_err();
    assert_eq!(
        peers.to_string(),
        "dataLayer.peerDiscovery.pluginRef: 'gossip' names no declared plugin"
    );
}

#[test]
fn file_discovery_is_resolved() {
    let layer = resolve(
        "plugins:
- name: files
  type: file-discovery
  parameters: {path: /etc/epp/endpoints.yaml, watchFile: true}
dataLayer:
  discovery: {pluginRef: files}
",
    )
    .unwrap();
    let discovery = layer.discovery.unwrap();
    assert_eq!(discovery.name, "files");
    assert_eq!(
        *discovery.plugin,
        DataLayerPlugin::FileDiscovery(FileDiscoveryParameters {
            path: "/etc/epp/endpoints.yaml".into(),
            watch_file: true
        })
    );
}

fn plugin_error(type_name: &str, parameters: serde_json::Value) -> String {
    let spec = PluginSpec { parameters: Some(&parameters), ..PluginSpec::of_type(type_name) };
    PluginRegistry::new().create(&spec).unwrap_err().to_string()
}

#[test]
fn parameters_are_checked_as_the_go_factories_check_them() {
    use serde_json::json;
    let cases = [
        (METRICS_DATA_SOURCE_TYPE, json!({"scheme": "ftp"}), "scheme: unknown variant `ftp`"),
        (METRICS_DATA_SOURCE_TYPE, json!({"port": 0}), "port: 0 is not a port"),
        (METRICS_DATA_SOURCE_TYPE, json!({"path": "metrics"}), "must start with '/'"),
        (METRICS_DATA_SOURCE_TYPE, json!({"interval": "soon"}), "interval:"),
        (
            METRICS_DATA_SOURCE_TYPE,
            json!({"scheme": "https", "clientCertPath": "/c.pem"}),
            "clientCertPath and clientKeyPath must be set together",
        ),
        ("models-data-source", json!({"port": 8080}), "models-data-source has no port"),
        (FILE_DISCOVERY_TYPE, json!({"watchFile": true}), "path: the endpoints file is required"),
        (FILE_DISCOVERY_TYPE, json!({"path": "/e", "watch": true}), "unknown field `watch`"),
        ("models-data-extractor", json!({"x": 1}), "unknown field `x`"),
        ("endpoint-notification-source", json!({"x": 1}), "unknown field `x`"),
        (
            CORE_METRICS_EXTRACTOR_TYPE,
            json!({"defaultEngine": "mystery"}),
            "defaultEngine: \"mystery\" is neither in engineConfigs nor built in",
        ),
        (
            CORE_METRICS_EXTRACTOR_TYPE,
            json!({"engineConfigs": [{"name": "default"}]}),
            "engineConfigs[0].name: \"default\" is reserved",
        ),
        (
            CORE_METRICS_EXTRACTOR_TYPE,
            json!({"engineConfigs": [{"name": "a"}, {"name": "a"}]}),
            "engineConfigs[1].name: \"a\" is already configured by engineConfigs[0]",
        ),
        (
            CORE_METRICS_EXTRACTOR_TYPE,
            json!({"engineConfigs": [{"name": "a", "queueSpec": "q"}]}),
            "engineConfigs[0].queueSpec: unknown field `queueSpec`",
        ),
    ];
    for (type_name, parameters, expected) in cases {
        let error = plugin_error(type_name, parameters.clone());
        assert!(error.contains(expected), "{type_name} {parameters}: {error}");
    }
}

#[test]
fn a_custom_engine_can_be_the_default() {
    let parameters = serde_json::json!({
        "defaultEngine": "mine",
        "engineConfigs": [{
            "name": "mine",
            "queuedRequestsSpec": "my_waiting{tier=gold}",
            "runningRequestsSpec": "my_running",
            "kvUsageSpec": "my_kv",
            "customMetrics": [{"attributeKey": "depth", "metricSpec": "my_depth"}]
        }]
    });
    let spec = PluginSpec {
        parameters: Some(&parameters),
        ..PluginSpec::of_type(CORE_METRICS_EXTRACTOR_TYPE)
    };
    let plugin = PluginRegistry::new().create(&spec).unwrap();
    assert!(!plugin.is_profile_plugin(), "data-layer plugins stay out of profiles");
    let Some(DataLayerPlugin::CoreMetricsExtractor(parameters)) = plugin.data_layer.as_deref()
    else {
        panic!("not an extractor: {plugin:?}");
    };
    assert_eq!(parameters.engine_label_key, plugins::DEFAULT_ENGINE_LABEL_KEY);
    assert_eq!(
        parameters.engine_configs[0],
        EngineConfig {
            name: "mine".into(),
            queued_requests_spec: "my_waiting{tier=gold}".into(),
            running_requests_spec: "my_running".into(),
            kv_usage_spec: "my_kv".into(),
            custom_metrics: vec![plugins::CustomMetricConfig {
                attribute_key: "depth".into(),
                metric_spec: "my_depth".into()
            }],
            ..EngineConfig::default()
        }
    );
}

#[test]
fn data_layer_plugins_do_not_make_an_implied_profile() {
    let config = EndpointPickerConfig::from_yaml(&format!(
        "{HEAD}plugins: [{{type: metrics-data-source}}, {{type: core-metrics-extractor}}]\n"
    ))
    .unwrap();
    let mut registry = PluginRegistry::new();
    registry.register("max-score-picker", |_| Ok(crate::Plugin::picker(FirstCandidate)));
    let scheduler = config.build(&registry).expect("the implied profile");
    let profile = &scheduler.profiles()[0];
    assert_eq!((profile.filters().count(), profile.scorers().len()), (0, 0));
}

/// Picks the first candidate.
#[derive(Debug)]
struct FirstCandidate;

impl crate::scheduling::plugin::Picker for FirstCandidate {
    fn pick(
        &self,
        _: &mut crate::CycleState,
        _: crate::Candidates<'_>,
        _: &[f64],
        picked: &mut Vec<u32>,
    ) {
        picked.push(0);
    }
}

#[test]
fn building_refuses_a_broken_data_layer() {
    let config = EndpointPickerConfig::from_yaml(&format!(
        "{HEAD}dataLayer:\n  discovery: {{pluginRef: files}}\n"
    ))
    .unwrap();
    let error = config.build(&PluginRegistry::new()).unwrap_err();
    assert!(matches!(error, ConfigError::DataLayerDanglingRef { .. }), "{error}");
}

#[test]
fn the_gie_v14_extractor_feeds_the_injected_source() {
    let layer = resolve(
        "featureGates: [dataLayer]
plugins:
- name: model-server-protocol-metrics
  type: model-server-protocol-metrics
  parameters: {defaultEngine: sglang}
",
    )
    .unwrap();
    assert!(layer.declared, "the extractor's parameters are data-layer settings");
    assert_eq!(
        names(&layer),
        [pair(METRICS_DATA_SOURCE_TYPE, &[MODEL_SERVER_PROTOCOL_METRICS_TYPE])]
    );
    let DataLayerPlugin::CoreMetricsExtractor(parameters) = &*layer.sources[0].extractors[0].plugin
    else {
        panic!("not the engine-metrics extractor: {layer:?}");
    };
    assert_eq!(parameters.default_engine, "sglang");
    assert_eq!(parameters.engine_label_key, plugins::GIE_V14_ENGINE_LABEL_KEY);
}

#[test]
fn the_gie_v14_extractor_has_v14_parameters() {
    let parameters = serde_json::json!({
        "defaultEngine": "triton",
        "engineConfigs": [{
            "name": "triton",
            "queuedRequestsSpec": "nv_trt_llm_request_metrics{request_type=waiting}",
            "kvUsageSpec": "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}"
        }]
    });
    let spec = PluginSpec {
        parameters: Some(&parameters),
        ..PluginSpec::of_type(MODEL_SERVER_PROTOCOL_METRICS_TYPE)
    };
    let plugin = PluginRegistry::new().create(&spec).unwrap();
    let Some(DataLayerPlugin::CoreMetricsExtractor(parameters)) = plugin.data_layer.as_deref()
    else {
        panic!("not an extractor: {plugin:?}");
    };
    assert_eq!(parameters.engine_configs[0].running_requests_spec, "");
    let cases = [
        // v1.4 ships vllm and sglang only.
        (serde_json::json!({"defaultEngine": "triton"}), "defaultEngine"),
        // Later generations' fields are unknown to v1.4.
        (
            serde_json::json!({"engineConfigs": [{"name": "x", "customMetrics": []}]}),
            "engineConfigs[0].customMetrics",
        ),
        (serde_json::json!({"engineConfigs": [{"name": "default"}]}), "reserved"),
        (serde_json::json!({"engineConfigs": [{"name": ""}]}), "engineConfigs[0].name"),
    ];
    for (parameters, expected) in cases {
        let error = plugin_error(MODEL_SERVER_PROTOCOL_METRICS_TYPE, parameters.clone());
        assert!(error.contains(expected), "{parameters}: {error}");
    }
}

#[test]
fn dcgm_source_defaults_and_errors() {
    let mut registry = PluginRegistry::new();
    let refused = registry.create(&PluginSpec::of_type(plugins::DCGM_DATA_SOURCE_TYPE));
    assert!(refused.is_err(), "alpha: refused without --allow-experimental-plugins");
    registry.allow_experimental_plugins(true);
    let plugin = registry.create(&PluginSpec::of_type(plugins::DCGM_DATA_SOURCE_TYPE)).unwrap();
    assert_eq!(
        plugin.data_layer.as_deref(),
        Some(&DataLayerPlugin::DcgmSource(plugins::DcgmSourceParameters {
            scheme: Scheme::Http,
            path: "/metrics".into(),
            port: Some(9400),
            tls: SourceTls { insecure_skip_verify: true, ..SourceTls::default() },
            use_node_address: false,
            interval: None,
        }))
    );
    let cases = [
        (serde_json::json!({"port": 0, "useNodeAddress": true}), "port: useNodeAddress"),
        (serde_json::json!({"port": -1}), "port"),
        (serde_json::json!({"port": 70000}), "port"),
        (serde_json::json!({"path": "metrics"}), "path"),
        (serde_json::json!({"scheme": "ftp"}), "scheme"),
        (serde_json::json!({"interval": "soon"}), "interval"),
        (serde_json::json!({"caCertPath": "/ca.pem"}), "caCertPath"),
    ];
    for (parameters, expected) in cases {
        let spec = PluginSpec {
            parameters: Some(&parameters),
            ..PluginSpec::of_type(plugins::DCGM_DATA_SOURCE_TYPE)
        };
        let error = registry.create(&spec).unwrap_err().to_string();
        assert!(error.contains(expected), "{parameters}: {error}");
    }
}

#[test]
fn dcgm_extractor_binds_only_to_the_dcgm_source() {
    let body = "plugins:
- {type: dcgm-data-source, name: dcgm, parameters: {port: 9400, interval: 1s}}
- {type: dcgm-extractor, name: gpu}
- {type: core-metrics-extractor, name: core}
dataLayer:
  sources:
  - pluginRef: dcgm
    extractors: [{pluginRef: EXTRACTOR}]
";
    let resolve_experimental = |body: &str| {
        let config = EndpointPickerConfig::from_yaml(&format!("{HEAD}{body}"))?;
        let mut registry = PluginRegistry::new();
        registry.allow_experimental_plugins(true);
        let plugins = config.construct_plugins(&registry)?;
        config.data_layer(&plugins, &registry)
    };
    let layer = resolve_experimental(&body.replace("EXTRACTOR", "gpu")).unwrap();
    assert_eq!(
        names(&layer),
        [pair("dcgm", &["gpu"]), pair(METRICS_DATA_SOURCE_TYPE, &[CORE_METRICS_EXTRACTOR_TYPE])]
    );
    let error = resolve_experimental(&body.replace("EXTRACTOR", "core")).unwrap_err();
    assert!(matches!(error, ConfigError::DataLayerMismatch { .. }), "{error}");
}

#[test]
fn the_endpoint_notification_source_takes_no_extractor() {
    let layer = resolve(
        "plugins:
- {type: endpoint-notification-source, name: events}
dataLayer:
  sources: [{pluginRef: events}]
",
    )
    .unwrap();
    assert_eq!(names(&layer)[0], pair("events", &[]));
    let error = resolve(
        "plugins:
- {type: endpoint-notification-source, name: events}
- {type: models-data-extractor}
dataLayer:
  sources: [{pluginRef: events, extractors: [{pluginRef: models-data-extractor}]}]
",
    )
    .unwrap_err();
    assert!(matches!(error, ConfigError::DataLayerMismatch { .. }), "{error}");
}

#[test]
fn a_cross_replica_syncer_is_resolved_by_its_role() {
    let mut registry = PluginRegistry::new();
    registry.register("test-syncer", |_| {
        Ok(crate::Plugin {
            data_layer: Some(Arc::new(DataLayerPlugin::CrossReplicaSyncer)),
            ..crate::Plugin::default()
        })
    });
    let resolve_with = |body: &str| {
        let config = EndpointPickerConfig::from_yaml(&format!("{HEAD}{body}"))?;
        let plugins = config.construct_plugins(&registry)?;
        config.data_layer(&plugins, &registry)
    };
    let layer = resolve_with(
        "plugins: [{name: sync, type: test-syncer}]
dataLayer: {crossReplicaSyncerPluginRef: sync, crossReplicaSyncInterval: 250ms}
",
    )
    .unwrap();
    assert_eq!(layer.cross_replica_syncer.map(|syncer| syncer.name), Some("sync".to_owned()));
    assert_eq!(layer.cross_replica_sync_interval, Some(std::time::Duration::from_millis(250)));
    let wrong = resolve_with(
        "plugins: [{type: concurrency-detector}]
dataLayer: {crossReplicaSyncerPluginRef: concurrency-detector}
",
    )
    .unwrap_err();
    assert!(matches!(
        wrong,
        ConfigError::DataLayerWrongKind { expected: "a cross-replica syncer", .. }
    ));
    let dangling = resolve_with("dataLayer: {crossReplicaSyncerPluginRef: redis}\n").unwrap_err();
    assert_eq!(
        dangling.to_string(),
        "dataLayer.crossReplicaSyncerPluginRef: 'redis' names no declared plugin"
    );
}
