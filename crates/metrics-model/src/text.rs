//! Parser for the Prometheus text exposition format (0.0.4) and the OpenMetrics text format.
//!
//! Model servers publish their load as a text page that is scraped every few tens of
//! milliseconds, per endpoint. The parser is therefore built to be cheap and robust rather than
//! general:
//!
//! - **Zero-copy.** Names and label values borrow from the page. A label value or HELP text is
//!   copied (as [`Cow::Owned`]) only when it holds an escape sequence that must be decoded.
//!   Labels are validated while parsing and decoded lazily, so a sample costs no allocation.
//! - **Streaming.** [`Parser`] is an iterator of [`Record`]s; nothing is collected.
//! - **Filtered.** With a [`SampleFilter`], a line whose metric name is not wanted is skipped
//!   after reading its name, without parsing (or validating) its labels and value. A mapping that
//!   reads five gauges out of a page of a thousand lines materialises five samples.
//! - **Total.** No input makes it panic. Errors carry the 1-based line and byte column.
//!
//! Grammar accepted, per line (`\n`-separated, a trailing `\r` ignored):
//!
//! ```text
//! # HELP <family> <text with \\ \n escapes>
//! # TYPE <family> counter|gauge|histogram|gaugehistogram|summary|info|stateset|untyped|unknown
//! # UNIT <family> <unit>                                    (OpenMetrics)
//! # EOF                                                     (OpenMetrics: ends the page)
//! # any other comment
//! <name>[{<label>="<value>",...}] <value> [<timestamp>] [# {<labels>} <value> [<timestamp>]]
//! ```
//!
//! Values accept `NaN`, `+Inf`, `-Inf` and decimal or exponent notation. Label values accept the
//! escapes `\\`, `\"` and `\n`; any other escape is an error, as in the Go reference parser.
//! Histogram and summary series (`_bucket`, `_sum`, `_count`, `_created`, `le`, `quantile`) are
//! ordinary samples here; grouping them is left to callers that need it.
//!
//! Not supported: the quoted UTF-8 metric names of Prometheus 3 (`{"my.metric"}`), and detection
//! of duplicate label names within one sample (it would cost an allocation per sample).

use std::borrow::Cow;
use std::fmt;

/// The type a `# TYPE` line declares for a metric family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetricKind {
    /// A monotonically increasing count.
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// Cumulative buckets (`_bucket{le=..}`), `_sum` and `_count`.
    Histogram,
    /// An OpenMetrics histogram of a gauge (`_gsum`, `_gcount`).
    GaugeHistogram,
    /// Quantiles (`{quantile=..}`), `_sum` and `_count`.
    Summary,
    /// An OpenMetrics info metric: constant 1 with informative labels.
    Info,
    /// An OpenMetrics state set.
    StateSet,
    /// `untyped` (Prometheus) or `unknown` (OpenMetrics).
    Unknown,
}

impl MetricKind {
    /// Parses the keyword of a `# TYPE` line.
    pub fn from_keyword(keyword: &str) -> Option<Self> {
        Some(match keyword {
            "counter" => Self::Counter,
            "gauge" => Self::Gauge,
            "histogram" => Self::Histogram,
            "gaugehistogram" => Self::GaugeHistogram,
            "summary" => Self::Summary,
            "info" => Self::Info,
            "stateset" => Self::StateSet,
            "untyped" | "unknown" => Self::Unknown,
            _ => return None,
        })
    }

    /// The keyword used for this kind in the Prometheus text format.
    pub fn keyword(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
            Self::GaugeHistogram => "gaugehistogram",
            Self::Summary => "summary",
            Self::Info => "info",
            Self::StateSet => "stateset",
            Self::Unknown => "untyped",
        }
    }
}

/// One meaningful line of an exposition page.
#[derive(Clone, Debug, PartialEq)]
pub enum Record<'a> {
    /// `# HELP family text`.
    Help {
        /// The metric family described.
        family: &'a str,
        /// The help text, escapes decoded.
        text: Cow<'a, str>,
    },
    /// `# TYPE family kind`.
    Type {
        /// The metric family typed.
        family: &'a str,
        /// Its declared kind.
        kind: MetricKind,
    },
    /// `# UNIT family unit` (OpenMetrics).
    Unit {
        /// The metric family.
        family: &'a str,
        /// Its unit, as written.
        unit: &'a str,
    },
    /// A sample line.
    Sample(Sample<'a>),
    /// `# EOF`: the explicit end of an OpenMetrics page. Nothing after it is read.
    Eof,
}

/// One sample: a series (name and labels) and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample<'a> {
    /// The sample's metric name, including any `_bucket`/`_sum`/`_count`/`_total` suffix.
    pub name: &'a str,
    /// Its labels, validated, decoded on access.
    pub labels: Labels<'a>,
    /// Its value.
    pub value: f64,
    /// Its timestamp as written: milliseconds since the epoch in Prometheus text 0.0.4,
    /// seconds in OpenMetrics.
    pub timestamp: Option<f64>,
    /// An OpenMetrics exemplar that followed the value.
    pub exemplar: Option<Exemplar<'a>>,
}

/// An OpenMetrics exemplar (`# {trace_id="..."} 0.67 1600000000.1`).
#[derive(Clone, Debug, PartialEq)]
pub struct Exemplar<'a> {
    /// The exemplar's labels.
    pub labels: Labels<'a>,
    /// The exemplar's value.
    pub value: f64,
    /// The exemplar's timestamp, as written.
    pub timestamp: Option<f64>,
}

/// The labels of a sample: the validated text between the braces, decoded on access.
///
/// Keeping the raw text instead of a `Vec` of pairs is what makes a sample allocation-free;
/// lookups scan it, which for the handful of labels a series has is as fast as a map.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Labels<'a> {
    raw: &'a str,
}

/// One label of a sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label<'a> {
    /// The label name.
    pub name: &'a str,
    /// The label value, borrowed unless it held escapes.
    pub value: Cow<'a, str>,
}

impl<'a> Labels<'a> {
    /// The labels in the order written.
    pub fn iter(&self) -> LabelIter<'a> {
        LabelIter { rest: self.raw }
    }

    /// The value of the label `name`, if present.
    pub fn get(&self, name: &str) -> Option<Cow<'a, str>> {
        self.iter().find(|label| label.name == name).map(|label| label.value)
    }

    /// Whether the sample has no labels.
    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }

    /// How many labels the sample has.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// The raw text between the braces, escapes not decoded.
    pub fn as_raw(&self) -> &'a str {
        self.raw
    }
}

impl fmt::Debug for Labels<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter().map(|label| (label.name, label.value))).finish()
    }
}

impl<'a> IntoIterator for Labels<'a> {
    type Item = Label<'a>;
    type IntoIter = LabelIter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Iterator over the [`Label`]s of a sample.
#[derive(Clone, Debug)]
pub struct LabelIter<'a> {
    rest: &'a str,
}

impl<'a> Iterator for LabelIter<'a> {
    type Item = Label<'a>;

    fn next(&mut self) -> Option<Label<'a>> {
        // The text was validated by the parser, so this walk only has to find boundaries; on
        // anything unexpected it stops instead of panicking.
        let text = self.rest.trim_start_matches([' ', '\t', ',']);
        let equals = text.find('=')?;
        let name = text[..equals].trim_end_matches([' ', '\t']);
        let after_equals = text[equals + 1..].trim_start_matches([' ', '\t']);
        let quoted = after_equals.strip_prefix('"')?;
        let bytes = quoted.as_bytes();
        let mut index = 0;
        let mut escaped = false;
        while index < bytes.len() {
            match bytes[index] {
                b'\\' => {
                    escaped = true;
                    index += 2;
                    continue;
                }
                b'"' => break,
                _ => index += 1,
            }
        }
        let raw_value = quoted.get(..index)?;
        self.rest = quoted.get(index + 1..).unwrap_or("");
        let value = if escaped {
            Cow::Owned(unescape_label_value(raw_value))
        } else {
            Cow::Borrowed(raw_value)
        };
        Some(Label { name, value })
    }
}

fn unescape_label_value(raw: &str) -> String {
    let mut decoded = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            decoded.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => decoded.push('\n'),
            Some(other) => decoded.push(other),
            None => decoded.push('\\'),
        }
    }
    decoded
}

/// What went wrong on a line, without the position.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseErrorKind {
    /// A sample line does not start with a valid metric name.
    #[error("expected a metric name")]
    InvalidMetricName,
    /// A label name is missing or has an invalid character.
    #[error("expected a label name")]
    InvalidLabelName,
    /// A specific character was required.
    #[error("expected {expected}")]
    Expected {
        /// What was required, for example `'='`.
        expected: &'static str,
    },
    /// A label value ran to the end of the line.
    #[error("unterminated label value")]
    UnterminatedLabelValue,
    /// A backslash escape other than `\\`, `\"` or `\n`.
    #[error("invalid escape sequence '\\{0}'")]
    InvalidEscape(char),
    /// The sample has no value.
    #[error("missing sample value")]
    MissingValue,
    /// The value is not a number.
    #[error("invalid sample value {0:?}")]
    InvalidValue(String),
    /// The timestamp is not a finite number.
    #[error("invalid timestamp {0:?}")]
    InvalidTimestamp(String),
    /// Text follows the timestamp that is not an exemplar.
    #[error("unexpected text after the sample")]
    TrailingText,
    /// A HELP/TYPE/UNIT line lacks a valid family name.
    #[error("expected a metric family name")]
    InvalidFamilyName,
    /// A TYPE line names an unknown type.
    #[error("unknown metric type {0:?}")]
    UnknownMetricType(String),
    /// A line that had to be read is not UTF-8 text.
    #[error("invalid UTF-8")]
    NotUtf8,
}

/// A parse error, with where it happened.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {kind}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// 1-based byte column within the line.
    pub column: usize,
    /// What went wrong.
    pub kind: ParseErrorKind,
}

/// Decides which samples and metric families a [`Parser`] materialises.
///
/// Lines that are not wanted are skipped after their name is read, unvalidated.
pub trait SampleFilter {
    /// Whether to materialise samples named `sample_name`.
    fn accepts_sample(&self, sample_name: &str) -> bool;

    /// Whether to materialise HELP/TYPE/UNIT lines of `family`.
    fn accepts_family(&self, family: &str) -> bool {
        self.accepts_sample(family)
    }
}

impl<T: SampleFilter + ?Sized> SampleFilter for &T {
    fn accepts_sample(&self, sample_name: &str) -> bool {
        (**self).accepts_sample(sample_name)
    }

    fn accepts_family(&self, family: &str) -> bool {
        (**self).accepts_family(family)
    }
}

/// A filter that accepts everything: the default of [`Parser`].
#[derive(Clone, Copy, Debug, Default)]
pub struct AcceptAll;

impl SampleFilter for AcceptAll {
    #[inline]
    fn accepts_sample(&self, _: &str) -> bool {
        true
    }
}

/// Accepts a fixed set of names, either exactly or as whole metric families.
///
/// Lookup is a linear scan: mappings ask for a handful of names, where a scan beats hashing.
#[derive(Clone, Debug, Default)]
pub struct NameFilter {
    /// Every sample name accepted (with family suffixes expanded), sorted by length then
    /// text, so a rejection (most lines of a page) usually costs one length comparison.
    accepted: Vec<Box<str>>,
    /// Every family whose HELP/TYPE/UNIT lines are accepted, sorted the same way.
    accepted_families: Vec<Box<str>>,
}

/// Sample-name suffixes that belong to a family of the stripped name.
const FAMILY_SUFFIXES: [&str; 8] =
    ["_bucket", "_count", "_sum", "_created", "_total", "_info", "_gcount", "_gsum"];

impl NameFilter {
    /// Accepts samples whose name is exactly one of `names`.
    pub fn exact<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> Self {
        Self::with_names(names.into_iter().map(|n| n.as_ref().into()).collect(), false)
    }

    /// Accepts every sample of the families `families`: `x`, `x_bucket`, `x_sum`, `x_count`,
    /// `x_created`, `x_total`, `x_info`, `x_gsum`, `x_gcount`.
    pub fn families<S: AsRef<str>>(families: impl IntoIterator<Item = S>) -> Self {
        Self::with_names(families.into_iter().map(|n| n.as_ref().into()).collect(), true)
    }

    fn with_names(names: Vec<Box<str>>, whole_families: bool) -> Self {
        let mut accepted = names.clone();
        if whole_families {
            for name in &names {
                accepted
                    .extend(FAMILY_SUFFIXES.iter().map(|suffix| format!("{name}{suffix}").into()));
            }
        }
        let mut accepted_families = names.clone();
        if !whole_families {
            // An exact name `x_total` belongs to the family `x` in OpenMetrics pages.
            for name in &names {
                accepted_families.extend(
                    FAMILY_SUFFIXES
                        .iter()
                        .filter_map(|suffix| name.strip_suffix(suffix))
                        .map(Into::into),
                );
            }
        }
        Self {
            accepted: sorted_for_lookup(accepted),
            accepted_families: sorted_for_lookup(accepted_families),
        }
    }
}

fn sorted_for_lookup(mut names: Vec<Box<str>>) -> Vec<Box<str>> {
    names.sort_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
    names.dedup();
    names
}

/// Whether `name` is in `sorted` (as [`sorted_for_lookup`] orders it).
fn contains_sorted(sorted: &[Box<str>], name: &str) -> bool {
    let first = sorted.partition_point(|candidate| candidate.len() < name.len());
    sorted[first..]
        .iter()
        .take_while(|candidate| candidate.len() == name.len())
        .any(|candidate| **candidate == *name)
}

impl SampleFilter for NameFilter {
    fn accepts_sample(&self, sample_name: &str) -> bool {
        contains_sorted(&self.accepted, sample_name)
    }

    fn accepts_family(&self, family: &str) -> bool {
        contains_sorted(&self.accepted_families, family)
    }
}

/// Streaming parser over an exposition page: an iterator of [`Record`]s.
///
/// After an error the parser moves on to the next line, so a caller may skip bad lines; most
/// callers stop at the first error.
#[derive(Clone, Debug)]
pub struct Parser<'a, F = AcceptAll> {
    rest: &'a [u8],
    line_number: usize,
    filter: F,
    /// The family of the last HELP/TYPE/UNIT line, when the filter rejected it: the sample
    /// lines that follow it (a family's samples are grouped after its metadata) are skipped
    /// with one prefix comparison instead of being read name character by character.
    rejected_family: Option<&'a [u8]>,
    /// The last sample name skipped in that family (`x_bucket` repeats for every bucket).
    rejected_name: Option<&'a [u8]>,
}

impl<'a> Parser<'a> {
    /// A parser over `text` that materialises every line.
    pub fn new(text: &'a str) -> Self {
        Self::from_bytes(text.as_bytes())
    }

    /// A parser over a page as received. Only the lines that are materialised need to be
    /// UTF-8 (one that is not is an error, [`ParseErrorKind::NotUtf8`]); skipped lines are
    /// never decoded, so a scrape does not validate the whole page.
    pub fn from_bytes(page: &'a [u8]) -> Self {
        Self {
            rest: page,
            line_number: 0,
            filter: AcceptAll,
            rejected_family: None,
            rejected_name: None,
        }
    }
}

impl<'a, F: SampleFilter> Parser<'a, F> {
    /// The same parser, materialising only what `filter` accepts.
    pub fn with_filter<G: SampleFilter>(self, filter: G) -> Parser<'a, G> {
        Parser {
            rest: self.rest,
            line_number: self.line_number,
            filter,
            rejected_family: self.rejected_family,
            rejected_name: self.rejected_name,
        }
    }

    /// Only the samples, HELP/TYPE/UNIT lines dropped.
    pub fn samples(self) -> impl Iterator<Item = Result<Sample<'a>, ParseError>> {
        self.filter_map(|record| match record {
            Ok(Record::Sample(sample)) => Some(Ok(sample)),
            Ok(_) => None,
            Err(error) => Some(Err(error)),
        })
    }

    fn next_line(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        self.line_number += 1;
        let line = match memchr::memchr(b'\n', self.rest) {
            Some(end) => {
                let (line, rest) = self.rest.split_at(end);
                self.rest = rest.get(1..).unwrap_or_default();
                line
            }
            None => std::mem::take(&mut self.rest),
        };
        Some(line.strip_suffix(b"\r").unwrap_or(line))
    }

    /// Whether `line` (from its first non-blank byte) is a sample of the rejected family
    /// that the filter does not want either. Anything unusual returns false and is parsed.
    fn in_rejected_family(&mut self, line: &'a [u8]) -> bool {
        let Some(family) = self.rejected_family else { return false };
        if let Some(name) = self.rejected_name
            && line.starts_with(name)
            && !line.get(name.len()).copied().is_some_and(is_name_byte)
        {
            return true;
        }
        let Some(after) = line.strip_prefix(family) else { return false };
        let suffix = after.iter().take_while(|&&b| is_name_byte(b)).count();
        if suffix > LONGEST_FAMILY_SUFFIX {
            return false;
        }
        let name = &line[..family.len() + suffix];
        let rejected =
            std::str::from_utf8(name).is_ok_and(|name| !self.filter.accepts_sample(name));
        if rejected {
            self.rejected_name = Some(name);
        }
        rejected
    }

    /// The family of a HELP/TYPE/UNIT line (from its `#`), read from the raw bytes; `None`
    /// for any other comment or a line that is not plainly well formed, which is then parsed
    /// in full.
    fn comment_family(line: &'a [u8]) -> Option<&'a [u8]> {
        let blank = |b: &u8| *b == b' ' || *b == b'\t';
        let rest = line.strip_prefix(b"#")?;
        let rest = &rest[rest.iter().take_while(|b| blank(b)).count()..];
        let keyword = rest.get(..4)?;
        if !matches!(keyword, b"HELP" | b"TYPE" | b"UNIT") {
            return None;
        }
        let rest = &rest[4..];
        let blanks = rest.iter().take_while(|b| blank(b)).count();
        if blanks == 0 {
            return None;
        }
        let rest = &rest[blanks..];
        let length = rest.iter().take_while(|&&b| is_name_byte(b)).count();
        let family = &rest[..length];
        let starts_well = family.first().is_some_and(|b| !b.is_ascii_digit());
        let ends_well = rest.get(length).is_none_or(blank);
        (starts_well && ends_well).then_some(family)
    }
}

/// `[a-zA-Z0-9_:]`.
fn is_name_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_' || byte == b':'
}

/// The longest of [`FAMILY_SUFFIXES`].
const LONGEST_FAMILY_SUFFIX: usize = 8;

impl<'a, F: SampleFilter> Iterator for Parser<'a, F> {
    type Item = Result<Record<'a>, ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        while let Some(raw) = self.next_line() {
            let start = raw.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
            let first = raw.get(start).copied();
            if first == Some(b'#') {
                // A rejected family's metadata (HELP text is most of a page's comment bytes)
                // is skipped undecoded; its family name starts the skipping of its samples.
                if let Some(family) = Self::comment_family(&raw[start..])
                    && let Ok(name) = std::str::from_utf8(family)
                    && !self.filter.accepts_family(name)
                {
                    self.rejected_family = Some(family);
                    self.rejected_name = None;
                    continue;
                }
            } else if first.is_some() && self.in_rejected_family(&raw[start..]) {
                continue;
            }
            let line = match std::str::from_utf8(raw) {
                Ok(line) => line,
                Err(error) => {
                    return Some(Err(ParseError {
                        line: self.line_number,
                        column: error.valid_up_to() + 1,
                        kind: ParseErrorKind::NotUtf8,
                    }));
                }
            };
            let mut cursor = Cursor { line, pos: start };
            let parsed = match first {
                None => continue,
                Some(b'#') => parse_comment(&mut cursor, &self.filter, &mut self.rejected_family),
                Some(_) => parse_sample_line(&mut cursor, &self.filter),
            };
            match parsed {
                Ok(Some(Record::Eof)) => {
                    self.rest = b"";
                    return Some(Ok(Record::Eof));
                }
                Ok(Some(record)) => return Some(Ok(record)),
                Ok(None) => continue,
                Err(kind) => {
                    return Some(Err(ParseError {
                        line: self.line_number,
                        column: cursor.pos + 1,
                        kind,
                    }));
                }
            }
        }
        None
    }
}

/// Parses a whole page, materialising everything.
pub fn parse(text: &str) -> Parser<'_> {
    Parser::new(text)
}

/// A position within one line. All delimiters are ASCII, so every position the cursor stops
/// at is a char boundary and slicing cannot panic.
struct Cursor<'a> {
    line: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.line.as_bytes().get(self.pos).copied()
    }

    #[inline]
    fn at_end(&self) -> bool {
        self.pos >= self.line.len()
    }

    #[inline]
    fn skip_blanks(&mut self) -> usize {
        let start = self.pos;
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn expect(&mut self, byte: u8, expected: &'static str) -> Result<(), ParseErrorKind> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(ParseErrorKind::Expected { expected })
        }
    }

    /// Reads `[a-zA-Z_:][a-zA-Z0-9_:]*` (or without `:` for label names).
    fn name(&mut self, allow_colon: bool) -> Option<&'a str> {
        let bytes = self.line.as_bytes();
        let start = self.pos;
        let is_start = |b: u8| b.is_ascii_alphabetic() || b == b'_' || (allow_colon && b == b':');
        if !bytes.get(start).copied().is_some_and(is_start) {
            return None;
        }
        let mut end = start + 1;
        while bytes.get(end).copied().is_some_and(|b| is_start(b) || b.is_ascii_digit()) {
            end += 1;
        }
        self.pos = end;
        self.line.get(start..end)
    }

    /// Reads up to the next blank or the end of the line.
    fn token(&mut self) -> &'a str {
        let start = self.pos;
        while !matches!(self.peek(), None | Some(b' ' | b'\t')) {
            self.pos += 1;
        }
        self.line.get(start..self.pos).unwrap_or("")
    }

    fn rest(&self) -> &'a str {
        self.line.get(self.pos..).unwrap_or("")
    }
}

/// Parses a `#` line; a HELP/TYPE/UNIT line also sets `rejected_family` to its family when
/// the filter rejects it, and clears it otherwise.
fn parse_comment<'a>(
    cursor: &mut Cursor<'a>,
    filter: &impl SampleFilter,
    rejected_family: &mut Option<&'a [u8]>,
) -> Result<Option<Record<'a>>, ParseErrorKind> {
    cursor.pos += 1; // the '#'
    if cursor.skip_blanks() == 0 {
        return Ok(None);
    }
    let keyword = cursor.token();
    if keyword == "EOF" {
        cursor.skip_blanks();
        return Ok(if cursor.at_end() { Some(Record::Eof) } else { None });
    }
    if !matches!(keyword, "HELP" | "TYPE" | "UNIT") {
        return Ok(None);
    }
    cursor.skip_blanks();
    let family = cursor.name(true).ok_or(ParseErrorKind::InvalidFamilyName)?;
    if !matches!(cursor.peek(), None | Some(b' ' | b'\t')) {
        return Err(ParseErrorKind::InvalidFamilyName);
    }
    if !filter.accepts_family(family) {
        *rejected_family = Some(family.as_bytes());
        return Ok(None);
    }
    *rejected_family = None;
    cursor.skip_blanks();
    let record = match keyword {
        "HELP" => Record::Help { family, text: unescape_help(cursor.rest().trim_end()) },
        "TYPE" => {
            let word = cursor.token();
            let kind = MetricKind::from_keyword(word)
                .ok_or_else(|| ParseErrorKind::UnknownMetricType(truncated(word)))?;
            cursor.skip_blanks();
            if !cursor.at_end() {
                return Err(ParseErrorKind::TrailingText);
            }
            Record::Type { family, kind }
        }
        _ => Record::Unit { family, unit: cursor.rest().trim_end() },
    };
    Ok(Some(record))
}

fn unescape_help(text: &str) -> Cow<'_, str> {
    if !text.contains('\\') {
        return Cow::Borrowed(text);
    }
    let mut decoded = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            decoded.push(c);
            continue;
        }
        // HELP text is informational: unknown escapes are kept verbatim rather than rejected.
        match chars.next() {
            Some('n') => decoded.push('\n'),
            Some('\\') => decoded.push('\\'),
            Some('"') => decoded.push('"'),
            Some(other) => {
                decoded.push('\\');
                decoded.push(other);
            }
            None => decoded.push('\\'),
        }
    }
    Cow::Owned(decoded)
}

fn parse_sample_line<'a>(
    cursor: &mut Cursor<'a>,
    filter: &impl SampleFilter,
) -> Result<Option<Record<'a>>, ParseErrorKind> {
    let name = cursor.name(true).ok_or(ParseErrorKind::InvalidMetricName)?;
    if !filter.accepts_sample(name) {
        return Ok(None);
    }
    let after_name = cursor.pos;
    cursor.skip_blanks();
    let labels = if cursor.peek() == Some(b'{') {
        parse_labels(cursor)?
    } else {
        // The blanks belong to the value separator.
        cursor.pos = after_name;
        Labels::default()
    };
    let (value, timestamp) = parse_value_and_timestamp(cursor)?;
    let exemplar = if cursor.peek() == Some(b'#') { Some(parse_exemplar(cursor)?) } else { None };
    Ok(Some(Record::Sample(Sample { name, labels, value, timestamp, exemplar })))
}

/// Parses `{...}` starting at the `{`, validating every label.
fn parse_labels<'a>(cursor: &mut Cursor<'a>) -> Result<Labels<'a>, ParseErrorKind> {
    cursor.pos += 1; // the '{'
    let start = cursor.pos;
    loop {
        cursor.skip_blanks();
        if cursor.peek() == Some(b'}') {
            break;
        }
        cursor.name(false).ok_or(ParseErrorKind::InvalidLabelName)?;
        cursor.skip_blanks();
        cursor.expect(b'=', "'='")?;
        cursor.skip_blanks();
        cursor.expect(b'"', "'\"'")?;
        skip_label_value(cursor)?;
        cursor.skip_blanks();
        match cursor.peek() {
            Some(b',') => cursor.pos += 1,
            Some(b'}') => break,
            _ => return Err(ParseErrorKind::Expected { expected: "',' or '}'" }),
        }
    }
    let raw = cursor.line.get(start..cursor.pos).unwrap_or("");
    cursor.pos += 1; // the '}'
    Ok(Labels { raw })
}

/// Moves past a quoted label value whose opening quote was consumed, checking its escapes.
fn skip_label_value(cursor: &mut Cursor<'_>) -> Result<(), ParseErrorKind> {
    let bytes = cursor.line.as_bytes();
    loop {
        // Jump straight to the next quote or backslash: most values have neither.
        let remaining = bytes.get(cursor.pos..).unwrap_or(&[]);
        match remaining.iter().position(|&b| b == b'"' || b == b'\\') {
            None => {
                cursor.pos = bytes.len();
                return Err(ParseErrorKind::UnterminatedLabelValue);
            }
            Some(offset) => {
                cursor.pos += offset;
                if bytes[cursor.pos] == b'"' {
                    cursor.pos += 1;
                    return Ok(());
                }
                match bytes.get(cursor.pos + 1) {
                    Some(b'\\' | b'"' | b'n') => cursor.pos += 2,
                    Some(_) => {
                        let escaped =
                            cursor.line.get(cursor.pos + 1..).and_then(|s| s.chars().next());
                        return Err(ParseErrorKind::InvalidEscape(escaped.unwrap_or('?')));
                    }
                    None => {
                        cursor.pos = bytes.len();
                        return Err(ParseErrorKind::UnterminatedLabelValue);
                    }
                }
            }
        }
    }
}

/// Parses ` <value> [<timestamp>]` and stops at the end of the line or at an exemplar's `#`.
fn parse_value_and_timestamp(
    cursor: &mut Cursor<'_>,
) -> Result<(f64, Option<f64>), ParseErrorKind> {
    let had_blank = cursor.skip_blanks() > 0;
    if cursor.at_end() {
        return Err(ParseErrorKind::MissingValue);
    }
    if !had_blank {
        return Err(ParseErrorKind::Expected { expected: "a blank before the value" });
    }
    let value_start = cursor.pos;
    let value_text = cursor.token();
    let value = parse_float(value_text).ok_or_else(|| {
        cursor.pos = value_start;
        ParseErrorKind::InvalidValue(truncated(value_text))
    })?;
    cursor.skip_blanks();
    if cursor.at_end() || cursor.peek() == Some(b'#') {
        return Ok((value, None));
    }
    let timestamp_start = cursor.pos;
    let timestamp_text = cursor.token();
    let timestamp = parse_float(timestamp_text).filter(|t| t.is_finite()).ok_or_else(|| {
        cursor.pos = timestamp_start;
        ParseErrorKind::InvalidTimestamp(truncated(timestamp_text))
    })?;
    cursor.skip_blanks();
    if !cursor.at_end() && cursor.peek() != Some(b'#') {
        return Err(ParseErrorKind::TrailingText);
    }
    Ok((value, Some(timestamp)))
}

fn parse_exemplar<'a>(cursor: &mut Cursor<'a>) -> Result<Exemplar<'a>, ParseErrorKind> {
    cursor.pos += 1; // the '#'
    cursor.skip_blanks();
    if cursor.peek() != Some(b'{') {
        return Err(ParseErrorKind::Expected { expected: "'{' starting the exemplar labels" });
    }
    let labels = parse_labels(cursor)?;
    let (value, timestamp) = parse_value_and_timestamp(cursor)?;
    if !cursor.at_end() {
        return Err(ParseErrorKind::TrailingText);
    }
    Ok(Exemplar { labels, value, timestamp })
}

/// Parses a Prometheus float: decimal or exponent notation, `NaN`, `+Inf`, `-Inf`.
///
/// Rust's float grammar already accepts those spellings (case-insensitively); it also accepts
/// `infinity`, which Go does too.
#[inline]
fn parse_float(text: &str) -> Option<f64> {
    text.parse::<f64>().ok()
}

/// Keeps error messages short when a line is huge.
fn truncated(text: &str) -> String {
    const MAX_CHARS: usize = 40;
    match text.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(text: &str) -> Vec<Sample<'_>> {
        parse(text).samples().collect::<Result<_, _>>().expect("valid page")
    }

    fn first_error(text: &str) -> ParseError {
        parse(text).find_map(Result::err).expect("an error")
    }

    #[test]
    fn reads_help_type_and_samples() {
        let page = "# HELP http_requests_total The total.\\nSecond line \\\\ end\n\
                    # TYPE http_requests_total counter\n\
                    http_requests_total{method=\"post\",code=\"200\"} 1027 1395066363000\n\
                    http_requests_total{method=\"post\",code=\"400\"}    3 1395066363000\n";
        let records: Vec<_> = parse(page).collect::<Result<_, _>>().expect("valid");
        assert_eq!(records.len(), 4);
        assert_eq!(
            records[0],
            Record::Help {
                family: "http_requests_total",
                text: Cow::Owned("The total.\nSecond line \\ end".into())
            }
        );
        assert_eq!(
            records[1],
            Record::Type { family: "http_requests_total", kind: MetricKind::Counter }
        );
        let Record::Sample(sample) = &records[3] else { panic!("a sample") };
        assert_eq!(sample.value, 3.0);
        assert_eq!(sample.timestamp, Some(1_395_066_363_000.0));
        assert_eq!(sample.labels.get("code").as_deref(), Some("400"));
        assert_eq!(sample.labels.len(), 2);
    }

    #[test]
    fn special_values() {
        let page = "a NaN\nb +Inf\nc -Inf\nd 1.5e-3\ne -0\nf 12345678901234567890\n";
        let values: Vec<f64> = samples(page).iter().map(|s| s.value).collect();
        assert!(values[0].is_nan());
        assert_eq!(values[1], f64::INFINITY);
        assert_eq!(values[2], f64::NEG_INFINITY);
        assert_eq!(values[3], 0.0015);
        assert_eq!(values[4], 0.0);
        assert_eq!(values[5], 1.234_567_890_123_456_8e19);
    }

    #[test]
    fn label_escapes_are_decoded_only_when_present() {
        let page = r#"m{path="C:\\dir",quote="say \"hi\"",nl="a\nb",plain="x"} 1"#;
        let sample = &samples(page)[0];
        let labels: Vec<_> = sample.labels.iter().collect();
        assert_eq!(labels[0].value, "C:\\dir");
        assert_eq!(labels[1].value, "say \"hi\"");
        assert_eq!(labels[2].value, "a\nb");
        assert!(matches!(labels[3].value, Cow::Borrowed("x")));
    }

    #[test]
    fn label_values_may_hold_delimiters_and_unicode() {
        let page = "m{a=\"x,y=z}\",b=\"héllo # { }\" , c = \"\" ,} 2\n";
        let sample = &samples(page)[0];
        assert_eq!(sample.labels.get("a").as_deref(), Some("x,y=z}"));
        assert_eq!(sample.labels.get("b").as_deref(), Some("héllo # { }"));
        assert_eq!(sample.labels.get("c").as_deref(), Some(""));
        assert_eq!(sample.labels.len(), 3);
    }

    #[test]
    fn empty_braces_blank_lines_comments_and_crlf() {
        let page = "\r\n# just a comment\n#\n  \t\nm{} 1\r\n  n 2\n# HELPER not help\n";
        let names: Vec<_> = samples(page).iter().map(|s| s.name).collect();
        assert_eq!(names, ["m", "n"]);
    }

    #[test]
    fn openmetrics_eof_created_and_exemplars() {
        let page = "# TYPE foo histogram\n\
                    # UNIT foo seconds\n\
                    foo_bucket{le=\"0.1\"} 8 # {trace_id=\"abc\"} 0.05 1600000000.123\n\
                    foo_bucket{le=\"+Inf\"} 10 1600000000.5 # {} 7\n\
                    foo_created 1600000000.25\n\
                    # EOF\n\
                    this is not read\n";
        let records: Vec<_> = parse(page).collect::<Result<_, _>>().expect("valid");
        assert_eq!(records.last(), Some(&Record::Eof));
        assert_eq!(records[1], Record::Unit { family: "foo", unit: "seconds" });
        let Record::Sample(bucket) = &records[2] else { panic!("a sample") };
        let exemplar = bucket.exemplar.as_ref().expect("an exemplar");
        assert_eq!(exemplar.labels.get("trace_id").as_deref(), Some("abc"));
        assert_eq!(exemplar.value, 0.05);
        assert_eq!(exemplar.timestamp, Some(1_600_000_000.123));
        let Record::Sample(inf) = &records[3] else { panic!("a sample") };
        assert_eq!(inf.labels.get("le").as_deref(), Some("+Inf"));
        assert_eq!(inf.timestamp, Some(1_600_000_000.5));
        assert!(inf.exemplar.as_ref().is_some_and(|e| e.labels.is_empty()));
    }

    #[test]
    fn errors_name_line_and_column() {
        let cases: &[(&str, usize, usize, ParseErrorKind)] = &[
            ("ok 1\n9bad 1\n", 2, 1, ParseErrorKind::InvalidMetricName),
            ("m{a=\"1\" 2\n", 1, 9, ParseErrorKind::Expected { expected: "',' or '}'" }),
            ("m{a=\"1\\t\"} 2\n", 1, 7, ParseErrorKind::InvalidEscape('t')),
            ("m{a=\"open} 2", 1, 13, ParseErrorKind::UnterminatedLabelValue),
            ("m{1a=\"x\"} 2", 1, 3, ParseErrorKind::InvalidLabelName),
            ("m{a:b=\"x\"} 2", 1, 4, ParseErrorKind::Expected { expected: "'='" }),
            ("m{a=x} 2", 1, 5, ParseErrorKind::Expected { expected: "'\"'" }),
            ("m", 1, 2, ParseErrorKind::MissingValue),
            ("m   ", 1, 5, ParseErrorKind::MissingValue),
            ("m{} ", 1, 5, ParseErrorKind::MissingValue),
            ("m 1.2.3", 1, 3, ParseErrorKind::InvalidValue("1.2.3".into())),
            ("m 1 soon", 1, 5, ParseErrorKind::InvalidTimestamp("soon".into())),
            ("m 1 NaN", 1, 5, ParseErrorKind::InvalidTimestamp("NaN".into())),
            ("m 1 2 3", 1, 7, ParseErrorKind::TrailingText),
            ("# TYPE m flavour", 1, 17, ParseErrorKind::UnknownMetricType("flavour".into())),
            ("# TYPE", 1, 7, ParseErrorKind::InvalidFamilyName),
            ("# HELP 1x text", 1, 8, ParseErrorKind::InvalidFamilyName),
            (
                "m 1 # trace",
                1,
                7,
                ParseErrorKind::Expected { expected: "'{' starting the exemplar labels" },
            ),
        ];
        for (page, line, column, kind) in cases {
            let error = first_error(page);
            assert_eq!((error.line, error.column, &error.kind), (*line, *column, kind), "{page:?}");
        }
        let shown = first_error("a 1\nb{c=\"d\"} x\n").to_string();
        assert_eq!(shown, "line 2, column 10: invalid sample value \"x\"");
    }

    #[test]
    fn the_parser_resumes_after_a_bad_line() {
        let results: Vec<_> = parse("a 1\n{oops\nb 2\n").collect();
        assert_eq!(results.len(), 3);
        assert!(results[1].is_err());
        assert!(matches!(&results[2], Ok(Record::Sample(s)) if s.name == "b"));
    }

    #[test]
    fn filters_skip_unwanted_lines_without_validating_them() {
        let page = "# HELP wanted w\n# TYPE wanted gauge\nwanted 1\n# HELP other o\n\
                    other{broken 1\nwanted_total 2\nhist_bucket{le=\"1\"} 3\nhist_sum 4\n";
        let exact = NameFilter::exact(["wanted"]);
        let records: Vec<_> =
            parse(page).with_filter(&exact).collect::<Result<_, _>>().expect("valid");
        assert_eq!(records.len(), 3, "HELP, TYPE and the sample of `wanted` only: {records:?}");

        let families = NameFilter::families(["hist", "wanted"]);
        let names: Vec<_> = parse(page)
            .with_filter(&families)
            .samples()
            .map(|s| s.map(|s| s.name))
            .collect::<Result<_, _>>()
            .expect("valid");
        assert_eq!(names, ["wanted", "wanted_total", "hist_bucket", "hist_sum"]);
    }

    #[test]
    fn non_ascii_never_splits_a_character() {
        for page in
            ["é 1", "m{é=\"1\"} 1", "m{a=\"é\\é\"} 1", "m é", "m 1 é", "# TYPE m é", "m{a=\"\\"]
        {
            let _ = parse(page).count();
        }
        let error = first_error("m{a=\"x\\é\"} 1");
        assert_eq!(error.kind, ParseErrorKind::InvalidEscape('é'));
    }

    #[test]
    fn skipped_lines_are_not_decoded_and_read_lines_must_be_text() {
        let mut page = b"# TYPE other counter\nother_total{x=\"".to_vec();
        page.extend_from_slice(&[0xff, 0xfe]);
        page.extend_from_slice(b"\"} 1\n# TYPE wanted gauge\nwanted 2\n");
        let filter = NameFilter::exact(["wanted"]);
        let samples: Vec<_> = Parser::from_bytes(&page)
            .with_filter(&filter)
            .samples()
            .collect::<Result<_, _>>()
            .expect("the broken line is skipped");
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].value, 2.0);

        let everything: Vec<_> = Parser::from_bytes(&page).samples().collect();
        let error = everything.into_iter().find_map(Result::err).expect("the line is read");
        assert_eq!(error.kind, ParseErrorKind::NotUtf8);
        assert_eq!((error.line, error.column), (2, 16));
    }
}
