//! Several nodes, one truth: three `allot serve` processes sharing Redis (a server and a
//! Cluster) never admit more than a hard cap, and see each other's admin changes.

mod harness;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use allot_proto::v1 as pb;
use harness::redis::{nodes_on, RedisCluster, RedisServer};
use harness::{outcome, reserve, subscribe, window_usage, Node};

const CATALOG: &str = "version: 1
metrics:
  calls: { unit: call }
features:
  reports: { kind: boolean }
plans:
  capped:
    tier: 0
    versions:
      1:
        limits:
          calls:
            - { window: day, amount: 500 }
            - { window: month, amount: 10000 }
  bigger:
    tier: 1
    versions:
      1:
        features: { reports: true }
        limits:
          calls:
            - { window: day, amount: 5000 }
            - { window: month, amount: 10000 }
";

async fn race_for_the_cap(nodes: &[Node]) {
    let mut admin = nodes[0].admin().await;
    subscribe(&mut admin, "acme", "capped").await;
    let granted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for client in 0..64 {
            let mut e = node.enforcer().await;
            let granted = granted.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..5 {
                    // Held for an hour: however slow the run, no grant lapses.
                    let mut req = reserve("acme", "calls", 1, &format!("n{n}-c{client}-{i}"));
                    req.ttl = Some(prost_types::Duration {
                        seconds: 3600,
                        nanos: 0,
                    });
                    let r = e.reserve(req).await.unwrap().into_inner();
                    if outcome(&r.decision) != pb::Outcome::Deny {
                        granted.fetch_add(1, Ordering::Relaxed);
                    } else {
                        assert_eq!(r.decision.unwrap().reason, "limit_exceeded");
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(granted.load(Ordering::Relaxed), 500);
    for node in nodes {
        let mut e = node.enforcer().await;
        assert_eq!(window_usage(&mut e, "acme", "calls", "day").await, (0, 500));
        assert_eq!(
            window_usage(&mut e, "acme", "calls", "month").await,
            (0, 500)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_one_redis_admit_exactly_the_cap() {
    let redis = RedisServer::start().await;
    let nodes = nodes_on(&redis.url, CATALOG, 3).await;
    race_for_the_cap(&nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_one_cluster_admit_exactly_the_cap() {
    let cluster = RedisCluster::start().await;
    let nodes = nodes_on(&cluster.url, CATALOG, 3).await;
    race_for_the_cap(&nodes).await;
}

#[tokio::test]
async fn admin_changes_on_one_node_apply_on_the_others() {
    let redis = RedisServer::start().await;
    let nodes = nodes_on(&redis.url, CATALOG, 3).await;
    let mut admin = nodes[0].admin().await;
    subscribe(&mut admin, "acme", "capped").await;
    let check = pb::CheckRequest {
        tenant: "acme".into(),
        feature: "reports".into(),
        ..Default::default()
    };
    let mut others = vec![nodes[1].enforcer().await, nodes[2].enforcer().await];
    for e in &mut others {
        // Warm each node's cache with the old answer.
        let r = e.check(check.clone()).await.unwrap().into_inner();
        assert_eq!(outcome(&r.decision), pb::Outcome::Deny);
    }
    admin
        .change_subscription(pb::ChangeSubscriptionRequest {
            tenant: "acme".into(),
            plan: "bigger".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    for e in &mut others {
        let mut allowed = false;
        for _ in 0..2400 {
            let r = e.check(check.clone()).await.unwrap().into_inner();
            if outcome(&r.decision) == pb::Outcome::Allow {
                allowed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(allowed, "a node kept the old plan despite the announcement");
    }

    // A grant, and a catalog applied on node 3, reach node 1 too.
    let grant = pb::GrantOverrideRequest {
        tenant: "acme".into(),
        kind: "disable_feature".into(),
        feature: "reports".into(),
        actor: "ops".into(),
        reason: "abuse".into(),
        ..Default::default()
    };
    nodes[2].admin().await.grant_override(grant).await.unwrap();
    let mut e1 = nodes[0].enforcer().await;
    let mut denied = false;
    for _ in 0..2400 {
        let r = e1.check(check.clone()).await.unwrap().into_inner();
        if outcome(&r.decision) == pb::Outcome::Deny {
            denied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(denied);
    let newer = format!(
        "{CATALOG}  extra:\n    versions:\n      1:\n        features: {{ reports: true }}\n"
    );
    let applied = nodes[2]
        .admin()
        .await
        .apply_catalog(pb::ApplyCatalogRequest {
            yaml: newer,
            source_name: "new".into(),
            dry_run: false,
            actor: "t".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(applied.applied);
    let mut seen = false;
    for _ in 0..2400 {
        let yaml = nodes[0]
            .admin()
            .await
            .get_catalog(pb::GetCatalogRequest {})
            .await
            .unwrap()
            .into_inner()
            .yaml;
        if yaml.contains("extra") {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(seen, "node 1 never loaded the catalog applied on node 3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_time_out_and_retry_never_hold_twice() {
    let redis = RedisServer::start().await;
    let nodes = nodes_on(&redis.url, CATALOG, 3).await;
    let mut admin = nodes[0].admin().await;
    subscribe(&mut admin, "acme", "bigger").await;
    let mut tasks = Vec::new();
    let timeouts = Arc::new(AtomicU64::new(0));
    for client in 0..24 {
        let timeouts = timeouts.clone();
        // Each attempt may land on another node, as behind a load balancer.
        let mut clients = Vec::new();
        for node in &nodes {
            clients.push(node.enforcer().await);
        }
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for k in 0..10 {
                let key = format!("c{client}-k{k}");
                let mut attempt = 0u64;
                let id = loop {
                    attempt += 1;
                    let mut req = tonic::Request::new(reserve("acme", "calls", 1, &key));
                    // The first attempts give up almost at once; the server may still
                    // finish them.
                    if attempt <= 3 {
                        req.set_timeout(Duration::from_micros(200 + 400 * attempt));
                    }
                    let e = &mut clients[(attempt as usize + k) % 3];
                    match e.reserve(req).await {
                        Ok(r) => break r.into_inner().reservation_id,
                        Err(s) => {
                            assert!(
                                matches!(
                                    s.code(),
                                    tonic::Code::DeadlineExceeded
                                        | tonic::Code::Cancelled
                                        | tonic::Code::Unavailable
                                ),
                                "{s:?}"
                            );
                            timeouts.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                };
                assert!(!id.is_empty());
                // Asking again anywhere gives the same reservation.
                let again = clients[k % 3]
                    .reserve(reserve("acme", "calls", 1, &key))
                    .await
                    .unwrap()
                    .into_inner();
                assert!(again.replayed);
                assert_eq!(again.reservation_id, id);
                ids.push(id);
            }
            ids
        }));
    }
    let mut all = std::collections::HashSet::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), 240);
    assert!(
        timeouts.load(Ordering::Relaxed) > 0,
        "no attempt timed out: the test exercised nothing"
    );
    let mut e = nodes[1].enforcer().await;
    assert_eq!(window_usage(&mut e, "acme", "calls", "day").await, (0, 240));
}
