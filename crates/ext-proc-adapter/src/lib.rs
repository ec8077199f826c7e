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

pub mod cli;
pub mod endpoints_file;
pub mod exchange;
pub mod health;
pub mod metrics;
mod metrics_http;
pub mod server;
pub mod service;
pub mod tls;
pub mod usage;

pub use exchange::{BodyParsing, Exchange, Phase};
pub use metrics::EppMetrics;
pub use scheduler_core::{Director, DirectorOptions, Rejection, Routed};
pub use server::{RunningServer, ServerConfig, ServerError, start};
pub use service::{EppExtProc, StreamLimits};
