//! The layer and the service it makes.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
use scheduler_core::protocol::{
    DESTINATION_ENDPOINT_HEADER, LLM_D_MODEL_REWRITE_HEADER, MODEL_REWRITE_HEADER,
    REQUEST_DROPPED_REASON_HEADER, ROUTING_REQUEST_HEADERS,
};
use scheduler_core::{Director, InferenceRequest, Rejection, model_field};
use tower_layer::Layer;
use tower_service::Service;

use crate::body::PickerBody;

/// The pick, attached to the request the inner service receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PickedEndpoint {
    /// Where to send the request.
    pub primary: SocketAddr,
    /// Where to retry, best first (at most the layer's
    /// [`EndpointPickerLayer::with_max_fallback_endpoints`]).
    pub fallbacks: Vec<SocketAddr>,
}

/// Wraps a service with the endpoint picker.
#[derive(Clone, Debug)]
pub struct EndpointPickerLayer {
    director: Arc<Director>,
    max_fallback_endpoints: usize,
}

impl EndpointPickerLayer {
    /// A layer deciding with `director`, attaching no fallbacks.
    pub fn new(director: Arc<Director>) -> Self {
        Self { director, max_fallback_endpoints: 0 }
    }

    /// Attaches up to `count` fallback endpoints to [`PickedEndpoint::fallbacks`] (as many as
    /// the picker ranked: its `maxNumOfEndpoints` minus one).
    pub fn with_max_fallback_endpoints(mut self, count: usize) -> Self {
        self.max_fallback_endpoints = count;
        self
    }
}

impl<S> Layer<S> for EndpointPickerLayer {
    type Service = EndpointPicker<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EndpointPicker {
            inner,
            director: Arc::clone(&self.director),
            max_fallback_endpoints: self.max_fallback_endpoints,
        }
    }
}

/// The service made by [`EndpointPickerLayer`].
#[derive(Clone, Debug)]
pub struct EndpointPicker<S> {
    inner: S,
    director: Arc<Director>,
    max_fallback_endpoints: usize,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for EndpointPicker<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<PickerBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    /// Pending while flow control's queues are full, then as the inner service. The director
    /// is asked first so that an inner service reserving capacity on `Ready` (a concurrency
    /// limit) does not hold it while the picker cannot take the request.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        if self.director.poll_ready(cx).is_pending() {
            return Poll::Pending;
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The clone that was polled ready serves this request; a fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let director = Arc::clone(&self.director);
        let max_fallback_endpoints = self.max_fallback_endpoints;
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let limit = director.options().max_body_bytes;
            let bytes = match Limited::new(body, limit).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(error) => {
                    let rejection = if error.is::<http_body_util::LengthLimitError>() {
                        Rejection::TooLarge { limit }
                    } else {
                        return Ok(error_response(
                            StatusCode::BAD_REQUEST,
                            "bad_request",
                            &format!("cannot read the request body: {error}"),
                        ));
                    };
                    return Ok(rejected(&rejection));
                }
            };
            let mut headers: Vec<(String, String)> = Vec::with_capacity(parts.headers.len() + 1);
            headers.push((":path".to_owned(), parts.uri.path().to_owned()));
            for (name, value) in &parts.headers {
                if let Ok(value) = value.to_str() {
                    headers.push((name.as_str().to_owned(), value.to_owned()));
                }
            }
            // A request without a body (`GET /v1/models`) has nothing to schedule on: it goes
            // to an endpoint drawn at random, as through the ext-proc adapter.
            let decision = if bytes.is_empty() {
                director.route_without_body(&headers, None)
            } else {
                director.decide(&headers, &bytes, None).await
            };
            let routed = match decision {
                Ok(routed) => routed,
                Err(rejection) => return Ok(rejected(&rejection)),
            };
            let mut fallbacks = routed.fallbacks;
            fallbacks.truncate(max_fallback_endpoints);
            let rewritten = rewritten_body(&routed.request, &bytes);
            let rewritten_length = rewritten.as_ref().map(Vec::len);
            let bytes = rewritten.map_or(bytes, Bytes::from);
            let mut request = Request::from_parts(parts, Full::new(bytes));
            if let Some(length) = rewritten_length {
                // A model rewrite changed the body: its length, and the target named, as the
                // ext-proc adapter tells the upstream.
                let target = &routed.request.target_model;
                let headers = request.headers_mut();
                headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(length));
                if let Ok(value) = HeaderValue::from_str(target) {
                    headers.insert(LLM_D_MODEL_REWRITE_HEADER, value.clone());
                    headers.insert(MODEL_REWRITE_HEADER, value);
                }
            }
            // The header names the primary alone, as every proxy parses it; fallbacks travel
            // typed in the extension.
            if let Ok(value) = HeaderValue::from_str(&routed.primary.to_string()) {
                request.headers_mut().insert(DESTINATION_ENDPOINT_HEADER, value);
            }
            // The disaggregation and data-parallel headers are the picker's alone: a client's
            // values go, the decision's are set.
            for name in ROUTING_REQUEST_HEADERS {
                request.headers_mut().remove(name);
            }
            for (name, value) in &routed.request_headers {
                if let Ok(value) = HeaderValue::from_str(value) {
                    request.headers_mut().insert(*name, value);
                }
            }
            request.extensions_mut().insert(PickedEndpoint { primary: routed.primary, fallbacks });
            let mut guard = routed.completion;
            let written = routed.response_headers;
            // An inner error drops the guard here: the request completes as cancelled.
            let mut response = inner.call(request).await?;
            // The response started: a disaggregated request's prefill stage is over.
            if let Some(guard) = guard.as_mut() {
                guard.response_started();
            }
            // What the plugins write on the response (the session token); a value that is not
            // a valid header is dropped rather than failing the response.
            for (name, value) in written {
                let name = http::header::HeaderName::from_bytes(name.as_bytes());
                if let (Ok(name), Ok(value)) = (name, HeaderValue::from_str(&value)) {
                    response.headers_mut().insert(name, value);
                }
            }
            Ok(response.map(|body| PickerBody::routed(body, guard)))
        })
    }
}

/// The body with its `model` set to the request's target, when a model rewrite (or the
/// gateway's rewrite header) chose another model than the body names; `None` otherwise.
fn rewritten_body(request: &InferenceRequest, body: &[u8]) -> Option<Vec<u8>> {
    if request.target_model == request.model {
        return None;
    }
    model_field::rewrite_model(body, &request.target_model).ok().flatten()
}

fn rejected<B>(rejection: &Rejection) -> Response<PickerBody<B>> {
    let status =
        StatusCode::from_u16(rejection.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let mut response = error_response(status, rejection.code(), &rejection.to_string());
    if let Some(reason) = rejection.dropped_reason() {
        response
            .headers_mut()
            .insert(REQUEST_DROPPED_REASON_HEADER, HeaderValue::from_static(reason));
    }
    response
}

fn error_response<B>(status: StatusCode, code: &str, message: &str) -> Response<PickerBody<B>> {
    let json = serde_json::json!({
        "error": { "code": code, "message": message, "status": status.as_u16() }
    });
    let mut response = Response::new(PickerBody::rejected(json.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
