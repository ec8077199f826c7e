//! Requests without a body, and the dropped-reason vocabulary of rejections.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use scheduler_core::flow::NotAdmitted;
use scheduler_core::{
    AllStale, Director, DirectorOptions, Endpoint, EndpointMetrics, EndpointState, PoolSnapshot,
    Rejection, Scheduler, SchedulingError, SharedPool, SingleProfileHandler, StalenessPolicy,
};

/// Ports 9000..9000+n; the first `fresh` have metrics from now, the rest none.
fn director(endpoints: u16, fresh: u16, when_all_stale: AllStale) -> Director {
    let now = Instant::now();
    let pool = SharedPool::new(PoolSnapshot::new((0..endpoints).map(|i| {
        let state = EndpointState::new(Endpoint::new(([127, 0, 0, 1], 9000 + i).into()));
        if i < fresh {
            state.with_metrics(EndpointMetrics { updated_at: Some(now), ..Default::default() })
        } else {
            state
        }
    })));
    pool.set_staleness(Some(
        StalenessPolicy::new(Duration::from_secs(60)).when_all_stale(when_all_stale),
    ));
    let scheduler = Scheduler::new(Vec::new(), Arc::new(SingleProfileHandler));
    Director::new(Arc::new(scheduler), Arc::new(pool), DirectorOptions::default())
}

fn ports(director: &Director, subset: Option<Vec<std::net::SocketAddr>>) -> BTreeSet<u16> {
    let headers = [("x-request-id".to_owned(), "probe-1".to_owned())];
    (0..200)
        .map(|_| {
            let routed = director.route_without_body(&headers, subset.clone()).expect("routed");
            assert_eq!(routed.request.request_id, "probe-1");
            assert!(routed.completion.is_none() && routed.fallbacks.is_empty());
            routed.primary.port()
        })
        .collect()
}

#[test]
fn drawn_among_fresh_endpoints_then_all_then_refused_when_failing_closed() {
    assert_eq!(ports(&director(4, 2, AllStale::FailOpen), None), BTreeSet::from([9000, 9001]));
    assert_eq!(
        ports(&director(3, 0, AllStale::FailOpen), None),
        BTreeSet::from([9000, 9001, 9002])
    );
    let subset = Some(vec![([127, 0, 0, 1], 9003).into()]);
    assert_eq!(ports(&director(4, 2, AllStale::FailOpen), subset), BTreeSet::from([9003]));
    let refused = director(2, 0, AllStale::FailClosed).route_without_body(&[], None);
    assert!(matches!(
        refused,
        Err(Rejection::NoEndpoint(SchedulingError::AllStale { candidates: 2, .. }))
    ));
    let empty = director(0, 0, AllStale::FailOpen).route_without_body(&[], None);
    assert!(matches!(empty, Err(Rejection::NoEndpoint(SchedulingError::EmptyPool))));
}

#[test]
fn dropped_reasons_follow_llm_d_router() {
    let cases = [
        (Rejection::NoEndpoint(SchedulingError::EmptyPool), Some("rejected-no-endpoints")),
        (Rejection::NotAdmitted(NotAdmitted::Shed { priority: -1 }), Some("rejected-saturated")),
        (Rejection::TooLarge { limit: 1 }, None),
        (Rejection::UnknownModel { model: "m".into() }, None),
    ];
    for (rejection, reason) in cases {
        assert_eq!(rejection.dropped_reason(), reason, "{rejection:?}");
    }
}
