//! `disaggregatedset-rollout-screener` (experimental): keeps prefill and decode endpoints of
//! different `DisaggregatedSet` revisions from serving one request during a rollout.
//!
//! Matches llm-d-router's `requestcontrol/screener/disaggregatedsetrollout`. It is a screener:
//! it narrows the candidates once per request, before any profile runs, so the decode and
//! prefill profiles of one request see the same set and cannot pick different revisions.
//!
//! Revision gating (`revisionGating.mode` `sum` or `max-role`): the endpoints matching
//! `scope.labelSelector` that carry both a revision label (`revisionLabelKey`, default
//! `disaggregatedset.x-k8s.io/revision`) and a role label (`roleLabelKey`, default
//! `disaggregatedset.x-k8s.io/role`) are counted per revision and role. A revision is covered
//! when every role of `requireRoles.values` has an endpoint. Each covered revision weighs:
//! - `sum`: its endpoints over all required roles;
//! - `max-role`: its endpoints of the dominant role, the required role with the most endpoints
//!   over all covered revisions (ties go to the role listed first).
//!
//! Per request, candidates of uncovered revisions (or with no revision label) are dropped;
//! then, unless a `strict` header selector's header is present, one covered revision among
//! the candidates' is drawn with probability proportional to its weight (revisions in name
//! order, the draw from the decision's seeded randomness) and only its candidates stay. No
//! covered revision fails the request (503), as does a pool not yet observed.
//! `disabled` skips all of this.
//!
//! Header selectors (`headerSelectors[]`: `name`, `headerName`, `labelKey`, `mode`): a
//! `strict` selector whose header is present keeps only the candidates whose `labelKey` label
//! equals it, and none matching fails the request; a `prefer` selector leaves candidates alone
//! (pair it with a `header-label-affinity-scorer`). Every selector stamps its header on the
//! response with the chosen endpoint's `labelKey` label, whatever the gating mode.
//!
//! The counts are kept by the screener's pod extractor (llm-d-router's
//! `disaggregatedset-rollout-pod-extractor`, which Go attaches to the Kubernetes Pod
//! notification source and does not register as a plugin a config can declare). Here the
//! extractor observes the pool: endpoints are Ready pods, and the counts are rebuilt whenever
//! the pool's membership changes (and from the first pool a request sees).
//!
//! Differences from Go: Go counts every Ready pod in scope, including pods outside this pool
//! (a second EPP's); here only the pool's endpoints are seen, which is the same set when one
//! picker serves both roles. The response header is stamped from the scheduled primary
//! endpoint (Go: the endpoint the proxy reports serving). The
//! `disaggregatedset_strict_header_no_match_total` and `revision_gating_share` metrics are not
//! exported. Label selectors support `key`, `!key`, `key=value`, `key==value`, `key!=value`,
//! `key in (a,b)` and `key notin (a,b)`, not Go's numeric `<`/`>` forms.

use std::collections::{BTreeMap, HashMap};

use parking_lot::RwLock;
use rand::Rng;
use scheduler_core::{
    CycleState, InferenceRequest, PluginError, PoolObserver, PoolSnapshot, ResponseHeaders,
    SchedulingResult, Screener,
};
use serde::Deserialize;

/// llm-d type name of the screener.
pub const TYPE_NAME: &str = "disaggregatedset-rollout-screener";
/// llm-d type name of the screener's pod extractor (not declarable, as in Go).
pub const POD_EXTRACTOR_TYPE_NAME: &str = "disaggregatedset-rollout-pod-extractor";
/// Default `revisionGating.revisionLabelKey`.
pub const DEFAULT_REVISION_LABEL: &str = "disaggregatedset.x-k8s.io/revision";
/// Default `revisionGating.roleLabelKey`.
pub const DEFAULT_ROLE_LABEL: &str = "disaggregatedset.x-k8s.io/role";

/// Parameters of the screener (llm-d-router's names).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RolloutParameters {
    /// `scope`: which endpoints count towards revision coverage.
    #[serde(default)]
    pub scope: Scope,
    /// `headerSelectors`: header-to-label mappings.
    #[serde(default)]
    pub header_selectors: Vec<HeaderSelector>,
    /// `revisionGating` (required).
    pub revision_gating: Option<RevisionGating>,
}

/// `scope`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Scope {
    /// `labelSelector` (required): a Kubernetes label selector string.
    #[serde(default)]
    pub label_selector: String,
}

/// One `headerSelectors` entry.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderSelector {
    /// `name`: the selector's identifier.
    #[serde(default)]
    pub name: String,
    /// `headerName`: request and response header (compared lowercased).
    #[serde(default)]
    pub header_name: String,
    /// `labelKey`: the endpoint label compared and stamped.
    #[serde(default)]
    pub label_key: String,
    /// `mode`: `strict` or `prefer`.
    #[serde(default)]
    pub mode: String,
}

/// `revisionGating`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RevisionGating {
    /// `revisionLabelKey` (empty: the default).
    #[serde(default)]
    pub revision_label_key: String,
    /// `roleLabelKey` (empty: the default).
    #[serde(default)]
    pub role_label_key: String,
    /// `mode`: `sum`, `max-role` or `disabled`.
    #[serde(default)]
    pub mode: String,
    /// `requireRoles` (required for `sum` and `max-role`).
    pub require_roles: Option<RequireRoles>,
}

/// `requireRoles`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RequireRoles {
    /// `values`: roles that must each have an endpoint.
    #[serde(default)]
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gating {
    Sum,
    MaxRole,
}

/// A parsed Kubernetes label selector string.
#[derive(Clone, Debug, PartialEq)]
struct LabelSelector(Vec<Term>);

#[derive(Clone, Debug, PartialEq)]
enum Term {
    Exists(String),
    Absent(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

fn valid_word(word: &str) -> bool {
    !word.is_empty()
        && word.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

impl LabelSelector {
    fn parse(text: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        let mut depth = 0usize;
        let mut start = 0;
        let mut pieces = Vec::new();
        for (at, c) in text.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth = depth.checked_sub(1).ok_or("unbalanced ')'")?,
                ',' if depth == 0 => {
                    pieces.push(&text[start..at]);
                    start = at + 1;
                }
                _ => {}
            }
        }
        if depth != 0 {
            return Err("unbalanced '('".into());
        }
        pieces.push(&text[start..]);
        for piece in pieces.into_iter().map(str::trim) {
            terms.push(Self::term(piece).ok_or_else(|| format!("cannot parse '{piece}'"))?);
        }
        Ok(Self(terms))
    }

    fn term(piece: &str) -> Option<Term> {
        let word = |text: &str| {
            let text = text.trim();
            valid_word(text).then(|| text.to_owned())
        };
        let value = |text: &str| {
            let text = text.trim();
            (text.is_empty() || valid_word(text)).then(|| text.to_owned())
        };
        if let Some(key) = piece.strip_prefix('!') {
            return word(key).map(Term::Absent);
        }
        if let Some((key, rest)) = piece.split_once("!=") {
            return Some(Term::NotEquals(word(key)?, value(rest)?));
        }
        if let Some((key, rest)) = piece.split_once("==").or_else(|| piece.split_once('=')) {
            return Some(Term::Equals(word(key)?, value(rest)?));
        }
        if let Some((key, rest)) = piece.split_once(char::is_whitespace) {
            let rest = rest.trim_start();
            let (negated, set) = if let Some(set) = rest.strip_prefix("notin") {
                (true, set)
            } else {
                (false, rest.strip_prefix("in")?)
            };
            let set = set.trim().strip_prefix('(')?.strip_suffix(')')?;
            let values = set.split(',').map(value).collect::<Option<Vec<_>>>()?;
            let key = word(key)?;
            return Some(if negated { Term::NotIn(key, values) } else { Term::In(key, values) });
        }
        word(piece).map(Term::Exists)
    }

    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|term| match term {
            Term::Exists(key) => labels.contains_key(key),
            Term::Absent(key) => !labels.contains_key(key),
            Term::Equals(key, value) => labels.get(key) == Some(value),
            Term::NotEquals(key, value) => labels.get(key) != Some(value),
            Term::In(key, values) => labels.get(key).is_some_and(|label| values.contains(label)),
            Term::NotIn(key, values) => labels.get(key).is_none_or(|label| !values.contains(label)),
        })
    }
}

/// Revisions' weights as shares of their total; absent: not covered.
type Shares = HashMap<String, f64>;

/// The screener's view of the pool: endpoint counts per revision and role, turned into shares.
#[derive(Debug)]
pub struct RolloutPodExtractor {
    scope: LabelSelector,
    revision_label: String,
    role_label: String,
    required_roles: Vec<String>,
    gating: Gating,
    /// `None` until a pool was seen: requests then fail closed, as in Go before the first
    /// Pod snapshot.
    shares: RwLock<Option<Shares>>,
}

impl RolloutPodExtractor {
    /// Endpoint counts by revision, then role.
    fn role_counts(&self, pool: &PoolSnapshot) -> BTreeMap<String, BTreeMap<String, usize>> {
        let mut counts: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        for state in pool.endpoints() {
            let labels = &state.endpoint.labels;
            if !self.scope.matches(labels) {
                continue;
            }
            let (Some(revision), Some(role)) =
                (labels.get(&self.revision_label), labels.get(&self.role_label))
            else {
                continue;
            };
            if revision.is_empty() || role.is_empty() {
                continue;
            }
            *counts.entry(revision.clone()).or_default().entry(role.clone()).or_default() += 1;
        }
        counts
    }

    /// The shares of the covered revisions of `pool`.
    fn shares_of(&self, pool: &PoolSnapshot) -> Shares {
        let counts = self.role_counts(pool);
        let count = |per_role: &BTreeMap<String, usize>, role: &str| {
            per_role.get(role).copied().unwrap_or(0)
        };
        let covered: Vec<(&String, &BTreeMap<String, usize>)> = counts
            .iter()
            .filter(|(_, per_role)| {
                self.required_roles.iter().all(|role| count(per_role, role) > 0)
            })
            .collect();
        let weights: Vec<(&String, usize)> = match self.gating {
            Gating::Sum => covered
                .iter()
                .map(|(revision, per_role)| {
                    (*revision, self.required_roles.iter().map(|role| count(per_role, role)).sum())
                })
                .collect(),
            Gating::MaxRole => {
                let mut dominant: Option<(&str, usize)> = None;
                for role in &self.required_roles {
                    let total: usize =
                        covered.iter().map(|(_, per_role)| count(per_role, role)).sum();
                    // Strictly more: on a tie the role listed first stays dominant.
                    if dominant.is_none_or(|(_, best)| total > best) {
                        dominant = Some((role, total));
                    }
                }
                let role = dominant.map_or("", |(role, _)| role);
                covered
                    .iter()
                    .map(|(revision, per_role)| (*revision, count(per_role, role)))
                    .collect()
            }
        };
        let total: usize = weights.iter().map(|(_, weight)| weight).sum();
        if total == 0 {
            return Shares::new();
        }
        weights
            .into_iter()
            .filter(|&(_, weight)| weight > 0)
            .map(|(revision, weight)| (revision.clone(), weight as f64 / total as f64))
            .collect()
    }

    /// The current shares, computed from `pool` when no pool was observed yet.
    fn shares(&self, pool: &PoolSnapshot) -> Shares {
        if let Some(shares) = self.shares.read().as_ref() {
            return shares.clone();
        }
        let shares = self.shares_of(pool);
        *self.shares.write() = Some(shares.clone());
        shares
    }
}

impl PoolObserver for RolloutPodExtractor {
    fn membership_changed(&self, pool: &PoolSnapshot) {
        let shares = self.shares_of(pool);
        *self.shares.write() = Some(shares);
    }
}

/// The revision drawn for `draw` in [0, 1) among `shares`, revisions in name order.
fn pick_revision(shares: &[(&String, f64)], draw: f64) -> Option<String> {
    let total: f64 = shares.iter().map(|(_, share)| share).sum();
    if total <= 0.0 {
        return None;
    }
    let target = draw * total;
    let mut cumulative = 0.0;
    for (revision, share) in shares {
        cumulative += share;
        if target < cumulative {
            return Some((*revision).clone());
        }
    }
    shares.last().map(|(revision, _)| (*revision).clone())
}

/// The screener: revision gating, strict header selectors, and response stamping.
#[derive(Debug)]
pub struct RolloutScreener {
    selectors: Vec<HeaderSelector>,
    /// Present when revision gating is active.
    extractor: Option<std::sync::Arc<RolloutPodExtractor>>,
    revision_label: String,
}

impl RolloutScreener {
    /// A screener for `parameters`, validated as llm-d-router validates them.
    pub fn new(parameters: RolloutParameters) -> Result<Self, PluginError> {
        let invalid = |message: String| PluginError::InvalidParameters(message);
        if parameters.scope.label_selector.is_empty() {
            return Err(invalid("scope.labelSelector is required".into()));
        }
        let scope = LabelSelector::parse(&parameters.scope.label_selector).map_err(|error| {
            invalid(format!("scope.labelSelector is not a valid label selector: {error}"))
        })?;
        let mut selectors = parameters.header_selectors;
        for (index, selector) in selectors.iter_mut().enumerate() {
            selector.header_name = selector.header_name.to_ascii_lowercase();
            for (value, field) in [
                (&selector.name, "name"),
                (&selector.header_name, "headerName"),
                (&selector.label_key, "labelKey"),
            ] {
                if value.is_empty() {
                    return Err(invalid(format!("headerSelectors[{index}].{field} is required")));
                }
            }
            if !matches!(selector.mode.as_str(), "strict" | "prefer") {
                return Err(invalid(format!(
                    "headerSelectors[{index}].mode \"{}\" must be one of strict|prefer",
                    selector.mode
                )));
            }
        }
        for (index, selector) in selectors.iter().enumerate() {
            let earlier = &selectors[..index];
            if earlier.iter().any(|other| other.name == selector.name) {
                return Err(invalid(format!(
                    "headerSelectors: duplicate name \"{}\"",
                    selector.name
                )));
            }
            if earlier.iter().any(|other| other.header_name == selector.header_name) {
                return Err(invalid(format!(
                    "headerSelectors: duplicate headerName \"{}\"",
                    selector.header_name
                )));
            }
        }
        let Some(gating) = parameters.revision_gating else {
            return Err(invalid("revisionGating is required".into()));
        };
        let or_default = |key: String, default: &str| {
            if key.is_empty() { default.to_owned() } else { key }
        };
        let revision_label = or_default(gating.revision_label_key, DEFAULT_REVISION_LABEL);
        let role_label = or_default(gating.role_label_key, DEFAULT_ROLE_LABEL);
        let mode = match gating.mode.as_str() {
            "disabled" => None,
            "sum" => Some(Gating::Sum),
            "max-role" => Some(Gating::MaxRole),
            other => {
                return Err(invalid(format!(
                    "revisionGating.mode \"{other}\" must be one of sum|max-role|disabled"
                )));
            }
        };
        let extractor = match mode {
            None => None,
            Some(gating_mode) => {
                let Some(roles) = gating.require_roles else {
                    return Err(invalid(format!(
                        "revisionGating.requireRoles is required when revisionGating.mode={}",
                        gating.mode
                    )));
                };
                if roles.values.is_empty() {
                    return Err(invalid(
                        "revisionGating.requireRoles.values must contain at least one role".into(),
                    ));
                }
                for (index, role) in roles.values.iter().enumerate() {
                    if role.is_empty() {
                        return Err(invalid(format!(
                            "revisionGating.requireRoles.values[{index}] must not be empty"
                        )));
                    }
                    if roles.values[..index].contains(role) {
                        return Err(invalid(format!(
                            "revisionGating.requireRoles.values contains duplicate role \"{role}\""
                        )));
                    }
                }
                Some(std::sync::Arc::new(RolloutPodExtractor {
                    scope,
                    revision_label: revision_label.clone(),
                    role_label,
                    required_roles: roles.values,
                    gating: gating_mode,
                    shares: RwLock::new(None),
                }))
            }
        };
        Ok(Self { selectors, extractor, revision_label })
    }

    /// The pod extractor, when revision gating is active.
    pub fn extractor(&self) -> Option<&std::sync::Arc<RolloutPodExtractor>> {
        self.extractor.as_ref()
    }

    fn strict_header<'r>(
        &'r self,
        request: &'r InferenceRequest,
    ) -> impl Iterator<Item = (&'r HeaderSelector, &'r str)> + 'r {
        self.selectors.iter().filter(|selector| selector.mode == "strict").filter_map(|selector| {
            request
                .header(&selector.header_name)
                .filter(|value| !value.is_empty())
                .map(|value| (selector, value))
        })
    }
}

impl Screener for RolloutScreener {
    fn screen(
        &self,
        state: &mut CycleState,
        request: &InferenceRequest,
        pool: &PoolSnapshot,
        candidates: &mut Vec<u32>,
    ) {
        let label = |index: u32, key: &str| {
            pool.get(index).and_then(|state| state.endpoint.labels.get(key).cloned())
        };
        if let Some(extractor) = &self.extractor {
            let shares = extractor.shares(pool);
            let mut seen: Vec<(&String, f64)> = Vec::new();
            for &index in candidates.iter() {
                if let Some(revision) = label(index, &self.revision_label)
                    && let Some((known, &share)) = shares.get_key_value(&revision)
                    && !seen.iter().any(|(other, _)| *other == known)
                {
                    seen.push((known, share));
                }
            }
            seen.sort_by(|a, b| a.0.cmp(b.0));
            let chosen = if self.strict_header(request).next().is_none() {
                pick_revision(&seen, state.rng().random::<f64>())
            } else {
                None
            };
            candidates.retain(|&index| {
                label(index, &self.revision_label).is_some_and(|revision| {
                    seen.iter().any(|(allowed, _)| **allowed == revision)
                        && chosen.as_ref().is_none_or(|chosen| *chosen == revision)
                })
            });
            if candidates.is_empty() {
                return;
            }
        }
        for (selector, wanted) in self.strict_header(request) {
            candidates
                .retain(|&index| label(index, &selector.label_key).as_deref() == Some(wanted));
            if candidates.is_empty() {
                return;
            }
        }
    }
}

impl ResponseHeaders for RolloutScreener {
    fn response_headers(&self, result: &SchedulingResult, headers: &mut Vec<(String, String)>) {
        let labels = &result.primary().endpoint.labels;
        for selector in &self.selectors {
            let Some(value) = labels.get(&selector.label_key).filter(|value| !value.is_empty())
            else {
                continue;
            };
            if !headers.iter().any(|(name, _)| *name == selector.header_name) {
                headers.push((selector.header_name.clone(), value.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use scheduler_core::{Endpoint, EndpointPickerConfig, EndpointState};

    use super::*;

    const SET: &str = "disaggregatedset.x-k8s.io/name";

    fn endpoint(port: u16, revision: &str, role: &str) -> EndpointState {
        EndpointState::new(
            Endpoint::new(([10, 0, 0, 1], port).into())
                .with_label(SET, "my-set")
                .with_label(DEFAULT_REVISION_LABEL, revision)
                .with_label(DEFAULT_ROLE_LABEL, role)
                .with_label("disaggregatedset.x-k8s.io/slice", format!("s{}", port % 2)),
        )
    }

    /// The README's 2P:10D rollout step: A has 2 prefill and 9 decode, B 1 and 1.
    fn rollout_pool() -> PoolSnapshot {
        let mut endpoints = Vec::new();
        let mut port = 8000;
        for (revision, prefill, decode) in [("rev-a", 2, 9), ("rev-b", 1, 1)] {
            for role in
                std::iter::repeat_n("prefill", prefill).chain(std::iter::repeat_n("decode", decode))
            {
                endpoints.push(endpoint(port, revision, role));
                port += 1;
            }
        }
        PoolSnapshot::new(endpoints)
    }

    fn screener(json: serde_json::Value) -> Result<RolloutScreener, PluginError> {
        RolloutScreener::new(serde_json::from_value(json).expect("parameters"))
    }

    fn gating(mode: &str) -> RolloutScreener {
        screener(serde_json::json!({
            "scope": {"labelSelector": "disaggregatedset.x-k8s.io/name=my-set"},
            "headerSelectors": [
                {"name": "revision", "headerName": "X-Disagg-Revision",
                 "labelKey": DEFAULT_REVISION_LABEL, "mode": "strict"},
                {"name": "slice", "headerName": "x-disagg-slice",
                 "labelKey": "disaggregatedset.x-k8s.io/slice", "mode": "prefer"},
            ],
            "revisionGating": {"mode": mode, "requireRoles": {"values": ["prefill", "decode"]}},
        }))
        .expect("valid")
    }

    fn sorted(shares: Shares) -> Vec<(String, f64)> {
        let mut shares: Vec<(String, f64)> = shares.into_iter().collect();
        shares.sort_by(|a, b| a.0.cmp(&b.0));
        shares
    }

    #[test]
    fn shares_follow_the_gating_mode() {
        let pool = rollout_pool();
        let max_role = gating("max-role");
        let shares = sorted(max_role.extractor().unwrap().shares_of(&pool));
        assert_eq!(shares, [("rev-a".to_owned(), 0.9), ("rev-b".to_owned(), 0.1)], "decode rules");
        let shares = sorted(gating("sum").extractor().unwrap().shares_of(&pool));
        assert_eq!(shares, [("rev-a".to_owned(), 11.0 / 13.0), ("rev-b".to_owned(), 2.0 / 13.0)]);

        // A revision missing a role is not covered; out-of-scope endpoints do not count.
        let mut endpoints = vec![endpoint(1, "rev-a", "prefill"), endpoint(2, "rev-a", "decode")];
        endpoints.push(endpoint(3, "rev-b", "decode"));
        endpoints.push(EndpointState::new(
            Endpoint::new(([10, 0, 0, 9], 9).into())
                .with_label(DEFAULT_REVISION_LABEL, "rev-c")
                .with_label(DEFAULT_ROLE_LABEL, "prefill"),
        ));
        let shares = max_role.extractor().unwrap().shares_of(&PoolSnapshot::new(endpoints));
        assert_eq!(sorted(shares), [("rev-a".to_owned(), 1.0)]);
    }

    #[test]
    fn ties_go_to_the_role_listed_first() {
        // prefill and decode both total 2: prefill (listed first) is dominant.
        let pool = PoolSnapshot::new([
            endpoint(1, "a", "prefill"),
            endpoint(2, "a", "decode"),
            endpoint(3, "b", "prefill"),
            endpoint(4, "a", "decode"),
            endpoint(5, "b", "decode"),
            endpoint(6, "b", "prefill"),
        ]);
        let shares = gating("max-role").extractor().unwrap().shares_of(&pool);
        assert_eq!(sorted(shares), [("a".to_owned(), 1.0 / 3.0), ("b".to_owned(), 2.0 / 3.0)]);
    }

    #[test]
    fn the_weighted_draw_walks_revisions_in_name_order() {
        let (a, b) = ("rev-a".to_owned(), "rev-b".to_owned());
        let shares = [(&a, 0.9), (&b, 0.1)];
        assert_eq!(pick_revision(&shares, 0.0).as_deref(), Some("rev-a"));
        assert_eq!(pick_revision(&shares, 0.899).as_deref(), Some("rev-a"));
        assert_eq!(pick_revision(&shares, 0.9).as_deref(), Some("rev-b"));
        assert_eq!(pick_revision(&[], 0.5), None);
    }

    fn screened(
        screener: &RolloutScreener,
        pool: &PoolSnapshot,
        request: &InferenceRequest,
        seed: u64,
    ) -> Vec<u32> {
        let mut candidates: Vec<u32> = (0..pool.len() as u32).collect();
        let mut state = CycleState::new(Instant::now(), seed);
        screener.screen(&mut state, request, pool, &mut candidates);
        candidates
    }

    fn revisions(pool: &PoolSnapshot, candidates: &[u32]) -> Vec<String> {
        let mut revisions: Vec<String> = candidates
            .iter()
            .map(|&index| pool.get(index).unwrap().endpoint.labels[DEFAULT_REVISION_LABEL].clone())
            .collect();
        revisions.dedup();
        revisions
    }

    #[test]
    fn each_request_sees_one_revision_in_proportion() {
        let pool = rollout_pool();
        let screener = gating("max-role");
        let request = InferenceRequest::new("m", "p");
        let mut to_b = 0;
        for seed in 0..2000 {
            let candidates = screened(&screener, &pool, &request, seed);
            let revisions = revisions(&pool, &candidates);
            assert_eq!(revisions.len(), 1, "never two revisions: {revisions:?}");
            if revisions[0] == "rev-b" {
                assert_eq!(candidates.len(), 2);
                to_b += 1;
            } else {
                assert_eq!(candidates.len(), 11);
            }
        }
        assert!((150..250).contains(&to_b), "about 10% to rev-b, got {to_b} of 2000");
    }

    #[test]
    fn a_strict_header_pins_the_revision_and_fails_closed() {
        let pool = rollout_pool();
        let screener = gating("sum");
        let pinned = InferenceRequest::new("m", "p").with_header("x-disagg-revision", "rev-b");
        for seed in 0..20 {
            assert_eq!(revisions(&pool, &screened(&screener, &pool, &pinned, seed)), ["rev-b"]);
        }
        let unknown = InferenceRequest::new("m", "p").with_header("x-disagg-revision", "rev-z");
        assert!(screened(&screener, &pool, &unknown, 1).is_empty());
        // A prefer selector screens nothing.
        let prefer = InferenceRequest::new("m", "p")
            .with_header("x-disagg-revision", "rev-a")
            .with_header("x-disagg-slice", "s1");
        assert_eq!(screened(&screener, &pool, &prefer, 1).len(), 11);
        // An uncovered pool fails closed.
        let lonely = PoolSnapshot::new([endpoint(1, "rev-a", "decode")]);
        let fresh = gating("sum");
        assert!(screened(&fresh, &lonely, &InferenceRequest::new("m", "p"), 1).is_empty());
    }

    #[test]
    fn disabled_gating_keeps_selectors_and_stamping() {
        let disabled = screener(serde_json::json!({
            "scope": {"labelSelector": "app in (vllm, sglang), !canary"},
            "headerSelectors": [{"name": "revision", "headerName": "x-disagg-revision",
                                 "labelKey": DEFAULT_REVISION_LABEL, "mode": "strict"}],
            "revisionGating": {"mode": "disabled"},
        }))
        .expect("valid");
        assert!(disabled.extractor().is_none());
        let pool = rollout_pool();
        assert_eq!(screened(&disabled, &pool, &InferenceRequest::new("m", "p"), 1).len(), 13);
        let pinned = InferenceRequest::new("m", "p").with_header("x-disagg-revision", "rev-b");
        assert_eq!(screened(&disabled, &pool, &pinned, 1).len(), 2);
    }

    #[test]
    fn label_selectors_parse_and_match() {
        let labels: BTreeMap<String, String> =
            [("app", "vllm"), ("tier", "gpu")].map(|(k, v)| (k.to_owned(), v.to_owned())).into();
        let matches = |text: &str| LabelSelector::parse(text).expect(text).matches(&labels);
        assert!(matches("app=vllm"));
        assert!(matches("app==vllm, tier"));
        assert!(matches("app in (sglang, vllm),!canary"));
        assert!(matches("app notin (sglang), zone!=us"));
        assert!(!matches("app!=vllm"));
        assert!(!matches("canary"));
        assert!(!matches("app in (sglang)"));
        for bad in ["app in (vllm", "app=v l", "=x", "a in b", ")"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parameters_are_checked_as_in_go() {
        let error = |json: serde_json::Value| screener(json).expect_err("refused").to_string();
        assert_eq!(
            error(serde_json::json!({"revisionGating": {"mode": "disabled"}})),
            "invalid parameters: scope.labelSelector is required"
        );
        let scope = serde_json::json!({"labelSelector": "a=b"});
        assert_eq!(
            error(serde_json::json!({"scope": scope})),
            "invalid parameters: revisionGating is required"
        );
        assert_eq!(
            error(serde_json::json!({"scope": scope, "revisionGating": {"mode": "sum"}})),
            "invalid parameters: revisionGating.requireRoles is required when revisionGating.mode=sum"
        );
        assert_eq!(
            error(
                serde_json::json!({"scope": scope, "revisionGating": {"mode": "max-role", "requireRoles": {"values": ["p", "p"]}}})
            ),
            "invalid parameters: revisionGating.requireRoles.values contains duplicate role \"p\""
        );
        assert_eq!(
            error(serde_json::json!({"scope": scope, "revisionGating": {"mode": "all"}})),
            "invalid parameters: revisionGating.mode \"all\" must be one of sum|max-role|disabled"
        );
        let selector = serde_json::json!({"name": "r", "headerName": "X-R", "labelKey": "k", "mode": "strict"});
        assert_eq!(
            error(
                serde_json::json!({"scope": scope, "headerSelectors": [selector, {"name": "s", "headerName": "x-r", "labelKey": "k", "mode": "strict"}], "revisionGating": {"mode": "disabled"}})
            ),
            "invalid parameters: headerSelectors: duplicate headerName \"x-r\""
        );
        assert_eq!(
            error(
                serde_json::json!({"scope": scope, "headerSelectors": [{"name": "r", "headerName": "h", "labelKey": "k", "mode": "soft"}], "revisionGating": {"mode": "disabled"}})
            ),
            "invalid parameters: headerSelectors[0].mode \"soft\" must be one of strict|prefer"
        );
        assert!(error(serde_json::json!({"scope": {"labelSelector": "a in (b"}, "revisionGating": {"mode": "disabled"}})).starts_with("invalid parameters: scope.labelSelector is not a valid label selector"));
    }

    /// The configuration of llm-d-router's screener README, with the decode profile's
    /// scorer and picker.
    const README_CONFIG: &str = "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: disaggregatedset-rollout-screener
  name: rollout-screener
  parameters:
    scope:
      labelSelector: \"disaggregatedset.x-k8s.io/name=my-set\"
    headerSelectors:
    - name: revision
      headerName: x-disagg-revision
      labelKey: disaggregatedset.x-k8s.io/revision
      mode: strict
    - name: slice
      headerName: x-disagg-slice
      labelKey: disaggregatedset.x-k8s.io/slice
      mode: prefer
    revisionGating:
      mode: max-role
      requireRoles:
        values: [prefill, decode]
- type: header-label-affinity-scorer
  name: slice-affinity
  parameters:
    headerName: x-disagg-slice
    labelKey: disaggregatedset.x-k8s.io/slice
- type: weighted-random-picker
  name: picker

schedulingProfiles:
- name: decode
  plugins:
  - pluginRef: slice-affinity
    weight: 3
  - pluginRef: picker
";

    #[test]
    fn the_readme_config_loads_and_routes_within_one_revision() {
        let config = EndpointPickerConfig::from_yaml(README_CONFIG).expect("config");
        let error = config.build(&crate::builtin_registry()).expect_err("experimental");
        assert!(error.to_string().contains("is experimental"), "{error}");
        let mut registry = crate::builtin_registry();
        registry.allow_experimental_plugins(true);
        let scheduler = config.build(&registry).expect("scheduler");
        let pool = Arc::new(rollout_pool());
        let pinned = InferenceRequest::new("m", "p").with_header("x-disagg-revision", "rev-b");
        for _ in 0..20 {
            let result = scheduler.schedule(&pinned, &pool).expect("a pick");
            let labels = &result.primary().endpoint.labels;
            assert_eq!(labels[DEFAULT_REVISION_LABEL], "rev-b");
            let headers = scheduler.response_headers(&result);
            assert!(
                headers.contains(&("x-disagg-revision".to_owned(), "rev-b".to_owned())),
                "{headers:?}"
            );
            assert!(headers.iter().any(|(name, _)| name == "x-disagg-slice"), "{headers:?}");
        }
        let missing = InferenceRequest::new("m", "p").with_header("x-disagg-revision", "rev-z");
        let error = scheduler.schedule(&missing, &pool).expect_err("fails closed");
        assert_eq!(
            error.to_string(),
            "screener 'rollout-screener' removed every candidate endpoint"
        );

        let bare = EndpointPickerConfig::from_yaml(
            "plugins:\n- type: disaggregatedset-rollout-screener\n- type: max-score-picker\n",
        )
        .expect("config");
        let error = bare.build(&registry).expect_err("parameters are required");
        assert!(
            error.to_string().ends_with(
                "invalid parameters: disaggregatedset-rollout-screener requires parameters"
            ),
            "{error}"
        );
    }
}
