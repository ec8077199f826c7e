//! llm-d's global socket over loopback ZMQ: two publishers connect to one central SUB socket
//! with their own topics; the index keeps their blocks and their sequence numbers apart.

use std::sync::Arc;
use std::time::Duration;

use kv_events::central::{CentralConfig, CentralSubscriber};
use kv_events::publisher::Publisher;
use kv_events::{
    BlockStored, Encoding, EndpointMatch, Event, EventBatch, IndexConfig, PreciseIndex,
    TokenProcessor, TokenProcessorConfig,
};

const BS: u32 = 4;

fn stored(hashes: std::ops::Range<u64>, parent: Option<u64>, first_token: u32) -> EventBatch {
    let n = (hashes.end - hashes.start) as u32;
    EventBatch {
        ts: 1.0,
        events: vec![Event::BlockStored(BlockStored {
            block_hashes: hashes.collect(),
            parent_block_hash: parent,
            token_ids: (first_token..first_token + n * BS).collect(),
            block_size: BS,
            ..BlockStored::default()
        })],
        data_parallel_rank: None,
    }
}

fn cleared() -> EventBatch {
    EventBatch { ts: 1.0, events: vec![Event::AllBlocksCleared], data_parallel_rank: None }
}

fn keys(index: &PreciseIndex<u32>, model: &str, first_token: u32, blocks: u32) -> Vec<u64> {
    let tokens: Vec<u32> = (first_token..first_token + blocks * BS).collect();
    let mut keys = Vec::new();
    index.processor().request_keys(model, &tokens, 1024, &mut keys);
    keys
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..250 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Publishes clears until the index has applied one more (a PUB socket drops what it sends
/// before the subscription reaches it).
async fn until_delivered(publisher: &mut Publisher, index: &PreciseIndex<u32>) {
    let before = index.stats().clears;
    for _ in 0..250 {
        publisher.publish(&cleared()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        if index.stats().clears > before {
            return;
        }
    }
    panic!("the central socket never received {publisher:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_publishers_share_one_central_socket() {
    let processor =
        TokenProcessor::new(&TokenProcessorConfig { block_size_tokens: BS, ..Default::default() });
    let index = Arc::new(PreciseIndex::<u32>::new(processor, IndexConfig::default()));
    index.add_endpoint(1);
    index.add_endpoint(2);
    let central = CentralSubscriber::bind(
        Arc::clone(&index),
        CentralConfig {
            endpoint: "tcp://127.0.0.1:0".into(),
            topic_filter: "kv@".into(),
            default_model: "fallback".into(),
        },
        &tokio::runtime::Handle::current(),
    )
    .unwrap();
    central.set_routes([
        (1u32, vec!["10.0.0.1:8000".to_owned(), "10.0.0.1".to_owned()]),
        (2u32, vec!["10.0.0.2:8000".to_owned(), "10.0.0.2".to_owned()]),
    ]);
    let address = format!("tcp://{}", central.local_addr());

    let mut a = Publisher::connect(&address, "kv@10.0.0.1:8000@llama", Encoding::ArrayTagged)
        .await
        .unwrap();
    // The second publisher names its pod by IP only (the older llm-d-kv-cache convention).
    let mut b = Publisher::connect(&address, "kv@10.0.0.2@llama", Encoding::Map).await.unwrap();
    until_delivered(&mut a, &index).await;
    until_delivered(&mut b, &index).await;

    // Each publisher's blocks land on its own endpoint, rooted at the topic's model.
    a.publish(&stored(100..103, None, 0)).await.unwrap();
    b.publish(&stored(200..202, None, 1000)).await.unwrap();
    let a_keys = keys(&index, "llama", 0, 3);
    let b_keys = keys(&index, "llama", 1000, 2);
    eventually("both stores", || {
        index.longest_prefix(1, &a_keys) == EndpointMatch::Blocks(3)
            && index.longest_prefix(2, &b_keys) == EndpointMatch::Blocks(2)
    })
    .await;
    assert_eq!(index.longest_prefix(2, &a_keys), EndpointMatch::Blocks(0));
    assert_eq!(index.longest_prefix(1, &b_keys), EndpointMatch::Blocks(0));
    assert_eq!(index.key_of(1, 102), Some(a_keys[2]));
    assert_eq!(index.key_of(2, 102), None);

    // Lost messages on b's stream untrust b only: a's numbering is its own.
    let gaps = index.stats().gaps;
    b.skip(3);
    b.publish(&stored(210..211, None, 5000)).await.unwrap();
    a.publish(&stored(103..104, Some(102), 12)).await.unwrap();
    eventually("b's gap", || index.is_trusted(2) == Some(false)).await;
    let a_keys = keys(&index, "llama", 0, 4);
    eventually("a's next store", || index.longest_prefix(1, &a_keys) == EndpointMatch::Blocks(4))
        .await;
    assert_eq!(index.stats().gaps, gaps + 1);
    assert_eq!(index.is_trusted(1), Some(true));
    assert_eq!(index.longest_prefix(2, &b_keys), EndpointMatch::Untrusted);

    // A pod nobody routes: counted, and nothing is applied anywhere.
    let batches = index.stats().batches;
    let mut stranger =
        Publisher::connect(&address, "kv@10.9.9.9:8000@llama", Encoding::ArrayTagged)
            .await
            .unwrap();
    let unknown = central.stats().unknown_publishers;
    for _ in 0..250 {
        stranger.publish(&stored(300..302, None, 0)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        if central.stats().unknown_publishers > unknown {
            break;
        }
    }
    assert!(central.stats().unknown_publishers > unknown, "{:?}", central.stats());
    assert_eq!(index.stats().batches, batches);
    assert_eq!(index.key_of(1, 300), None);
    assert_eq!(index.key_of(2, 300), None);
    assert_eq!(central.stats().malformed_messages, 0);
}
