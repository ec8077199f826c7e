//! A minimal `Service` from an async function, so tests and docs need no `tower` dependency.

use std::future::Future;
use std::task::{Context, Poll};

/// A service calling `F` for each request.
#[derive(Clone, Copy, Debug)]
pub struct ServiceFn<F>(pub F);

impl<F, Request, Fut, Response, Error> tower_service::Service<Request> for ServiceFn<F>
where
    F: FnMut(Request) -> Fut,
    Fut: Future<Output = Result<Response, Error>>,
{
    type Response = Response;
    type Error = Error;
    type Future = Fut;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Fut {
        (self.0)(request)
    }
}
