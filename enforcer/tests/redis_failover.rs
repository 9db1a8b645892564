//! A Redis Cluster master killed under load: after the failover requests succeed again.
//! Prints how many acknowledged units the failover lost, without and with WAIT.

mod harness;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use harness::redis::{key_slot, RedisCluster};
use harness::{in_doubt, record, subscribe, Node};

const CATALOG: &str = "version: 1
metrics:
  calls: { unit: call }
plans:
  p:
    versions:
      1:
        limits:
          calls:
            - { window: month, amount: 1000000000 }
";

/// Returns (acknowledged units, units counted after the failover).
async fn run(wait_replicas: Option<u32>) -> (u64, u64) {
    let mut cluster = RedisCluster::start().await;
    let mut builder = Node::on_redis(CATALOG, &cluster.url);
    if let Some(n) = wait_replicas {
        builder = builder
            .arg("--redis-wait-replicas")
            .arg(&n.to_string())
            .arg("--redis-wait-timeout")
            .arg("50ms");
    }
    let node = builder.start().await;
    subscribe(&mut node.admin().await, "acme", "p").await;

    let acked = Arc::new(Mutex::new(0u64));
    let refused = Arc::new(Mutex::new(0u64));
    let stop = Arc::new(AtomicBool::new(false));
    let attempted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut loaders = Vec::new();
    for w in 0..8 {
        let mut e = node.enforcer().await;
        let (acked, refused, stop) = (acked.clone(), refused.clone(), stop.clone());
        let attempted = attempted.clone();
        loaders.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                attempted.fetch_add(1, Ordering::Relaxed);
                // As a careful client does: an answer that may or may not have been applied
                // is retried with the same event id until it is definite.
                loop {
                    match e
                        .record(record("acme", "calls", 1, &format!("w{w}-{i}")))
                        .await
                    {
                        Ok(r) if r.get_ref().recorded => *acked.lock().unwrap() += 1,
                        Err(s) if in_doubt(&s) && !stop.load(Ordering::Relaxed) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                        _ => *refused.lock().unwrap() += 1,
                    }
                    break;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let slot = key_slot(&meter::event::stream_key(meter::event::partition("acme")));
    let master = cluster.master_for_slot(slot).await;
    cluster.kill9_port(master).await;
    let promoted = cluster.wait_failover(slot, master).await;
    assert_ne!(promoted, master);

    // Requests succeed again: the refusals stop growing while the load goes on.
    let mut recovered = false;
    for _ in 0..100 {
        let before = (*acked.lock().unwrap(), *refused.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = (*acked.lock().unwrap(), *refused.lock().unwrap());
        if after.0 > before.0 && after.1 == before.1 {
            recovered = true;
            break;
        }
    }
    assert!(
        recovered,
        "requests did not succeed again after the failover"
    );
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.await.unwrap();
    }
    let acked = *acked.lock().unwrap();
    let mut e = node.enforcer().await;
    // The breaker may still be cooling down from the failover: ask until it answers.
    let mut used = None;
    for _ in 0..100 {
        let req = allot_proto::v1::GetUsageRequest {
            tenant: "acme".into(),
            metric: "calls".into(),
        };
        if let Ok(u) = e.get_usage(req).await {
            used = u
                .into_inner()
                .windows
                .iter()
                .find(|w| w.window == "month")
                .map(|w| w.used);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let used = used.expect("usage readable after the failover");
    // Every event id counts at most once, whatever was retried where.
    assert!(
        used <= attempted.load(Ordering::Relaxed),
        "used {used} > events attempted"
    );
    (acked, used)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_without_and_with_wait() {
    if std::env::var("DEBUG_FAILOVER").is_err() {
        let (acked, used) = run(None).await;
        println!(
            "without WAIT: {acked} acknowledged, {used} counted, {} lost",
            acked.saturating_sub(used)
        );
    }
    let (acked, used) = run(Some(1)).await;
    println!(
        "with WAIT 1: {acked} acknowledged, {used} counted, {} lost",
        acked.saturating_sub(used)
    );
}
