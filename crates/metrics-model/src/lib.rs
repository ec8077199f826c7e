//! Model-server metrics for the epp-rs endpoint picker: Prometheus text parsing, per-engine
//! metric mappings and the collector that keeps every endpoint's metrics fresh.
//!
//! The scheduler ranks endpoints by their load (waiting queue, running batch, KV-cache usage,
//! loaded LoRA adapters). Model servers publish that load as Prometheus text pages, each engine
//! under its own metric names. This crate turns those pages into
//! [`scheduler_core::EndpointMetrics`]:
//!
//! - [`text`]: a zero-copy, streaming, never-panicking parser of the exposition format, with a
//!   filter so that only the metrics a mapping reads are materialised;
//! - [`mapping`]: which metrics each engine (vLLM, SGLang, TRT-LLM, or a custom set given as
//!   Go-EPP-style flag specs) publishes, and how they combine into `EndpointMetrics`;
//! - [`dcgm`]: GPU utilization from an NVIDIA DCGM exporter page (`dcgm-extractor`);
//! - [`fetch`] (feature `collector`): one HTTP(S) `GET` of a bounded page, for the sources
//!   polled once per interval;
//! - [`engines`]: the engines of a data-layer `core-metrics-extractor`, by name;
//! - [`collector`] (feature `collector`, on by default): scrapes every endpoint on an interval
//!   and publishes new pool snapshots, keeping the last good metrics of an endpoint whose scrape
//!   fails so that they age into staleness.
//!
//! ```
//! use std::time::Instant;
//! use metrics_model::{Engine, MetricMapping};
//!
//! let page = "\
//! ## TYPE vllm:num_requests_waiting gauge
//! vllm:num_requests_waiting{model_name=\"llama\"} 3.0
//! vllm:num_requests_running{model_name=\"llama\"} 7.0
//! vllm:kv_cache_usage_perc{model_name=\"llama\"} 0.25
//! ";
//! let scraped_at = Instant::now();
//! let metrics = Engine::Vllm.mapping().extract(page, scraped_at)?;
//! assert_eq!((metrics.waiting_queue, metrics.running), (3, 7));
//! assert_eq!(metrics.kv_usage, 0.25);
//! assert_eq!(metrics.updated_at, Some(scraped_at));
//!
//! // Flag-style specs select series by label, as the Go EPP's flags do.
//! let custom = MetricMapping::from_flag_specs(&metrics_model::FlagSpecs {
//!     total_queued_requests: "vllm:num_requests_waiting{model_name=\"llama\"}",
//!     total_running_requests: "vllm:num_requests_running",
//!     kv_cache_usage_percentage: "vllm:kv_cache_usage_perc",
//!     ..Default::default()
//! })?;
//! assert_eq!(custom.extract(page, scraped_at)?.waiting_queue, 3);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

#[cfg(feature = "collector")]
pub mod collector;
pub mod dcgm;
pub mod engines;
#[cfg(feature = "collector")]
pub mod fetch;
pub mod latest;
pub mod mapping;
pub mod render;
pub mod text;
#[cfg(feature = "collector")]
pub mod tls;

#[cfg(feature = "collector")]
pub use collector::{CollectorConfig, CollectorError, MetricsCollector};
pub use engines::{EngineConfigError, EngineSet};
pub use mapping::{
    Engine, ExtractError, FlagSpecError, FlagSpecs, MetricMapping, MetricSpec, SpecError,
    UnknownEngine,
};
pub use text::{
    Exemplar, Label, Labels, MetricKind, NameFilter, ParseError, ParseErrorKind, Parser, Record,
    Sample, SampleFilter,
};
#[cfg(feature = "collector")]
pub use tls::{ScrapeTls, TlsSettings, TlsSettingsError};
