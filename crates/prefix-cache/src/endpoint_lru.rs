//! One endpoint's blocks in least-recently-recorded order.
//!
//! # Algorithm
//! A doubly linked list threaded through a slab (`Vec`) of 16-byte nodes with `u32` links. Nodes
//! are never freed one by one: once the slab holds `capacity` blocks, a new block reuses the
//! least recent node in place, so the slab never exceeds `capacity` nodes and needs no free list.
//! The whole slab is dropped when the endpoint is removed.
//!
//! # Bound
//! The slab grows by doubling, capped at `capacity` with an exact reservation, so it holds at most
//! `min(capacity, max(8, 2 * len))` nodes and exactly `capacity` once full.

const NIL: u32 = u32::MAX;
const MIN_SLAB: usize = 8;
/// Bytes of one slab node.
pub(crate) const NODE_BYTES: usize = std::mem::size_of::<Node>();
/// Largest usable capacity: `u32` links with one value reserved for "none".
pub(crate) const MAX_CAPACITY: usize = (u32::MAX - 1) as usize;

#[derive(Debug, Clone, Copy)]
struct Node {
    hash: u64,
    /// Towards the most recent end.
    newer: u32,
    /// Towards the least recent end.
    older: u32,
}

#[derive(Debug)]
pub(crate) struct EndpointLru {
    nodes: Vec<Node>,
    newest: u32,
    oldest: u32,
    capacity: usize,
    /// Set by `remove_endpoint` under this lock: a writer that fetched the endpoint before the
    /// removal must not re-populate a slot that is being drained.
    pub(crate) retired: bool,
}

impl EndpointLru {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            nodes: Vec::new(),
            newest: NIL,
            oldest: NIL,
            capacity: capacity.min(MAX_CAPACITY),
            retired: false,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.nodes.capacity() * NODE_BYTES
    }

    /// Slab nodes the bound allows for `len` blocks under `capacity`.
    pub(crate) fn slab_bound(len: usize, capacity: usize) -> usize {
        if len == 0 { 0 } else { capacity.min(MAX_CAPACITY).min(MIN_SLAB.max(2 * len)) }
    }

    fn unlink(&mut self, node: u32) {
        let Some(&Node { newer, older, .. }) = self.nodes.get(node as usize) else {
            return;
        };
        match self.nodes.get_mut(newer as usize) {
            Some(n) => n.older = older,
            None => self.newest = older,
        }
        match self.nodes.get_mut(older as usize) {
            Some(n) => n.newer = newer,
            None => self.oldest = newer,
        }
    }

    fn link_newest(&mut self, node: u32) {
        let previous_newest = self.newest;
        if let Some(n) = self.nodes.get_mut(node as usize) {
            n.newer = NIL;
            n.older = previous_newest;
        } else {
            return;
        }
        match self.nodes.get_mut(previous_newest as usize) {
            Some(n) => n.newer = node,
            None => self.oldest = node,
        }
        self.newest = node;
    }

    /// Marks a held block as the most recent.
    pub(crate) fn touch(&mut self, node: u32) {
        if node != self.newest && (node as usize) < self.nodes.len() {
            self.unlink(node);
            self.link_newest(node);
        }
    }

    /// Adds `hash` as the most recent block: in a fresh node while below capacity, otherwise in
    /// the least recent node. Returns the node and, when a block was evicted, its hash.
    /// `None` when the capacity is zero.
    pub(crate) fn insert(&mut self, hash: u64) -> Option<(u32, Option<u64>)> {
        if self.nodes.len() < self.capacity {
            if self.nodes.len() == self.nodes.capacity() {
                let target = self.capacity.min(MIN_SLAB.max(2 * self.nodes.len()));
                self.nodes.reserve_exact(target - self.nodes.len());
            }
            let node = u32::try_from(self.nodes.len()).ok()?;
            self.nodes.push(Node { hash, newer: NIL, older: NIL });
            self.link_newest(node);
            return Some((node, None));
        }
        let victim = self.oldest;
        let slot = self.nodes.get_mut(victim as usize)?;
        let evicted = std::mem::replace(&mut slot.hash, hash);
        self.touch(victim);
        Some((victim, Some(evicted)))
    }

    /// Drops every block and frees the slab.
    pub(crate) fn clear(&mut self) {
        self.nodes = Vec::new();
        self.newest = NIL;
        self.oldest = NIL;
    }

    /// Block hashes with their nodes, most recent first.
    pub(crate) fn iter_newest_first(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        let mut cursor = self.newest;
        std::iter::from_fn(move || {
            let node = self.nodes.get(cursor as usize)?;
            let item = (cursor, node.hash);
            cursor = node.older;
            Some(item)
        })
        .take(self.nodes.len())
    }

    /// Every slab node's hash, in slab order (cheaper than following links).
    pub(crate) fn slab_hashes(&self) -> impl Iterator<Item = u64> + '_ {
        self.nodes.iter().map(|n| n.hash)
    }

    /// Checks the links form one list over the whole slab and the capacity holds.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.nodes.len() > self.capacity {
            return Err(format!("{} blocks over capacity {}", self.nodes.len(), self.capacity));
        }
        if self.nodes.capacity() > Self::slab_bound(self.nodes.len(), self.capacity) {
            return Err(format!(
                "slab of {} nodes for {} blocks",
                self.nodes.capacity(),
                self.nodes.len()
            ));
        }
        let mut seen = 0usize;
        let mut expected_newer = NIL;
        let mut cursor = self.newest;
        while let Some(node) = self.nodes.get(cursor as usize) {
            if node.newer != expected_newer {
                return Err(format!("node {cursor} has a broken back link"));
            }
            seen += 1;
            if seen > self.nodes.len() {
                return Err("cycle in the LRU list".to_owned());
            }
            expected_newer = cursor;
            cursor = node.older;
        }
        if seen != self.nodes.len() || self.oldest != expected_newer {
            return Err(format!("list reaches {seen} of {} nodes", self.nodes.len()));
        }
        Ok(())
    }
}
