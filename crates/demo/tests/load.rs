//! The demo's offered load: near the pool's saturation by default, where routing decides
//! latency, and the light load on request. Configuration only: no run, no timing.

use demo::{
    DemoOptions, LIGHT_RATE_PER_SERVER, LIGHT_SYSTEM_PROMPTS, Load,
    NEAR_SATURATION_RATE_PER_SERVER, NEAR_SATURATION_REQUESTS, NEAR_SATURATION_SYSTEM_PROMPTS,
};

#[test]
fn the_default_run_offers_the_near_saturation_load() {
    let options = DemoOptions::default();
    assert_eq!(options.load, Load::NearSaturation);
    let workload = options.workload();
    assert_eq!(workload.rate_per_second, 4.0 * NEAR_SATURATION_RATE_PER_SERVER);
    assert_eq!(workload.system_prompts, NEAR_SATURATION_SYSTEM_PROMPTS);
    assert_eq!((workload.requests, workload.seed), (NEAR_SATURATION_REQUESTS, options.seed));
    let line = options.load_line();
    assert!(line.starts_with("load: "), "{line}");
    assert!(line.contains(&format!("{} shared system prompts", NEAR_SATURATION_SYSTEM_PROMPTS)));
    assert!(line.ends_with(": near saturation"), "{line}");
    // The near-saturation load presses harder than the light one, on more shared prefixes.
    let light = DemoOptions::for_load(Load::Light).workload();
    assert!(workload.rate_per_second > light.rate_per_second);
    assert!(workload.system_prompts > light.system_prompts);
    assert_eq!(light.rate_per_second, 4.0 * LIGHT_RATE_PER_SERVER);
    assert_eq!(light.system_prompts, LIGHT_SYSTEM_PROMPTS);
}

#[test]
fn the_light_load_restores_the_earlier_default() {
    let options = DemoOptions::for_load(Load::Light);
    let workload = options.workload();
    // 600 requests at 75 per second per server over 8 system prompts, as before the change.
    assert_eq!(workload.rate_per_second, 300.0);
    assert_eq!((workload.requests, workload.system_prompts), (600, 8));
    assert_eq!(
        options.load_line(),
        "load: 300 requests/s over 4 servers (75 per server), 8 shared system prompts, at most 32 in flight: light"
    );
}

#[test]
fn a_rate_of_ones_own_scales_nothing_and_says_so() {
    let options = DemoOptions {
        servers: 2,
        rate_per_second: Some(150.0),
        system_prompts: Some(3),
        ..DemoOptions::default()
    };
    let workload = options.workload();
    assert_eq!((workload.rate_per_second, workload.system_prompts), (150.0, 3));
    assert_eq!(
        options.load_line(),
        "load: 150 requests/s over 2 servers (75 per server), 3 shared system prompts, at most 32 in flight: a rate of your own"
    );
}
