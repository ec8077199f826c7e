//! The `kv_events` target: the input is one ZMQ payload of vLLM KV-cache events, as a
//! subscriber receives it from an engine it does not control.
//!
//! Decoding never panics. A decoded batch survives an encode/decode round trip in both of
//! vLLM's msgpack shapes. Applied to a bounded precise index, it never lets an endpoint hold
//! more blocks than the bound.

use kv_events::{
    Encoding, EventBatch, IndexConfig, PreciseIndex, TokenProcessor, TokenProcessorConfig,
};

/// Blocks per endpoint in the fuzzed index: small, so that eviction runs often.
const CAPACITY: usize = 16;

/// The target body.
pub fn kv_events(data: &[u8]) {
    let Ok(batch) = kv_events::decode_batch(data) else { return };
    for encoding in [Encoding::ArrayTagged, Encoding::Map] {
        let again = kv_events::decode_batch(&kv_events::encode_batch(&batch, encoding))
            .unwrap_or_else(|error| panic!("{encoding:?}: the re-encoded batch fails: {error}"));
        assert_same(&batch, &again, encoding);
    }
    let index = PreciseIndex::new(
        TokenProcessor::new(&TokenProcessorConfig::default()),
        IndexConfig { capacity_per_endpoint: CAPACITY },
    );
    index.add_endpoint(0u32);
    index.apply_batch(0, "model", &batch);
    index.apply_batch(0, "model", &batch);
    assert!(index.blocks_held(0) <= CAPACITY, "{} blocks held", index.blocks_held(0));
}

/// Equal batches, reading NaN timestamps as equal (a float field the engine fills).
fn assert_same(batch: &EventBatch, again: &EventBatch, encoding: Encoding) {
    let same_ts = batch.ts == again.ts || (batch.ts.is_nan() && again.ts.is_nan());
    assert!(same_ts, "{encoding:?}: ts {} became {}", batch.ts, again.ts);
    assert_eq!(batch.events, again.events, "{encoding:?}: events");
    assert_eq!(batch.data_parallel_rank, again.data_parallel_rank, "{encoding:?}: rank");
}
