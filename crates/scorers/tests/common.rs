//! Pool builders shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Instant;

use scheduler_core::{Endpoint, EndpointMetrics, EndpointState, PoolSnapshot};

/// Endpoint `i` at 10.0.0.1:(8000 + i) with the given queue and KV usage.
pub fn endpoint(i: u16, waiting_queue: u32, kv_usage: f64) -> EndpointState {
    EndpointState::new(Endpoint::new(([10, 0, 0, 1], 8000 + i).into())).with_metrics(
        EndpointMetrics {
            waiting_queue,
            kv_usage,
            updated_at: Some(Instant::now()),
            ..EndpointMetrics::default()
        },
    )
}

/// A pool of endpoints with the given (queue, kv) pairs.
pub fn pool(metrics: &[(u32, f64)]) -> Arc<PoolSnapshot> {
    Arc::new(PoolSnapshot::new(
        metrics.iter().enumerate().map(|(i, &(queue, kv))| endpoint(i as u16, queue, kv)),
    ))
}
