//! The response body: the inner service's body carrying the request's completion guard, or the
//! picker's own JSON error.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use pin_project_lite::pin_project;
use scheduler_core::{CompletionGuard, Outcome};

pin_project! {
    /// A response body from [`crate::EndpointPicker`]: match on it only to tell the two apart.
    #[project = PickerBodyProjection]
    #[allow(missing_docs)] // the fields are the variant docs' subjects; the macro takes no field docs
    pub enum PickerBody<B> {
        /// The inner service's body. The guard completes the request when the body ends
        /// (completed), fails (failed) or is dropped unfinished (cancelled).
        Routed {
            #[pin]
            inner: B,
            guard: Option<CompletionGuard>,
        },
        /// The picker's own answer.
        Rejected {
            #[pin]
            body: Full<Bytes>,
        },
    }
}

impl<B> PickerBody<B> {
    pub(crate) fn routed(inner: B, guard: Option<CompletionGuard>) -> Self {
        Self::Routed { inner, guard }
    }

    pub(crate) fn rejected(json: String) -> Self {
        Self::Rejected { body: Full::new(Bytes::from(json)) }
    }
}

impl<B> Body for PickerBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project() {
            PickerBodyProjection::Routed { mut inner, guard } => {
                let polled = inner.as_mut().poll_frame(cx);
                let outcome = match &polled {
                    Poll::Ready(None) => Some(Outcome::Completed),
                    // Servers stop polling a body that says it has ended.
                    Poll::Ready(Some(Ok(_))) if inner.is_end_stream() => Some(Outcome::Completed),
                    Poll::Ready(Some(Err(_))) => Some(Outcome::Failed),
                    _ => None,
                };
                if let (Some(outcome), Some(guard)) = (outcome, guard.take()) {
                    guard.finish(outcome);
                }
                polled
            }
            PickerBodyProjection::Rejected { body } => match body.poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
                Poll::Ready(Some(Err(never))) => match never {},
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Routed { inner, .. } => inner.is_end_stream(),
            Self::Rejected { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Routed { inner, .. } => inner.size_hint(),
            Self::Rejected { body } => body.size_hint(),
        }
    }
}
