//! A minimal MessagePack reader over a byte slice, and the writer the test publisher uses.
//!
//! The reader decodes straight from the payload without building a value tree: strings and
//! byte strings are borrowed, lengths are checked against the bytes left before anything is
//! reserved, and nesting is bounded, so no input can make it allocate without bound, recurse
//! without bound, or panic. Only the subset of the format that vLLM's msgspec encoder emits is
//! interpreted; anything else is skipped or reported as the wrong type.

use crate::DecodeError;

/// Deepest nesting [`Reader::skip`] follows before giving up.
const MAX_SKIP_DEPTH: usize = 32;

/// What a marker byte announces, named for error messages.
pub(crate) fn kind_name(marker: u8) -> &'static str {
    match marker {
        0x00..=0x7f | 0xe0..=0xff | 0xcc..=0xd3 => "integer",
        0x80..=0x8f | 0xde | 0xdf => "map",
        0x90..=0x9f | 0xdc | 0xdd => "array",
        0xa0..=0xbf | 0xd9..=0xdb => "string",
        0xc0 => "nil",
        0xc2 | 0xc3 => "boolean",
        0xc4..=0xc6 => "bytes",
        0xca | 0xcb => "float",
        0xc7..=0xc9 | 0xd4..=0xd8 => "extension",
        0xc1 => "reserved marker",
    }
}

/// An integer as encoded: msgpack keeps the sign apart from the magnitude.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Int {
    Unsigned(u64),
    Signed(i64),
}

impl Int {
    /// The two's-complement bit pattern (what Go's `uint64(int64)` gives).
    pub(crate) fn bits(self) -> u64 {
        match self {
            Int::Unsigned(u) => u,
            Int::Signed(i) => i as u64,
        }
    }

    /// The value as `i64`, if it fits.
    pub(crate) fn to_i64(self) -> Option<i64> {
        match self {
            Int::Unsigned(u) => i64::try_from(u).ok(),
            Int::Signed(i) => Some(i),
        }
    }
}

/// A cursor over one msgpack document.
#[derive(Debug, Clone)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn eof(&self) -> DecodeError {
        DecodeError::UnexpectedEof { offset: self.pos }
    }

    pub(crate) fn peek(&self) -> Result<u8, DecodeError> {
        self.buf.get(self.pos).copied().ok_or_else(|| self.eof())
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        let b = self.peek()?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(self.eof());
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn wrong(&self, field: &'static str, expected: &'static str, marker: u8) -> DecodeError {
        DecodeError::WrongType { field, expected, found: kind_name(marker), offset: self.pos }
    }

    /// Consumes a nil if one is next.
    pub(crate) fn nil(&mut self) -> Result<bool, DecodeError> {
        if self.peek()? == 0xc0 {
            self.pos += 1;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    pub(crate) fn int(&mut self, field: &'static str) -> Result<Int, DecodeError> {
        let m = self.peek()?;
        let v = match m {
            0x00..=0x7f => Int::Unsigned(u64::from(m)),
            0xe0..=0xff => Int::Signed(i64::from(m as i8)),
            0xcc..=0xd3 => {
                self.pos += 1;
                return Ok(match m {
                    0xcc => Int::Unsigned(u64::from(self.byte()?)),
                    0xcd => Int::Unsigned(u64::from(u16::from_be_bytes(self.be()?))),
                    0xce => Int::Unsigned(u64::from(u32::from_be_bytes(self.be()?))),
                    0xcf => Int::Unsigned(u64::from_be_bytes(self.be()?)),
                    0xd0 => Int::Signed(i64::from(self.byte()? as i8)),
                    0xd1 => Int::Signed(i64::from(i16::from_be_bytes(self.be()?))),
                    0xd2 => Int::Signed(i64::from(i32::from_be_bytes(self.be()?))),
                    _ => Int::Signed(i64::from_be_bytes(self.be()?)),
                });
            }
            _ => return Err(self.wrong(field, "integer", m)),
        };
        self.pos += 1;
        Ok(v)
    }

    /// A float, also accepting an integer (msgspec writes whole floats as floats, but other
    /// encoders may not).
    pub(crate) fn float(&mut self, field: &'static str) -> Result<f64, DecodeError> {
        match self.peek()? {
            0xca => {
                self.pos += 1;
                Ok(f64::from(f32::from_be_bytes(self.be()?)))
            }
            0xcb => {
                self.pos += 1;
                Ok(f64::from_be_bytes(self.be()?))
            }
            _ => Ok(match self.int(field)? {
                Int::Unsigned(u) => u as f64,
                Int::Signed(i) => i as f64,
            }),
        }
    }

    /// A string's bytes (not checked for UTF-8 here).
    pub(crate) fn str_bytes(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let m = self.peek()?;
        let len = match m {
            0xa0..=0xbf => {
                self.pos += 1;
                usize::from(m & 0x1f)
            }
            0xd9 => {
                self.pos += 1;
                usize::from(self.byte()?)
            }
            0xda => {
                self.pos += 1;
                usize::from(u16::from_be_bytes(self.be()?))
            }
            0xdb => {
                self.pos += 1;
                u32::from_be_bytes(self.be()?) as usize
            }
            _ => return Err(self.wrong(field, "string", m)),
        };
        self.take(len)
    }

    pub(crate) fn str(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        let at = self.pos;
        let bytes = self.str_bytes(field)?;
        std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8 { field, offset: at })
    }

    /// A byte string (`bin 8/16/32`).
    pub(crate) fn bin(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let m = self.peek()?;
        let len = match m {
            0xc4 => {
                self.pos += 1;
                usize::from(self.byte()?)
            }
            0xc5 => {
                self.pos += 1;
                usize::from(u16::from_be_bytes(self.be()?))
            }
            0xc6 => {
                self.pos += 1;
                u32::from_be_bytes(self.be()?) as usize
            }
            _ => return Err(self.wrong(field, "bytes", m)),
        };
        self.take(len)
    }

    /// An array header. The length is checked against the bytes left (every element takes at
    /// least one), so callers may reserve it.
    pub(crate) fn array_len(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let m = self.peek()?;
        let len = match m {
            0x90..=0x9f => {
                self.pos += 1;
                usize::from(m & 0x0f)
            }
            0xdc => {
                self.pos += 1;
                usize::from(u16::from_be_bytes(self.be()?))
            }
            0xdd => {
                self.pos += 1;
                u32::from_be_bytes(self.be()?) as usize
            }
            _ => return Err(self.wrong(field, "array", m)),
        };
        self.check_len(len, 1)
    }

    /// A map header, checked like [`array_len`](Self::array_len) (two bytes per entry at least).
    pub(crate) fn map_len(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let m = self.peek()?;
        let len = match m {
            0x80..=0x8f => {
                self.pos += 1;
                usize::from(m & 0x0f)
            }
            0xde => {
                self.pos += 1;
                usize::from(u16::from_be_bytes(self.be()?))
            }
            0xdf => {
                self.pos += 1;
                u32::from_be_bytes(self.be()?) as usize
            }
            _ => return Err(self.wrong(field, "map", m)),
        };
        self.check_len(len, 2)
    }

    fn check_len(&self, len: usize, min_bytes_each: usize) -> Result<usize, DecodeError> {
        if len.saturating_mul(min_bytes_each) > self.remaining() {
            Err(self.eof())
        } else {
            Ok(len)
        }
    }

    /// Skips one value of any type, nested at most [`MAX_SKIP_DEPTH`] deep.
    pub(crate) fn skip(&mut self) -> Result<(), DecodeError> {
        // Values still to skip at each open level; iterative so that depth costs no stack.
        let mut pending: [usize; MAX_SKIP_DEPTH] = [0; MAX_SKIP_DEPTH];
        let mut depth = 0usize;
        pending[0] = 1;
        loop {
            while pending[depth] == 0 {
                if depth == 0 {
                    return Ok(());
                }
                depth -= 1;
            }
            pending[depth] -= 1;
            let m = self.peek()?;
            let children = match m {
                0x80..=0x8f | 0xde | 0xdf => self.map_len("skipped value")? * 2,
                0x90..=0x9f | 0xdc | 0xdd => self.array_len("skipped value")?,
                0xa0..=0xbf | 0xd9..=0xdb => {
                    self.str_bytes("skipped value")?;
                    0
                }
                0xc4..=0xc6 => {
                    self.bin("skipped value")?;
                    0
                }
                0x00..=0x7f | 0xe0..=0xff | 0xcc..=0xd3 => {
                    self.int("skipped value")?;
                    0
                }
                0xc0 | 0xc2 | 0xc3 => {
                    self.pos += 1;
                    0
                }
                0xca | 0xcb => {
                    self.float("skipped value")?;
                    0
                }
                0xd4..=0xd8 => {
                    self.pos += 1;
                    let len = 1usize << (m - 0xd4);
                    self.take(1 + len)?;
                    0
                }
                0xc7..=0xc9 => {
                    self.pos += 1;
                    let len = match m {
                        0xc7 => usize::from(self.byte()?),
                        0xc8 => usize::from(u16::from_be_bytes(self.be()?)),
                        _ => u32::from_be_bytes(self.be()?) as usize,
                    };
                    self.take(1 + len)?;
                    0
                }
                0xc1 => return Err(self.wrong("skipped value", "any value", m)),
            };
            if children > 0 {
                depth += 1;
                if depth == MAX_SKIP_DEPTH {
                    return Err(DecodeError::TooDeep { offset: self.pos });
                }
                pending[depth] = children;
            }
        }
    }
}

/// Appends msgpack values to a buffer: the subset the test publisher and the fixtures need.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    pub(crate) buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn nil(&mut self) {
        self.buf.push(0xc0);
    }

    pub(crate) fn uint(&mut self, v: u64) {
        match v {
            0..=0x7f => self.buf.push(v as u8),
            0x80..=0xff => self.buf.extend_from_slice(&[0xcc, v as u8]),
            0x100..=0xffff => {
                self.buf.push(0xcd);
                self.buf.extend_from_slice(&(v as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                self.buf.push(0xce);
                self.buf.extend_from_slice(&(v as u32).to_be_bytes());
            }
            _ => {
                self.buf.push(0xcf);
                self.buf.extend_from_slice(&v.to_be_bytes());
            }
        }
    }

    pub(crate) fn int(&mut self, v: i64) {
        if v >= 0 {
            self.uint(v as u64);
        } else if v >= -32 {
            self.buf.push(v as i8 as u8);
        } else if v >= i64::from(i8::MIN) {
            self.buf.extend_from_slice(&[0xd0, v as i8 as u8]);
        } else if v >= i64::from(i16::MIN) {
            self.buf.push(0xd1);
            self.buf.extend_from_slice(&(v as i16).to_be_bytes());
        } else if v >= i64::from(i32::MIN) {
            self.buf.push(0xd2);
            self.buf.extend_from_slice(&(v as i32).to_be_bytes());
        } else {
            self.buf.push(0xd3);
            self.buf.extend_from_slice(&v.to_be_bytes());
        }
    }

    pub(crate) fn float(&mut self, v: f64) {
        self.buf.push(0xcb);
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    pub(crate) fn str(&mut self, s: &str) {
        let len = s.len();
        if len < 32 {
            self.buf.push(0xa0 | len as u8);
        } else if len <= 0xff {
            self.buf.extend_from_slice(&[0xd9, len as u8]);
        } else if len <= 0xffff {
            self.buf.push(0xda);
            self.buf.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.buf.push(0xdb);
            self.buf.extend_from_slice(&(len as u32).to_be_bytes());
        }
        self.buf.extend_from_slice(s.as_bytes());
    }

    pub(crate) fn array(&mut self, len: usize) {
        if len < 16 {
            self.buf.push(0x90 | len as u8);
        } else if len <= 0xffff {
            self.buf.push(0xdc);
            self.buf.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.buf.push(0xdd);
            self.buf.extend_from_slice(&(len as u32).to_be_bytes());
        }
    }

    pub(crate) fn map(&mut self, len: usize) {
        if len < 16 {
            self.buf.push(0x80 | len as u8);
        } else if len <= 0xffff {
            self.buf.push(0xde);
            self.buf.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.buf.push(0xdf);
            self.buf.extend_from_slice(&(len as u32).to_be_bytes());
        }
    }
}
