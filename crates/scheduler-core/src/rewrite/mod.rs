//! Model rewrites and traffic splits, in the shape of GIE's `InferenceModelRewrite`.
//!
//! A client names one model (`tweet-summary`); rules send it to other names the pool serves,
//! split by weight (`tweet-summary-v1` 90, `tweet-summary-v2` 10). Which rule applies follows
//! the API's precedence: a rule matching the model exactly beats a catch-all rule (one with no
//! `matches`); among rules of equal standing the oldest object wins (`creationTimestamp`, or
//! the order in the file), and within one object the first rule in list order.
//!
//! A target is drawn per request: from a counter through SplitMix64 (lock-free, and
//! reproducible from a seed), or, in sticky mode, from a hash of a header value, so that every
//! request of one session, on every replica, lands on the same target. A model no rule names
//! passes through unchanged, or is refused when the rewrites are strict.
//!
//! ```
//! use scheduler_core::rewrite::{ModelRewrites, ModelRoute};
//!
//! let rewrites = ModelRewrites::from_yaml(
//!     "kind: InferenceModelRewrite
//! metadata: {name: canary}
//! spec:
//!   rules:
//!   - matches: [{model: {value: tweet-summary}}]
//!     targets:
//!     - {modelRewrite: tweet-summary-v1, weight: 90}
//!     - {modelRewrite: tweet-summary-v2, weight: 10}
//! ",
//! )?
//! .with_seed(7);
//! let ModelRoute::Rewritten(rewrite) = rewrites.route("tweet-summary", None) else {
//!     panic!("the rule matches");
//! };
//! assert!(rewrite.target.starts_with("tweet-summary-v"));
//! assert_eq!(&*rewrite.rule_name, "canary");
//! assert!(matches!(rewrites.route("other-model", None), ModelRoute::Unchanged));
//! # Ok::<(), scheduler_core::rewrite::RewriteError>(())
//! ```

pub mod file;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use file::{MAX_TARGET_WEIGHT, RewriteDefinition, RewriteError, RuleDefinition};

use crate::hash::{FNV_OFFSET_BASIS, fnv1a, mix64, split_mix};
use crate::request::InferenceRequest;

/// One rule, ready to draw from.
#[derive(Debug)]
struct Rule {
    /// The object the rule came from (for metrics and logs).
    rule_name: Arc<str>,
    /// Target names with the running total of weights up to and including each.
    targets: Vec<(Arc<str>, u64)>,
}

impl Rule {
    fn total_weight(&self) -> u64 {
        self.targets.last().map_or(0, |(_, cumulative)| *cumulative)
    }

    /// The target at `point`, a uniform 64-bit value: scaled onto the total weight by a
    /// widening multiply (no modulo bias), then found among the running totals.
    fn target_at(&self, point: u64) -> &Arc<str> {
        let scaled = ((u128::from(point) * u128::from(self.total_weight())) >> 64) as u64;
        let index = self.targets.partition_point(|(_, cumulative)| *cumulative <= scaled);
        &self.targets[index.min(self.targets.len() - 1)].0
    }
}

/// What the rewrites say about a request's model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelRoute {
    /// No rule applies: the request goes on with the model it names.
    Unchanged,
    /// A rule applies: the request goes to `target`.
    Rewritten(AppliedRewrite),
    /// Strict rewrites, and the model is neither matched by a rule nor one of their targets.
    Unknown,
}

/// The rewrite chosen for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedRewrite {
    /// The `InferenceModelRewrite` (or legacy `InferenceModel`) the rule came from.
    pub rule_name: Arc<str>,
    /// The model the request is sent to.
    pub target: Arc<str>,
}

/// Every rewrite rule of a pool, indexed by the model names they match.
#[derive(Debug)]
pub struct ModelRewrites {
    rules: Vec<Rule>,
    /// Model name -> the rule of highest precedence matching it exactly.
    exact: HashMap<Box<str>, usize>,
    /// The catch-all rule of highest precedence.
    catch_all: Option<usize>,
    /// Every name a rule matches or targets (what strict mode serves).
    known: HashSet<Box<str>>,
    strict: bool,
    /// Header (lower-case) whose value pins a request's draw, if any.
    sticky_header: Option<String>,
    seed: u64,
    draws: AtomicU64,
}

impl ModelRewrites {
    /// Rewrites from definitions (see [`file::parse_definitions`] for reading them from YAML).
    pub fn new(mut definitions: Vec<RewriteDefinition>) -> Self {
        // Oldest first: objects with a creation time by that time (RFC 3339 in UTC, so text
        // order is time order), then those without, in file order.
        definitions.sort_by(|a, b| {
            (a.created.is_none(), &a.created, a.position).cmp(&(
                b.created.is_none(),
                &b.created,
                b.position,
            ))
        });
        let mut rewrites = Self {
            rules: Vec::new(),
            exact: HashMap::new(),
            catch_all: None,
            known: HashSet::new(),
            strict: false,
            sticky_header: None,
            seed: 0,
            draws: AtomicU64::new(0),
        };
        for definition in definitions {
            let rule_name: Arc<str> = definition.name.into();
            for rule in definition.rules {
                let index = rewrites.rules.len();
                let mut cumulative = 0u64;
                let targets = rule
                    .targets
                    .into_iter()
                    .map(|(name, weight)| {
                        cumulative += u64::from(weight);
                        rewrites.known.insert(name.as_str().into());
                        (Arc::from(name), cumulative)
                    })
                    .collect();
                rewrites.rules.push(Rule { rule_name: Arc::clone(&rule_name), targets });
                if rule.matches.is_empty() {
                    rewrites.catch_all.get_or_insert(index);
                }
                for model in rule.matches {
                    rewrites.known.insert(model.as_str().into());
                    rewrites.exact.entry(model.into()).or_insert(index);
                }
            }
        }
        rewrites
    }

    /// Reads `InferenceModelRewrite` (and legacy `InferenceModel`) objects from YAML: one
    /// object, `---`-separated documents, or a `kind: List`.
    pub fn from_yaml(text: &str) -> Result<Self, RewriteError> {
        file::parse_definitions(text).map(Self::new)
    }

    /// Draws targets from `seed` (same seed, same sequence of draws).
    pub fn with_seed(mut self, seed: u64) -> Self {
        // Spread the seed so that neighbouring seeds give unrelated sequences, not shifted ones.
        self.seed = split_mix(seed);
        self
    }

    /// Refuses models that no rule matches or targets ([`ModelRoute::Unknown`]), instead of
    /// passing them through.
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// Draws by the value of request header `name` where a request carries it (see
    /// [`Self::route`]'s `sticky_key`); requests without it are drawn at random.
    pub fn with_sticky_header(mut self, name: &str) -> Self {
        self.sticky_header = Some(name.to_ascii_lowercase());
        self
    }

    /// Where `request` goes, by its body's model (as the client named it) and, in sticky mode,
    /// the sticky header's value.
    pub fn route_request(&self, request: &InferenceRequest) -> ModelRoute {
        let sticky_key = self
            .sticky_header
            .as_deref()
            .and_then(|name| request.header(name))
            .filter(|value| !value.is_empty());
        self.route(&request.model, sticky_key)
    }

    /// Whether there is no rule at all.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// How many rules there are, over all objects.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Every model name a rule matches or targets, in no particular order (the names metrics
    /// should always give a series of their own).
    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        self.known.iter().map(|name| &**name)
    }

    /// Where a request for `model` goes. `sticky_key`, when given (a session id, a user id),
    /// picks the target by its hash instead of at random, so equal keys get equal targets.
    pub fn route(&self, model: &str, sticky_key: Option<&str>) -> ModelRoute {
        let rule = match self.exact.get(model).copied().or(self.catch_all) {
            Some(index) => &self.rules[index],
            None if self.strict && !self.known.contains(model) => return ModelRoute::Unknown,
            None => return ModelRoute::Unchanged,
        };
        let target = if rule.targets.len() == 1 {
            &rule.targets[0].0
        } else {
            let point = match sticky_key {
                Some(key) => mix64(fnv1a(FNV_OFFSET_BASIS, key.as_bytes())),
                None => split_mix(self.draws.fetch_add(1, Ordering::Relaxed) ^ self.seed),
            };
            rule.target_at(point)
        };
        ModelRoute::Rewritten(AppliedRewrite {
            rule_name: Arc::clone(&rule.rule_name),
            target: Arc::clone(target),
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn rewrites(yaml: &str) -> ModelRewrites {
        ModelRewrites::from_yaml(yaml).expect("valid rewrites")
    }

    fn target(route: ModelRoute) -> String {
        match route {
            ModelRoute::Rewritten(rewrite) => rewrite.target.to_string(),
            other => panic!("expected a rewrite, got {other:?}"),
        }
    }

    const CANARY: &str = "\
kind: InferenceModelRewrite
metadata: {name: canary}
spec:
  rules:
  - matches: [{model: {value: tweet-summary}}]
    targets:
    - {modelRewrite: tweet-summary-v1, weight: 90}
    - {modelRewrite: tweet-summary-v2, weight: 10}
";

    #[test]
    fn a_seeded_split_lands_within_one_point_of_its_weights() {
        for seed in [1, 2, 42] {
            let rewrites = rewrites(CANARY).with_seed(seed);
            let to_v2 = (0..10_000)
                .filter(|_| target(rewrites.route("tweet-summary", None)) == "tweet-summary-v2")
                .count();
            let share = to_v2 as f64 / 10_000.0;
            assert!((share - 0.10).abs() <= 0.01, "seed {seed}: v2 got {share}");
        }
    }

    #[test]
    fn the_same_seed_draws_the_same_sequence() {
        let draws = |seed| {
            let rewrites = rewrites(CANARY).with_seed(seed);
            (0..200).map(|_| target(rewrites.route("tweet-summary", None))).collect::<Vec<_>>()
        };
        assert_eq!(draws(5), draws(5));
        assert_ne!(draws(5), draws(6));
    }

    #[test]
    fn sticky_keys_stay_on_one_target_and_still_split() {
        let rewrites = rewrites(CANARY);
        let mut to_v2 = 0;
        for session in 0..10_000 {
            let key = format!("session-{session}");
            let first = target(rewrites.route("tweet-summary", Some(&key)));
            for _ in 0..3 {
                assert_eq!(target(rewrites.route("tweet-summary", Some(&key))), first);
            }
            to_v2 += usize::from(first == "tweet-summary-v2");
        }
        // Sessions, not requests, split by weight: the same bound holds over many keys.
        let share = to_v2 as f64 / 10_000.0;
        assert!((share - 0.10).abs() <= 0.01, "v2 got {share} of the sessions");
        // Another replica (a fresh instance, another seed) agrees on every key.
        let other = ModelRewrites::from_yaml(CANARY).unwrap().with_seed(99);
        for session in 0..100 {
            let key = format!("session-{session}");
            assert_eq!(
                target(rewrites.route("tweet-summary", Some(&key))),
                target(other.route("tweet-summary", Some(&key)))
            );
        }
    }

    #[test]
    fn the_sticky_header_pins_requests_that_carry_it() {
        let rewrites = rewrites(CANARY).with_sticky_header("X-Session-Id");
        let request = |session: Option<&str>| {
            let request = InferenceRequest::new("tweet-summary", "hi");
            match session {
                Some(session) => request.with_header("x-session-id", session),
                None => request,
            }
        };
        for session in ["a", "b", "c", "d"] {
            let first = target(rewrites.route_request(&request(Some(session))));
            assert!(
                (0..20).all(|_| target(rewrites.route_request(&request(Some(session)))) == first)
            );
        }
        let unpinned: HashSet<String> =
            (0..200).map(|_| target(rewrites.route_request(&request(None)))).collect();
        assert_eq!(unpinned.len(), 2, "without the header both targets are drawn");
    }

    #[test]
    fn precedence_exact_then_oldest_then_list_order() {
        let rewrites = rewrites(
            "kind: InferenceModelRewrite
metadata: {name: newer, creationTimestamp: '2025-06-01T00:00:00Z'}
spec:
  rules:
  - targets: [{modelRewrite: newer-fallback}]
  - matches: [{model: {value: a}}]
    targets: [{modelRewrite: a-from-newer}]
---
kind: InferenceModelRewrite
metadata: {name: older, creationTimestamp: '2025-01-01T00:00:00Z'}
spec:
  rules:
  - matches: [{model: {value: a}}, {model: {value: b}}]
    targets: [{modelRewrite: from-older}]
  - matches: [{model: {value: b}}]
    targets: [{modelRewrite: b-second-rule}]
  - targets: [{modelRewrite: older-fallback}]
---
kind: InferenceModelRewrite
metadata: {name: untimed}
spec:
  rules:
  - matches: [{model: {value: c}}]
    targets: [{modelRewrite: c-target}]
  - targets: [{modelRewrite: untimed-fallback}]
",
        );
        assert_eq!(target(rewrites.route("a", None)), "from-older", "the oldest exact rule");
        assert_eq!(target(rewrites.route("b", None)), "from-older", "first rule in list order");
        assert_eq!(target(rewrites.route("c", None)), "c-target", "exact beats any catch-all");
        assert_eq!(target(rewrites.route("zzz", None)), "older-fallback", "the oldest catch-all");
        let ModelRoute::Rewritten(applied) = rewrites.route("c", None) else { unreachable!() };
        assert_eq!(&*applied.rule_name, "untimed");
    }

    #[test]
    fn unknown_models_pass_through_or_are_refused_when_strict() {
        let open = rewrites(CANARY);
        assert_eq!(open.route("llama", None), ModelRoute::Unchanged);
        let strict = rewrites(CANARY).strict(true);
        assert_eq!(strict.route("llama", None), ModelRoute::Unknown);
        assert_eq!(strict.route("tweet-summary-v2", None), ModelRoute::Unchanged, "a target");
        assert!(matches!(strict.route("tweet-summary", None), ModelRoute::Rewritten(_)));
        let mut names: Vec<&str> = strict.model_names().collect();
        names.sort_unstable();
        assert_eq!(names, ["tweet-summary", "tweet-summary-v1", "tweet-summary-v2"]);
    }

    #[test]
    fn unweighted_targets_split_evenly() {
        let rewrites = rewrites(
            "kind: InferenceModelRewrite
metadata: {name: even}
spec:
  rules:
  - targets: [{modelRewrite: x}, {modelRewrite: y}, {modelRewrite: z}]
",
        );
        let mut counts = HashMap::new();
        for _ in 0..9_000 {
            *counts.entry(target(rewrites.route("anything", None))).or_insert(0) += 1;
        }
        for name in ["x", "y", "z"] {
            let count = counts[name];
            assert!((2_700..=3_300).contains(&count), "{name}: {count}");
        }
    }

    proptest! {
        /// Any split: the drawn target is always one of the rule's, and every target with
        /// weight gets drawn at some point.
        #[test]
        fn draws_stay_among_the_targets(
            weights in proptest::collection::vec(1u32..=MAX_TARGET_WEIGHT, 1..6),
            points in proptest::collection::vec(any::<u64>(), 1..50),
        ) {
            let targets: Vec<(String, u32)> =
                weights.iter().enumerate().map(|(i, w)| (format!("t{i}"), *w)).collect();
            let rewrites = ModelRewrites::new(vec![RewriteDefinition {
                name: "p".into(),
                created: None,
                position: 0,
                rules: vec![RuleDefinition { matches: vec!["m".into()], targets: targets.clone() }],
            }]);
            let rule = &rewrites.rules[0];
            for point in points.into_iter().chain([0, u64::MAX]) {
                let drawn = rule.target_at(point);
                prop_assert!(targets.iter().any(|(name, _)| **name == **drawn));
            }
            // Point 0 draws the first target, the top of the range the last.
            prop_assert_eq!(&**rule.target_at(0), "t0");
            let last = format!("t{}", weights.len() - 1);
            prop_assert_eq!(&**rule.target_at(u64::MAX), last.as_str());
        }
    }
}
