//! gRPC health: `liveness` is serving while the process runs; `readiness` and the ext-proc
//! service name are serving while the pool has at least one endpoint with fresh metrics (or,
//! before any metrics source is configured, at least one endpoint).

use std::sync::Arc;
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

/// Whether the pool can serve: some endpoint known, and fresh if freshness is required.
pub fn pool_ready(pool: &SharedPool, now: Instant, staleness: Option<Duration>) -> bool {
    let snapshot = pool.load();
    match staleness {
        None => !snapshot.is_empty(),
        Some(threshold) => {
            snapshot.endpoints().iter().any(|state| !state.metrics.is_stale(now, threshold))
        }
    }
}

/// Keeps the health statuses in step with the pool until the task is dropped.
pub async fn report(
    reporter: HealthReporter,
    pool: Arc<SharedPool>,
    staleness: Option<Duration>,
    period: Duration,
) {
    reporter.set_service_status(LIVENESS, ServingStatus::Serving).await;
    let mut last = None;
    loop {
        let ready = pool_ready(&pool, Instant::now(), staleness);
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
