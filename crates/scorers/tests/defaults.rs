//! The defaults the Go EPP injects (llm-d-router `pkg/epp/config/loader/defaults.go`), each
//! rule checked against the effective profile it builds.

mod common;

use std::collections::HashSet;

use common::pool;
use scheduler_core::{
    ApiKind, ConfigError, EndpointPickerConfig, InferenceRequest, ParserTable, RequestParser,
    Scheduler,
};
use scorers::builtin_registry;

fn load(yaml: &str) -> (EndpointPickerConfig, Scheduler) {
    let config = EndpointPickerConfig::from_yaml(yaml).unwrap();
    let scheduler = config.build(&builtin_registry()).unwrap();
    (config, scheduler)
}

/// A profile as (name, filters, scorers with weights, picker).
type ProfileShape = (String, Vec<String>, Vec<(String, f64)>, String);

fn profiles(scheduler: &Scheduler) -> Vec<ProfileShape> {
    scheduler
        .profiles()
        .iter()
        .map(|profile| {
            (
                profile.name().to_string(),
                profile.filters().map(str::to_owned).collect(),
                profile
                    .scorers()
                    .iter()
                    .map(|scorer| (scorer.name.to_string(), scorer.weight))
                    .collect(),
                profile.picker_name().to_owned(),
            )
        })
        .collect()
}

fn parsers(config: &EndpointPickerConfig) -> Result<ParserTable, ConfigError> {
    let plugins = config.construct_plugins(&builtin_registry())?;
    config.parser_table(&plugins)
}

#[test]
fn a_config_of_only_flow_control_builds_an_empty_default_profile_that_picks_at_random() {
    // The docs' flow-control example: no filter, scorer, picker or profile.
    let (_, scheduler) = load(
        "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: utilization-detector
  parameters: {queueDepthThreshold: 8}
flowControl:
  maxRequests: 100
  saturationDetector: {pluginRef: utilization-detector}
",
    );
    assert_eq!(
        profiles(&scheduler),
        [("default".to_owned(), vec![], vec![], "max-score-picker".to_owned())]
    );
    // No scorer: every endpoint ties and the picker breaks ties at random.
    let pool = pool(&[(0, 0.1), (9, 0.9), (3, 0.5), (1, 0.2)]);
    let chosen: HashSet<u16> = (0..200)
        .map(|i| {
            let request = InferenceRequest::new("m", format!("prompt {i}"));
            scheduler.schedule(&request, &pool).unwrap().primary().endpoint.address.port()
        })
        .collect();
    assert_eq!(chosen.len(), 4, "every endpoint is drawn: {chosen:?}");
}

#[test]
fn an_empty_document_is_the_default_config() {
    for empty in ["", "  \n\n"] {
        assert_eq!(EndpointPickerConfig::from_yaml(empty), Ok(EndpointPickerConfig::gie_default()));
    }
    // A document with only comments is not empty to the Go loader: it declares nothing.
    let (_, scheduler) = load("# nothing configured\n");
    assert_eq!(
        profiles(&scheduler),
        [("default".to_owned(), vec![], vec![], "max-score-picker".to_owned())]
    );
}

#[test]
fn only_a_picker_makes_it_the_default_profile() {
    let (_, scheduler) = load(
        "plugins:
- name: pick-at-random
  type: random-picker
  parameters: {maxNumOfEndpoints: 2}
",
    );
    assert_eq!(
        profiles(&scheduler),
        [("default".to_owned(), vec![], vec![], "pick-at-random".to_owned())]
    );
}

#[test]
fn plugins_without_profiles_all_enter_the_default_profile_weighing_one() {
    let (_, scheduler) = load(
        "plugins:
- type: single-profile-handler
- type: queue-scorer
- name: kv
  type: kv-cache-utilization-scorer
- type: utilization-detector
- type: lora-affinity-filter
- type: passthrough-parser
",
    );
    assert_eq!(
        profiles(&scheduler),
        [(
            "default".to_owned(),
            vec!["lora-affinity-filter".to_owned()],
            vec![("queue-scorer".to_owned(), 1.0), ("kv".to_owned(), 1.0)],
            "max-score-picker".to_owned()
        )],
        "handlers, detectors and parsers are not profile plugins"
    );
}

#[test]
fn a_profile_without_a_picker_takes_the_declared_one() {
    let (_, scheduler) = load(
        "plugins:
- type: queue-scorer
- name: top-two
  type: max-score-picker
  parameters: {maxNumOfEndpoints: 2}
schedulingProfiles:
- name: only
  plugins:
  - pluginRef: queue-scorer
",
    );
    assert_eq!(
        profiles(&scheduler),
        [("only".to_owned(), vec![], vec![("queue-scorer".to_owned(), 1.0)], "top-two".to_owned())]
    );
    // The declared picker's parameters hold: two endpoints ranked.
    let pool = pool(&[(0, 0.0), (5, 0.0), (9, 0.0)]);
    let result = scheduler.schedule(&InferenceRequest::new("m", "p"), &pool).unwrap();
    assert_eq!(result.fallbacks().count(), 1);
}

#[test]
fn without_request_handler_the_default_parsers_take_every_path() {
    let (config, _) = load("plugins:\n- type: queue-scorer\n");
    let table = parsers(&config).unwrap();
    assert_eq!(table, ParserTable::default());
    assert_eq!(
        table.parsers().collect::<Vec<_>>(),
        [
            RequestParser::OpenAi,
            RequestParser::Anthropic,
            RequestParser::VllmHttp,
            RequestParser::Passthrough
        ]
    );
    assert_eq!(table.resolve("/v1/models"), Some((RequestParser::Passthrough, ApiKind::Unparsed)));
}

#[test]
fn request_handler_parsers_by_name_or_type_and_the_deprecated_parser_field() {
    let (config, scheduler) = load(
        "plugins:
- name: maxScore
  type: max-score-picker
- name: openaiParser
  type: openai-parser
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: maxScore
requestHandler:
  parsers:
  - pluginRef: openaiParser
  - pluginRef: anthropic-parser
parser:
  pluginRef: passthrough-parser
",
    );
    assert_eq!(profiles(&scheduler)[0].3, "maxScore");
    let table = parsers(&config).unwrap();
    assert_eq!(
        table.parsers().collect::<Vec<_>>(),
        [RequestParser::OpenAi, RequestParser::Anthropic],
        "requestHandler.parsers wins over parser, and gains no fallback"
    );
    assert_eq!(table.resolve("/v1/models"), None);

    let (config, _) = load("parser:\n  pluginRef: passthrough-parser\n");
    let table = parsers(&config).unwrap();
    assert_eq!(
        table.resolve("/v1/chat/completions"),
        Some((RequestParser::Passthrough, ApiKind::Unparsed))
    );
}

#[test]
fn parser_references_that_resolve_to_nothing_are_named() {
    let (config, _) =
        load("plugins:\n- type: queue-scorer\nrequestHandler:\n  parsers:\n  - pluginRef: grpc\n");
    assert_eq!(
        parsers(&config).unwrap_err().to_string(),
        "requestHandler.parsers[0]: pluginRef 'grpc' names no declared plugin and no parser type (parser types: openai-parser, anthropic-parser, vllmhttp-parser, passthrough-parser, vllmgrpc-parser, sglanghttp-parser, vertexai-parser)"
    );
    let (config, _) = load("plugins:\n- type: queue-scorer\nparser: {pluginRef: queue-scorer}\n");
    assert_eq!(
        parsers(&config).unwrap_err().to_string(),
        "parser: 'queue-scorer' is not a request parser"
    );
    let error = EndpointPickerConfig::from_yaml("requestHandler:\n  parser: []\n").unwrap_err();
    assert!(error.to_string().contains("requestHandler.parser: unknown field"), "{error}");
    let error = EndpointPickerConfig::from_yaml(
        "plugins:\n- type: openai-parser\n  parameters: {strict: true}\n",
    )
    .unwrap()
    .build(&builtin_registry())
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "plugins[0] (name 'openai-parser', type 'openai-parser'): invalid parameters: strict: unknown field `strict`, there are no fields"
    );
}
