//! The simulated servers' KV-cache events, carried to the EPP's precise prefix index.
//!
//! vLLM publishes, after each engine step, one batch of events with a sequence number:
//! `BlockStored` for blocks it computed and cached (with their token ids and parent block),
//! `BlockRemoved` for blocks it evicted. Here each server's [`KvChange`]s of a step become one
//! [`EventBatch`] in vLLM's shape; it reaches every precise producer's index [`KvEventLink`]
//! later, or is lost with the link's loss probability. A lost batch shows as a gap in the
//! sequence numbers when the next one arrives: the index then distrusts that server (and the
//! producer falls back to the approximate index for it) for the rest of the run, as it would
//! without vLLM's replay socket.
//!
//! The simulated servers name blocks by hashes of 64-character text chunks and have no
//! tokenizer. Each block's 16 token ids are therefore derived from its hash
//! ([`block_tokens`]), and the requests of a precise policy are sent as those token ids
//! ([`token_prompt`]), so that the index's keys (llm-d's chained hash over token ids) agree
//! between requests and events exactly when the servers' block hashes do.

use std::collections::VecDeque;
use std::sync::Arc;

use kv_events::{BlockRemoved, BlockStored, Event, EventBatch};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use scheduler_core::EndpointId;
use scorers::precise_prefix::EventFedProducer;
use serde::Serialize;

use crate::hashing::BLOCK_TOKENS;
use crate::server::KvChange;

/// How the servers' KV events reach the EPP.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct KvEventLink {
    /// Seconds from the end of a server's step to its events being applied to the index.
    pub delay_s: f64,
    /// Probability that a batch is lost.
    pub loss: f64,
}

impl Default for KvEventLink {
    /// 5 ms (publish, ZMQ and the indexer's queue), nothing lost.
    fn default() -> Self {
        Self { delay_s: 0.005, loss: 0.0 }
    }
}

impl KvEventLink {
    pub(crate) fn is_valid(&self) -> bool {
        self.delay_s >= 0.0 && self.delay_s.is_finite() && (0.0..=1.0).contains(&self.loss)
    }
}

/// The 16 token ids standing for the block whose hash is `hash`.
pub fn block_tokens(hash: u64) -> [u32; BLOCK_TOKENS as usize] {
    let mut tokens = [0u32; BLOCK_TOKENS as usize];
    let mut state = hash;
    for token in &mut tokens {
        state = scheduler_core::hash::mix64(state);
        // Below 2^24, as real vocabularies are, and never 0 (the padding id of some models).
        *token = (state >> 40) as u32 | 1;
    }
    tokens
}

/// A prompt of `blocks` full blocks, written as token ids the way the request parser writes a
/// pre-tokenized prompt (each id in decimal, then a space).
pub fn token_prompt(blocks: &[u64]) -> String {
    use std::fmt::Write;
    let mut prompt = String::with_capacity(blocks.len() * BLOCK_TOKENS as usize * 9);
    for &hash in blocks {
        for token in block_tokens(hash) {
            let _ = write!(prompt, "{token} ");
        }
    }
    prompt
}

struct InTransit {
    due_ns: u64,
    server: usize,
    seq: u64,
    batch: EventBatch,
}

/// Batches between the servers and the precise indexes.
pub(crate) struct KvEventFeed {
    producers: Vec<Arc<EventFedProducer>>,
    endpoints: Vec<EndpointId>,
    link: KvEventLink,
    base_model: String,
    adapter_names: Vec<Arc<str>>,
    rng: SmallRng,
    next_seq: Vec<u64>,
    last_applied: Vec<Option<u64>>,
    in_transit: VecDeque<InTransit>,
    changes: Vec<KvChange>,
    /// Batches lost on the link.
    pub(crate) lost: u64,
}

impl KvEventFeed {
    /// A feed from the servers at `endpoints` to `producers`, whose indexes learn the
    /// endpoints now.
    pub(crate) fn new(
        producers: Vec<Arc<EventFedProducer>>,
        endpoints: Vec<EndpointId>,
        link: KvEventLink,
        base_model: String,
        adapter_names: Vec<Arc<str>>,
        seed: u64,
    ) -> Self {
        for producer in &producers {
            for &endpoint in &endpoints {
                producer.index().add_endpoint(endpoint);
            }
        }
        let servers = endpoints.len();
        Self {
            producers,
            endpoints,
            link,
            base_model,
            adapter_names,
            rng: SmallRng::seed_from_u64(seed ^ 0x6b76_e5e7),
            next_seq: vec![0; servers],
            last_applied: vec![None; servers],
            in_transit: VecDeque::new(),
            changes: Vec::new(),
            lost: 0,
        }
    }

    /// The batch of `server`'s step that just ended, sent on its way with `drain`'s changes;
    /// returns when it is due, if one was sent.
    pub(crate) fn publish(
        &mut self,
        server: usize,
        now_ns: u64,
        drain: impl FnOnce(&mut Vec<KvChange>),
    ) -> Option<u64> {
        self.changes.clear();
        drain(&mut self.changes);
        if self.changes.is_empty() {
            return None;
        }
        let seq = self.next_seq[server];
        self.next_seq[server] += 1;
        if self.link.loss > 0.0 && self.rng.random_bool(self.link.loss) {
            self.lost += 1;
            return None;
        }
        let events = self.changes.iter().map(|change| self.event(*change)).collect();
        let batch = EventBatch { ts: now_ns as f64 * 1e-9, events, data_parallel_rank: None };
        let due_ns = now_ns + crate::engine::nanos_or_zero(self.link.delay_s);
        self.in_transit.push_back(InTransit { due_ns, server, seq, batch });
        Some(due_ns)
    }

    fn event(&self, change: KvChange) -> Event {
        match change {
            KvChange::Stored { hash, parent, adapter } => Event::BlockStored(BlockStored {
                block_hashes: vec![hash],
                parent_block_hash: parent,
                token_ids: block_tokens(hash).to_vec(),
                block_size: BLOCK_TOKENS,
                lora_name: adapter
                    .and_then(|id| self.adapter_names.get(usize::from(id)))
                    .map(|name| name.to_string()),
                ..BlockStored::default()
            }),
            KvChange::Removed { hash } => Event::BlockRemoved(BlockRemoved {
                block_hashes: vec![hash],
                ..BlockRemoved::default()
            }),
        }
    }

    /// Applies every batch due by `now_ns`, in order; a batch that follows a lost one marks
    /// its server's entries untrusted first, as a subscriber does on a sequence gap.
    pub(crate) fn deliver(&mut self, now_ns: u64) {
        while self.in_transit.front().is_some_and(|batch| batch.due_ns <= now_ns) {
            let Some(InTransit { server, seq, batch, .. }) = self.in_transit.pop_front() else {
                break;
            };
            let endpoint = self.endpoints[server];
            let gap = self.last_applied[server].map_or(seq != 0, |last| seq != last + 1);
            for producer in &self.producers {
                if gap {
                    producer.index().mark_gap(endpoint);
                }
                producer.index().apply_batch(endpoint, &self.base_model, &batch);
            }
            self.last_applied[server] = Some(seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use kv_events::EndpointMatch;
    use scheduler_core::{Endpoint, EndpointPickerConfig};

    use super::*;
    use crate::hashing::{BLOCK_CHARS, block_hashes};
    use crate::policy::{EventFedProducers, PRECISE_CONFIG, registry_feeding};
    use crate::profile::ServerProfile;
    use crate::server::{ModelServer, Sequence, StepOutput};

    fn producer() -> Arc<EventFedProducer> {
        let built = EventFedProducers::default();
        let config = EndpointPickerConfig::from_yaml(PRECISE_CONFIG).unwrap();
        config.construct_plugins(&registry_feeding(&built)).unwrap();
        built.lock().pop().expect("the config has a precise producer")
    }

    /// Runs `prompts` (each a text) through one small server, publishing its events through a
    /// feed with `link`; returns the server and, per prompt, its full blocks' hashes.
    fn serve(
        prompts: &[String],
        link: KvEventLink,
        feed_producer: &Arc<EventFedProducer>,
    ) -> (ModelServer, Vec<Vec<u64>>, KvEventFeed) {
        let endpoint = Endpoint::new("10.0.0.1:8000".parse::<SocketAddr>().unwrap()).id;
        let mut feed = KvEventFeed::new(
            vec![Arc::clone(feed_producer)],
            vec![endpoint],
            link,
            "m".to_owned(),
            Vec::new(),
            3,
        );
        let mut server = ModelServer::new(ServerProfile::small_test());
        server.record_kv_changes();
        let hashes: Vec<Vec<u64>> = prompts.iter().map(|text| block_hashes("m", text)).collect();
        let mut output = StepOutput::default();
        let mut now_ns = 0;
        for (id, (text, blocks)) in prompts.iter().zip(&hashes).enumerate() {
            let tokens = (text.len() / 4) as u32;
            server.enqueue(Sequence::new(id as u32, tokens, 4, blocks.clone(), None)).unwrap();
            while let Some(step) = server.begin_step() {
                now_ns += (step * 1e9) as u64;
                output.clear();
                server.end_step(&mut output);
                feed.publish(0, now_ns, |out| server.drain_kv_changes(out));
                feed.deliver(now_ns + 1_000_000_000);
            }
        }
        (server, hashes, feed)
    }

    fn text(fill: char, blocks: usize) -> String {
        std::iter::repeat_n(fill, blocks * BLOCK_CHARS).collect()
    }

    /// The index's match for each prompt is what the server really caches, evictions included
    /// (four 20-block prompts through a 64-block cache).
    #[test]
    fn the_index_sees_what_the_server_caches() {
        let producer = producer();
        let prompts: Vec<String> = ['a', 'b', 'c', 'd'].map(|fill| text(fill, 20)).to_vec();
        let (server, hashes, _) =
            serve(&prompts, KvEventLink { delay_s: 0.0, loss: 0.0 }, &producer);
        let endpoint = Endpoint::new("10.0.0.1:8000".parse::<SocketAddr>().unwrap()).id;
        let processor = producer.index().processor();
        let mut evicted_somewhere = false;
        for blocks in &hashes {
            let cached = server.cached_prefix_blocks(blocks);
            evicted_somewhere |= cached < blocks.len() as u32;
            let mut tokens = Vec::new();
            assert!(scorers::precise_prefix::token_ids_of(&token_prompt(blocks), &mut tokens));
            let mut keys = Vec::new();
            processor.request_keys("m", &tokens, 1024, &mut keys);
            assert_eq!(keys.len(), blocks.len());
            assert_eq!(
                producer.index().longest_prefix(endpoint, &keys),
                EndpointMatch::Blocks(cached as usize)
            );
        }
        assert!(evicted_somewhere, "the cache was meant to evict");
        assert_eq!(producer.index().is_trusted(endpoint), Some(true), "nothing was lost");
    }

    /// A lost batch shows as a gap when the next arrives: the server is then untrusted.
    #[test]
    fn a_lost_batch_makes_the_server_untrusted() {
        let producer = producer();
        let prompts: Vec<String> = ('a'..='l').map(|fill| text(fill, 10)).collect();
        let (_, _, feed) = serve(&prompts, KvEventLink { delay_s: 0.0, loss: 0.5 }, &producer);
        assert!(feed.lost > 0);
        let endpoint = Endpoint::new("10.0.0.1:8000".parse::<SocketAddr>().unwrap()).id;
        assert_eq!(producer.index().is_trusted(endpoint), Some(false));
    }

    #[test]
    fn block_tokens_are_stable_and_distinct() {
        assert_eq!(block_tokens(7), block_tokens(7));
        assert_ne!(block_tokens(7), block_tokens(8));
        assert!(block_tokens(7).iter().all(|&token| token > 0 && token < 1 << 24));
        assert_eq!(token_prompt(&[7, 8]).split(' ').filter(|w| !w.is_empty()).count(), 32);
    }
}
