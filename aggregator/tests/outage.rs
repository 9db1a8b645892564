//! ClickHouse goes away while events keep coming, stopped cleanly and killed mid-insert:
//! the aggregator retries with backoff, keeps its leases, and once ClickHouse is back
//! every event is in exactly once.

mod harness;

use std::time::Duration;

use harness::redis::RedisServer;
use harness::*;

const DRAIN: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread")]
async fn clickhouse_down_for_a_while_loses_nothing_and_counts_nothing_twice() {
    let redis = RedisServer::start().await;
    let mut ch = ClickHouseServer::start().await;
    let mut producer = Producer::connect(&redis.url).await;
    let agg = InProcess::start(options(&ch, &redis.url, "patient"));
    producer.emit_many(&events(1000, 0)).await;
    wait_drained(&ch, &producer, DRAIN).await;
    assert_exact(&ch, &producer.ledger).await;

    // Stopped (SIGTERM) while a backlog is being inserted; events keep coming meanwhile.
    producer.emit_many(&events(3000, 1000)).await;
    ch.stop().await;
    for wave in 0..5 {
        producer.emit_many(&events(300, 4000 + wave * 300)).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    ch.start_again().await;
    wait_drained(&ch, &producer, DRAIN).await;
    assert_exact(&ch, &producer.ledger).await;

    // Killed (SIGKILL) in the middle of inserting a backlog.
    producer.emit_many(&events(5000, 6000)).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    ch.kill9().await;
    producer.emit_many(&events(500, 11_000)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ch.start_again().await;
    wait_drained(&ch, &producer, DRAIN).await;
    assert_exact(&ch, &producer.ledger).await;
    agg.stop().await;
}
