//! `precise-prefix-cache-producer`, `precise-prefix-cache-scorer` and `prefix-cache-scorer
//! {mode: cache_tracking}`: refused with the feature named in a default build; with the
//! `kv-events` feature, subscriptions that follow the pool and decisions that fall back to the
//! approximate index for requests without token ids.

mod common;

use scheduler_core::EndpointPickerConfig;
use scorers::builtin_registry;

fn load(yaml: &str) -> Result<(), String> {
    let registry = builtin_registry();
    let config = EndpointPickerConfig::from_yaml(yaml).map_err(|e| e.to_string())?;
    let plugins = config.construct_plugins(&registry).map_err(|e| e.to_string())?;
    config.build_with(&plugins, &registry).map_err(|e| e.to_string())?;
    Ok(())
}

/// llm-d-router's `deploy/config/epp-precise-prefix-cache-config.yaml`, trimmed to scheduling.
const LLM_D_PRECISE: &str = "
plugins:
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig:
      blockSize: 64
    indexerConfig:
      kvBlockIndexConfig:
        enableMetrics: true
    kvEventsConfig:
      topicFilter: kv@
- type: prefix-cache-scorer
  parameters:
    prefixMatchInfoProducerName: precise-prefix-cache-producer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
    weight: 2
  - pluginRef: max-score-picker
";

const DEPRECATED_SCORER: &str = "
plugins:
- type: precise-prefix-cache-scorer
  parameters:
    indexerConfig:
      tokenProcessorConfig: {blockSize: 16, hashSeed: '12345'}
    kvEventsConfig: {zmqEndpoint: 'tcp://*:5557', topicFilter: 'kv@'}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: precise-prefix-cache-scorer
  - pluginRef: max-score-picker
";

const CACHE_TRACKING: &str = "
plugins:
- type: prefix-cache-scorer
  parameters:
    mode: cache_tracking
    kvEventsConfig: {topicFilter: 'kv@'}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
  - pluginRef: max-score-picker
";

#[test]
fn other_modes_of_prefix_cache_scorer() {
    let with_mode = |mode: &str| CACHE_TRACKING.replace("cache_tracking", mode);
    let estimate = CACHE_TRACKING
        .replace("mode: cache_tracking", "mode: estimate")
        .replace("kvEventsConfig: {topicFilter: 'kv@'}", "blockSizeTokens: 16");
    assert_eq!(load(&estimate), Ok(()));
    // The approximate mode keeps the approximate parameters only.
    let error = load(&with_mode("estimate")).unwrap_err();
    assert!(error.contains("kvEventsConfig"), "{error}");
    let error = load(&with_mode("psychic")).unwrap_err();
    assert!(error.contains("psychic"), "{error}");
}

#[cfg(not(feature = "kv-events"))]
#[test]
fn without_the_feature_each_form_is_refused_naming_it() {
    for yaml in [LLM_D_PRECISE, DEPRECATED_SCORER, CACHE_TRACKING] {
        let error = load(yaml).unwrap_err();
        assert!(error.contains("--features kv-events"), "{error}");
    }
    // A bad parameter is reported as such, before the missing feature.
    let error = load(&LLM_D_PRECISE.replace("blockSize: 64", "blockSize: -3")).unwrap_err();
    assert!(error.contains("-3") && !error.contains("--features"), "{error}");
}

#[cfg(feature = "kv-events")]
mod with_feature {
    use std::sync::Arc;
    use std::time::Duration;

    use kv_events::publisher::Publisher;
    use kv_events::{BlockStored, Encoding, Event, EventBatch};
    use scheduler_core::{Endpoint, EndpointState, PoolObserver, PoolSnapshot};
    use scorers::precise_prefix::{PrecisePrefixParameters, PrecisePrefixProducer};

    use super::*;

    #[test]
    fn pre_tokenized_prompts_are_read_back() {
        let mut out = Vec::new();
        assert!(scorers::precise_prefix::token_ids_of("1 22 333 ", &mut out));
        assert_eq!(out, vec![1, 22, 333]);
        for text in ["", "1 2", "1  2 ", "a 2 ", "-1 ", "4294967296 ", "hello "] {
            assert!(!scorers::precise_prefix::token_ids_of(text, &mut out), "{text:?}");
        }
        // What the request parser makes of vLLM's token_ids.
        let body = scheduler_core::ParsedBody::parse(
            Some("/inference/v1/generate"),
            br#"{"model": "m", "token_ids": [5, 6, 7]}"#,
        )
        .unwrap();
        assert!(scorers::precise_prefix::token_ids_of(&body.prompt, &mut out), "{:?}", body.prompt);
        assert_eq!(out, vec![5, 6, 7]);
    }

    /// Publisher -> subscription -> index -> producer -> prefix-cache-scorer -> pick, through a
    /// config as llm-d writes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pre_tokenized_request_goes_where_the_engine_holds_its_prefix() {
        use scheduler_core::{InferenceRequest, ScheduleOptions, SharedPool};

        let mut publisher =
            Publisher::bind("tcp://127.0.0.1:0", "kv@pod-b@m", Encoding::Map).await.unwrap();
        let port: u16 = publisher.endpoint().rsplit(':').next().unwrap().parse().unwrap();
        let yaml = LLM_D_PRECISE
            .replace(
                "tokenProcessorConfig:\n      blockSize: 64",
                "tokenProcessorConfig:\n      blockSizeTokens: 4",
            )
            .replace(
                "topicFilter: kv@",
                &format!("topicFilter: kv@\n      podDiscoveryConfig: {{socketPort: {port}}}"),
            )
            // The exact match ratio, whatever the picks the loop below leaves in flight (the
            // default load-aware affinity would discount a busier holder).
            .replace(
                "prefixMatchInfoProducerName: precise-prefix-cache-producer",
                "prefixMatchInfoProducerName: precise-prefix-cache-producer\n    affinityLoadTolerance: 0",
            );
        let registry = builtin_registry();
        let config = EndpointPickerConfig::from_yaml(&yaml).unwrap();
        let plugins = config.construct_plugins(&registry).unwrap();
        let scheduler = config.build_with(&plugins, &registry).unwrap().with_seed(3);
        // Endpoint A's publisher address has nothing listening; B's is the test publisher.
        let a = EndpointState::new(Endpoint::new(([127, 0, 0, 2], 8000).into()));
        let b = EndpointState::new(Endpoint::new(([127, 0, 0, 1], 8001).into()));
        let shared = SharedPool::new(PoolSnapshot::new([]));
        scheduler.observe_pool(&shared);
        shared.publish(PoolSnapshot::new([a, b]));
        let pool = shared.load();

        // B's engine stored the blocks of tokens 1..=8 (two blocks of 4).
        let stored = EventBatch {
            ts: 0.0,
            events: vec![Event::BlockStored(BlockStored {
                block_hashes: vec![71, 72],
                token_ids: (1..=8).collect(),
                block_size: 4,
                ..BlockStored::default()
            })],
            data_parallel_rank: None,
        };
        let prompt: String = (1..=12).map(|t| format!("{t} ")).collect();
        let request = InferenceRequest::new("m", prompt.as_str());
        let options = ScheduleOptions { explain: true, ..Default::default() };
        let mut scores = Vec::new();
        for _ in 0..200 {
            publisher.publish(&stored).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            let result = scheduler.schedule_with(&request, &pool, options).unwrap();
            scores = result.explanation().unwrap()[0].scorers[0].2.clone();
            if scores[1] > 0.0 {
                assert_eq!(result.primary().endpoint.address.port(), 8001);
                break;
            }
        }
        // Two of the request's three blocks are held by B, none by A.
        assert_eq!(scores.len(), 2);
        assert_eq!(scores[0], 0.0);
        assert!((scores[1] - 2.0 / 3.0).abs() < 1e-9, "{scores:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_form_loads() {
        for yaml in [LLM_D_PRECISE, DEPRECATED_SCORER, CACHE_TRACKING] {
            assert_eq!(load(yaml), Ok(()));
        }
    }

    #[test]
    fn outside_a_runtime_the_producer_is_refused() {
        let error = load(LLM_D_PRECISE).unwrap_err();
        assert!(error.contains("tokio runtime"), "{error}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn subscriptions_follow_the_pool_and_feed_the_index() {
        let mut publisher =
            Publisher::bind("tcp://127.0.0.1:0", "kv@pod@m", Encoding::ArrayTagged).await.unwrap();
        let port: u16 = publisher.endpoint().rsplit(':').next().unwrap().parse().unwrap();
        let parameters: PrecisePrefixParameters = serde_json::from_value(serde_json::json!({
            "tokenProcessorConfig": {"blockSizeTokens": 4},
            "kvEventsConfig": {"podDiscoveryConfig": {"socketPort": port}}
        }))
        .unwrap();
        let producer = PrecisePrefixProducer::new(&parameters.resolve().unwrap()).unwrap();
        let endpoint = EndpointState::new(Endpoint::new(([127, 0, 0, 1], 8000).into()));
        let id = endpoint.id();
        producer.membership_changed(&PoolSnapshot::new([endpoint]));
        assert_eq!(producer.subscribers().endpoints(), vec![id]);

        let batch = EventBatch {
            ts: 0.0,
            events: vec![Event::BlockStored(BlockStored {
                block_hashes: vec![9],
                token_ids: vec![1, 2, 3, 4],
                block_size: 4,
                ..BlockStored::default()
            })],
            data_parallel_rank: None,
        };
        let mut keys = Vec::new();
        producer.index().processor().request_keys("m", &[1, 2, 3, 4], 8, &mut keys);
        let mut seen = false;
        for _ in 0..200 {
            publisher.publish(&batch).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            if producer.index().holds_key(id, keys[0]) {
                seen = true;
                break;
            }
        }
        assert!(seen, "the endpoint's stored block never reached the index");

        // The endpoint leaves the pool: its subscription and blocks go.
        producer.membership_changed(&PoolSnapshot::new([]));
        assert!(producer.subscribers().endpoints().is_empty());
        assert_eq!(producer.index().blocks_held(id), 0);
        let _ = Arc::clone(producer.fallback());
    }
}
