//! Hard caps are exact under concurrency: 64 clients racing for 1,000 units get exactly
//! 1,000 grants.

mod harness;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use allot_proto::v1 as pb;
use harness::{outcome, reserve, subscribe, window_usage, Node};

const CATALOG: &str = "version: 1
metrics:
  calls: { unit: call }
plans:
  capped:
    versions:
      1:
        limits:
          calls:
            - { window: day, amount: 1000 }
            - { window: month, amount: 100000 }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_clients_get_exactly_the_cap() {
    let node = Node::builder().catalog(CATALOG).start().await;
    let mut admin = node.admin().await;
    subscribe(&mut admin, "acme", "capped").await;

    let granted = Arc::new(AtomicU64::new(0));
    let denied = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for client in 0..64 {
        // One connection per client, as 64 separate services would have.
        let mut e = node.enforcer().await;
        let (granted, denied) = (granted.clone(), denied.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                // Held for an hour: however slow the run, no grant lapses and frees room.
                let mut req = reserve("acme", "calls", 1, &format!("c{client}-{i}"));
                req.ttl = Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                });
                let r = e.reserve(req).await.unwrap().into_inner();
                match outcome(&r.decision) {
                    pb::Outcome::Deny => {
                        assert_eq!(r.decision.unwrap().reason, "limit_exceeded");
                        denied.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        granted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(granted.load(Ordering::Relaxed), 1000);
    assert_eq!(denied.load(Ordering::Relaxed), 64 * 20 - 1000);
    let mut e = node.enforcer().await;
    assert_eq!(
        window_usage(&mut e, "acme", "calls", "day").await,
        (0, 1000)
    );
    assert_eq!(
        window_usage(&mut e, "acme", "calls", "month").await,
        (0, 1000)
    );
}
