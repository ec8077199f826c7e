//! epp-rs: the Gateway API Inference Extension endpoint picker as an embeddable Rust library.
//!
//! This crate gathers the workspace's libraries behind one dependency:
//! [`core`] (types, plugin traits, profiles, config, scheduler) and [`scorers`] (the built-in
//! filters, scorers and pickers, registered by their GIE type names).
//!
//! ```
//! use std::sync::Arc;
//! use epp_rs::core::{Endpoint, EndpointState, InferenceRequest, PoolSnapshot};
//!
//! let scheduler = epp_rs::scorers::default_scheduler()?;
//! let pool = Arc::new(PoolSnapshot::new([EndpointState::new(Endpoint::new(
//!     "10.0.0.1:8000".parse()?,
//! ))]));
//! let result = scheduler.schedule(&InferenceRequest::new("llama", "Hello"), &pool)?;
//! assert_eq!(result.primary().endpoint.address.port(), 8000);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub use scheduler_core as core;
pub use scorers;

/// The README's code blocks, compiled and run as doctests so that the embedding example there
/// stays a working program.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
