//! `priority-holdback-policy` (experimental, alpha in llm-d-router): a usage limit policy giving
//! each priority band its own ceiling on pool saturation, so that lower priorities are held back
//! first as the pool fills and the capacity left is reserved for higher ones.
//!
//! Algorithm (llm-d-router's `usagelimits/priorityholdback`). The known bands, highest priority
//! first, get ceilings from `maxCeiling` (the highest) down to `minCeiling` (the lowest) along a
//! `linear` shape, placed by one of two domains:
//! - `rank` (default): equal steps by rank `i` of `n` bands,
//!   `c_i = maxCeiling - i * (maxCeiling - minCeiling) / (n - 1)`;
//! - `value`: by the priority value `p_i` within the known range,
//!   `c_i = minCeiling + (p_i - pMin) / (pMax - pMin) * (maxCeiling - minCeiling)`, and
//!   `maxCeiling` for all when every band has the same priority.
//!
//! A single band gets `maxCeiling`. A band is blocked once saturation reaches its ceiling.
//! Ceilings never increase with rank, so a lower band is never open while a higher one is held.
//! Each ceiling is O(1) from the band's place: nothing is allocated per dispatch.

use serde::Deserialize;

/// Type name of [`PriorityHoldback`].
pub const PRIORITY_HOLDBACK_TYPE: &str = "priority-holdback-policy";

/// Where a band stands among the known bands: what a usage limit policy needs to give it a
/// ceiling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BandPlace {
    /// The band's priority.
    pub priority: i32,
    /// Its rank among the known bands, 0 for the highest priority.
    pub rank: usize,
    /// How many bands are known.
    pub bands: usize,
    /// The highest known priority.
    pub highest_priority: i32,
    /// The lowest known priority.
    pub lowest_priority: i32,
}

impl BandPlace {
    /// The place of the band ranked `rank` in `priorities` (known priorities, highest first).
    /// `None` when `rank` is out of range.
    pub fn in_order(priorities: &[i32], rank: usize) -> Option<Self> {
        Some(Self {
            priority: *priorities.get(rank)?,
            rank,
            bands: priorities.len(),
            highest_priority: *priorities.first()?,
            lowest_priority: *priorities.last()?,
        })
    }
}

/// How band priorities map onto the ceiling range (`domain`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HoldbackDomain {
    /// `rank`: equal steps by rank, whatever the priority values.
    #[default]
    Rank,
    /// `value`: in proportion to the priority values within the known range.
    Value,
}

/// The parameters of `priority-holdback-policy`, as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PriorityHoldbackParameters {
    /// Interpolation curve; absent means `linear`, the only one supported.
    pub shape: Option<String>,
    /// `rank` (absent means this) or `value`.
    pub domain: Option<String>,
    /// Ceiling of the lowest priority, in [0, 1); required.
    pub min_ceiling: Option<f64>,
    /// Ceiling of the highest priority, in (0, 1]; absent means 1.
    pub max_ceiling: Option<f64>,
}

/// Everything wrong with a `priority-holdback-policy` declaration, all listed at once.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct InvalidHoldback(pub Vec<String>);

/// `priority-holdback-policy`: ceilings stepping down from `maxCeiling` for the highest band
/// to `minCeiling` for the lowest (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PriorityHoldback {
    domain: HoldbackDomain,
    min_ceiling: f64,
    max_ceiling: f64,
}

impl PriorityHoldback {
    /// A policy from its declared parameters, after defaults; refuses a missing `minCeiling`,
    /// an unknown shape or domain, ceilings out of range and `minCeiling >= maxCeiling`.
    pub fn new(parameters: &PriorityHoldbackParameters) -> Result<Self, InvalidHoldback> {
        let Some(min_ceiling) = parameters.min_ceiling else {
            return Err(InvalidHoldback(vec!["minCeiling is required".to_owned()]));
        };
        let max_ceiling = parameters.max_ceiling.unwrap_or(1.0);
        let mut problems = Vec::new();
        match parameters.shape.as_deref() {
            None | Some("linear") => {}
            Some(other) => {
                problems.push(format!("unsupported shape {other:?}, must be \"linear\""))
            }
        }
        let domain = match parameters.domain.as_deref() {
            None | Some("rank") => HoldbackDomain::Rank,
            Some("value") => HoldbackDomain::Value,
            Some(other) => {
                problems.push(format!(
                    "unsupported domain {other:?}, must be one of: \"rank\", \"value\""
                ));
                HoldbackDomain::Rank
            }
        };
        if !(0.0..1.0).contains(&min_ceiling) {
            problems.push(format!("minCeiling must be in [0.0, 1.0), got {min_ceiling}"));
        }
        if !(max_ceiling > 0.0 && max_ceiling <= 1.0) {
            problems.push(format!("maxCeiling must be in (0.0, 1.0], got {max_ceiling}"));
        }
        if min_ceiling >= max_ceiling {
            problems.push(format!(
                "minCeiling ({min_ceiling}) must be strictly less than maxCeiling ({max_ceiling})"
            ));
        }
        if problems.is_empty() {
            Ok(Self { domain, min_ceiling, max_ceiling })
        } else {
            Err(InvalidHoldback(problems))
        }
    }

    /// The domain in use.
    pub fn domain(&self) -> HoldbackDomain {
        self.domain
    }

    /// The ceiling of the band at `place`.
    pub fn ceiling(&self, place: BandPlace) -> f64 {
        // One band is never held back below maxCeiling: holding it back would idle capacity
        // with nobody to reserve it for.
        if place.bands <= 1 {
            return self.max_ceiling;
        }
        let spread = self.max_ceiling - self.min_ceiling;
        match self.domain {
            HoldbackDomain::Rank => {
                self.max_ceiling - place.rank as f64 * spread / (place.bands - 1) as f64
            }
            HoldbackDomain::Value => {
                let range = f64::from(place.highest_priority) - f64::from(place.lowest_priority);
                if range <= 0.0 {
                    return self.max_ceiling;
                }
                let position =
                    (f64::from(place.priority) - f64::from(place.lowest_priority)) / range;
                self.min_ceiling + position * spread
            }
        }
    }

    /// Writes the ceiling of every band of `priorities` (known priorities, highest first) into
    /// the matching entry of `ceilings`.
    pub fn compute_limits(&self, priorities: &[i32], ceilings: &mut [f64]) {
        for (rank, ceiling) in ceilings.iter_mut().enumerate().take(priorities.len()) {
            if let Some(place) = BandPlace::in_order(priorities, rank) {
                *ceiling = self.ceiling(place);
            }
        }
    }

    /// Whether the band at `place` may not dispatch at pool `saturation`.
    pub fn blocks(&self, place: BandPlace, saturation: f64) -> bool {
        saturation >= self.ceiling(place)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(domain: &str, min: f64, max: f64) -> PriorityHoldback {
        PriorityHoldback::new(&PriorityHoldbackParameters {
            domain: Some(domain.to_owned()),
            min_ceiling: Some(min),
            max_ceiling: Some(max),
            ..PriorityHoldbackParameters::default()
        })
        .expect("valid")
    }

    fn limits(policy: &PriorityHoldback, priorities: &[i32]) -> Vec<f64> {
        let mut ceilings = vec![1.0; priorities.len()];
        policy.compute_limits(priorities, &mut ceilings);
        ceilings
    }

    fn assert_close(actual: &[f64], expected: &[f64]) {
        assert_eq!(actual.len(), expected.len(), "{actual:?} vs {expected:?}");
        for (a, e) in actual.iter().zip(expected) {
            assert!((a - e).abs() < 1e-6, "{actual:?} vs {expected:?}");
        }
    }

    #[test]
    fn rank_domain_steps_evenly_whatever_the_values() {
        let rank = policy("rank", 0.5, 1.0);
        assert_close(&limits(&rank, &[100, 10]), &[1.0, 0.5]);
        assert_close(&limits(&rank, &[100, 50, 10]), &[1.0, 0.75, 0.5]);
        assert_close(&limits(&rank, &[1000, 2, 1]), &[1.0, 0.75, 0.5]);
        assert_close(&limits(&rank, &[100, 75, 50, 10]), &[1.0, 0.833_333_3, 0.666_666_6, 0.5]);
        assert_close(&limits(&policy("rank", 0.8, 0.9), &[10, 5, 1]), &[0.9, 0.85, 0.8]);
        assert_close(&limits(&policy("rank", 0.0, 1.0), &[10, 5, 1]), &[1.0, 0.5, 0.0]);
    }

    #[test]
    fn value_domain_follows_the_priority_values() {
        let value = policy("value", 0.5, 1.0);
        assert_close(&limits(&value, &[90, 50, 10]), &[1.0, 0.75, 0.5]);
        assert_close(&limits(&value, &[100, 50, 10]), &[1.0, 0.722_222_2, 0.5]);
        assert_close(&limits(&value, &[100, 2, 1]), &[1.0, 0.505_050_5, 0.5]);
        assert_close(&limits(&value, &[10, 10, 10]), &[1.0, 1.0, 1.0]);
        assert_close(&limits(&value, &[100, 10, 10]), &[1.0, 0.5, 0.5]);
        let negative = limits(&value, &[10, -5, -20]);
        assert!(negative[0] > negative[1] && negative[1] > negative[2], "{negative:?}");
        assert_close(&[negative[0], negative[2]], &[1.0, 0.5]);
        // Evenly spaced values give the rank ceilings.
        assert_close(
            &limits(&value, &[100, 55, 10]),
            &limits(&policy("rank", 0.5, 1.0), &[100, 55, 10]),
        );
    }

    #[test]
    fn one_band_gets_the_max_ceiling_and_is_gated_there() {
        for domain in ["rank", "value"] {
            let holdback = policy(domain, 0.5, 0.9);
            assert_eq!(limits(&holdback, &[10]), [0.9]);
            let place = BandPlace::in_order(&[10], 0).expect("in range");
            assert!(!holdback.blocks(place, 0.89));
            assert!(holdback.blocks(place, 0.9), "the ceiling itself blocks");
        }
        assert!(limits(&policy("rank", 0.5, 1.0), &[]).is_empty());
    }

    #[test]
    fn lower_bands_are_held_back_first() {
        let holdback = policy("rank", 0.4, 0.9);
        let priorities = [10, 0, -10];
        let blocked = |saturation| {
            (0..3)
                .map(|rank| {
                    holdback.blocks(BandPlace::in_order(&priorities, rank).unwrap(), saturation)
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(blocked(0.3), [false, false, false]);
        assert_eq!(blocked(0.4), [false, false, true]);
        assert_eq!(blocked(0.65), [false, true, true]);
        assert_eq!(blocked(0.9), [true, true, true]);
    }

    #[test]
    fn parameters_take_defaults_and_refuse_bad_values() {
        let defaults = PriorityHoldback::new(&PriorityHoldbackParameters {
            min_ceiling: Some(0.5),
            ..PriorityHoldbackParameters::default()
        })
        .expect("minCeiling alone is enough");
        assert_eq!(defaults, policy("rank", 0.5, 1.0));
        assert_eq!(defaults.domain(), HoldbackDomain::Rank);
        let refused = |json: serde_json::Value| {
            let parameters: PriorityHoldbackParameters =
                serde_json::from_value(json).expect("well-formed");
            PriorityHoldback::new(&parameters).unwrap_err().to_string()
        };
        assert_eq!(refused(serde_json::json!({})), "minCeiling is required");
        assert_eq!(refused(serde_json::json!({"domain": "rank"})), "minCeiling is required");
        assert!(
            refused(serde_json::json!({"shape": "sigmoid", "minCeiling": 0.5}))
                .contains("unsupported shape \"sigmoid\"")
        );
        assert!(
            refused(serde_json::json!({"domain": "unknown", "minCeiling": 0.5}))
                .contains("unsupported domain \"unknown\"")
        );
        assert!(refused(serde_json::json!({"minCeiling": -0.1})).contains("minCeiling must be in"));
        assert!(refused(serde_json::json!({"minCeiling": 1.0})).contains("minCeiling must be in"));
        assert!(
            refused(serde_json::json!({"minCeiling": 0.5, "maxCeiling": 0.0}))
                .contains("maxCeiling must be in (0.0, 1.0], got 0")
        );
        assert!(
            refused(serde_json::json!({"minCeiling": 0.5, "maxCeiling": 1.1}))
                .contains("maxCeiling must be in")
        );
        assert!(
            refused(serde_json::json!({"minCeiling": 0.5, "maxCeiling": 0.5}))
                .contains("strictly less than")
        );
        // Every problem is listed, not only the first.
        let both = refused(
            serde_json::json!({"shape": "step", "domain": "log", "minCeiling": 0.8, "maxCeiling": 0.5}),
        );
        assert_eq!(both.matches("; ").count(), 2, "{both}");
        let unknown = serde_json::from_value::<PriorityHoldbackParameters>(
            serde_json::json!({"minCeiling": 0.5, "threshold": 0.9}),
        )
        .unwrap_err();
        assert!(unknown.to_string().contains("unknown field `threshold`"), "{unknown}");
    }

    proptest! {
        /// Whatever the bands and bounds, the highest band gets maxCeiling, the lowest
        /// minCeiling (when priorities differ), every ceiling lies between, and ceilings never
        /// increase with rank.
        #[test]
        fn ceilings_fall_with_rank_within_the_bounds(
            mut priorities in proptest::collection::vec(-50i32..50, 2..8),
            min in 0.0f64..0.95,
            gap in 0.01f64..1.0,
            value_domain in any::<bool>(),
        ) {
            priorities.sort_unstable_by(|a, b| b.cmp(a));
            priorities.dedup();
            prop_assume!(priorities.len() >= 2);
            let max = (min + gap).min(1.0);
            prop_assume!(min < max);
            let holdback = policy(if value_domain { "value" } else { "rank" }, min, max);
            let ceilings = limits(&holdback, &priorities);
            prop_assert!((ceilings[0] - max).abs() < 1e-9, "{:?}", ceilings);
            prop_assert!((ceilings[ceilings.len() - 1] - min).abs() < 1e-9, "{:?}", ceilings);
            for pair in ceilings.windows(2) {
                prop_assert!(pair[0] >= pair[1] - 1e-12, "{:?}", ceilings);
            }
            prop_assert!(ceilings.iter().all(|&c| c >= min - 1e-12 && c <= max + 1e-12));
        }
    }
}
