//! The reverse map of one shard: which (endpoint slot, LRU node) pairs hold a block hash.
//!
//! # Algorithm
//! An open-addressing table with linear probing whose 16-byte buckets hold, for each block, either
//! its holders one pair at a time (`(key, slot, node)`, all pairs of one key in the probe run
//! that starts at the key's home bucket) or, for a block held by many endpoints, a single marker
//! naming a [`HolderSet`]: a bitset over endpoint slots plus the holders' LRU nodes in slot order.
//!
//! The table is kept in Robin Hood order (Celis, 1986): within a cluster, entries sit in order of
//! their home bucket, so a search stops at the first entry whose home lies past its own instead
//! of scanning to the end of the cluster. That matters here because finding *all* holders of a
//! block is a search that cannot stop at the first match: under plain linear probing it costs an
//! unsuccessful search, about 13 buckets at a load of 0.8, against about 3 in Robin Hood order
//! (Knuth, TAOCP vol. 3, 6.4). Deletion shifts the following entries back while they are away
//! from home (no tombstones). Keys are block hashes already scrambled by
//! [`mix64`](crate::mix64) (a bijection), which makes an entry's home one multiplication away.
//!
//! A block moves into a set when its `PROMOTE_AT`-th holder arrives (and the bitset would cost at
//! most half a word per holder), and back into pairs when fewer than `DEMOTE_BELOW` hold it or the
//! bitset grew past one word per holder. The gap between the two thresholds keeps a block whose
//! holder count hovers near one of them from switching on every record.
//!
//! Why: a system prompt held by every endpoint used to be one probe run as long as the pool, which
//! every lookup and every neighbouring hash had to scan; as a set it is one bucket and a bitset
//! that a lookup intersects a word at a time.
//!
//! # Bound
//! The bucket count is not tied to powers of two: the table grows to `len / 0.64` buckets when an
//! insert would pass a load of 0.8, and shrinks back to `len / 0.64` when a removal leaves it under
//! half full. Hence, after every operation, `buckets <= max(MIN_BUCKETS, 2 * len)`: at most 32 bytes
//! per bucket entry. A set of `m >= DEMOTE_BELOW` holders costs its marker (32 bytes), at most two
//! `SET_BYTES` entries of the set vector (itself within `max(8, 2 * sets)` entries), `8 * W <= 8 m`
//! bytes of bitset and at most `2 m` node indices (`8 m` bytes): at most `32 + 2 * SET_BYTES + 16 m
//! <= 32 m` bytes. So every (block, endpoint) pair costs at most 32 bytes plus the per-shard constant
//! `MIN_BUCKETS * BUCKET_BYTES + 8 * SET_BYTES`.

use std::mem::size_of;

/// Smallest non-empty table.
pub(crate) const MIN_BUCKETS: usize = 16;
/// Bytes of one bucket.
pub(crate) const BUCKET_BYTES: usize = size_of::<BlockEntry>();
/// Buckets per 64-byte cache line.
const BUCKETS_PER_LINE: usize = 64 / BUCKET_BYTES;
/// Bytes of one entry of a shard's set vector.
pub(crate) const SET_BYTES: usize = size_of::<HolderSet>();
/// Smallest allocated set vector.
pub(crate) const MIN_SETS: usize = 8;
/// Holder count at which a block's pairs become a set.
pub(crate) const PROMOTE_AT: usize = 32;
/// A set whose holder count falls below this goes back to pairs.
pub(crate) const DEMOTE_BELOW: usize = 16;
// The per-holder bound of the module docs, at the smallest set: marker, two set-vector entries,
// bitset and node indices of `m` holders within 32 bytes each.
const _: () = assert!(2 * BUCKET_BYTES + 2 * SET_BYTES + 16 * DEMOTE_BELOW <= 32 * DEMOTE_BELOW);
const _: () = assert!(DEMOTE_BELOW * 2 <= PROMOTE_AT);

/// First slot value that is not an endpoint: slots must stay below it.
pub(crate) const MAX_SLOTS: u32 = SET_SLOT;

const EMPTY_SLOT: u32 = u32::MAX;
/// `slot` of a set marker, whose `node` is then the set's index in the shard's set vector.
const SET_SLOT: u32 = u32::MAX - 1;

/// One bucket: an (endpoint, block) pair, where `node` is the block's node in the endpoint's LRU
/// slab (which lets a writer touch a block it already holds without a per-endpoint map), or a set
/// marker (`slot == SET_SLOT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockEntry {
    /// The block hash passed through [`mix64`](crate::mix64).
    pub(crate) key: u64,
    pub(crate) slot: u32,
    pub(crate) node: u32,
}

impl BlockEntry {
    fn is_pair(self) -> bool {
        self.slot < SET_SLOT
    }
}

const EMPTY: BlockEntry = BlockEntry { key: 0, slot: EMPTY_SLOT, node: 0 };

/// Whether bit `slot` is set in `bits` (absent words read as zero).
pub(crate) fn bit_is_set(bits: &[u64], slot: u32) -> bool {
    bits.get(slot as usize / 64).is_some_and(|word| word >> (slot % 64) & 1 == 1)
}

fn words_for(slot: u32) -> usize {
    slot as usize / 64 + 1
}

/// The holders of one popular block.
#[derive(Debug)]
struct HolderSet {
    key: u64,
    /// Bit `s` is set when endpoint slot `s` holds the block. Allocated exactly.
    bits: Vec<u64>,
    /// The holders' LRU nodes in slot order: slot `s`'s node sits at the rank of bit `s`.
    nodes: Vec<u32>,
}

impl HolderSet {
    fn len(&self) -> usize {
        self.nodes.len()
    }

    fn heap_bytes(&self) -> usize {
        self.bits.capacity() * size_of::<u64>() + self.nodes.capacity() * size_of::<u32>()
    }

    /// Number of set bits below `slot`.
    fn rank(&self, slot: u32) -> usize {
        let word = slot as usize / 64;
        let below: u32 = self.bits.iter().take(word).map(|w| w.count_ones()).sum();
        let partial =
            self.bits.get(word).map_or(0, |w| (w & ((1u64 << (slot % 64)) - 1)).count_ones());
        (below + partial) as usize
    }

    fn find(&self, slot: u32) -> Option<u32> {
        if bit_is_set(&self.bits, slot) { self.nodes.get(self.rank(slot)).copied() } else { None }
    }

    /// Adds a holder the caller knows to be absent.
    fn insert(&mut self, slot: u32, node: u32) {
        let words = words_for(slot);
        if words > self.bits.len() {
            self.bits.reserve_exact(words - self.bits.len());
            self.bits.resize(words, 0);
        }
        let rank = self.rank(slot).min(self.nodes.len());
        if let Some(word) = self.bits.get_mut(slot as usize / 64) {
            *word |= 1 << (slot % 64);
        }
        if self.nodes.len() == self.nodes.capacity() {
            self.nodes.reserve_exact(self.nodes.len().max(4));
        }
        self.nodes.insert(rank, node);
    }

    fn remove(&mut self, slot: u32) -> bool {
        if !bit_is_set(&self.bits, slot) {
            return false;
        }
        let rank = self.rank(slot);
        if let Some(word) = self.bits.get_mut(slot as usize / 64) {
            *word &= !(1 << (slot % 64));
        }
        if rank < self.nodes.len() {
            self.nodes.remove(rank);
        }
        if self.nodes.capacity() > 2 * self.nodes.len() {
            self.nodes.shrink_to(self.nodes.len() + self.nodes.len() / 2);
        }
        true
    }

    /// Too few holders for the bitset and the marker to pay for themselves.
    fn should_demote(&self) -> bool {
        self.len() < DEMOTE_BELOW || self.bits.len() > self.len()
    }

    /// `(slot, node)` of every holder, in slot order.
    fn pairs(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.bits
            .iter()
            .enumerate()
            .flat_map(|(w, &word)| SetBits { word, base: w * 64 })
            .zip(self.nodes.iter().copied())
    }

    fn check(&self) -> Result<(), String> {
        let ones: u32 = self.bits.iter().map(|w| w.count_ones()).sum();
        if ones as usize != self.len() {
            return Err(format!("set of {:#x}: {ones} bits but {} nodes", self.key, self.len()));
        }
        if self.should_demote() {
            return Err(format!(
                "set of {:#x}: {} holders in {} words should be pairs",
                self.key,
                self.len(),
                self.bits.len()
            ));
        }
        if self.bits.capacity() > self.len() || self.nodes.capacity() > 2 * self.len() {
            return Err(format!("set of {:#x} over its size bound", self.key));
        }
        Ok(())
    }
}

/// The slots whose bits are set in one word, lowest first.
pub(crate) struct SetBits {
    pub(crate) word: u64,
    pub(crate) base: usize,
}

impl Iterator for SetBits {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        if self.word == 0 {
            return None;
        }
        let bit = self.word.trailing_zeros() as usize;
        self.word &= self.word - 1;
        // Slots are `u32`, so any set bit of a set built from slots fits.
        u32::try_from(self.base + bit).ok()
    }
}

/// The holders of one block, as a lookup sees them.
pub(crate) enum Holders<'a> {
    /// A few holders, one bucket each.
    Pairs(PairSlots<'a>),
    /// Many holders: bit `s` set when slot `s` holds the block.
    Set(&'a [u64]),
}

/// The slots of one hash's pairs, read off its probe run.
pub(crate) struct PairSlots<'a> {
    buckets: &'a [BlockEntry],
    key: u64,
    next: usize,
    /// How far `next` is from the key's home.
    distance: usize,
    left: usize,
}

impl Iterator for PairSlots<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        while self.left > 0 {
            self.left -= 1;
            let n = self.buckets.len();
            let entry = *self.buckets.get(self.next)?;
            if entry.slot == EMPTY_SLOT || BlockTable::distance(entry, self.next, n) < self.distance
            {
                self.left = 0;
                return None;
            }
            self.next = BlockTable::next(self.next, n);
            self.distance += 1;
            if entry.key == self.key && entry.is_pair() {
                return Some(entry.slot);
            }
        }
        None
    }
}

#[derive(Debug, Default)]
pub(crate) struct BlockTable {
    buckets: Vec<BlockEntry>,
    /// Occupied buckets (pairs and set markers).
    occupied: usize,
    /// (endpoint, block) pairs, in buckets and in sets.
    pairs: usize,
    sets: Vec<HolderSet>,
}

impl BlockTable {
    /// Number of (endpoint, block) pairs.
    pub(crate) fn len(&self) -> usize {
        self.pairs
    }

    /// Number of blocks whose holders are kept as a set.
    pub(crate) fn set_count(&self) -> usize {
        self.sets.len()
    }

    /// Heap bytes held, from allocated capacities.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.buckets.capacity() * BUCKET_BYTES
            + self.sets.capacity() * SET_BYTES
            + self.sets.iter().map(HolderSet::heap_bytes).sum::<usize>()
    }

    fn home(key: u64, bucket_count: usize) -> usize {
        // Multiply-shift maps the mixed hash onto any bucket count, not only powers of two.
        ((u128::from(key) * bucket_count as u128) >> 64) as usize
    }

    /// How far bucket `index` is from `entry`'s home.
    fn distance(entry: BlockEntry, index: usize, bucket_count: usize) -> usize {
        let home = Self::home(entry.key, bucket_count);
        if index >= home { index - home } else { index + bucket_count - home }
    }

    fn next(index: usize, bucket_count: usize) -> usize {
        if index + 1 == bucket_count { 0 } else { index + 1 }
    }

    /// Calls `f(bucket_index, entry)` for every entry of `key` in its probe run, in order, until `f`
    /// returns `false`.
    fn scan_run(&self, key: u64, mut f: impl FnMut(usize, BlockEntry) -> bool) {
        let n = self.buckets.len();
        if n == 0 {
            return;
        }
        let mut i = Self::home(key, n);
        // The load stays below 0.8, so an empty bucket ends every run; the count is a safety net.
        for distance in 0..n {
            let Some(&entry) = self.buckets.get(i) else {
                return;
            };
            // Robin Hood order: an entry closer to its home than `key` would be has its home past
            // `key`'s, and so has every later entry of the cluster.
            if entry.slot == EMPTY_SLOT || Self::distance(entry, i, n) < distance {
                return;
            }
            if entry.key == key && !f(i, entry) {
                return;
            }
            i = Self::next(i, n);
        }
    }

    /// The first entry of `key` in its run: a set marker when the block has a set (its pairs are
    /// then all in the set), otherwise one of its pairs.
    fn first_of(&self, key: u64) -> Option<(usize, BlockEntry)> {
        let mut found = None;
        self.scan_run(key, |i, entry| {
            found = Some((i, entry));
            false
        });
        found
    }

    /// Reads the buckets an operation on `key` is likely to visit (the home bucket and the
    /// next few cache lines of its probe run) and returns a value derived from them, so that
    /// the operation right after finds them in cache. Called for a batch of keys in a loop
    /// whose loads do not depend on each other, it lets their cache misses overlap (a prefetch
    /// without `unsafe`); pass the combined result to `std::hint::black_box` so the loads are
    /// kept. `lines` is how many 64-byte lines to read from the home bucket on.
    #[inline]
    pub(crate) fn warm(&self, key: u64, lines: usize) -> u64 {
        let n = self.buckets.len();
        if n == 0 {
            return 0;
        }
        let home = Self::home(key, n);
        let mut acc = 0;
        for line in 0..lines {
            let i = home + line * BUCKETS_PER_LINE;
            let i = if i >= n { i - n } else { i };
            acc ^= self.buckets.get(i).map_or(0, |entry| entry.key);
        }
        acc
    }

    /// The LRU node of block `key` in endpoint `slot`, if that endpoint holds the block.
    pub(crate) fn find(&self, key: u64, slot: u32) -> Option<u32> {
        // One pass: a marker means the block's holders are all in its set, as no pair of a block
        // with a set stays in the buckets.
        let (mut node, mut set) = (None, None);
        self.scan_run(key, |_, entry| {
            if entry.slot == SET_SLOT {
                set = Some(entry.node as usize);
            } else if entry.slot == slot {
                node = Some(entry.node);
            } else {
                return true;
            }
            false
        });
        match set {
            Some(index) => self.sets.get(index)?.find(slot),
            None => node,
        }
    }

    /// Bucket index and node of the entry `(hash, slot)` (a pair, or with `SET_SLOT` a marker).
    fn position(&self, key: u64, slot: u32) -> Option<(usize, u32)> {
        let mut found = None;
        self.scan_run(key, |i, entry| {
            if entry.slot == slot {
                found = Some((i, entry.node));
                false
            } else {
                true
            }
        });
        found
    }

    /// The endpoint slots holding block `key`.
    pub(crate) fn holders(&self, key: u64) -> Holders<'_> {
        let empty = PairSlots { buckets: &[], key, next: 0, distance: 0, left: 0 };
        match self.first_of(key) {
            None => Holders::Pairs(empty),
            Some((_, entry)) if entry.slot == SET_SLOT => {
                match self.sets.get(entry.node as usize) {
                    Some(set) => Holders::Set(&set.bits),
                    None => Holders::Pairs(empty),
                }
            }
            Some((start, entry)) => Holders::Pairs(PairSlots {
                buckets: &self.buckets,
                key,
                next: start,
                distance: Self::distance(entry, start, self.buckets.len()),
                left: self.buckets.len(),
            }),
        }
    }

    /// Adds a pair the caller knows to be absent, turning the block's pairs into a set when it
    /// reaches `PROMOTE_AT` holders.
    pub(crate) fn insert(&mut self, entry: BlockEntry) {
        if !entry.is_pair() {
            return;
        }
        let (mut count, mut marker, mut top_slot) = (0usize, None, entry.slot);
        self.scan_run(entry.key, |_, held| {
            if held.slot == SET_SLOT {
                marker = Some(held.node as usize);
                return false;
            }
            count += 1;
            top_slot = top_slot.max(held.slot);
            true
        });
        if let Some(index) = marker {
            if let Some(set) = self.sets.get_mut(index) {
                set.insert(entry.slot, entry.node);
                self.pairs += 1;
            }
            return;
        }
        let holders = count + 1;
        if holders >= PROMOTE_AT && 2 * words_for(top_slot) <= holders {
            self.promote(entry);
        } else {
            self.insert_bucket(entry);
        }
        self.pairs += 1;
    }

    /// Moves the pairs of `entry.key`, plus `entry`, into a new set.
    fn promote(&mut self, entry: BlockEntry) {
        let Ok(index) = u32::try_from(self.sets.len()) else {
            // Out of set indices (never in practice): the block simply stays as pairs.
            self.insert_bucket(entry);
            return;
        };
        let mut members = vec![(entry.slot, entry.node)];
        self.scan_run(entry.key, |_, held| {
            members.push((held.slot, held.node));
            true
        });
        for &(slot, _) in members.iter().skip(1) {
            self.remove_bucket(entry.key, slot);
        }
        members.sort_unstable();
        let top = members.last().map_or(0, |&(slot, _)| slot);
        let mut set = HolderSet {
            key: entry.key,
            bits: vec![0; words_for(top)],
            nodes: members.iter().map(|&(_, node)| node).collect(),
        };
        for &(slot, _) in &members {
            if let Some(word) = set.bits.get_mut(slot as usize / 64) {
                *word |= 1 << (slot % 64);
            }
        }
        if self.sets.len() == self.sets.capacity() {
            self.sets.reserve_exact(self.sets.len().max(MIN_SETS / 2));
        }
        self.sets.push(set);
        self.insert_bucket(BlockEntry { key: entry.key, slot: SET_SLOT, node: index });
    }

    /// Moves the holders of set `index` back into pairs.
    fn demote(&mut self, index: usize) {
        if index >= self.sets.len() {
            return;
        }
        let set = self.sets.swap_remove(index);
        if let Some(moved) = self.sets.get(index).map(|s| s.key) {
            // The last set now lives at `index`: repoint its marker.
            if let Some((bucket, _)) = self.position(moved, SET_SLOT)
                && let Some(marker) = self.buckets.get_mut(bucket)
            {
                marker.node = index as u32;
            }
        }
        if self.sets.is_empty() {
            self.sets = Vec::new();
        } else if self.sets.capacity() > 2 * self.sets.len() {
            self.sets.shrink_to(self.sets.len());
        }
        self.remove_bucket(set.key, SET_SLOT);
        for (slot, node) in set.pairs() {
            self.insert_bucket(BlockEntry { key: set.key, slot, node });
        }
    }

    fn insert_bucket(&mut self, entry: BlockEntry) {
        if (self.occupied + 1) * 5 > self.buckets.len() * 4 {
            self.rebuild(self.occupied + 1);
        }
        self.place(entry);
        self.occupied += 1;
    }

    /// Robin Hood insertion: the entry takes the first bucket whose occupant is closer to its own
    /// home, and the occupant moves on in its place, which keeps every cluster in home order.
    fn place(&mut self, mut entry: BlockEntry) {
        let n = self.buckets.len();
        let mut i = Self::home(entry.key, n);
        let mut distance = 0;
        for _ in 0..n {
            let Some(bucket) = self.buckets.get_mut(i) else {
                return;
            };
            if bucket.slot == EMPTY_SLOT {
                *bucket = entry;
                return;
            }
            let occupant = Self::distance(*bucket, i, n);
            if occupant < distance {
                entry = std::mem::replace(bucket, entry);
                distance = occupant;
            }
            i = Self::next(i, n);
            distance += 1;
        }
    }

    /// Removes the pair if present; returns whether it was. A set left with too few holders goes
    /// back to pairs.
    pub(crate) fn remove(&mut self, key: u64, slot: u32) -> bool {
        if slot >= SET_SLOT {
            return false;
        }
        // One pass over the run: a set marker (then the block's holders are all in the set) or
        // the pair itself.
        let mut found = None;
        self.scan_run(key, |i, entry| {
            if entry.slot == SET_SLOT || entry.slot == slot {
                found = Some((i, entry));
                false
            } else {
                true
            }
        });
        match found {
            None => false,
            Some((_, entry)) if entry.slot == SET_SLOT => {
                let index = entry.node as usize;
                let Some(set) = self.sets.get_mut(index) else {
                    return false;
                };
                if !set.remove(slot) {
                    return false;
                }
                self.pairs -= 1;
                if set.should_demote() {
                    self.demote(index);
                }
                true
            }
            Some((hole, _)) => {
                self.remove_at(hole);
                self.pairs -= 1;
                true
            }
        }
    }

    fn remove_bucket(&mut self, key: u64, slot: u32) -> bool {
        let Some((hole, _)) = self.position(key, slot) else {
            return false;
        };
        self.remove_at(hole);
        true
    }

    /// Empties the occupied bucket `hole`.
    fn remove_at(&mut self, mut hole: usize) {
        let n = self.buckets.len();
        // Backward-shift deletion: move each following entry that is away from home one bucket
        // back; this keeps clusters contiguous and in home order.
        for _ in 0..n {
            let j = Self::next(hole, n);
            let Some(&follower) = self.buckets.get(j) else {
                break;
            };
            if follower.slot == EMPTY_SLOT || Self::distance(follower, j, n) == 0 {
                break;
            }
            if let Some(bucket) = self.buckets.get_mut(hole) {
                *bucket = follower;
            }
            hole = j;
        }
        if let Some(bucket) = self.buckets.get_mut(hole) {
            *bucket = EMPTY;
        }
        self.occupied -= 1;
        if self.occupied == 0 {
            self.buckets = Vec::new();
        } else if self.occupied * 2 < n && n > MIN_BUCKETS {
            self.rebuild(self.occupied);
        }
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

    /// Every stored (endpoint, block) pair: those in buckets in bucket order, then those in sets.
    pub(crate) fn entries(&self) -> impl Iterator<Item = BlockEntry> + '_ {
        let in_buckets = self.buckets.iter().copied().filter(|e| e.is_pair());
        let in_sets = self.sets.iter().flat_map(|set| {
            set.pairs().map(|(slot, node)| BlockEntry { key: set.key, slot, node })
        });
        in_buckets.chain(in_sets)
    }

    /// Checks run contiguity (every entry reachable from its home), that each set has exactly one
    /// marker and no stray pairs, and the size bounds.
    pub(crate) fn check(&self) -> Result<(), String> {
        let n = self.buckets.len();
        let stored = self.buckets.iter().filter(|e| e.slot != EMPTY_SLOT).count();
        if stored != self.occupied {
            return Err(format!("{} occupied buckets counted but {stored} stored", self.occupied));
        }
        if self.occupied * 5 > n * 4 {
            return Err(format!("load above 0.8: {} entries in {n} buckets", self.occupied));
        }
        if n > MIN_BUCKETS.max(2 * self.occupied) {
            return Err(format!("{n} buckets for {} entries", self.occupied));
        }
        if self.sets.capacity() > MIN_SETS.max(2 * self.sets.len()) {
            return Err(format!(
                "set vector of {} for {} sets",
                self.sets.capacity(),
                self.sets.len()
            ));
        }
        for (i, entry) in self.buckets.iter().enumerate() {
            let before = if i == 0 { n - 1 } else { i - 1 };
            let allowed = match self.buckets.get(before) {
                Some(p) if p.slot != EMPTY_SLOT => Self::distance(*p, before, n) + 1,
                _ => 0,
            };
            if entry.slot != EMPTY_SLOT && Self::distance(*entry, i, n) > allowed {
                return Err(format!("bucket {i} out of Robin Hood order"));
            }
        }
        let mut markers = 0;
        for entry in self.buckets.iter().filter(|e| e.slot != EMPTY_SLOT) {
            if self.position(entry.key, entry.slot).is_none() {
                return Err(format!("entry {entry:?} unreachable from its home bucket"));
            }
            if entry.slot == SET_SLOT {
                markers += 1;
                match self.sets.get(entry.node as usize) {
                    Some(set) if set.key == entry.key => {}
                    _ => return Err(format!("marker {entry:?} names the wrong set")),
                }
                let mut of_hash = 0;
                self.scan_run(entry.key, |_, _| {
                    of_hash += 1;
                    true
                });
                if of_hash != 1 {
                    return Err(format!("pairs beside the set marker {entry:?}"));
                }
            }
        }
        if markers != self.sets.len() {
            return Err(format!("{markers} markers for {} sets", self.sets.len()));
        }
        for set in &self.sets {
            set.check()?;
        }
        let pairs = self.entries().count();
        if pairs != self.pairs {
            return Err(format!("{} pairs counted but {pairs} stored", self.pairs));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::mix64;

    #[test]
    fn insert_find_remove_keep_runs_reachable() {
        let mut table = BlockTable::default();
        for hash in 0..200u64 {
            for slot in 0..(hash % 4) as u32 {
                table.insert(BlockEntry { key: mix64(hash), slot, node: slot + 7 });
            }
        }
        assert_eq!(table.check(), Ok(()));
        assert_eq!(table.find(mix64(7), 2), Some(9));
        assert_eq!(table.find(mix64(7), 3), None);
        for hash in (0..200u64).step_by(3) {
            for slot in 0..(hash % 4) as u32 {
                assert!(table.remove(mix64(hash), slot));
            }
            assert_eq!(table.check(), Ok(()));
        }
        assert_eq!(slots_of(&table, mix64(199)), vec![0, 1, 2]);
        assert!(!table.remove(mix64(199), 3));
    }

    fn slots_of(table: &BlockTable, hash: u64) -> Vec<u32> {
        let mut slots: Vec<u32> = match table.holders(hash) {
            Holders::Pairs(pairs) => pairs.collect(),
            Holders::Set(bits) => bits
                .iter()
                .enumerate()
                .flat_map(|(w, &word)| SetBits { word, base: w * 64 })
                .collect(),
        };
        slots.sort_unstable();
        slots
    }

    #[test]
    fn popular_blocks_switch_to_a_set_and_back() {
        let mut table = BlockTable::default();
        // A few unpopular neighbours share the table with the popular block 7.
        for hash in 100..140u64 {
            table.insert(BlockEntry { key: mix64(hash), slot: 3, node: 1 });
        }
        for slot in 0..PROMOTE_AT as u32 {
            assert_eq!(table.set_count(), 0);
            table.insert(BlockEntry { key: mix64(7), slot: 2 * slot, node: 1000 + slot });
            assert_eq!(table.check(), Ok(()));
        }
        assert_eq!(table.set_count(), 1);
        assert!(matches!(table.holders(mix64(7)), Holders::Set(_)));
        assert_eq!(table.find(mix64(7), 10), Some(1005));
        assert_eq!(table.find(mix64(7), 11), None);
        assert_eq!(table.len(), 40 + PROMOTE_AT);
        let expected: Vec<u32> = (0..PROMOTE_AT as u32).map(|s| 2 * s).collect();
        assert_eq!(slots_of(&table, mix64(7)), expected);
        // Shrinking to just above the lower threshold keeps the set.
        for slot in 0..(PROMOTE_AT - DEMOTE_BELOW) as u32 {
            assert!(table.remove(mix64(7), 2 * slot));
            assert_eq!(table.check(), Ok(()));
        }
        assert_eq!(table.set_count(), 1);
        assert!(!table.remove(mix64(7), 1));
        assert!(table.remove(mix64(7), 2 * (PROMOTE_AT - DEMOTE_BELOW) as u32));
        assert_eq!(table.set_count(), 0);
        assert_eq!(table.check(), Ok(()));
        assert_eq!(table.find(mix64(7), 62), Some(1031));
        assert_eq!(slots_of(&table, mix64(7)).len(), DEMOTE_BELOW - 1);
        assert_eq!(table.len(), 40 + DEMOTE_BELOW - 1);
    }

    #[test]
    fn sparse_high_slots_stay_pairs() {
        let mut table = BlockTable::default();
        // 40 holders spread over 40 * 640 slots would need 400 bitset words: too costly.
        for slot in 0..40u32 {
            table.insert(BlockEntry { key: mix64(9), slot: slot * 640, node: slot });
        }
        assert_eq!(table.set_count(), 0);
        assert_eq!(table.check(), Ok(()));
        assert_eq!(slots_of(&table, mix64(9)).len(), 40);
    }
}
