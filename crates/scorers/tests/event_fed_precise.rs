//! `precise-prefix-cache-producer` fed by its embedder instead of ZMQ subscriptions (feature
//! `kv-events-index`): matches follow the events applied to its index, and with llm-d's
//! `speculativeIndexing` a pick counts as held by its endpoint until `speculativeTTL` passes.

#![cfg(feature = "kv-events-index")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_events::{BlockStored, Event, EventBatch};
use parking_lot::Mutex;
use scheduler_core::{
    Endpoint, EndpointPickerConfig, EndpointState, InferenceRequest, PoolSnapshot, ScheduleOptions,
    Scheduler, SharedPool,
};
use scorers::precise_prefix::{EventFedProducer, PRODUCER_TYPE_NAME};
use scorers::prefix_cache::RecordApplication;

const CONFIG: &str = "
plugins:
- name: precise
  type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {blockSizeTokens: 4}
    SPECULATION
- type: prefix-cache-scorer
  parameters:
    prefixMatchInfoProducerName: precise
    affinityLoadTolerance: 0
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
  - pluginRef: max-score-picker
";

struct Fixture {
    scheduler: Scheduler,
    producer: Arc<EventFedProducer>,
    pool: Arc<PoolSnapshot>,
    start: Instant,
}

impl Fixture {
    fn new(speculation: &str) -> Self {
        let built: Arc<Mutex<Option<Arc<EventFedProducer>>>> = Arc::default();
        let mut registry = scorers::builtin_registry();
        let sink = Arc::clone(&built);
        registry.register(PRODUCER_TYPE_NAME, move |spec| {
            let (plugin, producer) = EventFedProducer::plugin(spec, RecordApplication::OnFlush)?;
            *sink.lock() = Some(producer);
            Ok(plugin)
        });
        let config =
            EndpointPickerConfig::from_yaml(&CONFIG.replace("SPECULATION", speculation)).unwrap();
        let scheduler = config.build(&registry).unwrap().with_seed(5);
        let shared = SharedPool::new(PoolSnapshot::new([]));
        scheduler.observe_pool(&shared);
        shared.publish(PoolSnapshot::new([
            EndpointState::new(Endpoint::new(([10, 0, 0, 1], 8000).into())),
            EndpointState::new(Endpoint::new(([10, 0, 0, 2], 8000).into())),
        ]));
        let producer = built.lock().clone().expect("the config builds the producer");
        Self { scheduler, producer, pool: shared.load(), start: Instant::now() }
    }

    /// The prefix scores of both endpoints for a 12-token prompt (three blocks) at `at`, and
    /// the endpoint picked.
    fn decide(&self, at: Duration) -> (Vec<f64>, usize) {
        let prompt: String = (1..=12).map(|token| format!("{token} ")).collect();
        let request = InferenceRequest::new("m", prompt.as_str());
        let options =
            ScheduleOptions { now: Some(self.start + at), explain: true, ..Default::default() };
        let result = self.scheduler.schedule_with(&request, &self.pool, options).unwrap();
        self.scheduler.flush();
        let scores = result.explanation().unwrap()[0].scorers[0].2.clone();
        let picked = self.pool.index_of(result.primary().id()).unwrap() as usize;
        (scores, picked)
    }

    /// Endpoint `server`'s engine stored the blocks of tokens 1..=8.
    fn engine_stored(&self, server: usize) {
        let batch = tokens_1_to_8_stored();
        let endpoint = self.pool.endpoints()[server].id();
        assert!(self.producer.index().apply_batch(endpoint, "m", &batch));
    }
}

/// An engine's report that it stored the two 4-token blocks of tokens 1..=8.
fn tokens_1_to_8_stored() -> EventBatch {
    EventBatch {
        ts: 0.0,
        events: vec![Event::BlockStored(BlockStored {
            block_hashes: vec![901, 902],
            token_ids: (1..=8).collect(),
            block_size: 4,
            ..BlockStored::default()
        })],
        data_parallel_rank: None,
    }
}

#[test]
fn matches_follow_the_events_the_embedder_applies() {
    let fixture = Fixture::new("speculativeIndexing: false");
    let (scores, _) = fixture.decide(Duration::ZERO);
    assert_eq!(scores, [0.0, 0.0]);
    // Without speculation, a pick is not a holding: the same prompt again finds nothing.
    let (scores, _) = fixture.decide(Duration::from_millis(10));
    assert_eq!(scores, [0.0, 0.0]);
    fixture.engine_stored(1);
    let (scores, picked) = fixture.decide(Duration::from_millis(20));
    assert_eq!(scores[0], 0.0);
    assert!((scores[1] - 2.0 / 3.0).abs() < 1e-9, "{scores:?}");
    assert_eq!(picked, 1);
}

#[test]
fn speculative_entries_hold_a_pick_until_their_ttl() {
    let fixture = Fixture::new("speculativeIndexing: true\n    speculativeTTL: 1s");
    let (scores, first) = fixture.decide(Duration::ZERO);
    assert_eq!(scores, [0.0, 0.0]);
    // 100 ms later the whole prompt counts as held where it was sent.
    let (scores, second) = fixture.decide(Duration::from_millis(100));
    assert_eq!(second, first);
    assert_eq!(scores[first], 1.0, "{scores:?}");
    assert_eq!(scores[1 - first], 0.0, "{scores:?}");
    // The second pick renewed the entries until 1.1 s; at 1.2 s they are gone.
    let (scores, _) = fixture.decide(Duration::from_millis(1200));
    assert_eq!(scores, [0.0, 0.0]);
    // Confirmed blocks outlive speculation: the engine's events still count after the TTL.
    fixture.engine_stored(1 - first);
    let (scores, picked) = fixture.decide(Duration::from_secs(10));
    assert!((scores[1 - first] - 2.0 / 3.0).abs() < 1e-9, "{scores:?}");
    assert_eq!(picked, 1 - first);
}

/// `p2p-source-producer` may name the precise producer: the peer it names upstream is the one
/// whose engine reported holding more of the prompt.
#[test]
fn the_p2p_source_is_the_engine_that_reported_the_blocks() {
    let built: Arc<Mutex<Option<Arc<EventFedProducer>>>> = Arc::default();
    let mut registry = scorers::builtin_registry();
    registry.allow_experimental_plugins(true);
    let sink = Arc::clone(&built);
    registry.register(PRODUCER_TYPE_NAME, move |spec| {
        let (plugin, producer) = EventFedProducer::plugin(spec, RecordApplication::OnFlush)?;
        *sink.lock() = Some(producer);
        Ok(plugin)
    });
    let yaml = "
plugins:
- name: precise
  type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {blockSizeTokens: 4}
- type: p2p-source-producer
  parameters: {prefixMatchInfoProducerName: precise}
- type: header-based-testing-filter
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: header-based-testing-filter
  - pluginRef: max-score-picker
";
    let scheduler =
        EndpointPickerConfig::from_yaml(yaml).unwrap().build(&registry).unwrap().with_seed(1);
    let shared = SharedPool::new(PoolSnapshot::new([]));
    scheduler.observe_pool(&shared);
    shared.publish(PoolSnapshot::new([
        EndpointState::new(Endpoint::new(([10, 0, 0, 1], 8000).into())),
        EndpointState::new(Endpoint::new(([10, 0, 0, 2], 8000).into())),
    ]));
    let pool = shared.load();
    let producer = built.lock().clone().unwrap();
    let prompt: String = (1..=12).map(|token| format!("{token} ")).collect();
    let request = InferenceRequest::new("m", prompt.as_str())
        .with_request_id("r1")
        .with_header("test-epp-endpoint-selection", "10.0.0.1");
    let result = scheduler.schedule(&request, &pool).unwrap();
    assert!(result.upstream_headers().is_empty(), "no engine holds anything yet");
    drop(result);
    let batch = tokens_1_to_8_stored();
    assert!(producer.index().apply_batch(pool.endpoints()[1].id(), "m", &batch));
    let result = scheduler.schedule(&request, &pool).unwrap();
    assert_eq!(result.primary().endpoint.address.to_string(), "10.0.0.1:8000");
    assert_eq!(
        result.upstream_headers(),
        [("x-kv-cache-source-host-port", "10.0.0.2:8000".to_owned())]
    );
}
