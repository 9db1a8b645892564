//! Aggregator processes killed without warning: right after an insert, before its
//! acknowledgement (a failpoint makes that deterministic), and at random points of a
//! longer run. The next aggregator takes the partitions over and every total still equals
//! the ledger. The longer test also measures throughput (printed, not asserted).

mod harness;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use harness::redis::RedisServer;
use harness::*;

/// Longest wait for the backlog to drain (it ends as soon as it has, about 25 s in CI).
const DRAIN: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread")]
async fn killed_between_insert_and_ack_the_next_aggregator_counts_nothing_twice() {
    let redis = RedisServer::start().await;
    let ch = ClickHouseServer::start().await;
    let mut producer = Producer::connect(&redis.url).await;
    producer.emit_many(&events(3000, 0)).await;

    let mut crashy = Process::start(&ch, &redis.url, "crashy", &["--exit-after-insert", "3"]);
    let status = crashy.wait(Duration::from_secs(60)).await;
    assert!(
        !status.success(),
        "the failpoint aborts the process: {status}"
    );
    let inserted = row_count(&ch).await;
    let open = producer.unacknowledged().await;
    assert!(inserted > 0, "it inserted before dying");
    assert!(
        inserted + open > producer.ledger.rows,
        "some rows are in ClickHouse but their entries were never acknowledged \
         ({inserted} rows, {open} entries open, {} written)",
        producer.ledger.rows
    );

    // The next one waits for the dead one's leases to lapse, then skips what is in.
    let mut heir = Process::start(&ch, &redis.url, "heir", &[]);
    wait_drained(&ch, &producer, DRAIN).await;
    assert_exact(&ch, &producer.ledger).await;
    assert!(heir.terminate().await.success());
}

/// A small deterministic generator (the seed is printed, to replay a failure).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_at_random_points_of_a_long_run_totals_stay_exact() {
    let redis = RedisServer::start().await;
    let ch = ClickHouseServer::start().await;
    let mut producer = Producer::connect(&redis.url).await;
    let seed = std::env::var("ALLOT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("seed {seed} (ALLOT_TEST_SEED={seed} replays the kill points)");
    let mut rng = Lcg(seed);
    producer.emit_many(&events(4000, 0)).await;

    // Events keep coming while aggregators are killed at random points and replaced.
    let writer = tokio::spawn(async move {
        for wave in 0..30 {
            producer.emit_many(&events(300, 10_000 + wave * 300)).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        producer
    });
    for round in 0..5 {
        let mut p = Process::start(&ch, &redis.url, &format!("victim-{round}"), &[]);
        // A dead aggregator's leases lapse after 2 s: give its successor time to work.
        let delay = Duration::from_millis(2000 + rng.below(2500));
        tokio::time::sleep(delay).await;
        p.kill9().await;
        eprintln!(
            "round {round}: killed after {delay:?}, {} rows in",
            row_count(&ch).await
        );
    }
    let producer = writer.await.unwrap();
    let mut last = Process::start(&ch, &redis.url, "survivor", &[]);
    wait_drained(&ch, &producer, DRAIN).await;
    assert_exact(&ch, &producer.ledger).await;
    assert!(last.terminate().await.success());

    // Throughput: a backlog drained by one aggregator with the default batch size and
    // interval (a debug build, sharing two cores with Redis and ClickHouse).
    let mut producer = producer;
    let backlog = 150_000;
    let start = Instant::now();
    // In one month, as live traffic is (a batch is cut where the month changes).
    let mut evs = events(backlog, 100_000);
    let march = 1_709_251_200_000; // 2024-03-01T00:00:00Z
    for (i, e) in evs.iter_mut().enumerate() {
        e.at_ms = march + i as i64 * 10_000;
    }
    producer.emit_many(&evs).await;
    let written = start.elapsed();
    let start = Instant::now();
    let mut fast = Process::start(
        &ch,
        &redis.url,
        "throughput",
        &["--batch-size", "10000", "--batch-interval", "1s"],
    );
    wait_drained(&ch, &producer, DRAIN).await;
    let drained = start.elapsed();
    assert_exact(&ch, &producer.ledger).await;
    assert!(fast.terminate().await.success());
    eprintln!(
        "throughput: {backlog} events written in {written:.2?} ({:.0}/s, pipelined XADD); \
         drained into ClickHouse in {drained:.2?} ({:.0} events/s, start-up included)",
        backlog as f64 / written.as_secs_f64(),
        backlog as f64 / drained.as_secs_f64()
    );
}
