//! Several EPP replicas in front of one pool, independent or sharing what they learn.
//!
//! A gateway with several picker replicas sends each request's ext-proc stream to one of them
//! (Envoy balances an ext-proc cluster per stream: round-robin by default). Each replica runs
//! its own [`Scheduler`] built from the same config, so with approximate prefix routing each
//! learns only the prompts it routed, and each counts only its own requests in flight.
//!
//! With [`ReplicaSync`] the replicas share both as the `epp-redis-sync` crate does through
//! Redis:
//! * **prefix records**: every record a replica's prefix producer makes reaches the other
//!   replicas' producers `record_delay_s` later (the stream's replication lag; about 4 ms at
//!   p99 on loopback, so the 10 ms default is pessimistic);
//! * **in-flight counts**: every `interval_s` each replica's own counts are summed into the
//!   other replicas' peer tables (levels, not deltas, as the syncer publishes them).
//!
//! Every replica reads the same scrapes: real replicas scrape the servers on their own
//! phases, which makes their views differ by up to one interval; that difference is left out.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use scheduler_core::{ConfigError, EndpointId, EndpointMap, EndpointPickerConfig, Scheduler};
use scorers::precise_prefix::EventFedProducer;
use scorers::{InFlightCounts, PrefixCacheProducer, RecordSink, SharedInFlight};
use serde::Serialize;

/// How the gateway spreads requests over the replicas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum ReplicaSpread {
    /// Each request to the next replica (Envoy's default for an ext-proc cluster).
    #[default]
    RoundRobin,
    /// Each request to a replica drawn at random.
    Random,
}

impl ReplicaSpread {
    /// The name `epp-sim --replica-spread` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::RoundRobin => "round-robin",
            Self::Random => "random",
        }
    }
}

/// What synced replicas share, and how late.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ReplicaSync {
    /// Seconds from a replica's decision to its prefix record reaching the other replicas.
    pub record_delay_s: f64,
    /// Seconds between exchanges of in-flight counts (`crossReplicaSyncInterval`).
    pub interval_s: f64,
}

impl Default for ReplicaSync {
    /// Records 10 ms late; counts every 200 ms (llm-d's default interval).
    fn default() -> Self {
        Self { record_delay_s: 0.010, interval_s: 0.2 }
    }
}

impl ReplicaSync {
    pub(crate) fn is_valid(&self) -> bool {
        self.record_delay_s >= 0.0
            && self.record_delay_s.is_finite()
            && self.interval_s > 0.0
            && self.interval_s.is_finite()
    }
}

/// The EPP replicas of a run (EPP policies only; the others have no state to split).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct EppReplicas {
    /// Replicas; 1 is a single EPP.
    pub count: usize,
    /// Shared state; `None`: each replica on its own.
    pub sync: Option<ReplicaSync>,
    /// How requests are spread over the replicas.
    pub spread: ReplicaSpread,
}

impl Default for EppReplicas {
    fn default() -> Self {
        Self { count: 1, sync: None, spread: ReplicaSpread::RoundRobin }
    }
}

impl EppReplicas {
    /// `count` replicas, each on its own.
    pub fn independent(count: usize) -> Self {
        Self { count, ..Self::default() }
    }

    /// `count` replicas sharing records and counts as `sync` says.
    pub fn synced(count: usize, sync: ReplicaSync) -> Self {
        Self { count, sync: Some(sync), ..Self::default() }
    }

    /// A short label for reports: `""` for one replica, `" x4"`, `" x4 synced"`.
    pub fn label(&self) -> String {
        match (self.count, self.sync) {
            (0 | 1, _) => String::new(),
            (count, None) => format!(" x{count}"),
            (count, Some(_)) => format!(" x{count} synced"),
        }
    }
}

/// Records a replica's producer made, waiting to be handed to the others.
#[derive(Debug, Default)]
struct Outbox(Mutex<Vec<(EndpointId, Vec<u64>)>>);

impl RecordSink for Outbox {
    fn recorded(&self, endpoint: EndpointId, hashes: &[u64]) {
        self.0.lock().push((endpoint, hashes.to_vec()));
    }
}

struct Replica {
    scheduler: Box<Scheduler>,
    /// The config's prefix producers, in the config's order (the same on every replica).
    producers: Vec<Arc<PrefixCacheProducer>>,
    /// The config's in-flight counters, in the config's order.
    counters: Vec<Arc<dyn SharedInFlight>>,
    /// One per producer: a sink does not say which index a record was made for.
    outboxes: Vec<Arc<Outbox>>,
}

/// A batch of one replica's records, due at the other replicas at `due_ns`.
struct InTransit {
    due_ns: u64,
    from: usize,
    producer: usize,
    records: Vec<(EndpointId, Vec<u64>)>,
}

/// The replicas of a run and the records travelling between them.
pub(crate) struct ReplicaSet {
    replicas: Vec<Replica>,
    sync: Option<ReplicaSync>,
    spread: ReplicaSpread,
    next: usize,
    rng: SmallRng,
    in_transit: VecDeque<InTransit>,
    /// Scratch for the in-flight exchange.
    counts: Vec<(EndpointId, InFlightCounts)>,
    /// Every replica's precise prefix producers, fed by the servers' KV events.
    precise: Vec<Arc<EventFedProducer>>,
}

impl ReplicaSet {
    /// Builds `replicas.count` schedulers (at least one) from `config`.
    pub(crate) fn build(
        config: &EndpointPickerConfig,
        replicas: &EppReplicas,
        seed: u64,
    ) -> Result<Self, ConfigError> {
        let precise = crate::policy::EventFedProducers::default();
        let registry = crate::policy::registry_feeding(&precise);
        let sync = replicas.sync.filter(|_| replicas.count > 1);
        let mut built = Vec::with_capacity(replicas.count.max(1));
        for _ in 0..replicas.count.max(1) {
            let plugins = config.construct_plugins(&registry)?;
            let scheduler = config.build_with(&plugins, &registry)?.with_seed(seed);
            let producers: Vec<_> =
                scorers::prefix_producers(&plugins).into_iter().map(|(_, p)| p).collect();
            let counters: Vec<_> =
                scorers::shared_in_flight(&plugins).into_iter().map(|(_, c)| c).collect();
            let outboxes: Vec<_> = producers.iter().map(|_| Arc::new(Outbox::default())).collect();
            if sync.is_some() {
                for (producer, outbox) in producers.iter().zip(&outboxes) {
                    producer.set_record_sink(Arc::clone(outbox) as Arc<dyn RecordSink>);
                }
            }
            built.push(Replica { scheduler: Box::new(scheduler), producers, counters, outboxes });
        }
        Ok(Self {
            replicas: built,
            sync,
            spread: replicas.spread,
            next: 0,
            rng: SmallRng::seed_from_u64(seed ^ 0x7e91_1ca5),
            in_transit: VecDeque::new(),
            counts: Vec::new(),
            precise: std::mem::take(&mut *precise.lock()),
        })
    }

    /// The replica the gateway sends the next request to.
    pub(crate) fn choose(&mut self) -> usize {
        let count = self.replicas.len();
        match self.spread {
            ReplicaSpread::RoundRobin => {
                let at = self.next % count;
                self.next = (at + 1) % count;
                at
            }
            ReplicaSpread::Random => self.rng.random_range(0..count),
        }
    }

    pub(crate) fn scheduler(&self, replica: usize) -> &Scheduler {
        &self.replicas[replica].scheduler
    }

    /// The precise prefix producers of every replica (empty unless the config has one).
    pub(crate) fn precise_producers(&self) -> &[Arc<EventFedProducer>] {
        &self.precise
    }

    /// The sync settings when the replicas share state.
    pub(crate) fn sync(&self) -> Option<ReplicaSync> {
        self.sync
    }

    /// Takes the records `replica`'s last decision made and sends them on their way; returns
    /// when they are due at the other replicas, if any were made.
    pub(crate) fn dispatch(&mut self, replica: usize, now_ns: u64) -> Option<u64> {
        let sync = self.sync?;
        let due_ns = now_ns + crate::engine::nanos_or_zero(sync.record_delay_s);
        let mut sent = false;
        for (producer, outbox) in self.replicas[replica].outboxes.iter().enumerate() {
            let records = std::mem::take(&mut *outbox.0.lock());
            if !records.is_empty() {
                self.in_transit.push_back(InTransit { due_ns, from: replica, producer, records });
                sent = true;
            }
        }
        sent.then_some(due_ns)
    }

    /// Applies every record due by `now_ns` to the replicas that did not make it.
    pub(crate) fn deliver(&mut self, now_ns: u64) {
        while self.in_transit.front().is_some_and(|batch| batch.due_ns <= now_ns) {
            let Some(batch) = self.in_transit.pop_front() else { break };
            for (index, replica) in self.replicas.iter().enumerate() {
                if index == batch.from {
                    continue;
                }
                let Some(producer) = replica.producers.get(batch.producer) else { continue };
                for (endpoint, hashes) in &batch.records {
                    producer.apply_remote(*endpoint, hashes);
                }
                replica.scheduler.flush();
            }
        }
    }

    /// Installs in every replica the sum of the other replicas' own in-flight counts.
    pub(crate) fn exchange_in_flight(&mut self) {
        let plugins = self.replicas.first().map_or(0, |replica| replica.counters.len());
        for plugin in 0..plugins {
            let mut own: Vec<EndpointMap<InFlightCounts>> = Vec::with_capacity(self.replicas.len());
            for replica in &self.replicas {
                self.counts.clear();
                if let Some(counter) = replica.counters.get(plugin) {
                    counter.local_in_flight(&mut self.counts);
                }
                own.push(self.counts.iter().copied().collect());
            }
            for (index, replica) in self.replicas.iter().enumerate() {
                let mut peers: EndpointMap<InFlightCounts> = EndpointMap::default();
                for (other, counts) in own.iter().enumerate() {
                    if other == index {
                        continue;
                    }
                    for (endpoint, count) in counts {
                        let sum = peers.entry(*endpoint).or_default();
                        sum.requests += count.requests;
                        sum.tokens += count.tokens;
                    }
                }
                if let Some(counter) = replica.counters.get(plugin) {
                    counter.peers().replace(peers);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use scheduler_core::{Endpoint, EndpointState, InferenceRequest, PoolSnapshot};

    use super::*;

    const ACTIVE_REQUESTS: &str = "
plugins:
- type: active-request-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: active-request-scorer
  - pluginRef: max-score-picker
";

    fn pool() -> Arc<PoolSnapshot> {
        Arc::new(PoolSnapshot::new(["10.0.0.1:8000", "10.0.0.2:8000"].map(|address| {
            EndpointState::new(Endpoint::new(address.parse::<SocketAddr>().unwrap()))
        })))
    }

    fn counts(replicas: &ReplicaSet, replica: usize) -> Vec<(EndpointId, InFlightCounts)> {
        let mut out = Vec::new();
        replicas.replicas[replica].counters[0].local_in_flight(&mut out);
        out.sort_by_key(|(endpoint, _)| endpoint.0);
        out
    }

    #[test]
    fn synced_replicas_add_each_others_requests_in_flight() {
        let config = EndpointPickerConfig::from_yaml(ACTIVE_REQUESTS).unwrap();
        let mut replicas =
            ReplicaSet::build(&config, &EppReplicas::synced(3, ReplicaSync::default()), 7).unwrap();
        let pool = pool();
        let request = InferenceRequest::new("m", "hello".to_owned());
        let guards: Vec<_> = (0..3)
            .map(|_| {
                let mut result = replicas.scheduler(0).schedule(&request, &pool).unwrap();
                result.take_completion()
            })
            .collect();
        let own = counts(&replicas, 0);
        assert_eq!(own.iter().map(|(_, c)| c.requests).sum::<u64>(), 3, "{own:?}");
        assert!(counts(&replicas, 1).is_empty(), "replica 1 sent nothing itself");

        replicas.exchange_in_flight();
        for peer in [1, 2] {
            let table = &replicas.replicas[peer].counters[0];
            for (endpoint, count) in &own {
                assert_eq!(table.peers().get(*endpoint), *count, "replica {peer}");
            }
        }
        // A replica does not count its own requests twice.
        let zero = InFlightCounts::default();
        assert!(own.iter().all(|(e, _)| replicas.replicas[0].counters[0].peers().get(*e) == zero));

        drop(guards);
        replicas.exchange_in_flight();
        assert!(own.iter().all(|(e, _)| replicas.replicas[1].counters[0].peers().get(*e) == zero));
    }

    #[test]
    fn independent_replicas_keep_their_records_to_themselves() {
        let config = EndpointPickerConfig::gie_default();
        let mut replicas = ReplicaSet::build(&config, &EppReplicas::independent(2), 7).unwrap();
        let request = InferenceRequest::new("m", "a prompt long enough ".repeat(40));
        replicas.scheduler(0).schedule(&request, &pool()).unwrap();
        replicas.scheduler(0).flush();
        assert_eq!(replicas.dispatch(0, 0), None, "nothing is sent without sync");
    }

    #[test]
    fn records_reach_the_other_replicas_when_due() {
        let config = EndpointPickerConfig::gie_default();
        let sync = ReplicaSync { record_delay_s: 0.010, interval_s: 0.2 };
        let mut replicas = ReplicaSet::build(&config, &EppReplicas::synced(2, sync), 7).unwrap();
        let request = InferenceRequest::new("m", "a prompt long enough ".repeat(40));
        let picked = replicas.scheduler(0).schedule(&request, &pool()).unwrap().primary().id();
        replicas.scheduler(0).flush();
        let due = replicas.dispatch(0, 1_000).expect("a record was made");
        assert_eq!(due, 1_000 + 10_000_000);
        let held = |replicas: &ReplicaSet| {
            let index = replicas.replicas[1].producers[0].index();
            index.blocks_of(picked).len()
        };
        replicas.deliver(due - 1);
        assert_eq!(held(&replicas), 0, "not before it is due");
        replicas.deliver(due);
        assert!(held(&replicas) > 0, "the peer's index holds the record once due");
    }
}
