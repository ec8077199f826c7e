//! The EndpointPickerConfig loader: real configs load; every error class names its offender.

use scheduler_core::{ConfigError, EndpointPickerConfig};
use scorers::builtin_registry;

fn build(yaml: &str) -> Result<scheduler_core::Scheduler, ConfigError> {
    EndpointPickerConfig::from_yaml(yaml)?.build(&builtin_registry())
}

fn error(yaml: &str) -> String {
    match build(yaml) {
        Ok(_) => panic!("config should have been rejected:\n{yaml}"),
        Err(error) => error.to_string(),
    }
}

#[test]
fn weights_as_integers_and_floats_and_named_plugins() {
    let scheduler = build(
        "apiVersion: llm-d.ai/v1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- name: kv
  type: kv-cache-scorer
- type: max-score-picker
  parameters: {maxNumOfEndpoints: 2}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv
    weight: 1.5
  - pluginRef: max-score-picker
",
    )
    .unwrap();
    let profile = &scheduler.profiles()[0];
    let weights: Vec<(&str, f64)> =
        profile.scorers().iter().map(|s| (&*s.name, s.weight)).collect();
    assert_eq!(weights, vec![("queue-scorer", 2.0), ("kv", 1.5)]);
    assert_eq!(profile.picker_name(), "max-score-picker");
}

#[test]
fn defaults_are_injected() {
    // No profiles: one `default` profile with every plugin, weight 1, max-score picker added.
    let scheduler =
        build("plugins:\n- type: queue-scorer\n- type: lora-affinity-scorer\n").unwrap();
    let profile = &scheduler.profiles()[0];
    assert_eq!(&**profile.name(), "default");
    assert_eq!(profile.scorers().len(), 2);
    assert!(profile.scorers().iter().all(|s| s.weight == 1.0));
    assert_eq!(profile.picker_name(), "max-score-picker");
    // The GIE default config builds.
    let default = scorers::default_scheduler().unwrap();
    let weights: Vec<(&str, f64)> =
        default.profiles()[0].scorers().iter().map(|s| (&*s.name, s.weight)).collect();
    assert_eq!(
        weights,
        vec![
            ("queue-scorer", 2.0),
            ("kv-cache-utilization-scorer", 2.0),
            ("prefix-cache-scorer", 3.0)
        ]
    );
}

#[test]
fn every_gie_api_version_is_accepted() {
    for version in scheduler_core::ACCEPTED_API_VERSIONS {
        build(&format!(
            "apiVersion: {version}\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n"
        ))
        .unwrap();
    }
    assert_eq!(
        error("apiVersion: v9\nplugins:\n- type: queue-scorer\n"),
        "unsupported apiVersion 'v9' (accepted: inference.networking.x-k8s.io/v1alpha1, \
         config.apix.gateway-api-inference-extension.sigs.k8s.io/v1alpha1, llm-d.ai/v1alpha1, llm-d.ai/v1)"
    );
    assert_eq!(
        error("kind: Deployment\nplugins: []\n"),
        "unsupported kind 'Deployment' (expected EndpointPickerConfig)"
    );
}

#[test]
fn unknown_plugin_type_names_it_and_lists_known_types() {
    let message = error("plugins:\n- type: queue-scorer\n- name: magic\n  type: magic-scorer\n");
    assert!(
        message.starts_with("plugins[1] (name 'magic', type 'magic-scorer'): unknown plugin type 'magic-scorer' (known types: "),
        "{message}"
    );
    assert!(message.contains("queue-scorer") && message.contains("max-score-picker"), "{message}");
}

#[test]
fn dangling_plugin_ref_is_named_with_its_place() {
    let message = error(
        "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: queue-scorer\n  - pluginRef: prefix\n",
    );
    assert_eq!(
        message,
        "schedulingProfiles[0] 'p' plugins[1]: pluginRef 'prefix' names no declared plugin"
    );
}

#[test]
fn bad_weights_are_rejected() {
    let message = error(
        "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: queue-scorer\n    weight: -1\n",
    );
    assert_eq!(
        message,
        "schedulingProfiles[0] 'p' plugins[0] ('queue-scorer'): weight -1 must be a finite number >= 0"
    );
    let message = error(
        "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: queue-scorer\n    weight: heavy\n",
    );
    assert!(message.starts_with("config is not a valid EndpointPickerConfig: "), "{message}");
    assert!(message.contains("weight") || message.contains("heavy"), "{message}");
}

#[test]
fn unknown_parameters_are_rejected_with_the_plugin_named() {
    let message = error("plugins:\n- type: max-score-picker\n  parameters: {maxEndpoints: 2}\n");
    assert!(
        message.starts_with(
            "plugins[0] (name 'max-score-picker', type 'max-score-picker'): invalid parameters: maxEndpoints: unknown field `maxEndpoints`"
        ),
        "{message}"
    );
    let message =
        error("plugins:\n- type: max-score-picker\n  parameters: {maxNumOfEndpoints: 0}\n");
    assert!(message.ends_with("'maxNumOfEndpoints' must be at least 1"), "{message}");
    let message = error("plugins:\n- type: queue-scorer\n  parameters: {threshold: 3}\n");
    assert!(message.contains("unknown field `threshold`"), "{message}");
}

#[test]
fn unknown_top_level_keys_are_rejected() {
    let message = error("plugins: []\nschedulingProfile: []\n");
    assert!(message.contains("schedulingProfile"), "{message}");
    let message = error("plugins:\n- type: queue-scorer\n  weight: 2\n");
    assert!(message.contains("weight"), "{message}");
}

#[test]
fn yaml_syntax_errors_say_where() {
    let message = error("plugins:\n- type: queue-scorer\n  parameters: {a: [1, 2}\n");
    assert!(message.starts_with("config is not a valid EndpointPickerConfig: "), "{message}");
    assert!(message.contains('3'), "line number expected: {message}");
}

#[test]
fn structural_errors() {
    assert_eq!(
        error("plugins:\n- type: queue-scorer\n- type: queue-scorer\n"),
        "plugins[1]: name 'queue-scorer' is already used by plugins[0]"
    );
    assert_eq!(
        error(
            "plugins:\n- type: random-picker\n- type: max-score-picker\nschedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: random-picker\n  - pluginRef: max-score-picker\n"
        ),
        "schedulingProfiles[0] 'p': pickers 'random-picker' and 'max-score-picker' both declared; a profile has one picker"
    );
    assert_eq!(
        error(
            "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n  plugins: [{pluginRef: queue-scorer}]\n- name: b\n  plugins: [{pluginRef: queue-scorer}]\n"
        ),
        "single-profile-handler runs at most 1 profile(s) but 2 are declared; declare a multi-profile handler"
    );
    assert_eq!(
        error(
            "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n  plugins: []\n- name: a\n  plugins: []\n"
        ),
        "schedulingProfiles[1]: profile name 'a' is used twice"
    );
    // A plugin that is no filter, scorer or picker is ignored in a profile, as Go's profile
    // ignores it (it still plays its own role: here, the handler).
    let scheduler = build(
        "plugins:\n- type: single-profile-handler\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n  plugins: [{pluginRef: single-profile-handler}, {pluginRef: queue-scorer}]\n",
    )
    .unwrap();
    let profile = &scheduler.profiles()[0];
    assert_eq!(profile.scorers().len(), 1);
    assert_eq!(profile.filters().count(), 0);
}

/// The example config of the protocol notes, verbatim.
const PROTOCOL_EXAMPLE: &str = "\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]          # optional
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- name: prefix                        # optional; defaults to type
  type: prefix-cache-scorer
  parameters: {blockSize: 16, maxPrefixBlocksToMatch: 256, lruCapacityPerServer: 31250}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
  - pluginRef: prefix
    weight: 3
  - pluginRef: max-score-picker
saturationDetector: {}               # optional
flowControl: {}                       # optional
";

#[test]
fn the_protocol_example_loads() {
    let config = EndpointPickerConfig::from_yaml(PROTOCOL_EXAMPLE).unwrap();
    assert!(config.feature_enabled("flowControl"));
    let scheduler = config.build(&builtin_registry()).unwrap();
    let weights: Vec<(&str, f64)> =
        scheduler.profiles()[0].scorers().iter().map(|s| (&*s.name, s.weight)).collect();
    assert_eq!(
        weights,
        vec![("queue-scorer", 2.0), ("kv-cache-utilization-scorer", 1.0), ("prefix", 3.0)]
    );
}

#[test]
fn prefix_block_size_spellings() {
    for parameters in [
        "{hashBlockSize: 64}",
        "{blockSize: 64}",
        "{blockSizeTokens: 16}",
        "{blockSize: 64, blockSizeTokens: 16}",
    ] {
        build(&format!("plugins:\n- type: prefix-cache-scorer\n  parameters: {parameters}\n"))
            .unwrap();
    }
    let message = error(
        "plugins:\n- type: prefix-cache-scorer\n  parameters: {blockSize: 64, blockSizeTokens: 4}\n",
    );
    assert!(
        message.ends_with("blockSize, hashBlockSize and blockSizeTokens disagree; give one"),
        "{message}"
    );
    let message =
        error("plugins:\n- type: prefix-cache-scorer\n  parameters: {lruCapacityPerServer: 0}\n");
    assert!(message.ends_with("'lruCapacityPerServer' must be at least 1"), "{message}");
}
