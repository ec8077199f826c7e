//! vLLM's KV-cache events and their msgpack decoding.
//!
//! # Wire format
//! vLLM (`vllm/distributed/kv_events.py`) encodes an `EventBatch {ts, events,
//! data_parallel_rank}` with msgspec. Each event is a tagged struct (`tag=True`, the tag being
//! the class name) with `omit_defaults=True`, in one of two shapes:
//!
//! * **array-tagged** (`array_like=True`, vLLM before vllm-project/vllm#42892): the batch is
//!   `[ts, [event, ...], data_parallel_rank?]` and each event is `[tag, field, ...]` in
//!   declaration order, trailing fields left at their default omitted;
//! * **map** (vLLM since #42892): the batch is `{"ts": .., "events": [..],
//!   "data_parallel_rank": ..}` and each event is `{"type": tag, field: value, ...}`.
//!
//! The field order of the array shape (llm-d-router `pkg/kvevents/engineadapter/vllm_adapter.go`
//! reads the same positions):
//!
//! | event | fields after the tag |
//! |---|---|
//! | `BlockStored` | `block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name, extra_keys, group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window` |
//! | `BlockRemoved` | `block_hashes, medium, group_idx` |
//! | `AllBlocksCleared` | none |
//!
//! A block hash is an integer (older vLLM: a Python `hash()`, possibly negative, taken as its
//! 64-bit two's-complement pattern) or a byte string (a SHA-256 digest since vLLM 0.10), of
//! which the last eight bytes are read big-endian, shorter strings zero-padded on the left,
//! as llm-d does (`getHashAsUint64`). Fields this crate does not know are skipped in both
//! shapes, so newer vLLM releases that append fields still decode.
//!
//! # Errors
//! [`decode_batch`] never panics and never allocates more than the payload's length justifies:
//! every failure is a [`DecodeError`] naming the field and the byte offset. An unknown event
//! tag fails the batch (as llm-d does): the caller cannot know what the event would have
//! changed, so it treats the batch as lost.

use crate::DecodeError;
use crate::msgpack::{Int, Reader, Writer};

/// One published batch of events.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EventBatch {
    /// Publisher wall-clock time, seconds since the Unix epoch.
    pub ts: f64,
    /// The events, in the order the engine produced them.
    pub events: Vec<Event>,
    /// The data-parallel rank of the publishing engine, when it says.
    pub data_parallel_rank: Option<i64>,
}

/// A KV-cache event.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Blocks were stored (filled and made reusable).
    BlockStored(BlockStored),
    /// Blocks were evicted.
    BlockRemoved(BlockRemoved),
    /// The engine dropped its whole prefix cache (e.g. after a weight update or a reset).
    AllBlocksCleared,
}

/// `BlockStored`: consecutive blocks of one sequence, each named by the engine's block hash.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockStored {
    /// The engine's hashes of the stored blocks, in sequence order.
    pub block_hashes: Vec<u64>,
    /// The engine hash of the block before the first stored one, `None` at the sequence start.
    pub parent_block_hash: Option<u64>,
    /// The tokens of the stored blocks (`block_size` per block); empty for a tier update
    /// (blocks copied to another medium).
    pub token_ids: Vec<u32>,
    /// Tokens per block on the engine.
    pub block_size: u32,
    /// Deprecated by vLLM in favour of `lora_name`; kept as decoded.
    pub lora_id: Option<i64>,
    /// Where the blocks live (`"GPU"`, `"CPU"`, ...); `None` means the GPU.
    pub medium: Option<String>,
    /// The LoRA adapter the blocks were computed with.
    pub lora_name: Option<String>,
    /// Per block, the string identifiers of its extra keys (multimodal hashes, ...), read as
    /// llm-d reads them: a string entry, or the first element of an array entry when it is a
    /// string. `None` for a block without any.
    pub extra_keys: Option<Vec<Option<Vec<String>>>>,
    /// The KV-cache group (hybrid memory allocator), when the engine has several.
    pub group_idx: Option<u32>,
    /// The group's attention kind (`"full_attention"`, `"sliding_window"`, ...).
    pub kv_cache_spec_kind: Option<String>,
    /// The group's sliding window, for sliding-window groups.
    pub kv_cache_spec_sliding_window: Option<i64>,
}

/// `BlockRemoved`: blocks evicted from one medium.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockRemoved {
    /// The engine's hashes of the removed blocks.
    pub block_hashes: Vec<u64>,
    /// Where they were removed from; `None` means the GPU.
    pub medium: Option<String>,
    /// The KV-cache group, when the engine has several.
    pub group_idx: Option<u32>,
}

/// The two msgpack shapes vLLM has used for events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// msgspec `array_like=True, tag=True`: `[tag, fields...]`.
    ArrayTagged,
    /// msgspec `tag=True` without `array_like`: `{"type": tag, field: value, ...}`.
    Map,
}

const TAG_STORED: &str = "BlockStored";
const TAG_REMOVED: &str = "BlockRemoved";
const TAG_CLEARED: &str = "AllBlocksCleared";

/// Decodes one ZMQ payload (the third frame) into an [`EventBatch`], in either shape.
///
/// ```
/// // [ts, [["AllBlocksCleared"]]] in the array-tagged shape.
/// let payload = b"\x92\xcb\x41\xd9\x00\x00\x00\x00\x00\x00\x91\x91\xb0AllBlocksCleared";
/// let batch = kv_events::decode_batch(payload).unwrap();
/// assert_eq!(batch.events, vec![kv_events::Event::AllBlocksCleared]);
/// assert!(kv_events::decode_batch(&payload[..5]).is_err());
/// ```
pub fn decode_batch(payload: &[u8]) -> Result<EventBatch, DecodeError> {
    let mut r = Reader::new(payload);
    let mut batch = EventBatch::default();
    match r.peek()? {
        0x90..=0x9f | 0xdc | 0xdd => {
            let n = r.array_len("EventBatch")?;
            if n < 2 {
                return Err(DecodeError::MissingField { event: "EventBatch", field: "events" });
            }
            batch.ts = r.float("ts")?;
            decode_events(&mut r, &mut batch.events)?;
            if n >= 3 {
                batch.data_parallel_rank = opt_i64(&mut r, "data_parallel_rank")?;
            }
            for _ in 3..n {
                r.skip()?;
            }
        }
        0x80..=0x8f | 0xde | 0xdf => {
            let n = r.map_len("EventBatch")?;
            let (mut ts, mut events) = (false, false);
            for _ in 0..n {
                match r.str_bytes("EventBatch key")? {
                    b"ts" => {
                        batch.ts = r.float("ts")?;
                        ts = true;
                    }
                    b"events" => {
                        decode_events(&mut r, &mut batch.events)?;
                        events = true;
                    }
                    b"data_parallel_rank" => {
                        batch.data_parallel_rank = opt_i64(&mut r, "data_parallel_rank")?;
                    }
                    _ => r.skip()?,
                }
            }
            if !ts {
                return Err(DecodeError::MissingField { event: "EventBatch", field: "ts" });
            }
            if !events {
                return Err(DecodeError::MissingField { event: "EventBatch", field: "events" });
            }
        }
        m => {
            return Err(DecodeError::WrongType {
                field: "EventBatch",
                expected: "array or map",
                found: crate::msgpack::kind_name(m),
                offset: 0,
            });
        }
    }
    if r.remaining() != 0 {
        return Err(DecodeError::TrailingBytes { count: r.remaining() });
    }
    Ok(batch)
}

fn decode_events(r: &mut Reader<'_>, out: &mut Vec<Event>) -> Result<(), DecodeError> {
    let n = r.array_len("events")?;
    out.reserve(n);
    for _ in 0..n {
        out.push(decode_event(r)?);
    }
    Ok(())
}

fn decode_event(r: &mut Reader<'_>) -> Result<Event, DecodeError> {
    match r.peek()? {
        0x80..=0x8f | 0xde | 0xdf => decode_event_map(r),
        _ => decode_event_array(r),
    }
}

fn unknown_tag(tag: &[u8]) -> DecodeError {
    // Bounded copy: the tag only serves the error message and the counters' logs.
    let shown = &tag[..tag.len().min(64)];
    DecodeError::UnknownTag { tag: String::from_utf8_lossy(shown).into_owned() }
}

fn decode_event_array(r: &mut Reader<'_>) -> Result<Event, DecodeError> {
    let n = r.array_len("event")?;
    if n == 0 {
        return Err(DecodeError::MissingField { event: "event", field: "tag" });
    }
    let tag = r.str_bytes("event tag")?;
    let fields = n - 1;
    let event = match tag {
        b"BlockStored" => {
            if fields < 4 {
                return Err(DecodeError::MissingField {
                    event: TAG_STORED,
                    field: missing_stored(fields),
                });
            }
            let mut ev = BlockStored::default();
            hashes(r, "block_hashes", &mut ev.block_hashes)?;
            ev.parent_block_hash = opt_hash(r, "parent_block_hash")?;
            tokens(r, &mut ev.token_ids)?;
            ev.block_size = u32_field(r, "block_size")?;
            for i in 4..fields {
                match i {
                    4 => ev.lora_id = opt_i64(r, "lora_id")?,
                    5 => ev.medium = opt_string(r, "medium")?,
                    6 => ev.lora_name = opt_string(r, "lora_name")?,
                    7 => ev.extra_keys = extra_keys(r)?,
                    8 => ev.group_idx = opt_u32(r, "group_idx")?,
                    9 => ev.kv_cache_spec_kind = opt_string(r, "kv_cache_spec_kind")?,
                    10 => {
                        ev.kv_cache_spec_sliding_window =
                            opt_i64(r, "kv_cache_spec_sliding_window")?
                    }
                    _ => r.skip()?,
                }
            }
            return Ok(Event::BlockStored(ev));
        }
        b"BlockRemoved" => {
            if fields < 1 {
                return Err(DecodeError::MissingField {
                    event: TAG_REMOVED,
                    field: "block_hashes",
                });
            }
            let mut ev = BlockRemoved::default();
            hashes(r, "block_hashes", &mut ev.block_hashes)?;
            for i in 1..fields {
                match i {
                    1 => ev.medium = opt_string(r, "medium")?,
                    2 => ev.group_idx = opt_u32(r, "group_idx")?,
                    _ => r.skip()?,
                }
            }
            Event::BlockRemoved(ev)
        }
        b"AllBlocksCleared" => {
            for _ in 0..fields {
                r.skip()?;
            }
            Event::AllBlocksCleared
        }
        other => return Err(unknown_tag(other)),
    };
    Ok(event)
}

fn missing_stored(fields: usize) -> &'static str {
    ["block_hashes", "parent_block_hash", "token_ids", "block_size"][fields.min(3)]
}

fn decode_event_map(r: &mut Reader<'_>) -> Result<Event, DecodeError> {
    let n = r.map_len("event")?;
    // The tag may come anywhere among the keys: collect the fields of either kind, then check.
    let mut tag: Option<&[u8]> = None;
    let mut stored = BlockStored::default();
    let mut medium = None;
    let mut group_idx = None;
    let (mut has_hashes, mut has_parent, mut has_tokens, mut has_size) =
        (false, false, false, false);
    for _ in 0..n {
        match r.str_bytes("event key")? {
            b"type" => tag = Some(r.str_bytes("event tag")?),
            b"block_hashes" => {
                hashes(r, "block_hashes", &mut stored.block_hashes)?;
                has_hashes = true;
            }
            b"parent_block_hash" => {
                stored.parent_block_hash = opt_hash(r, "parent_block_hash")?;
                has_parent = true;
            }
            b"token_ids" => {
                tokens(r, &mut stored.token_ids)?;
                has_tokens = true;
            }
            b"block_size" => {
                stored.block_size = u32_field(r, "block_size")?;
                has_size = true;
            }
            b"lora_id" => stored.lora_id = opt_i64(r, "lora_id")?,
            b"medium" => medium = opt_string(r, "medium")?,
            b"lora_name" => stored.lora_name = opt_string(r, "lora_name")?,
            b"extra_keys" => stored.extra_keys = extra_keys(r)?,
            b"group_idx" => group_idx = opt_u32(r, "group_idx")?,
            b"kv_cache_spec_kind" => {
                stored.kv_cache_spec_kind = opt_string(r, "kv_cache_spec_kind")?;
            }
            b"kv_cache_spec_sliding_window" => {
                stored.kv_cache_spec_sliding_window = opt_i64(r, "kv_cache_spec_sliding_window")?;
            }
            _ => r.skip()?,
        }
    }
    let Some(tag) = tag else {
        return Err(DecodeError::MissingField { event: "event", field: "type" });
    };
    match tag {
        b"BlockStored" => {
            for (has, field) in [
                (has_hashes, "block_hashes"),
                (has_parent, "parent_block_hash"),
                (has_tokens, "token_ids"),
                (has_size, "block_size"),
            ] {
                if !has {
                    return Err(DecodeError::MissingField { event: TAG_STORED, field });
                }
            }
            stored.medium = medium;
            stored.group_idx = group_idx;
            Ok(Event::BlockStored(stored))
        }
        b"BlockRemoved" => {
            if !has_hashes {
                return Err(DecodeError::MissingField {
                    event: TAG_REMOVED,
                    field: "block_hashes",
                });
            }
            Ok(Event::BlockRemoved(BlockRemoved {
                block_hashes: stored.block_hashes,
                medium,
                group_idx,
            }))
        }
        b"AllBlocksCleared" => Ok(Event::AllBlocksCleared),
        other => Err(unknown_tag(other)),
    }
}

/// Reads an engine block hash: an integer, or the last eight bytes of a byte string.
fn hash(r: &mut Reader<'_>, field: &'static str) -> Result<u64, DecodeError> {
    match r.peek()? {
        0xc4..=0xc6 => {
            let bytes = r.bin(field)?;
            if bytes.is_empty() {
                return Err(DecodeError::EmptyHash { field });
            }
            let tail = &bytes[bytes.len().saturating_sub(8)..];
            let mut be = [0u8; 8];
            be[8 - tail.len()..].copy_from_slice(tail);
            Ok(u64::from_be_bytes(be))
        }
        _ => Ok(r.int(field)?.bits()),
    }
}

fn opt_hash(r: &mut Reader<'_>, field: &'static str) -> Result<Option<u64>, DecodeError> {
    if r.nil()? { Ok(None) } else { hash(r, field).map(Some) }
}

fn hashes(r: &mut Reader<'_>, field: &'static str, out: &mut Vec<u64>) -> Result<(), DecodeError> {
    let n = r.array_len(field)?;
    out.clear();
    out.reserve(n);
    for _ in 0..n {
        out.push(hash(r, field)?);
    }
    Ok(())
}

fn tokens(r: &mut Reader<'_>, out: &mut Vec<u32>) -> Result<(), DecodeError> {
    let n = r.array_len("token_ids")?;
    out.clear();
    out.reserve(n);
    for _ in 0..n {
        out.push(u32_field(r, "token_ids")?);
    }
    Ok(())
}

fn u32_field(r: &mut Reader<'_>, field: &'static str) -> Result<u32, DecodeError> {
    match r.int(field)? {
        Int::Unsigned(u) => u32::try_from(u).map_err(|_| DecodeError::OutOfRange { field }),
        Int::Signed(i) => u32::try_from(i).map_err(|_| DecodeError::OutOfRange { field }),
    }
}

fn opt_u32(r: &mut Reader<'_>, field: &'static str) -> Result<Option<u32>, DecodeError> {
    if r.nil()? { Ok(None) } else { u32_field(r, field).map(Some) }
}

fn opt_i64(r: &mut Reader<'_>, field: &'static str) -> Result<Option<i64>, DecodeError> {
    if r.nil()? {
        return Ok(None);
    }
    r.int(field)?.to_i64().map(Some).ok_or(DecodeError::OutOfRange { field })
}

fn opt_string(r: &mut Reader<'_>, field: &'static str) -> Result<Option<String>, DecodeError> {
    if r.nil()? { Ok(None) } else { r.str(field).map(|s| Some(s.to_owned())) }
}

fn extra_keys(r: &mut Reader<'_>) -> Result<Option<Vec<Option<Vec<String>>>>, DecodeError> {
    if r.nil()? {
        return Ok(None);
    }
    let n = r.array_len("extra_keys")?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        if r.nil()? {
            out.push(None);
            continue;
        }
        let m = r.array_len("extra_keys")?;
        let mut ids = Vec::new();
        for _ in 0..m {
            match r.peek()? {
                0xa0..=0xbf | 0xd9..=0xdb => ids.push(r.str("extra_keys")?.to_owned()),
                0x90..=0x9f | 0xdc | 0xdd => {
                    let k = r.array_len("extra_keys")?;
                    let mut rest = k;
                    if k > 0 && matches!(r.peek()?, 0xa0..=0xbf | 0xd9..=0xdb) {
                        ids.push(r.str("extra_keys")?.to_owned());
                        rest -= 1;
                    }
                    for _ in 0..rest {
                        r.skip()?;
                    }
                }
                _ => r.skip()?,
            }
        }
        out.push(if ids.is_empty() { None } else { Some(ids) });
    }
    Ok(Some(out))
}

/// Encodes a batch the way vLLM's msgspec encoder does, in either shape: the bytes a test
/// publisher sends. Fields left at their default (`None` for the optional trailing fields of
/// `BlockStored` and `BlockRemoved`, and `data_parallel_rank`) are omitted, as msgspec's
/// `omit_defaults` does; `lora_id`, `medium` and `lora_name` have no default in vLLM and are
/// always written. Integer hashes are written as integers.
pub fn encode_batch(batch: &EventBatch, encoding: Encoding) -> Vec<u8> {
    let mut w = Writer::default();
    let dp = batch.data_parallel_rank;
    match encoding {
        Encoding::ArrayTagged => {
            w.array(if dp.is_some() { 3 } else { 2 });
            w.float(batch.ts);
            w.array(batch.events.len());
            for ev in &batch.events {
                encode_event_array(&mut w, ev);
            }
            if let Some(dp) = dp {
                w.int(dp);
            }
        }
        Encoding::Map => {
            w.map(if dp.is_some() { 3 } else { 2 });
            w.str("ts");
            w.float(batch.ts);
            w.str("events");
            w.array(batch.events.len());
            for ev in &batch.events {
                encode_event_map(&mut w, ev);
            }
            if let Some(dp) = dp {
                w.str("data_parallel_rank");
                w.int(dp);
            }
        }
    }
    w.buf
}

fn opt_str(w: &mut Writer, v: Option<&str>) {
    match v {
        Some(s) => w.str(s),
        None => w.nil(),
    }
}

fn opt_int(w: &mut Writer, v: Option<i64>) {
    match v {
        Some(i) => w.int(i),
        None => w.nil(),
    }
}

fn write_hashes(w: &mut Writer, hashes: &[u64]) {
    w.array(hashes.len());
    for &h in hashes {
        w.uint(h);
    }
}

fn write_extra_keys(w: &mut Writer, keys: &[Option<Vec<String>>]) {
    w.array(keys.len());
    for block in keys {
        match block {
            Some(ids) => {
                w.array(ids.len());
                for id in ids {
                    w.str(id);
                }
            }
            None => w.nil(),
        }
    }
}

/// The trailing optional fields of `BlockStored` that are set, in declaration order.
fn stored_tail(ev: &BlockStored) -> usize {
    if ev.kv_cache_spec_sliding_window.is_some() {
        4
    } else if ev.kv_cache_spec_kind.is_some() {
        3
    } else if ev.group_idx.is_some() {
        2
    } else if ev.extra_keys.is_some() {
        1
    } else {
        0
    }
}

fn encode_event_array(w: &mut Writer, ev: &Event) {
    match ev {
        Event::BlockStored(s) => {
            let tail = stored_tail(s);
            w.array(8 + tail);
            w.str(TAG_STORED);
            write_hashes(w, &s.block_hashes);
            match s.parent_block_hash {
                Some(p) => w.uint(p),
                None => w.nil(),
            }
            w.array(s.token_ids.len());
            for &t in &s.token_ids {
                w.uint(u64::from(t));
            }
            w.uint(u64::from(s.block_size));
            opt_int(w, s.lora_id);
            opt_str(w, s.medium.as_deref());
            opt_str(w, s.lora_name.as_deref());
            if tail >= 1 {
                match &s.extra_keys {
                    Some(k) => write_extra_keys(w, k),
                    None => w.nil(),
                }
            }
            if tail >= 2 {
                opt_int(w, s.group_idx.map(i64::from));
            }
            if tail >= 3 {
                opt_str(w, s.kv_cache_spec_kind.as_deref());
            }
            if tail >= 4 {
                opt_int(w, s.kv_cache_spec_sliding_window);
            }
        }
        Event::BlockRemoved(b) => {
            w.array(if b.group_idx.is_some() { 4 } else { 3 });
            w.str(TAG_REMOVED);
            write_hashes(w, &b.block_hashes);
            opt_str(w, b.medium.as_deref());
            if let Some(g) = b.group_idx {
                w.uint(u64::from(g));
            }
        }
        Event::AllBlocksCleared => {
            w.array(1);
            w.str(TAG_CLEARED);
        }
    }
}

fn encode_event_map(w: &mut Writer, ev: &Event) {
    match ev {
        Event::BlockStored(s) => {
            let optional = usize::from(s.extra_keys.is_some())
                + usize::from(s.group_idx.is_some())
                + usize::from(s.kv_cache_spec_kind.is_some())
                + usize::from(s.kv_cache_spec_sliding_window.is_some());
            w.map(8 + optional);
            w.str("type");
            w.str(TAG_STORED);
            w.str("block_hashes");
            write_hashes(w, &s.block_hashes);
            w.str("parent_block_hash");
            match s.parent_block_hash {
                Some(p) => w.uint(p),
                None => w.nil(),
            }
            w.str("token_ids");
            w.array(s.token_ids.len());
            for &t in &s.token_ids {
                w.uint(u64::from(t));
            }
            w.str("block_size");
            w.uint(u64::from(s.block_size));
            w.str("lora_id");
            opt_int(w, s.lora_id);
            w.str("medium");
            opt_str(w, s.medium.as_deref());
            w.str("lora_name");
            opt_str(w, s.lora_name.as_deref());
            if let Some(k) = &s.extra_keys {
                w.str("extra_keys");
                write_extra_keys(w, k);
            }
            if let Some(g) = s.group_idx {
                w.str("group_idx");
                w.uint(u64::from(g));
            }
            if let Some(kind) = &s.kv_cache_spec_kind {
                w.str("kv_cache_spec_kind");
                w.str(kind);
            }
            if let Some(win) = s.kv_cache_spec_sliding_window {
                w.str("kv_cache_spec_sliding_window");
                w.int(win);
            }
        }
        Event::BlockRemoved(b) => {
            w.map(if b.group_idx.is_some() { 4 } else { 3 });
            w.str("type");
            w.str(TAG_REMOVED);
            w.str("block_hashes");
            write_hashes(w, &b.block_hashes);
            w.str("medium");
            opt_str(w, b.medium.as_deref());
            if let Some(g) = b.group_idx {
                w.str("group_idx");
                w.uint(u64::from(g));
            }
        }
        Event::AllBlocksCleared => {
            w.map(1);
            w.str("type");
            w.str(TAG_CLEARED);
        }
    }
}
