//! Admission plugins: a last say on each request after flow control admitted it and before it
//! is scheduled, as llm-d-router's `Admitter` extension point. Every plugin playing the
//! [`Admitter`] role is consulted in declaration order; the first denial refuses the request
//! ([`Rejection::AdmissionDenied`](crate::Rejection::AdmissionDenied), HTTP 500 as in the Go
//! EPP, which reports a denial as an internal error).
//!
//! `probabilistic-admitter` ([`ProbabilisticAdmitter`]) sheds sheddable requests (priority
//! below 0) with a probability that rises steeply with the pool's saturation.

use std::fmt::Debug;

use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

use crate::config::registry::PluginError;
use crate::pool::endpoint::EndpointState;
use crate::request::InferenceRequest;

/// Type name of [`ProbabilisticAdmitter`].
pub const PROBABILISTIC_ADMITTER_TYPE: &str = "probabilistic-admitter";

/// Why an admission plugin refused a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("request cannot be admitted: {reason}")]
pub struct AdmissionDenied {
    /// The plugin's explanation.
    pub reason: String,
}

/// Decides, after flow control and before scheduling, whether a request may proceed.
pub trait Admitter: Send + Sync + Debug {
    /// Admits `request` (`Ok`) or denies it, given the endpoints it may be scheduled on.
    fn admit(
        &self,
        request: &InferenceRequest,
        endpoints: &[&EndpointState],
    ) -> Result<(), AdmissionDenied>;
}

/// The parameters of `probabilistic-admitter`; absent keys take the defaults shown.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ProbabilisticAdmitterParameters {
    /// Waiting requests at which an endpoint counts as fully loaded (default 5; above 0).
    pub queue_depth_threshold: i64,
    /// KV-cache use (0 to 1) at which an endpoint counts as fully loaded (default 0.8; above
    /// 0).
    pub kv_cache_util_threshold: f64,
    /// Steepness of the shedding curve (default 5; above 0).
    pub power: f64,
    /// Scale of the shedding curve: everything sheddable is shed from saturation
    /// `(1/k)^(1/power)` on (default 300; above 0).
    pub k: f64,
}

impl Default for ProbabilisticAdmitterParameters {
    fn default() -> Self {
        Self { queue_depth_threshold: 5, kv_cache_util_threshold: 0.8, power: 5.0, k: 300.0 }
    }
}

/// `probabilistic-admitter`: admits every request of priority 0 or more; sheds a sheddable
/// request (priority below 0) with probability `min(saturation^power * k, 1)`, where the
/// saturation is the mean over the candidate endpoints of
/// `max(waiting / queueDepthThreshold, kvUsage / kvCacheUtilThreshold)`, an endpoint never
/// scraped counting as fully loaded (1). With no candidate endpoint it admits.
#[derive(Debug)]
pub struct ProbabilisticAdmitter {
    queue_depth_threshold: f64,
    kv_cache_util_threshold: f64,
    power: f64,
    k: f64,
    rng: Mutex<SmallRng>,
}

impl ProbabilisticAdmitter {
    /// An admitter with `parameters`, drawing from a generator seeded at random; refused with
    /// an error naming the parameter when one is not above 0 (or not finite).
    pub fn new(parameters: &ProbabilisticAdmitterParameters) -> Result<Self, PluginError> {
        let seed = crate::scheduling::scheduler::process_random_seed();
        Self::with_rng(parameters, SmallRng::seed_from_u64(seed))
    }

    /// An admitter whose draws follow `seed`, for reproducible tests and simulations.
    pub fn seeded(
        parameters: &ProbabilisticAdmitterParameters,
        seed: u64,
    ) -> Result<Self, PluginError> {
        Self::with_rng(parameters, SmallRng::seed_from_u64(seed))
    }

    fn with_rng(
        parameters: &ProbabilisticAdmitterParameters,
        rng: SmallRng,
    ) -> Result<Self, PluginError> {
        let invalid = |field: &str, value: &dyn std::fmt::Display| {
            Err(PluginError::InvalidParameters(format!("{field}: must be > 0, got {value}")))
        };
        if parameters.queue_depth_threshold <= 0 {
            return invalid("queueDepthThreshold", &parameters.queue_depth_threshold);
        }
        for (field, value) in [
            ("kvCacheUtilThreshold", parameters.kv_cache_util_threshold),
            ("power", parameters.power),
            ("k", parameters.k),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return invalid(field, &value);
            }
        }
        Ok(Self {
            queue_depth_threshold: parameters.queue_depth_threshold as f64,
            kv_cache_util_threshold: parameters.kv_cache_util_threshold,
            power: parameters.power,
            k: parameters.k,
            rng: Mutex::new(rng),
        })
    }

    /// The saturation of `endpoints`: the mean of each endpoint's load (see the type); 0 for
    /// none.
    pub fn saturation(&self, endpoints: &[&EndpointState]) -> f64 {
        if endpoints.is_empty() {
            return 0.0;
        }
        let total: f64 = endpoints
            .iter()
            .map(|state| {
                let metrics = &state.metrics;
                if metrics.updated_at.is_none() {
                    return 1.0;
                }
                let queue = f64::from(metrics.waiting_queue) / self.queue_depth_threshold;
                let kv = metrics.kv_usage / self.kv_cache_util_threshold;
                queue.max(kv)
            })
            .sum();
        total / endpoints.len() as f64
    }

    /// The probability of shedding a sheddable request at `saturation`:
    /// `min(saturation^power * k, 1)`, 0 for a saturation that is not a positive number.
    pub fn shed_probability(&self, saturation: f64) -> f64 {
        if saturation.is_nan() || saturation <= 0.0 {
            return 0.0;
        }
        (saturation.powf(self.power) * self.k).min(1.0)
    }
}

impl Admitter for ProbabilisticAdmitter {
    fn admit(
        &self,
        request: &InferenceRequest,
        endpoints: &[&EndpointState],
    ) -> Result<(), AdmissionDenied> {
        if request.priority >= 0 || endpoints.is_empty() {
            return Ok(());
        }
        let saturation = self.saturation(endpoints);
        let probability = self.shed_probability(saturation);
        let draw: f64 = self.rng.lock().random();
        if draw < probability {
            return Err(AdmissionDenied {
                reason: format!(
                    "{PROBABILISTIC_ADMITTER_TYPE}: rejected, saturation={saturation:.3} prob={probability:.2}"
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use proptest::prelude::*;

    use super::*;
    use crate::pool::endpoint::{Endpoint, EndpointMetrics};

    fn endpoint(port: u16, waiting: u32, kv: f64) -> EndpointState {
        let address = std::net::SocketAddr::from(([10, 0, 0, 1], port));
        EndpointState::new(Endpoint::new(address)).with_metrics(EndpointMetrics {
            waiting_queue: waiting,
            kv_usage: kv,
            updated_at: Some(Instant::now()),
            ..EndpointMetrics::default()
        })
    }

    fn admitter() -> ProbabilisticAdmitter {
        ProbabilisticAdmitter::seeded(&ProbabilisticAdmitterParameters::default(), 7)
            .expect("defaults are valid")
    }

    fn sheddable() -> InferenceRequest {
        InferenceRequest { priority: -1, ..InferenceRequest::default() }
    }

    #[test]
    fn saturation_is_the_mean_of_the_larger_ratio() {
        let admitter = admitter();
        let a = endpoint(1, 5, 0.0); // queue 5/5 = 1
        let b = endpoint(2, 0, 0.4); // kv 0.4/0.8 = 0.5
        let c = endpoint(3, 1, 0.08); // max(0.2, 0.1) = 0.2
        let saturation = admitter.saturation(&[&a, &b, &c]);
        assert!((saturation - (1.0 + 0.5 + 0.2) / 3.0).abs() < 1e-12, "{saturation}");
        let unscraped = EndpointState::new(Endpoint::new(([10, 0, 0, 9], 80).into()));
        assert_eq!(admitter.saturation(&[&unscraped]), 1.0, "never scraped counts as full");
    }

    #[test]
    fn the_shedding_curve_matches_the_reference_table() {
        let admitter = admitter();
        // min(s^5 * 300, 1): ~2.3% at 0.15, ~9.6% at 0.2, ~73% at 0.3, 100% from ~0.34.
        for (saturation, expected) in
            [(0.0, 0.0), (0.15, 0.0228), (0.2, 0.096), (0.3, 0.729), (0.35, 1.0), (2.0, 1.0)]
        {
            let p = admitter.shed_probability(saturation);
            assert!((p - expected).abs() < 5e-4, "{saturation}: {p}");
        }
    }

    #[test]
    fn priority_zero_and_above_is_always_admitted() {
        let admitter = admitter();
        let full = endpoint(1, 100, 1.0);
        for priority in [0, 1, 10] {
            let request = InferenceRequest { priority, ..InferenceRequest::default() };
            for _ in 0..100 {
                assert!(admitter.admit(&request, &[&full]).is_ok());
            }
        }
        assert!(admitter.admit(&sheddable(), &[]).is_ok(), "no endpoints: admitted");
        let error = admitter.admit(&sheddable(), &[&full]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "request cannot be admitted: probabilistic-admitter: rejected, saturation=20.000 prob=1.00"
        );
    }

    #[test]
    fn draws_are_reproducible_from_a_seed() {
        let parameters =
            ProbabilisticAdmitterParameters { k: 1.0, power: 1.0, ..Default::default() };
        let half = endpoint(1, 0, 0.4); // saturation 0.5, so p = 0.5
        let outcomes = |seed| {
            let admitter = ProbabilisticAdmitter::seeded(&parameters, seed).expect("valid");
            (0..200).map(|_| admitter.admit(&sheddable(), &[&half]).is_ok()).collect::<Vec<_>>()
        };
        assert_eq!(outcomes(3), outcomes(3));
        let admitted = outcomes(3).iter().filter(|ok| **ok).count();
        assert!((60..140).contains(&admitted), "about half admitted: {admitted}");
    }

    #[test]
    fn bad_parameters_are_named() {
        let defaults = ProbabilisticAdmitterParameters::default();
        let cases = [
            (
                ProbabilisticAdmitterParameters { queue_depth_threshold: 0, ..defaults },
                "queueDepthThreshold",
            ),
            (
                ProbabilisticAdmitterParameters { kv_cache_util_threshold: 0.0, ..defaults },
                "kvCacheUtilThreshold",
            ),
            (ProbabilisticAdmitterParameters { power: -1.0, ..defaults }, "power"),
            (ProbabilisticAdmitterParameters { k: f64::NAN, ..defaults }, "k"),
        ];
        for (parameters, field) in cases {
            let error = ProbabilisticAdmitter::new(&parameters).unwrap_err().to_string();
            assert!(
                error.starts_with(&format!("invalid parameters: {field}: must be > 0")),
                "{error}"
            );
        }
    }

    proptest! {
        #[test]
        fn the_probability_is_in_the_unit_interval_and_monotone(
            power in 0.1f64..10.0,
            k in 0.1f64..2000.0,
            low in 0.0f64..3.0,
            delta in 0.0f64..3.0,
        ) {
            let parameters = ProbabilisticAdmitterParameters { power, k, ..Default::default() };
            let admitter = ProbabilisticAdmitter::seeded(&parameters, 1).expect("valid");
            let p_low = admitter.shed_probability(low);
            let p_high = admitter.shed_probability(low + delta);
            prop_assert!((0.0..=1.0).contains(&p_low) && (0.0..=1.0).contains(&p_high));
            prop_assert!(p_low <= p_high, "{} at {} > {} at {}", p_low, low, p_high, low + delta);
        }

        #[test]
        fn unloaded_endpoints_never_shed(count in 1usize..6, seed in any::<u64>()) {
            let admitter = ProbabilisticAdmitter::seeded(&ProbabilisticAdmitterParameters::default(), seed)
                .expect("valid");
            let idle: Vec<EndpointState> = (0..count).map(|i| endpoint(i as u16 + 1, 0, 0.0)).collect();
            let refs: Vec<&EndpointState> = idle.iter().collect();
            prop_assert!(admitter.admit(&sheddable(), &refs).is_ok());
        }
    }
}
