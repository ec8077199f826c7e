//! The pool averages of peer clusters (`multicluster-metrics-data-source` with
//! `multicluster-metrics-extractor`): every interval, each endpoint (a peer cluster's
//! gateway) has its EPP's metrics page read, and the page's average KV-cache utilization and
//! queue size are published as the endpoint attributes the multi-cluster scorers read.
//!
//! Where a peer is scraped: the host in its `metricsAddress` label when it has one (an IP or a
//! DNS name, resolved each scrape), on its `metricsPort` label, else the source's `port`,
//! else the endpoint's own port; without the label, the endpoint's own address. A peer
//! declared or labelled by DNS name is scraped with that name as `Host` and checked against
//! its certificate (HTTPS with verification is the source's default).
//!
//! A failed scrape, or a page missing one of the metrics, keeps that metric's last value (as
//! llm-d's extractor does); a cluster that leaves the pool loses its values. Pages over
//! [`MAX_PEER_PAGE_BYTES`] are refused.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use metrics_model::ScrapeTls;
use metrics_model::fetch::{self, PageRequest};
use metrics_model::mapping::MetricSpec;
use scheduler_core::data_layer::plugins::{
    METRICS_ADDRESS_LABEL, METRICS_PORT_LABEL, MULTICLUSTER_KV_CACHE_UTILIZATION_ATTRIBUTE,
    MULTICLUSTER_QUEUE_SIZE_ATTRIBUTE,
};
use scheduler_core::{Endpoint, EndpointAttributes, EndpointId, SharedPool};

use crate::endpoint_poll::{MAX_FETCH_TIME, ticks};

/// Largest peer metrics page read (llm-d's bound): a peer across a trust boundary must not
/// be able to exhaust memory here.
pub const MAX_PEER_PAGE_BYTES: usize = 8 * 1024 * 1024;

/// How the peers are scraped.
#[derive(Clone, Debug)]
pub struct ClusterMetricsSettings {
    /// Path of the metrics page.
    pub path: String,
    /// Port scraped when a peer has no `metricsPort` label; `None`: the endpoint's own port.
    pub port: Option<u16>,
    /// Time between two scrapes of the pool.
    pub interval: Duration,
    /// TLS client configuration; `None` scrapes over plain HTTP.
    pub tls: Option<ScrapeTls>,
    /// The series of the peer's average KV-cache utilization.
    pub kv_cache_metric: MetricSpec,
    /// The series of the peer's average queue size.
    pub queue_metric: MetricSpec,
    /// The extractor's attributes, where each round's values are published.
    pub publish_to: Arc<EndpointAttributes>,
}

/// Where one peer's metrics are read.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Target {
    /// An IP, or a DNS name to resolve.
    host: String,
    port: u16,
    /// The endpoint's own address, when the page is read there (no resolution needed).
    address: Option<IpAddr>,
    /// The name sent as `Host` and checked against the certificate.
    name: Option<String>,
}

/// Where `endpoint`'s metrics page is, or why its labels do not say.
fn target(endpoint: &Endpoint, port_override: Option<u16>) -> Result<Target, String> {
    let port = match endpoint.labels.get(METRICS_PORT_LABEL) {
        Some(port) => match port.trim().parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => return Err(format!("label {METRICS_PORT_LABEL}={port:?} is not a port")),
        },
        None => port_override.unwrap_or(endpoint.address.port()),
    };
    match endpoint.labels.get(METRICS_ADDRESS_LABEL).filter(|host| !host.is_empty()) {
        Some(host) => {
            let literal = host.parse::<IpAddr>().ok();
            let name = literal.is_none().then(|| host.clone());
            Ok(Target { host: host.clone(), port, address: literal, name })
        }
        None => Ok(Target {
            host: endpoint.address.ip().to_string(),
            port,
            address: Some(endpoint.address.ip()),
            name: endpoint.host.as_deref().map(str::to_owned),
        }),
    }
}

/// The pool averages last read from each peer.
#[derive(Default)]
struct Latest {
    kv_cache: HashMap<EndpointId, f64>,
    queue: HashMap<EndpointId, f64>,
}

/// Scrapes every peer of `pool` each interval and publishes their averages, until the task
/// is dropped.
pub async fn poll(pool: Arc<SharedPool>, settings: ClusterMetricsSettings) {
    let mut ticks = ticks(settings.interval);
    let settings = Arc::new(settings);
    let mut latest = Latest::default();
    loop {
        ticks.tick().await;
        let endpoints: Vec<Endpoint> =
            pool.load().endpoints().iter().map(|state| state.endpoint.clone()).collect();
        let mut round = tokio::task::JoinSet::new();
        for endpoint in &endpoints {
            let settings = Arc::clone(&settings);
            let (id, name) = (endpoint.id, Arc::clone(&endpoint.name));
            let target = target(endpoint, settings.port);
            round.spawn(async move {
                let read = match target {
                    Ok(target) => tokio::time::timeout(MAX_FETCH_TIME, scrape(&target, &settings))
                        .await
                        .unwrap_or_else(|_| Err(format!("no answer within {MAX_FETCH_TIME:?}"))),
                    Err(error) => Err(error),
                };
                (id, name, read)
            });
        }
        while let Some(joined) = round.join_next().await {
            let Ok((id, name, read)) = joined else { continue };
            match read {
                Ok([kv_cache, queue]) => {
                    if let Some(value) = kv_cache {
                        latest.kv_cache.insert(id, value);
                    }
                    if let Some(value) = queue {
                        latest.queue.insert(id, value);
                    }
                    if kv_cache.is_none() || queue.is_none() {
                        tracing::debug!(cluster = %name, "peer metrics page lacks a pool average; keeping its last value");
                    }
                }
                Err(error) => {
                    tracing::debug!(cluster = %name, %error, "peer metrics not read; keeping the last values")
                }
            }
        }
        let present = |id: &EndpointId| endpoints.iter().any(|endpoint| endpoint.id == *id);
        latest.kv_cache.retain(|id, _| present(id));
        latest.queue.retain(|id, _| present(id));
        let publish = &settings.publish_to;
        publish.publish(MULTICLUSTER_KV_CACHE_UTILIZATION_ATTRIBUTE, latest.kv_cache.clone());
        publish.publish(MULTICLUSTER_QUEUE_SIZE_ATTRIBUTE, latest.queue.clone());
    }
}

/// One peer's averages: `[kv-cache utilization, queue size]`, each `None` when the page
/// lacks it.
async fn scrape(
    target: &Target,
    settings: &ClusterMetricsSettings,
) -> Result<[Option<f64>; 2], String> {
    let address = match target.address {
        Some(ip) => SocketAddr::new(ip, target.port),
        None => tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .map_err(|error| format!("cannot resolve {}: {error}", target.host))?
            .next()
            .ok_or_else(|| format!("{} resolves to no address", target.host))?,
    };
    let request = PageRequest {
        address,
        host: target.name.as_deref(),
        path: &settings.path,
        accept: "text/plain;version=0.0.4;q=1,*/*;q=0.1",
        tls: settings.tls.as_ref(),
        limit: MAX_PEER_PAGE_BYTES,
    };
    let page = fetch::get(request).await.map_err(|error| error.to_string())?;
    let specs = [&settings.kv_cache_metric, &settings.queue_metric];
    let values = metrics_model::latest::latest_values(&page, &specs).map_err(|e| e.to_string())?;
    Ok([values[0], values[1]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> Endpoint {
        Endpoint::new(([10, 1, 0, 1], 443).into()).with_host("gw.cluster-a.example.com")
    }

    #[test]
    fn labels_move_the_scrape_to_a_metrics_host() {
        let plain = target(&cluster(), None).unwrap();
        assert_eq!(plain.address, Some([10, 1, 0, 1].into()));
        assert_eq!(plain.port, 443);
        assert_eq!(plain.name.as_deref(), Some("gw.cluster-a.example.com"));
        assert_eq!(target(&cluster(), Some(9090)).unwrap().port, 9090);

        let labelled = cluster().with_label(METRICS_ADDRESS_LABEL, "epp.cluster-a.example.com");
        let moved = target(&labelled, None).unwrap();
        assert_eq!(
            (moved.host.as_str(), moved.port, moved.address),
            ("epp.cluster-a.example.com", 443, None)
        );
        assert_eq!(moved.name.as_deref(), Some("epp.cluster-a.example.com"));
        let with_port = labelled.clone().with_label(METRICS_PORT_LABEL, "9090");
        assert_eq!(target(&with_port, Some(1)).unwrap().port, 9090);

        let by_ip = cluster().with_label(METRICS_ADDRESS_LABEL, "10.9.9.9");
        let moved = target(&by_ip, None).unwrap();
        assert_eq!((moved.address, moved.name), (Some([10, 9, 9, 9].into()), None));

        let bad = labelled.with_label(METRICS_PORT_LABEL, "http");
        assert!(target(&bad, None).unwrap_err().contains("metricsPort"));
    }
}
