//! InferenceObjective resolution: the objective named by a request sets its priority.
//!
//! Objectives come from config as a list of `{name, priority}`. A request naming a known
//! objective gets its priority; one naming an unknown objective gets the default priority 0
//! and is counted ([`FlowMetrics::unknown_objectives`]); one naming none gets 0 too. Lookup is
//! one hash of the name.

use std::collections::HashMap;
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
    /// The name requests carry in `x-gateway-inference-objective`.
    pub name: String,
    /// Higher is more important; below zero is sheddable. Defaults to 0.
    #[serde(default)]
    pub priority: i32,
}

/// Why an objective list was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ObjectiveError {
    /// Not a valid list of `{name, priority}` (unknown key, wrong type, bad YAML).
    #[error("objectives are not a valid list of {{name, priority}}: {0}")]
    Syntax(String),
    /// An objective without a name.
    #[error("objectives[{index}]: name is empty")]
    EmptyName {
        /// Position in the list.
        index: usize,
    },
    /// Two objectives with one name.
    #[error("objectives[{index}]: name '{name}' is already used by objectives[{first}]")]
    Duplicate {
        /// Position of the second.
        index: usize,
        /// Position of the first.
        first: usize,
        /// The name.
        name: String,
    },
}

/// Maps objective names to priorities.
#[derive(Clone, Debug)]
pub struct ObjectiveResolver {
    priorities: HashMap<String, (usize, i32)>,
    metrics: Arc<FlowMetrics>,
}

impl ObjectiveResolver {
    /// A resolver over `objectives`, counting unknown names into `metrics`.
    pub fn new(
        objectives: impl IntoIterator<Item = InferenceObjectiveConfig>,
        metrics: Arc<FlowMetrics>,
    ) -> Result<Self, ObjectiveError> {
        let mut priorities = HashMap::new();
        for (index, objective) in objectives.into_iter().enumerate() {
            if objective.name.is_empty() {
                return Err(ObjectiveError::EmptyName { index });
            }
            if let Some((first, _)) = priorities.get(&objective.name) {
                return Err(ObjectiveError::Duplicate {
                    index,
                    first: *first,
                    name: objective.name,
                });
            }
            priorities.insert(objective.name, (index, objective.priority));
        }
        Ok(Self { priorities, metrics })
    }

    /// Parses a YAML (or JSON) list of objectives.
    pub fn from_yaml(text: &str, metrics: Arc<FlowMetrics>) -> Result<Self, ObjectiveError> {
        let objectives: Vec<InferenceObjectiveConfig> = serde_saphyr::from_str(text)
            .map_err(|error| ObjectiveError::Syntax(error.to_string()))?;
        Self::new(objectives, metrics)
    }

    /// The priority of objective `name`, if configured.
    pub fn priority_of(&self, name: &str) -> Option<i32> {
        self.priorities.get(name).map(|(_, priority)| *priority)
    }

    /// The priority `request` is entitled to by its objective; unknown objectives get
    /// [`DEFAULT_PRIORITY`] and are counted.
    pub fn resolve(&self, request: &InferenceRequest) -> i32 {
        let Some(name) = request.objective.as_deref() else {
            return DEFAULT_PRIORITY;
        };
        match self.priority_of(name) {
            Some(priority) => priority,
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
        self.priorities.len()
    }

    /// Whether none is configured.
    pub fn is_empty(&self) -> bool {
        self.priorities.is_empty()
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
        assert_eq!(error, ObjectiveError::Duplicate { index: 2, first: 0, name: "a".into() });
        let error = ObjectiveResolver::from_yaml("- name: ''\n", metrics).expect_err("must fail");
        assert_eq!(error.to_string(), "objectives[0]: name is empty");
    }
}
