//! End to end over loopback ZMQ: a publisher emitting vLLM's bytes, the subscriptions, the
//! index, lookups; sequence gaps; a publisher restart.

use std::sync::Arc;
use std::time::Duration;

use kv_events::publisher::Publisher;
use kv_events::subscriber::{SubscriberConfig, Subscribers};
use kv_events::{
    BlockStored, Encoding, EndpointMatch, Event, EventBatch, IndexConfig, PreciseIndex,
    TokenProcessor, TokenProcessorConfig,
};

const BS: u32 = 4;

fn index() -> Arc<PreciseIndex<u32>> {
    let p =
        TokenProcessor::new(&TokenProcessorConfig { block_size_tokens: BS, ..Default::default() });
    Arc::new(PreciseIndex::new(p, IndexConfig::default()))
}

fn config() -> SubscriberConfig {
    SubscriberConfig {
        topic_filter: "kv@".into(),
        default_model: "fallback".into(),
        connect_timeout: Duration::from_millis(500),
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..SubscriberConfig::default()
    }
}

fn stored(hashes: std::ops::Range<u64>, parent: Option<u64>, first_token: u32) -> EventBatch {
    let n = (hashes.end - hashes.start) as u32;
    EventBatch {
        ts: 1.0,
        events: vec![Event::BlockStored(BlockStored {
            block_hashes: hashes.collect(),
            parent_block_hash: parent,
            token_ids: (first_token..first_token + n * BS).collect(),
            block_size: BS,
            medium: Some("GPU".into()),
            ..BlockStored::default()
        })],
        data_parallel_rank: Some(0),
    }
}

fn cleared() -> EventBatch {
    EventBatch { ts: 1.0, events: vec![Event::AllBlocksCleared], data_parallel_rank: None }
}

/// Publishes clears until the subscriber has applied one (ZMQ drops what a PUB socket sends
/// before the subscription reaches it), then returns.
async fn until_connected(publisher: &mut Publisher, index: &PreciseIndex<u32>) {
    let before = index.stats().clears;
    for _ in 0..200 {
        publisher.publish(&cleared()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        if index.stats().clears > before {
            return;
        }
    }
    panic!("the subscriber never received a message");
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

fn request_keys(index: &PreciseIndex<u32>, model: &str, blocks: u32) -> Vec<u64> {
    let tokens: Vec<u32> = (0..blocks * BS).collect();
    let mut keys = Vec::new();
    index.processor().request_keys(model, &tokens, 1024, &mut keys);
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_to_index_to_lookup_in_both_encodings() {
    let index = index();
    let subs = Subscribers::new(Arc::clone(&index), config(), tokio::runtime::Handle::current());
    let mut a = Publisher::bind("tcp://127.0.0.1:0", "kv@pod-a@llama", Encoding::ArrayTagged)
        .await
        .unwrap();
    let mut b =
        Publisher::bind("tcp://127.0.0.1:0", "kv@pod-b@llama", Encoding::Map).await.unwrap();
    subs.set_endpoints([(1, a.endpoint().to_owned()), (2, b.endpoint().to_owned())]);
    until_connected(&mut a, &index).await;
    until_connected(&mut b, &index).await;

    // Endpoint 1 holds blocks 0..3 of the prompt (in two events chained by parent hash),
    // endpoint 2 holds block 0 only.
    a.publish(&stored(100..102, None, 0)).await.unwrap();
    a.publish(&stored(102..103, Some(101), 2 * BS)).await.unwrap();
    b.publish(&stored(200..201, None, 0)).await.unwrap();
    let keys = request_keys(&index, "llama", 4);
    let mut out = [EndpointMatch::Unknown; 3];
    eventually("both endpoints' stores", || {
        index.match_endpoints(&keys, &[1, 2, 3], &mut out);
        out == [EndpointMatch::Blocks(3), EndpointMatch::Blocks(1), EndpointMatch::Unknown]
    })
    .await;
    // The model came from the topic: the same tokens under another model match nothing.
    assert_eq!(
        index.longest_prefix(1, &request_keys(&index, "other", 4)),
        EndpointMatch::Blocks(0)
    );

    // Pool membership: endpoint 2 leaves.
    subs.set_endpoints([(1, a.endpoint().to_owned())]);
    assert_eq!(index.longest_prefix(2, &keys), EndpointMatch::Unknown);
    assert_eq!(subs.endpoints(), vec![1]);
    assert_eq!(subs.stats().malformed_messages, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_gap_untrusts_until_all_blocks_cleared() {
    let index = index();
    let subs = Subscribers::new(Arc::clone(&index), config(), tokio::runtime::Handle::current());
    let mut p =
        Publisher::bind("tcp://127.0.0.1:0", "kv@pod@m", Encoding::ArrayTagged).await.unwrap();
    subs.add(1, p.endpoint());
    until_connected(&mut p, &index).await;
    p.publish(&stored(1..3, None, 0)).await.unwrap();
    let keys = request_keys(&index, "m", 2);
    eventually("the store", || index.longest_prefix(1, &keys) == EndpointMatch::Blocks(2)).await;

    p.skip(3); // three messages lost
    p.publish(&stored(1..3, None, 0)).await.unwrap();
    eventually("the gap", || index.longest_prefix(1, &keys) == EndpointMatch::Untrusted).await;
    assert_eq!(index.stats().gaps, 1);

    p.publish(&cleared()).await.unwrap();
    p.publish(&stored(1..2, None, 0)).await.unwrap();
    eventually("trust after the clear", || {
        index.longest_prefix(1, &keys) == EndpointMatch::Blocks(1)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscription_survives_a_publisher_restart() {
    let index = index();
    let quick = SubscriberConfig { connect_timeout: Duration::from_millis(50), ..config() };
    let subs = Subscribers::new(Arc::clone(&index), quick, tokio::runtime::Handle::current());
    // Subscribe before the publisher exists: the first connection attempts fail and back off.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("tcp://{}", probe.local_addr().unwrap());
    drop(probe);
    subs.add(1, &address);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(subs.stats().connect_failures >= 1, "{:?}", subs.stats());
    assert_eq!(subs.stats().connects, 0);

    let mut p = Publisher::bind(&address, "kv@pod@m", Encoding::Map).await.unwrap();
    until_connected(&mut p, &index).await;
    p.publish(&stored(1..3, None, 0)).await.unwrap();
    let keys = request_keys(&index, "m", 2);
    eventually("the store", || index.longest_prefix(1, &keys) == EndpointMatch::Blocks(2)).await;
    for _ in 0..5 {
        p.publish(&cleared()).await.unwrap();
    }
    p.publish(&stored(1..3, None, 0)).await.unwrap();
    eventually("the later store", || index.longest_prefix(1, &keys) == EndpointMatch::Blocks(2))
        .await;

    // The engine restarts: a new publisher on the same address, numbering from 0 again, with
    // a different cache. The old blocks must go, the new ones come in, and trust is kept even
    // though the first messages of the new publisher are lost to the reconnection.
    // The old publisher had numbered past 1,000, so the new one's numbers are all lower.
    p.skip(1_000);
    p.publish(&stored(77..78, None, 0)).await.unwrap();
    eventually("the last message", || index.key_of(1, 77).is_some()).await;
    drop(p);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut p = Publisher::bind(&address, "kv@pod@m", Encoding::Map).await.unwrap();
    let restarts = index.stats().restarts;
    for _ in 0..200 {
        if index.stats().restarts > restarts {
            break;
        }
        p.publish(&cleared()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(index.stats().restarts > restarts, "the restart was never seen");
    p.publish(&stored(50..51, None, 0)).await.unwrap();
    eventually("the new block", || index.key_of(1, 50).is_some()).await;
    assert_eq!(index.key_of(1, 77), None, "blocks from before the restart are gone");
    assert_eq!(index.is_trusted(1), Some(true));
    assert!(subs.stats().connects >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_is_filled_from_the_replay_socket() {
    let index = index();
    let mut p =
        Publisher::bind("tcp://127.0.0.1:0", "kv@pod@m", Encoding::ArrayTagged).await.unwrap();
    let replay = p.serve_replay("tcp://127.0.0.1:0", 100).await.unwrap();
    let replay_port: u16 = replay.rsplit(':').next().unwrap().parse().unwrap();
    let config = SubscriberConfig { replay_port: Some(replay_port), ..config() };
    let subs = Subscribers::new(Arc::clone(&index), config, tokio::runtime::Handle::current());
    subs.add(1, p.endpoint());
    until_connected(&mut p, &index).await;

    // Blocks 0..2 are stored in a message the PUB socket drops; the next message (blocks
    // 2..3, chained to block 1) reveals the gap.
    p.publish_lost(&stored(1..3, None, 0));
    p.publish(&stored(3..4, Some(2), 2 * BS)).await.unwrap();
    let keys = request_keys(&index, "m", 3);
    eventually("the replayed store", || index.longest_prefix(1, &keys) == EndpointMatch::Blocks(3))
        .await;
    assert_eq!(index.stats().gaps, 0);
    assert_eq!(index.is_trusted(1), Some(true));
    let stats = subs.stats();
    assert_eq!((stats.replays, stats.replayed_messages), (1, 1));
}
