//! `program-aware-fairness`: a fairness policy that serves the flows of a band by how much
//! service each program (fairness id) has received, least first.
//!
//! Scoring (the `las`, least-attained-service, strategy). Each program accrues service when
//! one of its requests completes: prompt tokens plus twice the completion tokens. Service
//! decays in wall-clock time with half-life `lasHalfLifeSeconds` (0: no decay), folded in
//! lazily whenever it is read or added to, so an idle program's service ages out without its
//! queue being visited. At each dispatch the non-empty flows of the band are scored:
//!
//! ```text
//! score = lasWeightService * (1 - norm(service)) + lasWeightHeadWait * norm(headWaitMs)
//! norm(x) = (x - min) / (max - min) over the candidate flows, 0.5 when max == min
//! ```
//!
//! where `headWaitMs` is how long the flow's head request has waited, in whole milliseconds.
//! The highest score is served; among equal scores the flow met first in the band.
//!
//! Bookkeeping. As a pre-request hook the policy counts each scheduled request of a program
//! as dispatched and in flight; as a completion hook it adds the request's service and ends
//! its flight. The queue wait of every request dispatched from a queue is averaged per
//! program, which gives Jain's fairness index over programs ([`ProgramAwareFairness::
//! fairness_index`]). A program with nothing in flight and no completion for
//! `evictionTtlSeconds` is forgotten (0: never), checked at most every `evictionSweepSeconds`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Deserialize;

use crate::config::registry::PluginError;
use crate::request::InferenceRequest;
use crate::scheduling::cycle::CycleState;
use crate::scheduling::plugin::{PreRequest, ResponseComplete};
use crate::scheduling::result::{CompletedRequest, SchedulingResult};

/// Type name of [`ProgramAwareFairness`].
pub const PROGRAM_AWARE_FAIRNESS_TYPE: &str = "program-aware-fairness";

/// Weight of a prompt token in attained service.
const PROMPT_TOKEN_COST: f64 = 1.0;
/// Weight of a completion token in attained service (decoding costs about twice as much).
const COMPLETION_TOKEN_COST: f64 = 2.0;

/// The parameters of `program-aware-fairness`; absent keys take the defaults shown.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ProgramAwareParameters {
    /// The scoring strategy: `las` (the default, and the only one).
    pub strategy: String,
    /// Seconds without a completion after which an idle program is forgotten (default 3600;
    /// 0 never forgets).
    pub eviction_ttl_seconds: f64,
    /// Seconds between checks for idle programs (default 300; must be above 0).
    pub eviction_sweep_seconds: f64,
    /// Weight of the inverted attained service (default 0.8).
    pub las_weight_service: f64,
    /// Weight of the head request's wait (default 0.2).
    pub las_weight_head_wait: f64,
    /// Half-life of attained service in seconds (default 60; 0 disables decay).
    pub las_half_life_seconds: f64,
}

impl Default for ProgramAwareParameters {
    fn default() -> Self {
        Self {
            strategy: "las".to_owned(),
            eviction_ttl_seconds: 3600.0,
            eviction_sweep_seconds: 300.0,
            las_weight_service: 0.8,
            las_weight_head_wait: 0.2,
            las_half_life_seconds: 60.0,
        }
    }
}

/// A flow that has requests queued, as the policy scores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowHead<'a> {
    /// The flow's fairness id (the program).
    pub program: &'a str,
    /// When the flow's head request (by its ordering policy) was queued.
    pub head_enqueued_at: Instant,
}

/// What the policy knows of one program.
#[derive(Clone, Debug)]
struct Program {
    /// Attained service as of `decayed_to`.
    service: f64,
    /// The instant up to which decay has been applied; `None` before the first read.
    decayed_to: Option<Instant>,
    /// Mean queue wait in milliseconds over `waits` observations.
    mean_wait_ms: f64,
    waits: u64,
    dispatched: u64,
    in_flight: u64,
    last_completion: Instant,
}

impl Program {
    fn new(now: Instant) -> Self {
        Self {
            service: 0.0,
            decayed_to: None,
            mean_wait_ms: 0.0,
            waits: 0,
            dispatched: 0,
            in_flight: 0,
            // A program seen but never completing becomes evictable a TTL after it appeared.
            last_completion: now,
        }
    }

    /// Folds in the decay since the last fold and returns the service at `now`.
    fn service_at(&mut self, now: Instant, half_life_seconds: f64) -> f64 {
        match self.decayed_to {
            None => self.decayed_to = Some(now),
            Some(anchor) if now > anchor => {
                if half_life_seconds > 0.0 {
                    let elapsed = now.duration_since(anchor).as_secs_f64();
                    self.service *= (-elapsed / half_life_seconds).exp2();
                }
                self.decayed_to = Some(now);
            }
            Some(_) => {}
        }
        self.service
    }
}

#[derive(Debug, Default)]
struct Programs {
    by_id: HashMap<String, Program>,
    last_sweep: Option<Instant>,
}

impl Programs {
    /// Runs `f` on `program`'s state, created at `now` if new; the name is copied only then,
    /// not on every request of a known program.
    fn with<R>(&mut self, program: &str, now: Instant, f: impl FnOnce(&mut Program) -> R) -> R {
        if let Some(state) = self.by_id.get_mut(program) {
            return f(state);
        }
        f(self.by_id.entry(program.to_owned()).or_insert_with(|| Program::new(now)))
    }
}

/// The `program-aware-fairness` policy (see the module documentation). One instance serves as
/// the fairness policy of every band that names it and as the plugin's request hooks.
#[derive(Debug)]
pub struct ProgramAwareFairness {
    weight_service: f64,
    weight_head_wait: f64,
    half_life_seconds: f64,
    eviction_ttl: Option<Duration>,
    sweep_interval: Duration,
    programs: Mutex<Programs>,
}

impl PartialEq for ProgramAwareFairness {
    /// Instances are equal only to themselves: each holds its own program state.
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for ProgramAwareFairness {}

impl Default for ProgramAwareFairness {
    fn default() -> Self {
        Self::from_valid(&ProgramAwareParameters::default())
    }
}

/// `value` as a [`Duration`] of seconds, or an error naming `field`.
fn seconds(field: &str, value: f64) -> Result<Duration, PluginError> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        PluginError::InvalidParameters(format!(
            "{field}: {value} is not a usable number of seconds"
        ))
    })
}

impl ProgramAwareFairness {
    /// A policy with `parameters`, refused with an error naming the parameter when one is out
    /// of range: negative weights, half-life or TTL, a sweep interval not above 0, a value that
    /// is not finite, or a strategy other than `las`.
    pub fn new(parameters: &ProgramAwareParameters) -> Result<Self, PluginError> {
        let invalid = |message: String| Err(PluginError::InvalidParameters(message));
        let non_negative = [
            ("evictionTtlSeconds", parameters.eviction_ttl_seconds),
            ("lasWeightService", parameters.las_weight_service),
            ("lasWeightHeadWait", parameters.las_weight_head_wait),
            ("lasHalfLifeSeconds", parameters.las_half_life_seconds),
        ];
        for (field, value) in non_negative {
            if !value.is_finite() || value < 0.0 {
                return invalid(format!("{field}: must be a finite number >= 0, got {value}"));
            }
        }
        let sweep = parameters.eviction_sweep_seconds;
        if !sweep.is_finite() || sweep <= 0.0 {
            return invalid(format!(
                "evictionSweepSeconds: must be a finite number > 0, got {sweep}"
            ));
        }
        if !matches!(parameters.strategy.as_str(), "" | "las") {
            return invalid(format!(
                "strategy: unknown scoring strategy '{}': only 'las' is supported",
                parameters.strategy
            ));
        }
        seconds("evictionTtlSeconds", parameters.eviction_ttl_seconds)?;
        seconds("evictionSweepSeconds", sweep)?;
        Ok(Self::from_valid(parameters))
    }

    fn from_valid(parameters: &ProgramAwareParameters) -> Self {
        let ttl = Duration::try_from_secs_f64(parameters.eviction_ttl_seconds).unwrap_or_default();
        let sweep = Duration::try_from_secs_f64(parameters.eviction_sweep_seconds)
            .unwrap_or(Duration::from_secs(300));
        Self {
            weight_service: parameters.las_weight_service,
            weight_head_wait: parameters.las_weight_head_wait,
            half_life_seconds: parameters.las_half_life_seconds,
            eviction_ttl: (!ttl.is_zero()).then_some(ttl),
            sweep_interval: sweep,
            programs: Mutex::new(Programs::default()),
        }
    }

    /// The flow to serve next among `flows` (each with requests queued) at `now`: its index in
    /// `flows`, `None` when `flows` is empty.
    pub fn choose(&self, flows: &[FlowHead<'_>], now: Instant) -> Option<usize> {
        if flows.is_empty() {
            return None;
        }
        let mut programs = self.programs.lock();
        self.maybe_sweep(&mut programs, now);
        let half_life = self.half_life_seconds;
        // Whole milliseconds, as the reference implementation counts them.
        let waited = |flow: &FlowHead<'_>| {
            now.saturating_duration_since(flow.head_enqueued_at).as_millis() as f64
        };
        let (mut min_service, mut max_service) = (f64::INFINITY, f64::NEG_INFINITY);
        let (mut min_wait, mut max_wait) = (f64::INFINITY, f64::NEG_INFINITY);
        for flow in flows {
            let service =
                programs.with(flow.program, now, |state| state.service_at(now, half_life));
            let wait = waited(flow);
            (min_service, max_service) = (min_service.min(service), max_service.max(service));
            (min_wait, max_wait) = (min_wait.min(wait), max_wait.max(wait));
        }
        let mut best: Option<(usize, f64)> = None;
        for (index, flow) in flows.iter().enumerate() {
            // Decay was folded in up to `now` above: this reads the same value again.
            let service =
                programs.with(flow.program, now, |state| state.service_at(now, half_life));
            let score = self.weight_service * (1.0 - normalize(service, min_service, max_service))
                + self.weight_head_wait * normalize(waited(flow), min_wait, max_wait);
            if best.is_none_or(|(_, top)| score > top) {
                best = Some((index, score));
            }
        }
        best.map(|(index, _)| index)
    }

    /// Records that a request of `program` left its queue after waiting `waited`.
    pub fn record_wait(&self, program: &str, waited: Duration, now: Instant) {
        let waited_ms = waited.as_millis() as f64;
        self.programs.lock().with(program, now, |state| {
            state.waits += 1;
            state.mean_wait_ms += (waited_ms - state.mean_wait_ms) / state.waits as f64;
        });
    }

    /// Counts a scheduled request of `program` as dispatched and in flight.
    pub fn record_dispatched(&self, program: &str, now: Instant) {
        self.programs.lock().with(program, now, |state| {
            state.dispatched += 1;
            state.in_flight += 1;
        });
    }

    /// Ends the flight of a request of `program` that used `prompt_tokens` and
    /// `completion_tokens`, adding their cost to the program's service.
    pub fn record_completed(
        &self,
        program: &str,
        prompt_tokens: u64,
        completion_tokens: u64,
        now: Instant,
    ) {
        let mut programs = self.programs.lock();
        let half_life = self.half_life_seconds;
        programs.with(program, now, |state| {
            state.service_at(now, half_life);
            state.service += PROMPT_TOKEN_COST * prompt_tokens as f64
                + COMPLETION_TOKEN_COST * completion_tokens as f64;
            state.in_flight = state.in_flight.saturating_sub(1);
            state.last_completion = now;
        });
        self.maybe_sweep(&mut programs, now);
    }

    /// The attained service of `program` at `now`, decay applied (0 for an unknown program).
    pub fn attained_service(&self, program: &str, now: Instant) -> f64 {
        let mut programs = self.programs.lock();
        programs
            .by_id
            .get_mut(program)
            .map_or(0.0, |state| state.service_at(now, self.half_life_seconds))
    }

    /// Requests of `program` scheduled and not yet completed.
    pub fn in_flight(&self, program: &str) -> u64 {
        self.programs.lock().by_id.get(program).map_or(0, |state| state.in_flight)
    }

    /// Requests of `program` scheduled so far.
    pub fn dispatched(&self, program: &str) -> u64 {
        self.programs.lock().by_id.get(program).map_or(0, |state| state.dispatched)
    }

    /// Programs the policy holds state for.
    pub fn programs(&self) -> usize {
        self.programs.lock().by_id.len()
    }

    /// Jain's fairness index over the mean queue wait of the programs that have waited:
    /// `(Σx)² / (n·Σx²)`, 1 when perfectly even (and when fewer than two programs waited).
    pub fn fairness_index(&self) -> f64 {
        let programs = self.programs.lock();
        let (sum, sum_sq, n) = programs.by_id.values().filter(|state| state.waits > 0).fold(
            (0.0, 0.0, 0.0),
            |(sum, sum_sq, n), state| {
                let x = state.mean_wait_ms;
                (sum + x, sum_sq + x * x, n + 1.0)
            },
        );
        if n <= 1.0 || sum_sq == 0.0 { 1.0 } else { sum * sum / (n * sum_sq) }
    }

    /// Forgets every program with nothing in flight whose last completion (or first sighting)
    /// is more than `evictionTtlSeconds` before `now`. Runs by itself every
    /// `evictionSweepSeconds` as requests come and go.
    pub fn evict_idle(&self, now: Instant) {
        let mut programs = self.programs.lock();
        self.sweep(&mut programs, now);
    }

    fn maybe_sweep(&self, programs: &mut Programs, now: Instant) {
        let due = programs
            .last_sweep
            .is_none_or(|last| now.saturating_duration_since(last) >= self.sweep_interval);
        if due {
            self.sweep(programs, now);
        }
    }

    fn sweep(&self, programs: &mut Programs, now: Instant) {
        programs.last_sweep = Some(now);
        let Some(ttl) = self.eviction_ttl else { return };
        programs.by_id.retain(|_, state| {
            state.in_flight > 0 || now.saturating_duration_since(state.last_completion) <= ttl
        });
    }
}

/// `value` placed in `[min, max]` as a fraction; 0.5 when the range is a point.
fn normalize(value: f64, min: f64, max: f64) -> f64 {
    if max == min { 0.5 } else { (value - min) / (max - min) }
}

/// The program of a request: its fairness id, the flow id its queue uses.
fn program_of(fairness_id: Option<&str>) -> &str {
    fairness_id.unwrap_or("")
}

impl PreRequest for ProgramAwareFairness {
    fn pre_request(
        &self,
        _state: &mut CycleState,
        request: &InferenceRequest,
        _result: &SchedulingResult,
    ) {
        self.record_dispatched(program_of(request.fairness_id.as_deref()), Instant::now());
    }
}

impl ResponseComplete for ProgramAwareFairness {
    fn response_complete(&self, completed: &CompletedRequest) {
        self.record_completed(
            program_of(completed.fairness_id.as_deref()),
            completed.prompt_tokens.unwrap_or(0),
            completed.completion_tokens.unwrap_or(0),
            Instant::now(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(service: f64, wait: f64, half_life: f64) -> ProgramAwareFairness {
        ProgramAwareFairness::new(&ProgramAwareParameters {
            las_weight_service: service,
            las_weight_head_wait: wait,
            las_half_life_seconds: half_life,
            ..ProgramAwareParameters::default()
        })
        .expect("valid")
    }

    #[test]
    fn the_least_served_program_goes_first() {
        let fairness = policy(0.8, 0.2, 0.0);
        let now = Instant::now();
        fairness.record_completed("heavy", 1000, 500, now);
        fairness.record_completed("light", 10, 5, now);
        assert_eq!(fairness.attained_service("heavy", now), 2000.0, "prompt + 2 x completion");
        let flows = [
            FlowHead { program: "heavy", head_enqueued_at: now },
            FlowHead { program: "light", head_enqueued_at: now },
        ];
        assert_eq!(fairness.choose(&flows, now), Some(1));
        // A new program (no service) beats both.
        let with_new = [flows[0], flows[1], FlowHead { program: "new", head_enqueued_at: now }];
        assert_eq!(fairness.choose(&with_new, now), Some(2));
    }

    #[test]
    fn head_wait_decides_between_equally_served_programs() {
        let fairness = policy(0.8, 0.2, 60.0);
        let start = Instant::now();
        let now = start + Duration::from_secs(5);
        let flows = [
            FlowHead { program: "a", head_enqueued_at: now - Duration::from_millis(10) },
            FlowHead { program: "b", head_enqueued_at: start },
        ];
        assert_eq!(fairness.choose(&flows, now), Some(1), "the older head wins the tie");
        // Score: 0.8 * 0.5 + 0.2 * 1.0 = 0.6 for "b" against 0.8 * 0.5 + 0 for "a".
    }

    #[test]
    fn a_heavier_wait_weight_overrides_service() {
        let fairness = policy(0.1, 0.9, 0.0);
        let start = Instant::now();
        let now = start + Duration::from_secs(1);
        fairness.record_completed("served", 100, 0, start);
        let flows = [
            FlowHead { program: "fresh", head_enqueued_at: now },
            FlowHead { program: "served", head_enqueued_at: start },
        ];
        // fresh: 0.1 * 1 + 0.9 * 0 = 0.1; served: 0.1 * 0 + 0.9 * 1 = 0.9.
        assert_eq!(fairness.choose(&flows, now), Some(1));
    }

    #[test]
    fn service_halves_every_half_life() {
        let fairness = policy(0.8, 0.2, 60.0);
        let start = Instant::now();
        fairness.record_completed("p", 800, 0, start);
        let later = start + Duration::from_secs(60);
        assert!((fairness.attained_service("p", later) - 400.0).abs() < 1e-9);
        let much_later = later + Duration::from_secs(120);
        assert!((fairness.attained_service("p", much_later) - 100.0).abs() < 1e-9);
        let no_decay = policy(0.8, 0.2, 0.0);
        no_decay.record_completed("p", 800, 0, start);
        assert_eq!(no_decay.attained_service("p", much_later), 800.0);
    }

    #[test]
    fn idle_programs_are_forgotten_after_the_ttl() {
        let fairness = ProgramAwareFairness::new(&ProgramAwareParameters {
            eviction_ttl_seconds: 10.0,
            ..ProgramAwareParameters::default()
        })
        .expect("valid");
        let start = Instant::now();
        fairness.record_dispatched("busy", start);
        fairness.record_dispatched("idle", start);
        fairness.record_completed("idle", 1, 1, start);
        assert_eq!(fairness.in_flight("busy"), 1);
        fairness.evict_idle(start + Duration::from_secs(10));
        assert_eq!(fairness.programs(), 2, "within the TTL");
        fairness.evict_idle(start + Duration::from_secs(11));
        assert_eq!(fairness.programs(), 1, "the idle one goes, the one in flight stays");
        assert_eq!(fairness.dispatched("busy"), 1);
    }

    #[test]
    fn jains_index_measures_wait_evenness() {
        let fairness = ProgramAwareFairness::default();
        let now = Instant::now();
        assert_eq!(fairness.fairness_index(), 1.0);
        fairness.record_wait("a", Duration::from_millis(100), now);
        fairness.record_wait("b", Duration::from_millis(100), now);
        assert!((fairness.fairness_index() - 1.0).abs() < 1e-12);
        fairness.record_wait("c", Duration::from_millis(0), now);
        // (200)^2 / (3 * 20000) = 2/3.
        assert!((fairness.fairness_index() - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn bad_parameters_are_named() {
        let cases = [
            (
                ProgramAwareParameters { eviction_ttl_seconds: -1.0, ..Default::default() },
                "evictionTtlSeconds",
            ),
            (
                ProgramAwareParameters { eviction_sweep_seconds: 0.0, ..Default::default() },
                "evictionSweepSeconds",
            ),
            (
                ProgramAwareParameters { las_weight_service: -0.1, ..Default::default() },
                "lasWeightService",
            ),
            (
                ProgramAwareParameters { las_weight_head_wait: f64::NAN, ..Default::default() },
                "lasWeightHeadWait",
            ),
            (
                ProgramAwareParameters { las_half_life_seconds: -5.0, ..Default::default() },
                "lasHalfLifeSeconds",
            ),
            (ProgramAwareParameters { strategy: "wfq".into(), ..Default::default() }, "strategy"),
            (
                ProgramAwareParameters { eviction_ttl_seconds: 1e300, ..Default::default() },
                "evictionTtlSeconds",
            ),
        ];
        for (parameters, field) in cases {
            let error = ProgramAwareFairness::new(&parameters).unwrap_err().to_string();
            assert!(error.starts_with(&format!("invalid parameters: {field}: ")), "{error}");
        }
        let empty = ProgramAwareParameters { strategy: String::new(), ..Default::default() };
        assert!(ProgramAwareFairness::new(&empty).is_ok(), "an empty strategy means las");
    }

    proptest! {
        #[test]
        fn the_choice_is_one_of_the_offered_flows_and_prefers_the_least_served(
            services in proptest::collection::vec(0u64..10_000, 1..8),
            waits in proptest::collection::vec(0u64..10_000, 8),
        ) {
            let fairness = policy(1.0, 0.0, 0.0);
            let start = Instant::now();
            let now = start + Duration::from_secs(20);
            let names: Vec<String> = (0..services.len()).map(|i| format!("p{i}")).collect();
            for (name, &service) in names.iter().zip(&services) {
                fairness.record_completed(name, service, 0, start);
            }
            let flows: Vec<FlowHead<'_>> = names
                .iter()
                .zip(&waits)
                .map(|(name, &wait)| FlowHead {
                    program: name,
                    head_enqueued_at: now - Duration::from_millis(wait),
                })
                .collect();
            let chosen = fairness.choose(&flows, now).expect("non-empty");
            prop_assert!(chosen < flows.len());
            let least = services.iter().copied().min().unwrap_or(0);
            prop_assert_eq!(services[chosen], least, "service weight alone: the least served");
        }
    }
}
