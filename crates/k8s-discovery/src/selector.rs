//! Label selectors written as text (`--endpoint-selector`), in Kubernetes' syntax:
//! `app=vllm,env!=dev`, `tier in (gold,silver)`, `region notin (us)`, `gpu`, `!spot`.
//!
//! Parsing yields kube's [`Selector`], whose matching is the API server's.

use std::collections::BTreeSet;

use kube::core::{Expression, Selector};

/// Longest selector text accepted: far beyond any real one, small enough to bound memory.
const MAX_SELECTOR_BYTES: usize = 4096;

/// Why a selector could not be parsed; the message names the offending requirement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid label selector {selector:?}: {reason}")]
pub struct SelectorError {
    /// The selector as given (truncated when long).
    pub selector: String,
    /// What was wrong.
    pub reason: String,
}

/// Parses `text` as a Kubernetes label selector. The empty selector selects everything.
pub fn parse_selector(text: &str) -> Result<Selector, SelectorError> {
    let fail =
        |reason: String| SelectorError { selector: text.chars().take(200).collect(), reason };
    if text.len() > MAX_SELECTOR_BYTES {
        return Err(fail(format!("longer than {MAX_SELECTOR_BYTES} bytes")));
    }
    let mut expressions = Vec::new();
    for requirement in split_requirements(text).map_err(&fail)? {
        expressions.push(parse_requirement(requirement).map_err(&fail)?);
    }
    Ok(expressions.into_iter().collect())
}

/// Splits on the commas that separate requirements, not those inside `( )` value sets.
fn split_requirements(text: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (index, character) in text.char_indices() {
        match character {
            '(' => depth += 1,
            ')' => depth = depth.checked_sub(1).ok_or("unbalanced ')'")?,
            ',' if depth == 0 => {
                parts.push(&text[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced '('".to_owned());
    }
    parts.push(&text[start..]);
    let parts: Vec<&str> = parts.into_iter().map(str::trim).collect();
    if parts.len() == 1 && parts[0].is_empty() {
        return Ok(Vec::new());
    }
    if parts.iter().any(|part| part.is_empty()) {
        return Err("empty requirement between commas".to_owned());
    }
    Ok(parts)
}

fn parse_requirement(requirement: &str) -> Result<Expression, String> {
    if let Some(key) = requirement.strip_prefix('!') {
        return Ok(Expression::DoesNotExist(label_key(key.trim())?));
    }
    for (operator, equal) in [("!=", false), ("==", true), ("=", true)] {
        if let Some((key, value)) = requirement.split_once(operator) {
            let (key, value) = (label_key(key.trim())?, label_value(value.trim())?);
            return Ok(if equal {
                Expression::Equal(key, value)
            } else {
                Expression::NotEqual(key, value)
            });
        }
    }
    if let Some(open) = requirement.find('(') {
        let head: Vec<&str> = requirement[..open].split_whitespace().collect();
        let values = requirement[open + 1..]
            .strip_suffix(')')
            .ok_or_else(|| format!("{requirement:?}: text after ')'"))?;
        let values = values
            .split(',')
            .map(|value| label_value(value.trim()))
            .collect::<Result<BTreeSet<_>, _>>()?;
        return match head.as_slice() {
            [key, "in"] => Ok(Expression::In(label_key(key)?, values)),
            [key, "notin"] => Ok(Expression::NotIn(label_key(key)?, values)),
            _ => Err(format!("{requirement:?}: expected `key in (...)` or `key notin (...)`")),
        };
    }
    Ok(Expression::Exists(label_key(requirement)?))
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// characters of alphanumerics, `-`, `_`, `.`, beginning and ending alphanumeric.
fn label_key(key: &str) -> Result<String, String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let valid = !prefix.is_empty()
            && prefix.len() <= 253
            && prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        if !valid {
            return Err(format!("{key:?}: the key's prefix is not a DNS subdomain"));
        }
    }
    if name.is_empty() || !is_label_name(name) {
        return Err(format!("{key:?} is not a label key"));
    }
    Ok(key.to_owned())
}

/// A label value: empty, or a name as in a key.
fn label_value(value: &str) -> Result<String, String> {
    if value.is_empty() || is_label_name(value) {
        Ok(value.to_owned())
    } else {
        Err(format!("{value:?} is not a label value"))
    }
}

fn is_label_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    name.len() <= 63
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kube::core::SelectorExt;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn every_form_of_requirement_matches_as_kubernetes_does() {
        let selector =
            parse_selector("app=vllm, env!=dev,tier in (gold, silver),region notin (us),gpu,!spot")
                .unwrap();
        let base =
            [("app", "vllm"), ("env", "prod"), ("tier", "gold"), ("region", "eu"), ("gpu", "")];
        assert!(selector.matches(&labels(&base)));
        let mut spot = labels(&base);
        spot.insert("spot".into(), "true".into());
        assert!(!selector.matches(&spot), "!spot: the key must be absent");
        for (key, value) in
            [("app", "sglang"), ("env", "dev"), ("tier", "bronze"), ("region", "us")]
        {
            let mut changed = labels(&base);
            changed.insert(key.into(), value.into());
            assert!(!selector.matches(&changed), "{key}={value} must not match");
        }
        let mut no_gpu = labels(&base);
        no_gpu.remove("gpu");
        assert!(!selector.matches(&no_gpu), "gpu: the key must exist");
        assert!(parse_selector("app==vllm").unwrap().matches(&labels(&[("app", "vllm")])));
        assert!(
            parse_selector("llm-d.ai/role=decode")
                .unwrap()
                .matches(&labels(&[("llm-d.ai/role", "decode")]))
        );
    }

    #[test]
    fn empty_selects_everything() {
        assert!(parse_selector("").unwrap().selects_all());
        assert!(parse_selector("  ").unwrap().selects_all());
    }

    #[test]
    fn bad_selectors_name_what_is_wrong() {
        for (text, expected) in [
            ("app=vllm,", "empty requirement"),
            ("tier in (gold", "unbalanced"),
            ("tier in gold)", "unbalanced"),
            ("tier within (a)", "expected `key in"),
            ("-app=x", "not a label key"),
            ("app=bad value", "not a label value"),
            ("Bad_Prefix/app=x", "prefix"),
        ] {
            let error = parse_selector(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
        assert!(parse_selector(&"a".repeat(5000)).unwrap_err().to_string().contains("longer than"));
    }
}
