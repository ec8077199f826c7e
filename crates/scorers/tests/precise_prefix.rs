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
    kvEventsConfig: {zmqEndpoint: 'tcp://127.0.0.1:0', topicFilter: 'kv@'}
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

    fn stored(hashes: Vec<u64>, parent: Option<u64>, tokens: std::ops::Range<u32>) -> EventBatch {
        EventBatch {
            ts: 0.0,
            events: vec![Event::BlockStored(BlockStored {
                block_hashes: hashes,
                parent_block_hash: parent,
                token_ids: tokens.collect(),
                block_size: 4,
                ..BlockStored::default()
            })],
            data_parallel_rank: None,
        }
    }

    /// llm-d's global socket: the producer binds `zmqEndpoint`, the engines connect and are
    /// told apart by topic; with `discoverPods: false` nothing is subscribed per endpoint.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_central_socket_attributes_engines_by_topic() {
        let parameters: PrecisePrefixParameters = serde_json::from_value(serde_json::json!({
            "tokenProcessorConfig": {"blockSizeTokens": 4},
            "kvEventsConfig": {"zmqEndpoint": "tcp://127.0.0.1:0", "discoverPods": false}
        }))
        .unwrap();
        let producer = PrecisePrefixProducer::new(&parameters.resolve().unwrap()).unwrap();
        let central = producer.central().expect("zmqEndpoint binds a central socket");
        let address = format!("tcp://{}", central.local_addr());
        let a = EndpointState::new(Endpoint::new(([10, 0, 0, 1], 8000).into()));
        let b = EndpointState::new(Endpoint::new(([10, 0, 0, 2], 8000).into()));
        let (a_id, b_id) = (a.id(), b.id());
        producer.membership_changed(&PoolSnapshot::new([a, b]));
        assert!(producer.subscribers().endpoints().is_empty(), "discoverPods: false");

        // One engine names itself by ip:port (llm-d's form), the other by IP alone.
        let mut pub_a =
            Publisher::connect(&address, "kv@10.0.0.1:8000@m", Encoding::Map).await.unwrap();
        let mut pub_b =
            Publisher::connect(&address, "kv@10.0.0.2@m", Encoding::ArrayTagged).await.unwrap();
        let mut keys_a = Vec::new();
        producer.index().processor().request_keys("m", &[1, 2, 3, 4], 8, &mut keys_a);
        let mut keys_b = Vec::new();
        producer.index().processor().request_keys("m", &[5, 6, 7, 8], 8, &mut keys_b);
        let index = producer.index();
        let mut seen = false;
        for _ in 0..250 {
            // Resent until delivered: a restart of the numbering is harmless here.
            pub_a.publish(&stored(vec![11], None, 1..5)).await.unwrap();
            pub_b.publish(&stored(vec![21], None, 5..9)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            if index.holds_key(a_id, keys_a[0]) && index.holds_key(b_id, keys_b[0]) {
                seen = true;
                break;
            }
        }
        assert!(seen, "{:?} {:?}", central.stats(), index.stats());
        assert!(!index.holds_key(a_id, keys_b[0]));
        assert!(!index.holds_key(b_id, keys_a[0]));

        // A departed endpoint's topic is no longer routed.
        let b = EndpointState::new(Endpoint::new(([10, 0, 0, 2], 8000).into()));
        producer.membership_changed(&PoolSnapshot::new([b]));
        assert_eq!(index.blocks_held(a_id), 0);
        let unknown = central.stats().unknown_publishers;
        for _ in 0..250 {
            pub_a.publish(&stored(vec![12], None, 1..5)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            if central.stats().unknown_publishers > unknown {
                break;
            }
        }
        assert!(central.stats().unknown_publishers > unknown);
        assert_eq!(index.blocks_held(a_id), 0);
    }

    /// The value of the sample `name{plugin="<plugin>"<extra>}` in a text exposition.
    fn sample(text: &str, name: &str, plugin: &str, extra: &str) -> Option<f64> {
        let head = format!("{name}{{plugin=\"{plugin}\"{extra}}} ");
        text.lines().find_map(|line| line.strip_prefix(head.as_str())?.parse().ok())
    }

    /// The metrics the binary exposes for a configured producer, after known events.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metrics_report_what_the_index_saw() {
        let yaml = LLM_D_PRECISE
            .replace(
                "tokenProcessorConfig:\n      blockSize: 64",
                "tokenProcessorConfig:\n      blockSizeTokens: 4",
            )
            .replace(
                "topicFilter: kv@",
                "topicFilter: kv@\n      zmqEndpoint: tcp://127.0.0.1:0\n      discoverPods: false",
            )
            .replace(
                "- type: precise-prefix-cache-producer",
                "- type: precise-prefix-cache-producer\n  name: precise-prefix-cache-producer",
            );
        let registry = builtin_registry();
        let config = EndpointPickerConfig::from_yaml(&yaml).unwrap();
        let plugins = config.construct_plugins(&registry).unwrap();
        let producers = scorers::precise_prefix::precise_producers(&plugins);
        assert_eq!(producers.len(), 1);
        let (name, producer) = &producers[0];
        assert_eq!(name, "precise-prefix-cache-producer");

        let a = EndpointState::new(Endpoint::new(([10, 0, 0, 1], 8000).into()));
        let b = EndpointState::new(Endpoint::new(([10, 0, 0, 2], 8000).into()));
        let (a_id, b_id) = (a.id(), b.id());
        producer.membership_changed(&PoolSnapshot::new([a, b]));
        let index = producer.index();
        let encode = |batch: &EventBatch| kv_events::encode_batch(batch, Encoding::Map);
        // A: three blocks in two batches; B: one block, then a gap.
        index.ingest(a_id, 0, "m", &encode(&stored(vec![1, 2], None, 0..8))).unwrap();
        index.ingest(a_id, 1, "m", &encode(&stored(vec![3], Some(2), 8..12))).unwrap();
        index.ingest(b_id, 0, "m", &encode(&stored(vec![7], None, 0..4))).unwrap();
        index.ingest(b_id, 5, "m", &encode(&stored(vec![8], None, 4..8))).unwrap();
        // An engine block of 16 tokens carrying 15: skipped (a whole one would be split into
        // four blocks of blockSizeTokens).
        let mut ragged = stored(vec![9], None, 0..15);
        if let Event::BlockStored(ev) = &mut ragged.events[0] {
            ev.block_size = 16;
        }
        index.ingest(a_id, 2, "m", &encode(&ragged)).unwrap();
        // A payload that does not decode, on A: A becomes untrusted too.
        assert!(index.ingest(a_id, 3, "m", b"\xc1").is_err());

        let mut text = String::new();
        producer.render_metrics(name, &mut text);
        let value = |metric: &str, extra: &str| sample(&text, metric, name, extra);
        assert_eq!(value("llm_d_epp_kv_cache_events_batches_total", ""), Some(5.0), "{text}");
        assert_eq!(value("llm_d_epp_kv_cache_index_admissions_total", ""), Some(5.0));
        assert_eq!(value("llm_d_epp_kv_cache_events_sequence_gaps_total", ""), Some(1.0));
        assert_eq!(value("llm_d_epp_kv_cache_events_decode_errors_total", ""), Some(1.0));
        assert_eq!(
            value("llm_d_epp_kv_cache_events_skipped_total", ",reason=\"non_dense_block_span\""),
            Some(1.0)
        );
        // B's gap dropped its first block; it holds the one stored after the gap.
        assert_eq!(value("llm_d_epp_kv_cache_index_blocks", ""), Some(1.0));
        assert_eq!(value("llm_d_epp_kv_cache_index_endpoints", ",state=\"untrusted\""), Some(2.0));
        assert_eq!(value("llm_d_epp_kv_cache_index_endpoints", ",state=\"trusted\""), Some(0.0));
        assert_eq!(value("llm_d_epp_kv_cache_events_active_subscribers", ""), Some(0.0));
        assert_eq!(
            value(
                "llm_d_epp_kv_cache_events_unknown_endpoint_messages_total",
                ",source=\"central\""
            ),
            Some(0.0)
        );
        // Every sample belongs to a family declared before it.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let family = line.split('{').next().unwrap();
            assert!(text.contains(&format!("# TYPE {family} ")), "{line}");
        }
        // A plugin name that needs escaping stays one label value.
        let mut text = String::new();
        producer.render_metrics("a\"b\\c\nd", &mut text);
        assert!(text.contains("plugin=\"a\\\"b\\\\c\\nd\""), "{text}");
        assert_eq!(
            text.lines().filter(|l| l.starts_with("llm_d_epp_kv_cache_index_blocks{")).count(),
            1
        );
    }
}
