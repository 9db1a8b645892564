//! End to end: gRPC Reserve/Commit/Record on a real node over Redis → the partition
//! streams (hard-cap events from the scripts, soft-only ones shipped by the node) →
//! `allot aggregate` → ClickHouse 18.16. The monthly rollup equals what the client
//! counted, to the unit, and every denial is there once.

mod harness;

use std::collections::BTreeMap;
use std::process::Stdio;

use allot_proto::v1 as pb;
use harness::redis::RedisServer;
use harness::warehouse::{usage_rows, wait_rollup, ClickHouseServer, Totals};
use harness::{record, reserve, subscribe, Node};

const CATALOG: &str = "version: 1
metrics:
  calls: { unit: call }
  soft_calls: { unit: call }
plans:
  p:
    versions:
      1:
        limits:
          calls:
            - { window: day, amount: 2000 }
          soft_calls:
            - { window: month, amount: 50, enforcement: soft }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_through_a_node_reaches_the_monthly_rollup_exactly() {
    let redis = RedisServer::start().await;
    let ch = ClickHouseServer::start().await;
    let node = Node::builder()
        .catalog(CATALOG)
        .arg("--redis")
        .arg(&redis.url)
        .start()
        .await;
    let mut admin = node.admin().await;
    for t in ["acme", "globex"] {
        subscribe(&mut admin, t, "p").await;
    }
    let mut e = node.enforcer().await;
    let mut ledger: Totals = BTreeMap::new();
    let mut denials = 0u64;
    for i in 0..60i64 {
        for t in ["acme", "globex"] {
            let r = e
                .reserve(reserve(t, "calls", 10 + i % 7, &format!("{t}-r{i}")))
                .await
                .unwrap()
                .into_inner();
            let actual = i % 9;
            let c = e
                .commit(pb::CommitRequest {
                    tenant: t.into(),
                    reservation_id: r.reservation_id,
                    actual_amount: actual,
                })
                .await
                .unwrap()
                .into_inner();
            *ledger.entry((t.into(), "calls".into())).or_default() += c.committed as i64;
            let r = e
                .record(record(t, "calls", 1 + i % 4, &format!("{t}-e{i}")))
                .await
                .unwrap()
                .into_inner();
            assert!(r.recorded);
            *ledger.entry((t.into(), "calls".into())).or_default() += 1 + i % 4;
            // Soft-only: counted on the node, shipped to the streams.
            let r = e
                .record(record(t, "soft_calls", 2, &format!("{t}-s{i}")))
                .await
                .unwrap()
                .into_inner();
            assert!(r.recorded);
            *ledger.entry((t.into(), "soft_calls".into())).or_default() += 2;
        }
    }
    // Refused by the day cap: a denial, not usage.
    let r = e
        .record(record("acme", "calls", 5000, "too-much"))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.recorded);
    denials += 1;

    let mut aggregator = tokio::process::Command::new(env!("CARGO_BIN_EXE_allot"))
        .args(["aggregate", "--clickhouse", &ch.url, "--redis", &redis.url])
        .args(["--database", "allot", "--batch-interval", "200ms"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    wait_rollup(&ch, &ledger).await;
    let client = ch.client("allot");
    let (events, unique) = usage_rows(&ch).await;
    assert_eq!(events, unique, "no event twice");
    assert_eq!(events, 60 * 2 * 3, "every commit and record");
    let refused: u64 = client
        .query("SELECT count() FROM denials WHERE reason = 'limit_exceeded'")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(refused, denials);
    let over: u64 = client
        .query("SELECT count() FROM usage_events WHERE metric = 'soft_calls' AND overage = 1")
        .fetch_one()
        .await
        .unwrap();
    // 50 included per tenant, 2 per record: records 26 to 60 of each tenant are overage.
    assert_eq!(over, 2 * 35);
    aggregator.start_kill().unwrap();
    let _ = aggregator.wait().await;
}
