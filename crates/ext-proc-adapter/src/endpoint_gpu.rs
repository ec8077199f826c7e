//! GPU utilization of each endpoint, scraped from its NVIDIA DCGM exporter
//! (`dcgm-data-source` with `dcgm-extractor`): every interval, `GET path` on port `port` of
//! every endpoint's host (its own port when the config says `port: 0`), over HTTP or HTTPS.
//!
//! Each answer gives the endpoint's utilization in `[0, 1]` (its busiest GPU, see
//! [`metrics_model::dcgm`]), published as the attribute `GPUUtilization` of producer
//! `dcgm-extractor`. A failed scrape keeps the last value (with its time, so a consumer can
//! judge its age); an endpoint that leaves the pool loses its value. Pages over
//! [`MAX_DCGM_PAGE_BYTES`] are refused.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_model::ScrapeTls;
use metrics_model::fetch::{self, PageRequest};
use parking_lot::RwLock;
use scheduler_core::data_layer::plugins::GPU_UTILIZATION_ATTRIBUTE;
use scheduler_core::{EndpointAttributes, EndpointId, SharedPool};

use crate::endpoint_poll::{MAX_FETCH_TIME, poll_round, ticks};

/// Largest exporter page read. A DCGM exporter page for an 8-GPU node with the default
/// counters is about 100 KiB; a node-level exporter listing many pods stays well below this.
pub const MAX_DCGM_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// How the exporters are scraped.
#[derive(Clone, Debug)]
pub struct GpuPollSettings {
    /// Path of the exporter's page.
    pub path: String,
    /// Port of the exporter, on the endpoint's IP; `None` scrapes the endpoint's own port.
    pub port: Option<u16>,
    /// Time between two scrapes of the pool.
    pub interval: Duration,
    /// TLS client configuration; `None` scrapes over plain HTTP.
    pub tls: Option<ScrapeTls>,
    /// The extractor's attributes, where each round's values are published for
    /// `endpoint-attribute-filter` and `endpoint-attribute-scorer`.
    pub publish_to: Option<Arc<EndpointAttributes>>,
}

/// An endpoint's GPU utilization and when it was read.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GpuUtilization {
    /// The busiest GPU's utilization, `0.0` idle to `1.0` fully busy.
    pub value: f64,
    /// When the exporter reported it.
    pub read_at: Instant,
}

/// The GPU utilization of every endpoint, from the last good scrape of each.
#[derive(Debug, Default)]
pub struct EndpointGpuUtilization {
    by_endpoint: RwLock<HashMap<EndpointId, GpuUtilization>>,
}

impl EndpointGpuUtilization {
    /// Endpoint `id`'s utilization at its last good scrape.
    pub fn get(&self, id: EndpointId) -> Option<GpuUtilization> {
        self.by_endpoint.read().get(&id).copied()
    }

    /// How many endpoints have a value.
    pub fn len(&self) -> usize {
        self.by_endpoint.read().len()
    }

    /// Whether no endpoint has a value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Scrapes every endpoint of `pool` each interval into `store`, until the task is dropped.
pub async fn poll(
    pool: Arc<SharedPool>,
    store: Arc<EndpointGpuUtilization>,
    settings: GpuPollSettings,
) {
    let mut ticks = ticks(settings.interval);
    let fetch_time = MAX_FETCH_TIME;
    let settings = Arc::new(settings);
    loop {
        ticks.tick().await;
        let (endpoints, answered) = poll_round(&pool, "GPU utilization", |(_, address, name)| {
            let settings = Arc::clone(&settings);
            async move {
                let exporter =
                    SocketAddr::new(address.ip(), settings.port.unwrap_or(address.port()));
                let value = scrape(exporter, &name, &settings, fetch_time).await?;
                Ok(GpuUtilization { value, read_at: Instant::now() })
            }
        })
        .await;
        let mut stored = store.by_endpoint.write();
        stored.retain(|id, _| endpoints.iter().any(|(present, _, _)| present == id));
        stored.extend(answered);
        if let Some(attributes) = &settings.publish_to {
            let values = stored.iter().map(|(&id, utilization)| (id, utilization.value)).collect();
            drop(stored);
            attributes.publish(GPU_UTILIZATION_ATTRIBUTE, values);
        }
    }
}

/// One endpoint's utilization from its exporter at `exporter`.
async fn scrape(
    exporter: SocketAddr,
    pod: &str,
    settings: &GpuPollSettings,
    limit: Duration,
) -> Result<f64, String> {
    let request = PageRequest {
        address: exporter,
        host: None,
        path: &settings.path,
        accept: "text/plain;version=0.0.4;q=1,*/*;q=0.1",
        tls: settings.tls.as_ref(),
        limit: MAX_DCGM_PAGE_BYTES,
    };
    let page = tokio::time::timeout(limit, fetch::get(request))
        .await
        .map_err(|_| format!("no answer within {limit:?}"))?
        .map_err(|error| error.to_string())?;
    metrics_model::dcgm::gpu_utilization(&page, pod).map_err(|error| error.to_string())
}
