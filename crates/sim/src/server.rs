//! One simulated model server, modelled on vLLM's v1 engine scheduler.
//!
//! Model:
//! - Continuous batching: every step, running sequences are served first (a decode token each,
//!   or the next chunk of an unfinished prefill), then waiting requests are admitted in arrival
//!   order while the step's token budget (`max_num_batched_tokens`), the sequence limit
//!   (`max_num_seqs`) and free KV blocks allow. Prefill is chunked to fit the budget.
//! - A step's duration follows [`ServerProfile::step_time`]; its tokens appear when it ends.
//!   The step that finishes a prompt emits the first output token.
//! - KV cache in blocks of 16 tokens with automatic prefix caching (`kv.rs`): admission
//!   reuses the longest cached prefix of the request's block hashes (at least one token is
//!   always computed, as in vLLM), so cache hits skip that part of the prefill. Full blocks are
//!   named as they are computed (prompt during prefill, prompt and output when the request
//!   ends), so later turns of a conversation hit the earlier turns and answers.
//! - Preemption by recomputation: when a running sequence needs a block and none is free, the
//!   most recently admitted sequence is evicted back to the front of the queue and later
//!   recomputes its prompt and the tokens it had generated. No admissions in a step that
//!   preempted (as vLLM).
//! - Prefill/decode disaggregation: a sequence whose prompt KV was computed by another server
//!   and transferred ([`Sequence::with_transferred_kv`]) is admitted as a full prefix-cache hit:
//!   it needs KV blocks for the whole prompt (the locally cached prefix shared, the rest
//!   private) and computes only the last prompt token, which samples its first output token
//!   (vLLM's KV connectors recompute that one token the same way). If it is preempted later,
//!   the transferred KV is gone and it recomputes locally.
//! - LoRA: at most `max_loras` adapters resident; admitting a request whose adapter is not
//!   resident loads it (adding the load cost to the step) into a free slot or in place of the
//!   least recently used adapter no running request uses; with no such slot the request waits
//!   and later requests may go first. A profile with `max_loras == 0` serves adapters as the
//!   base model.
//!
//! Bounds: work per step is linear in the running sequences plus the requests admitted; a
//! request whose prompt and output cannot fit in the whole KV cache or `max_model_len` is
//! refused at enqueue (a real server answers 400), so the model never deadlocks.

use std::collections::VecDeque;

use crate::hashing::BLOCK_TOKENS;
use crate::kv::KvBlocks;
pub use crate::kv::KvChange;
use crate::profile::ServerProfile;

/// At most this many waiting requests are skipped (waiting for an adapter slot) per step.
const MAX_SKIPPED_PER_STEP: usize = 64;

/// A request as a server holds it.
#[derive(Debug)]
pub struct Sequence {
    /// The simulator's id of the request.
    pub request: u32,
    /// Prompt length, tokens.
    pub prompt_tokens: u32,
    /// Output length, tokens (at least one).
    pub output_tokens: u32,
    /// Chained hashes of the full blocks of the prompt followed by the output text.
    pub block_hashes: Vec<u64>,
    /// LoRA adapter (an id in the simulator's adapter table), `None` for the base model.
    pub adapter: Option<u16>,
    /// Tokens to have KV for before the next token is sampled.
    prefill_target: u32,
    /// Tokens with KV in the cache.
    computed: u32,
    generated: u32,
    /// Slots of the leading blocks held as references on named blocks.
    named_slots: Vec<u32>,
    private_blocks: u32,
    /// Tokens scheduled in the step in progress.
    scheduled: u32,
    /// Uncached prompt tokens counted in the queue's work while waiting.
    queued_prefill_tokens: u32,
    admitted_before: bool,
    /// The prompt's KV arrives from a prefill server: admission skips its prefill.
    kv_transferred: bool,
}

impl Sequence {
    /// A request not yet started.
    pub fn new(
        request: u32,
        prompt_tokens: u32,
        output_tokens: u32,
        block_hashes: Vec<u64>,
        adapter: Option<u16>,
    ) -> Self {
        let prompt_tokens = prompt_tokens.max(1);
        Self {
            request,
            prompt_tokens,
            output_tokens: output_tokens.max(1),
            block_hashes,
            adapter,
            prefill_target: prompt_tokens,
            computed: 0,
            generated: 0,
            named_slots: Vec::new(),
            private_blocks: 0,
            scheduled: 0,
            queued_prefill_tokens: 0,
            admitted_before: false,
            kv_transferred: false,
        }
    }

    /// Marks the prompt's KV as transferred from a prefill server: the sequence is admitted
    /// with its whole prompt but the last token counted as computed.
    pub fn with_transferred_kv(mut self) -> Self {
        self.kv_transferred = true;
        self
    }

    /// Tokens of the prompt that have no KV here yet, counting a transferred prompt's KV;
    /// `cached_tokens` is what the local prefix cache holds.
    fn uncached_prompt(&self, cached_tokens: u32) -> u32 {
        let covered = if self.kv_transferred { self.prefill_target - 1 } else { cached_tokens };
        self.prefill_target - covered.max(cached_tokens).min(self.prefill_target - 1)
    }

    fn named_blocks(&self) -> u32 {
        self.named_slots.len() as u32
    }

    fn held_blocks(&self) -> u32 {
        self.named_blocks() + self.private_blocks
    }

    fn remaining_prefill(&self) -> u32 {
        self.prefill_target - self.computed
    }
}

fn blocks_for(tokens: u32) -> u32 {
    tokens.div_ceil(BLOCK_TOKENS)
}

/// What a step produced, filled by [`ModelServer::end_step`].
#[derive(Debug, Default)]
pub struct StepOutput {
    /// Requests whose first token the step produced.
    pub first_tokens: Vec<u32>,
    /// Requests the step finished.
    pub finished: Vec<u32>,
}

impl StepOutput {
    /// Empties both lists (keeping their allocations).
    pub fn clear(&mut self) {
        self.first_tokens.clear();
        self.finished.clear();
    }
}

/// Counters kept by a server over a run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServerStats {
    /// Steps run.
    pub steps: u64,
    /// Simulated seconds spent in steps.
    pub busy_s: f64,
    /// Sequences preempted.
    pub preemptions: u64,
    /// Adapter loads.
    pub adapter_loads: u64,
    /// Prompt tokens of admitted requests (first admission only).
    pub prompt_tokens: u64,
    /// Of those, tokens served from the prefix cache.
    pub cached_prompt_tokens: u64,
    /// Of those, tokens whose KV was transferred from a prefill server (not local hits).
    pub transferred_prompt_tokens: u64,
}

#[derive(Clone, Copy, Debug)]
struct ResidentAdapter {
    adapter: u16,
    last_used_step: u64,
}

/// A simulated vLLM-like model server.
#[derive(Debug)]
pub struct ModelServer {
    profile: ServerProfile,
    waiting: VecDeque<Sequence>,
    waiting_prefill_tokens: u64,
    running: Vec<Sequence>,
    kv: KvBlocks,
    resident: Vec<ResidentAdapter>,
    running_per_adapter: Vec<u32>,
    waiting_per_adapter: Vec<u32>,
    in_step: bool,
    stats: ServerStats,
}

impl ModelServer {
    /// An idle server with an empty cache.
    pub fn new(profile: ServerProfile) -> Self {
        let kv = KvBlocks::new(profile.kv_blocks);
        Self {
            profile,
            waiting: VecDeque::new(),
            waiting_prefill_tokens: 0,
            running: Vec::new(),
            kv,
            resident: Vec::new(),
            running_per_adapter: Vec::new(),
            waiting_per_adapter: Vec::new(),
            in_step: false,
            stats: ServerStats::default(),
        }
    }

    /// The server's profile.
    pub fn profile(&self) -> &ServerProfile {
        &self.profile
    }

    /// Whether a request of `prompt_tokens` and `output_tokens` could ever run here (no longer
    /// than `max_model_len` or than the whole KV cache).
    pub fn accepts(&self, prompt_tokens: u32, output_tokens: u32) -> bool {
        let total = prompt_tokens.max(1).saturating_add(output_tokens.max(1));
        total <= self.profile.max_model_len && blocks_for(total) <= self.kv.capacity()
    }

    /// Queues a request; gives it back when it can never fit ([`Self::accepts`]).
    pub fn enqueue(&mut self, mut sequence: Sequence) -> Result<(), Sequence> {
        if !self.accepts(sequence.prompt_tokens, sequence.output_tokens) {
            return Err(sequence);
        }
        self.count_waiting(&mut sequence, 1);
        self.waiting.push_back(sequence);
        Ok(())
    }

    /// Whether a step is in progress.
    pub fn in_step(&self) -> bool {
        self.in_step
    }

    /// Requests waiting to be admitted.
    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    /// Requests in the batch.
    pub fn running_len(&self) -> usize {
        self.running.len()
    }

    /// Fraction of KV blocks held by requests, in `[0, 1]`.
    pub fn kv_usage(&self) -> f64 {
        f64::from(self.kv.in_use()) / f64::from(self.kv.capacity().max(1))
    }

    /// KV blocks that could be handed out now (free plus idle cached ones).
    pub fn allocatable_blocks(&self) -> u32 {
        self.kv.allocatable()
    }

    /// How many leading blocks of `hashes` the prefix cache holds.
    pub fn cached_prefix_blocks(&self, hashes: &[u64]) -> u32 {
        self.kv.match_prefix(hashes).0
    }

    /// Prompt tokens still to compute, over waiting and running requests; a waiting request
    /// counts the part of its prompt that was not cached when it was queued.
    pub fn pending_prefill_tokens(&self) -> u64 {
        let running: u64 = self
            .running
            .iter()
            .filter(|seq| seq.remaining_prefill() > 1 || seq.generated == 0)
            .map(|seq| u64::from(seq.remaining_prefill()))
            .sum();
        running + self.waiting_prefill_tokens
    }

    /// Adapters used by running requests.
    pub fn running_adapters(&self) -> impl Iterator<Item = u16> + '_ {
        self.running_per_adapter
            .iter()
            .enumerate()
            .filter(|(_, count)| **count > 0)
            .map(|(adapter, _)| adapter as u16)
    }

    /// Adapters requested by waiting requests.
    pub fn waiting_adapters(&self) -> impl Iterator<Item = u16> + '_ {
        self.waiting_per_adapter
            .iter()
            .enumerate()
            .filter(|(_, count)| **count > 0)
            .map(|(adapter, _)| adapter as u16)
    }

    /// Whether `adapter` is loaded.
    pub fn is_adapter_resident(&self, adapter: u16) -> bool {
        self.resident.iter().any(|resident| resident.adapter == adapter)
    }

    /// Whether `adapter` could be loaded without waiting for a running request to end.
    pub fn has_adapter_slot_for(&self, adapter: u16) -> bool {
        self.adapter_admission(adapter).is_some()
    }

    /// The server's counters.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Composes the next step; returns its duration in seconds, or `None` when there is
    /// nothing to run (the server is idle until the next enqueue).
    pub fn begin_step(&mut self) -> Option<f64> {
        debug_assert!(!self.in_step, "a step is already in progress");
        let mut budget = self.profile.max_batched_tokens;
        let mut prefill_tokens = 0u32;
        let mut decode_seqs = 0u32;
        let mut context_tokens = 0u64;
        let mut preempted = false;

        let mut position = 0;
        'running: while position < self.running.len() && budget > 0 {
            let seq = &self.running[position];
            let tokens = seq.remaining_prefill().min(budget);
            let needed = blocks_for(seq.computed + tokens).saturating_sub(seq.held_blocks());
            while !self.kv.allocate(needed) {
                let Some(victim) = self.running.pop() else { break 'running };
                let victim_was_current = self.running.len() == position;
                self.preempt(victim);
                preempted = true;
                if victim_was_current {
                    break 'running;
                }
            }
            let seq = &mut self.running[position];
            seq.private_blocks += needed;
            seq.scheduled = tokens;
            if seq.generated > 0 && seq.remaining_prefill() == 1 {
                decode_seqs += 1;
                context_tokens += u64::from(seq.computed);
            } else {
                prefill_tokens += tokens;
            }
            budget -= tokens;
            position += 1;
        }

        let mut adapter_loads = 0u32;
        if !preempted || self.running.is_empty() {
            let (admitted_tokens, loads) = self.admit_waiting(budget);
            prefill_tokens += admitted_tokens;
            adapter_loads = loads;
        }
        if prefill_tokens == 0 && decode_seqs == 0 {
            return None;
        }
        self.in_step = true;
        let duration = self.profile.step_time(prefill_tokens, decode_seqs, context_tokens)
            + self.profile.lora_load_s * f64::from(adapter_loads);
        self.stats.steps += 1;
        self.stats.busy_s += duration;
        Some(duration)
    }

    /// Admits waiting requests into the step; returns the prompt tokens scheduled and how many
    /// adapters were loaded.
    fn admit_waiting(&mut self, mut budget: u32) -> (u32, u32) {
        let mut scheduled_tokens = 0;
        let mut loads = 0;
        let mut position = 0;
        let mut skipped = 0;
        while position < self.waiting.len()
            && budget > 0
            && self.running.len() < self.profile.max_running as usize
        {
            let seq = &self.waiting[position];
            let load_into = match seq.adapter.filter(|_| self.profile.max_loras > 0) {
                None => None,
                Some(adapter) => match self.adapter_admission(adapter) {
                    Some(slot) => slot,
                    None => {
                        position += 1;
                        skipped += 1;
                        if skipped >= MAX_SKIPPED_PER_STEP {
                            break;
                        }
                        continue;
                    }
                },
            };
            // At least one token is always computed, so a fully cached prompt still samples.
            let matchable = ((seq.prefill_target - 1) / BLOCK_TOKENS) as usize;
            let hashes = &seq.block_hashes[..matchable.min(seq.block_hashes.len())];
            let (matched, matched_idle) = self.kv.match_prefix(hashes);
            let local = matched * BLOCK_TOKENS;
            let computed = seq.prefill_target - seq.uncached_prompt(local);
            let tokens = (seq.prefill_target - computed).min(budget);
            let needed = blocks_for(computed + tokens) - matched;
            if needed > self.kv.allocatable() - matched_idle {
                break;
            }
            let Some(mut seq) = self.waiting.remove(position) else { break };
            self.count_waiting(&mut seq, -1);
            self.kv.acquire_prefix(&seq.block_hashes[..matched as usize], &mut seq.named_slots);
            let allocated = self.kv.allocate(needed);
            debug_assert!(allocated, "allocation was checked above");
            seq.computed = computed;
            seq.private_blocks = needed;
            seq.scheduled = tokens;
            if !seq.admitted_before {
                seq.admitted_before = true;
                self.stats.prompt_tokens += u64::from(seq.prompt_tokens);
                self.stats.cached_prompt_tokens += u64::from(local.min(seq.prompt_tokens));
                self.stats.transferred_prompt_tokens += u64::from(computed.saturating_sub(local));
            }
            if let Some(adapter) = seq.adapter.filter(|_| self.profile.max_loras > 0) {
                if let Some(slot) = load_into {
                    self.load_adapter(adapter, slot);
                    loads += 1;
                }
                self.touch_adapter(adapter, 1);
            }
            scheduled_tokens += tokens;
            budget -= tokens;
            self.running.push(seq);
        }
        (scheduled_tokens, loads)
    }

    /// `None` when `adapter` must wait; `Some(None)` when it is resident; `Some(Some(slot))`
    /// when it must be loaded into `slot` (`slot == resident.len()` means a new slot).
    fn adapter_admission(&self, adapter: u16) -> Option<Option<usize>> {
        if self.is_adapter_resident(adapter) {
            return Some(None);
        }
        if self.resident.len() < self.profile.max_loras as usize {
            return Some(Some(self.resident.len()));
        }
        self.resident
            .iter()
            .enumerate()
            .filter(|(_, resident)| self.running_count(resident.adapter) == 0)
            .min_by_key(|(_, resident)| resident.last_used_step)
            .map(|(slot, _)| Some(slot))
    }

    fn running_count(&self, adapter: u16) -> u32 {
        self.running_per_adapter.get(adapter as usize).copied().unwrap_or(0)
    }

    fn load_adapter(&mut self, adapter: u16, slot: usize) {
        let resident = ResidentAdapter { adapter, last_used_step: self.stats.steps };
        match self.resident.get_mut(slot) {
            Some(existing) => *existing = resident,
            None => self.resident.push(resident),
        }
        self.stats.adapter_loads += 1;
    }

    /// Adds `delta` (+1 or -1) running requests of `adapter`.
    fn touch_adapter(&mut self, adapter: u16, delta: i32) {
        let index = adapter as usize;
        if self.running_per_adapter.len() <= index {
            self.running_per_adapter.resize(index + 1, 0);
        }
        let count = &mut self.running_per_adapter[index];
        *count = count.saturating_add_signed(delta);
        let step = self.stats.steps;
        if let Some(resident) = self.resident.iter_mut().find(|r| r.adapter == adapter) {
            resident.last_used_step = step;
        }
    }

    /// Keeps the waiting-queue totals (prompt work, adapters) that scrapes and the oracle read,
    /// so neither walks a queue that may hold thousands of requests under overload.
    fn count_waiting(&mut self, seq: &mut Sequence, delta: i32) {
        if delta > 0 {
            // What the cache held when the request was queued is the best cheap guess of what
            // it will skip; the guess is remembered so the total stays exact on removal.
            let matchable = ((seq.prefill_target - 1) / BLOCK_TOKENS) as usize;
            let hashes = &seq.block_hashes[..matchable.min(seq.block_hashes.len())];
            let cached = self.kv.match_prefix(hashes).0 * BLOCK_TOKENS;
            // Queued sequences have computed nothing (new, or preempted and reset).
            seq.queued_prefill_tokens = seq.uncached_prompt(cached);
            self.waiting_prefill_tokens += u64::from(seq.queued_prefill_tokens);
        } else {
            self.waiting_prefill_tokens -= u64::from(seq.queued_prefill_tokens);
        }
        if let Some(adapter) = seq.adapter {
            let index = adapter as usize;
            if self.waiting_per_adapter.len() <= index {
                self.waiting_per_adapter.resize(index + 1, 0);
            }
            let count = &mut self.waiting_per_adapter[index];
            *count = count.saturating_add_signed(delta);
        }
    }

    fn preempt(&mut self, mut seq: Sequence) {
        self.release(&mut seq);
        seq.computed = 0;
        seq.scheduled = 0;
        // The transferred KV was in the freed blocks: a preempted sequence recomputes it.
        seq.kv_transferred = false;
        self.stats.preemptions += 1;
        self.count_waiting(&mut seq, 1);
        self.waiting.push_front(seq);
    }

    fn release(&mut self, seq: &mut Sequence) {
        self.kv.release(&seq.named_slots, seq.private_blocks);
        seq.named_slots.clear();
        seq.private_blocks = 0;
        if let Some(adapter) = seq.adapter.filter(|_| self.profile.max_loras > 0) {
            self.touch_adapter(adapter, -1);
        }
    }

    /// Ends the step in progress: applies its tokens and reports first tokens and finished
    /// requests into `output` (appending).
    pub fn end_step(&mut self, output: &mut StepOutput) {
        debug_assert!(self.in_step, "no step in progress");
        self.in_step = false;
        let mut any_finished = false;
        for seq in &mut self.running {
            if seq.scheduled == 0 {
                continue;
            }
            seq.computed += seq.scheduled;
            seq.scheduled = 0;
            let full_blocks = (seq.computed / BLOCK_TOKENS).min(seq.block_hashes.len() as u32);
            while seq.named_blocks() < full_blocks {
                let at = seq.named_slots.len();
                let hash = seq.block_hashes[at];
                let parent = at.checked_sub(1).map(|before| seq.block_hashes[before]);
                seq.named_slots.push(self.kv.name_private_block(hash, parent, seq.adapter));
                seq.private_blocks -= 1;
            }
            if seq.computed >= seq.prefill_target {
                seq.generated += 1;
                seq.prefill_target = seq.computed + 1;
                if seq.generated == 1 {
                    output.first_tokens.push(seq.request);
                }
                if seq.generated >= seq.output_tokens {
                    output.finished.push(seq.request);
                    any_finished = true;
                }
            }
        }
        if any_finished {
            // One compaction pass keeps the admission order of the rest (it decides preemption).
            let mut running = std::mem::take(&mut self.running);
            running.retain_mut(|seq| {
                let done = seq.generated >= seq.output_tokens;
                if done {
                    self.release(seq);
                }
                !done
            });
            self.running = running;
        }
    }

    /// Starts keeping the KV cache's changes (what vLLM publishes as KV-cache events).
    pub fn record_kv_changes(&mut self) {
        self.kv.record_changes();
    }

    /// Moves the KV cache's changes since the last drain to `out`, oldest first.
    pub fn drain_kv_changes(&mut self, out: &mut Vec<KvChange>) {
        self.kv.drain_changes(out);
    }

    #[cfg(test)]
    pub(crate) fn kv_is_consistent(&self) -> bool {
        self.kv.is_consistent()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hashing::block_hashes;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    /// A request whose prompt is `prompt_chars` characters of `fill` (4 characters a token).
    fn request(id: u32, fill: char, prompt_chars: usize, output_tokens: u32) -> Sequence {
        let text: String = std::iter::repeat_n(fill, prompt_chars).collect();
        let prompt_tokens = (prompt_chars / 4) as u32;
        Sequence::new(id, prompt_tokens, output_tokens, block_hashes("m", &text), None)
    }

    /// Runs the server until idle; returns (request, first token time, finish time) in order of
    /// finishing.
    fn run_to_idle(server: &mut ModelServer) -> Vec<(u32, f64, f64)> {
        let mut now = 0.0;
        let mut first = std::collections::HashMap::new();
        let mut done = Vec::new();
        let mut output = StepOutput::default();
        while let Some(duration) = server.begin_step() {
            now += duration;
            output.clear();
            server.end_step(&mut output);
            for request in &output.first_tokens {
                first.insert(*request, now);
            }
            for request in &output.finished {
                done.push((*request, first.get(request).copied().unwrap_or(f64::NAN), now));
            }
            assert!(server.kv_is_consistent());
        }
        done
    }

    #[test]
    fn a_lone_request_waits_exactly_its_prefill() {
        let profile = ServerProfile::small_test();
        let mut server = ModelServer::new(profile.clone());
        server.enqueue(request(0, 'a', 400, 3)).unwrap();
        let done = run_to_idle(&mut server);
        let prefill = profile.step_time(100, 0, 0);
        assert!(close(prefill, 0.110));
        assert_eq!(done.len(), 1);
        assert!(close(done[0].1, prefill), "TTFT {} != prefill {prefill}", done[0].1);
        // Two decode steps for the remaining two tokens.
        assert!(close(done[0].2, prefill + 2.0 * profile.step_time(0, 1, 101)));
    }

    #[test]
    fn a_batch_step_costs_its_prefill_tokens_and_decode_sequences() {
        let profile = ServerProfile::h100_llama3_8b();
        let mut server = ModelServer::new(profile.clone());
        server.enqueue(request(0, 'a', 400, 10)).unwrap();
        server.enqueue(request(1, 'b', 800, 10)).unwrap();
        let first = server.begin_step().unwrap();
        assert!(close(first, profile.step_time(300, 0, 0)), "both prompts in one step");
        server.end_step(&mut StepOutput::default());
        server.enqueue(request(2, 'c', 2000, 10)).unwrap();
        let second = server.begin_step().unwrap();
        // Two decodes with 100 and 200 tokens of context, plus the new 500-token prompt.
        assert!(close(second, profile.step_time(500, 2, 300)), "{second}");
    }

    #[test]
    fn chunked_prefill_respects_the_token_budget() {
        let profile = ServerProfile::small_test();
        let mut server = ModelServer::new(profile.clone());
        server.enqueue(request(0, 'a', 4 * 700, 2)).unwrap();
        let first = server.begin_step().unwrap();
        assert!(close(first, profile.step_time(profile.max_batched_tokens, 0, 0)));
        let mut output = StepOutput::default();
        server.end_step(&mut output);
        assert!(output.first_tokens.is_empty(), "the prompt is not done yet");
        assert!(close(server.begin_step().unwrap(), profile.step_time(700 - 512, 0, 0)));
    }

    #[test]
    fn cache_hits_cut_prefill() {
        let profile = ServerProfile::small_test();
        let mut server = ModelServer::new(profile.clone());
        server.enqueue(request(0, 'a', 640, 1)).unwrap();
        run_to_idle(&mut server);
        // Same 160-token prefix plus 40 new tokens: ten cached blocks are skipped.
        let text = format!("{}{}", "a".repeat(640), "b".repeat(160));
        server.enqueue(Sequence::new(1, 200, 1, block_hashes("m", &text), None)).unwrap();
        let duration = server.begin_step().unwrap();
        assert!(close(duration, profile.step_time(40, 0, 0)), "{duration}");
        assert_eq!(server.stats().cached_prompt_tokens, 160);
        // A fully cached prompt still computes its last block's tokens (at least one token).
        server.end_step(&mut StepOutput::default());
        server.enqueue(request(2, 'a', 640, 1)).unwrap();
        assert!(close(server.begin_step().unwrap(), profile.step_time(16, 0, 0)));
    }

    #[test]
    fn a_full_cache_preempts_and_everything_still_finishes() {
        let profile = ServerProfile::small_test();
        let mut server = ModelServer::new(profile.clone());
        // Each needs 25 blocks for its prompt and grows to 44: two do not fit in 64 blocks.
        server.enqueue(request(0, 'a', 1600, 300)).unwrap();
        server.enqueue(request(1, 'b', 1600, 300)).unwrap();
        let done = run_to_idle(&mut server);
        assert!(server.stats().preemptions > 0);
        let mut finished: Vec<u32> = done.iter().map(|d| d.0).collect();
        finished.sort_unstable();
        assert_eq!(finished, vec![0, 1]);
        assert_eq!(server.running_len() + server.waiting_len(), 0);
        assert!(close(server.kv_usage(), 0.0));
    }

    #[test]
    fn requests_that_can_never_fit_are_refused() {
        let mut server = ModelServer::new(ServerProfile::small_test());
        assert!(server.enqueue(request(0, 'a', 4 * 1000, 100)).is_err(), "over max_model_len");
        let mut tiny = ServerProfile::small_test();
        tiny.kv_blocks = 4;
        let mut server = ModelServer::new(tiny);
        assert!(server.enqueue(request(0, 'a', 400, 1)).is_err(), "over the whole KV cache");
    }

    #[test]
    fn adapters_beyond_the_slots_wait_and_loads_cost_time() {
        let profile = ServerProfile::small_test();
        let mut server = ModelServer::new(profile.clone());
        for (id, adapter) in [(0, 0), (1, 1), (2, 2)] {
            let text = "a".repeat(40);
            let seq = Sequence::new(id, 10, 5, block_hashes("m", &text), Some(adapter));
            server.enqueue(seq).unwrap();
        }
        let first = server.begin_step().unwrap();
        assert_eq!(server.running_len(), 2, "two slots");
        assert!(close(first, profile.step_time(20, 0, 0) + 2.0 * profile.lora_load_s));
        let mut adapters: Vec<u16> = server.running_adapters().collect();
        adapters.sort_unstable();
        assert_eq!(adapters, vec![0, 1]);
        assert_eq!(server.waiting_adapters().collect::<Vec<_>>(), vec![2]);
        server.end_step(&mut StepOutput::default());
        let done = run_to_idle(&mut server);
        assert_eq!(done.len(), 3);
        assert_eq!(server.stats().adapter_loads, 3);
    }

    #[test]
    fn a_transferred_prompt_computes_one_token_but_holds_its_blocks() {
        let profile = ServerProfile::small_test();
        let mut local = ModelServer::new(profile.clone());
        local.enqueue(request(1, 'a', 400, 3)).unwrap();
        local.enqueue(request(2, 'b', 400, 3).with_transferred_kv()).unwrap();
        // Both are admitted in one step: 100 prompt tokens for the first, 1 for the second.
        let step = local.begin_step().unwrap();
        assert!(close(step, profile.step_time(101, 0, 0)), "{step}");
        // The transferred prompt holds KV for all its 100 tokens (7 blocks of 16).
        assert_eq!(local.kv.in_use(), 2 * 7);
        let mut output = StepOutput::default();
        local.end_step(&mut output);
        assert_eq!(output.first_tokens, vec![1, 2]);
        let stats = local.stats();
        assert_eq!((stats.prompt_tokens, stats.cached_prompt_tokens), (200, 0));
        assert_eq!(stats.transferred_prompt_tokens, 99);
        assert!(local.kv_is_consistent());
    }
}
