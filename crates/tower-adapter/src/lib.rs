//! tower middleware that puts the epp-rs endpoint picker in front of any HTTP service.
//!
//! [`EndpointPickerLayer`] buffers each request's body (bounded), parses the OpenAI request,
//! runs admission and the scheduler through a [`Director`], and calls the inner service with
//! the pick attached: a [`PickedEndpoint`] request extension (primary, and fallbacks when
//! [`EndpointPickerLayer::with_max_fallback_endpoints`] asks for them) and the
//! `x-gateway-destination-endpoint` header naming the primary. When the director's model
//! rewrites send the request to another model, the inner service gets the body with that model
//! (and `content-length`, `x-llm-d-model-name-rewrite` to match). Requests the picker answers
//! itself get a JSON error response (400, 404, 413, 429, 503) without reaching the inner
//! service. The response body carries
//! the request's completion guard: the completion hooks (in-flight counts, flow-control release)
//! run when the body ends, fails, or is dropped.
//!
//! Backpressure: `poll_ready` is pending while the flow-control queues are at their global
//! request cap (`flowControl.maxRequests`; the task is woken when a place frees), then it is
//! the inner service's. Put tower's `LoadShed` outside the layer to answer at once instead of
//! waiting. A request admitted to the queue waits inside its response future, so it holds no
//! inner capacity while it waits.
//!
//! ```
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use scheduler_core::{Director, DirectorOptions, Endpoint, EndpointState, PoolSnapshot, SharedPool};
//! use tower_adapter::{EndpointPickerLayer, PickedEndpoint};
//! use tower_layer::Layer;
//! use tower_service::Service;
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let pool = Arc::new(SharedPool::new(PoolSnapshot::new([EndpointState::new(Endpoint::new(
//!     "10.0.0.1:8000".parse().unwrap(),
//! ))])));
//! let scheduler = Arc::new(scorers::default_scheduler().unwrap());
//! let director = Arc::new(Director::new(scheduler, pool, DirectorOptions::default()));
//! // The inner service: here it just echoes where the request would go.
//! let inner = tower_service_fn(|request: http::Request<Full<Bytes>>| async move {
//!     let picked = request.extensions().get::<PickedEndpoint>().unwrap();
//!     Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
//!         picked.primary.to_string(),
//!     ))))
//! });
//! let mut service = EndpointPickerLayer::new(director).layer(inner);
//! let request = http::Request::post("/v1/completions")
//!     .body(Full::new(Bytes::from_static(br#"{"model":"llama","prompt":"Hi"}"#)))
//!     .unwrap();
//! let response = service.call(request).await.unwrap();
//! let body = response.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(body, "10.0.0.1:8000");
//! # });
//! # fn tower_service_fn<F>(f: F) -> tower_adapter::testing::ServiceFn<F> { tower_adapter::testing::ServiceFn(f) }
//! ```

mod body;
mod layer;
pub mod testing;

pub use body::PickerBody;
pub use layer::{EndpointPicker, EndpointPickerLayer, PickedEndpoint};
pub use scheduler_core::{Director, DirectorOptions};
