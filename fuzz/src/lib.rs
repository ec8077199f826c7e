//! The bodies of the fuzz targets, as plain functions.
//!
//! Each `fuzz_targets/<name>.rs` is a one-line libFuzzer entry calling the function of the same
//! name here. Keeping the bodies in a library lets the main workspace replay the checked-in
//! corpus (`fuzz/corpus/<name>/`) on stable Rust in an ordinary test, so the targets cannot rot
//! between fuzzing sessions.
//!
//! Every function must return normally for every input: a panic, an abort or a broken
//! invariant (checked with `assert!`) is a finding.

pub mod c_abi;
pub mod input;
pub mod kv_payload;
pub mod targets;

pub use c_abi::c_abi;
pub use kv_payload::kv_events;
pub use targets::{config, ext_proc_exchange, prometheus_text, request_body};
