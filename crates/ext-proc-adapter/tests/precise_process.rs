//! The real `epp` binary built with `kv-events` and `tokenizers`, routing chat requests sent
//! as text by what the engines report holding: engines publish their KV-cache events over
//! ZMQ to the central socket `epp` binds (`kvEventsConfig.zmqEndpoint`), and `epp` tokenizes
//! each request with the model's tokenizer and chat template (`token-producer`), so a
//! conversation goes where its blocks are.

#![cfg(all(feature = "kv-events", feature = "tokenizers"))]

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use demo::{ModelServerConfig, RunningModelServer};
use kv_events::publisher::Publisher;
use kv_events::{BlockStored, Encoding, Event, EventBatch};
use support::process::{free_port, metric, route, spawn_epp, write_pool};
use tokenizer::{ChatMessage, PromptTokenizer, TokenizerFiles};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tokenizer/fixtures").join(name)
}

async fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

fn config(zmq_port: u16) -> String {
    format!(
        "plugins:
- type: token-producer
  parameters:
    modelName: llama-3-8b
    tokenizerFile: '{tokenizer}'
    tokenizerConfigFile: '{config}'
- name: precise
  type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {{blockSize: 4}}
    kvEventsConfig: {{zmqEndpoint: 'tcp://127.0.0.1:{zmq_port}', discoverPods: false}}
- type: prefix-cache-scorer
  parameters: {{prefixMatchInfoProducerName: precise, affinityLoadTolerance: 0}}
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
    weight: 10
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
",
        tokenizer = fixture("tokenizer.json").display(),
        config = fixture("llama3.json").display(),
    )
}

/// The conversation of `topic`, as the client sends it and as the engine renders it.
fn conversation(topic: &str) -> Vec<(&'static str, String)> {
    vec![
        ("system", "You are the scheduling assistant of a large inference pool.".to_owned()),
        ("user", format!("Explain {topic} to an operator who runs vLLM on Kubernetes, please.")),
    ]
}

/// The endpoint `epp` at `grpc` picks for a chat of `turns`.
async fn route_chat(grpc: SocketAddr, turns: &[(&str, String)]) -> String {
    let messages: Vec<serde_json::Value> = turns
        .iter()
        .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
        .collect();
    let body = serde_json::json!({"model": "llama-3-8b", "messages": messages, "max_tokens": 1});
    route(grpc, "/v1/chat/completions", &body.to_string()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chats_sent_as_text_go_where_the_engines_report_their_blocks() {
    let mut servers = Vec::new();
    for _ in 0..4 {
        servers.push(RunningModelServer::start(ModelServerConfig::default()).await.unwrap());
    }
    let dir = std::env::temp_dir().join(format!("epp-precise-process-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pool = write_pool(&dir, &servers);
    let zmq_port = free_port();
    let config_file = dir.join("precise.yaml");
    std::fs::write(&config_file, config(zmq_port)).unwrap();
    let (_epp, grpc, metrics) = spawn_epp(&config_file, &pool);
    let scraped = wait_for(Duration::from_secs(20), || {
        metric(metrics, "inference_pool_ready_pods", "") == Some(servers.len() as f64)
    })
    .await;
    assert!(scraped, "epp never scraped the pool");

    // Each engine served one conversation and published the blocks it computed, on the topic
    // llm-d's engines use: kv@<pod ip:port>@<model>.
    let engine = PromptTokenizer::from_files(&TokenizerFiles {
        tokenizer: Some(&fixture("tokenizer.json")),
        tokenizer_config: Some(&fixture("llama3.json")),
        chat_template: None,
    })
    .unwrap();
    let topics = ["prefix caching", "KV-cache events", "flow control", "LoRA affinity"];
    let mut publishers = Vec::new();
    for (server, topic) in servers.iter().zip(topics) {
        let turns = conversation(topic);
        let messages: Vec<ChatMessage<'_>> =
            turns.iter().map(|(role, content)| ChatMessage { role, content }).collect();
        let mut tokens = Vec::new();
        engine.encode_chat(&messages, &mut tokens).unwrap();
        let whole = tokens.len() / 4 * 4;
        let batch = EventBatch {
            ts: 0.0,
            events: vec![Event::BlockStored(BlockStored {
                block_hashes: (0..(whole / 4) as u64).map(|n| n + 1).collect(),
                token_ids: tokens[..whole].to_vec(),
                block_size: 4,
                ..BlockStored::default()
            })],
            data_parallel_rank: None,
        };
        let topic = format!("kv@{}@llama-3-8b", server.address);
        let mut publisher = Publisher::connect(
            &format!("tcp://127.0.0.1:{zmq_port}"),
            &topic,
            Encoding::ArrayTagged,
        )
        .await
        .unwrap();
        // A PUB socket drops what it sends before the subscription reaches it: publish until
        // the index holds this engine's blocks.
        let expected = metric(metrics, "llm_d_epp_kv_cache_index_blocks", "").unwrap_or(0.0)
            + (whole / 4) as f64;
        let deadline = Instant::now() + Duration::from_secs(10);
        while metric(metrics, "llm_d_epp_kv_cache_index_blocks", "") < Some(expected) {
            assert!(Instant::now() < deadline, "the index never received {topic}'s blocks");
            publisher.publish(&batch).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        publishers.push(publisher);
    }

    // The next turn of each conversation, sent as text, goes to the engine that holds it.
    for (server, topic) in servers.iter().zip(topics) {
        let mut turns = conversation(topic);
        turns.push(("assistant", "Gladly.".to_owned()));
        turns.push(("user", "Go on.".to_owned()));
        let destination = route_chat(grpc, &turns).await;
        assert_eq!(destination, server.address.to_string(), "conversation about {topic}");
    }
    let tokenized =
        metric(metrics, "epp_token_producer_prompts_total", "outcome=\"tokenized\"").unwrap();
    assert_eq!(tokenized, topics.len() as f64);
    assert_eq!(
        metric(metrics, "epp_token_producer_prompts_total", "outcome=\"failed\""),
        Some(0.0)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
