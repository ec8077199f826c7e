//! Label and field selectors, evaluated the way the API server does on list and watch.
//!
//! Label selectors: equality (`a=b`, `a==b`, `a!=b`), existence (`a`, `!a`) and sets
//! (`a in (x,y)`, `a notin (x)`); a comma joins requirements with AND. As in Kubernetes, `!=`
//! and `notin` also select objects that lack the label. Field selectors: `path=value`,
//! `path==value` and `path!=value` on any dotted path of string, number or boolean fields
//! (`metadata.name`, `metadata.namespace`, `status.phase`, ...); a missing field reads as "".

use serde_json::Value;

/// One requirement of a label selector.
#[derive(Debug, Clone)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// One requirement of a field selector: path, whether it must equal, value.
#[derive(Debug, Clone)]
struct FieldRequirement {
    path: String,
    equals: bool,
    value: String,
}

/// A parsed `labelSelector` and `fieldSelector`; an object matches when every requirement holds.
#[derive(Debug, Clone, Default)]
pub(crate) struct Selector {
    labels: Vec<LabelRequirement>,
    fields: Vec<FieldRequirement>,
}

impl Selector {
    /// Parses the two query parameters; the error is a message for a 400 Status.
    pub(crate) fn parse(labels: Option<&str>, fields: Option<&str>) -> Result<Self, String> {
        let labels = split_top_level(labels.unwrap_or(""))
            .into_iter()
            .map(parse_label_requirement)
            .collect::<Result<_, _>>()?;
        let fields = fields
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(parse_field_requirement)
            .collect::<Result<_, _>>()?;
        Ok(Self { labels, fields })
    }

    /// Whether `object` satisfies every requirement.
    pub(crate) fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let label = |key: &str| labels.get(key).and_then(Value::as_str);
        let labels_match = self.labels.iter().all(|requirement| match requirement {
            LabelRequirement::Equals(k, v) => label(k) == Some(v.as_str()),
            LabelRequirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            LabelRequirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelRequirement::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelRequirement::Exists(k) => label(k).is_some(),
            LabelRequirement::NotExists(k) => label(k).is_none(),
        });
        labels_match && self.fields.iter().all(|f| (field(object, &f.path) == f.value) == f.equals)
    }
}

/// Splits on commas outside parentheses, dropping empty parts.
fn split_top_level(selector: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&selector[start..]);
    parts.into_iter().map(str::trim).filter(|p| !p.is_empty()).collect()
}

fn parse_label_requirement(requirement: &str) -> Result<LabelRequirement, String> {
    let invalid = || format!("unable to parse requirement: {requirement:?}");
    if let Some(key) = requirement.strip_prefix('!') {
        return Ok(LabelRequirement::NotExists(key.trim().to_owned()));
    }
    if let Some(open) = requirement.find('(') {
        let values = requirement[open + 1..].strip_suffix(')').ok_or_else(invalid)?;
        let values =
            values.split(',').map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned).collect();
        let mut head = requirement[..open].split_whitespace();
        return match (head.next(), head.next(), head.next()) {
            (Some(key), Some("in"), None) => Ok(LabelRequirement::In(key.to_owned(), values)),
            (Some(key), Some("notin"), None) => Ok(LabelRequirement::NotIn(key.to_owned(), values)),
            _ => Err(invalid()),
        };
    }
    let pair = |op: &str| {
        requirement.split_once(op).map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
    };
    if let Some((k, v)) = pair("!=") {
        Ok(LabelRequirement::NotEquals(k, v))
    } else if let Some((k, v)) = pair("==").or_else(|| pair("=")) {
        Ok(LabelRequirement::Equals(k, v))
    } else if requirement.contains(char::is_whitespace) {
        Err(invalid())
    } else {
        Ok(LabelRequirement::Exists(requirement.to_owned()))
    }
}

fn parse_field_requirement(requirement: &str) -> Result<FieldRequirement, String> {
    let (path, equals, value) = if let Some((p, v)) = requirement.split_once("!=") {
        (p, false, v)
    } else if let Some((p, v)) =
        requirement.split_once("==").or_else(|| requirement.split_once('='))
    {
        (p, true, v)
    } else {
        return Err(format!("invalid field selector: {requirement:?}"));
    };
    Ok(FieldRequirement { path: path.trim().to_owned(), equals, value: value.trim().to_owned() })
}

/// The field at a dotted path as a string; "" when missing or not a scalar.
fn field(object: &Value, path: &str) -> String {
    match path.split('.').try_fold(object, |v, part| v.get(part)) {
        Some(Value::String(s)) => s.clone(),
        Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
        _ => String::new(),
    }
}
