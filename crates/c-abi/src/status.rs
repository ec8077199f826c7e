//! Status codes and the thread-local last error.
//!
//! Every entry point returns an [`EppStatus`] (as `int32_t`) and, on failure, leaves a
//! human-readable message for the calling thread, read with `epp_last_error_message`. A
//! thread-local (like `errno`) keeps concurrent callers from seeing each other's messages
//! without any locking on the success path.

use std::cell::RefCell;

/// What an entry point returns. `EPP_STATUS_OK` is zero; every other value is an error whose
/// message `epp_last_error_message` returns on the same thread.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EppStatus {
    /// Success.
    Ok = 0,
    /// A pointer argument that must not be NULL was NULL.
    NullArgument = 1,
    /// A string argument (address, name, header, config) is not valid UTF-8.
    InvalidUtf8 = 2,
    /// The config YAML is not a valid EndpointPickerConfig, or names an unknown plugin.
    InvalidConfig = 3,
    /// The request body is not a usable OpenAI request (HTTP 400).
    BadRequest = 4,
    /// No endpoint can take the request: empty pool, or filters removed every one (HTTP 503).
    NoEndpoint = 5,
    /// The output buffer cannot hold the result; nothing was truncated.
    BufferTooSmall = 6,
    /// The request token is not one of an in-flight request (never issued, or completed).
    UnknownToken = 7,
    /// The library panicked; the panic was caught at the boundary.
    Panic = 8,
    /// An argument is out of its range (an outcome code, a NaN metric, a length).
    InvalidArgument = 9,
    /// An address is not `ip:port`.
    InvalidAddress = 10,
    /// No endpoint with that address is in the pool.
    UnknownEndpoint = 11,
    /// The request body exceeds the configured limit (HTTP 413).
    BodyTooLarge = 12,
    /// Flow control did not admit the request: shed (sheddable while the pool is saturated),
    /// its queue was full, or it waited past its TTL (HTTP 429).
    NotAdmitted = 13,
}

impl EppStatus {
    /// The HTTP status a proxy should answer with when scheduling fails with this status.
    /// `epp_schedule` writes the exact one to `out_http_status`, which for `NotAdmitted` is
    /// the flow-control rejection's (429; 499 for a request cancelled while queued).
    pub fn http_status(self) -> i32 {
        match self {
            Self::Ok => 200,
            Self::BadRequest | Self::InvalidUtf8 => 400,
            Self::BodyTooLarge => 413,
            Self::NotAdmitted => 429,
            Self::NoEndpoint => 503,
            // The remaining failures are the caller's or ours, not the client's.
            _ => 500,
        }
    }
}

/// A failed call: its status, the HTTP status a proxy answers with, and the message for
/// `epp_last_error_message`.
#[derive(Debug)]
pub(crate) struct Error {
    pub(crate) status: EppStatus,
    pub(crate) http_status: i32,
    pub(crate) message: String,
}

impl Error {
    /// An error answered with the HTTP status `status` maps to.
    pub(crate) fn new(status: EppStatus, message: impl Into<String>) -> Self {
        Self { status, http_status: status.http_status(), message: message.into() }
    }

    /// The same error answered with `http_status`, when the cause knows better than the
    /// status (a flow-control rejection says 429 or 499).
    pub(crate) fn with_http_status(mut self, http_status: u16) -> Self {
        self.http_status = i32::from(http_status);
        self
    }
}

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Records `message` as the calling thread's last error.
pub(crate) fn set_last_error(message: String) {
    // Called after the guarded body, outside `catch_unwind`: it must not panic, so a (never
    // expected) concurrent borrow on this thread leaves the old message instead.
    LAST_ERROR.with(|cell| {
        if let Ok(mut last) = cell.try_borrow_mut() {
            *last = message;
        }
    });
}

/// Copies the calling thread's last error into `out` (NUL-terminated, cut to fit on a
/// character boundary) and returns the full message's length in bytes.
pub(crate) fn copy_last_error(out: Option<&mut [u8]>) -> usize {
    LAST_ERROR.with(|cell| {
        let message = cell.borrow();
        if let Some(out) = out
            && let Some(room) = out.len().checked_sub(1)
        {
            let mut end = message.len().min(room);
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            out[..end].copy_from_slice(&message.as_bytes()[..end]);
            out[end] = 0;
        }
        message.len()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_error_is_cut_on_a_character_boundary_and_reports_its_full_length() {
        set_last_error("héllo".to_owned());
        let mut buffer = [0xffu8; 3];
        assert_eq!(copy_last_error(Some(&mut buffer)), 6);
        assert_eq!(&buffer, b"h\0\xff", "the two-byte 'é' does not fit beside the NUL");
        assert_eq!(copy_last_error(None), 6);
        let mut empty: [u8; 0] = [];
        assert_eq!(copy_last_error(Some(&mut empty)), 6);
    }
}
