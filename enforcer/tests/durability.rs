//! Acknowledged means on disk: a node killed with SIGKILL under load comes back with every
//! acknowledged reservation, commit and record, none twice. Also: reservations expire.

mod harness;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use allot_proto::v1 as pb;
use harness::{outcome, record, reserve, subscribe, window_usage, Node};

const CATALOG: &str = "version: 1
metrics:
  calls: { unit: call }
plans:
  big:
    versions:
      1:
        limits:
          calls:
            - { window: month, amount: 1000000000 }
";

#[derive(Default)]
struct Ledger {
    /// Acknowledged reservations: key → (id, amount, committed amount if acknowledged).
    reserved: HashMap<String, (String, u64, Option<u64>)>,
    /// Acknowledged records: event id → amount.
    recorded: HashMap<String, u64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_nothing_acknowledged() {
    let mut node = Node::builder().catalog(CATALOG).start().await;
    let mut admin = node.admin().await;
    subscribe(&mut admin, "acme", "big").await;

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut tasks = Vec::new();
    const WORKERS: u64 = 16;
    for w in 0..WORKERS {
        let mut e = node.enforcer().await;
        let ledger = ledger.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let amount = 1 + (i % 7);
                let key = format!("w{w}-{i}");
                if i % 2 == 0 {
                    let mut req = reserve("acme", "calls", amount as i64, &key);
                    req.ttl = Some(prost_types::Duration {
                        seconds: 3600,
                        nanos: 0,
                    });
                    let Ok(r) = e.reserve(req).await else { return };
                    let r = r.into_inner();
                    assert_eq!(outcome(&r.decision), pb::Outcome::Allow);
                    ledger
                        .lock()
                        .unwrap()
                        .reserved
                        .insert(key.clone(), (r.reservation_id.clone(), amount, None));
                    if i % 4 == 0 {
                        let actual = amount - 1;
                        let c = pb::CommitRequest {
                            tenant: "acme".into(),
                            reservation_id: r.reservation_id,
                            actual_amount: actual as i64,
                        };
                        if e.commit(c).await.is_err() {
                            return;
                        }
                        ledger.lock().unwrap().reserved.get_mut(&key).unwrap().2 = Some(actual);
                    }
                } else {
                    let Ok(r) = e.record(record("acme", "calls", amount as i64, &key)).await else {
                        return;
                    };
                    assert!(r.into_inner().recorded);
                    ledger.lock().unwrap().recorded.insert(key, amount);
                }
            }
        }));
    }
    // Killed mid-load, once enough is acknowledged to matter (however slow the disk).
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..600 {
        if ledger.lock().unwrap().recorded.len() > 50 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.kill9().await;
    for t in tasks {
        t.await.unwrap();
    }

    let ledger = Arc::try_unwrap(ledger).ok().unwrap().into_inner().unwrap();
    assert!(
        ledger.recorded.len() > 50,
        "the load ran ({} records)",
        ledger.recorded.len()
    );
    let acked_used: u64 = ledger.recorded.values().sum::<u64>()
        + ledger
            .reserved
            .values()
            .filter_map(|(_, _, c)| *c)
            .sum::<u64>();
    let acked_held: u64 = ledger
        .reserved
        .values()
        .filter(|(_, _, c)| c.is_none())
        .map(|(_, a, _)| *a)
        .sum();

    let node = Node::builder()
        .catalog(CATALOG)
        .data_dir(&node.data_dir)
        .start()
        .await;
    let mut e = node.enforcer().await;
    let (used, held) = window_usage(&mut e, "acme", "calls", "month").await;
    // Requests in flight at the kill may have reached the disk without an answer: at most
    // one per worker, 7 units each, moving units from held to used at worst.
    let slack = WORKERS * 7;
    assert!(
        used >= acked_used && used <= acked_used + slack,
        "used {used}, acknowledged {acked_used}"
    );
    // A commit in flight may have landed unanswered, returning its 1-unit refund.
    assert!(
        used + held + WORKERS >= acked_used + acked_held,
        "used+held {} < acknowledged {}",
        used + held,
        acked_used + acked_held
    );
    assert!(used + held <= acked_used + acked_held + slack);

    // Every acknowledged request is there exactly once: retries replay, counting nothing.
    for (event, amount) in ledger.recorded.iter().take(200) {
        let r = e
            .record(record("acme", "calls", *amount as i64, event))
            .await
            .unwrap()
            .into_inner();
        assert!(r.replayed, "record {event} lost");
    }
    for (key, (id, amount, committed)) in ledger.reserved.iter().take(200) {
        let r = e
            .reserve(reserve("acme", "calls", *amount as i64, key))
            .await
            .unwrap()
            .into_inner();
        assert!(r.replayed, "reservation {key} lost");
        assert_eq!(&r.reservation_id, id);
        if let Some(actual) = committed {
            let c = pb::CommitRequest {
                tenant: "acme".into(),
                reservation_id: id.clone(),
                actual_amount: *actual as i64,
            };
            assert!(
                e.commit(c).await.unwrap().into_inner().replayed,
                "commit of {key} lost"
            );
        }
    }
    assert_eq!(
        window_usage(&mut e, "acme", "calls", "month").await,
        (used, held)
    );
}

#[tokio::test]
async fn reservations_expire_at_their_ttl() {
    let node = Node::builder()
        .catalog(CATALOG)
        .arg("--sweep-interval")
        .arg("100ms")
        .start()
        .await;
    let mut admin = node.admin().await;
    subscribe(&mut admin, "acme", "big").await;
    let mut e = node.enforcer().await;
    let mut req = reserve("acme", "calls", 5, "short");
    // Long enough that the hold is seen before the sweeper can take it, even on a busy
    // machine.
    req.ttl = Some(prost_types::Duration {
        seconds: 3,
        nanos: 0,
    });
    let r = e.reserve(req).await.unwrap().into_inner();
    assert_eq!(window_usage(&mut e, "acme", "calls", "month").await, (0, 5));
    let mut released = false;
    for _ in 0..300 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if window_usage(&mut e, "acme", "calls", "month").await == (0, 0) {
            released = true;
            break;
        }
    }
    assert!(released, "the hold was not released after its TTL");
    let c = pb::CommitRequest {
        tenant: "acme".into(),
        reservation_id: r.reservation_id,
        actual_amount: 5,
    };
    let err = e.commit(c).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("expired"), "{}", err.message());
    assert_eq!(window_usage(&mut e, "acme", "calls", "month").await, (0, 0));
}
