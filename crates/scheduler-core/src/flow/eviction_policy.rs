//! The eviction plugins: which requests in flight `enableEviction` may end
//! (`sheddable-eviction-filter`) and which goes first (`priority-then-time-eviction-order-policy`).
//!
//! Both are experimental (alpha in llm-d-router) and take no parameters. As there, no config
//! field names them: eviction always uses these two, and declaring either under `plugins:` only
//! constructs it (so configs written for llm-d-router load unchanged).
//!
//! Rules, from llm-d-router's `eviction/filtering` and `eviction/ordering`:
//! - filter: a request is a candidate only when sheddable, priority < 0;
//! - order: the lowest priority first; among equal priorities the most recently dispatched
//!   first, as it has the least KV-cache work to lose.

use std::cmp::Ordering;

use crate::config::registry::{NoParameters, Plugin, PluginRegistry};

/// Type name of [`SheddableEvictionFilter`].
pub const SHEDDABLE_EVICTION_FILTER_TYPE: &str = "sheddable-eviction-filter";
/// Type name of [`PriorityThenTimeEvictionOrder`].
pub const PRIORITY_THEN_TIME_EVICTION_ORDER_TYPE: &str = "priority-then-time-eviction-order-policy";

/// What the eviction policies know of a request in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EvictionCandidate {
    /// The request's priority.
    pub priority: i32,
    /// When it was dispatched, as a sequence number: a larger one was dispatched later.
    pub dispatch_seq: u64,
}

/// `sheddable-eviction-filter`: only sheddable requests (priority < 0) may be evicted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SheddableEvictionFilter;

impl SheddableEvictionFilter {
    /// Whether `candidate` may ever be evicted.
    pub fn accepts(&self, candidate: &EvictionCandidate) -> bool {
        candidate.priority < 0
    }
}

/// `priority-then-time-eviction-order-policy`: the lowest priority goes first, then the most
/// recently dispatched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PriorityThenTimeEvictionOrder;

impl PriorityThenTimeEvictionOrder {
    /// `Less` when `a` is to be evicted before `b`. A total order: candidates compare equal
    /// only when both fields are equal.
    pub fn compare(&self, a: &EvictionCandidate, b: &EvictionCandidate) -> Ordering {
        a.priority.cmp(&b.priority).then(b.dispatch_seq.cmp(&a.dispatch_seq))
    }
}

/// Registers both eviction plugin types (experimental, no parameters) with `registry`.
pub(crate) fn register_eviction_policies(registry: &mut PluginRegistry) {
    for type_name in [SHEDDABLE_EVICTION_FILTER_TYPE, PRIORITY_THEN_TIME_EVICTION_ORDER_TYPE] {
        registry.register_experimental(type_name, |spec| {
            spec.parameters::<NoParameters>()?;
            // Eviction always applies these rules; the declaration has nothing to configure.
            Ok(Plugin::default())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn candidate(priority: i32, dispatch_seq: u64) -> EvictionCandidate {
        EvictionCandidate { priority, dispatch_seq }
    }

    #[test]
    fn only_negative_priorities_pass_the_filter() {
        let filter = SheddableEvictionFilter;
        assert!(filter.accepts(&candidate(-1, 0)));
        assert!(filter.accepts(&candidate(i32::MIN, 0)));
        assert!(!filter.accepts(&candidate(0, 0)), "priority 0 is not sheddable");
        assert!(!filter.accepts(&candidate(5, 0)));
    }

    #[test]
    fn lowest_priority_then_newest_goes_first() {
        let order = PriorityThenTimeEvictionOrder;
        // Lower priority first, whatever the dispatch time.
        assert_eq!(order.compare(&candidate(-5, 1), &candidate(-1, 9)), Ordering::Less);
        assert_eq!(order.compare(&candidate(-1, 9), &candidate(-5, 1)), Ordering::Greater);
        // Equal priority: the later dispatch first.
        assert_eq!(order.compare(&candidate(-1, 9), &candidate(-1, 1)), Ordering::Less);
        assert_eq!(order.compare(&candidate(-1, 1), &candidate(-1, 9)), Ordering::Greater);
        assert_eq!(order.compare(&candidate(-1, 3), &candidate(-1, 3)), Ordering::Equal);
    }

    #[test]
    fn both_types_are_experimental_and_take_no_parameters() {
        let mut registry = PluginRegistry::new();
        for type_name in [SHEDDABLE_EVICTION_FILTER_TYPE, PRIORITY_THEN_TIME_EVICTION_ORDER_TYPE] {
            let spec = crate::PluginSpec::of_type(type_name);
            registry.allow_experimental_plugins(false);
            let error = registry.create(&spec).unwrap_err();
            assert!(error.to_string().contains("experimental"), "{error}");
            registry.allow_experimental_plugins(true);
            let plugin = registry.create(&spec).expect("no parameters");
            assert!(!plugin.is_profile_plugin(), "{type_name} never stands in a profile");
            let extra = serde_json::json!({"maxVictims": 2});
            let error = registry
                .create(&crate::PluginSpec { parameters: Some(&extra), ..spec })
                .unwrap_err()
                .to_string();
            assert!(error.contains("maxVictims: unknown field"), "{type_name}: {error}");
        }
    }

    proptest! {
        /// The order is total and consistent: antisymmetric, transitive, and equal only for
        /// equal candidates; so sorting by it yields one victim order whatever the input order.
        #[test]
        fn the_eviction_order_is_a_total_order(
            candidates in proptest::collection::vec((-5i32..5, 0u64..6), 1..12),
        ) {
            let order = PriorityThenTimeEvictionOrder;
            let candidates: Vec<_> =
                candidates.into_iter().map(|(p, s)| candidate(p, s)).collect();
            for a in &candidates {
                for b in &candidates {
                    prop_assert_eq!(order.compare(a, b), order.compare(b, a).reverse());
                    prop_assert_eq!(order.compare(a, b) == Ordering::Equal, a == b);
                    for c in &candidates {
                        if order.compare(a, b).is_le() && order.compare(b, c).is_le() {
                            prop_assert!(order.compare(a, c).is_le());
                        }
                    }
                }
            }
            let mut sorted = candidates.clone();
            sorted.sort_by(|a, b| order.compare(a, b));
            for pair in sorted.windows(2) {
                prop_assert!(
                    pair[0].priority < pair[1].priority
                        || (pair[0].priority == pair[1].priority
                            && pair[0].dispatch_seq >= pair[1].dispatch_seq)
                );
            }
        }
    }
}
