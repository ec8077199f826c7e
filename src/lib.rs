//! epp-rs: one dependency for embedders. Re-exports the scheduling core and the built-in plugins.
pub use scheduler_core as core;
