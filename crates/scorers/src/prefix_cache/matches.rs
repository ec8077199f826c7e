//! The prefix matches of one decision, shared through the decision's cycle state by the
//! producers that compute them and the scorers and filters that read them.

/// One producer's matches by pool position (llm-d's `PrefixCacheMatchInfo`).
#[derive(Debug, Default)]
pub(crate) struct PrefixMatchInfo {
    /// The producer these are from.
    producer: u64,
    /// The decision these are for.
    pub(crate) produced_for: Option<u64>,
    /// The prompt's blocks.
    pub(crate) total_blocks: usize,
    /// Matched leading blocks, by pool position.
    pub(crate) matched_blocks: Vec<usize>,
}

impl PrefixMatchInfo {
    /// Matched leading blocks of the endpoint at pool position `index`.
    pub(crate) fn matched(&self, index: u32) -> usize {
        self.matched_blocks.get(index as usize).copied().unwrap_or(0)
    }

    /// Matched / total blocks of the endpoint at pool position `index` (0 for a prompt
    /// shorter than a block, as for a missing llm-d attribute).
    pub(crate) fn ratio(&self, index: u32) -> f64 {
        if self.total_blocks == 0 {
            return 0.0;
        }
        self.matched(index) as f64 / self.total_blocks as f64
    }
}

/// Every producer's matches in a decision's `CycleState`; usually one.
#[derive(Debug, Default)]
pub(crate) struct PrefixMatches {
    by_producer: Vec<PrefixMatchInfo>,
}

impl PrefixMatches {
    /// `producer`'s matches, when produced for the decision stamped `decision`.
    pub(crate) fn of(&self, producer: u64, decision: u64) -> Option<&PrefixMatchInfo> {
        self.by_producer
            .iter()
            .find(|info| info.producer == producer && info.produced_for == Some(decision))
    }

    /// `producer`'s entry, created empty on first use (its buffers reused afterwards).
    pub(crate) fn slot(&mut self, producer: u64) -> &mut PrefixMatchInfo {
        match self.by_producer.iter().position(|info| info.producer == producer) {
            Some(at) => &mut self.by_producer[at],
            None => {
                self.by_producer.push(PrefixMatchInfo { producer, ..PrefixMatchInfo::default() });
                let last = self.by_producer.len() - 1;
                &mut self.by_producer[last]
            }
        }
    }
}
