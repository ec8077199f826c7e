//! Plugins' upstream request headers reach the routing decision.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use scheduler_core::protocol::{KV_CACHE_SOURCE_HEADER, ROUTING_REQUEST_HEADERS};
use scheduler_core::{
    Candidates, CycleState, Director, DirectorOptions, Endpoint, EndpointState, InferenceRequest,
    Picker, PoolSnapshot, Scheduler, SchedulerProfile, SchedulingResult, SharedPool,
    SingleProfileHandler, UpstreamHeaders,
};

#[derive(Debug)]
struct First;

impl Picker for First {
    fn pick(&self, _: &mut CycleState, _: Candidates<'_>, _: &[f64], picked: &mut Vec<u32>) {
        picked.push(0);
    }
}

/// Names the primary's neighbour port as the KV-cache source.
#[derive(Debug)]
struct Neighbour;

impl UpstreamHeaders for Neighbour {
    fn upstream_headers(
        &self,
        _: &mut CycleState,
        _: &InferenceRequest,
        result: &SchedulingResult,
        headers: &mut Vec<(&'static str, String)>,
    ) {
        let mut address = result.primary().endpoint.address;
        address.set_port(address.port() + 1);
        headers.push((KV_CACHE_SOURCE_HEADER, address.to_string()));
    }
}

#[test]
fn the_director_routes_with_the_plugins_request_headers() {
    let profile = SchedulerProfile::new("default", "first", Arc::new(First));
    let scheduler = Scheduler::new(vec![profile], Arc::new(SingleProfileHandler))
        .with_upstream_headers(Arc::new(Neighbour));
    let pool = SharedPool::new(PoolSnapshot::new([EndpointState::new(Endpoint::new(
        "10.0.0.1:8000".parse().unwrap(),
    ))]));
    let director = Director::new(Arc::new(scheduler), Arc::new(pool), DirectorOptions::default());
    let body = br#"{"model": "m", "prompt": "hi"}"#;
    let mut decision = pin!(director.decide(&[], body, None));
    let Poll::Ready(routed) = decision.as_mut().poll(&mut Context::from_waker(Waker::noop()))
    else {
        panic!("a decision without flow control does not wait");
    };
    let routed = routed.expect("routed");
    assert_eq!(routed.request_headers, [(KV_CACHE_SOURCE_HEADER, "10.0.0.1:8001".to_owned())]);
    assert!(
        ROUTING_REQUEST_HEADERS.contains(&KV_CACHE_SOURCE_HEADER),
        "a client's own value is removed by the adapters"
    );
}
