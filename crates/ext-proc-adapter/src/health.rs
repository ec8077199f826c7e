//! gRPC health: `liveness` is serving while the process runs; `readiness` and the ext-proc
//! service name are serving while a request could be routed
//! ([`PoolSnapshot::can_route`](scheduler_core::PoolSnapshot::can_route)): some endpoint is
//! known and, when the pool's staleness policy fails closed, some endpoint has fresh metrics.
//! Failing open (the default), an all-stale pool stays ready, since the picker still routes.
//! While the server drains before stopping, readiness is NotServing and liveness serving.
//! Other conditions can hold readiness at NotServing too ([`ReadinessHolds`]): Kubernetes
//! discovery before its first full list, a replica that is not the elected leader.
//! `inference-extension`, the name GIE's and llm-d's Helm charts probe a single replica's
//! liveness and readiness with, is serving from the start until the drain: as in the Go EPP,
//! where it means the pool was read, an empty pool keeps the pod live (not restarted).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use scheduler_core::SharedPool;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Service name of the liveness check.
pub const LIVENESS: &str = "liveness";
/// Service name of the readiness check.
pub const READINESS: &str = "readiness";
/// The ext-proc service's own health name.
pub const EXT_PROC_SERVICE: &str = "envoy.service.ext_proc.v3.ExternalProcessor";
/// The name the Go EPP's Helm charts probe (liveness and readiness) with one replica:
/// serving from the start until the drain begins.
pub const CHART_SERVICE: &str = "inference-extension";

/// Whether a request arriving at `now` could be routed under the pool's staleness policy.
pub fn pool_ready(pool: &SharedPool, now: Instant) -> bool {
    pool.load().can_route(now)
}

/// A reason, other than the pool, for readiness to report NotServing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// The server is draining before it stops.
    Draining,
    /// Endpoint discovery has not listed everything yet.
    Discovery,
    /// Another replica is the elected leader; this one stands by.
    Standby,
}

impl Hold {
    fn bit(self) -> u32 {
        match self {
            Self::Draining => 1,
            Self::Discovery => 2,
            Self::Standby => 4,
        }
    }
}

/// The [`Hold`]s in force; readiness is NotServing while any is.
#[derive(Debug, Default)]
pub struct ReadinessHolds {
    bits: AtomicU32,
}

impl ReadinessHolds {
    /// Puts `hold` in force (`held`) or lifts it.
    pub fn set(&self, hold: Hold, held: bool) {
        if held {
            self.bits.fetch_or(hold.bit(), Ordering::Relaxed);
        } else {
            self.bits.fetch_and(!hold.bit(), Ordering::Relaxed);
        }
    }

    /// Whether `hold` is in force.
    pub fn is_set(&self, hold: Hold) -> bool {
        self.bits.load(Ordering::Relaxed) & hold.bit() != 0
    }

    /// Whether any hold is in force.
    pub fn any(&self) -> bool {
        self.bits.load(Ordering::Relaxed) != 0
    }
}

/// Keeps the health statuses in step with the pool until the task is dropped; while any of
/// `holds` is in force, readiness stays NotServing whatever the pool.
pub async fn report(
    reporter: HealthReporter,
    pool: Arc<SharedPool>,
    holds: Arc<ReadinessHolds>,
    period: Duration,
) {
    reporter.set_service_status(LIVENESS, ServingStatus::Serving).await;
    if !holds.is_set(Hold::Draining) {
        reporter.set_service_status(CHART_SERVICE, ServingStatus::Serving).await;
    }
    let mut last = None;
    loop {
        let ready = !holds.any() && pool_ready(&pool, Instant::now());
        if last != Some(ready) {
            let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
            reporter.set_service_status(READINESS, status).await;
            reporter.set_service_status(EXT_PROC_SERVICE, status).await;
            tracing::info!(ready, "pool readiness changed");
            last = Some(ready);
        }
        tokio::time::sleep(period).await;
    }
}

/// Marks the server as draining: readiness and the ext-proc service report NotServing from
/// now on (liveness stays serving), so the pod leaves the Service while it still serves.
pub async fn start_draining(reporter: &HealthReporter, holds: &ReadinessHolds) {
    holds.set(Hold::Draining, true);
    for service in [READINESS, EXT_PROC_SERVICE, CHART_SERVICE] {
        reporter.set_service_status(service, ServingStatus::NotServing).await;
    }
}
