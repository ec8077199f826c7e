//! The binary form of what replicas exchange, version [`FORMAT_VERSION`].
//!
//! Every message starts with the same header, so that a reader can tell a message of its own
//! pool and format from anything else written under the same keys:
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `EPPS` |
//! | 1 | format version |
//! | 1 | kind: 1 prefix records, 2 in-flight counts |
//! | 1 + n | replica id (UTF-8, n ≤ [`MAX_NAME_BYTES`]) |
//! | 1 + n | pool name (UTF-8, n ≤ [`MAX_NAME_BYTES`]) |
//! | 8 | sent at, microseconds since the Unix epoch |
//! | 1 + names | table of plugin names (count ≤ [`MAX_PLUGINS`], each 1 + n bytes) |
//!
//! then, for prefix records, a `u32` count and per record `plugin: u8, endpoint: u64,
//! blocks: u32, hashes: blocks × u64`; for in-flight counts, a `u32` count and per entry
//! `plugin: u8, endpoint: u64, requests: u64, tokens: u64`. Integers are little-endian.
//!
//! Decoding never trusts a length: each is checked against what is left of the message and
//! against the caps ([`MAX_MESSAGE_BYTES`], [`MAX_RECORD_BLOCKS`]) before anything is
//! allocated, so a hostile message costs at most its own size.

/// The format written and the only one read.
pub const FORMAT_VERSION: u8 = 1;
/// The largest message written or read.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// The most block hashes one record carries (longer records are cut: a prefix of a record is
/// a valid record).
pub const MAX_RECORD_BLOCKS: usize = 4096;
/// Longest replica id, pool name or plugin name.
pub const MAX_NAME_BYTES: usize = 255;
/// Most plugin names in one message.
pub const MAX_PLUGINS: usize = 32;

const MAGIC: &[u8; 4] = b"EPPS";
const KIND_RECORDS: u8 = 1;
const KIND_IN_FLIGHT: u8 = 2;

/// Why a message was not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not one of ours: no magic.
    #[error("not an epp sync message")]
    Magic,
    /// Written in a format this replica does not read.
    #[error("format version {0} (this replica reads {FORMAT_VERSION})")]
    Version(u8),
    /// An unknown message kind.
    #[error("unknown message kind {0}")]
    Kind(u8),
    /// Shorter than its lengths say, or longer than a message may be.
    #[error("message truncated or oversized at byte {0}")]
    Length(usize),
    /// A name is not UTF-8.
    #[error("a name is not UTF-8")]
    Utf8,
    /// A field is out of range (a plugin index past the table, a count past the caps).
    #[error("field out of range: {0}")]
    Range(&'static str),
}

/// Header fields of every message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Who wrote it.
    pub replica: String,
    /// The pool it is about.
    pub pool: String,
    /// When it was sent (microseconds since the Unix epoch, the sender's clock).
    pub sent_at_micros: u64,
    /// The plugin names records and counts refer to by position.
    pub plugins: Vec<String>,
}

/// One prefix record: `endpoint` holds `hashes`, in the index of `plugin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Position in [`Header::plugins`].
    pub plugin: u8,
    /// The endpoint id ([`scheduler_core::EndpointId`]'s value).
    pub endpoint: u64,
    /// Leading block hashes.
    pub hashes: Vec<u64>,
}

/// One in-flight count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    /// Position in [`Header::plugins`].
    pub plugin: u8,
    /// The endpoint id.
    pub endpoint: u64,
    /// Requests in flight.
    pub requests: u64,
    /// Tokens in flight.
    pub tokens: u64,
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A batch of prefix records.
    Records(Header, Vec<Record>),
    /// One replica's in-flight counts.
    InFlight(Header, Vec<Count>),
}

impl Message {
    /// The header.
    pub fn header(&self) -> &Header {
        match self {
            Self::Records(header, _) | Self::InFlight(header, _) => header,
        }
    }
}

/// Appends a message's header to `out`.
fn put_header(out: &mut Vec<u8>, kind: u8, header: &Header) {
    out.extend_from_slice(MAGIC);
    out.push(FORMAT_VERSION);
    out.push(kind);
    put_name(out, &header.replica);
    put_name(out, &header.pool);
    out.extend_from_slice(&header.sent_at_micros.to_le_bytes());
    let plugins = &header.plugins[..header.plugins.len().min(MAX_PLUGINS)];
    out.push(plugins.len() as u8);
    for name in plugins {
        put_name(out, name);
    }
}

/// A name, cut at [`MAX_NAME_BYTES`] on a character boundary.
fn put_name(out: &mut Vec<u8>, name: &str) {
    let mut end = name.len().min(MAX_NAME_BYTES);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    out.push(end as u8);
    out.extend_from_slice(&name.as_bytes()[..end]);
}

/// Encodes prefix records `(plugin, endpoint, hashes)` into `out` (cleared first), stopping
/// before the record that would pass [`MAX_MESSAGE_BYTES`]. Returns how many were written.
pub fn encode_records<'a>(
    out: &mut Vec<u8>,
    header: &Header,
    records: impl Iterator<Item = (u8, u64, &'a [u64])>,
) -> usize {
    out.clear();
    put_header(out, KIND_RECORDS, header);
    let count_at = out.len();
    out.extend_from_slice(&0u32.to_le_bytes());
    let mut written = 0u32;
    for (plugin, endpoint, hashes) in records {
        let hashes = &hashes[..hashes.len().min(MAX_RECORD_BLOCKS)];
        if out.len() + 13 + hashes.len() * 8 > MAX_MESSAGE_BYTES {
            break;
        }
        out.push(plugin);
        out.extend_from_slice(&endpoint.to_le_bytes());
        out.extend_from_slice(&(hashes.len() as u32).to_le_bytes());
        for hash in hashes {
            out.extend_from_slice(&hash.to_le_bytes());
        }
        written += 1;
    }
    out[count_at..count_at + 4].copy_from_slice(&written.to_le_bytes());
    written as usize
}

/// Encodes in-flight counts into `out` (cleared first); counts past what fits in
/// [`MAX_MESSAGE_BYTES`] are left out.
pub fn encode_in_flight(out: &mut Vec<u8>, header: &Header, counts: &[Count]) {
    out.clear();
    put_header(out, KIND_IN_FLIGHT, header);
    let room = MAX_MESSAGE_BYTES.saturating_sub(out.len() + 4) / 25;
    let counts = &counts[..counts.len().min(room)];
    out.extend_from_slice(&(counts.len() as u32).to_le_bytes());
    for count in counts {
        out.push(count.plugin);
        out.extend_from_slice(&count.endpoint.to_le_bytes());
        out.extend_from_slice(&count.requests.to_le_bytes());
        out.extend_from_slice(&count.tokens.to_le_bytes());
    }
}

/// Reads a message.
pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(WireError::Length(MAX_MESSAGE_BYTES));
    }
    let mut reader = Reader { bytes, at: 0 };
    if reader.take(4)? != MAGIC {
        return Err(WireError::Magic);
    }
    let version = reader.u8()?;
    if version != FORMAT_VERSION {
        return Err(WireError::Version(version));
    }
    let kind = reader.u8()?;
    if kind != KIND_RECORDS && kind != KIND_IN_FLIGHT {
        return Err(WireError::Kind(kind));
    }
    let replica = reader.name()?;
    let pool = reader.name()?;
    let sent_at_micros = reader.u64()?;
    let plugin_count = usize::from(reader.u8()?);
    if plugin_count > MAX_PLUGINS {
        return Err(WireError::Range("plugin count"));
    }
    let mut plugins = Vec::with_capacity(plugin_count);
    for _ in 0..plugin_count {
        plugins.push(reader.name()?);
    }
    let header = Header { replica, pool, sent_at_micros, plugins };
    let count = reader.u32()? as usize;
    let plugin = |reader: &mut Reader<'_>| -> Result<u8, WireError> {
        let plugin = reader.u8()?;
        if usize::from(plugin) >= plugin_count {
            return Err(WireError::Range("plugin index"));
        }
        Ok(plugin)
    };
    let message = if kind == KIND_RECORDS {
        // Each record takes at least 13 bytes: refuse a count the message cannot hold.
        if count > reader.left() / 13 {
            return Err(WireError::Range("record count"));
        }
        let mut records = Vec::with_capacity(count);
        for _ in 0..count {
            let plugin = plugin(&mut reader)?;
            let endpoint = reader.u64()?;
            let blocks = reader.u32()? as usize;
            if blocks > MAX_RECORD_BLOCKS || blocks > reader.left() / 8 {
                return Err(WireError::Range("record blocks"));
            }
            let mut hashes = Vec::with_capacity(blocks);
            for _ in 0..blocks {
                hashes.push(reader.u64()?);
            }
            records.push(Record { plugin, endpoint, hashes });
        }
        Message::Records(header, records)
    } else {
        if count > reader.left() / 25 {
            return Err(WireError::Range("count entries"));
        }
        let mut counts = Vec::with_capacity(count);
        for _ in 0..count {
            let plugin = plugin(&mut reader)?;
            counts.push(Count {
                plugin,
                endpoint: reader.u64()?,
                requests: reader.u64()?,
                tokens: reader.u64()?,
            });
        }
        Message::InFlight(header, counts)
    };
    if reader.left() != 0 {
        return Err(WireError::Length(reader.at));
    }
    Ok(message)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let slice = self.bytes.get(self.at..self.at + n).ok_or(WireError::Length(self.at))?;
        self.at += n;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        let mut raw = [0; 4];
        raw.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(raw))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        let mut raw = [0; 8];
        raw.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(raw))
    }

    fn name(&mut self) -> Result<String, WireError> {
        let len = usize::from(self.u8()?);
        let raw = self.take(len)?;
        std::str::from_utf8(raw).map(str::to_owned).map_err(|_| WireError::Utf8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            replica: "a".into(),
            pool: "pool".into(),
            sent_at_micros: 42,
            plugins: vec!["prefix".into(), "other".into()],
        }
    }

    #[test]
    fn records_round_trip() {
        let mut out = Vec::new();
        let records: [(u8, u64, &[u64]); 2] = [(0, 7, &[1, 2, 3]), (1, 9, &[])];
        assert_eq!(encode_records(&mut out, &header(), records.into_iter()), 2);
        let Message::Records(read, records) = decode(&out).unwrap() else { panic!("kind") };
        assert_eq!(read, header());
        assert_eq!(
            records,
            [
                Record { plugin: 0, endpoint: 7, hashes: vec![1, 2, 3] },
                Record { plugin: 1, endpoint: 9, hashes: vec![] }
            ]
        );
    }

    #[test]
    fn in_flight_round_trips() {
        let mut out = Vec::new();
        let counts = [Count { plugin: 1, endpoint: 3, requests: 4, tokens: 5 }];
        encode_in_flight(&mut out, &header(), &counts);
        assert_eq!(decode(&out).unwrap(), Message::InFlight(header(), counts.to_vec()));
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let mut out = Vec::new();
        let records: [(u8, u64, &[u64]); 1] = [(0, 7, &[1, 2, 3])];
        encode_records(&mut out, &header(), records.into_iter());
        for end in 0..out.len() {
            assert!(decode(&out[..end]).is_err(), "prefix of {end} bytes accepted");
        }
        let mut longer = out.clone();
        longer.push(0);
        assert!(matches!(decode(&longer), Err(WireError::Length(_))));
        let mut version = out.clone();
        version[4] = 9;
        assert_eq!(decode(&version), Err(WireError::Version(9)));
        assert_eq!(decode(b"hello world"), Err(WireError::Magic));
        // A count claiming more records than the bytes could hold is refused before allocating.
        let mut huge = out.clone();
        let count_at = out.len() - (13 + 24) - 4;
        huge[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&huge), Err(WireError::Range("record count")));
        // A plugin index past the table.
        let mut plugin = out;
        plugin[count_at + 4] = 5;
        assert_eq!(decode(&plugin), Err(WireError::Range("plugin index")));
    }

    #[test]
    fn long_records_are_cut_and_batches_capped() {
        let mut out = Vec::new();
        let long: Vec<u64> = (0..(MAX_RECORD_BLOCKS as u64 + 10)).collect();
        let many = std::iter::repeat_n((0u8, 1u64, long.as_slice()), 64);
        let written = encode_records(&mut out, &header(), many);
        assert!(out.len() <= MAX_MESSAGE_BYTES);
        assert_eq!(written, MAX_MESSAGE_BYTES / (MAX_RECORD_BLOCKS * 8 + 13));
        let Message::Records(_, records) = decode(&out).unwrap() else { panic!("kind") };
        assert!(records.iter().all(|record| record.hashes.len() == MAX_RECORD_BLOCKS));
    }
}
