//! Two or more picker replicas syncing through a real `redis-server` (skipped, with a printed
//! reason, only when no `redis-server` binary is installed).

mod common;

use std::time::{Duration, Instant};

use common::{ACTIVE_REQUESTS, PREFIX_ONLY, RedisServer, Replica, eventually};
use redis_sync::Ignored;
use scheduler_core::EndpointId;
use scorers::{ActiveRequestScorer, SharedInFlight};

const WAIT: Duration = Duration::from_secs(5);

/// The turns of conversation `c`: each turn's prompt extends the previous one.
fn turns(c: usize) -> Vec<String> {
    let mut prompt = format!("conversation {c:04} system prompt: be brief. ");
    (0..4)
        .map(|turn| {
            prompt.push_str(&format!("user turn {turn}: tell me about topic {c}-{turn}. "));
            prompt.clone()
        })
        .collect()
}

/// Routes the conversations' turns, alternating between `replicas` request by request, and
/// returns how many conversations had a turn land away from their first turn's endpoint.
/// Between turns it waits until every synced replica has applied everything published so far
/// (turns of a conversation are seconds apart in practice; the sync lag is milliseconds).
async fn broken_conversations(replicas: &[&Replica], conversations: usize) -> usize {
    let mut broken = 0;
    let mut next = 0;
    for c in 0..conversations {
        let mut first = None;
        for (turn, prompt) in turns(c).iter().enumerate() {
            let replica = replicas[next % replicas.len()];
            next += 1;
            let endpoint = replica.route(prompt, (c * 16 + turn) as u64).primary().id();
            let first = *first.get_or_insert(endpoint);
            if endpoint != first {
                broken += 1;
                break;
            }
            settle(replicas, next as u64).await;
        }
    }
    broken
}

/// Waits until the `routed` decisions' records were published and applied by every synced
/// replica but their author.
async fn settle(replicas: &[&Replica], routed: u64) {
    if replicas.iter().all(|r| r.sync.is_some()) {
        let published = || replicas.iter().map(|r| r.sync().metrics().published()).sum::<u64>();
        let applied = || replicas.iter().map(|r| r.sync().metrics().applied()).sum::<u64>();
        let expected = routed * (replicas.len() as u64 - 1);
        let settled = eventually(WAIT, || published() == routed && applied() == expected).await;
        assert!(settled, "published {} applied {} of {routed}", published(), applied());
    }
    for replica in replicas {
        replica.flush();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversation_turns_land_on_one_endpoint_across_replicas() {
    let Some(redis) = RedisServer::start() else { return };
    let url = redis.url();
    let conversations = 12;

    // One replica: affinity holds by construction.
    let single = Replica::new(PREFIX_ONLY, None, "single", |_| {});
    assert_eq!(broken_conversations(&[&single], conversations).await, 0);

    // Two independent replicas: a turn on the other replica finds no prefix there.
    let a = Replica::new(PREFIX_ONLY, None, "a", |_| {});
    let b = Replica::new(PREFIX_ONLY, None, "b", |_| {});
    let independent = broken_conversations(&[&a, &b], conversations).await;
    assert!(independent > 0, "the control must lose affinity");

    // Two synced replicas: as with one.
    let a = Replica::new(PREFIX_ONLY, Some(&url), "a", |_| {});
    let b = Replica::new(PREFIX_ONLY, Some(&url), "b", |_| {});
    assert_eq!(broken_conversations(&[&a, &b], conversations).await, 0);
    assert!(a.sync().metrics().applied() > 0 && b.sync().metrics().applied() > 0);
    assert_eq!(a.sync().metrics().dropped(), 0);
    println!("independent replicas broke {independent} of {conversations} conversations; synced 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_replica_routes_a_known_prefix_to_its_holder_on_its_first_request() {
    let Some(redis) = RedisServer::start() else { return };
    let url = redis.url();
    let a = Replica::new(PREFIX_ONLY, Some(&url), "a", |_| {});
    let mut holders = Vec::new();
    for c in 0..8 {
        let prompt = &turns(c)[0];
        holders.push((prompt.clone(), a.route(prompt, c as u64).primary().id()));
    }
    assert!(eventually(WAIT, || a.sync().metrics().published() == 8).await);

    let late = Replica::new(PREFIX_ONLY, Some(&url), "late", |_| {});
    assert!(eventually(WAIT, || late.sync().is_warm()).await, "snapshot replayed");
    late.flush();
    for (c, (prompt, holder)) in holders.iter().enumerate() {
        // Seeds differ from the first routing: only the index can explain the same pick.
        let first = late.route(&format!("{prompt}and a follow-up"), 1000 + c as u64);
        assert_eq!(first.primary().id(), *holder, "conversation {c}");
    }
    assert_eq!(late.sync().metrics().applied(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_counts_converge_and_a_killed_replicas_share_expires() {
    let Some(redis) = RedisServer::start() else { return };
    let url = redis.url();
    let fast = |settings: &mut redis_sync::SyncSettings| {
        settings.interval = Some(Duration::from_millis(50));
        settings.in_flight_ttl = Some(Duration::from_millis(600));
    };
    let mut a = Replica::new(ACTIVE_REQUESTS, Some(&url), "a", fast);
    let b = Replica::new(ACTIVE_REQUESTS, Some(&url), "b", fast);
    let scorer = |replica: &Replica| {
        replica
            .plugins
            .get("active-request-scorer")
            .and_then(|declared| declared.plugin.shared.clone())
            .and_then(|shared| shared.downcast::<ActiveRequestScorer>().ok())
            .unwrap()
    };
    let (on_a, on_b) = (scorer(&a), scorer(&b));
    // A keeps six requests in flight, B two.
    let mut guards = Vec::new();
    for n in 0..6 {
        guards.push(a.route("a request", n).take_completion().unwrap());
    }
    for n in 0..2 {
        guards.push(b.route("b request", 100 + n).take_completion().unwrap());
    }
    let total = |replica: &Replica, scorer: &ActiveRequestScorer| {
        replica
            .pool
            .load()
            .endpoints()
            .iter()
            .map(|s| scorer.in_flight(s.id()) + scorer.peers().get(s.id()).requests)
            .sum::<u64>()
    };
    assert!(
        eventually(WAIT, || total(&a, &on_a) == 8 && total(&b, &on_b) == 8).await,
        "both replicas see all eight: a {} b {}",
        total(&a, &on_a),
        total(&b, &on_b)
    );
    assert_eq!(a.sync().metrics().peers(), 1);
    // A dies without a goodbye: its key expires within the TTL and B stops counting it.
    let killed = Instant::now();
    drop(a.sync.take());
    assert!(
        eventually(WAIT, || total(&b, &on_b) == 2).await,
        "A's share must expire: b sees {}",
        total(&b, &on_b)
    );
    let gone = killed.elapsed();
    assert!(gone <= Duration::from_millis(600 + 2 * 50 + 300), "expired after {gone:?}");
    assert!(eventually(WAIT, || b.sync().metrics().peers() == 0).await);
    println!("a killed replica's share expired after {gone:?} (TTL 600 ms)");
    drop(guards);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_in_flight_requests_spread_the_load_as_one_replica_would() {
    let Some(redis) = RedisServer::start() else { return };
    let url = redis.url();
    let fast = |settings: &mut redis_sync::SyncSettings| {
        settings.interval = Some(Duration::from_millis(50));
    };
    let a = Replica::new(ACTIVE_REQUESTS, Some(&url), "a", fast);
    let b = Replica::new(ACTIVE_REQUESTS, Some(&url), "b", fast);
    // A fills endpoints with four requests, one each (least-loaded picking).
    let mut guards = Vec::new();
    let mut on_a = Vec::new();
    for n in 0..4 {
        let mut result = a.route("x", n);
        on_a.push(result.primary().id());
        guards.push(result.take_completion().unwrap());
    }
    on_a.sort_by_key(|id| id.0);
    on_a.dedup();
    assert_eq!(on_a.len(), 4, "one replica spreads over all four");
    // Once B has heard of them, its next four go one per endpoint too (not all to the
    // endpoints that look idle from B alone, which is every endpoint).
    let b_scorer = b
        .plugins
        .get("active-request-scorer")
        .and_then(|declared| declared.plugin.shared.clone())
        .and_then(|shared| shared.downcast::<ActiveRequestScorer>().ok())
        .unwrap();
    let heard = || {
        b.pool.load().endpoints().iter().map(|s| b_scorer.peers().get(s.id()).requests).sum::<u64>()
    };
    assert!(eventually(WAIT, || heard() == 4).await);
    let mut on_b: Vec<EndpointId> = Vec::new();
    for n in 0..4 {
        let mut result = b.route("y", 50 + n);
        on_b.push(result.primary().id());
        guards.push(result.take_completion().unwrap());
    }
    on_b.sort_by_key(|id| id.0);
    on_b.dedup();
    assert_eq!(on_b.len(), 4, "B spreads as if it had routed A's requests itself");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_both_keep_answering_and_sync_resumes() {
    let Some(mut redis) = RedisServer::start() else { return };
    let url = redis.url();
    let a = Replica::new(PREFIX_ONLY, Some(&url), "a", |_| {});
    let b = Replica::new(PREFIX_ONLY, Some(&url), "b", |_| {});
    a.route(&turns(0)[0], 0);
    assert!(eventually(WAIT, || b.sync().metrics().applied() == 1).await, "sync works");

    redis.kill();
    // Both keep answering at once, on their own state; nothing waits for Redis.
    let mut slowest = Duration::ZERO;
    for n in 0..200u64 {
        let replica = if n % 2 == 0 { &a } else { &b };
        let started = Instant::now();
        replica.route(&turns(1 + n as usize % 20)[0], n);
        slowest = slowest.max(started.elapsed());
    }
    assert!(slowest < Duration::from_millis(50), "a decision waited {slowest:?}");
    assert!(eventually(WAIT, || a.sync().metrics().redis_errors() > 0).await);

    redis.restart();
    // Sync resumes: a new record from A reaches B (publisher and reader reconnect).
    let before = b.sync().metrics().applied();
    let resumed = eventually(Duration::from_secs(15), || {
        a.route(&turns(100)[0], 7);
        b.sync().metrics().applied() > before
    })
    .await;
    assert!(resumed, "sync did not resume after Redis came back");
    println!(
        "during the outage: slowest decision {slowest:?}; dropped {} records; redis errors {}",
        a.sync().metrics().dropped() + b.sync().metrics().dropped(),
        a.sync().metrics().redis_errors() + b.sync().metrics().redis_errors()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_foreign_messages_are_ignored_and_counted() {
    let Some(redis) = RedisServer::start() else { return };
    let url = redis.url();
    let b = Replica::new(PREFIX_ONLY, Some(&url), "b", |settings| {
        settings.interval = Some(Duration::from_millis(50));
    });
    let stream = b.sync().stream_key().to_owned();
    let mut connection = redis.connection().await;
    let header = |pool: &str| redis_sync::wire::Header {
        replica: "intruder".into(),
        pool: pool.into(),
        sent_at_micros: 1,
        plugins: vec!["prefix-cache-scorer".into()],
    };
    let mut foreign = Vec::new();
    let record: [(u8, u64, &[u64]); 1] = [(0, 1, &[1, 2])];
    redis_sync::wire::encode_records(&mut foreign, &header("another-pool"), record.into_iter());
    let mut future = foreign.clone();
    let _ = redis_sync::wire::encode_records(&mut future, &header("pool"), record.into_iter());
    future[4] = 2; // format version 2
    let entries: [(&str, &[u8]); 4] =
        [("d", b"not a message at all"), ("d", &foreign), ("d", &future), ("other", b"no d field")];
    for (field, value) in entries {
        let _: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg(field)
            .arg(value)
            .query_async(&mut connection)
            .await
            .unwrap();
    }
    // A peer whose in-flight key holds garbage.
    let _: () = redis::cmd("SET")
        .arg("epp:pool:inflight:garbage")
        .arg("garbage")
        .query_async(&mut connection)
        .await
        .unwrap();
    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let _: () = redis::cmd("ZADD")
        .arg("epp:pool:replicas")
        .arg(now_ms as u64 + 60_000)
        .arg("garbage")
        .query_async(&mut connection)
        .await
        .unwrap();
    let metrics = b.sync().metrics();
    assert!(
        eventually(WAIT, || {
            metrics.ignored(Ignored::Malformed) >= 3
                && metrics.ignored(Ignored::Foreign) == 1
                && metrics.ignored(Ignored::Version) == 1
        })
        .await,
        "malformed {} foreign {} version {}",
        metrics.ignored(Ignored::Malformed),
        metrics.ignored(Ignored::Foreign),
        metrics.ignored(Ignored::Version)
    );
    assert_eq!(metrics.applied(), 0);
    assert_eq!(metrics.peers(), 0, "a garbage peer is not a peer");
    // The replica still routes and still syncs real records.
    let a = Replica::new(PREFIX_ONLY, Some(&url), "a", |_| {});
    a.route(&turns(3)[0], 3);
    assert!(eventually(WAIT, || metrics.applied() == 1).await);
    let mut text = String::new();
    (b.sync().metrics_renderer())(&mut text);
    assert!(
        text.contains(
            "epp_cross_replica_ignored_messages_total{pool=\"pool\",reason=\"foreign\"} 1"
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_lag_on_loopback() {
    let Some(redis) = RedisServer::start() else { return };
    let url = redis.url();
    let a = Replica::new(PREFIX_ONLY, Some(&url), "a", |_| {});
    let b = Replica::new(PREFIX_ONLY, Some(&url), "b", |_| {});
    assert!(eventually(WAIT, || b.sync().is_warm()).await);
    // 1000 decisions at about 500 per second, each a new prompt.
    for n in 0..1000u64 {
        a.route(&format!("lag probe {n:05} with a prompt long enough for some blocks"), n);
        if n % 5 == 4 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert!(eventually(WAIT, || b.sync().metrics().applied() == 1000).await);
    let metrics = b.sync().metrics();
    let p50 = metrics.lag_quantile(0.5).unwrap();
    let p99 = metrics.lag_quantile(0.99).unwrap();
    println!(
        "replication lag on loopback over {} batches: p50 {p50:?} p99 {p99:?}",
        metrics.lag_count()
    );
    assert!(p99 < Duration::from_millis(100), "p99 {p99:?}");
}
