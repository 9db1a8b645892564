//! Events written into several partition streams reach ClickHouse once each, with
//! rollups equal to the producer's ledger; two aggregators share the partitions; bad
//! entries go to the dead letters with their error while the rest flows.

mod harness;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use aggregator::schema::migrate;
use aggregator::sink::ClickHouse;
use aggregator::source::redis::lease_key;
use fred::prelude::*;
use harness::redis::{RedisCluster, RedisServer};
use harness::*;
use meter::event::{partition, EventKind, PARTITIONS};

/// Longest wait for a backlog to drain (it ends as soon as it has).
const DRAIN: Duration = Duration::from_secs(300);

/// Whether a lease value names aggregator `id` (`<id>/<nonce>`).
fn held_by(owner: &Option<String>, id: &str) -> bool {
    owner
        .as_deref()
        .is_some_and(|o| o.split('/').next() == Some(id))
}

/// Who holds each partition's lease now.
async fn lease_owners(p: &Producer) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for part in 0..PARTITIONS {
        let owner: Option<String> = p.client.get(lease_key(part)).await.unwrap();
        out.push(owner);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn events_of_many_partitions_are_inserted_once_and_roll_up_to_the_ledger() {
    let redis = RedisServer::start().await;
    let ch = ClickHouseServer::start().await;
    let mut producer = Producer::connect(&redis.url).await;
    // A backlog written before any aggregator ran (the group reads from the start)...
    let first = events(3000, 0);
    let used: BTreeSet<u16> = first.iter().map(|e| partition(&e.tenant)).collect();
    assert!(
        used.len() >= 5,
        "events spread over {} partitions",
        used.len()
    );
    producer.emit_many(&first).await;
    let agg = InProcess::start(options(&ch, &redis.url, "solo"));
    wait_drained(&ch, &producer, DRAIN).await;
    assert_exact(&ch, &producer.ledger).await;
    // ...and events written while it runs.
    producer.emit_many(&events(2000, 3000)).await;
    wait_drained(&ch, &producer, DRAIN).await;
    assert_exact(&ch, &producer.ledger).await;
    assert!(
        lease_owners(&producer)
            .await
            .iter()
            .any(|o| held_by(o, "solo")),
        "the aggregator holds leases while it runs"
    );
    agg.stop().await;
    assert!(
        lease_owners(&producer).await.iter().all(Option::is_none),
        "leases are given back on shutdown"
    );
    let mut kept = 0;
    for part in 0..PARTITIONS {
        let len: u64 = producer
            .client
            .xlen(meter::event::stream_key(part))
            .await
            .unwrap();
        kept += len;
    }
    assert!(
        kept <= used.len() as u64,
        "acknowledged entries are trimmed: {kept} left"
    );
    assert_exact(&ch, &producer.ledger).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn on_a_redis_cluster_events_are_inserted_once() {
    let cluster = RedisCluster::start().await;
    let ch = ClickHouseServer::start().await;
    let mut producer = Producer::connect(&cluster.url).await;
    producer.emit_many(&events(2000, 0)).await;
    let agg = InProcess::start(options(&ch, &cluster.url, "clustered"));
    producer.emit_many(&events(1000, 2000)).await;
    wait_drained(&ch, &producer, DRAIN).await;
    assert_exact(&ch, &producer.ledger).await;
    agg.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_aggregators_share_the_partitions_and_totals_stay_exact() {
    let redis = RedisServer::start().await;
    let ch = ClickHouseServer::start().await;
    let mut producer = Producer::connect(&redis.url).await;
    producer.emit_many(&events(1000, 0)).await;
    let a = InProcess::start(options(&ch, &redis.url, "agg-a"));
    producer.emit_many(&events(1000, 1000)).await;
    let b = InProcess::start(options(&ch, &redis.url, "agg-b"));
    // They converge to half of the partitions each (the first gives back what is beyond
    // its share once it sees the second), while events keep coming.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut wave = 2000;
    loop {
        producer.emit_many(&events(300, wave)).await;
        wave += 300;
        let owners = lease_owners(&producer).await;
        let count = |id: &str| owners.iter().filter(|o| held_by(o, id)).count();
        let (na, nb) = (count("agg-a"), count("agg-b"));
        if na == 32 && nb == 32 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "partitions not shared: a {na}, b {nb}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    producer.emit_many(&events(2000, wave)).await;
    wait_drained(&ch, &producer, DRAIN).await;
    assert_exact(&ch, &producer.ledger).await;
    // One leaves: the other takes everything over.
    a.stop().await;
    producer.emit_many(&events(1000, wave + 2000)).await;
    wait_drained(&ch, &producer, DRAIN).await;
    assert_exact(&ch, &producer.ledger).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_entries_go_to_the_dead_letters_with_their_error_and_the_rest_flows() {
    let redis = RedisServer::start().await;
    let ch = ClickHouseServer::start().await;
    let mut producer = Producer::connect(&redis.url).await;
    // Entries ClickHouse refuses: a column whose default throws for one tenant (a real
    // rejection of the whole insert, before anything is written). The tenant shares its
    // partition with good ones, so its events sit inside batches of good events, which
    // are bisected down to them.
    let p = partition("tenant-1");
    let poison_tenant = (0..)
        .map(|i| format!("poison-{i}"))
        .find(|t| partition(t) == p)
        .unwrap();
    let mut opts = options(&ch, &redis.url, "dl");
    let cfg = opts.clickhouse();
    ClickHouse::create_database(&cfg).await.unwrap();
    migrate(&ClickHouse::new(&cfg)).await.unwrap();
    ch.client(DB)
        .query("ALTER TABLE usage_events ADD COLUMN poison UInt8 DEFAULT throwIf(tenant = ?)")
        .bind(&poison_tenant)
        .execute()
        .await
        .unwrap();
    opts.batch_size = 300;

    producer.emit_many(&events(700, 0)).await;
    // Entries that do not parse, each with the field at fault.
    let good = Spooled_fields();
    let mut missing = good.clone();
    missing.retain(|(k, _)| *k != "a");
    let mut bad_kind = good.clone();
    bad_kind[0].1 = "refund";
    let mut bad_context = good.clone();
    bad_context[4].1 = "{not json";
    for fields in [missing, bad_kind, bad_context] {
        producer.emit_raw(p, fields).await;
    }
    // Poisoned events in the middle of good ones, in the poison tenant's partition.
    let poison = Ev {
        kind: EventKind::Commit,
        tenant: poison_tenant.clone(),
        metric: "api_calls".into(),
        amount: 1,
        at_ms: 1_706_800_000_000, // February, as the events around it
    };
    let mut poisoned = 0;
    for i in 0..3 {
        producer.emit_many(&events(150, 1000 + i * 150)).await;
        let before = producer.ledger.clone();
        producer.emit_many(std::slice::from_ref(&poison)).await;
        producer.ledger = before;
        producer.ledger.bad += 1;
        poisoned += 1;
    }
    producer.emit_many(&events(300, 2000)).await;

    let agg = InProcess::start(opts);
    wait_drained(&ch, &producer, DRAIN).await;
    assert_exact(&ch, &producer.ledger).await;
    agg.stop().await;

    let dead = producer.dead_letters(p).await;
    let errors: Vec<&str> = dead.iter().map(|d| d["error"].as_str()).collect();
    assert!(
        errors.iter().any(|e| e.contains("field a: missing")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("field k: unknown kind \"refund\"")),
        "{errors:?}"
    );
    assert!(errors.iter().any(|e| e.contains("field c:")), "{errors:?}");
    assert!(
        dead.iter().all(|d| d.contains_key("entry")),
        "dead letters name their entry"
    );
    let poison_dead: Vec<_> = producer
        .dead_letters(p)
        .await
        .into_iter()
        .filter(|d| d.get("error").is_some_and(|e| e.contains("code 395")))
        .collect();
    assert_eq!(
        poison_dead.len(),
        poisoned,
        "each rejected event dead-lettered once"
    );
    assert!(
        poison_dead.iter().all(|d| d
            .get("c")
            .is_some_and(|c| c.contains(&format!("\"{poison_tenant}\"")))),
        "the fields are kept"
    );
    let total_dead: usize = {
        let mut n = 0;
        for part in 0..PARTITIONS {
            n += producer.dead_letters(part).await.len();
        }
        n
    };
    assert_eq!(
        total_dead as u64, producer.ledger.bad,
        "nothing else went to the dead letters"
    );
}

/// The fields of one well-formed spooled record.
#[allow(non_snake_case)]
fn Spooled_fields() -> Vec<(&'static str, &'static str)> {
    vec![
        ("k", "record"),
        ("i", "raw-1"),
        ("a", "1"),
        ("t", "1706000000000"),
        (
            "c",
            r#"{"tenant":"tenant-1","metric":"api_calls","amount":1,"gauge":false,"slots":[],"plan":"pro","plan_version":1,"node":"n"}"#,
        ),
        ("u", ""),
        ("g", "1"),
    ]
}
