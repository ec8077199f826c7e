//! Flow-control policy plugins: the fairness, ordering and usage limit policies a config
//! declares under `plugins:` and names from `flowControl` (`fairnessPolicyRef`,
//! `orderingPolicyRef`, `usageLimitPolicyPluginRef`).
//!
//! Types and parameters, as the Go EPP defines them:
//! - `global-strict-fairness-policy`, `round-robin-fairness-policy`: no parameters.
//! - `fcfs-ordering-policy`, `edf-ordering-policy`, `slo-deadline-ordering-policy`: no
//!   parameters. The SLO deadline is the request's arrival plus its `x-llm-d-slo-ttft-ms`
//!   header (older name `x-slo-ttft-ms`); requests without a valid one go after those with one.
//! - `static-usage-limit-policy`: `threshold` (default 1.0), the fixed ceiling on pool
//!   saturation up to which any band may dispatch.
//! - `soft-reflective-ceiling-policy` (experimental, alpha in llm-d-router): no parameters;
//!   ceilings that tighten for lower bands as saturation rises ([`SoftReflectiveCeiling`]).
//! - `priority-holdback-policy` (experimental, alpha in llm-d-router): `shape`, `domain`,
//!   `minCeiling` (required), `maxCeiling`; fixed ceilings stepping down by band
//!   ([`PriorityHoldback`]).
//! - `program-aware-fairness`: least-attained-service fairness across programs (see
//!   [`ProgramAwareFairness`](crate::flow::ProgramAwareFairness) for its parameters).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;

use crate::config::registry::{NoParameters, Plugin, PluginError, PluginRegistry};
use crate::flow::config::{FairnessPolicy, OrderingPolicy};
use crate::flow::holdback::{
    BandPlace, PRIORITY_HOLDBACK_TYPE, PriorityHoldback, PriorityHoldbackParameters,
};
use crate::flow::program_aware::{
    PROGRAM_AWARE_FAIRNESS_TYPE, ProgramAwareFairness, ProgramAwareParameters,
};

/// Type name of [`FairnessPolicy::GlobalStrict`].
pub const GLOBAL_STRICT_FAIRNESS_TYPE: &str = "global-strict-fairness-policy";
/// Type name of [`FairnessPolicy::RoundRobin`].
pub const ROUND_ROBIN_FAIRNESS_TYPE: &str = "round-robin-fairness-policy";
/// Type name of [`OrderingPolicy::Fcfs`].
pub const FCFS_ORDERING_TYPE: &str = "fcfs-ordering-policy";
/// Type name of [`OrderingPolicy::Edf`].
pub const EDF_ORDERING_TYPE: &str = "edf-ordering-policy";
/// Type name of [`OrderingPolicy::SloDeadline`].
pub const SLO_DEADLINE_ORDERING_TYPE: &str = "slo-deadline-ordering-policy";
/// Type name of [`StaticUsageLimit`].
pub const STATIC_USAGE_LIMIT_TYPE: &str = "static-usage-limit-policy";
/// Type name of [`SoftReflectiveCeiling`].
pub const SOFT_REFLECTIVE_CEILING_TYPE: &str = "soft-reflective-ceiling-policy";

/// The flow-control policy a plugin provides (the plugin's `flow_policy` role).
#[derive(Clone, Debug, PartialEq)]
pub enum FlowPolicy {
    /// A fairness policy, for `fairnessPolicyRef`.
    Fairness(FairnessPolicy),
    /// An ordering policy, for `orderingPolicyRef`.
    Ordering(OrderingPolicy),
    /// A usage limit policy, for `usageLimitPolicyPluginRef`.
    UsageLimit(UsageLimitPolicy),
}

impl FlowPolicy {
    /// The fairness policy, if this is one.
    pub fn fairness(&self) -> Option<FairnessPolicy> {
        match self {
            Self::Fairness(policy) => Some(policy.clone()),
            _ => None,
        }
    }

    /// The ordering policy, if this is one.
    pub fn ordering(&self) -> Option<OrderingPolicy> {
        match self {
            Self::Ordering(policy) => Some(*policy),
            _ => None,
        }
    }

    /// The usage limit policy, if this is one.
    pub fn usage_limit(&self) -> Option<UsageLimitPolicy> {
        match self {
            Self::UsageLimit(policy) => Some(policy.clone()),
            _ => None,
        }
    }
}

/// The usage limit policy in force (`usageLimitPolicyPluginRef`): the ceiling on pool
/// saturation up to which each priority band may dispatch.
#[derive(Clone, Debug, PartialEq)]
pub enum UsageLimitPolicy {
    /// `static-usage-limit-policy`: one ceiling for every band.
    Static(StaticUsageLimit),
    /// `soft-reflective-ceiling-policy`: ceilings by band rank that tighten as saturation
    /// rises. Shared, as it counts dispatch cycles.
    SoftReflective(Arc<SoftReflectiveCeiling>),
    /// `priority-holdback-policy`: fixed ceilings stepping down from the highest band to the
    /// lowest.
    Holdback(PriorityHoldback),
}

impl Default for UsageLimitPolicy {
    fn default() -> Self {
        Self::Static(StaticUsageLimit::default())
    }
}

impl UsageLimitPolicy {
    /// The static policy, if this is one.
    pub fn as_static(&self) -> Option<StaticUsageLimit> {
        match self {
            Self::Static(limit) => Some(*limit),
            Self::SoftReflective(_) | Self::Holdback(_) => None,
        }
    }

    /// Whether the policy may gate a band below full saturation, so that callers need the
    /// detector's saturation level and not only its saturated flag.
    pub fn gates_below_saturation(&self) -> bool {
        match self {
            Self::Static(limit) => limit.gates_below_saturation(),
            // Holdback's lowest ceiling is always below 1.
            Self::SoftReflective(_) | Self::Holdback(_) => true,
        }
    }

    /// Whether the band at `place` among the known bands may not dispatch at pool
    /// `saturation`. One call is one dispatch cycle for policies that count cycles.
    pub fn blocks(&self, place: BandPlace, saturation: f64) -> bool {
        match self {
            Self::Static(limit) => limit.blocks(place.priority, saturation),
            Self::SoftReflective(policy) => {
                saturation >= policy.ceiling(place.rank, place.bands, saturation)
            }
            Self::Holdback(policy) => policy.blocks(place, saturation),
        }
    }
}

/// `soft-reflective-ceiling-policy`: gates lower-priority bands in proportion to saturation.
///
/// With `n` bands ranked from the highest (rank 0), band `i` has the reflective ceiling
/// `1 - i * saturation / (n - 1)`. The top band always gets 1.0. A band whose reflective
/// ceiling is above the saturation is open (1.0); at saturation 1 or more every lower band is
/// closed (0.0). Otherwise the band has reached its ceiling and alternates between open and
/// closed: one policy-wide counter advances on every cycle that has such a band, and the band
/// is open on the cycles where the counter is a multiple of
/// `period = max(1, round(saturation / (1 - saturation)))`, so it dispatches on about one cycle
/// in `period`. All alternating bands read the same counter, so on a given cycle they are all
/// open or all closed, which keeps the ceilings monotone in rank.
#[derive(Debug, Default)]
pub struct SoftReflectiveCeiling {
    tick: AtomicU64,
}

impl PartialEq for SoftReflectiveCeiling {
    /// Instances are equal only to themselves: each holds its own cycle counter.
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl SoftReflectiveCeiling {
    /// A policy whose cycle counter starts at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes the ceiling of every band into `ceilings` (index = rank, highest first) for one
    /// dispatch cycle at `saturation`; advances the cycle counter when a band alternates.
    pub fn compute_limits(&self, saturation: f64, ceilings: &mut [f64]) {
        let bands = ceilings.len();
        let open = self.cycle_open(saturation, bands);
        for (rank, ceiling) in ceilings.iter_mut().enumerate() {
            *ceiling = Self::ceiling_with(rank, bands, saturation, open);
        }
    }

    /// The ceiling of the band ranked `rank` among `bands` for one dispatch cycle at
    /// `saturation` (the entry [`Self::compute_limits`] would write for it).
    pub fn ceiling(&self, rank: usize, bands: usize, saturation: f64) -> f64 {
        let open = self.cycle_open(saturation, bands);
        Self::ceiling_with(rank, bands, saturation, open)
    }

    /// The alternation period at `saturation`: a band at its ceiling is open on one cycle in
    /// this many.
    pub fn period(saturation: f64) -> u64 {
        // The epsilon keeps the division finite as saturation approaches 1.
        let period = (saturation / (1.0 - saturation + 1e-9)).round().max(1.0);
        // A float to integer cast saturates (and maps NaN to 0, kept at 1 here).
        (period as u64).max(1)
    }

    /// Whether alternating bands are open on this cycle; counts the cycle when some band
    /// alternates (the lowest band does whenever any does, its ceiling being the lowest).
    fn cycle_open(&self, saturation: f64, bands: usize) -> bool {
        let alternating = bands > 1 && saturation >= 1.0 - saturation && saturation < 1.0;
        if !alternating {
            return false;
        }
        let tick = self.tick.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        tick.is_multiple_of(Self::period(saturation))
    }

    fn ceiling_with(rank: usize, bands: usize, saturation: f64, open: bool) -> f64 {
        if rank == 0 || bands <= 1 {
            return 1.0;
        }
        let reflective = 1.0 - rank as f64 * saturation / (bands - 1) as f64;
        if saturation < reflective {
            1.0
        } else if saturation >= 1.0 || !open {
            0.0
        } else {
            1.0
        }
    }
}

/// `static-usage-limit-policy`: one ceiling for every priority. A band may dispatch only while
/// the pool's saturation (0 = idle, 1 = saturated) is below the ceiling, so a threshold of 0.8
/// keeps 20% of the pool's capacity as headroom; 1.0, the default, gates nothing beyond the
/// saturation detector itself.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StaticUsageLimit {
    threshold: f64,
}

impl Default for StaticUsageLimit {
    fn default() -> Self {
        Self { threshold: 1.0 }
    }
}

/// The parameters of `static-usage-limit-policy`.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticUsageLimitParameters {
    /// The ceiling; absent means 1.0.
    pub threshold: Option<f64>,
}

/// A `threshold` outside (0, 1].
#[derive(Clone, Copy, Debug, PartialEq, thiserror::Error)]
#[error("threshold {0} must be in (0, 1]")]
pub struct InvalidThreshold(pub f64);

impl StaticUsageLimit {
    /// A policy with ceiling `threshold`, which must lie in (0, 1]: zero would stop every
    /// dispatch for good, and saturation above 1 is always blocked by the detector anyway.
    pub fn new(threshold: f64) -> Result<Self, InvalidThreshold> {
        if threshold > 0.0 && threshold <= 1.0 {
            Ok(Self { threshold })
        } else {
            Err(InvalidThreshold(threshold))
        }
    }

    /// The ceiling.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// The ceiling for a band of `priority` (the same for all priorities).
    pub fn ceiling(&self, _priority: i32) -> f64 {
        self.threshold
    }

    /// Whether a band of `priority` may not dispatch at pool `saturation`: it is blocked once
    /// saturation reaches its ceiling.
    pub fn blocks(&self, priority: i32, saturation: f64) -> bool {
        saturation >= self.ceiling(priority)
    }

    /// Whether this policy gates below full saturation (a threshold under 1), so that callers
    /// need the detector's saturation level and not only its saturated flag.
    pub fn gates_below_saturation(&self) -> bool {
        self.threshold < 1.0
    }
}

/// The fairness policy of type `name`.
pub fn fairness_by_type(name: &str) -> Option<FairnessPolicy> {
    match name {
        GLOBAL_STRICT_FAIRNESS_TYPE => Some(FairnessPolicy::GlobalStrict),
        ROUND_ROBIN_FAIRNESS_TYPE => Some(FairnessPolicy::RoundRobin),
        _ => None,
    }
}

/// The ordering policy of type `name`.
pub fn ordering_by_type(name: &str) -> Option<OrderingPolicy> {
    match name {
        FCFS_ORDERING_TYPE => Some(OrderingPolicy::Fcfs),
        EDF_ORDERING_TYPE => Some(OrderingPolicy::Edf),
        SLO_DEADLINE_ORDERING_TYPE => Some(OrderingPolicy::SloDeadline),
        _ => None,
    }
}

/// The default usage limit policy of type `name`. Only the static policy is known by type
/// alone; a soft reflective ceiling must be declared under `plugins:`, as in the Go EPP.
pub fn usage_limit_by_type(name: &str) -> Option<UsageLimitPolicy> {
    (name == STATIC_USAGE_LIMIT_TYPE).then(UsageLimitPolicy::default)
}

/// Registers the policy types with `registry`.
pub(crate) fn register_policies(registry: &mut PluginRegistry) {
    let policy = |policy| Plugin { flow_policy: Some(policy), ..Plugin::default() };
    for (name, fairness) in [
        (GLOBAL_STRICT_FAIRNESS_TYPE, FairnessPolicy::GlobalStrict),
        (ROUND_ROBIN_FAIRNESS_TYPE, FairnessPolicy::RoundRobin),
    ] {
        registry.register(name, move |spec| {
            spec.parameters::<NoParameters>()?;
            Ok(policy(FlowPolicy::Fairness(fairness.clone())))
        });
    }
    for (name, ordering) in [
        (FCFS_ORDERING_TYPE, OrderingPolicy::Fcfs),
        (EDF_ORDERING_TYPE, OrderingPolicy::Edf),
        (SLO_DEADLINE_ORDERING_TYPE, OrderingPolicy::SloDeadline),
    ] {
        registry.register(name, move |spec| {
            spec.parameters::<NoParameters>()?;
            Ok(policy(FlowPolicy::Ordering(ordering)))
        });
    }
    registry.register(STATIC_USAGE_LIMIT_TYPE, move |spec| {
        let parameters: StaticUsageLimitParameters = spec.parameters()?;
        let limit = match parameters.threshold {
            None => StaticUsageLimit::default(),
            Some(threshold) => StaticUsageLimit::new(threshold)
                .map_err(|error| PluginError::InvalidParameters(format!("threshold: {error}")))?,
        };
        Ok(policy(FlowPolicy::UsageLimit(UsageLimitPolicy::Static(limit))))
    });
    registry.register_experimental(SOFT_REFLECTIVE_CEILING_TYPE, move |spec| {
        spec.parameters::<NoParameters>()?;
        let ceiling = Arc::new(SoftReflectiveCeiling::new());
        Ok(policy(FlowPolicy::UsageLimit(UsageLimitPolicy::SoftReflective(ceiling))))
    });
    registry.register_experimental(PRIORITY_HOLDBACK_TYPE, move |spec| {
        let parameters: PriorityHoldbackParameters = spec.parameters()?;
        let holdback = PriorityHoldback::new(&parameters)
            .map_err(|error| PluginError::InvalidParameters(error.to_string()))?;
        Ok(policy(FlowPolicy::UsageLimit(UsageLimitPolicy::Holdback(holdback))))
    });
    crate::flow::eviction_policy::register_eviction_policies(registry);
    registry.register(PROGRAM_AWARE_FAIRNESS_TYPE, move |spec| {
        let parameters: ProgramAwareParameters = spec.parameters()?;
        let fairness = Arc::new(ProgramAwareFairness::new(&parameters)?);
        Ok(Plugin {
            flow_policy: Some(FlowPolicy::Fairness(FairnessPolicy::ProgramAware(Arc::clone(
                &fairness,
            )))),
            pre_request: Some(Arc::clone(&fairness) as _),
            response_complete: Some(fairness as _),
            ..Plugin::default()
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_limit_blocks_at_its_ceiling_for_every_priority() {
        let limit = StaticUsageLimit::new(0.8).expect("valid");
        for priority in [-5, 0, 7] {
            assert_eq!(limit.ceiling(priority), 0.8);
            assert!(!limit.blocks(priority, 0.79));
            assert!(limit.blocks(priority, 0.8), "the ceiling itself blocks");
            assert!(limit.blocks(priority, 1.0));
        }
        let open = StaticUsageLimit::default();
        assert_eq!(open.threshold(), 1.0);
        assert!(!open.blocks(0, 0.999));
        assert!(open.blocks(0, 1.0), "the default blocks only a saturated pool");
        assert!(!open.gates_below_saturation());
    }

    #[test]
    fn thresholds_outside_the_unit_interval_are_refused() {
        for bad in [0.0, -0.1, 1.5, f64::NAN] {
            assert!(StaticUsageLimit::new(bad).is_err(), "{bad}");
        }
        assert!(StaticUsageLimit::new(1.0).is_ok());
    }

    #[test]
    fn plugins_parse_their_parameters() {
        let mut registry = PluginRegistry::new();
        register_policies(&mut registry);
        let spec = |type_name, parameters| crate::PluginSpec { name: "p", type_name, parameters };
        let threshold = serde_json::json!({"threshold": 0.5});
        let plugin =
            registry.create(&spec(STATIC_USAGE_LIMIT_TYPE, Some(&threshold))).expect("valid");
        assert_eq!(
            plugin
                .flow_policy
                .and_then(|policy| policy.usage_limit())
                .and_then(|limit| limit.as_static())
                .map(|l| l.threshold()),
            Some(0.5)
        );
        let bad = serde_json::json!({"threshold": 2});
        let error = registry.create(&spec(STATIC_USAGE_LIMIT_TYPE, Some(&bad))).unwrap_err();
        assert!(error.to_string().contains("threshold 2 must be in (0, 1]"), "{error}");
        let extra = serde_json::json!({"quantum": 2});
        assert!(registry.create(&spec(EDF_ORDERING_TYPE, Some(&extra))).is_err());
        let plugin = registry.create(&spec(ROUND_ROBIN_FAIRNESS_TYPE, None)).expect("valid");
        assert!(!plugin.is_profile_plugin(), "policies never stand in a profile");
        assert_eq!(
            plugin.flow_policy.and_then(|policy| policy.fairness()),
            Some(FairnessPolicy::RoundRobin)
        );
    }

    fn limits(policy: &SoftReflectiveCeiling, saturation: f64, bands: usize) -> Vec<f64> {
        let mut ceilings = vec![1.0; bands];
        policy.compute_limits(saturation, &mut ceilings);
        ceilings
    }

    #[test]
    fn reflective_ceilings_open_below_and_close_at_full_saturation() {
        let policy = SoftReflectiveCeiling::new();
        assert!(limits(&policy, 0.9, 0).is_empty());
        for saturation in [0.0, 0.5, 0.99, 1.0] {
            assert_eq!(limits(&policy, saturation, 1), [1.0], "a single band is never gated");
        }
        assert_eq!(limits(&policy, 0.3, 3), [1.0, 1.0, 1.0], "below every reflective ceiling");
        assert_eq!(limits(&policy, 1.0, 3), [1.0, 0.0, 0.0]);
        assert_eq!(limits(&policy, 1.5, 3), [1.0, 0.0, 0.0]);
        // At 0.7 with four bands the reflective ceilings are 1, 0.767, 0.533, 0.3: the second
        // band is open, the last two alternate.
        let ceilings = limits(&policy, 0.7, 4);
        assert_eq!(ceilings[..2], [1.0, 1.0]);
        assert!(ceilings[2..].iter().all(|&c| c == 0.0 || c == 1.0), "{ceilings:?}");
    }

    #[test]
    fn gated_bands_alternate_with_the_saturation_period() {
        // period = round(0.7 / 0.3) = 2: closed, open, closed, open ...
        let policy = SoftReflectiveCeiling::new();
        let seen: Vec<f64> = (0..6).map(|_| limits(&policy, 0.7, 2)[1]).collect();
        assert_eq!(seen, [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
        // period = round(0.75 / 0.25) = 3.
        let policy = SoftReflectiveCeiling::new();
        let seen: Vec<f64> = (0..6).map(|_| limits(&policy, 0.75, 2)[1]).collect();
        assert_eq!(seen, [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]);
        assert_eq!(SoftReflectiveCeiling::period(0.5), 1);
        assert_eq!(SoftReflectiveCeiling::period(0.9), 9);
        assert_eq!(SoftReflectiveCeiling::period(f64::NAN), 1);
        // Below the alternating regime the counter does not move.
        let policy = SoftReflectiveCeiling::new();
        limits(&policy, 0.3, 3);
        assert_eq!(policy.tick.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_usage_limit_role_blocks_by_rank() {
        let policy = UsageLimitPolicy::SoftReflective(Arc::new(SoftReflectiveCeiling::new()));
        assert!(policy.gates_below_saturation());
        let priorities = [10, 0, -1];
        let place = |rank| BandPlace::in_order(&priorities, rank).expect("in range");
        assert!(!policy.blocks(place(0), 0.9), "the top band dispatches below saturation 1");
        assert!(policy.blocks(place(0), 1.0));
        assert!(!policy.blocks(place(1), 0.3));
        let registry = {
            let mut registry = PluginRegistry::new();
            registry.allow_experimental_plugins(true);
            registry
        };
        let spec = crate::PluginSpec::of_type(SOFT_REFLECTIVE_CEILING_TYPE);
        let plugin = registry.create(&spec).expect("no parameters");
        assert!(matches!(
            plugin.flow_policy.and_then(|p| p.usage_limit()),
            Some(UsageLimitPolicy::SoftReflective(_))
        ));
        let extra = serde_json::json!({"threshold": 0.5});
        let spec = crate::PluginSpec { parameters: Some(&extra), ..spec };
        let error = registry.create(&spec).unwrap_err().to_string();
        assert!(error.contains("threshold: unknown field"), "{error}");
        let error = PluginRegistry::new()
            .create(&crate::PluginSpec::of_type(SOFT_REFLECTIVE_CEILING_TYPE))
            .unwrap_err();
        assert!(error.to_string().contains("experimental"), "{error}");
    }

    #[test]
    fn holdback_is_an_experimental_usage_limit_with_checked_parameters() {
        let mut registry = PluginRegistry::new();
        let parameters =
            serde_json::json!({"domain": "rank", "minCeiling": 0.4, "maxCeiling": 0.9});
        let spec = crate::PluginSpec {
            parameters: Some(&parameters),
            ..crate::PluginSpec::of_type(PRIORITY_HOLDBACK_TYPE)
        };
        let error = registry.create(&spec).unwrap_err();
        assert!(error.to_string().contains("experimental"), "{error}");
        registry.allow_experimental_plugins(true);
        let limit = registry
            .create(&spec)
            .expect("valid")
            .flow_policy
            .and_then(|policy| policy.usage_limit())
            .expect("a usage limit policy");
        assert!(limit.gates_below_saturation());
        let priorities = [5, -5];
        let lowest = BandPlace::in_order(&priorities, 1).expect("in range");
        assert!(!limit.blocks(lowest, 0.39));
        assert!(limit.blocks(lowest, 0.4));
        let missing = serde_json::json!({"domain": "value"});
        let error =
            registry.create(&crate::PluginSpec { parameters: Some(&missing), ..spec }).unwrap_err();
        assert_eq!(error.to_string(), "invalid parameters: minCeiling is required");
        let unknown = serde_json::json!({"minCeiling": 0.4, "ceiling": 0.9});
        let error =
            registry.create(&crate::PluginSpec { parameters: Some(&unknown), ..spec }).unwrap_err();
        assert!(error.to_string().contains("ceiling: unknown field `ceiling`"), "{error}");
    }

    proptest::proptest! {
        #[test]
        fn ceilings_never_increase_with_rank(
            saturations in proptest::collection::vec(0.0f64..1.2, 1..40),
            bands in 1usize..7,
        ) {
            let policy = SoftReflectiveCeiling::new();
            for saturation in saturations {
                let ceilings = limits(&policy, saturation, bands);
                proptest::prop_assert_eq!(ceilings[0], 1.0);
                for pair in ceilings.windows(2) {
                    proptest::prop_assert!(pair[0] >= pair[1], "{:?} at {}", ceilings, saturation);
                }
                proptest::prop_assert!(ceilings.iter().all(|&c| c == 0.0 || c == 1.0));
            }
        }
    }
}
