//! Reading `InferenceModelRewrite` objects (and the targets of legacy `InferenceModel`
//! objects) from YAML, as users keep them in their repositories: one object, several
//! `---`-separated documents, or a `kind: List` with `items`.
//!
//! Everything the API server would refuse is refused here too, with the document, object,
//! rule and target named: an empty rule list or target list, a match type other than `Exact`,
//! an empty model name, a weight outside 1..=1,000,000, and weights set on some targets of a
//! rule but not on others (the API requires all or none; the Go EPP only warns and then never
//! picks the unweighted ones, which silently drops traffic).

use serde::Deserialize;
use serde::de::IgnoredAny;

/// Largest weight the API accepts.
pub const MAX_TARGET_WEIGHT: u32 = 1_000_000;

/// Kinds of object this loader reads.
const KINDS: &[&str] = &["InferenceModelRewrite", "InferenceModel", "List"];

/// Why a rewrite file was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    /// Not YAML, or not a mapping with a `kind`.
    #[error("model rewrites are not valid YAML objects: {0}")]
    Syntax(String),
    /// A document of a kind this loader does not read.
    #[error("document {document}: kind '{kind}' is not one of {KINDS:?}")]
    UnknownKind {
        /// Position of the document (0-based).
        document: usize,
        /// Its kind.
        kind: String,
    },
    /// An object whose fields do not fit its kind.
    #[error("{object}: {message}")]
    Invalid {
        /// Which object (`InferenceModelRewrite/<name>`, with the document's position).
        object: String,
        /// What is wrong, with the field path.
        message: String,
    },
    /// Two objects of one kind with one name.
    #[error("{kind}/{name} is defined twice (documents {first} and {second})")]
    Duplicate {
        /// The kind.
        kind: String,
        /// The name.
        name: String,
        /// Position of the first.
        first: usize,
        /// Position of the second.
        second: usize,
    },
}

/// One rule, validated: the model names it matches (none: every model) and its targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleDefinition {
    /// Exact model names; empty for a catch-all rule.
    pub matches: Vec<String>,
    /// Weighted targets (weight 1 each when the rule sets none).
    pub targets: Vec<(String, u32)>,
}

/// One object's rules, with what decides its precedence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RewriteDefinition {
    /// `metadata.name` (reported in metrics as `model_rewrite_name`).
    pub name: String,
    /// `metadata.creationTimestamp`, when the file carries it (RFC 3339, UTC).
    pub created: Option<String>,
    /// Position in the file, the tie-breaker (and the order when no timestamps are given).
    pub position: usize,
    /// The rules, in order.
    pub rules: Vec<RuleDefinition>,
}

/// First pass: only the kinds, so that an unknown kind is reported as such rather than as a
/// field its spec does not have.
#[derive(Deserialize)]
struct KindOnly {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    items: Vec<KindOnly>,
}

// The documents are read into typed structs (never into a generic value): YAML 1.1 reads an
// untyped `y`, `no` or `on` as a boolean, and model names are free text.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    kind: String,
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    spec: Spec,
    #[serde(default)]
    items: Vec<Document>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Metadata {
    #[serde(default)]
    name: String,
    #[serde(default)]
    creation_timestamp: Option<String>,
}

/// The specs of both kinds read: `rules` (InferenceModelRewrite) or `modelName`,
/// `criticality` and `targetModels` (the legacy InferenceModel, whose criticality belongs to
/// the objectives and is not read here).
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    #[allow(dead_code)]
    pool_ref: Option<IgnoredAny>,
    #[serde(default)]
    rules: Option<Vec<RuleSpec>>,
    #[serde(default)]
    model_name: Option<String>,
    #[serde(default)]
    criticality: Option<IgnoredAny>,
    #[serde(default)]
    target_models: Vec<LegacyTarget>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    #[serde(default)]
    matches: Vec<MatchSpec>,
    #[serde(default)]
    targets: Vec<TargetSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MatchSpec {
    model: ModelMatchSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelMatchSpec {
    #[serde(rename = "type", default)]
    match_type: Option<String>,
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TargetSpec {
    #[serde(default)]
    weight: Option<i64>,
    model_rewrite: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyTarget {
    name: String,
    #[serde(default)]
    weight: Option<i64>,
}

/// Reads every rewrite (and legacy model with targets) in `text`.
pub fn parse_definitions(text: &str) -> Result<Vec<RewriteDefinition>, RewriteError> {
    let syntax = |error: serde_saphyr::Error| RewriteError::Syntax(error.to_string());
    let kinds: Vec<Option<KindOnly>> = serde_saphyr::from_multiple(text).map_err(syntax)?;
    for (document, kinds) in kinds.iter().enumerate() {
        let Some(kinds) = kinds else { continue };
        let listed =
            if kinds.kind == "List" { &kinds.items[..] } else { std::slice::from_ref(kinds) };
        let readable = |kind: &str| kind == "InferenceModelRewrite" || kind == "InferenceModel";
        if let Some(unknown) = listed.iter().find(|object| !readable(&object.kind)) {
            return Err(RewriteError::UnknownKind { document, kind: unknown.kind.clone() });
        }
    }
    let documents: Vec<Option<Document>> = serde_saphyr::from_multiple(text).map_err(syntax)?;
    let mut objects = Vec::new();
    for (index, document) in documents.into_iter().enumerate() {
        let Some(document) = document else { continue };
        if document.kind == "List" {
            objects.extend(document.items.into_iter().map(|item| (index, item)));
        } else {
            objects.push((index, document));
        }
    }
    let mut definitions: Vec<RewriteDefinition> = Vec::new();
    let mut seen: Vec<(String, String, usize)> = Vec::new();
    for (position, (document, object)) in objects.into_iter().enumerate() {
        let label = format!("document {document}: {}/{}", object.kind, object.metadata.name);
        let invalid = |message: String| RewriteError::Invalid { object: label.clone(), message };
        let rules = match object.kind.as_str() {
            "InferenceModelRewrite" => rewrite_rules(object.spec).map_err(invalid)?,
            _ => legacy_rules(object.spec).map_err(invalid)?,
        };
        if object.metadata.name.is_empty() {
            return Err(invalid("metadata.name is empty".into()));
        }
        if let Some((_, _, first)) = seen
            .iter()
            .find(|(kind, name, _)| *kind == object.kind && *name == object.metadata.name)
        {
            return Err(RewriteError::Duplicate {
                kind: object.kind,
                name: object.metadata.name,
                first: *first,
                second: document,
            });
        }
        seen.push((object.kind.clone(), object.metadata.name.clone(), document));
        if rules.is_empty() {
            continue;
        }
        definitions.push(RewriteDefinition {
            name: object.metadata.name,
            created: object.metadata.creation_timestamp,
            position,
            rules,
        });
    }
    Ok(definitions)
}

fn rewrite_rules(spec: Spec) -> Result<Vec<RuleDefinition>, String> {
    if spec.model_name.is_some() || spec.criticality.is_some() || !spec.target_models.is_empty() {
        return Err("spec: modelName, criticality and targetModels belong to InferenceModel".into());
    }
    let spec_rules = spec.rules.unwrap_or_default();
    if spec_rules.is_empty() {
        return Err("spec.rules is empty".into());
    }
    let mut rules = Vec::with_capacity(spec_rules.len());
    for (rule_index, rule) in spec_rules.into_iter().enumerate() {
        let at = |field: String| format!("spec.rules[{rule_index}].{field}");
        let mut matches = Vec::with_capacity(rule.matches.len());
        for (match_index, matched) in rule.matches.into_iter().enumerate() {
            let field = at(format!("matches[{match_index}].model"));
            match matched.model.match_type.as_deref() {
                None | Some("Exact") => {}
                Some(other) => {
                    return Err(format!("{field}.type: '{other}' is not supported (Exact)"));
                }
            }
            if matched.model.value.is_empty() {
                return Err(format!("{field}.value is empty"));
            }
            matches.push(matched.model.value);
        }
        let targets = rule
            .targets
            .into_iter()
            .map(|target| (target.model_rewrite, target.weight))
            .collect::<Vec<_>>();
        let targets = weighted_targets(targets, &at("targets".into()))?;
        rules.push(RuleDefinition { matches, targets });
    }
    Ok(rules)
}

fn legacy_rules(spec: Spec) -> Result<Vec<RuleDefinition>, String> {
    if spec.rules.is_some() {
        return Err("spec.rules belongs to InferenceModelRewrite".into());
    }
    let Some(model_name) = spec.model_name.filter(|name| !name.is_empty()) else {
        return Err("spec.modelName is empty".into());
    };
    if spec.target_models.is_empty() {
        // A legacy model without targets is served under its own name.
        return Ok(Vec::new());
    }
    let targets = spec.target_models.into_iter().map(|target| (target.name, target.weight));
    let targets = weighted_targets(targets.collect(), "spec.targetModels")?;
    Ok(vec![RuleDefinition { matches: vec![model_name], targets }])
}

/// Checks a rule's targets (`field` is their path): at least one, names set, weights all set
/// (each in range) or none.
fn weighted_targets(
    targets: Vec<(String, Option<i64>)>,
    field: &str,
) -> Result<Vec<(String, u32)>, String> {
    if targets.is_empty() {
        return Err(format!("{field} is empty: a rule needs at least one target"));
    }
    let weighted = targets.iter().filter(|(_, weight)| weight.is_some()).count();
    if weighted != 0 && weighted != targets.len() {
        return Err(format!(
            "{field}: weights must be set on every target or on none ({weighted} of {} have one)",
            targets.len()
        ));
    }
    let mut checked = Vec::with_capacity(targets.len());
    for (index, (name, weight)) in targets.into_iter().enumerate() {
        if name.is_empty() {
            return Err(format!("{field}[{index}]: the model name is empty"));
        }
        let weight = match weight {
            None => 1,
            Some(weight) if (1..=i64::from(MAX_TARGET_WEIGHT)).contains(&weight) => weight as u32,
            Some(weight) => {
                return Err(format!(
                    "{field}[{index}].weight: {weight} is outside 1..={MAX_TARGET_WEIGHT}"
                ));
            }
        };
        checked.push((name, weight));
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CANARY: &str = "\
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata:
  name: tweet-summary-canary
spec:
  poolRef:
    group: inference.networking.k8s.io
    name: vllm-llama3-8b
  rules:
  - matches:
    - model:
        type: Exact
        value: tweet-summary
    targets:
    - modelRewrite: tweet-summary-v1
      weight: 90
    - modelRewrite: tweet-summary-v2
      weight: 10
";

    #[test]
    fn reads_the_documented_canary() {
        let definitions = parse_definitions(CANARY).expect("valid");
        assert_eq!(
            definitions,
            vec![RewriteDefinition {
                name: "tweet-summary-canary".into(),
                created: None,
                position: 0,
                rules: vec![RuleDefinition {
                    matches: vec!["tweet-summary".into()],
                    targets: vec![("tweet-summary-v1".into(), 90), ("tweet-summary-v2".into(), 10)],
                }],
            }]
        );
    }

    #[test]
    fn reads_several_documents_lists_and_legacy_models() {
        let text = format!(
            "{CANARY}---
kind: List
items:
- kind: InferenceModelRewrite
  metadata: {{name: fallback, creationTimestamp: '2025-01-01T00:00:00Z'}}
  spec:
    rules:
    - targets: [{{modelRewrite: base}}]
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModel
metadata: {{name: legacy}}
spec:
  modelName: food-review
  criticality: Critical
  poolRef: {{name: pool}}
  targetModels:
  - {{name: food-review-1, weight: 50}}
  - {{name: food-review-2, weight: 50}}
---
kind: InferenceModel
metadata: {{name: plain}}
spec: {{modelName: plain-model, criticality: Standard}}
"
        );
        let definitions = parse_definitions(&text).expect("valid");
        let names: Vec<&str> = definitions.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["tweet-summary-canary", "fallback", "legacy"]);
        assert_eq!(definitions[1].created.as_deref(), Some("2025-01-01T00:00:00Z"));
        assert_eq!(definitions[1].rules[0].matches, Vec::<String>::new());
        assert_eq!(definitions[1].rules[0].targets, vec![("base".to_owned(), 1)]);
        assert_eq!(definitions[2].rules[0].matches, vec!["food-review".to_owned()]);
    }

    proptest::proptest! {
        /// Whatever the text, loading answers (rules or an error) and never panics.
        #[test]
        fn any_text_loads_or_is_refused(text in "(kind: |InferenceModelRewrite|InferenceModel|List|items:|spec:|rules:|matches:|targets:|modelRewrite: |weight: |model:|value: |metadata: |name: |[-{}\\[\\],:\n 0-9a-z]){0,60}") {
            let _ = parse_definitions(&text);
        }
    }

    #[test]
    fn yaml_words_stay_model_names() {
        let definitions = parse_definitions(
            "kind: InferenceModelRewrite\nmetadata: {name: on}\nspec:\n  rules:\n  - matches: [{model: {value: no}}]\n    targets: [{modelRewrite: y}, {modelRewrite: 1.5}]\n",
        )
        .expect("valid");
        assert_eq!(definitions[0].name, "on");
        assert_eq!(definitions[0].rules[0].matches, ["no"]);
        assert_eq!(definitions[0].rules[0].targets, [("y".to_owned(), 1), ("1.5".to_owned(), 1)]);
    }

    #[test]
    fn refusals_name_the_object_and_field() {
        let refused = |text: &str| parse_definitions(text).expect_err("must fail").to_string();
        let rewrite = |rules: &str| {
            format!("kind: InferenceModelRewrite\nmetadata: {{name: r}}\nspec:\n  rules: {rules}\n")
        };
        let cases = [
            (rewrite("[]"), "document 0: InferenceModelRewrite/r: spec.rules is empty"),
            (rewrite("[{matches: [{model: {value: a}}]}]"), "spec.rules[0].targets is empty"),
            (
                rewrite(
                    "[{matches: [{model: {type: Prefix, value: a}}], targets: [{modelRewrite: b}]}]",
                ),
                "spec.rules[0].matches[0].model.type: 'Prefix' is not supported",
            ),
            (
                rewrite("[{matches: [{model: {value: ''}}], targets: [{modelRewrite: b}]}]"),
                "spec.rules[0].matches[0].model.value is empty",
            ),
            (
                rewrite("[{targets: [{modelRewrite: b, weight: 0}]}]"),
                "spec.rules[0].targets[0].weight: 0 is outside 1..=1000000",
            ),
            (
                rewrite("[{targets: [{modelRewrite: b, weight: 2}, {modelRewrite: c}]}]"),
                "spec.rules[0].targets: weights must be set on every target or on none (1 of 2",
            ),
            (rewrite("[{targets: [{modelRewrite: ''}]}]"), "targets[0]: the model name is empty"),
            (rewrite("[{targets: [{modelRewirte: b}]}]"), "modelRewirte"),
            ("kind: ConfigMap\n".to_owned(), "document 0: kind 'ConfigMap' is not one of"),
            (
                format!(
                    "{}---\n{}",
                    rewrite("[{targets: [{modelRewrite: b}]}]"),
                    rewrite("[{targets: [{modelRewrite: c}]}]")
                ),
                "InferenceModelRewrite/r is defined twice (documents 0 and 1)",
            ),
            (
                "kind: InferenceModelRewrite\nspec: {rules: [{targets: [{modelRewrite: b}]}]}\n"
                    .to_owned(),
                "metadata.name is empty",
            ),
            ("rules: [".to_owned(), "not valid YAML"),
        ];
        for (text, expected) in cases {
            let error = refused(&text);
            assert!(error.contains(expected), "{error:?} should contain {expected:?}");
        }
    }
}
