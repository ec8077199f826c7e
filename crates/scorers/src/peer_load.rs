//! Requests that other picker replicas have in flight, for the plugins that count load.
//!
//! Several replicas of the picker in front of one pool each count only the requests they sent
//! themselves. A cross-replica syncer (the `epp-redis-sync` crate) reads each replica's own
//! counts through [`SharedInFlight::local_in_flight`] and publishes them; it sums the live
//! peers' counts and installs them with [`PeerInFlight::replace`]. The counting plugins
//! (`active-request-scorer`, `inflight-load-producer`) then read own + peers.
//!
//! Without a syncer the peer table stays empty and nothing changes. The table is replaced
//! whole (one write lock, once per sync interval) and read under a shared lock, so a decision
//! never waits for the network.

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::RwLock;
use scheduler_core::{EndpointId, EndpointMap};

/// Requests and tokens in flight on one endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InFlightCounts {
    /// Requests.
    pub requests: u64,
    /// Tokens (0 for plugins that count requests only).
    pub tokens: u64,
}

/// The sum of the live peers' in-flight counts per endpoint, replaced as a whole.
#[derive(Debug, Default)]
pub struct PeerInFlight {
    counts: RwLock<EndpointMap<InFlightCounts>>,
    /// Whether `counts` holds anything: without a syncer (or peers) a read takes no lock.
    any: AtomicBool,
}

impl PeerInFlight {
    /// The peers' counts on `endpoint` (zero when none is known).
    pub fn get(&self, endpoint: EndpointId) -> InFlightCounts {
        if !self.any.load(Ordering::Acquire) {
            return InFlightCounts::default();
        }
        self.counts.read().get(&endpoint).copied().unwrap_or_default()
    }

    /// Replaces every peer count with `counts`.
    pub fn replace(&self, counts: EndpointMap<InFlightCounts>) {
        let any = !counts.is_empty();
        let mut table = self.counts.write();
        *table = counts;
        self.any.store(any, Ordering::Release);
    }

    /// Forgets every peer count (the peers are gone, or cannot be heard).
    pub fn clear(&self) {
        let mut table = self.counts.write();
        table.clear();
        self.any.store(false, Ordering::Release);
    }

    /// Runs `read` with the peer table under a shared lock (for scoring a whole slice at once).
    pub fn with<R>(&self, read: impl FnOnce(&EndpointMap<InFlightCounts>) -> R) -> R {
        read(&self.counts.read())
    }
}

/// A plugin whose in-flight counts a cross-replica syncer shares; [`shared_in_flight`] finds
/// them among a config's plugins (through [`scheduler_core::Plugin::shared`]).
pub trait SharedInFlight: Send + Sync + std::fmt::Debug {
    /// Appends this replica's own non-zero counts, one entry per endpoint, to `out`.
    fn local_in_flight(&self, out: &mut Vec<(EndpointId, InFlightCounts)>);
    /// The peers' counts this plugin adds to its own.
    fn peers(&self) -> &PeerInFlight;
}

/// Every plugin of `plugins` that shares its in-flight counts, with its declared name, in
/// declaration order.
pub fn shared_in_flight(
    plugins: &scheduler_core::ConstructedPlugins,
) -> Vec<(String, std::sync::Arc<dyn SharedInFlight>)> {
    let mut found: Vec<(String, std::sync::Arc<dyn SharedInFlight>)> = Vec::new();
    for declared in plugins.iter() {
        let Some(shared) = declared.plugin.shared.clone() else { continue };
        let plugin: std::sync::Arc<dyn SharedInFlight> =
            match shared.downcast::<crate::InFlightLoad>() {
                Ok(load) => load,
                Err(other) => match other.downcast::<crate::ActiveRequestScorer>() {
                    Ok(scorer) => scorer,
                    Err(_) => continue,
                },
            };
        found.push((declared.name.clone(), plugin));
    }
    found
}
