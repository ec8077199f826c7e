//! The queue state of the flow controller: bands of flows of requests, with lazy removal.
//!
//! Layout: every queued request lives in one slab slot addressed by a [`SlotKey`] (index plus
//! generation); flow queues, the round-robin ring, the global-strict heap and the deadline heap
//! hold keys, not requests. Removing a request (dispatch, expiry, cancellation) frees its slot
//! at once, so counts and caps are exact immediately; the stale keys left behind are skipped
//! when met and compacted away once they outnumber the live ones, which keeps every container
//! O(live requests + flows) in memory. A flow with no live request goes idle and is reused if
//! its id returns (no allocation, no map insert); a band keeps at most
//! max(1024, active flows) idle flows and evicts the oldest beyond that, so fairness ids seen
//! once do not accumulate.
//!
//! Costs per request: enqueue is O(1) for FCFS round-robin plus O(log n) for the deadline heap
//! when it has a TTL, and O(log flows) for global-strict or EDF; dispatch is amortised the same.

use std::cmp::Reverse;
use std::collections::binary_heap::PeekMut;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use crate::flow::config::{BandConfig, FairnessPolicy, OrderingPolicy};
use crate::flow::program_aware::{FlowHead, ProgramAwareFairness};
use crate::flow::ticket::TicketCell;

/// Address of a slab slot; stale once the slot's generation moves on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct SlotKey {
    index: u32,
    generation: u32,
}

/// Dispatch order inside a flow and across flows under global-strict: earlier compares less.
/// FCFS keys differ only in `seq`; EDF and SLO deadline keys put the deadline first and "no
/// deadline" last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct OrderKey {
    no_deadline: bool,
    deadline: Option<Instant>,
    seq: u64,
}

/// A queued request.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) band: usize,
    flow: usize,
    pub(crate) priority: i32,
    pub(crate) bytes: u64,
    pub(crate) enqueued_at: Instant,
    /// The queue TTL while the pool has endpoints (`None`: none). With
    /// `noEndpointRequestTTL` the controller judges it against the time the current regime
    /// began; otherwise the deadline heap alone expires the entry.
    pub(crate) ttl: Option<Duration>,
    pub(crate) cell: Arc<TicketCell>,
}

#[derive(Debug, Default)]
struct Slot {
    generation: u32,
    entry: Option<Entry>,
}

/// The slab of queued requests.
#[derive(Debug, Default)]
pub(crate) struct Slab {
    slots: Vec<Slot>,
    free: Vec<u32>,
}

impl Slab {
    fn insert(&mut self, entry: Entry) -> Option<SlotKey> {
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                let index = u32::try_from(self.slots.len()).ok()?;
                self.slots.push(Slot::default());
                index
            }
        };
        let slot = self.slots.get_mut(index as usize)?;
        slot.entry = Some(entry);
        Some(SlotKey { index, generation: slot.generation })
    }

    /// Every queued entry with its key.
    fn live(&self) -> impl Iterator<Item = (SlotKey, &Entry)> {
        self.slots.iter().enumerate().filter_map(|(index, slot)| {
            let entry = slot.entry.as_ref()?;
            let index = u32::try_from(index).ok()?;
            Some((SlotKey { index, generation: slot.generation }, entry))
        })
    }

    fn get(&self, key: SlotKey) -> Option<&Entry> {
        let slot = self.slots.get(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        slot.entry.as_ref()
    }

    fn is_live(&self, key: SlotKey) -> bool {
        self.slots.get(key.index as usize).is_some_and(|slot| slot.generation == key.generation)
    }

    fn take(&mut self, key: SlotKey) -> Option<Entry> {
        let slot = self.slots.get_mut(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        let entry = slot.entry.take()?;
        // A new generation makes every key still pointing here stale.
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(key.index);
        Some(entry)
    }
}

#[derive(Debug)]
enum FlowQueue {
    Fifo(VecDeque<(OrderKey, SlotKey)>),
    Deadline(BinaryHeap<Reverse<(OrderKey, SlotKey)>>),
}

impl FlowQueue {
    fn new(ordering: OrderingPolicy) -> Self {
        match ordering {
            OrderingPolicy::Fcfs => Self::Fifo(VecDeque::new()),
            OrderingPolicy::Edf | OrderingPolicy::SloDeadline => Self::Deadline(BinaryHeap::new()),
        }
    }

    fn push(&mut self, key: OrderKey, slot: SlotKey) {
        match self {
            Self::Fifo(queue) => queue.push_back((key, slot)),
            Self::Deadline(heap) => heap.push(Reverse((key, slot))),
        }
    }

    fn peek(&self) -> Option<(OrderKey, SlotKey)> {
        match self {
            Self::Fifo(queue) => queue.front().copied(),
            Self::Deadline(heap) => heap.peek().map(|Reverse(item)| *item),
        }
    }

    fn pop(&mut self) -> Option<(OrderKey, SlotKey)> {
        match self {
            Self::Fifo(queue) => queue.pop_front(),
            Self::Deadline(heap) => heap.pop().map(|Reverse(item)| item),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Fifo(queue) => queue.len(),
            Self::Deadline(heap) => heap.len(),
        }
    }

    fn retain_live(&mut self, slab: &Slab) {
        match self {
            Self::Fifo(queue) => queue.retain(|(_, slot)| slab.is_live(*slot)),
            Self::Deadline(heap) => heap.retain(|Reverse((_, slot))| slab.is_live(*slot)),
        }
    }

    fn clear(&mut self) {
        match self {
            Self::Fifo(queue) => queue.clear(),
            Self::Deadline(heap) => heap.clear(),
        }
    }
}

/// One fairness flow of a band.
#[derive(Debug)]
struct Flow {
    id: Arc<str>,
    queue: FlowQueue,
    live: usize,
    /// Key of this flow's one valid entry in the global-strict heap.
    strict_key: Option<OrderKey>,
}

impl Flow {
    /// Drops stale keys at the head; returns the first live one.
    fn clean_head(&mut self, slab: &Slab) -> Option<(OrderKey, SlotKey)> {
        while let Some((key, slot)) = self.queue.peek() {
            if slab.is_live(slot) {
                return Some((key, slot));
            }
            self.queue.pop();
        }
        None
    }
}

/// Queued requests and bytes, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BandStats {
    /// The band's priority.
    pub priority: i32,
    /// Requests queued.
    pub queued_requests: u64,
    /// Bytes queued.
    pub queued_bytes: u64,
    /// Flows with at least one request queued.
    pub active_flows: u64,
    /// Flows with no request queued, kept so a returning fairness id costs no allocation
    /// (at most max(1024, `active_flows`)).
    pub idle_flows: u64,
    /// Fairness ids the band holds state for: active plus idle flows.
    pub known_flow_ids: u64,
}

/// One priority band.
#[derive(Debug)]
pub(crate) struct Band {
    pub(crate) config: BandConfig,
    flows: Vec<Option<Flow>>,
    free_flows: Vec<usize>,
    flow_generations: Vec<u32>,
    by_id: HashMap<Arc<str>, usize>,
    /// Round-robin turn order: (flow index, flow generation); stale pairs are skipped.
    ring: VecDeque<(usize, u32)>,
    /// Global-strict choice: (head key, flow index); valid when it equals the flow's `strict_key`.
    strict: BinaryHeap<Reverse<(OrderKey, usize)>>,
    /// Flows that emptied, oldest first, as (flow index, generation when it emptied); an entry
    /// is stale once the flow was reused or evicted.
    idle: VecDeque<(usize, u32)>,
    /// Flows with at least one live request.
    active_flows: usize,
    /// Flows kept with no live request, so a returning flow id costs no allocation.
    idle_flows: usize,
    pub(crate) queued: u64,
    pub(crate) bytes: u64,
}

/// Stale keys tolerated in a container beyond twice its live items before compaction.
const COMPACTION_SLACK: usize = 64;

/// Idle flows a band keeps for reuse, at least; it keeps as many as it has active flows when
/// that is more. Bounds the memory of flow ids that do not come back.
pub const IDLE_FLOWS_KEPT: usize = 1024;

impl Band {
    pub(crate) fn new(config: BandConfig) -> Self {
        Self {
            config,
            flows: Vec::new(),
            free_flows: Vec::new(),
            flow_generations: Vec::new(),
            by_id: HashMap::new(),
            ring: VecDeque::new(),
            strict: BinaryHeap::new(),
            idle: VecDeque::new(),
            active_flows: 0,
            idle_flows: 0,
            queued: 0,
            bytes: 0,
        }
    }

    pub(crate) fn stats(&self) -> BandStats {
        BandStats {
            priority: self.config.priority,
            queued_requests: self.queued,
            queued_bytes: self.bytes,
            active_flows: self.active_flows as u64,
            idle_flows: self.idle_flows as u64,
            known_flow_ids: self.by_id.len() as u64,
        }
    }

    /// The flow for `flow_id`, reusing an idle one or creating it (with no request yet).
    fn flow_index(&mut self, flow_id: &str) -> usize {
        if let Some(&index) = self.by_id.get(flow_id) {
            if self.flows.get(index).and_then(Option::as_ref).is_some_and(|flow| flow.live == 0) {
                // Its entry in `idle` goes stale: the flow will not be idle when it is met.
                self.idle_flows = self.idle_flows.saturating_sub(1);
            }
            return index;
        }
        let id: Arc<str> = Arc::from(flow_id);
        let index = match self.free_flows.pop() {
            Some(index) => index,
            None => {
                self.flows.push(None);
                self.flow_generations.push(0);
                self.flows.len() - 1
            }
        };
        if let Some(place) = self.flows.get_mut(index) {
            *place = Some(Flow {
                id: Arc::clone(&id),
                queue: FlowQueue::new(self.config.ordering),
                live: 0,
                strict_key: None,
            });
        }
        self.by_id.insert(id, index);
        index
    }

    /// A flow's last live request left: it goes idle, and old flows beyond the cap go.
    fn flow_emptied(&mut self, index: usize) {
        self.active_flows = self.active_flows.saturating_sub(1);
        self.park_idle(index);
    }

    fn park_idle(&mut self, index: usize) {
        if let Some(flow) = self.flows.get_mut(index).and_then(Option::as_mut) {
            flow.queue.clear();
            flow.strict_key = None;
        }
        // A new generation makes the flow's ring entries stale, so a returning flow queues
        // for its turn afresh instead of holding two places.
        let Some(generation) = self.flow_generations.get_mut(index) else {
            return;
        };
        *generation = generation.wrapping_add(1);
        self.idle.push_back((index, *generation));
        self.idle_flows += 1;
        let keep = IDLE_FLOWS_KEPT.max(self.active_flows);
        while self.idle_flows > keep {
            let Some((oldest, generation)) = self.idle.pop_front() else {
                break;
            };
            let still_idle = self.flow_generations.get(oldest) == Some(&generation)
                && self.flows.get(oldest).and_then(Option::as_ref).is_some_and(|f| f.live == 0);
            if still_idle {
                self.remove_flow(oldest);
                self.idle_flows -= 1;
            }
        }
        if self.idle.len() > 2 * self.idle_flows + COMPACTION_SLACK {
            let generations = &self.flow_generations;
            let flows = &self.flows;
            self.idle.retain(|(index, generation)| {
                generations.get(*index) == Some(generation)
                    && flows.get(*index).and_then(Option::as_ref).is_some_and(|f| f.live == 0)
            });
        }
    }

    fn remove_flow(&mut self, index: usize) {
        let Some(flow) = self.flows.get_mut(index).and_then(Option::take) else {
            return;
        };
        self.by_id.remove(&flow.id);
        if let Some(generation) = self.flow_generations.get_mut(index) {
            *generation = generation.wrapping_add(1);
        }
        self.free_flows.push(index);
    }

    fn compact_turn_order(&mut self) {
        let limit = 2 * self.active_flows + COMPACTION_SLACK;
        if self.ring.len() > limit {
            let generations = &self.flow_generations;
            let flows = &self.flows;
            self.ring.retain(|(index, generation)| {
                flows.get(*index).is_some_and(Option::is_some)
                    && generations.get(*index) == Some(generation)
            });
        }
        if self.strict.len() > limit {
            let flows = &self.flows;
            self.strict.retain(|Reverse((key, index))| {
                flows
                    .get(*index)
                    .and_then(Option::as_ref)
                    .is_some_and(|flow| flow.strict_key == Some(*key))
            });
        }
    }
}

/// Everything the controller guards with its one lock.
#[derive(Debug, Default)]
pub(crate) struct QueueState {
    pub(crate) slab: Slab,
    pub(crate) bands: Vec<Band>,
    /// Band indices by priority, highest first.
    pub(crate) order: Vec<usize>,
    deadlines: BinaryHeap<Reverse<(Instant, SlotKey)>>,
    pub(crate) queued: u64,
    pub(crate) bytes: u64,
    next_seq: u64,
    pub(crate) dispatched: u64,
    /// Tasks told the queue was full (`FlowController::poll_capacity`), woken when it has room.
    pub(crate) capacity_waiters: Vec<Waker>,
    /// Whether the pool had endpoints at the last pass, and since when; kept only when
    /// `noEndpointRequestTTL` is set.
    pub(crate) regime: Option<Regime>,
}

/// The pool's endpoint regime: empty or not, and since when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Regime {
    /// The pool had no endpoints.
    pub(crate) empty: bool,
    /// When the pool entered this regime.
    pub(crate) since: Instant,
}

impl QueueState {
    /// The index of the band for `priority`, creating it from `make` when new.
    pub(crate) fn band_index(&mut self, priority: i32, make: impl FnOnce() -> BandConfig) -> usize {
        let bands = &self.bands;
        match self.order.binary_search_by(|&index| {
            bands.get(index).map_or(0, |band| band.config.priority).cmp(&priority).reverse()
        }) {
            Ok(position) => self.order.get(position).copied().unwrap_or(0),
            Err(position) => {
                let mut config = make();
                config.priority = priority;
                self.bands.push(Band::new(config));
                let index = self.bands.len() - 1;
                self.order.insert(position, index);
                index
            }
        }
    }

    /// Queues a request; `None` only if the slab cannot address another slot (2^32 queued).
    #[cfg(test)]
    pub(crate) fn push(
        &mut self,
        band_index: usize,
        flow_id: &str,
        bytes: u64,
        ttl: Option<Duration>,
        now: Instant,
        cell: Arc<TicketCell>,
    ) -> Option<SlotKey> {
        self.push_with_bound(band_index, flow_id, bytes, ttl, ttl, None, now, cell)
    }

    /// Queued entries with their keys, in no particular order.
    pub(crate) fn queued_entries(&self) -> impl Iterator<Item = (SlotKey, &Entry)> {
        self.slab.live()
    }

    /// [`Self::push`] with `ttl` ordering the entry under EDF, `slo_ttft` under SLO deadline
    /// ordering, and `bound` (the longest wait any regime allows) placing it on the deadline
    /// heap.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn push_with_bound(
        &mut self,
        band_index: usize,
        flow_id: &str,
        bytes: u64,
        ttl: Option<Duration>,
        bound: Option<Duration>,
        slo_ttft: Option<Duration>,
        now: Instant,
        cell: Arc<TicketCell>,
    ) -> Option<SlotKey> {
        let band = self.bands.get_mut(band_index)?;
        let ttl = ttl.filter(|ttl| !ttl.is_zero());
        let deadline = ttl.and_then(|ttl| now.checked_add(ttl));
        let expiry =
            bound.filter(|bound| !bound.is_zero()).and_then(|bound| now.checked_add(bound));
        self.next_seq += 1;
        let key = match band.config.ordering {
            OrderingPolicy::Fcfs => {
                OrderKey { no_deadline: false, deadline: None, seq: self.next_seq }
            }
            OrderingPolicy::Edf => {
                OrderKey { no_deadline: deadline.is_none(), deadline, seq: self.next_seq }
            }
            OrderingPolicy::SloDeadline => {
                // Arrival plus the objective; none (or beyond the clock) sorts after all
                // requests with one, FCFS among themselves.
                let slo_deadline = slo_ttft.and_then(|slo| now.checked_add(slo));
                OrderKey {
                    no_deadline: slo_deadline.is_none(),
                    deadline: slo_deadline,
                    seq: self.next_seq,
                }
            }
        };
        let flow_index = band.flow_index(flow_id);
        let entry = Entry {
            band: band_index,
            flow: flow_index,
            priority: band.config.priority,
            bytes,
            enqueued_at: now,
            ttl,
            cell,
        };
        let Some(slot) = self.slab.insert(entry) else {
            // Out of slots: park the flow as idle so it is accounted for and can be evicted.
            if band.flows.get(flow_index).and_then(Option::as_ref).is_some_and(|f| f.live == 0) {
                band.park_idle(flow_index);
            }
            return None;
        };
        let generation = band.flow_generations.get(flow_index).copied().unwrap_or(0);
        let round_robin = matches!(band.config.fairness, FairnessPolicy::RoundRobin);
        let global_strict = matches!(band.config.fairness, FairnessPolicy::GlobalStrict);
        let flow = band.flows.get_mut(flow_index).and_then(Option::as_mut)?;
        flow.queue.push(key, slot);
        flow.live += 1;
        let activated = flow.live == 1;
        // Program-aware fairness scans the active flows at dispatch and keeps no turn order.
        if round_robin && activated {
            band.ring.push_back((flow_index, generation));
        }
        if global_strict && flow.strict_key.is_none_or(|current| key < current) {
            flow.strict_key = Some(key);
            band.strict.push(Reverse((key, flow_index)));
        }
        if activated {
            band.active_flows += 1;
        }
        band.queued += 1;
        band.bytes = band.bytes.saturating_add(bytes);
        self.queued += 1;
        self.bytes = self.bytes.saturating_add(bytes);
        band.compact_turn_order();
        if let Some(expiry) = expiry {
            self.deadlines.push(Reverse((expiry, slot)));
        }
        Some(slot)
    }

    /// Removes a queued request that is not at the head of a dispatch (expiry, cancellation).
    pub(crate) fn remove(&mut self, slot: SlotKey) -> Option<Entry> {
        let entry = self.slab.take(slot)?;
        self.account_removal(&entry);
        if let Some(band) = self.bands.get_mut(entry.band) {
            let mut emptied = false;
            if let Some(flow) = band.flows.get_mut(entry.flow).and_then(Option::as_mut) {
                flow.live = flow.live.saturating_sub(1);
                if flow.live == 0 {
                    flow.queue.clear();
                    emptied = true;
                } else if flow.queue.len() > 2 * flow.live + COMPACTION_SLACK {
                    flow.queue.retain_live(&self.slab);
                }
            }
            if emptied {
                band.flow_emptied(entry.flow);
                band.compact_turn_order();
            }
        }
        Some(entry)
    }

    fn account_removal(&mut self, entry: &Entry) {
        if let Some(band) = self.bands.get_mut(entry.band) {
            band.queued = band.queued.saturating_sub(1);
            band.bytes = band.bytes.saturating_sub(entry.bytes);
        }
        self.queued = self.queued.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(entry.bytes);
    }

    /// Removes and returns every request whose deadline is at or before `now`.
    pub(crate) fn pop_expired(&mut self, now: Instant, expired: &mut Vec<Entry>) {
        while let Some(Reverse((deadline, slot))) = self.deadlines.peek().copied() {
            if deadline > now {
                break;
            }
            self.deadlines.pop();
            if let Some(entry) = self.remove(slot) {
                expired.push(entry);
            }
        }
        if self.deadlines.len() > 2 * self.queued as usize + COMPACTION_SLACK {
            let slab = &self.slab;
            self.deadlines.retain(|Reverse((_, slot))| slab.is_live(*slot));
        }
    }

    /// The highest band with a queued request.
    pub(crate) fn top_band(&self) -> Option<usize> {
        self.order
            .iter()
            .copied()
            .find(|&index| self.bands.get(index).is_some_and(|b| b.queued > 0))
    }

    /// Whether a request with `priority` or higher is queued.
    pub(crate) fn has_queued_at_or_above(&self, priority: i32) -> bool {
        self.order
            .iter()
            .filter_map(|&index| self.bands.get(index))
            .take_while(|band| band.config.priority >= priority)
            .any(|band| band.queued > 0)
    }

    /// Takes the next request of `band_index` by its fairness and ordering policies, at `now`.
    pub(crate) fn pop_band(&mut self, band_index: usize, now: Instant) -> Option<Entry> {
        let band = self.bands.get_mut(band_index)?;
        let slot = match &band.config.fairness {
            FairnessPolicy::RoundRobin => Self::next_round_robin(band, &self.slab)?,
            FairnessPolicy::GlobalStrict => Self::next_global_strict(band, &self.slab)?,
            FairnessPolicy::ProgramAware(policy) => {
                let policy = Arc::clone(policy);
                Self::next_program_aware(band, &self.slab, &policy, now)?
            }
        };
        let entry = self.slab.take(slot)?;
        self.account_removal(&entry);
        Some(entry)
    }

    /// Pops the head of the flow `policy` chooses among the flows with requests queued, and
    /// tells the policy how long that request waited.
    fn next_program_aware(
        band: &mut Band,
        slab: &Slab,
        policy: &ProgramAwareFairness,
        now: Instant,
    ) -> Option<SlotKey> {
        let mut candidates: Vec<(usize, Arc<str>, Instant)> = Vec::with_capacity(band.active_flows);
        for (index, flow) in band.flows.iter_mut().enumerate() {
            let Some(flow) = flow.as_mut().filter(|flow| flow.live > 0) else { continue };
            let Some((_, slot)) = flow.clean_head(slab) else { continue };
            let Some(head) = slab.get(slot) else { continue };
            candidates.push((index, Arc::clone(&flow.id), head.enqueued_at));
        }
        let heads: Vec<FlowHead<'_>> = candidates
            .iter()
            .map(|(_, id, enqueued_at)| FlowHead { program: id, head_enqueued_at: *enqueued_at })
            .collect();
        let chosen = policy.choose(&heads, now)?;
        let (index, id, enqueued_at) = candidates.get(chosen)?;
        let flow = band.flows.get_mut(*index).and_then(Option::as_mut)?;
        let (_, slot) = flow.queue.pop()?;
        flow.live = flow.live.saturating_sub(1);
        if flow.live == 0 {
            band.flow_emptied(*index);
        }
        policy.record_wait(id, now.saturating_duration_since(*enqueued_at), now);
        Some(slot)
    }

    /// Pops the head of the next flow in turn; the flow goes to the back of the ring.
    fn next_round_robin(band: &mut Band, slab: &Slab) -> Option<SlotKey> {
        while let Some((index, generation)) = band.ring.pop_front() {
            if band.flow_generations.get(index) != Some(&generation) {
                continue;
            }
            let Some(flow) = band.flows.get_mut(index).and_then(Option::as_mut) else {
                continue;
            };
            let Some((_, slot)) = flow.clean_head(slab) else {
                continue;
            };
            flow.queue.pop();
            flow.live = flow.live.saturating_sub(1);
            if flow.live > 0 {
                band.ring.push_back((index, generation));
            } else {
                band.flow_emptied(index);
            }
            return Some(slot);
        }
        None
    }

    /// Pops the best head across flows, repairing heap entries made stale by removals. The
    /// top entry is rewritten in place where it can be, so a dispatch costs one sift, not two.
    fn next_global_strict(band: &mut Band, slab: &Slab) -> Option<SlotKey> {
        loop {
            let mut top = band.strict.peek_mut()?;
            let Reverse((key, index)) = *top;
            let Some(flow) = band.flows.get_mut(index).and_then(Option::as_mut) else {
                PeekMut::pop(top);
                continue;
            };
            if flow.strict_key != Some(key) {
                PeekMut::pop(top);
                continue;
            }
            let Some((head_key, slot)) = flow.clean_head(slab) else {
                flow.strict_key = None;
                PeekMut::pop(top);
                continue;
            };
            if head_key != key {
                // The head this entry stood for was removed; requeue the flow at its real head.
                flow.strict_key = Some(head_key);
                *top = Reverse((head_key, index));
                continue;
            }
            flow.queue.pop();
            flow.live = flow.live.saturating_sub(1);
            if flow.live == 0 {
                PeekMut::pop(top);
                band.flow_emptied(index);
            } else {
                let next = flow.clean_head(slab).map(|(next_key, _)| next_key);
                flow.strict_key = next;
                match next {
                    Some(next) => *top = Reverse((next, index)),
                    None => {
                        PeekMut::pop(top);
                    }
                }
            }
            return Some(slot);
        }
    }

    /// Takes a sequence number for the next dispatch.
    pub(crate) fn next_dispatch_seq(&mut self) -> u64 {
        self.dispatched += 1;
        self.dispatched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell() -> Arc<TicketCell> {
        Arc::new(TicketCell::default())
    }

    #[test]
    fn idle_flows_are_reused_then_evicted_beyond_the_cap() {
        let mut state = QueueState::default();
        let band = state.band_index(0, || BandConfig {
            fairness: FairnessPolicy::RoundRobin,
            ..BandConfig::default()
        });
        let now = Instant::now();
        let distinct = 3 * IDLE_FLOWS_KEPT;
        for round in 0..2 {
            for flow in 0..distinct {
                let id = format!("flow-{flow}");
                assert!(state.push(band, &id, 1, None, now, cell()).is_some());
                let entry = state.pop_band(band, now).expect("the request just queued");
                assert_eq!(entry.flow, state.bands[band].by_id[id.as_str()], "round {round}");
            }
        }
        let band = &state.bands[band];
        assert_eq!(band.active_flows, 0);
        assert_eq!(band.idle_flows, IDLE_FLOWS_KEPT);
        assert_eq!(band.by_id.len(), IDLE_FLOWS_KEPT, "old ids are evicted");
        assert!(band.flows.len() <= IDLE_FLOWS_KEPT + 1, "slots are recycled");
        assert!(band.idle.len() <= 2 * IDLE_FLOWS_KEPT + COMPACTION_SLACK);
    }

    #[test]
    fn a_returning_flow_reuses_its_slot_without_a_second_turn() {
        let mut state = QueueState::default();
        let band = state.band_index(0, || BandConfig {
            fairness: FairnessPolicy::RoundRobin,
            ..BandConfig::default()
        });
        let now = Instant::now();
        let first = state.push(band, "a", 1, None, now, cell()).expect("slot");
        let _b = state.push(band, "b", 1, None, now, cell()).expect("slot");
        // "a" empties by cancellation while its turn is still in the ring, then returns.
        assert!(state.remove(first).is_some());
        let _a1 = state.push(band, "a", 1, None, now, cell()).expect("slot");
        let _a2 = state.push(band, "a", 1, None, now, cell()).expect("slot");
        let _b2 = state.push(band, "b", 1, None, now, cell()).expect("slot");
        let a = state.bands[band].by_id["a"];
        let order: Vec<usize> =
            (0..4).filter_map(|_| state.pop_band(band, now)).map(|entry| entry.flow).collect();
        let b = state.bands[band].by_id["b"];
        assert_eq!(order, [b, a, b, a], "one turn each, in ring order");
    }

    proptest::proptest! {
        /// Program-aware fairness only ever takes from flows with live requests: every pop
        /// yields a queued request until the band is empty, none is lost or served twice, and
        /// each flow's requests leave in arrival order.
        #[test]
        fn program_aware_pops_drain_exactly_the_live_requests(
            ops in proptest::collection::vec((0u8..4, proptest::bool::ANY), 1..60),
        ) {
            let fairness = Arc::new(ProgramAwareFairness::default());
            let mut state = QueueState::default();
            let band = state.band_index(0, || BandConfig {
                fairness: FairnessPolicy::ProgramAware(Arc::clone(&fairness)),
                ..BandConfig::default()
            });
            let now = Instant::now();
            let mut live: Vec<(SlotKey, u8, usize)> = Vec::new();
            for (step, (flow, cancel)) in ops.into_iter().enumerate() {
                let id = format!("p{flow}");
                let at = now + Duration::from_millis(step as u64);
                let slot = state.push(band, &id, 1, None, at, cell()).expect("slot");
                live.push((slot, flow, step));
                if cancel && live.len() > 1 {
                    let (victim, _, _) = live.remove(0);
                    proptest::prop_assert!(state.remove(victim).is_some());
                }
            }
            let end = now + Duration::from_secs(1);
            let mut last_seen: std::collections::HashMap<usize, Instant> = Default::default();
            let mut popped = 0;
            while let Some(entry) = state.pop_band(band, end) {
                popped += 1;
                if let Some(previous) = last_seen.insert(entry.flow, entry.enqueued_at) {
                    proptest::prop_assert!(previous <= entry.enqueued_at, "FCFS within a flow");
                }
            }
            proptest::prop_assert_eq!(popped, live.len());
            proptest::prop_assert_eq!(state.queued, 0);
            proptest::prop_assert_eq!(state.bands[band].active_flows, 0);
        }
    }
}
