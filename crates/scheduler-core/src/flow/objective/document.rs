//! The forms an objectives file may take, read into one list of objectives and one of legacy
//! model criticalities, each entry with its position for error messages.
//!
//! Every YAML document is either a plain list of `{name, priority | criticality}` or a
//! Kubernetes object: `InferenceObjective`, the legacy `InferenceModel`, or a `List` of them.
//! The shape is decided by the document's top-level node (sequence or mapping) while it is
//! deserialized, so values are read typed from the YAML (a name written `123` stays a name)
//! rather than through an untyped intermediate tree.

use std::fmt;

use serde::Deserialize;
use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{
    Criticality, EntryPosition, InferenceObjectiveConfig, LegacyModelConfig, ObjectiveError,
};

/// Kind of the current InferenceObjective resource.
const INFERENCE_OBJECTIVE_KIND: &str = "InferenceObjective";
/// Kind of the legacy InferenceModel resource (GIE before v1), replaced by InferenceObjective.
const INFERENCE_MODEL_KIND: &str = "InferenceModel";
/// Kind of a Kubernetes list of objects (`kubectl get -o yaml` of several objects).
const LIST_KIND: &str = "List";
/// API groups serving InferenceObjective: GIE's, and llm-d's for its own copy of the type.
const OBJECTIVE_API_GROUPS: &[&str] = &["inference.networking.x-k8s.io", "llm-d.ai"];
/// API group of the legacy InferenceModel.
const MODEL_API_GROUPS: &[&str] = &["inference.networking.x-k8s.io"];

/// The objectives and legacy model criticalities of one file, in file order.
#[derive(Debug, Default)]
pub(super) struct ParsedObjectives {
    /// Objectives by name, with where each was given.
    pub(super) objectives: Vec<(EntryPosition, InferenceObjectiveConfig)>,
    /// Legacy InferenceModels, with where each was given.
    pub(super) models: Vec<(EntryPosition, LegacyModelConfig)>,
}

/// Reads every document of `text`.
pub(super) fn parse(text: &str) -> Result<ParsedObjectives, ObjectiveError> {
    let documents: Vec<Document> = serde_saphyr::from_multiple(text)
        .map_err(|error| ObjectiveError::Syntax(error.to_string()))?;
    let mut parsed = ParsedObjectives::default();
    for (document, content) in documents.into_iter().enumerate() {
        match content {
            Document::Entries(entries) => {
                for (index, entry) in entries.into_iter().enumerate() {
                    let position = EntryPosition::ListEntry { document, index };
                    let priority = entry_priority(&position, entry.priority, entry.criticality)?;
                    parsed
                        .objectives
                        .push((position, InferenceObjectiveConfig { name: entry.name, priority }));
                }
            }
            Document::Object(object) if object.kind.as_deref() == Some(LIST_KIND) => {
                if object.spec.is_some() {
                    return Err(field_not_in_kind(
                        EntryPosition::Object { document },
                        LIST_KIND,
                        "spec",
                    ));
                }
                for (index, item) in object.items.unwrap_or_default().into_iter().enumerate() {
                    add_object(EntryPosition::ListItem { document, index }, item, &mut parsed)?;
                }
            }
            Document::Object(object) => {
                add_object(EntryPosition::Object { document }, object, &mut parsed)?;
            }
        }
    }
    Ok(parsed)
}

/// The priority of a list entry: its `priority`, its `criticality`'s, or the default.
fn entry_priority(
    position: &EntryPosition,
    priority: Option<i32>,
    criticality: Option<String>,
) -> Result<i32, ObjectiveError> {
    match (priority, criticality) {
        (Some(_), Some(_)) => {
            Err(ObjectiveError::PriorityAndCriticality { entry: position.clone() })
        }
        (Some(priority), None) => Ok(priority),
        (None, Some(criticality)) => Ok(parse_criticality(position, criticality)?.priority()),
        (None, None) => Ok(super::DEFAULT_PRIORITY),
    }
}

fn parse_criticality(
    position: &EntryPosition,
    value: String,
) -> Result<Criticality, ObjectiveError> {
    Criticality::from_name(&value)
        .ok_or(ObjectiveError::UnknownCriticality { entry: position.clone(), value })
}

/// Adds one InferenceObjective or InferenceModel (not a List: Lists do not nest).
fn add_object(
    position: EntryPosition,
    object: KubeObject,
    parsed: &mut ParsedObjectives,
) -> Result<(), ObjectiveError> {
    let Some(kind) = object.kind else {
        return Err(ObjectiveError::MissingKind { entry: position });
    };
    let (groups, kind) = match kind.as_str() {
        INFERENCE_OBJECTIVE_KIND => (OBJECTIVE_API_GROUPS, INFERENCE_OBJECTIVE_KIND),
        INFERENCE_MODEL_KIND => (MODEL_API_GROUPS, INFERENCE_MODEL_KIND),
        _ => return Err(ObjectiveError::UnknownKind { entry: position, kind }),
    };
    let api_version = object.api_version.unwrap_or_default();
    let group = api_version.split_once('/').map_or("", |(group, _)| group);
    if !groups.contains(&group) {
        return Err(ObjectiveError::UnsupportedApiVersion {
            entry: position,
            kind,
            api_version,
            accepted_groups: groups.join(", "),
        });
    }
    if object.items.is_some() {
        return Err(field_not_in_kind(position, kind, "items"));
    }
    let spec = object.spec.unwrap_or_default();
    if kind == INFERENCE_OBJECTIVE_KIND {
        for (field, present) in [
            ("spec.criticality", spec.criticality.is_some()),
            ("spec.modelName", spec.model_name.is_some()),
            ("spec.targetModels", spec.target_models.is_some()),
        ] {
            if present {
                return Err(field_not_in_kind(position, kind, field));
            }
        }
        let priority = spec.priority.unwrap_or(super::DEFAULT_PRIORITY);
        let name = object.metadata.name;
        parsed.objectives.push((position, InferenceObjectiveConfig { name, priority }));
    } else {
        if spec.priority.is_some() {
            return Err(field_not_in_kind(position, kind, "spec.priority"));
        }
        let criticality = match spec.criticality {
            Some(value) => parse_criticality(&position, value)?,
            None => Criticality::Standard,
        };
        let model_name = spec.model_name.unwrap_or_default();
        parsed.models.push((position, LegacyModelConfig { model_name, criticality }));
    }
    Ok(())
}

fn field_not_in_kind(
    entry: EntryPosition,
    kind: &'static str,
    field: &'static str,
) -> ObjectiveError {
    ObjectiveError::FieldNotInKind { entry, kind, field }
}

/// One YAML document of an objectives file.
enum Document {
    /// A plain list of objectives.
    Entries(Vec<ListEntry>),
    /// A Kubernetes object.
    Object(KubeObject),
}

impl<'de> Deserialize<'de> for Document {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DocumentVisitor)
    }
}

struct DocumentVisitor;

impl<'de> Visitor<'de> for DocumentVisitor {
    type Value = Document;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(
            "a list of {name, priority} or a Kubernetes object \
             (InferenceObjective, InferenceModel, List)",
        )
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Document, A::Error> {
        Vec::deserialize(SeqAccessDeserializer::new(seq)).map(Document::Entries)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Document, A::Error> {
        KubeObject::deserialize(MapAccessDeserializer::new(map)).map(Document::Object)
    }
}

/// One entry of a plain list.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListEntry {
    name: String,
    priority: Option<i32>,
    criticality: Option<String>,
}

/// The fields of the Kubernetes objects read here, all kinds together; which belong to which
/// kind is checked after the kind is known, since YAML does not order `kind` before `spec`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KubeObject {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    metadata: ObjectMeta,
    spec: Option<ObjectSpec>,
    items: Option<Vec<KubeObject>>,
    /// Objects exported from a cluster carry their status; it says nothing about priority.
    #[serde(rename = "status")]
    _status: Option<IgnoredAny>,
}

/// Metadata other than the name (namespace, labels, annotations, ...) does not matter here.
#[derive(Default, Deserialize)]
struct ObjectMeta {
    #[serde(default)]
    name: String,
}

/// The spec fields of InferenceObjective (`priority`, `poolRef`) and of the legacy
/// InferenceModel (`modelName`, `criticality`, `targetModels`, `poolRef`).
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ObjectSpec {
    priority: Option<i32>,
    criticality: Option<String>,
    model_name: Option<String>,
    /// Weighted rewrite targets: the model-rewrite configuration, not priority.
    target_models: Option<IgnoredAny>,
    /// This picker serves one pool, so the reference is not checked.
    #[serde(rename = "poolRef")]
    _pool_ref: Option<IgnoredAny>,
}
