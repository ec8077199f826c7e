//! The index against a plain model under random event sequences.

use std::collections::HashMap;

use proptest::prelude::*;

use crate::{
    BlockRemoved, BlockStored, Encoding, EndpointMatch, Event, EventBatch, IndexConfig,
    PreciseIndex, TokenProcessor, TokenProcessorConfig, encode_batch,
};

const BS: u32 = 2;
const CAP: usize = 6;
const ENDPOINTS: u32 = 3;

#[derive(Debug, Clone)]
enum Op {
    Store {
        ep: u32,
        parent: Option<u64>,
        hashes: Vec<u64>,
        tokens: Vec<u32>,
        medium: u8,
        lora: bool,
    },
    Remove {
        ep: u32,
        hashes: Vec<u64>,
        medium: u8,
    },
    Clear {
        ep: u32,
    },
    Gap {
        ep: u32,
    },
    Lookup {
        tokens: Vec<u32>,
        lora: bool,
    },
}

const MEDIA: [Option<&str>; 3] = [None, Some("CPU"), Some("gpu")];

fn medium_of(m: u8) -> Option<String> {
    MEDIA[m as usize].map(str::to_owned)
}

fn bit_of(m: u8) -> u8 {
    if m == 1 { 2 } else { 1 }
}

fn op() -> impl Strategy<Value = Op> {
    let ep = 0..ENDPOINTS;
    let hash = 1u64..12;
    prop_oneof![
        4 => (ep.clone(), proptest::option::of(hash.clone()), proptest::collection::vec(hash.clone(), 1..4), 0u32..3, 0u8..3, any::<bool>())
            .prop_flat_map(|(ep, parent, hashes, seed, medium, lora)| {
                let n = hashes.len() * BS as usize;
                (Just(ep), Just(parent), Just(hashes), proptest::collection::vec(seed..seed + 2, n), Just(medium), Just(lora))
            })
            .prop_map(|(ep, parent, hashes, tokens, medium, lora)| Op::Store { ep, parent, hashes, tokens, medium, lora }),
        2 => (ep.clone(), proptest::collection::vec(hash, 1..4), 0u8..3).prop_map(|(ep, hashes, medium)| Op::Remove { ep, hashes, medium }),
        1 => ep.clone().prop_map(|ep| Op::Clear { ep }),
        1 => ep.prop_map(|ep| Op::Gap { ep }),
        2 => (proptest::collection::vec(0u32..4, 0..10), any::<bool>()).prop_map(|(tokens, lora)| Op::Lookup { tokens, lora }),
    ]
}

/// One endpoint as a list in recency order (most recent first).
#[derive(Debug, Default, Clone)]
struct ModelEndpoint {
    blocks: Vec<(u64, u64, u8)>,
    trusted: bool,
}

impl ModelEndpoint {
    fn find(&self, engine: u64) -> Option<usize> {
        self.blocks.iter().position(|b| b.0 == engine)
    }

    fn store(&mut self, engine: u64, key: u64, media: u8) {
        if let Some(i) = self.find(engine) {
            let mut b = self.blocks.remove(i);
            b.1 = key;
            b.2 |= media;
            self.blocks.insert(0, b);
        } else {
            if self.blocks.len() == CAP {
                self.blocks.pop();
            }
            self.blocks.insert(0, (engine, key, media));
        }
    }

    fn holds(&self, key: u64) -> bool {
        self.blocks.iter().any(|b| b.1 == key)
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let processor =
        TokenProcessor::new(&TokenProcessorConfig { block_size_tokens: BS, ..Default::default() });
    let index = PreciseIndex::new(processor.clone(), IndexConfig { capacity_per_endpoint: CAP });
    let mut model: HashMap<u32, ModelEndpoint> = HashMap::new();
    for ep in 0..ENDPOINTS {
        index.add_endpoint(ep);
        model.insert(ep, ModelEndpoint { trusted: true, ..Default::default() });
    }
    let mut seqs = [0u64; ENDPOINTS as usize];
    let mut keys = Vec::new();
    for op in ops {
        let batch = |ev: Event| EventBatch { ts: 0.0, events: vec![ev], data_parallel_rank: None };
        match op {
            Op::Store { ep, parent, hashes, tokens, medium, lora } => {
                let lora_name = lora.then(|| "adapter".to_owned());
                let ev = BlockStored {
                    block_hashes: hashes.clone(),
                    parent_block_hash: parent,
                    token_ids: tokens.clone(),
                    block_size: BS,
                    medium: medium_of(medium),
                    lora_name: lora_name.clone(),
                    ..BlockStored::default()
                };
                // Half the stores go through the wire format and the sequence check.
                let i = ep as usize;
                let payload = encode_batch(
                    &batch(Event::BlockStored(ev)),
                    if seqs[i] % 2 == 0 { Encoding::Map } else { Encoding::ArrayTagged },
                );
                prop_assert!(index.ingest(ep, seqs[i], "m", &payload).is_ok());
                seqs[i] += 1;
                let m = model.get_mut(&ep).unwrap();
                let start = match parent {
                    None => Some(processor.root(lora_name.as_deref().unwrap_or("m"))),
                    Some(p) => m.find(p).map(|j| m.blocks[j].1),
                };
                if let Some(mut parent) = start {
                    for (chunk, &h) in tokens.chunks(BS as usize).zip(&hashes) {
                        parent = processor.block_key::<&str>(parent, chunk, &[]);
                        m.store(h, parent, bit_of(medium));
                    }
                }
            }
            Op::Remove { ep, hashes, medium } => {
                index.apply_batch(
                    ep,
                    "m",
                    &batch(Event::BlockRemoved(BlockRemoved {
                        block_hashes: hashes.clone(),
                        medium: medium_of(medium),
                        group_idx: None,
                    })),
                );
                let m = model.get_mut(&ep).unwrap();
                for h in hashes {
                    if let Some(j) = m.find(h) {
                        m.blocks[j].2 &= !bit_of(medium);
                        if m.blocks[j].2 == 0 {
                            m.blocks.remove(j);
                        }
                    }
                }
            }
            Op::Clear { ep } => {
                index.apply_batch(ep, "m", &batch(Event::AllBlocksCleared));
                let m = model.get_mut(&ep).unwrap();
                m.blocks.clear();
                m.trusted = true;
            }
            Op::Gap { ep } => {
                let i = ep as usize;
                seqs[i] += 3;
                let payload = encode_batch(
                    &batch(Event::BlockRemoved(BlockRemoved::default())),
                    Encoding::ArrayTagged,
                );
                let outcome = index.ingest(ep, seqs[i], "m", &payload);
                seqs[i] += 1;
                if seqs[i] > 4 {
                    prop_assert!(
                        matches!(outcome, Ok(crate::SeqOutcome::Gap { .. })),
                        "{outcome:?}"
                    );
                    let m = model.get_mut(&ep).unwrap();
                    m.blocks.clear();
                    m.trusted = false;
                }
            }
            Op::Lookup { tokens, lora } => {
                processor.request_keys(if lora { "adapter" } else { "m" }, &tokens, 100, &mut keys);
                let eps: Vec<u32> = (0..ENDPOINTS).collect();
                let mut out = vec![EndpointMatch::Unknown; eps.len()];
                index.match_endpoints(&keys, &eps, &mut out);
                for ep in eps {
                    let m = &model[&ep];
                    let want = if m.trusted {
                        EndpointMatch::Blocks(keys.iter().take_while(|&&k| m.holds(k)).count())
                    } else {
                        EndpointMatch::Untrusted
                    };
                    prop_assert_eq!(out[ep as usize], want);
                }
            }
        }
        index.check().map_err(TestCaseError::fail)?;
        for ep in 0..ENDPOINTS {
            let m = &model[&ep];
            prop_assert_eq!(index.blocks_held(ep), m.blocks.len());
            prop_assert!(index.blocks_held(ep) <= CAP);
            for &(engine, key, _) in &m.blocks {
                prop_assert_eq!(index.key_of(ep, engine), Some(key));
            }
            prop_assert_eq!(index.is_trusted(ep), Some(m.trusted));
        }
        prop_assert!(index.memory_bytes() <= index.memory_bound_bytes());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn index_agrees_with_model(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops)?;
    }
}

#[test]
fn sequence_restart_at_zero_forgets_but_trusts() {
    let processor =
        TokenProcessor::new(&TokenProcessorConfig { block_size_tokens: 2, ..Default::default() });
    let index = PreciseIndex::new(processor, IndexConfig::default());
    index.add_endpoint(1u8);
    let stored = EventBatch {
        ts: 0.0,
        events: vec![Event::BlockStored(BlockStored {
            block_hashes: vec![5],
            token_ids: vec![1, 2],
            block_size: 2,
            ..Default::default()
        })],
        data_parallel_rank: None,
    };
    let payload = encode_batch(&stored, Encoding::Map);
    assert_eq!(index.ingest(1, 7, "m", &payload), Ok(crate::SeqOutcome::InOrder));
    assert_eq!(index.ingest(1, 8, "m", &payload), Ok(crate::SeqOutcome::InOrder));
    assert_eq!(index.ingest(1, 3, "m", &payload), Ok(crate::SeqOutcome::Restarted));
    assert_eq!(index.is_trusted(1), Some(true));
    assert_eq!(index.blocks_held(1), 1);
    assert_eq!(index.stats().restarts, 1);
    // A payload that does not decode: untrusted, counted.
    assert!(index.ingest(1, 1, "m", b"\xc1").is_err());
    assert_eq!(index.is_trusted(1), Some(false));
    assert_eq!(index.blocks_held(1), 0);
    assert_eq!(index.stats().decode_errors, 1);
    assert_eq!(index.ingest(2, 0, "m", &payload), Err(crate::IngestError::UnknownEndpoint));
}

#[test]
fn non_indexable_groups_and_ragged_blocks_are_skipped() {
    let processor =
        TokenProcessor::new(&TokenProcessorConfig { block_size_tokens: 2, ..Default::default() });
    let index = PreciseIndex::new(processor, IndexConfig::default());
    index.add_endpoint(1u8);
    let swa = BlockStored {
        block_hashes: vec![5],
        token_ids: vec![1, 2],
        block_size: 2,
        group_idx: Some(1),
        kv_cache_spec_kind: Some("sliding_window".into()),
        ..Default::default()
    };
    let full = BlockStored {
        group_idx: Some(0),
        kv_cache_spec_kind: Some("full_attention".into()),
        ..swa.clone()
    };
    // Three tokens for one block of four: not a whole engine block.
    let big = BlockStored {
        block_hashes: vec![6],
        token_ids: vec![1, 2, 3],
        block_size: 4,
        ..Default::default()
    };
    let batch = EventBatch {
        ts: 0.0,
        events: vec![
            Event::BlockStored(swa),
            Event::BlockStored(full),
            Event::BlockStored(big),
            // The sliding-window group's removal of hash 5 must not touch group 0's block 5.
            Event::BlockRemoved(BlockRemoved {
                block_hashes: vec![5],
                medium: None,
                group_idx: Some(1),
            }),
        ],
        data_parallel_rank: None,
    };
    index.apply_batch(1, "m", &batch);
    assert_eq!(index.blocks_held(1), 1);
    let s = index.stats();
    assert_eq!((s.skipped_group, s.skipped_block_size), (2, 1));
}

#[test]
fn summary_counts_endpoints_untrusted_ones_and_blocks() {
    let processor =
        TokenProcessor::new(&TokenProcessorConfig { block_size_tokens: 2, ..Default::default() });
    let index = PreciseIndex::new(processor, IndexConfig::default());
    assert_eq!(index.summary(), crate::IndexSummary::default());
    for ep in 1u8..=3 {
        index.add_endpoint(ep);
    }
    let stored = |hashes: Vec<u64>| EventBatch {
        ts: 0.0,
        events: vec![Event::BlockStored(BlockStored {
            token_ids: (0..hashes.len() as u32 * 2).collect(),
            block_hashes: hashes,
            block_size: 2,
            ..Default::default()
        })],
        data_parallel_rank: None,
    };
    assert!(index.apply_batch(1, "m", &stored(vec![1, 2, 3])));
    assert!(index.apply_batch(2, "m", &stored(vec![4])));
    assert!(index.apply_batch(3, "m", &stored(vec![5, 6])));
    index.mark_gap(3);
    let summary = index.summary();
    assert_eq!(summary, crate::IndexSummary { endpoints: 3, untrusted: 1, blocks: 4 });
}

fn stored_event(
    hashes: Vec<u64>,
    parent: Option<u64>,
    tokens: std::ops::Range<u32>,
    bs: u32,
) -> Event {
    Event::BlockStored(BlockStored {
        block_hashes: hashes,
        parent_block_hash: parent,
        token_ids: tokens.collect(),
        block_size: bs,
        ..Default::default()
    })
}

fn apply(index: &PreciseIndex<u8>, events: Vec<Event>) {
    assert!(index.apply_batch(1, "m", &EventBatch { ts: 0.0, events, data_parallel_rank: None }));
}

#[test]
fn larger_engine_blocks_carry_several_keys_and_are_removed_whole() {
    // Engine blocks of 8 tokens, keys over 4: each engine block carries two keys.
    let processor =
        TokenProcessor::new(&TokenProcessorConfig { block_size_tokens: 4, ..Default::default() });
    let index = PreciseIndex::new(processor, IndexConfig::default());
    index.add_endpoint(1u8);
    apply(&index, vec![stored_event(vec![100, 101], None, 0..16, 8)]);
    // A child event continues the chain from its parent's last key.
    apply(&index, vec![stored_event(vec![102], Some(101), 16..24, 8)]);
    let mut keys = Vec::new();
    index.processor().request_keys("m", &(0..24).collect::<Vec<_>>(), 64, &mut keys);
    assert_eq!(keys.len(), 6);
    assert_eq!(index.longest_prefix(1, &keys), EndpointMatch::Blocks(6));
    assert_eq!(index.key_of(1, 101), Some(keys[3]), "the parent lookup finds the last key");
    assert_eq!(index.blocks_held(1), 6);
    assert_eq!(index.stats().blocks_stored, 6);
    // A CPU copy of engine block 100 (no tokens) covers both of its keys.
    apply(
        &index,
        vec![Event::BlockStored(BlockStored {
            block_hashes: vec![100],
            medium: Some("cpu".into()),
            ..Default::default()
        })],
    );
    // Removing engine block 101 from the GPU removes both of its keys; the CPU copy of 100
    // is still there after its GPU removal.
    apply(
        &index,
        vec![
            Event::BlockRemoved(BlockRemoved {
                block_hashes: vec![101],
                medium: None,
                group_idx: None,
            }),
            Event::BlockRemoved(BlockRemoved {
                block_hashes: vec![100],
                medium: None,
                group_idx: None,
            }),
        ],
    );
    assert_eq!(index.longest_prefix(1, &keys), EndpointMatch::Blocks(2));
    assert_eq!(index.blocks_held(1), 4);
    assert_eq!(index.stats().skipped_block_size, 0);
    index.check().unwrap();
}

#[test]
fn smaller_engine_blocks_share_a_key_and_short_tails_are_dropped() {
    // Engine blocks of 2 tokens, keys over 4: 10 tokens make two whole keys, the last two
    // tokens are dropped.
    let processor =
        TokenProcessor::new(&TokenProcessorConfig { block_size_tokens: 4, ..Default::default() });
    let index = PreciseIndex::new(processor, IndexConfig::default());
    index.add_endpoint(1u8);
    apply(&index, vec![stored_event(vec![1, 2, 3, 4, 5], None, 0..10, 2)]);
    let mut keys = Vec::new();
    index.processor().request_keys("m", &(0..8).collect::<Vec<_>>(), 64, &mut keys);
    assert_eq!(index.longest_prefix(1, &keys), EndpointMatch::Blocks(2));
    assert_eq!(index.key_of(1, 1), Some(keys[0]));
    // llm-d's proportional pairing: engine blocks 1-3 go with the first key, 4-5 the second.
    assert_eq!(index.key_of(1, 3), Some(keys[0]));
    assert_eq!(index.key_of(1, 4), Some(keys[1]));
    // A key is held while any engine block of it is.
    apply(
        &index,
        vec![Event::BlockRemoved(BlockRemoved {
            block_hashes: vec![3],
            medium: None,
            group_idx: None,
        })],
    );
    assert_eq!(index.longest_prefix(1, &keys), EndpointMatch::Blocks(2));
    apply(
        &index,
        vec![Event::BlockRemoved(BlockRemoved {
            block_hashes: vec![4, 5],
            medium: None,
            group_idx: None,
        })],
    );
    assert_eq!(index.longest_prefix(1, &keys), EndpointMatch::Blocks(1));
    // Fewer tokens than one key: nothing to store, counted.
    apply(&index, vec![stored_event(vec![9], None, 0..2, 2)]);
    assert_eq!(index.key_of(1, 9), None);
    assert_eq!(index.stats().skipped_block_size, 1);
    index.check().unwrap();
}
