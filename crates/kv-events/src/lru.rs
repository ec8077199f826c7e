//! One endpoint's blocks: a bounded LRU keyed by engine block hash, with a count per llm-d key.
//!
//! Nodes live in a slab (`Vec<Node>`) linked by `u32` indices, freed nodes on a free list
//! threaded through the same links, so a store or a removal allocates nothing once the slab
//! and the two maps have grown to the endpoint's working set. Capacity is enforced on insert:
//! storing a new block into a full LRU first forgets its least recently stored block.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::mem::size_of;

const NIL: u32 = u32::MAX;

/// Hashes `u64` keys with the SplitMix64 finaliser: engine hashes may be small integers in
/// tests and older vLLM releases, so they are mixed rather than used as they are.
#[derive(Default, Clone, Copy)]
pub(crate) struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, x: u64) {
        let mut z = x ^ self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        self.0 = z ^ (z >> 31);
    }
}

pub(crate) type MixMap<V> = HashMap<u64, V, BuildHasherDefault<MixHasher>>;

#[derive(Debug, Clone, Copy)]
struct Node {
    engine: u64,
    key: u64,
    prev: u32,
    next: u32,
    /// One bit per medium holding the block ([`crate::index`] `medium_bit`).
    media: u8,
}

/// Bytes per slab node.
pub(crate) const NODE_BYTES: usize = size_of::<Node>();
/// Bytes per hash-map bucket of either map: the `(u64, u32)` entry, padded, plus one control
/// byte.
pub(crate) const BUCKET_BYTES: usize = size_of::<(u64, u32)>() + 1;

#[derive(Debug)]
pub(crate) struct BlockLru {
    nodes: Vec<Node>,
    free: u32,
    head: u32,
    tail: u32,
    len: usize,
    capacity: usize,
    by_engine: MixMap<u32>,
    keys: MixMap<u32>,
}

/// What a store did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stored {
    New,
    Refreshed,
    /// New, and the least recent block was forgotten to make room.
    Evicted,
}

impl BlockLru {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            nodes: Vec::new(),
            free: NIL,
            head: NIL,
            tail: NIL,
            len: 0,
            capacity: capacity.clamp(1, (u32::MAX - 1) as usize),
            by_engine: MixMap::default(),
            keys: MixMap::default(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn key_of(&self, engine: u64) -> Option<u64> {
        self.by_engine.get(&engine).map(|&i| self.nodes[i as usize].key)
    }

    pub(crate) fn holds_key(&self, key: u64) -> bool {
        self.keys.contains_key(&key)
    }

    /// Touches a held block and adds `media` to it; false when the block is not held.
    pub(crate) fn add_media(&mut self, engine: u64, media: u8) -> bool {
        match self.by_engine.get(&engine).copied() {
            Some(i) => {
                self.nodes[i as usize].media |= media;
                self.unlink(i);
                self.push_front(i);
                true
            }
            None => false,
        }
    }

    pub(crate) fn store(&mut self, engine: u64, key: u64, media: u8) -> Stored {
        if let Some(i) = self.by_engine.get(&engine).copied() {
            let node = &mut self.nodes[i as usize];
            node.media |= media;
            let old = node.key;
            if old != key {
                node.key = key;
                self.dec_key(old);
                *self.keys.entry(key).or_insert(0) += 1;
            }
            self.unlink(i);
            self.push_front(i);
            return Stored::Refreshed;
        }
        let mut outcome = Stored::New;
        if self.len >= self.capacity {
            let victim = self.tail;
            self.unlink_free(victim);
            outcome = Stored::Evicted;
        }
        let node = Node { engine, key, prev: NIL, next: NIL, media };
        let i = if self.free != NIL {
            let i = self.free;
            self.free = self.nodes[i as usize].next;
            self.nodes[i as usize] = node;
            i
        } else {
            if self.nodes.len() == self.nodes.capacity() {
                // Grow by doubling, but never past the capacity: the slab's bound is exact.
                let want = (self.nodes.len() * 2).max(8).min(self.capacity);
                self.nodes.reserve_exact(want.saturating_sub(self.nodes.len()).max(1));
            }
            self.nodes.push(node);
            (self.nodes.len() - 1) as u32
        };
        self.push_front(i);
        self.by_engine.insert(engine, i);
        *self.keys.entry(key).or_insert(0) += 1;
        self.len += 1;
        outcome
    }

    /// Removes `media` from a block, forgetting it once no medium holds it. True when the
    /// block was held.
    pub(crate) fn remove(&mut self, engine: u64, media: u8) -> bool {
        let Some(i) = self.by_engine.get(&engine).copied() else {
            return false;
        };
        let node = &mut self.nodes[i as usize];
        node.media &= !media;
        if node.media == 0 {
            self.unlink_free(i);
        }
        true
    }

    pub(crate) fn clear(&mut self) {
        self.nodes.clear();
        self.by_engine.clear();
        self.keys.clear();
        self.free = NIL;
        self.head = NIL;
        self.tail = NIL;
        self.len = 0;
    }

    /// Bytes allocated: the slab's capacity and both maps' buckets.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.nodes.capacity() * NODE_BYTES
            + (buckets(self.by_engine.capacity()) + buckets(self.keys.capacity())) * BUCKET_BYTES
    }

    fn dec_key(&mut self, key: u64) {
        if let Some(c) = self.keys.get_mut(&key) {
            *c -= 1;
            if *c == 0 {
                self.keys.remove(&key);
            }
        }
    }

    fn unlink_free(&mut self, i: u32) {
        self.unlink(i);
        let node = self.nodes[i as usize];
        self.by_engine.remove(&node.engine);
        self.dec_key(node.key);
        self.nodes[i as usize].next = self.free;
        self.free = i;
        self.len -= 1;
    }

    fn unlink(&mut self, i: u32) {
        let Node { prev, next, .. } = self.nodes[i as usize];
        if prev != NIL {
            self.nodes[prev as usize].next = next;
        } else {
            self.head = next;
        }
        if next != NIL {
            self.nodes[next as usize].prev = prev;
        } else {
            self.tail = prev;
        }
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        {
            let n = &mut self.nodes[i as usize];
            n.prev = NIL;
            n.next = old;
        }
        if old != NIL {
            self.nodes[old as usize].prev = i;
        } else {
            self.tail = i;
        }
        self.head = i;
    }

    /// Checks links, counts and maps against each other (tests).
    #[cfg(test)]
    pub(crate) fn check(&self) -> Result<(), String> {
        let mut seen = 0usize;
        let mut cur = self.head;
        let mut prev = NIL;
        let mut keys: std::collections::HashMap<u64, u32> = Default::default();
        while cur != NIL {
            let n = self.nodes[cur as usize];
            if n.prev != prev {
                return Err(format!("node {cur}: prev {} != {prev}", n.prev));
            }
            if self.by_engine.get(&n.engine) != Some(&cur) {
                return Err(format!("node {cur} not in by_engine"));
            }
            if n.media == 0 {
                return Err(format!("node {cur} held by no medium"));
            }
            *keys.entry(n.key).or_default() += 1;
            seen += 1;
            if seen > self.len {
                return Err("cycle".into());
            }
            prev = cur;
            cur = n.next;
        }
        if prev != self.tail || seen != self.len || self.by_engine.len() != self.len {
            return Err(format!("len {} seen {seen} map {}", self.len, self.by_engine.len()));
        }
        if keys.len() != self.keys.len() || keys.iter().any(|(k, c)| self.keys.get(k) != Some(c)) {
            return Err("key counts differ".into());
        }
        if self.len > self.capacity {
            return Err("over capacity".into());
        }
        Ok(())
    }
}

/// Buckets behind a `HashMap` of the given usable capacity (hashbrown: a power of two, at most
/// 7/8 full; 4 or 8 buckets for tiny maps).
pub(crate) fn buckets(capacity: usize) -> usize {
    match capacity {
        0 => 0,
        1..=3 => 4,
        4..=7 => 8,
        c => (c * 8 / 7).next_power_of_two(),
    }
}
