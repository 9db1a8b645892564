//! Rate limits with `scope: global`: one token bucket in Redis for every node, taken
//! atomically on the server's clock. Two nodes hammering one bucket admit exactly its
//! burst, on a server and on a Cluster; refusals say when to retry; refunds reach the
//! shared bucket; while Redis is down each limit's failure policy decides.
//!
//! The rate is 1 per minute, so within a test (seconds) no token comes back: every count
//! below is exact, with no timing assumption.

mod harness;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use allot_proto::v1 as pb;
use harness::redis::{nodes_on, RedisCluster, RedisServer};
use harness::{outcome, record, reserve, subscribe, Node};
use pb::enforcer_client::EnforcerClient;
use tonic::transport::Channel;

/// The burst of `calls`.
const BURST: u64 = 40;

const CATALOG: &str = "version: 1
metrics:
  calls: { unit: call }
  capped: { unit: call }
  pair: { unit: call }
  open_calls: { unit: call }
  closed_calls: { unit: call }
plans:
  p:
    versions:
      1:
        limits:
          calls:
            - { window: minute, rate: 1, burst: 40, scope: global }
            - { window: second, rate: 100, scope: global }
          capped:
            - { window: minute, rate: 1, burst: 10, scope: global }
            - { window: day, amount: 3 }
          pair:
            - { window: minute, rate: 1, burst: 5, scope: global }
            - { window: minute, rate: 1, burst: 3, per: api_key, scope: global }
          open_calls:
            - { window: minute, rate: 1, burst: 5, scope: global, on_backend_failure: fail_open }
          closed_calls:
            - { window: minute, rate: 1, burst: 5, scope: global }
";

fn check(metric: &str, amount: i64) -> pb::CheckRequest {
    pb::CheckRequest {
        tenant: "acme".into(),
        metric: metric.into(),
        amount,
        ..Default::default()
    }
}

async fn check_reason(e: &mut EnforcerClient<Channel>, metric: &str, amount: i64) -> String {
    let r = e.check(check(metric, amount)).await.unwrap().into_inner();
    r.decision.unwrap().reason
}

/// 2 nodes × 16 clients × 8 reserves of one unit against a global burst of 40 (and a
/// second global bucket per second, taken in the same script call): exactly 40 granted; every refusal is `rate_limited` with a `retry_after` of at most the minute.
async fn hammer_one_bucket(nodes: &[Node]) {
    let mut admin = nodes[0].admin().await;
    subscribe(&mut admin, "acme", "p").await;

    // Checks peek: asked again and again on both nodes, they take nothing.
    for node in nodes {
        let mut e = node.enforcer().await;
        for _ in 0..5 {
            assert_eq!(check_reason(&mut e, "calls", BURST as i64).await, "ok");
        }
        assert_eq!(
            check_reason(&mut e, "calls", BURST as i64 + 1).await,
            "exceeds_burst"
        );
    }

    let granted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for client in 0..16 {
            let mut e = node.enforcer().await;
            let (granted, refused) = (granted.clone(), refused.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..8 {
                    let r = e
                        .reserve(reserve("acme", "calls", 1, &format!("n{n}-c{client}-{i}")))
                        .await
                        .unwrap()
                        .into_inner();
                    if outcome(&r.decision) == pb::Outcome::Deny {
                        let d = r.decision.unwrap();
                        assert_eq!(d.reason, "rate_limited", "{d:?}");
                        let wait = d.retry_after.expect("retry_after on a rate refusal");
                        let wait = Duration::new(wait.seconds as u64, wait.nanos as u32);
                        assert!(
                            wait > Duration::ZERO && wait <= Duration::from_secs(60),
                            "{wait:?}"
                        );
                        assert_eq!(d.limit, Some(1));
                        refused.fetch_add(1, Ordering::Relaxed);
                    } else {
                        granted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(granted.load(Ordering::Relaxed), BURST);
    assert_eq!(
        refused.load(Ordering::Relaxed),
        nodes.len() as u64 * 16 * 8 - BURST
    );
    // Every node sees the same empty bucket.
    for node in nodes {
        let mut e = node.enforcer().await;
        assert_eq!(check_reason(&mut e, "calls", 1).await, "rate_limited");
    }
}

/// A request the day cap refuses gives its token back to the shared bucket: after 3
/// grants and 5 refusals, exactly 7 of the 10 tokens are left, on either node.
async fn refunds_reach_the_shared_bucket(nodes: &[Node]) {
    let mut first = nodes[0].enforcer().await;
    for i in 0..8 {
        let r = first
            .reserve(reserve("acme", "capped", 1, &format!("capped-{i}")))
            .await
            .unwrap()
            .into_inner();
        if i < 3 {
            assert_ne!(outcome(&r.decision), pb::Outcome::Deny, "{r:?}");
        } else {
            assert_eq!(r.decision.unwrap().reason, "limit_exceeded");
        }
    }
    let mut other = nodes[nodes.len() - 1].enforcer().await;
    // 7 pass the bucket (and then meet the day cap); 8 do not.
    assert_eq!(
        check_reason(&mut other, "capped", 7).await,
        "limit_exceeded"
    );
    assert_eq!(check_reason(&mut other, "capped", 8).await, "rate_limited");
}

fn keyed(metric: &str, amount: i64, key: &str, api_key: &str) -> pb::ReserveRequest {
    let mut r = reserve("acme", metric, amount, key);
    r.dimensions.insert("api_key".into(), api_key.into());
    r
}

/// One request, two global buckets (the tenant's, burst 5, and its API key's, burst 3):
/// a refusal by either takes from neither.
async fn buckets_are_taken_all_or_none(nodes: &[Node]) {
    let mut e = nodes[0].enforcer().await;
    let d = |r: pb::ReserveResponse| r.decision.unwrap();
    let r = e.reserve(keyed("pair", 2, "pair-1", "k1")).await.unwrap();
    assert_eq!(d(r.into_inner()).reason, "ok");
    // k1 has 1 left: refused, and the tenant's bucket keeps its 3.
    let r = e.reserve(keyed("pair", 2, "pair-2", "k1")).await.unwrap();
    assert_eq!(d(r.into_inner()).reason, "rate_limited");
    let mut other = nodes[nodes.len() - 1].enforcer().await;
    let r = other
        .reserve(keyed("pair", 3, "pair-3", "k2"))
        .await
        .unwrap();
    assert_eq!(d(r.into_inner()).reason, "ok");
    let r = other
        .reserve(keyed("pair", 1, "pair-4", "k3"))
        .await
        .unwrap();
    assert_eq!(d(r.into_inner()).reason, "rate_limited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_one_redis_share_one_global_bucket() {
    let redis = RedisServer::start().await;
    let nodes = nodes_on(&redis.url, CATALOG, 2).await;
    hammer_one_bucket(&nodes).await;
    refunds_reach_the_shared_bucket(&nodes).await;
    buckets_are_taken_all_or_none(&nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_one_cluster_share_one_global_bucket() {
    let cluster = RedisCluster::start().await;
    let nodes = nodes_on(&cluster.url, CATALOG, 2).await;
    hammer_one_bucket(&nodes).await;
    refunds_reach_the_shared_bucket(&nodes).await;
    buckets_are_taken_all_or_none(&nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_follows_each_global_limits_policy() {
    // appendfsync always: the bucket's state survives the SIGKILL.
    let mut redis = RedisServer::start_with(&["--appendfsync", "always"]).await;
    // The default backend deadline: the outage is noticed at once.
    let node = &Node::on_redis(CATALOG, &redis.url).start().await;
    let mut admin = node.admin().await;
    subscribe(&mut admin, "acme", "p").await;
    let mut e = node.enforcer().await;
    // Two of the shared bucket's 5 tokens are taken before the outage.
    for i in 0..2 {
        let r = e
            .record(record("acme", "open_calls", 1, &format!("before-{i}")))
            .await
            .unwrap()
            .into_inner();
        assert!(r.recorded);
        assert_eq!(r.decision.unwrap().reason, "ok");
    }

    redis.kill9().await;

    // Fail closed: refused, saying why, whatever the bucket held.
    for i in 0..3 {
        let r = e
            .record(record("acme", "closed_calls", 1, &format!("closed-{i}")))
            .await
            .unwrap()
            .into_inner();
        assert!(!r.recorded);
        let d = r.decision.unwrap();
        assert_eq!(d.reason, "backend_unavailable", "{d:?}");
        assert_eq!(d.window, "minute");
    }
    let r = e
        .reserve(reserve("acme", "closed_calls", 1, "closed-res"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision.unwrap().reason, "backend_unavailable");

    // Fail open: the node's own share of the limit decides (the whole burst of 5, as
    // nothing told it of other nodes), and the answers say they are degraded.
    let (mut admitted, mut limited) = (0, 0);
    for i in 0..8 {
        let r = e
            .record(record("acme", "open_calls", 1, &format!("during-{i}")))
            .await
            .unwrap()
            .into_inner();
        let d = r.decision.unwrap();
        if r.recorded {
            assert_eq!(d.reason, "degraded_fail_open", "{d:?}");
            admitted += 1;
        } else {
            assert_eq!(d.reason, "rate_limited", "{d:?}");
            assert!(d.retry_after.is_some());
            limited += 1;
        }
    }
    assert_eq!((admitted, limited), (5, 3));

    // Redis back: the shared bucket decides again, with the 3 tokens it kept.
    redis.restart().await;
    // Until the node has reconnected, a check may fail (UNAVAILABLE) or decide on the
    // node's share (now empty); neither takes a token.
    let mut back = false;
    for _ in 0..200 {
        if let Ok(r) = e.check(check("open_calls", 1)).await {
            if r.into_inner().decision.unwrap().reason == "ok" {
                back = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "the node never used the shared bucket again");
    let mut granted = 0;
    for i in 0..6 {
        let r = e
            .record(record("acme", "open_calls", 1, &format!("after-{i}")))
            .await
            .unwrap()
            .into_inner();
        let d = r.decision.unwrap();
        if r.recorded {
            assert_eq!(d.reason, "ok", "{d:?}");
            granted += 1;
        } else {
            assert_eq!(d.reason, "rate_limited", "{d:?}");
        }
    }
    assert_eq!(granted, 3);
}

fn bucket(name: &str, rate: u64, burst: u64) -> meter::quota::RateSlot {
    meter::quota::RateSlot {
        window: meter::window::Window::Minute,
        bucket: name.into(),
        gcra: meter::gcra::Gcra::new(rate, Duration::from_secs(60), burst).unwrap(),
        scope: meter::catalog::Scope::Global,
        fail_open: false,
    }
}

/// The script itself, through the store: peeks change nothing, refunds never overfill,
/// a limit that changes keeps the instant the bucket is full again, idle buckets expire,
/// and limits past the exact range are clamped rather than refused.
#[tokio::test]
async fn the_gcra_script_keeps_its_promises() {
    use enforcer::redis::{RedisOptions, RedisStore};
    use fred::prelude::*;
    use meter::store::{RateOutcome, RateStore};

    let server = RedisServer::start().await;
    let store = RedisStore::connect(RedisOptions {
        url: server.url.clone(),
        retention: Duration::from_secs(86_400),
        wait_replicas: None,
        command_timeout: Duration::from_secs(2),
    })
    .await
    .unwrap();
    let one = [bucket("calls|minute", 1, 10)];
    let allowed = |o: RateOutcome| o == RateOutcome::Allowed;

    // A missing bucket is full; more than the burst never fits.
    assert!(allowed(
        store.take_rate("acme", &one, 10, true).await.unwrap()
    ));
    assert_eq!(
        store.take_rate("acme", &one, 11, false).await.unwrap(),
        RateOutcome::Denied {
            index: 0,
            retry_after: None
        }
    );
    assert!(allowed(
        store.take_rate("acme", &one, 10, false).await.unwrap()
    ));
    for peek in [true, true, false] {
        match store.take_rate("acme", &one, 1, peek).await.unwrap() {
            RateOutcome::Denied {
                index: 0,
                retry_after: Some(wait),
            } => assert!(wait > Duration::ZERO && wait <= Duration::from_secs(60)),
            other => panic!("{other:?}"),
        }
    }
    // Empty for 10 minutes at 1 per minute: the key lives that long, and a second more.
    let key = format!(
        "al:{{{}}}:acme:b:calls|minute",
        meter::event::hash_tag("acme")
    );
    let ttl: i64 = store.client().pttl(&key).await.unwrap();
    assert!(ttl > 590_000 && ttl <= 601_000, "{ttl}");

    // Refunds give back what was taken, never more than the burst.
    store.refund_rate("acme", &one, 3).await.unwrap();
    assert!(allowed(
        store.take_rate("acme", &one, 3, false).await.unwrap()
    ));
    assert!(!allowed(
        store.take_rate("acme", &one, 1, false).await.unwrap()
    ));
    store.refund_rate("acme", &one, 1_000).await.unwrap();
    let gone: i64 = store.client().exists(key).await.unwrap();
    assert_eq!(gone, 0, "a full bucket is no key at all");
    assert!(allowed(
        store.take_rate("acme", &one, 10, false).await.unwrap()
    ));
    assert!(!allowed(
        store.take_rate("acme", &one, 1, false).await.unwrap()
    ));

    // The limit doubles: the emptied bucket stays empty (full again at the same instant),
    // it does not read its old debt at the new rate as half a bucket.
    let doubled = [bucket("calls|minute", 2, 20)];
    assert!(!allowed(
        store.take_rate("acme", &doubled, 1, false).await.unwrap()
    ));

    // All or none across buckets: the refusal names the bucket that refuses.
    let two = [bucket("a|minute", 1, 5), bucket("b|minute", 1, 2)];
    assert!(allowed(
        store.take_rate("acme", &two, 2, false).await.unwrap()
    ));
    match store.take_rate("acme", &two, 1, false).await.unwrap() {
        RateOutcome::Denied { index: 1, .. } => {}
        other => panic!("{other:?}"),
    }
    assert!(allowed(
        store.take_rate("acme", &two[..1], 3, false).await.unwrap()
    ));
    assert!(!allowed(
        store.take_rate("acme", &two[..1], 1, false).await.unwrap()
    ));

    // Absurd limits (reachable through merges and overrides) are clamped, not refused.
    let huge = [bucket("huge|minute", u64::MAX, u64::MAX)];
    assert!(allowed(
        store
            .take_rate("acme", &huge, 1_000_000, false)
            .await
            .unwrap()
    ));
}
