//! Value syntaxes of the GIE config: Go durations (`"200ms"`, `"1m30s"`) and Kubernetes
//! quantities (`"1Gi"`, `"500"`, `"2k"`), as serde `deserialize_with` functions.
//!
//! Both parsers are strict and total: they never panic, reject signs, empty input, unknown
//! units and overflow, and return a short reason that becomes the serde error, which the
//! config loader prefixes with the field path.

use std::fmt;
use std::time::Duration;

use serde::Deserializer;
use serde::de::{self, Visitor};

/// A config duration: a Go duration string (`"200ms"`, `"2s"`, `"1h2m3.5s"`, `"0"`) or a plain
/// non-negative number, read as milliseconds.
pub(crate) fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    deserializer.deserialize_any(DurationVisitor)
}

/// [`duration`] for an optional field (absent is `None`; the field needs `#[serde(default)]`).
pub(crate) fn optional_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    duration(deserializer).map(Some)
}

/// A cap given as a Kubernetes quantity; `0` means unbounded and reads as `None`.
pub(crate) fn cap<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    let cap = deserializer.deserialize_any(QuantityVisitor)?;
    Ok((cap > 0).then_some(cap))
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as \"200ms\" or a number of milliseconds")
    }

    fn visit_u64<E: de::Error>(self, millis: u64) -> Result<Duration, E> {
        Ok(Duration::from_millis(millis))
    }

    fn visit_i64<E: de::Error>(self, millis: i64) -> Result<Duration, E> {
        u64::try_from(millis).map(Duration::from_millis).map_err(|_| {
            E::custom(format_args!("{millis} is not a non-negative number of milliseconds"))
        })
    }

    fn visit_f64<E: de::Error>(self, millis: f64) -> Result<Duration, E> {
        if !(millis.is_finite() && millis >= 0.0) {
            return Err(E::custom(format_args!(
                "{millis} is not a non-negative number of milliseconds"
            )));
        }
        nanos_to_duration(millis * 1e6)
            .ok_or_else(|| E::custom(format_args!("{millis} milliseconds is out of range")))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
        parse_go_duration(text).map_err(E::custom)
    }
}

/// Parses a Go duration string: one or more `<decimal><unit>` terms with units `ns`, `us`
/// (or `µs`), `ms`, `s`, `m`, `h`; `"0"` alone is zero. Negative durations are refused.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let invalid =
        || format!("'{text}' is not a duration (expected e.g. \"200ms\", \"2s\", \"1m30s\")");
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() {
        return Err(invalid());
    }
    let mut rest = text;
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let number_len =
            rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(invalid)?;
        let (number, after_number) = rest.split_at(number_len);
        let unit_len = after_number
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after_number.len());
        let (unit, after_unit) = after_number.split_at(unit_len);
        let nanos_per_unit: f64 = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(invalid()),
        };
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return Err(invalid());
        }
        let amount: f64 = number.parse().map_err(|_| invalid())?;
        let term = nanos_to_duration(amount * nanos_per_unit)
            .ok_or_else(|| format!("'{text}' is out of range"))?;
        total = total.checked_add(term).ok_or_else(|| format!("'{text}' is out of range"))?;
        rest = after_unit;
    }
    Ok(total)
}

/// Rounds to whole nanoseconds, the resolution Go durations have.
fn nanos_to_duration(nanos: f64) -> Option<Duration> {
    (nanos.is_finite() && nanos >= 0.0 && nanos < u64::MAX as f64)
        .then(|| Duration::from_nanos(nanos.round() as u64))
}

/// A Kubernetes quantity as a non-negative integer count: a number, or a string with an
/// optional decimal (`k`, `M`, `G`, `T`, `P`, `E`) or binary (`Ki` ... `Ei`) suffix.
/// Fractional results are rounded up, so a limit is never loosened by rounding.
struct QuantityVisitor;

impl Visitor<'_> for QuantityVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a quantity such as 100, \"2k\" or \"1Gi\"")
    }

    fn visit_u64<E: de::Error>(self, count: u64) -> Result<u64, E> {
        Ok(count)
    }

    fn visit_i64<E: de::Error>(self, count: i64) -> Result<u64, E> {
        u64::try_from(count).map_err(|_| {
            E::custom(format_args!("'{count}' is not a non-negative quantity in range"))
        })
    }

    fn visit_f64<E: de::Error>(self, count: f64) -> Result<u64, E> {
        quantity_from_float(count, &count.to_string()).map_err(E::custom)
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<u64, E> {
        parse_quantity(text).map_err(E::custom)
    }
}

fn parse_quantity(text: &str) -> Result<u64, String> {
    let invalid = || format!("'{text}' is not a quantity (expected e.g. 100, \"2k\", \"1Gi\")");
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let multiplier: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        _ => return Err(invalid()),
    };
    if number.is_empty() || number == "." {
        return Err(invalid());
    }
    if let Ok(whole) = number.parse::<u64>() {
        return whole.checked_mul(multiplier).ok_or_else(|| format!("'{text}' is out of range"));
    }
    let fraction: f64 = number.parse().map_err(|_| invalid())?;
    quantity_from_float(fraction * multiplier as f64, text)
}

fn quantity_from_float(value: f64, shown: &str) -> Result<u64, String> {
    if value.is_finite() && value >= 0.0 && value < u64::MAX as f64 {
        Ok(value.ceil() as u64)
    } else {
        Err(format!("'{shown}' is not a non-negative quantity in range"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn duration_of(value: Value) -> Result<Duration, String> {
        duration(value).map_err(|error| error.to_string())
    }

    fn quantity_of(value: Value) -> Result<u64, String> {
        value.deserialize_any(QuantityVisitor).map_err(|error| error.to_string())
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_go_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_go_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_go_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_go_duration("250µs"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_go_duration("7ns"), Ok(Duration::from_nanos(7)));
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "200", "-1s", "1x", "s", "1.2.3s", ".s", "1s2", "1 s"] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(parse_go_duration("99999999999999999999h").is_err());
    }

    #[test]
    fn numbers_are_milliseconds() {
        assert_eq!(duration_of(json!(150)), Ok(Duration::from_millis(150)));
        assert_eq!(duration_of(json!(0.5)), Ok(Duration::from_micros(500)));
        assert_eq!(duration_of(json!("1m30s")), Ok(Duration::from_secs(90)));
        assert_eq!(
            duration_of(json!(-1)),
            Err("-1 is not a non-negative number of milliseconds".to_owned())
        );
        assert_eq!(
            duration_of(json!(true)),
            Err("invalid type: boolean `true`, expected a duration such as \"200ms\" or a number of milliseconds".to_owned())
        );
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity_of(json!(100)), Ok(100));
        assert_eq!(quantity_of(json!("100")), Ok(100));
        assert_eq!(quantity_of(json!("2k")), Ok(2_000));
        assert_eq!(quantity_of(json!("1Gi")), Ok(1 << 30));
        assert_eq!(quantity_of(json!("1.5Ki")), Ok(1536));
        assert_eq!(quantity_of(json!(2.5)), Ok(3));
        for bad in [json!("-1"), json!("1X"), json!(""), json!("Gi"), json!(-3), json!([1])] {
            assert!(quantity_of(bad.clone()).is_err(), "{bad} must be refused");
        }
        assert!(quantity_of(json!("100Ei")).expect_err("must fail").contains("out of range"));
    }

    #[test]
    fn zero_caps_are_unbounded() {
        assert_eq!(cap(json!(0)).map_err(|error| error.to_string()), Ok(None));
        assert_eq!(cap(json!("0Gi")).map_err(|error| error.to_string()), Ok(None));
        assert_eq!(cap(json!("2k")).map_err(|error| error.to_string()), Ok(Some(2_000)));
    }
}
