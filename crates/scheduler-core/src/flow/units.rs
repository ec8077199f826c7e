//! Value syntaxes of the GIE config: Go durations (`"200ms"`, `"1m30s"`) and Kubernetes
//! quantities (`"1Gi"`, `"500"`, `"2k"`).
//!
//! Both parsers are strict and total: they never panic, reject signs, empty input, unknown
//! units and overflow, and return a short reason the config layer prefixes with the field name.

use std::time::Duration;

use serde_json::Value;

/// Parses a config duration: a Go duration string (`"200ms"`, `"2s"`, `"1h2m3.5s"`, `"0"`)
/// or a plain non-negative JSON number, read as milliseconds.
pub(crate) fn duration_from_value(value: &Value) -> Result<Duration, String> {
    match value {
        Value::String(text) => parse_go_duration(text),
        Value::Number(number) => {
            let millis = number
                .as_f64()
                .filter(|millis| millis.is_finite() && *millis >= 0.0)
                .ok_or_else(|| format!("{number} is not a non-negative number of milliseconds"))?;
            nanos_to_duration(millis * 1e6)
                .ok_or_else(|| format!("{number} milliseconds is out of range"))
        }
        other => Err(format!(
            "expected a duration such as \"200ms\" or a number of milliseconds, found {}",
            kind_of(other)
        )),
    }
}

/// Parses a Go duration string: one or more `<decimal><unit>` terms with units `ns`, `us`
/// (or `µs`), `ms`, `s`, `m`, `h`; `"0"` alone is zero. Negative durations are refused.
pub(crate) fn parse_go_duration(text: &str) -> Result<Duration, String> {
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

/// Parses a Kubernetes quantity as a non-negative integer count: a JSON number, or a string
/// with an optional decimal (`k`, `M`, `G`, `T`, `P`, `E`) or binary (`Ki` ... `Ei`) suffix.
/// Fractional results are rounded up, so a limit is never loosened by rounding.
pub(crate) fn quantity_from_value(value: &Value) -> Result<u64, String> {
    match value {
        Value::Number(number) => match number.as_u64() {
            Some(count) => Ok(count),
            None => quantity_from_float(number.as_f64(), &number.to_string()),
        },
        Value::String(text) => parse_quantity(text),
        other => Err(format!(
            "expected a quantity such as 100, \"2k\" or \"1Gi\", found {}",
            kind_of(other)
        )),
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
    quantity_from_float(Some(fraction * multiplier as f64), text)
}

fn quantity_from_float(value: Option<f64>, shown: &str) -> Result<u64, String> {
    match value {
        Some(value) if value.is_finite() && value >= 0.0 && value < u64::MAX as f64 => {
            Ok(value.ceil() as u64)
        }
        _ => Err(format!("'{shown}' is not a non-negative quantity in range")),
    }
}

/// A short name of a JSON value's type, for error messages.
pub(crate) fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
        assert_eq!(duration_from_value(&json!(150)), Ok(Duration::from_millis(150)));
        assert_eq!(duration_from_value(&json!(0.5)), Ok(Duration::from_micros(500)));
        assert!(duration_from_value(&json!(-1)).is_err());
        assert!(duration_from_value(&json!(true)).expect_err("must fail").contains("a boolean"));
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity_from_value(&json!(100)), Ok(100));
        assert_eq!(quantity_from_value(&json!("100")), Ok(100));
        assert_eq!(quantity_from_value(&json!("2k")), Ok(2_000));
        assert_eq!(quantity_from_value(&json!("1Gi")), Ok(1 << 30));
        assert_eq!(quantity_from_value(&json!("1.5Ki")), Ok(1536));
        assert_eq!(quantity_from_value(&json!(2.5)), Ok(3));
        for bad in [json!("-1"), json!("1X"), json!(""), json!("Gi"), json!(-3), json!([1])] {
            assert!(quantity_from_value(&bad).is_err(), "{bad} must be refused");
        }
        assert!(
            quantity_from_value(&json!("100Ei")).expect_err("must fail").contains("out of range")
        );
    }
}
