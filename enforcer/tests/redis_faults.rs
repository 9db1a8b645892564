//! Faults: Redis killed under load. Each limit's failure policy decides meanwhile, the
//! node stays up, and once Redis is back what was admitted while it was away is counted
//! there, once.

mod harness;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use allot_proto::v1 as pb;
use harness::redis::RedisServer;
use harness::{in_doubt, record, reserve, subscribe, window_usage, Node};

const CATALOG: &str = "version: 1
metrics:
  open_calls: { unit: call }
  closed_calls: { unit: call }
plans:
  p:
    versions:
      1:
        limits:
          open_calls:
            - { window: day, amount: 1000000, on_backend_failure: fail_open }
          closed_calls:
            - { window: day, amount: 1000000 }
";

#[derive(Default)]
struct Ledger {
    open_acked: u64,
    degraded: u64,
    closed_acked: u64,
    closed_refused: u64,
    errors: u64,
    degraded_event: Option<(String, u64)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_follows_policies_and_reconciles_exactly() {
    // appendfsync always: what Redis acknowledged survives its SIGKILL.
    let mut redis = RedisServer::start_with(&["--appendfsync", "always"]).await;
    let node = Node::on_redis(CATALOG, &redis.url)
        .arg("--sweep-interval")
        .arg("200ms")
        .start()
        .await;
    let mut admin = node.admin().await;
    subscribe(&mut admin, "acme", "p").await;

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let loader = {
        let mut e = node.enforcer().await;
        let (ledger, stop) = (ledger.clone(), stop.clone());
        tokio::spawn(async move {
            let account = |metric: &str, amount: u64, event: &str, r: pb::RecordResponse| {
                let mut l = ledger.lock().unwrap();
                let reason = r.decision.as_ref().unwrap().reason.clone();
                match (metric, r.recorded) {
                    ("open_calls", true) => {
                        l.open_acked += amount;
                        if reason == "degraded_fail_open" {
                            l.degraded += amount;
                            l.degraded_event = Some((event.to_string(), amount));
                        }
                    }
                    ("closed_calls", true) => l.closed_acked += amount,
                    (_, false) => {
                        assert_eq!(reason, "backend_unavailable");
                        l.closed_refused += 1;
                    }
                    _ => unreachable!(),
                }
            };
            // Events whose answer said "may have been applied": a careful client retries
            // them with the same event id until the answer is definite, and meanwhile
            // goes on with new work.
            let mut doubts: Vec<(&str, String, u64)> = Vec::new();
            let mut i = 0u64;
            loop {
                let stopping = stop.load(Ordering::Relaxed);
                let mut work = std::mem::take(&mut doubts);
                if !stopping {
                    i += 1;
                    for metric in ["open_calls", "closed_calls"] {
                        work.push((metric, format!("{metric}-{i}"), 1 + i % 3));
                    }
                } else if work.is_empty() {
                    break;
                }
                for (metric, event, amount) in work {
                    match e
                        .record(record("acme", metric, amount as i64, &event))
                        .await
                    {
                        Ok(r) => account(metric, amount, &event, r.into_inner()),
                        Err(s) if in_doubt(&s) => doubts.push((metric, event, amount)),
                        Err(_) => ledger.lock().unwrap().errors += 1,
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.kill9().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // A reservation while degraded, settled while degraded.
    let mut e = node.enforcer().await;
    let r = e
        .reserve(reserve("acme", "open_calls", 5, "dg-res"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.reservation_id.starts_with("dg-"), "{r:?}");
    assert_eq!(r.decision.as_ref().unwrap().reason, "degraded_fail_open");
    let c = pb::CommitRequest {
        tenant: "acme".into(),
        reservation_id: r.reservation_id.clone(),
        actual_amount: 3,
    };
    assert_eq!(e.commit(c).await.unwrap().into_inner().committed, 3);
    let denied = e
        .reserve(reserve("acme", "closed_calls", 1, "closed-res"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(denied.decision.unwrap().reason, "backend_unavailable");

    redis.restart().await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    loader.await.unwrap();

    let l = std::mem::take(&mut *ledger.lock().unwrap());
    assert!(l.degraded > 0, "the outage was noticed");
    assert!(
        l.closed_refused > 0,
        "fail-closed limits refused during the outage"
    );
    let expected_open = l.open_acked + 3;
    let mut used = 0;
    for _ in 0..100 {
        used = window_usage(&mut e, "acme", "open_calls", "day").await.0;
        if used >= expected_open {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(used, expected_open, "errors during the run: {}", l.errors);
    // Later sweeps count nothing twice.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        window_usage(&mut e, "acme", "open_calls", "day").await.0,
        expected_open
    );
    assert_eq!(
        window_usage(&mut e, "acme", "closed_calls", "day").await.0,
        l.closed_acked
    );
    // Late retries of what was admitted while degraded replay, from Redis or the journal.
    let (event, amount) = l.degraded_event.clone().expect("a degraded record");
    let again = e
        .record(record("acme", "open_calls", amount as i64, &event))
        .await
        .unwrap()
        .into_inner();
    assert!(again.recorded && again.replayed, "{again:?}");
    let c = pb::CommitRequest {
        tenant: "acme".into(),
        reservation_id: r.reservation_id.clone(),
        actual_amount: 3,
    };
    let replay = e.commit(c).await.unwrap().into_inner();
    assert!(
        replay.replayed && replay.reserved == 5 && replay.refunded == 2,
        "{replay:?}"
    );
    assert_eq!(
        window_usage(&mut e, "acme", "open_calls", "day").await.0,
        expected_open
    );
    println!(
        "admitted {} open units ({} while degraded), {} closed refused, {} errors",
        l.open_acked, l.degraded, l.closed_refused, l.errors
    );
}
