//! Keeps the demo pool's endpoint metrics fresh: scrapes each model server's vLLM `/metrics`
//! every 50 ms (the Go EPP's default refresh) and publishes them into the [`SharedPool`].
//!
//! Deliberately minimal: it reads only the handful of vLLM lines the built-in scorers use. The
//! general collector (engines, label selectors, staleness) belongs to its own crate; this whole
//! module is meant to be swapped for it behind [`spawn_metrics_poller`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use scheduler_core::{EndpointId, EndpointMetrics, SharedPool};
use tokio::task::JoinHandle;

use super::proxy::http_get;

/// How often each endpoint is scraped.
pub const REFRESH: Duration = Duration::from_millis(50);

/// Scrapes every endpoint's `/metrics` each [`REFRESH`] and publishes what parses; an endpoint
/// whose scrape fails keeps its last metrics, which then age into staleness. Abort the handle
/// to stop.
pub fn spawn_metrics_poller(pool: Arc<SharedPool>, endpoints: Vec<SocketAddr>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(REFRESH);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            for &address in &endpoints {
                let text = match http_get(address, "/metrics").await {
                    Ok(text) => text,
                    Err(error) => {
                        tracing::debug!(%address, %error, "metrics scrape failed");
                        continue;
                    }
                };
                let Some(mut metrics) = parse_vllm_metrics(&text) else {
                    tracing::debug!(%address, "metrics text lacks the vLLM gauges");
                    continue;
                };
                metrics.updated_at = Some(Instant::now());
                let id = EndpointId::from_address(address);
                pool.update(|snapshot| {
                    snapshot.set_metrics(id, metrics.clone());
                });
            }
        }
    })
}

/// Reads vLLM's queue, running, KV usage, LoRA and cache-capacity lines. `None` when a
/// required gauge (waiting, running, KV usage) is missing or malformed.
pub fn parse_vllm_metrics(text: &str) -> Option<EndpointMetrics> {
    let mut waiting = None;
    let mut running = None;
    let mut kv = None;
    let mut metrics = EndpointMetrics::default();
    let mut lora_stamp = f64::NEG_INFINITY;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, labels, value)) = split_sample(line) else { continue };
        match name {
            "vllm:num_requests_waiting" => waiting = gauge_u32(value),
            "vllm:num_requests_running" => running = gauge_u32(value),
            "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => {
                kv = value.is_finite().then(|| value.clamp(0.0, 1.0));
            }
            // Several samples may coexist; the latest (largest timestamp value) wins, as in GIE.
            "vllm:lora_requests_info" if value > lora_stamp => {
                lora_stamp = value;
                metrics.active_lora_adapters = adapter_list(label(labels, "running_lora_adapters"));
                metrics.waiting_lora_adapters =
                    adapter_list(label(labels, "waiting_lora_adapters"));
                metrics.max_lora_adapters =
                    label(labels, "max_lora").and_then(|v| v.parse().ok()).unwrap_or(0);
            }
            "vllm:cache_config_info" => {
                metrics.kv_capacity_blocks =
                    label(labels, "num_gpu_blocks").and_then(|v| v.parse().ok());
            }
            _ => {}
        }
    }
    metrics.waiting_queue = waiting?;
    metrics.running = running?;
    metrics.kv_usage = kv?;
    Some(metrics)
}

fn gauge_u32(value: f64) -> Option<u32> {
    (value.is_finite() && value >= 0.0).then(|| value.min(f64::from(u32::MAX)) as u32)
}

/// Splits `name{labels} value [timestamp]` into its parts.
fn split_sample(line: &str) -> Option<(&str, &str, f64)> {
    let (series, rest) = match line.find('{') {
        Some(open) => {
            let close = open + line[open..].rfind('}')?;
            (&line[..close + 1], &line[close + 1..])
        }
        None => line.split_once(char::is_whitespace)?,
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    match series.split_once('{') {
        Some((name, labels)) => Some((name, labels.strip_suffix('}')?, value)),
        None => Some((series, "", value)),
    }
}

/// The value of `key` in `a="x",b="y"` (values here carry no escaped quotes).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let mut rest = labels;
    while !rest.is_empty() {
        let (name, after) = rest.split_once('=')?;
        let after = after.strip_prefix('"')?;
        let end = after.find('"')?;
        if name.trim() == key {
            return Some(&after[..end]);
        }
        rest = after[end + 1..].trim_start_matches(',').trim_start();
    }
    None
}

fn adapter_list(value: Option<&str>) -> Vec<Arc<str>> {
    value
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(Arc::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_vllm_lines() {
        let text = "# TYPE vllm:num_requests_waiting gauge\n\
            vllm:num_requests_waiting{model_name=\"m\"} 3\n\
            vllm:num_requests_running{model_name=\"m\"} 4\n\
            vllm:kv_cache_usage_perc{model_name=\"m\"} 0.25\n\
            vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"old\",waiting_lora_adapters=\"\"} 10\n\
            vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"a,b\",waiting_lora_adapters=\"c\"} 20\n\
            vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"512\"} 1\n";
        let metrics = parse_vllm_metrics(text).unwrap();
        assert_eq!((metrics.waiting_queue, metrics.running, metrics.kv_usage), (3, 4, 0.25));
        assert_eq!(metrics.active_lora_adapters, vec![Arc::from("a"), Arc::from("b")]);
        assert_eq!(metrics.waiting_lora_adapters, vec![Arc::from("c")]);
        assert_eq!((metrics.max_lora_adapters, metrics.kv_capacity_blocks), (2, Some(512)));
    }

    #[test]
    fn malformed_text_gives_none() {
        assert_eq!(parse_vllm_metrics(""), None);
        assert_eq!(parse_vllm_metrics("vllm:num_requests_waiting{ 3\n"), None);
        assert_eq!(
            parse_vllm_metrics(
                "vllm:num_requests_waiting 1\nvllm:num_requests_running x\nvllm:kv_cache_usage_perc 0\n"
            ),
            None
        );
    }
}
