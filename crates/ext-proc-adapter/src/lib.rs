//! The `epp` server: the Gateway API Inference Extension endpoint picker behind Envoy's
//! external processing (ext-proc) gRPC protocol.
//!
//! The proxy streams each request's headers and body to the picker; the picker parses the
//! body, schedules the request over the pool, and answers with the destination in the
//! `x-gateway-destination-endpoint` header and `envoy.lb` dynamic metadata, then streams the
//! body back unchanged. Errors become immediate responses (400, 413, 429, 503) with JSON bodies.
//!
//! ```
//! use std::sync::Arc;
//! use ext_proc_adapter::{Director, DirectorOptions};
//! use scheduler_core::{Endpoint, EndpointState, PoolSnapshot, SharedPool};
//!
//! let pool = Arc::new(SharedPool::new(PoolSnapshot::new([EndpointState::new(Endpoint::new(
//!     "10.0.0.1:8000".parse().unwrap(),
//! ))])));
//! let director = Director::new(
//!     Arc::new(scorers::default_scheduler().unwrap()),
//!     pool,
//!     DirectorOptions::default(),
//! );
//! let body = br#"{"model":"llama","prompt":"Hello"}"#;
//! let routed = futures_executor_free_block_on(director.decide(&[], body, None)).unwrap();
//! assert_eq!(routed.primary, "10.0.0.1:8000".parse().unwrap());
//! # fn futures_executor_free_block_on<F: std::future::Future>(future: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(future)
//! # }
//! ```

//! # Limits of the ext-proc server
//!
//! Every limit has a flag of `epp` ([`cli::ServerFlags`]); defaults in brackets.
//!
//! - A proxy that vanishes without closing (host gone, network partition) is noticed by
//!   HTTP/2 keepalive: a PING every `--grpc-keepalive-interval` (30s), unanswered for
//!   `--grpc-keepalive-timeout` (10s), closes the connection; its streams end and the requests
//!   they held (in-flight counts, queue places) are released as cancelled. TCP keepalive
//!   (`--tcp-keepalive-time` (60s), `--tcp-keepalive-interval` (10s),
//!   `--tcp-keepalive-retries` (3)) catches dead sockets underneath.
//! - Each connection carries at most `--grpc-max-concurrent-streams` (1024) streams; at most
//!   `--grpc-max-connections` (1024) connections are open, further ones wait in the listen
//!   backlog; a TLS handshake must finish within `--tls-handshake-timeout` (10s).
//! - Before its routing decision a stream may wait at most `--request-idle-timeout` (60s) for
//!   each message, and at most `--request-decision-timeout` (90s) from its opening, queue wait
//!   included; past either it is ended with `DEADLINE_EXCEEDED` and everything it held is
//!   released. After the decision no timeout applies: responses take as long as they take.
//! - `--client-ca-path` makes TLS mutual: clients need a certificate signed by that CA.
//!
//! # Stale metrics
//!
//! One threshold, `--metrics-staleness-threshold` (2s, or the config's
//! `metricsStalenessThreshold`; the two must agree when both are set), marks an endpoint
//! stale for routing, admission and readiness alike ([`scheduler_core::StalenessPolicy`]).
//! Stale endpoints get no requests while some endpoint is fresh. When every endpoint is
//! stale, `--stale-metrics-policy fail-open` (default) routes to the least-loaded endpoints
//! by last known load (waiting queue + running + requests sent since the last scrape) and
//! stays ready; `fail-closed` answers 503 (`stale_metrics`), counts the pool saturated and
//! reports readiness `NOT_SERVING`.

pub mod bbr;
pub mod cli;
pub mod cluster_metrics;
pub mod cross_replica;
pub mod data_layer;
pub mod endpoint_gpu;
pub mod endpoint_models;
mod endpoint_poll;
pub mod endpoints_file;
pub mod exchange;
mod file_watch;
pub mod health;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod kv_events;
pub mod listener;
pub mod logging;
pub mod metrics;
mod metrics_http;
pub mod model_rewrites;
pub mod server;
pub mod service;
pub mod tls;
pub mod token_metrics;
pub mod usage;

pub use exchange::{BodyParsing, Exchange, Phase};
pub use metrics::EppMetrics;
pub use scheduler_core::{Director, DirectorOptions, Rejection, Routed};
pub use server::{RunningServer, ServerConfig, ServerError, start};
pub use service::{EppExtProc, StreamLimits};
