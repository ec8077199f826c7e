//! InferenceObjective resolution: the objective named by a request sets its priority.
//!
//! Objectives come from an objectives file (or the same YAML through the C ABI) in any of
//! these forms, mixed freely across YAML documents separated by `---`:
//! - a plain list of `{name, priority}`, or `{name, criticality}` with one of GIE's legacy
//!   criticalities (`Critical` = 1, `Standard` = 0, `Sheddable` = -1; see [`Criticality`]);
//! - `kind: InferenceObjective` objects (`inference.networking.x-k8s.io` or `llm-d.ai`):
//!   `metadata.name` is the name, `spec.priority` the priority (default 0); `spec.poolRef` is
//!   not checked, since this picker serves one pool;
//! - legacy `kind: InferenceModel` objects (`inference.networking.x-k8s.io/v1alpha2`):
//!   `spec.criticality` (default `Standard`) becomes the priority of requests for
//!   `spec.modelName` that name no objective; `spec.targetModels` is left to the model rewrite;
//! - `kind: List` with such objects as `items`.
//!
//! Resolution of a request, first match wins:
//! 1. it names an objective (`x-llm-d-inference-objective`, or the older
//!    `x-gateway-inference-objective`) that is configured: that objective's priority;
//! 2. it names a legacy criticality instead (`Critical`, `Standard`, `Sheddable`): its priority;
//! 3. it names anything else: [`DEFAULT_PRIORITY`], counted
//!    ([`FlowMetrics::unknown_objectives`]); the model's criticality is not consulted, since the
//!    client chose an objective;
//! 4. it names none, and its body's model is a legacy InferenceModel's `modelName`: that
//!    model's criticality's priority;
//! 5. otherwise [`DEFAULT_PRIORITY`].
//!
//! Each resolution is one hash lookup of a borrowed name (plus, for an unconfigured name, a
//! comparison with three short strings); nothing is allocated per request.

mod document;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

use crate::flow::metrics::FlowMetrics;
use crate::request::InferenceRequest;

/// Priority of requests without a (known) objective.
pub const DEFAULT_PRIORITY: i32 = 0;

/// One InferenceObjective: a name and the priority it grants.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InferenceObjectiveConfig {
    /// The name requests carry in `x-llm-d-inference-objective` (or
    /// `x-gateway-inference-objective`).
    pub name: String,
    /// Higher is more important; below zero is sheddable. Defaults to 0.
    #[serde(default)]
    pub priority: i32,
}

/// The criticality of GIE's legacy InferenceModel API (before InferenceObjective replaced it
/// with a numeric priority), spelled as that API spelled it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Criticality {
    /// Served first: priority 1.
    Critical,
    /// The default: priority 0.
    Standard,
    /// May be shed or queued while the pool is saturated: priority -1.
    Sheddable,
}

impl Criticality {
    /// Every criticality, most important first.
    pub const ALL: [Self; 3] = [Self::Critical, Self::Standard, Self::Sheddable];

    /// The accepted spellings, for error messages.
    const NAMES: &'static str = "Critical, Standard, Sheddable";

    /// The criticality spelled exactly `name` (`Critical`, `Standard` or `Sheddable`).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|criticality| criticality.name() == name)
    }

    /// The name as the InferenceModel API spells it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Critical => "Critical",
            Self::Standard => "Standard",
            Self::Sheddable => "Sheddable",
        }
    }

    /// The priority this criticality stands for; only [`Criticality::Sheddable`] is below zero.
    pub const fn priority(self) -> i32 {
        match self {
            Self::Critical => 1,
            Self::Standard => 0,
            Self::Sheddable => -1,
        }
    }
}

impl fmt::Display for Criticality {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// A legacy InferenceModel: requests for `model_name` that name no objective get the priority
/// of `criticality`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LegacyModelConfig {
    /// The model name as clients send it in the request body (`spec.modelName`).
    pub model_name: String,
    /// `spec.criticality`; `Standard` when the object gives none.
    pub criticality: Criticality,
}

/// Where in an objectives file an entry was given, for error messages. Documents (separated
/// by `---`) and entries are counted from 0; empty documents are not counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryPosition {
    /// Entry `index` of a plain list that is YAML document `document`.
    ListEntry {
        /// The YAML document.
        document: usize,
        /// Position in the list.
        index: usize,
    },
    /// A Kubernetes object that is YAML document `document`.
    Object {
        /// The YAML document.
        document: usize,
    },
    /// Item `index` of the `kind: List` that is YAML document `document`.
    ListItem {
        /// The YAML document.
        document: usize,
        /// Position in `items`.
        index: usize,
    },
}

impl fmt::Display for EntryPosition {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            // The common case, a single plain list, reads as it always has.
            Self::ListEntry { document: 0, index } => write!(formatter, "objectives[{index}]"),
            Self::ListEntry { document, index } => {
                write!(formatter, "documents[{document}][{index}]")
            }
            Self::Object { document } => write!(formatter, "documents[{document}]"),
            Self::ListItem { document, index } => {
                write!(formatter, "documents[{document}].items[{index}]")
            }
        }
    }
}

/// Why an objectives file was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ObjectiveError {
    /// Not valid YAML, or a document of the wrong shape (unknown key, wrong type).
    #[error("objectives are not valid: {0}")]
    Syntax(String),
    /// An objective or model without a name.
    #[error("{entry}: {field} is empty")]
    EmptyName {
        /// The entry.
        entry: EntryPosition,
        /// The field that should name it (`name`, `metadata.name`, `spec.modelName`).
        field: &'static str,
    },
    /// Two objectives with one name.
    #[error("{entry}: name '{name}' is already used by {first}")]
    Duplicate {
        /// The second entry.
        entry: EntryPosition,
        /// The first entry.
        first: EntryPosition,
        /// The name.
        name: String,
    },
    /// Two legacy InferenceModels for one model.
    #[error("{entry}: modelName '{model_name}' already has a criticality from {first}")]
    DuplicateModel {
        /// The second entry.
        entry: EntryPosition,
        /// The first entry.
        first: EntryPosition,
        /// The model name.
        model_name: String,
    },
    /// A list entry with both `priority` and `criticality`.
    #[error("{entry}: sets both priority and criticality; give one")]
    PriorityAndCriticality {
        /// The entry.
        entry: EntryPosition,
    },
    /// A criticality that is none of the legacy values.
    #[error("{entry}: criticality '{value}' is not one of {}", Criticality::NAMES)]
    UnknownCriticality {
        /// The entry.
        entry: EntryPosition,
        /// The value given.
        value: String,
    },
    /// A mapping without `kind`, so not a Kubernetes object.
    #[error(
        "{entry}: has no kind; expected a list of {{name, priority}} or an InferenceObjective, \
         InferenceModel or List"
    )]
    MissingKind {
        /// The entry.
        entry: EntryPosition,
    },
    /// A Kubernetes object of a kind that carries no objectives.
    #[error("{entry}: kind '{kind}' is not InferenceObjective, InferenceModel or a List of them")]
    UnknownKind {
        /// The entry.
        entry: EntryPosition,
        /// The kind given.
        kind: String,
    },
    /// A known kind from an API group that does not serve it.
    #[error("{entry}: {kind} apiVersion '{api_version}' is not in API group {accepted_groups}")]
    UnsupportedApiVersion {
        /// The entry.
        entry: EntryPosition,
        /// The kind.
        kind: &'static str,
        /// The apiVersion given (empty when missing).
        api_version: String,
        /// The groups accepted for the kind, comma-separated.
        accepted_groups: String,
    },
    /// A field of one kind given in an object of another (such as `spec.priority` in an
    /// InferenceModel, which has `spec.criticality` instead).
    #[error("{entry}: {field} is not a field of {kind}")]
    FieldNotInKind {
        /// The entry.
        entry: EntryPosition,
        /// The object's kind.
        kind: &'static str,
        /// The field, as a path in the object.
        field: &'static str,
    },
}

/// Maps objective names, and the model names of legacy InferenceModels, to priorities.
///
/// Clones share one table, which [`ObjectiveResolver::replace_with`] swaps whole (objectives
/// watched on Kubernetes change while requests flow; each request reads one table).
#[derive(Clone, Debug)]
pub struct ObjectiveResolver {
    priorities: Arc<arc_swap::ArcSwap<Priorities>>,
    metrics: Arc<FlowMetrics>,
}

#[derive(Debug, Default)]
struct Priorities {
    objectives: HashMap<String, i32>,
    models: HashMap<String, i32>,
}

impl ObjectiveResolver {
    /// A resolver over `objectives`, counting unknown names into `metrics`.
    pub fn new(
        objectives: impl IntoIterator<Item = InferenceObjectiveConfig>,
        metrics: Arc<FlowMetrics>,
    ) -> Result<Self, ObjectiveError> {
        let objectives = objectives
            .into_iter()
            .enumerate()
            .map(|(index, objective)| (EntryPosition::ListEntry { document: 0, index }, objective))
            .collect();
        Self::build(document::ParsedObjectives { objectives, models: Vec::new() }, metrics)
    }

    /// Parses an objectives file: YAML (or JSON) in any of the forms of the module doc.
    pub fn from_yaml(text: &str, metrics: Arc<FlowMetrics>) -> Result<Self, ObjectiveError> {
        Self::build(document::parse(text)?, metrics)
    }

    fn build(
        parsed: document::ParsedObjectives,
        metrics: Arc<FlowMetrics>,
    ) -> Result<Self, ObjectiveError> {
        let mut objectives: HashMap<String, (EntryPosition, i32)> = HashMap::new();
        for (entry, objective) in parsed.objectives {
            if objective.name.is_empty() {
                let field = match entry {
                    EntryPosition::ListEntry { .. } => "name",
                    EntryPosition::Object { .. } | EntryPosition::ListItem { .. } => {
                        "metadata.name"
                    }
                };
                return Err(ObjectiveError::EmptyName { entry, field });
            }
            match objectives.entry(objective.name) {
                Entry::Occupied(occupied) => {
                    return Err(ObjectiveError::Duplicate {
                        entry,
                        first: occupied.get().0.clone(),
                        name: occupied.remove_entry().0,
                    });
                }
                Entry::Vacant(vacant) => {
                    vacant.insert((entry, objective.priority));
                }
            }
        }
        let mut models: HashMap<String, (EntryPosition, i32)> = HashMap::new();
        for (entry, model) in parsed.models {
            if model.model_name.is_empty() {
                return Err(ObjectiveError::EmptyName { entry, field: "spec.modelName" });
            }
            match models.entry(model.model_name) {
                Entry::Occupied(occupied) => {
                    return Err(ObjectiveError::DuplicateModel {
                        entry,
                        first: occupied.get().0.clone(),
                        model_name: occupied.remove_entry().0,
                    });
                }
                Entry::Vacant(vacant) => {
                    vacant.insert((entry, model.criticality.priority()));
                }
            }
        }
        let priorities_only = |map: HashMap<String, (EntryPosition, i32)>| {
            map.into_iter().map(|(name, (_, priority))| (name, priority)).collect()
        };
        let priorities =
            Priorities { objectives: priorities_only(objectives), models: priorities_only(models) };
        Ok(Self { priorities: Arc::new(arc_swap::ArcSwap::from_pointee(priorities)), metrics })
    }

    /// Makes this resolver (and its clones) resolve as `other` does from now on; requests
    /// already resolved keep their priority.
    pub fn replace_with(&self, other: &ObjectiveResolver) {
        self.priorities.store(other.priorities.load_full());
    }

    /// The priority of objective `name`, if configured.
    pub fn priority_of(&self, name: &str) -> Option<i32> {
        self.priorities.load().objectives.get(name).copied()
    }

    /// The priority a legacy InferenceModel gives requests for `model` that name no objective,
    /// if one is configured for it.
    pub fn priority_of_model(&self, model: &str) -> Option<i32> {
        self.priorities.load().models.get(model).copied()
    }

    /// The priority `request` is entitled to by its objective, or failing that by its model
    /// (see the module doc for the order); unknown objectives get [`DEFAULT_PRIORITY`] and are
    /// counted.
    pub fn resolve(&self, request: &InferenceRequest) -> i32 {
        let Some(name) = request.objective.as_deref() else {
            return self.priority_of_model(&request.model).unwrap_or(DEFAULT_PRIORITY);
        };
        if let Some(priority) = self.priority_of(name) {
            return priority;
        }
        match Criticality::from_name(name) {
            Some(criticality) => criticality.priority(),
            None => {
                self.metrics.record_unknown_objective();
                DEFAULT_PRIORITY
            }
        }
    }

    /// Resolves and stores the priority in `request.priority`; returns it.
    pub fn apply(&self, request: &mut InferenceRequest) -> i32 {
        request.priority = self.resolve(request);
        request.priority
    }

    /// The metrics unknown objectives are counted into.
    pub fn metrics(&self) -> &Arc<FlowMetrics> {
        &self.metrics
    }

    /// How many objectives are configured.
    pub fn len(&self) -> usize {
        self.priorities.load().objectives.len()
    }

    /// Whether no objective is configured.
    pub fn is_empty(&self) -> bool {
        self.priorities.load().objectives.is_empty()
    }

    /// How many models have a priority from a legacy InferenceModel.
    pub fn model_count(&self) -> usize {
        self.priorities.load().models.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolver() -> (ObjectiveResolver, Arc<FlowMetrics>) {
        let metrics = Arc::new(FlowMetrics::new());
        let yaml =
            "- name: premium\n  priority: 10\n- name: batch\n  priority: -1\n- name: plain\n";
        (ObjectiveResolver::from_yaml(yaml, Arc::clone(&metrics)).expect("valid"), metrics)
    }

    fn request(objective: Option<&str>) -> InferenceRequest {
        let mut request = InferenceRequest::new("m", "p");
        request.objective = objective.map(str::to_owned);
        request
    }

    #[test]
    fn replacing_changes_every_clone_at_once() {
        let (resolver, metrics) = resolver();
        let clone = resolver.clone();
        let next =
            ObjectiveResolver::from_yaml("- name: premium\n  priority: 3\n", metrics).unwrap();
        resolver.replace_with(&next);
        assert_eq!(clone.resolve(&request(Some("premium"))), 3);
        assert_eq!(clone.priority_of("batch"), None, "objectives gone from the new table are gone");
        assert_eq!(clone.len(), 1);
    }

    #[test]
    fn known_objectives_map_to_their_priority() {
        let (resolver, metrics) = resolver();
        assert_eq!(resolver.resolve(&request(Some("premium"))), 10);
        assert_eq!(resolver.resolve(&request(Some("batch"))), -1);
        assert_eq!(resolver.resolve(&request(Some("plain"))), 0);
        assert_eq!(resolver.resolve(&request(None)), 0);
        assert_eq!(metrics.unknown_objectives(), 0);
        let mut batch = request(Some("batch"));
        assert_eq!(resolver.apply(&mut batch), -1);
        assert!(batch.is_sheddable());
    }

    #[test]
    fn unknown_objectives_get_the_default_and_are_counted() {
        let (resolver, metrics) = resolver();
        assert_eq!(resolver.resolve(&request(Some("gold"))), DEFAULT_PRIORITY);
        assert_eq!(
            resolver.resolve(&request(Some("Premium"))),
            DEFAULT_PRIORITY,
            "names are exact"
        );
        assert_eq!(metrics.unknown_objectives(), 2);
    }

    #[test]
    fn bad_lists_are_refused_with_the_offender_named() {
        let metrics = Arc::new(FlowMetrics::new());
        let error = ObjectiveResolver::from_yaml("- name: a\n  priorty: 1\n", Arc::clone(&metrics))
            .expect_err("must fail");
        assert!(error.to_string().contains("priorty"), "{error}");
        let duplicate = "- name: a\n- name: b\n- name: a\n  priority: 2\n";
        let error =
            ObjectiveResolver::from_yaml(duplicate, Arc::clone(&metrics)).expect_err("must fail");
        assert_eq!(
            error,
            ObjectiveError::Duplicate {
                entry: EntryPosition::ListEntry { document: 0, index: 2 },
                first: EntryPosition::ListEntry { document: 0, index: 0 },
                name: "a".into(),
            }
        );
        assert_eq!(error.to_string(), "objectives[2]: name 'a' is already used by objectives[0]");
        let error = ObjectiveResolver::from_yaml("- name: ''\n", metrics).expect_err("must fail");
        assert_eq!(error.to_string(), "objectives[0]: name is empty");
    }

    fn parse(yaml: &str) -> ObjectiveResolver {
        ObjectiveResolver::from_yaml(yaml, Arc::new(FlowMetrics::new()))
            .unwrap_or_else(|error| panic!("{yaml}\n=> {error}"))
    }

    fn refuse(yaml: &str) -> ObjectiveError {
        match ObjectiveResolver::from_yaml(yaml, Arc::new(FlowMetrics::new())) {
            Ok(resolver) => panic!("{yaml}\n=> accepted: {resolver:?}"),
            Err(error) => error,
        }
    }

    fn model_request(model: &str, objective: Option<&str>) -> InferenceRequest {
        let mut request = InferenceRequest::new(model, "p");
        request.objective = objective.map(str::to_owned);
        request
    }

    #[test]
    fn criticalities_map_to_priorities_around_zero() {
        let resolver = parse(
            "- {name: a, criticality: Critical}\n\
             - {name: b, criticality: Standard}\n\
             - {name: c, criticality: Sheddable}\n",
        );
        assert_eq!(resolver.priority_of("a"), Some(1));
        assert_eq!(resolver.priority_of("b"), Some(0));
        assert_eq!(resolver.priority_of("c"), Some(-1));
        for criticality in Criticality::ALL {
            assert_eq!(Criticality::from_name(criticality.name()), Some(criticality));
            assert_eq!(criticality.to_string(), criticality.name());
        }
        assert_eq!(Criticality::from_name("critical"), None, "spelling is exact");
        let mut shed = request(Some("c"));
        resolver.apply(&mut shed);
        assert!(shed.is_sheddable());
    }

    #[test]
    fn criticality_errors_name_the_entry_and_the_accepted_values() {
        let error =
            refuse("- {name: a, priority: 3}\n- {name: b, priority: 1, criticality: Critical}\n");
        assert_eq!(
            error,
            ObjectiveError::PriorityAndCriticality {
                entry: EntryPosition::ListEntry { document: 0, index: 1 }
            }
        );
        assert_eq!(
            error.to_string(),
            "objectives[1]: sets both priority and criticality; give one"
        );
        let error = refuse("- {name: a, criticality: Urgent}\n");
        assert_eq!(
            error.to_string(),
            "objectives[0]: criticality 'Urgent' is not one of Critical, Standard, Sheddable"
        );
        let error = refuse(
            "kind: InferenceModel\napiVersion: inference.networking.x-k8s.io/v1alpha2\n\
             metadata: {name: m}\nspec: {modelName: m, criticality: sheddable}\n",
        );
        assert_eq!(
            error,
            ObjectiveError::UnknownCriticality {
                entry: EntryPosition::Object { document: 0 },
                value: "sheddable".into()
            }
        );
    }

    const PREMIUM_OBJECTIVE: &str = "\
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata:
  name: premium
  namespace: default
  labels: {team: search}
spec:
  priority: 10
  poolRef:
    name: vllm-llama3-8b-instruct
";

    #[test]
    fn a_single_inference_objective_object() {
        let resolver = parse(PREMIUM_OBJECTIVE);
        assert_eq!(resolver.len(), 1);
        assert_eq!(resolver.resolve(&request(Some("premium"))), 10);
        let without_priority = parse(
            "apiVersion: llm-d.ai/v1alpha1\nkind: InferenceObjective\nmetadata: {name: plain}\n\
             spec: {poolRef: {name: pool}}\nstatus: {conditions: []}\n",
        );
        assert_eq!(without_priority.priority_of("plain"), Some(DEFAULT_PRIORITY));
    }

    #[test]
    fn several_documents_mix_lists_and_objects() {
        let yaml = format!(
            "- {{name: chat, criticality: Critical}}\n---\n{PREMIUM_OBJECTIVE}---\n\
             apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModel\n\
             metadata: {{name: tweets}}\n\
             spec:\n  modelName: tweet-summary\n  criticality: Sheddable\n  poolRef: {{name: p}}\n\
             \x20 targetModels:\n  - {{name: tweet-summary-v1, weight: 50}}\n\
             \x20 - {{name: tweet-summary-v2, weight: 50}}\n"
        );
        let resolver = parse(&yaml);
        assert_eq!(resolver.priority_of("chat"), Some(1));
        assert_eq!(resolver.priority_of("premium"), Some(10));
        assert_eq!(resolver.priority_of("tweets"), None, "an InferenceModel is not an objective");
        assert_eq!(resolver.priority_of_model("tweet-summary"), Some(-1));
        assert_eq!((resolver.len(), resolver.model_count()), (2, 1));
    }

    #[test]
    fn a_kubernetes_list_of_objects() {
        let resolver = parse(
            "apiVersion: v1\nkind: List\nmetadata: {}\nitems:\n\
             - apiVersion: inference.networking.x-k8s.io/v1alpha2\n  kind: InferenceObjective\n\
             \x20 metadata: {name: batch}\n  spec: {priority: -5}\n\
             - apiVersion: inference.networking.x-k8s.io/v1alpha2\n  kind: InferenceModel\n\
             \x20 metadata: {name: llama}\n  spec: {modelName: llama-3}\n",
        );
        assert_eq!(resolver.priority_of("batch"), Some(-5));
        assert_eq!(resolver.priority_of_model("llama-3"), Some(Criticality::Standard.priority()));
        let empty = parse("apiVersion: v1\nkind: List\nitems: []\n");
        assert!(empty.is_empty());
    }

    #[test]
    fn object_errors_name_the_document_and_the_offender() {
        let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: vllm}\n";
        let error = refuse(&format!("{PREMIUM_OBJECTIVE}---\n{deployment}"));
        assert_eq!(
            error,
            ObjectiveError::UnknownKind {
                entry: EntryPosition::Object { document: 1 },
                kind: "Deployment".into()
            }
        );
        assert!(error.to_string().starts_with("documents[1]: kind 'Deployment'"), "{error}");
        let error = refuse("kind: List\nitems:\n- {kind: List}\n- {kind: Deployment}\n");
        assert_eq!(
            error.to_string(),
            "documents[0].items[0]: kind 'List' is not InferenceObjective, InferenceModel or a \
             List of them"
        );
        let error = refuse("apiVersion: apps/v1\nkind: InferenceObjective\nmetadata: {name: a}\n");
        assert_eq!(
            error.to_string(),
            "documents[0]: InferenceObjective apiVersion 'apps/v1' is not in API group \
             inference.networking.x-k8s.io, llm-d.ai"
        );
        let error =
            refuse("apiVersion: llm-d.ai/v1alpha1\nkind: InferenceModel\nspec: {modelName: m}\n");
        assert!(matches!(error, ObjectiveError::UnsupportedApiVersion { .. }), "{error}");
        let legacy = "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModel\n";
        let error = refuse(&format!("{legacy}spec: {{modelName: m, priority: 2}}\n"));
        assert_eq!(
            error.to_string(),
            "documents[0]: spec.priority is not a field of InferenceModel"
        );
        let error = refuse(&format!("{legacy}spec: {{criticality: Critical}}\n"));
        assert_eq!(error.to_string(), "documents[0]: spec.modelName is empty");
        let error = refuse(
            "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n\
             spec: {priority: 1}\n",
        );
        assert_eq!(error.to_string(), "documents[0]: metadata.name is empty");
        let error = refuse(&format!(
            "{legacy}spec: {{modelName: m}}\n---\n{legacy}spec: {{modelName: m, criticality: Critical}}\n"
        ));
        assert_eq!(
            error.to_string(),
            "documents[1]: modelName 'm' already has a criticality from documents[0]"
        );
        let error = refuse(&format!("- {{name: premium}}\n---\n{PREMIUM_OBJECTIVE}"));
        assert_eq!(
            error.to_string(),
            "documents[1]: name 'premium' is already used by objectives[0]"
        );
        let error = refuse("metadata: {name: a}\nspec: {priority: 1}\n");
        assert!(matches!(error, ObjectiveError::MissingKind { .. }), "{error}");
        let error = refuse(&PREMIUM_OBJECTIVE.replace("priority: 10", "priorty: 10"));
        assert!(error.to_string().contains("priorty"), "{error}");
    }

    #[test]
    fn a_legacy_model_criticality_applies_only_without_an_objective_header() {
        let metrics = Arc::new(FlowMetrics::new());
        let resolver = ObjectiveResolver::from_yaml(
            "- {name: premium, priority: 10}\n---\n\
             apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModel\n\
             metadata: {name: tweets}\nspec: {modelName: tweet-summary, criticality: Sheddable}\n",
            Arc::clone(&metrics),
        )
        .expect("valid");
        assert_eq!(resolver.resolve(&model_request("tweet-summary", None)), -1);
        assert_eq!(resolver.resolve(&model_request("other-model", None)), DEFAULT_PRIORITY);
        assert_eq!(resolver.resolve(&model_request("tweet-summary", Some("premium"))), 10);
        assert_eq!(resolver.resolve(&model_request("tweet-summary", Some("Critical"))), 1);
        assert_eq!(
            resolver.resolve(&model_request("tweet-summary", Some("gold"))),
            DEFAULT_PRIORITY,
            "a header naming an unknown objective still wins over the model"
        );
        assert_eq!(metrics.unknown_objectives(), 1);
        let mut rewritten = model_request("tweet-summary", None);
        rewritten.target_model = "tweet-summary-v2".into();
        assert_eq!(resolver.resolve(&rewritten), -1, "the client's model, not the rewrite");
    }

    #[test]
    fn a_criticality_in_the_header_is_a_priority_unless_configured_as_a_name() {
        let metrics = Arc::new(FlowMetrics::new());
        let resolver =
            ObjectiveResolver::from_yaml("- {name: Standard, priority: 7}\n", Arc::clone(&metrics))
                .expect("valid");
        assert_eq!(resolver.resolve(&request(Some("Critical"))), 1);
        assert_eq!(resolver.resolve(&request(Some("Sheddable"))), -1);
        assert_eq!(resolver.resolve(&request(Some("Standard"))), 7, "the configured name wins");
        assert_eq!(metrics.unknown_objectives(), 0, "criticalities are not unknown names");
        assert_eq!(resolver.resolve(&request(Some("sheddable"))), DEFAULT_PRIORITY);
        assert_eq!(metrics.unknown_objectives(), 1);
    }

    #[test]
    fn empty_input_configures_nothing() {
        for yaml in ["", "[]\n", "---\n"] {
            let resolver = parse(yaml);
            assert!(resolver.is_empty() && resolver.model_count() == 0, "{yaml:?}");
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// Names drawn from a small set so headers and models often hit configured entries,
        /// including the criticality spellings, right and wrong case. Never empty: empty names
        /// are refused, which is tested above.
        fn name() -> impl Strategy<Value = String> {
            prop_oneof![
                prop::sample::select(vec![
                    "a",
                    "b",
                    "m",
                    "Critical",
                    "Standard",
                    "Sheddable",
                    "sheddable"
                ])
                .prop_map(str::to_owned),
                "[a-zA-Z0-9_-]{1,6}",
            ]
        }

        #[derive(Clone, Debug)]
        enum Level {
            Priority(i32),
            Criticality(Criticality),
            Neither,
        }

        fn level() -> impl Strategy<Value = Level> {
            prop_oneof![
                (-3..=3i32).prop_map(Level::Priority),
                prop::sample::select(Criticality::ALL.to_vec()).prop_map(Level::Criticality),
                Just(Level::Neither),
            ]
        }

        fn entry_yaml(name: &str, level: &Level) -> String {
            match level {
                Level::Priority(priority) => {
                    format!("- {{name: '{name}', priority: {priority}}}\n")
                }
                Level::Criticality(c) => format!("- {{name: '{name}', criticality: {c}}}\n"),
                Level::Neither => format!("- {{name: '{name}'}}\n"),
            }
        }

        fn model_yaml(model: &str, criticality: Option<Criticality>) -> String {
            let criticality =
                criticality.map(|c| format!(", criticality: {c}")).unwrap_or_default();
            format!(
                "---\napiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModel\n\
                 spec: {{modelName: '{model}'{criticality}}}\n"
            )
        }

        proptest! {
            #[test]
            fn resolution_never_panics_and_sheds_only_what_was_configured_sheddable(
                entries in prop::collection::vec((name(), level()), 0..6),
                models in prop::collection::vec(
                    (name(), prop::option::of(prop::sample::select(Criticality::ALL.to_vec()))),
                    0..4,
                ),
                requests in prop::collection::vec((name(), prop::option::of(name())), 1..8),
            ) {
                let mut yaml = String::new();
                if !entries.is_empty() {
                    for (name, level) in &entries {
                        yaml.push_str(&entry_yaml(name, level));
                    }
                }
                for (model, criticality) in &models {
                    yaml.push_str(&model_yaml(model, *criticality));
                }
                // Files naming one objective or model twice are refused, as tested above.
                let Ok(resolver) = ObjectiveResolver::from_yaml(&yaml, Arc::new(FlowMetrics::new()))
                else {
                    return Ok(());
                };
                let configured_sheddable = |name: &str| {
                    entries.iter().any(|(entry, level)| {
                        entry == name
                            && match level {
                                Level::Priority(priority) => *priority < 0,
                                Level::Criticality(c) => *c == Criticality::Sheddable,
                                Level::Neither => false,
                            }
                    })
                };
                for (model, objective) in &requests {
                    let priority = resolver.resolve(&model_request(model, objective.as_deref()));
                    if priority >= 0 {
                        continue;
                    }
                    let explained = match objective {
                        Some(name) => {
                            configured_sheddable(name)
                                || (resolver.priority_of(name).is_none() && name == "Sheddable")
                        }
                        None => models.iter().any(|(configured, criticality)| {
                            configured == model && *criticality == Some(Criticality::Sheddable)
                        }),
                    };
                    prop_assert!(
                        explained,
                        "{model:?} / {objective:?} got {priority} from\n{yaml}"
                    );
                }
            }
        }
    }
}
