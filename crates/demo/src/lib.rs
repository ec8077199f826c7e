//! Tools around the epp server, kept out of its library: `epp demo`, the proxy side of the
//! ext-proc protocol, and the load generator (`epp-loadgen`).
//!
//! - [`model_server`]: a simulated vLLM server (OpenAI APIs, vLLM's `/metrics`, a prefix cache,
//!   LoRA slots) on a loopback port.
//! - [`ext_proc_client`]: the proxy's side of Envoy's ext-proc exchange, one stream per request.
//! - [`proxy`]: an Envoy-like proxy that asks a picker over ext-proc where each request goes
//!   (or rotates endpoints) and forwards it.
//! - [`workload`] and [`report`]: the demo's seeded requests and its comparison table.
//! - [`run`]: the demo itself, with a picker started by a [`PickerLauncher`]: the `epp` binary
//!   launches its real server, this crate knows nothing of it.
//! - [`sidecar`]: the decode side's routing sidecar of prefill/decode disaggregation, which
//!   has a prefill server compute the prompt the picker named in `x-prefiller-host-port`.
//! - [`floor`]: a do-nothing ext-proc server, the load generator's baseline and a stand-in
//!   picker for tests.
//!
//! ```
//! use demo::floor::Floor;
//! use demo::{DemoOptions, LaunchError, LaunchedPicker, PickerLauncher, PickerSpec};
//!
//! /// A stand-in picker that sends every request to the first server.
//! struct FirstServer;
//!
//! impl PickerLauncher for FirstServer {
//!     async fn launch(&self, spec: PickerSpec<'_>) -> Result<LaunchedPicker, LaunchError> {
//!         let (address, task) = Floor::new(spec.endpoints[0].to_string()).start().await?;
//!         Ok(LaunchedPicker::new(address, async move { task.abort() }))
//!     }
//! }
//!
//! let options = DemoOptions {
//!     servers: 2,
//!     requests: 20,
//!     policy_compare: false,
//!     progress: false,
//!     ..DemoOptions::default()
//! };
//! let runtime = tokio::runtime::Runtime::new()?;
//! let reports = runtime.block_on(demo::run(&options, &FirstServer))?;
//! assert_eq!((reports[0].completed, reports[0].errors), (20, 0));
//! assert_eq!(reports[0].per_endpoint, vec![20, 0]);
//! println!("{}", demo::render(&reports));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

pub mod ext_proc_client;
pub mod floor;
pub mod http_client;
mod http_serve;
pub mod launcher;
pub mod model_server;
pub mod proxy;
pub mod report;
mod runner;
pub mod sidecar;
pub mod workload;

pub use launcher::{LaunchError, LaunchedPicker, PickerLauncher, PickerSpec};
pub use model_server::{KvTransfer, ModelServer, ModelServerConfig, RunningModelServer};
pub use proxy::{Proxy, RequestOutcome, Routing};
pub use report::{CommonLatencies, PolicyReport, PrefillHandoffs, Served, render};
pub use runner::{
    DemoError, DemoOptions, Disaggregation, LIGHT_RATE_PER_SERVER, LIGHT_REQUESTS,
    LIGHT_SYSTEM_PROMPTS, Load, NEAR_SATURATION_RATE_PER_SERVER, NEAR_SATURATION_REQUESTS,
    NEAR_SATURATION_SYSTEM_PROMPTS, OBJECTIVE_PRIORITIES, demo_config, pd_config, run,
};
pub use workload::{PlannedRequest, WorkloadConfig};
