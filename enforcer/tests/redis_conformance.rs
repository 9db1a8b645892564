//! The Redis store passes the same conformance suite as the embedded store, against a
//! real redis-server and a real 6-node Redis Cluster.

mod harness;

use std::time::Duration;

use fred::prelude::*;

use enforcer::redis::{RedisOptions, RedisStore};
use harness::redis::{RedisCluster, RedisServer};

fn options(url: &str) -> RedisOptions {
    // The suite runs at fixed instants in 2026; a long retention keeps Redis from expiring
    // its keys the moment they are written.
    RedisOptions {
        url: url.to_string(),
        retention: Duration::from_secs(3650 * 86_400),
        wait_replicas: None,
        command_timeout: Duration::from_secs(2),
    }
}

async fn fresh(url: &str) -> RedisStore {
    let store = RedisStore::connect(options(url))
        .await
        .expect("redis reachable");
    store.client().flushall_cluster().await.unwrap();
    store
}

#[tokio::test]
async fn redis_store_conforms() {
    let server = RedisServer::start().await;
    meter::conformance::run_all(|| fresh(&server.url)).await;
}

#[tokio::test]
async fn redis_cluster_store_conforms() {
    let cluster = RedisCluster::start().await;
    meter::conformance::run_all(|| fresh(&cluster.url)).await;
}

#[tokio::test]
async fn lost_sweep_index_entries_are_restored() {
    use meter::lifecycle::{PlanRef, Status, Subscription};
    use meter::store::{ControlStore, ReserveOp, SlotSpec, UsageStore};
    let server = RedisServer::start().await;
    let store = fresh(&server.url).await;
    let now = chrono::Utc::now();
    let sub = Subscription {
        tenant: "acme".into(),
        plan: PlanRef {
            code: "p".into(),
            version: 1,
        },
        plan_since: now,
        addons: vec![],
        status: Status::Active,
        status_since: now,
        billing_anchor: now,
        time_zone: "UTC".into(),
        trial_ends_at: None,
        post_trial_plan: None,
        scheduled_change: None,
        cancel_at: None,
    };
    let entry = meter::ledger::LedgerEntry::change(
        "e1".into(),
        now,
        "acme",
        meter::ledger::Source::Admin,
        "subscription.put",
        "test",
        "",
        None,
        Some(meter::ledger::snapshot(&sub)),
    );
    store.save_subscription(&sub, &entry).await.unwrap();
    let op = ReserveOp {
        tenant: "acme".into(),
        metric: "calls".into(),
        amount: 2,
        reservation_id: "r1".into(),
        idempotency_key: "k1".into(),
        slots: vec![SlotSpec {
            key: "calls|day|0".into(),
            cap: Some(10),
            ends_at: None,
        }],
        expires_at: now + chrono::Duration::seconds(1),
        at: now,
        context: String::new(),
    };
    assert!(store.reserve(op).await.unwrap().granted);
    // As if the node died before indexing the tenant.
    let _: i64 = store.client().srem("al:pending", "acme").await.unwrap();
    let later = now + chrono::Duration::seconds(2);
    assert!(store.expire_due(later, 100).await.unwrap().is_empty());
    assert_eq!(store.reindex_pending().await.unwrap(), 1);
    assert_eq!(store.expire_due(later, 100).await.unwrap().len(), 1);
    assert_eq!(
        store.usage("acme", &["calls|day|0".into()]).await.unwrap()[0].reserved,
        0
    );
}

/// Every change writes its event to the tenant's partition stream in the same script.
async fn events_land_in_the_partition_stream(store: RedisStore) {
    use meter::event::{partition, stream_key, EventKind, Spooled};
    use meter::store::{RecordOp, ReserveOp, SlotSpec, UsageStore};
    let now = chrono::Utc::now();
    let slots = vec![SlotSpec {
        key: "calls|day|0".into(),
        cap: Some(10),
        ends_at: None,
    }];
    let reserve = |id: &str, amount| ReserveOp {
        tenant: "acme".into(),
        metric: "calls".into(),
        amount,
        reservation_id: id.into(),
        idempotency_key: id.into(),
        slots: slots.clone(),
        expires_at: now + chrono::Duration::seconds(60),
        at: now,
        context: "ctx".into(),
    };
    assert!(store.reserve(reserve("r1", 2)).await.unwrap().granted);
    assert!(!store.reserve(reserve("r2", 20)).await.unwrap().granted);
    store.commit("acme", "r1", 1, now).await.unwrap();
    assert!(store.commit("acme", "r1", 1, now).await.unwrap().replayed);
    assert!(store.reserve(reserve("r3", 1)).await.unwrap().granted);
    store.release("acme", "r3", now).await.unwrap();
    let record = RecordOp {
        tenant: "acme".into(),
        metric: "calls".into(),
        amount: 3,
        event_id: "e1".into(),
        slots: slots.clone(),
        at: now,
        context: "ctx".into(),
    };
    assert!(store.record(record.clone()).await.unwrap().granted);
    assert!(store.record(record.clone()).await.unwrap().replayed);
    let entries: Vec<(String, std::collections::HashMap<String, String>)> = store
        .client()
        .xrange(stream_key(partition("acme")), "-", "+", None)
        .await
        .unwrap();
    let seen: Vec<(EventKind, String, i64, bool)> = entries
        .iter()
        .map(|(_, f)| {
            let e = Spooled::from_fields(f.iter().map(|(k, v)| (k.as_str(), v.as_str()))).unwrap();
            assert_eq!(e.context, "ctx");
            assert_eq!(e.at_ms, now.timestamp_millis());
            (e.kind, e.id, e.amount, e.granted)
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (EventKind::Denial, "r2/denied".into(), 20, false),
            (EventKind::Commit, "r1/commit".into(), 1, true),
            (EventKind::Release, "r3/release".into(), 1, true),
            (EventKind::Record, "e1".into(), 3, true),
        ]
    );
    let owned = |f: &std::collections::HashMap<String, String>| -> Vec<(String, String)> {
        f.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    let recorded = owned(&entries[3].1);
    // A node's spool shipped twice (it died before forgetting it) lands once.
    let fields = owned(&entries[0].1);
    assert!(store.ship("n1", 7, "acme", &fields).await.unwrap());
    assert!(!store.ship("n1", 7, "acme", &fields).await.unwrap());
    assert!(!store.ship("n1", 6, "acme", &fields).await.unwrap());
    assert!(store.ship("n2", 1, "acme", &fields).await.unwrap());
    // Many events in one call (one round trip per partition and batch), in order, each
    // once: a batch shipped again after a crash, partly new, appends only what is new.
    let p = partition("acme");
    let mut batch: Vec<(String, String)> = fields.clone();
    batch.retain(|(k, _)| k != "i");
    let batch: Vec<Vec<(String, String)>> = (8..=10)
        .map(|seq| {
            let mut f = batch.clone();
            f.push(("i".into(), format!("b{seq}")));
            f
        })
        .collect();
    let events = |seqs: std::ops::RangeInclusive<u64>| -> Vec<enforcer::redis::Shipment> {
        seqs.map(|s| (s, "acme", batch[(s - 8) as usize].as_slice()))
            .collect()
    };
    assert_eq!(store.ship_many("n1", p, &events(8..=9)).await.unwrap(), 2);
    assert_eq!(store.ship_many("n1", p, &events(8..=10)).await.unwrap(), 1);
    assert_eq!(store.ship_many("n1", p, &events(8..=10)).await.unwrap(), 0);
    let entries: Vec<(String, std::collections::HashMap<String, String>)> = store
        .client()
        .xrange(stream_key(p), "-", "+", None)
        .await
        .unwrap();
    let ids: Vec<&str> = entries.iter().map(|(_, f)| f["i"].as_str()).collect();
    assert_eq!(ids[ids.len() - 3..], ["b8", "b9", "b10"]);
    assert_eq!(entries.len(), 9);
    assert_eq!(
        entries[entries.len() - 1].1.len(),
        fields.len(),
        "every field shipped"
    );
    // A record counts once per event id, whichever node ships it: one Redis counted (e1)
    // is not appended again, nor is one two nodes counted (a client retried on another
    // after a lost answer). Denials are attempts, each appended (above).
    assert!(!store.ship("n3", 1, "acme", &recorded).await.unwrap());
    let mut retried = recorded.clone();
    retried.retain(|(k, _)| k != "i");
    retried.push(("i".into(), "s1".into()));
    assert!(store.ship("n1", 11, "acme", &retried).await.unwrap());
    assert!(!store.ship("n2", 2, "acme", &retried).await.unwrap());
    let ids: Vec<String> = store
        .client()
        .xrange::<Vec<(String, std::collections::HashMap<String, String>)>, _, _, _>(
            stream_key(p),
            "-",
            "+",
            None,
        )
        .await
        .unwrap()
        .into_iter()
        .map(|(_, f)| f["i"].clone())
        .collect();
    assert_eq!(ids.iter().filter(|i| *i == "e1").count(), 1);
    assert_eq!(ids.iter().filter(|i| *i == "s1").count(), 1);
    // The shipped record is the one a Record through Redis with that id replays.
    let again = RecordOp {
        event_id: "s1".into(),
        ..record
    };
    assert!(store.record(again).await.unwrap().replayed);
}

#[tokio::test]
async fn events_are_written_with_their_change_on_a_server_and_a_cluster() {
    let server = RedisServer::start().await;
    events_land_in_the_partition_stream(fresh(&server.url).await).await;
    let cluster = RedisCluster::start().await;
    events_land_in_the_partition_stream(fresh(&cluster.url).await).await;
}
