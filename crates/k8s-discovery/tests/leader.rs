//! Leader election between candidates sharing one Lease on a fake API server: one leads at
//! a time; a released Lease is taken at the next try; a leader that vanishes without
//! releasing is replaced once its claim has gone unrenewed for a lease duration.

mod fake_api;

use std::time::{Duration, Instant};

use fake_api::FakeApiServer;
use k8s_discovery::{LeaderElectionConfig, LeaderElector};

fn config(identity: &str) -> LeaderElectionConfig {
    LeaderElectionConfig {
        namespace: "serving".to_owned(),
        lease_name: "epp-serving-chat.llm-d.ai".to_owned(),
        identity: identity.to_owned(),
        lease_duration: Duration::from_millis(1500),
        renew_deadline: Duration::from_millis(1000),
        retry_period: Duration::from_millis(100),
    }
}

/// Waits up to `limit` for `done`.
async fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

fn holder(server: &FakeApiServer) -> Option<String> {
    let lease =
        server.get("coordination.k8s.io/v1", "leases", "serving", "epp-serving-chat.llm-d.ai")?;
    lease["spec"]["holderIdentity"].as_str().map(str::to_owned)
}

#[tokio::test]
async fn one_leads_and_a_release_hands_over_at_once() {
    let server = FakeApiServer::start().await;
    let a = LeaderElector::start(server.client(), config("a"));
    assert!(eventually(Duration::from_secs(5), || a.is_leader()).await, "the only candidate leads");
    let b = LeaderElector::start(server.client(), config("b"));
    // b keeps trying for several retry periods and never leads while a renews.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(a.is_leader() && !b.is_leader());
    assert_eq!(holder(&server).as_deref(), Some("a"));

    let released = Instant::now();
    a.release().await;
    assert!(eventually(Duration::from_secs(5), || b.is_leader()).await, "b takes a released lease");
    assert!(
        released.elapsed() < Duration::from_millis(1200),
        "handed over in {:?}, before the lease duration",
        released.elapsed()
    );
    assert_eq!(holder(&server).as_deref(), Some("b"));
    let lease = server
        .get("coordination.k8s.io/v1", "leases", "serving", "epp-serving-chat.llm-d.ai")
        .unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
}

#[tokio::test]
async fn a_vanished_leader_is_replaced_after_the_lease_duration() {
    let server = FakeApiServer::start().await;
    let a = LeaderElector::start(server.client(), config("a"));
    assert!(eventually(Duration::from_secs(5), || a.is_leader()).await);
    let b = LeaderElector::start(server.client(), config("b"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(a); // no release: the claim has to expire
    let vanished = Instant::now();
    assert!(eventually(Duration::from_secs(10), || b.is_leader()).await);
    assert!(
        vanished.elapsed() >= Duration::from_millis(1000),
        "b must wait out a's claim, took over after {:?}",
        vanished.elapsed()
    );
    assert_eq!(holder(&server).as_deref(), Some("b"));
}

#[tokio::test]
async fn many_candidates_never_lead_together() {
    let server = FakeApiServer::start().await;
    let candidates: Vec<LeaderElector> = (0..4)
        .map(|index| LeaderElector::start(server.client(), config(&format!("c{index}"))))
        .collect();
    assert!(
        eventually(Duration::from_secs(5), || candidates.iter().any(LeaderElector::is_leader))
            .await
    );
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(800) {
        let leaders = candidates.iter().filter(|candidate| candidate.is_leader()).count();
        assert!(leaders <= 1, "{leaders} leaders at once");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
