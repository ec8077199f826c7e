//! Decoding fuzz inputs, and replaying a checked-in corpus from an ordinary test.

use std::path::Path;

/// A cursor over the fuzz input; reads past the end yield zeros and empty slices, so every
/// input decodes to something.
pub struct Reader<'a> {
    pub data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&first, rest)) => {
                self.data = rest;
                first
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// A chunk prefixed by its little-endian u16 length (cut short at the end of the input).
    pub fn chunk(&mut self) -> &'a [u8] {
        let len = usize::from(self.u16()).min(self.data.len());
        let (chunk, rest) = self.data.split_at(len);
        self.data = rest;
        chunk
    }
}

pub const PATHS: [Option<&str>; 5] = [
    None,
    Some("/v1/completions"),
    Some("/v1/chat/completions"),
    Some("/v1/models"),
    Some("/v1/chat/completions?stream=true"),
];

/// Runs `body` on every file of `fuzz/corpus/<target>/`, in name order; `fuzz_dir` is the
/// `fuzz/` directory.
pub fn replay(fuzz_dir: &Path, target: &str, body: fn(&[u8])) {
    let dir = fuzz_dir.join("corpus").join(target);
    let mut inputs: Vec<_> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries.filter_map(Result::ok).map(|entry| entry.path()).collect(),
        Err(error) => panic!("{}: {error}", dir.display()),
    };
    inputs.sort();
    assert!(!inputs.is_empty(), "{} has no inputs", dir.display());
    for input in inputs {
        let data = match std::fs::read(&input) {
            Ok(data) => data,
            Err(error) => panic!("{}: {error}", input.display()),
        };
        eprintln!("{target}: {}", input.display());
        body(&data);
    }
}
