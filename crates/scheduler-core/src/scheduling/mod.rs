//! Scheduling a request: the plugin traits (filters, scorers, pickers, profile handlers,
//! hooks), the per-decision state they share, profiles (filters, then weighted scorers, then a
//! picker), the scheduler that runs them, and what a decision produces.

pub(crate) mod cycle;
pub(crate) mod plugin;
pub(crate) mod profile;
pub(crate) mod result;
pub(crate) mod scheduler;
