//! Usage events through a real node: every commit, record, release and denial is written
//! before the answer (the embedded spool, served over `allot.v1.Spool`; with Redis, the
//! partition streams, where each node also ships the events of its local store), once.

mod harness;

use std::collections::HashMap;
use std::time::Duration;

use allot_proto::v1 as pb;
use fred::prelude::*;
use harness::redis::RedisServer;
use harness::{record, reserve, subscribe, Node};
use meter::event::{partition, stream_key, EventKind, Spooled, UsageEvent};

const CATALOG: &str = "version: 1
metrics:
  calls: { unit: call }
  soft_calls: { unit: call }
  hits: { unit: request }
plans:
  p:
    versions:
      1:
        limits:
          calls:
            - { window: day, amount: 10 }
          soft_calls:
            - { window: day, amount: 5, enforcement: soft }
          hits:
            - { window: minute, rate: 1, burst: 1 }
";

fn finish(fields: impl IntoIterator<Item = (String, String)>) -> UsageEvent {
    let f: Vec<(String, String)> = fields.into_iter().collect();
    Spooled::from_fields(f.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .unwrap()
        .finish()
        .unwrap()
}

type Client = pb::enforcer_client::EnforcerClient<tonic::transport::Channel>;

async fn rec(e: &mut Client, metric: &str, amount: i64, id: &str) -> pb::RecordResponse {
    e.record(record("acme", metric, amount, id))
        .await
        .unwrap()
        .into_inner()
}

async fn commit(e: &mut Client, id: &str, actual: i64) -> pb::CommitResponse {
    e.commit(pb::CommitRequest {
        tenant: "acme".into(),
        reservation_id: id.into(),
        actual_amount: actual,
    })
    .await
    .unwrap()
    .into_inner()
}

/// The requests both tests make, and the events they expect (kind, metric, amount,
/// reason, overage), in order.
async fn traffic(node: &Node) -> Vec<(EventKind, &'static str, i64, &'static str, bool)> {
    let mut e = node.enforcer().await;
    let r = e
        .reserve(reserve("acme", "calls", 4, "k1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(commit(&mut e, &r.reservation_id, 3).await.committed, 3);
    // A replayed commit and a replayed record write nothing more.
    assert!(commit(&mut e, &r.reservation_id, 3).await.replayed);
    assert!(rec(&mut e, "calls", 2, "e1").await.recorded);
    assert!(rec(&mut e, "calls", 2, "e1").await.replayed);
    // Refused by the day cap (3 + 2 + 6 > 10).
    assert!(!rec(&mut e, "calls", 6, "e2").await.recorded);
    // Soft: past 5 is overage.
    assert!(rec(&mut e, "soft_calls", 7, "s1").await.recorded);
    // Refused before any counter: the bucket holds one.
    assert!(rec(&mut e, "hits", 1, "h1").await.recorded);
    assert!(!rec(&mut e, "hits", 1, "h2").await.recorded);
    let r = e
        .reserve(reserve("acme", "calls", 1, "k2"))
        .await
        .unwrap()
        .into_inner();
    e.release(pb::ReleaseRequest {
        tenant: "acme".into(),
        reservation_id: r.reservation_id,
    })
    .await
    .unwrap();
    vec![
        (EventKind::Commit, "calls", 3, "ok", false),
        (EventKind::Record, "calls", 2, "ok", false),
        (EventKind::Denial, "calls", 6, "limit_exceeded", false),
        (EventKind::Record, "soft_calls", 7, "overage", true),
        (EventKind::Record, "hits", 1, "ok", false),
        (EventKind::Denial, "hits", 1, "rate_limited", false),
        (EventKind::Release, "calls", 1, "ok", false),
    ]
}

type Spool = pb::spool_client::SpoolClient<tonic::transport::Channel>;

fn read_req(max: u32, consumer: &str) -> pb::ReadSpoolRequest {
    pb::ReadSpoolRequest {
        after: 0,
        max,
        consumer: consumer.into(),
    }
}

/// Everything in the spool, read by consumer `agg-1`.
async fn read_all(spool: &mut Spool) -> Vec<pb::SpoolEntry> {
    spool
        .read(read_req(0, "agg-1"))
        .await
        .unwrap()
        .into_inner()
        .entries
}

fn finish_all(entries: &[pb::SpoolEntry]) -> Vec<UsageEvent> {
    entries.iter().map(|e| finish(e.fields.clone())).collect()
}

fn summary(events: &[UsageEvent]) -> Vec<(EventKind, &str, i64, &str, bool)> {
    events
        .iter()
        .map(|e| {
            (
                e.kind,
                e.metric.as_str(),
                e.amount,
                e.reason.as_str(),
                e.overage,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_node_spools_every_event_and_serves_it() {
    let node = Node::builder().catalog(CATALOG).start().await;
    subscribe(&mut node.admin().await, "acme", "p").await;
    let want = traffic(&node).await;
    let mut spool = node.spool().await;
    let entries = read_all(&mut spool).await;
    let events = finish_all(&entries);
    let mut got = summary(&events);
    // Order is the node's; compared as sets of (kind, metric, amount, reason, overage).
    got.sort_by_key(|g| format!("{g:?}"));
    let mut want_sorted = want.clone();
    want_sorted.sort_by_key(|g| format!("{g:?}"));
    assert_eq!(got, want_sorted);
    assert!(events
        .iter()
        .all(|e| e.tenant == "acme" && e.plan == "p" && e.plan_version == 1 && !e.node.is_empty()));
    // Sequence numbers grow; acknowledged entries are gone.
    assert!(entries.windows(2).all(|w| w[0].seq < w[1].seq));
    spool
        .ack(pb::AckSpoolRequest {
            upto: entries[2].seq,
            consumer: "agg-1".into(),
        })
        .await
        .unwrap();
    assert_eq!(read_all(&mut spool).await.len(), entries.len() - 3);
    let err = spool.read(read_req(1_000_000, "agg-1")).await.unwrap_err();
    assert!(err.message().starts_with("max:"), "{}", err.message());
    // A second aggregator is turned away while the first holds the spool.
    let err = spool.read(read_req(0, "agg-2")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("agg-1"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_redis_writes_every_event_to_the_partition_stream_once() {
    let redis = RedisServer::start().await;
    let node = Node::builder()
        .catalog(CATALOG)
        .arg("--redis")
        .arg(&redis.url)
        .start()
        .await;
    subscribe(&mut node.admin().await, "acme", "p").await;
    let want = traffic(&node).await;
    let client = Builder::from_config(Config::from_url(&redis.url).unwrap())
        .build()
        .unwrap();
    client.init().await.unwrap();
    // Hard-cap events are in the stream at once; the node ships its local ones (soft,
    // rate-only, denials decided on the node) within moments.
    let mut events = Vec::new();
    for _ in 0..1200 {
        let entries: Vec<(String, HashMap<String, String>)> = client
            .xrange(stream_key(partition("acme")), "-", "+", None)
            .await
            .unwrap();
        events = entries.into_iter().map(|(_, f)| finish(f)).collect();
        if events.len() >= want.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut got = summary(&events);
    got.sort_by_key(|g| format!("{g:?}"));
    let mut want_sorted = want.clone();
    want_sorted.sort_by_key(|g| format!("{g:?}"));
    assert_eq!(got, want_sorted);
    // Later shipping rounds repeat nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n: u64 = client.xlen(stream_key(partition("acme"))).await.unwrap();
    assert_eq!(n as usize, want.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_record_retried_on_another_node_reaches_the_stream_once() {
    // The answer from node 1 was lost; the client retried on node 2 with the same event
    // id. Soft-only requests never wait for Redis, so both nodes counted it; the stream,
    // and so ClickHouse and billing, must hold it once.
    let redis = RedisServer::start().await;
    let nodes = [
        Node::on_redis(CATALOG, &redis.url).start().await,
        Node::on_redis(CATALOG, &redis.url).start().await,
    ];
    subscribe(&mut nodes[0].admin().await, "acme", "p").await;
    for (i, node) in nodes.iter().enumerate() {
        let mut e = node.enforcer().await;
        assert!(rec(&mut e, "soft_calls", 1, "retried").await.recorded);
        // Shipped after the retried one (a node ships in order): once this is in the
        // stream, so is everything the node had before it.
        assert!(
            rec(&mut e, "soft_calls", 1, &format!("after-{i}"))
                .await
                .recorded
        );
    }
    let client = Builder::from_config(Config::from_url(&redis.url).unwrap())
        .build()
        .unwrap();
    client.init().await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..1200 {
        let entries: Vec<(String, HashMap<String, String>)> = client
            .xrange(stream_key(partition("acme")), "-", "+", None)
            .await
            .unwrap();
        ids = entries.into_iter().map(|(_, f)| f["i"].clone()).collect();
        if ids.contains(&"after-0".to_string()) && ids.contains(&"after-1".to_string()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ids.sort();
    assert_eq!(ids, ["after-0", "after-1", "retried"]);
}

/// Calls of `command` since the server started (`INFO commandstats`).
async fn command_calls(client: &fred::clients::Client, command: &str) -> u64 {
    let info: String = client
        .info(Some(fred::types::InfoKind::CommandStats))
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_ships_its_local_events_in_batches_not_one_round_trip_each() {
    // One call per event would cap shipping at one event per round trip (with
    // `appendfsync always`, per fsync: a few hundred a second on a slow disk), far below
    // what a node admits at the edge; the spool then grows without bound.
    let mut redis = RedisServer::start_with(&["--appendfsync", "always"]).await;
    let node = Node::on_redis(CATALOG, &redis.url).start().await;
    let tenants = ["acme", "globex"];
    let mut admin = node.admin().await;
    for t in tenants {
        subscribe(&mut admin, t, "p").await;
    }
    let mut e = node.enforcer().await;
    for t in tenants {
        e.record(record(t, "soft_calls", 1, &format!("{t}-warm")))
            .await
            .unwrap();
    }
    // Soft-only events pile up in the node's local store while Redis is away...
    redis.stop().await;
    let events = 1000;
    for i in 0..events {
        let t = tenants[i % 2];
        let r = e
            .record(record(t, "soft_calls", 1, &format!("{t}-{i}")))
            .await
            .unwrap()
            .into_inner();
        assert!(r.recorded);
    }
    // ...and reach the streams once it is back: all of them, in a few calls.
    redis.restart().await;
    let client = Builder::from_config(Config::from_url(&redis.url).unwrap())
        .build()
        .unwrap();
    client.init().await.unwrap();
    let mut streamed = 0;
    for _ in 0..600 {
        streamed = 0;
        for t in tenants {
            let entries: Vec<(String, HashMap<String, String>)> = client
                .xrange(stream_key(partition(t)), "-", "+", None)
                .await
                .unwrap();
            streamed += entries
                .iter()
                .filter(|(_, f)| f.get("i").is_some_and(|id| !id.ends_with("-warm")))
                .count();
        }
        if streamed >= events {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(streamed, events, "every local event shipped, once");
    // Counted since the restart: every script call of the node, shipping or not.
    let calls = command_calls(&client, "evalsha").await;
    assert!(
        calls < 100,
        "{calls} script calls to ship {events} events: one per event?"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_events_count_in_the_window_of_their_time_within_the_lateness_limit() {
    let node = Node::builder()
        .catalog(CATALOG)
        .arg("--max-lateness")
        .arg("30days")
        .start()
        .await;
    subscribe(&mut node.admin().await, "acme", "p").await;
    let mut e = node.enforcer().await;
    let ts = |d: chrono::DateTime<chrono::Utc>| prost_types::Timestamp {
        seconds: d.timestamp(),
        nanos: 0,
    };
    let now = chrono::Utc::now();
    let late = |id: &str, amount: i64, at| {
        let mut r = record("acme", "calls", amount, id);
        r.event_time = Some(ts(at));
        r
    };
    // Three days ago, the whole day cap of 10: that day's window, not today's.
    let three_days_ago = now - chrono::Duration::days(3);
    let r = e
        .record(late("old", 10, three_days_ago))
        .await
        .unwrap()
        .into_inner();
    assert!(r.recorded, "{r:?}");
    assert_eq!(
        harness::window_usage(&mut e, "acme", "calls", "day")
            .await
            .0,
        0
    );
    // The same past day is full now.
    let r = e
        .record(late("old-2", 1, three_days_ago))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.recorded);
    assert_eq!(r.decision.unwrap().reason, "limit_exceeded");
    // Today still has its 10.
    assert!(
        e.record(record("acme", "calls", 10, "today"))
            .await
            .unwrap()
            .into_inner()
            .recorded
    );
    // Too late, and from the future: refused, naming the field, counting nothing.
    for (id, at) in [
        ("ancient", now - chrono::Duration::days(31)),
        ("future", now + chrono::Duration::hours(2)),
    ] {
        let err = e.record(late(id, 1, at)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().starts_with("event_time:"),
            "{}",
            err.message()
        );
    }
    // The event carries its own time.
    let events = finish_all(&read_all(&mut node.spool().await).await);
    let old = events.iter().find(|e| e.id == "old").unwrap();
    assert_eq!(old.at.timestamp(), three_days_ago.timestamp());
    assert_eq!(events.len(), 3, "old, its refused follower, today");
}
