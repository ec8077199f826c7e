//! Drives a future to completion on the calling thread, for the synchronous C calls.
//!
//! The director's decision is async only because a request queued by flow control awaits its
//! ticket; a C caller has no runtime to lend, so the call waits on its own thread until the
//! ticket's waker signals it. Each wait is bounded (5 ms) so `idle` runs between polls: the
//! caller uses it to run flow control's dispatch and expiry passes, which nothing else drives
//! when the host never calls back in.
//!
//! The waker signals a condition variable rather than unparking the thread: `thread::current()`
//! would give each C thread a Rust thread handle that lives in a thread-local until the thread
//! exits (never freed for a C program's main thread, which leak checkers report), and a stray
//! unpark token could not outlive the call either.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

/// Set by the waker, consumed by the waiting thread.
#[derive(Debug, Default)]
struct Signal {
    woken: Mutex<bool>,
    condvar: Condvar,
}

impl Signal {
    /// Returns once woken (consuming the wake-up) or after `timeout`.
    fn wait(&self, timeout: Duration) {
        let mut woken = self.woken.lock();
        if !*woken {
            // A timeout is not an error here: the caller polls again either way.
            let _ = self.condvar.wait_for(&mut woken, timeout);
        }
        *woken = false;
    }
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        *self.woken.lock() = true;
        self.condvar.notify_one();
    }
}

/// Polls `future` until it is ready, waiting between polls and calling `idle` after each
/// wait. A future ready on its first poll (every decision flow control does not queue) never
/// waits and allocates nothing.
pub(crate) fn block_on<F: Future>(future: F, mut idle: impl FnMut()) -> F::Output {
    // Short enough that a queued request notices freed room or its TTL within a few
    // milliseconds; long enough that a blocked call costs next to nothing.
    const POLL_INTERVAL: Duration = Duration::from_millis(5);

    let mut future = pin!(future);
    if let Poll::Ready(output) = future.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        return output;
    }
    let signal = Arc::new(Signal::default());
    let waker = Waker::from(Arc::clone(&signal));
    let mut context = Context::from_waker(&waker);
    loop {
        // A wake sent to the no-op waker of the first poll is not lost: this poll reads the
        // state itself before waiting.
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
        signal.wait(POLL_INTERVAL);
        idle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Pending until `ready` is set; wakes nobody, like a ticket resolved by a tick.
    struct Flag<'a>(&'a AtomicBool);

    impl Future for Flag<'_> {
        type Output = ();

        fn poll(self: std::pin::Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            if self.0.load(Ordering::Acquire) { Poll::Ready(()) } else { Poll::Pending }
        }
    }

    #[test]
    fn a_ready_future_never_idles() {
        let mut idled = 0;
        assert_eq!(block_on(async { 7 }, || idled += 1), 7);
        assert_eq!(idled, 0);
    }

    #[test]
    fn a_wake_before_the_wait_is_kept() {
        let signal = Arc::new(Signal::default());
        Waker::from(Arc::clone(&signal)).wake();
        let started = std::time::Instant::now();
        signal.wait(Duration::from_secs(60));
        assert!(started.elapsed() < Duration::from_secs(30), "returned at once");
        assert!(!*signal.woken.lock(), "the wake-up was consumed");
    }

    #[test]
    fn idle_runs_between_polls_until_the_future_is_ready() {
        let ready = AtomicBool::new(false);
        let mut idled = 0;
        block_on(Flag(&ready), || {
            idled += 1;
            if idled == 3 {
                ready.store(true, Ordering::Release);
            }
        });
        assert_eq!(idled, 3);
    }
}
