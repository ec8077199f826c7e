//! `header-profile-handler`: the profile a request header names runs alone. Expected
//! behaviour from llm-d-router's `profilehandler/headerprofile` (README and
//! `header_profile_handler.go`, ebab687).

use std::sync::Arc;

use scheduler_core::{
    Endpoint, EndpointPickerConfig, EndpointState, InferenceRequest, PoolSnapshot, Scheduler,
    SchedulingError,
};

fn scheduler(yaml: &str) -> Result<Scheduler, String> {
    let mut registry = scorers::builtin_registry();
    registry.allow_experimental_plugins(true);
    EndpointPickerConfig::from_yaml(yaml)
        .map_err(|error| error.to_string())?
        .build(&registry)
        .map_err(|error| error.to_string())
}

/// Endpoint `i` with role `role` (`llm-d.ai/role`).
fn pool() -> Arc<PoolSnapshot> {
    Arc::new(PoolSnapshot::new(["encode", "prefill", "decode"].iter().enumerate().map(
        |(i, role)| {
            EndpointState::new(
                Endpoint::new(([10, 0, 0, 1], 8000 + i as u16).into())
                    .with_label("llm-d.ai/role", *role),
            )
        },
    )))
}

const STAGES: &str = "
plugins:
- type: encode-filter
- type: prefill-filter
- type: decode-filter
- type: header-profile-handler
PARAMETERS
schedulingProfiles:
- name: encode
  plugins:
  - pluginRef: encode-filter
- name: prefill
  plugins:
  - pluginRef: prefill-filter
- name: decode
  plugins:
  - pluginRef: decode-filter
";

fn routed(
    scheduler: &Scheduler,
    request: &InferenceRequest,
) -> Result<(String, u16), SchedulingError> {
    let result = scheduler.schedule(request, &pool())?;
    assert_eq!(result.profile_runs().len(), 1, "exactly one profile runs");
    Ok((result.primary_profile().to_owned(), result.primary().endpoint.address.port()))
}

#[test]
fn the_named_profile_runs_alone_and_a_missing_header_runs_the_default() {
    let scheduler = scheduler(&STAGES.replace("PARAMETERS", "")).unwrap();
    let with = |value: &str| InferenceRequest::new("m", "p").with_header("EPP-Profile", value);
    assert_eq!(routed(&scheduler, &with("prefill")).unwrap(), ("prefill".into(), 8001));
    assert_eq!(routed(&scheduler, &with(" encode ")).unwrap(), ("encode".into(), 8000));
    assert_eq!(routed(&scheduler, &with("decode")).unwrap(), ("decode".into(), 8002));
    // Missing or blank: `decode`.
    assert_eq!(
        routed(&scheduler, &InferenceRequest::new("m", "p")).unwrap(),
        ("decode".into(), 8002)
    );
    assert_eq!(routed(&scheduler, &with("  ")).unwrap(), ("decode".into(), 8002));
    // Profile names are matched as written; an unknown one runs nothing.
    assert!(routed(&scheduler, &with("Prefill")).is_err());
    assert!(routed(&scheduler, &with("rerank")).is_err());
}

#[test]
fn header_and_default_are_configurable() {
    let parameters = "  parameters: {headerName: X-Stage, defaultProfile: prefill}";
    let scheduler = scheduler(&STAGES.replace("PARAMETERS", parameters)).unwrap();
    let request = InferenceRequest::new("m", "p").with_header("x-stage", "encode");
    assert_eq!(routed(&scheduler, &request).unwrap(), ("encode".into(), 8000));
    let ignored = InferenceRequest::new("m", "p").with_header("epp-profile", "encode");
    assert_eq!(routed(&scheduler, &ignored).unwrap(), ("prefill".into(), 8001));
    // A default that names no profile fails the requests without the header.
    let parameters = "  parameters: {defaultProfile: none}";
    let without_default = self::scheduler(&STAGES.replace("PARAMETERS", parameters)).unwrap();
    assert!(routed(&without_default, &InferenceRequest::new("m", "p")).is_err());
}

#[test]
fn a_single_profile_always_runs() {
    let yaml = "
plugins:
- type: prefill-filter
- type: header-profile-handler
schedulingProfiles:
- name: prefill
  plugins:
  - pluginRef: prefill-filter
";
    let scheduler = scheduler(yaml).unwrap();
    for request in [
        InferenceRequest::new("m", "p"),
        InferenceRequest::new("m", "p").with_header("epp-profile", "decode"),
    ] {
        assert_eq!(routed(&scheduler, &request).unwrap(), ("prefill".into(), 8001));
    }
}

#[test]
fn it_is_experimental_and_takes_only_its_parameters() {
    let yaml = STAGES.replace("PARAMETERS", "");
    let config = EndpointPickerConfig::from_yaml(&yaml).unwrap();
    let error = config.build(&scorers::builtin_registry()).unwrap_err().to_string();
    assert!(error.contains("experimental"), "{error}");
    let error = scheduler(&STAGES.replace("PARAMETERS", "  parameters: {header: x}")).unwrap_err();
    assert!(error.contains("header"), "{error}");
}
