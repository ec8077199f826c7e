//! One round of a per-endpoint poll, shared by the pollers of the data layer (model lists,
//! GPU utilization): every endpoint of the pool asked at once, each answer or failure
//! reported with the endpoint it came from.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use scheduler_core::{EndpointId, SharedPool};

/// Longest wait for one endpoint's answer, whatever the interval (as the Go EPP bounds each
/// poll); a round that takes longer delays the next one.
pub(crate) const MAX_FETCH_TIME: Duration = Duration::from_secs(1);

/// The ticks of a poll every `interval` (at least 1 ms); a late round delays the next rather
/// than bunching the missed ones.
pub(crate) fn ticks(interval: Duration) -> tokio::time::Interval {
    let mut ticks = tokio::time::interval(interval.max(Duration::from_millis(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks
}

/// An endpoint as a poller sees it: its id, its address and its name.
pub(crate) type PolledEndpoint = (EndpointId, SocketAddr, Arc<str>);

/// Asks every endpoint of `pool` with `ask`, concurrently. Returns the endpoints asked (the
/// pool as the round saw it) and the answers; a failure is logged at debug level, naming
/// `what`, and leaves the endpoint out of the answers.
pub(crate) async fn poll_round<T, F, Fut>(
    pool: &SharedPool,
    what: &'static str,
    ask: F,
) -> (Vec<PolledEndpoint>, Vec<(EndpointId, T)>)
where
    T: Send + 'static,
    F: Fn(PolledEndpoint) -> Fut,
    Fut: Future<Output = Result<T, String>> + Send + 'static,
{
    let endpoints: Vec<PolledEndpoint> = pool
        .load()
        .endpoints()
        .iter()
        .map(|state| (state.id(), state.endpoint.address, Arc::clone(&state.endpoint.name)))
        .collect();
    let mut round = tokio::task::JoinSet::new();
    for endpoint in endpoints.iter().cloned() {
        let (id, address, _) = endpoint.clone();
        let asked = ask(endpoint);
        round.spawn(async move { (id, address, asked.await) });
    }
    let mut answered = Vec::with_capacity(endpoints.len());
    while let Some(joined) = round.join_next().await {
        let Ok((id, address, answer)) = joined else { continue };
        match answer {
            Ok(value) => answered.push((id, value)),
            Err(error) => {
                tracing::debug!(%address, %error, "{what} not read; keeping the last value")
            }
        }
    }
    (endpoints, answered)
}
