//! Scheduling core.
