//! Flow-control policy plugins: the fairness, ordering and usage limit policies a config
//! declares under `plugins:` and names from `flowControl` (`fairnessPolicyRef`,
//! `orderingPolicyRef`, `usageLimitPolicyPluginRef`).
//!
//! Types and parameters, as the Go EPP defines them:
//! - `global-strict-fairness-policy`, `round-robin-fairness-policy`: no parameters.
//! - `fcfs-ordering-policy`, `edf-ordering-policy`: no parameters.
//! - `static-usage-limit-policy`: `threshold` (default 1.0), the fixed ceiling on pool
//!   saturation up to which any band may dispatch.

use serde::Deserialize;

use crate::config::registry::{NoParameters, Plugin, PluginError, PluginRegistry};
use crate::flow::config::{FairnessPolicy, OrderingPolicy};

/// Type name of [`FairnessPolicy::GlobalStrict`].
pub const GLOBAL_STRICT_FAIRNESS_TYPE: &str = "global-strict-fairness-policy";
/// Type name of [`FairnessPolicy::RoundRobin`].
pub const ROUND_ROBIN_FAIRNESS_TYPE: &str = "round-robin-fairness-policy";
/// Type name of [`OrderingPolicy::Fcfs`].
pub const FCFS_ORDERING_TYPE: &str = "fcfs-ordering-policy";
/// Type name of [`OrderingPolicy::Edf`].
pub const EDF_ORDERING_TYPE: &str = "edf-ordering-policy";
/// Type name of [`StaticUsageLimit`].
pub const STATIC_USAGE_LIMIT_TYPE: &str = "static-usage-limit-policy";

/// The flow-control policy a plugin provides (the plugin's `flow_policy` role).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FlowPolicy {
    /// A fairness policy, for `fairnessPolicyRef`.
    Fairness(FairnessPolicy),
    /// An ordering policy, for `orderingPolicyRef`.
    Ordering(OrderingPolicy),
    /// A usage limit policy, for `usageLimitPolicyPluginRef`.
    UsageLimit(StaticUsageLimit),
}

impl FlowPolicy {
    /// The fairness policy, if this is one.
    pub fn fairness(&self) -> Option<FairnessPolicy> {
        match self {
            Self::Fairness(policy) => Some(*policy),
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
    pub fn usage_limit(&self) -> Option<StaticUsageLimit> {
        match self {
            Self::UsageLimit(policy) => Some(*policy),
            _ => None,
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
        _ => None,
    }
}

/// The default usage limit policy of type `name`.
pub fn usage_limit_by_type(name: &str) -> Option<StaticUsageLimit> {
    (name == STATIC_USAGE_LIMIT_TYPE).then(StaticUsageLimit::default)
}

/// Registers the five policy types with `registry`.
pub(crate) fn register_policies(registry: &mut PluginRegistry) {
    let policy = |policy| Plugin { flow_policy: Some(policy), ..Plugin::default() };
    for (name, fairness) in [
        (GLOBAL_STRICT_FAIRNESS_TYPE, FairnessPolicy::GlobalStrict),
        (ROUND_ROBIN_FAIRNESS_TYPE, FairnessPolicy::RoundRobin),
    ] {
        registry.register(name, move |spec| {
            spec.parameters::<NoParameters>()?;
            Ok(policy(FlowPolicy::Fairness(fairness)))
        });
    }
    for (name, ordering) in
        [(FCFS_ORDERING_TYPE, OrderingPolicy::Fcfs), (EDF_ORDERING_TYPE, OrderingPolicy::Edf)]
    {
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
        Ok(policy(FlowPolicy::UsageLimit(limit)))
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
            plugin.flow_policy.and_then(|policy| policy.usage_limit()).map(|l| l.threshold()),
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
}
