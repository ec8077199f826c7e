//! The reverse map of one shard: which (endpoint slot, LRU node) pairs hold a block hash.
//!
//! # Algorithm
//! An open-addressing multimap with linear probing: one 16-byte bucket per (block, endpoint)
//! pair, all pairs of one block hash living in the probe run that starts at the hash's home
//! bucket. Deletion shifts the following run back (no tombstones), so "all holders of `h`" is a
//! scan from `home(h)` to the first empty bucket, and a run never outlives its entries.
//!
//! # Bound
//! The bucket count is not tied to powers of two: the table grows to `len / 0.64` buckets when an
//! insert would pass a load of 0.8, and shrinks back to `len / 0.64` when a removal leaves it under
//! half full. Hence, after every operation, `buckets <= max(MIN_BUCKETS, 2 * len)` and the map costs
//! at most 32 bytes per entry, 20–25 bytes in steady state. A power-of-two table would swing
//! between 18 and 37 bytes per entry with no say in where it sits.

/// Smallest non-empty table.
pub(crate) const MIN_BUCKETS: usize = 16;
/// Bytes of one bucket.
pub(crate) const BUCKET_BYTES: usize = std::mem::size_of::<BlockEntry>();

const EMPTY_SLOT: u32 = u32::MAX;

/// One (block hash, endpoint) pair: `node` is the block's node in the endpoint's LRU slab, which
/// lets a writer touch a block it already holds without a per-endpoint hash map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockEntry {
    pub(crate) hash: u64,
    pub(crate) slot: u32,
    pub(crate) node: u32,
}

const EMPTY: BlockEntry = BlockEntry { hash: 0, slot: EMPTY_SLOT, node: 0 };

/// Scrambles a block hash so that callers passing small or structured integers still spread
/// over shards (low bits) and buckets (high bits).
pub(crate) fn mix(hash: u64) -> u64 {
    let mut x = hash ^ (hash >> 30);
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[derive(Debug, Default)]
pub(crate) struct BlockTable {
    buckets: Vec<BlockEntry>,
    len: usize,
}

impl BlockTable {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Heap bytes held, from the allocated capacity.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.buckets.capacity() * BUCKET_BYTES
    }

    fn home(hash: u64, bucket_count: usize) -> usize {
        // Multiply-shift maps the mixed hash onto any bucket count, not only powers of two.
        ((u128::from(mix(hash)) * bucket_count as u128) >> 64) as usize
    }

    fn next(index: usize, bucket_count: usize) -> usize {
        if index + 1 == bucket_count { 0 } else { index + 1 }
    }

    /// Calls `f(bucket_index, entry)` for every entry of `hash`'s probe run that has that hash.
    fn scan_run(&self, hash: u64, mut f: impl FnMut(usize, BlockEntry) -> bool) {
        let n = self.buckets.len();
        if n == 0 {
            return;
        }
        let mut i = Self::home(hash, n);
        // The load stays below 0.8, so an empty bucket ends every run; the count is a safety net.
        for _ in 0..n {
            let Some(&entry) = self.buckets.get(i) else {
                return;
            };
            if entry.slot == EMPTY_SLOT {
                return;
            }
            if entry.hash == hash && !f(i, entry) {
                return;
            }
            i = Self::next(i, n);
        }
    }

    /// The LRU node of `hash` in endpoint `slot`, if that endpoint holds the block.
    pub(crate) fn find(&self, hash: u64, slot: u32) -> Option<u32> {
        self.position(hash, slot).map(|(_, node)| node)
    }

    fn position(&self, hash: u64, slot: u32) -> Option<(usize, u32)> {
        let mut found = None;
        self.scan_run(hash, |i, entry| {
            if entry.slot == slot {
                found = Some((i, entry.node));
                false
            } else {
                true
            }
        });
        found
    }

    /// Calls `f(slot)` for every endpoint slot holding `hash`.
    pub(crate) fn for_each_holder(&self, hash: u64, mut f: impl FnMut(u32)) {
        self.scan_run(hash, |_, entry| {
            f(entry.slot);
            true
        });
    }

    /// Adds a pair the caller knows to be absent.
    pub(crate) fn insert(&mut self, entry: BlockEntry) {
        if entry.slot == EMPTY_SLOT {
            return;
        }
        if (self.len + 1) * 5 > self.buckets.len() * 4 {
            self.rebuild(self.len + 1);
        }
        self.place(entry);
        self.len += 1;
    }

    fn place(&mut self, entry: BlockEntry) {
        let n = self.buckets.len();
        let mut i = Self::home(entry.hash, n);
        for _ in 0..n {
            match self.buckets.get_mut(i) {
                Some(bucket) if bucket.slot == EMPTY_SLOT => {
                    *bucket = entry;
                    return;
                }
                Some(_) => i = Self::next(i, n),
                None => return,
            }
        }
    }

    /// Removes the pair if present; returns whether it was.
    pub(crate) fn remove(&mut self, hash: u64, slot: u32) -> bool {
        let Some((mut hole, _)) = self.position(hash, slot) else {
            return false;
        };
        let n = self.buckets.len();
        // Backward-shift deletion: pull later run members into the hole unless that would move
        // one before its home bucket, so every run stays contiguous from its home.
        let mut j = hole;
        for _ in 0..n {
            j = Self::next(j, n);
            let Some(&candidate) = self.buckets.get(j) else {
                break;
            };
            if candidate.slot == EMPTY_SLOT {
                break;
            }
            let home = Self::home(candidate.hash, n);
            let stays = if hole <= j { hole < home && home <= j } else { hole < home || home <= j };
            if !stays {
                if let Some(bucket) = self.buckets.get_mut(hole) {
                    *bucket = candidate;
                }
                hole = j;
            }
        }
        if let Some(bucket) = self.buckets.get_mut(hole) {
            *bucket = EMPTY;
        }
        self.len -= 1;
        if self.len == 0 {
            self.buckets = Vec::new();
        } else if self.len * 2 < n && n > MIN_BUCKETS {
            self.rebuild(self.len);
        }
        true
    }

    /// Reallocates to a load of 0.64 for `target_len` entries and re-places every entry.
    fn rebuild(&mut self, target_len: usize) {
        let bucket_count = (target_len * 25).div_ceil(16).max(MIN_BUCKETS);
        let old = std::mem::replace(&mut self.buckets, vec![EMPTY; bucket_count]);
        for entry in old {
            if entry.slot != EMPTY_SLOT {
                self.place(entry);
            }
        }
    }

    /// Every stored pair, in bucket order.
    pub(crate) fn entries(&self) -> impl Iterator<Item = BlockEntry> + '_ {
        self.buckets.iter().copied().filter(|e| e.slot != EMPTY_SLOT)
    }

    /// Checks run contiguity (every entry reachable from its home) and the size bounds.
    pub(crate) fn check(&self) -> Result<(), String> {
        let n = self.buckets.len();
        let stored = self.entries().count();
        if stored != self.len {
            return Err(format!("table len {} but {stored} stored entries", self.len));
        }
        if self.len * 5 > n * 4 {
            return Err(format!("load above 0.8: {} entries in {n} buckets", self.len));
        }
        if n > MIN_BUCKETS.max(2 * self.len) {
            return Err(format!("{n} buckets for {} entries", self.len));
        }
        for entry in self.entries() {
            if self.position(entry.hash, entry.slot).is_none() {
                return Err(format!("entry {entry:?} unreachable from its home bucket"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_find_remove_keep_runs_reachable() {
        let mut table = BlockTable::default();
        for hash in 0..200u64 {
            for slot in 0..(hash % 4) as u32 {
                table.insert(BlockEntry { hash, slot, node: slot + 7 });
            }
        }
        assert_eq!(table.check(), Ok(()));
        assert_eq!(table.find(7, 2), Some(9));
        assert_eq!(table.find(7, 3), None);
        for hash in (0..200u64).step_by(3) {
            for slot in 0..(hash % 4) as u32 {
                assert!(table.remove(hash, slot));
            }
            assert_eq!(table.check(), Ok(()));
        }
        let mut holders = Vec::new();
        table.for_each_holder(199, |slot| holders.push(slot));
        holders.sort_unstable();
        assert_eq!(holders, vec![0, 1, 2]);
        assert!(!table.remove(199, 3));
    }
}
