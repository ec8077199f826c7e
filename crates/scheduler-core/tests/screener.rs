//! Screeners narrow every profile's candidates once per request, before the profiles run.

use std::sync::Arc;

use scheduler_core::{
    Candidates, CycleState, Endpoint, EndpointPickerConfig, EndpointState, InferenceRequest,
    Picker, Plugin, PluginRegistry, PoolSnapshot, SchedulingError, Screener,
};

/// Picks the first candidate.
#[derive(Debug)]
struct First;

impl Picker for First {
    fn pick(&self, _: &mut CycleState, _: Candidates<'_>, _: &[f64], picked: &mut Vec<u32>) {
        picked.push(0);
    }
}

/// Keeps the endpoints on odd ports.
#[derive(Debug)]
struct OddPorts;

impl Screener for OddPorts {
    fn screen(
        &self,
        _: &mut CycleState,
        _: &InferenceRequest,
        pool: &PoolSnapshot,
        candidates: &mut Vec<u32>,
    ) {
        candidates
            .retain(|&index| pool.get(index).is_some_and(|s| s.endpoint.address.port() % 2 == 1));
    }
}

fn scheduler(yaml: &str) -> scheduler_core::Scheduler {
    let mut registry = PluginRegistry::new();
    registry.register("first-picker", |_| Ok(Plugin::picker(First)));
    registry.register("odd-ports", |_| {
        Ok(Plugin { screener: Some(Arc::new(OddPorts)), ..Plugin::default() })
    });
    EndpointPickerConfig::from_yaml(yaml).expect("config").build(&registry).expect("scheduler")
}

fn pool(ports: &[u16]) -> Arc<PoolSnapshot> {
    Arc::new(PoolSnapshot::new(
        ports.iter().map(|&port| EndpointState::new(Endpoint::new(([10, 0, 0, 1], port).into()))),
    ))
}

#[test]
fn the_profiles_see_only_what_the_screeners_keep() {
    let scheduler = scheduler("plugins:\n- type: odd-ports\n  name: odd\n- type: first-picker\n");
    let result = scheduler.schedule(&InferenceRequest::new("m", "p"), &pool(&[8000, 8001, 8003]));
    assert_eq!(result.expect("a pick").primary().endpoint.address.port(), 8001);
    let error = scheduler.schedule(&InferenceRequest::new("m", "p"), &pool(&[8000, 8002]));
    assert_eq!(error.expect_err("none left"), SchedulingError::Screened { screener: "odd".into() });
    assert_eq!(
        SchedulingError::Screened { screener: "odd".into() }.to_string(),
        "screener 'odd' removed every candidate endpoint"
    );
}

#[test]
fn a_screener_is_not_a_profile_plugin() {
    // Listed in a profile, it is ignored there (as Go ignores non-scheduling plugins in
    // profiles) and still screens once per request.
    let scheduler = scheduler(
        "plugins:\n- type: odd-ports\n- type: first-picker\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: odd-ports\n  - pluginRef: first-picker\n",
    );
    let result = scheduler.schedule(&InferenceRequest::new("m", "p"), &pool(&[8000, 8003]));
    assert_eq!(result.expect("a pick").primary().endpoint.address.port(), 8003);
}
