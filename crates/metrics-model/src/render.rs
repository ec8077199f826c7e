//! Writes samples in the Prometheus text format (0.0.4).
//!
//! The inverse of [`crate::text`]: test doubles and fake model servers use it to serve pages,
//! and the property tests use it to check that parsing gives back what was written.

use std::fmt::{self, Write};

use crate::text::MetricKind;

/// Writes `# HELP family text\n`, escaping `\` and newlines.
pub fn write_help(out: &mut impl Write, family: &str, text: &str) -> fmt::Result {
    write!(out, "# HELP {family} ")?;
    for c in text.chars() {
        match c {
            '\\' => out.write_str("\\\\")?,
            '\n' => out.write_str("\\n")?,
            other => out.write_char(other)?,
        }
    }
    out.write_char('\n')
}

/// Writes `# TYPE family kind\n`.
pub fn write_type(out: &mut impl Write, family: &str, kind: MetricKind) -> fmt::Result {
    writeln!(out, "# TYPE {family} {}", kind.keyword())
}

/// Writes one sample line: `name{labels} value [timestamp_ms]\n`.
///
/// Label values are escaped; names are written as given (the caller supplies valid ones).
pub fn write_sample(
    out: &mut impl Write,
    name: &str,
    labels: &[(&str, &str)],
    value: f64,
    timestamp_ms: Option<i64>,
) -> fmt::Result {
    out.write_str(name)?;
    if !labels.is_empty() {
        out.write_char('{')?;
        for (index, (label, label_value)) in labels.iter().enumerate() {
            if index > 0 {
                out.write_char(',')?;
            }
            write!(out, "{label}=\"")?;
            write_escaped_label_value(out, label_value)?;
            out.write_char('"')?;
        }
        out.write_char('}')?;
    }
    out.write_char(' ')?;
    write_value(out, value)?;
    if let Some(timestamp) = timestamp_ms {
        write!(out, " {timestamp}")?;
    }
    out.write_char('\n')
}

/// Writes a label value with `\\`, `\"` and `\n` escaped.
pub fn write_escaped_label_value(out: &mut impl Write, value: &str) -> fmt::Result {
    for c in value.chars() {
        match c {
            '\\' => out.write_str("\\\\")?,
            '"' => out.write_str("\\\"")?,
            '\n' => out.write_str("\\n")?,
            other => out.write_char(other)?,
        }
    }
    Ok(())
}

/// Writes a value the way Prometheus spells it: `NaN`, `+Inf`, `-Inf`, or the shortest
/// decimal that reads back as the same `f64`.
pub fn write_value(out: &mut impl Write, value: f64) -> fmt::Result {
    if value.is_nan() {
        out.write_str("NaN")
    } else if value == f64::INFINITY {
        out.write_str("+Inf")
    } else if value == f64::NEG_INFINITY {
        out.write_str("-Inf")
    } else {
        // `Debug` is the shortest round-tripping form and switches to exponent notation for
        // very large or small magnitudes, unlike `Display`.
        write!(out, "{value:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_escaped_samples() -> fmt::Result {
        let mut page = String::new();
        write_help(&mut page, "m", "two\nlines \\")?;
        write_type(&mut page, "m", MetricKind::Gauge)?;
        write_sample(&mut page, "m", &[("a", "q\"b\\\n")], f64::NEG_INFINITY, Some(-5))?;
        write_sample(&mut page, "m", &[], 1e300, None)?;
        assert_eq!(
            page,
            "# HELP m two\\nlines \\\\\n# TYPE m gauge\nm{a=\"q\\\"b\\\\\\n\"} -Inf -5\nm 1e300\n"
        );
        Ok(())
    }
}
