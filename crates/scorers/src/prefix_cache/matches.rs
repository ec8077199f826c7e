//! The prefix matches of one decision, shared by `prefix-cache-scorer` and
//! `prefix-cache-affinity-filter` through the decision's cycle state.

use prefix_cache::BlockHasherConfig;

/// The decision's prefix matches by pool position, kept in its `CycleState`: computed once
/// (by the scorer as a data producer before the profiles run, or at its first use), then
/// read by the scorer and by `prefix-cache-affinity-filter` (llm-d's `PrefixCacheMatchInfo`).
#[derive(Debug, Default)]
pub(crate) struct PrefixMatchInfo {
    /// The decision and block configuration these are for.
    pub(super) produced_for: Option<(u64, BlockHasherConfig)>,
    /// The prompt's blocks.
    pub(super) total_blocks: usize,
    /// Matched leading blocks, by pool position.
    pub(super) matched_blocks: Vec<usize>,
}

impl PrefixMatchInfo {
    /// Matched / total blocks of the endpoint at pool position `index`, when the info was
    /// produced for the decision stamped `decision` (0 otherwise, as for a missing llm-d
    /// attribute).
    pub(crate) fn ratio(&self, decision: u64, index: u32) -> f64 {
        match self.produced_for {
            Some((stamp, _)) if stamp == decision && self.total_blocks > 0 => {
                let matched = self.matched_blocks.get(index as usize).copied().unwrap_or(0);
                matched as f64 / self.total_blocks as f64
            }
            _ => 0.0,
        }
    }
}
