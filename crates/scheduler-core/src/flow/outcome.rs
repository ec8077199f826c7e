//! How a request leaves flow control: admitted, or one typed rejection.

use std::fmt;
use std::time::Duration;

use crate::flow::metrics::OutcomeReason;

/// A request was admitted: schedule it now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admitted {
    /// Time spent queued (zero when admitted on arrival).
    pub waited: Duration,
    /// Position in the controller's dispatch order, starting at 1; 0 when admitted without a
    /// queue. Lets tests and logs reconstruct the order requests went out in.
    pub dispatch_seq: u64,
}

/// Which cap a rejected request would have exceeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapacityLimit {
    /// The band's `maxRequests`.
    BandRequests(u64),
    /// The band's `maxBytes`.
    BandBytes(u64),
    /// The global `maxRequests`.
    TotalRequests(u64),
    /// The global `maxBytes`.
    TotalBytes(u64),
}

impl fmt::Display for CapacityLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BandRequests(limit) => write!(f, "band maxRequests {limit}"),
            Self::BandBytes(limit) => write!(f, "band maxBytes {limit}"),
            Self::TotalRequests(limit) => write!(f, "maxRequests {limit}"),
            Self::TotalBytes(limit) => write!(f, "maxBytes {limit}"),
        }
    }
}

/// Why a request was not admitted. Adapters answer HTTP 429 for every variant but
/// [`NotAdmitted::NoEndpoints`] (503) and [`NotAdmitted::Cancelled`], whose client is gone (see
/// [`NotAdmitted::http_status`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotAdmitted {
    /// Sheddable (priority < 0) and the pool is saturated; flow control is off, so no queue.
    #[error("pool saturated: sheddable request (priority {priority}) shed")]
    Shed {
        /// The request's priority.
        priority: i32,
    },
    /// Queueing it would exceed a cap.
    #[error("flow control queue full for priority {priority}: {limit} reached")]
    QueueFull {
        /// The request's priority.
        priority: i32,
        /// The cap it would exceed.
        limit: CapacityLimit,
    },
    /// It waited in the queue past its TTL.
    #[error("request (priority {priority}) expired after {waited:?} in the flow control queue")]
    Expired {
        /// The request's priority.
        priority: i32,
        /// How long it waited.
        waited: Duration,
    },
    /// It waited past `noEndpointRequestTTL` while the pool had no endpoints (or past its TTL
    /// and the pool had none when it expired): unavailability rather than backpressure, so
    /// adapters answer 503, as the Go EPP does.
    #[error(
        "request (priority {priority}) expired after {waited:?} in the flow control queue while the pool had no endpoints"
    )]
    NoEndpoints {
        /// The request's priority.
        priority: i32,
        /// How long it waited.
        waited: Duration,
    },
    /// Its ticket was dropped while it was queued.
    #[error("request (priority {priority}) cancelled while queued")]
    Cancelled {
        /// The request's priority.
        priority: i32,
    },
}

/// Status code nginx and Envoy use for a request whose client went away.
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

impl NotAdmitted {
    /// The HTTP status an adapter answers with: 429 (Too Many Requests), or
    /// [`CLIENT_CLOSED_REQUEST`] for a cancelled request, which has nobody left to answer.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::Cancelled { .. } => CLIENT_CLOSED_REQUEST,
            Self::NoEndpoints { .. } => 503,
            Self::Shed { .. } | Self::QueueFull { .. } | Self::Expired { .. } => 429,
        }
    }

    /// The metrics reason of this rejection.
    pub fn reason(&self) -> OutcomeReason {
        match self {
            Self::Shed { .. } => OutcomeReason::Shed,
            Self::QueueFull { .. } => OutcomeReason::RejectedCapacity,
            Self::Expired { .. } | Self::NoEndpoints { .. } => OutcomeReason::Expired,
            Self::Cancelled { .. } => OutcomeReason::Cancelled,
        }
    }
}

/// The one outcome every request submitted to flow control ends with.
pub type FlowOutcome = Result<Admitted, NotAdmitted>;

/// The metrics reason of an outcome.
pub fn outcome_reason(outcome: &FlowOutcome) -> OutcomeReason {
    match outcome {
        Ok(_) => OutcomeReason::Admitted,
        Err(rejection) => rejection.reason(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_messages() {
        let full = NotAdmitted::QueueFull { priority: 1, limit: CapacityLimit::BandBytes(10) };
        assert_eq!(full.http_status(), 429);
        assert_eq!(
            full.to_string(),
            "flow control queue full for priority 1: band maxBytes 10 reached"
        );
        assert_eq!(NotAdmitted::Shed { priority: -1 }.http_status(), 429);
        assert_eq!(NotAdmitted::Cancelled { priority: 0 }.http_status(), 499);
        assert_eq!(outcome_reason(&Err(NotAdmitted::Shed { priority: -1 })), OutcomeReason::Shed);
    }
}
