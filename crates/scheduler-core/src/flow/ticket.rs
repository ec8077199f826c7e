//! The handle a caller holds while its request waits for an outcome.
//!
//! A [`Ticket`] is a `Future` (no runtime needed: it stores the last `Waker` under a
//! parking_lot mutex and the controller wakes it once the outcome is set) and can be checked
//! without blocking with [`Ticket::try_outcome`]. Dropping a ticket whose request is still
//! queued cancels the request and frees its place at once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;

use crate::flow::controller::Cancel;
use crate::flow::outcome::FlowOutcome;

/// The outcome cell shared by a ticket and the queue entry of its request.
#[derive(Debug, Default)]
pub(crate) struct TicketCell {
    state: Mutex<CellState>,
}

#[derive(Debug, Default)]
struct CellState {
    outcome: Option<FlowOutcome>,
    waker: Option<Waker>,
}

impl TicketCell {
    /// Sets the outcome unless one is set already; returns the waker to wake (after the
    /// caller has released its own locks) when this call set it.
    pub(crate) fn resolve(&self, outcome: FlowOutcome) -> Option<Waker> {
        let mut state = self.state.lock();
        if state.outcome.is_some() {
            return None;
        }
        state.outcome = Some(outcome);
        state.waker.take()
    }

    fn outcome(&self) -> Option<FlowOutcome> {
        self.state.lock().outcome.clone()
    }

    fn is_resolved(&self) -> bool {
        self.state.lock().outcome.is_some()
    }
}

/// Awaitable outcome of a submitted request. Drop it to cancel the request.
#[derive(Debug)]
#[must_use = "dropping a ticket cancels its request"]
pub struct Ticket {
    cell: Arc<TicketCell>,
    cancel: Option<Cancel>,
}

impl Ticket {
    /// A ticket already holding `outcome`.
    pub(crate) fn resolved(outcome: FlowOutcome) -> Self {
        let cell = TicketCell::default();
        drop(cell.resolve(outcome));
        Self { cell: Arc::new(cell), cancel: None }
    }

    /// A ticket for a queued request; `cancel` removes it from its queue on drop.
    pub(crate) fn queued(cell: Arc<TicketCell>, cancel: Cancel) -> Self {
        Self { cell, cancel: Some(cancel) }
    }

    /// The outcome, if the request has one yet. Never blocks on the queue.
    pub fn try_outcome(&self) -> Option<FlowOutcome> {
        self.cell.outcome()
    }

    /// Whether the request has an outcome.
    pub fn is_resolved(&self) -> bool {
        self.cell.is_resolved()
    }

    /// Cancels the request if it is still queued (the same as dropping the ticket) and
    /// returns its outcome: `Cancelled`, or whatever it got before.
    pub fn cancel(mut self) -> FlowOutcome {
        self.cancel_now();
        // Cancelling always leaves an outcome; the fallback only spares a panic path.
        self.cell
            .outcome()
            .unwrap_or(Err(crate::flow::outcome::NotAdmitted::Cancelled { priority: 0 }))
    }

    fn cancel_now(&mut self) {
        if let Some(cancel) = self.cancel.take() {
            // Checking the cell first spares the controller lock for tickets already resolved.
            if !self.cell.is_resolved() {
                cancel.run();
            }
        }
    }
}

impl Future for Ticket {
    type Output = FlowOutcome;

    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<FlowOutcome> {
        let mut state = self.cell.state.lock();
        match &state.outcome {
            Some(outcome) => Poll::Ready(outcome.clone()),
            None => {
                match &mut state.waker {
                    Some(waker) if waker.will_wake(context.waker()) => {}
                    slot => *slot = Some(context.waker().clone()),
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.cancel_now();
    }
}
