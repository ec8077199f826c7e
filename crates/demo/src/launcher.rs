//! How the demo gets a picker to route with, without knowing how one is built.
//!
//! The demo drives any ext-proc picker over gRPC, so it only needs a way to start one for a
//! run and stop it afterwards. [`PickerLauncher`] is that way: the `epp` binary implements it
//! with its real server (the demo crate cannot depend on the server, which depends on it), and
//! tests can implement it with a stand-in such as [`crate::floor`].

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use scheduler_core::{EndpointPickerConfig, EndpointRole};

/// Why a launcher could not start its picker; shown to the user as is.
pub type LaunchError = Box<dyn std::error::Error + Send + Sync>;

/// What to start a picker with, for one demo run.
#[derive(Clone, Copy, Debug)]
pub struct PickerSpec<'a> {
    /// The picker's `EndpointPickerConfig`.
    pub config: &'a EndpointPickerConfig,
    /// InferenceObjectives as a YAML list of `{name, priority}` (the `--objectives-file`
    /// format), naming the objectives the workload sends.
    pub objectives_yaml: &'a str,
    /// The simulated model servers: the pool, each serving vLLM's `/metrics`.
    pub endpoints: &'a [SocketAddr],
    /// Their roles in prefill/decode disaggregation (llm-d's `llm-d.ai/role` label), in
    /// `endpoints` order; empty when the pool is not disaggregated.
    pub roles: &'a [EndpointRole],
    /// Which of the run's picker replicas this is (0 when the run has one).
    pub replica: usize,
    /// When the run's replicas are to share their state (prefix records, requests in
    /// flight): a name unique to the run, under which they share it. `None`: the picker
    /// keeps its state to itself. A launcher that cannot share state should refuse.
    pub shared_state: Option<&'a str>,
}

/// Starts a picker for a demo run.
///
/// The returned picker should be ready to route: the demo sends its first request as soon as
/// `launch` returns, so a picker that scrapes metrics should wait for a first scrape of every
/// endpoint (within a few seconds) before it answers.
pub trait PickerLauncher {
    /// Starts a picker over `spec.endpoints`.
    fn launch(
        &self,
        spec: PickerSpec<'_>,
    ) -> impl Future<Output = Result<LaunchedPicker, LaunchError>> + Send;
}

/// A started picker: where its ext-proc service listens, and how to stop it.
pub struct LaunchedPicker {
    /// Address of the ext-proc gRPC service (plaintext).
    pub grpc_address: SocketAddr,
    stop: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl LaunchedPicker {
    /// A picker at `grpc_address` that `stop` shuts down when awaited (it is awaited once, at
    /// the end of the run; dropped unawaited if the run fails before).
    pub fn new(grpc_address: SocketAddr, stop: impl Future<Output = ()> + Send + 'static) -> Self {
        Self { grpc_address, stop: Box::pin(stop) }
    }

    /// Shuts the picker down.
    pub async fn shutdown(self) {
        self.stop.await;
    }
}

impl fmt::Debug for LaunchedPicker {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.debug_struct("LaunchedPicker").field("grpc_address", &self.grpc_address).finish()
    }
}
