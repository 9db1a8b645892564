//! Soft limits across real nodes: counters gossiped between three `allot serve`
//! processes. Over-admission stays within the documented bound (what the other nodes
//! admitted during the lag of this node's view of them), a partition keeps every node
//! deciding on what it knows, and once peer traffic flows again the nodes converge to
//! the exact total.

mod harness;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use allot_proto::v1 as pb;
use harness::proxy::Proxy;
use harness::redis::RedisServer;
use harness::{record, reserve, subscribe, window_usage, Node};

const CATALOG: &str = "version: 1
metrics:
  calls: { unit: call }
  hits: { unit: request }
plans:
  rated:
    versions:
      1:
        limits:
          hits:
            - { window: minute, rate: 60, burst: 30, scope: node }
  capped:
    versions:
      1:
        limits:
          calls:
            - { window: day, amount: 10000, enforcement: soft, overage: 0, warn_at: [80, 100] }
  open:
    versions:
      1:
        limits:
          calls:
            - { window: day, amount: 10000, enforcement: soft }
";

const INTERVAL: Duration = Duration::from_millis(100);

/// Three nodes, each reached by its peers only through its own proxy.
struct Cluster {
    nodes: Vec<Node>,
    proxies: Vec<Proxy>,
}

impl Cluster {
    /// With `redis`, nodes find each other through its membership list; without, through
    /// `--peers`.
    async fn start(redis: Option<&str>) -> Cluster {
        let mut proxies = Vec::new();
        for _ in 0..3 {
            proxies.push(Proxy::start().await);
        }
        let mut cluster = Cluster {
            nodes: Vec::new(),
            proxies,
        };
        for i in 0..3 {
            let node = cluster.builder(i, redis).start().await;
            cluster.proxies[i].set_target(&node.endpoint);
            cluster.nodes.push(node);
        }
        cluster
    }

    fn builder(&self, i: usize, redis: Option<&str>) -> harness::NodeBuilder {
        let b = Node::builder()
            .catalog(CATALOG)
            .arg("--node-id")
            .arg(&format!("n{i}"))
            .arg("--advertise")
            .arg(&self.proxies[i].addr)
            .arg("--sync-interval")
            .arg("100ms")
            // Long enough that a stalled tick on a busy machine does not make a live peer
            // look gone; the partition tests wait the few seconds it takes to notice.
            .arg("--peer-timeout")
            .arg("5s");
        match redis {
            Some(url) => b.arg("--redis").arg(url),
            None => {
                let others: Vec<&str> = (0..3)
                    .filter(|j| *j != i)
                    .map(|j| self.proxies[j].addr.as_str())
                    .collect();
                b.arg("--peers").arg(&others.join(","))
            }
        }
    }

    async fn peers(&self, i: usize) -> pb::GetPeersResponse {
        self.nodes[i]
            .admin()
            .await
            .get_peers(pb::GetPeersRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// Waits until every node sees `n` live peers, and divides its `scope: node` rate
    /// limits accordingly.
    async fn wait_live(&self, n: usize) {
        for _ in 0..300 {
            let mut ok = true;
            for i in 0..3 {
                let p = self.peers(i).await;
                ok &= p.peers.iter().filter(|p| p.live).count() == n
                    && p.live_nodes as usize == n + 1;
            }
            if ok {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("nodes did not see {n} live peers each within 30 s");
    }

    /// Waits until every node reports `want` for the day window, and returns what they
    /// report at the end.
    async fn converge(&self, tenant: &str, want: u64) -> Vec<u64> {
        let mut seen = Vec::new();
        for _ in 0..300 {
            seen.clear();
            for n in &self.nodes {
                seen.push(
                    window_usage(&mut n.enforcer().await, tenant, "calls", "day")
                        .await
                        .0,
                );
            }
            if seen.iter().all(|u| *u == want) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        seen
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_limit_over_three_nodes_stays_within_the_gossip_bound() {
    let redis = RedisServer::start().await;
    let cluster = Cluster::start(Some(&redis.url)).await;
    // Membership through Redis: no --peers given.
    cluster.wait_live(2).await;
    subscribe(&mut cluster.nodes[0].admin().await, "acme", "capped").await;

    const AMOUNT: u64 = 10;
    let admitted = Arc::new(AtomicU64::new(0));
    let warned = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut load = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let mut e = node.enforcer().await;
        let (admitted, warned) = (admitted.clone(), warned.clone());
        load.push(tokio::spawn(async move {
            let mut denied_in_a_row = 0;
            let mut k = 0;
            while denied_in_a_row < 10 {
                k += 1;
                let r = e
                    .record(record("acme", "calls", AMOUNT as i64, &format!("n{i}-{k}")))
                    .await
                    .unwrap()
                    .into_inner();
                if r.recorded {
                    denied_in_a_row = 0;
                    admitted.fetch_add(AMOUNT, Ordering::SeqCst);
                    if r.decision.unwrap().warning_percent.is_some() {
                        warned.fetch_add(1, Ordering::SeqCst);
                    }
                } else {
                    denied_in_a_row += 1;
                    assert_eq!(r.decision.unwrap().reason, "limit_exceeded");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    // The lag of each node's view of its peers, sampled while the load runs.
    let sampler = {
        let admins = futures_admins(&cluster).await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::SeqCst) {
                for a in &admins {
                    let mut a = a.clone();
                    let p = a
                        .get_peers(pb::GetPeersRequest {})
                        .await
                        .unwrap()
                        .into_inner();
                    for peer in p.peers {
                        let age = peer.last_merge_age.expect("merged at least once");
                        worst = worst.max(Duration::new(age.seconds as u64, age.nanos as u32));
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            worst
        })
    };
    for l in load {
        l.await.unwrap();
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let worst_lag = sampler.await.unwrap();

    let admitted = admitted.load(Ordering::SeqCst);
    let rate = admitted as f64 / elapsed.as_secs_f64();
    // The documented bound: what the nodes admitted during the longest lag of a view
    // (last merge age, plus the interval the next message may wait), plus one request
    // per node in flight.
    let bound = (rate * (worst_lag + INTERVAL).as_secs_f64()).ceil() as u64 + 3 * AMOUNT;
    println!(
        "admitted {admitted} of 10000 at {rate:.0} units/s; worst view lag {worst_lag:?}; bound 10000 + {bound}"
    );
    assert!(
        admitted > 10_000 - AMOUNT,
        "stopped before the limit: {admitted}"
    );
    assert!(admitted <= 10_000 + bound, "over the bound: {admitted}");
    assert!(warned.load(Ordering::SeqCst) > 0, "warnings past 80%");
    // Every node ends with the exact total.
    assert_eq!(cluster.converge("acme", admitted).await, vec![admitted; 3]);
}

async fn futures_admins(
    cluster: &Cluster,
) -> Vec<pb::admin_client::AdminClient<tonic::transport::Channel>> {
    let mut v = Vec::new();
    for n in &cluster.nodes {
        v.push(n.admin().await);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_nodes_keep_deciding_and_converge_when_traffic_returns() {
    let cluster = Cluster::start(None).await;
    cluster.wait_live(2).await;
    // What an operator sees: both peers live, with the age of their last merge.
    let (code, out, err) = cluster.nodes[0].cli(&["peers", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["node"], "n0");
    let peers = v["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 2, "{out}");
    assert!(
        peers
            .iter()
            .all(|p| p["live"] == true && p["last_merge_age_ms"].is_number()),
        "{out}"
    );
    let (code, table, _) = cluster.nodes[0].cli(&["peers"]).await;
    assert!(
        code == 0 && table.contains("2 of 2 peers live (3 nodes share"),
        "{table}"
    );
    // Embedded nodes keep their own subscriptions.
    for n in &cluster.nodes {
        subscribe(&mut n.admin().await, "beta", "open").await;
    }
    let mut total = 0;
    for (i, n) in cluster.nodes.iter().enumerate() {
        let r = n
            .enforcer()
            .await
            .record(record("beta", "calls", 100, &format!("before-{i}")))
            .await
            .unwrap()
            .into_inner();
        assert!(r.recorded);
        total += 100;
    }
    assert_eq!(cluster.converge("beta", total).await, vec![total; 3]);

    for p in &cluster.proxies {
        p.block();
    }
    cluster.wait_live(0).await;
    // Cut off, each node admits on what it knows; past the limit the soft overage is
    // allowed and says so.
    let mut own = [0u64; 3];
    for (i, n) in cluster.nodes.iter().enumerate() {
        let mut e = n.enforcer().await;
        for k in 0..(i + 1) * 10 {
            let amount = 300 + 7 * k as u64;
            let r = e
                .record(record(
                    "beta",
                    "calls",
                    amount as i64,
                    &format!("cut-{i}-{k}"),
                ))
                .await
                .unwrap()
                .into_inner();
            assert!(r.recorded, "{r:?}");
            own[i] += amount;
        }
        let seen = window_usage(&mut e, "beta", "calls", "day").await.0;
        assert_eq!(seen, total + own[i], "node {i} sees only its own news");
        let p = cluster.peers(i).await;
        assert!(p.peers.iter().all(|p| !p.live), "{p:?}");
    }
    let after = total + own.iter().sum::<u64>();
    assert!(after > 10_000, "the partition took the tenant into overage");

    for p in &cluster.proxies {
        p.unblock();
    }
    cluster.wait_live(2).await;
    assert_eq!(cluster.converge("beta", after).await, vec![after; 3]);
    // Past the limit now, a record is overage on every node.
    for n in &cluster.nodes {
        let r = n
            .enforcer()
            .await
            .record(record("beta", "calls", 1, &format!("late-{}", n.endpoint)))
            .await
            .unwrap()
            .into_inner();
        let d = r.decision.unwrap();
        assert!(r.recorded && d.overage && d.reason == "overage", "{d:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_stay_when_their_node_leaves_and_return_with_it() {
    let mut cluster = Cluster::start(None).await;
    cluster.wait_live(2).await;
    for n in &cluster.nodes {
        subscribe(&mut n.admin().await, "gamma", "open").await;
    }
    let mut e = cluster.nodes[0].enforcer().await;
    for k in 0..5 {
        let r = e
            .record(record("gamma", "calls", 40, &format!("g-{k}")))
            .await
            .unwrap()
            .into_inner();
        assert!(r.recorded);
    }
    let r = cluster.nodes[1]
        .enforcer()
        .await
        .record(record("gamma", "calls", 70, "from-n1"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.recorded);
    assert_eq!(cluster.converge("gamma", 270).await, vec![270; 3]);

    // Node 0 dies: its peers keep what it counted.
    cluster.nodes[0].kill9().await;
    for i in 1..3 {
        let mut e = cluster.nodes[i].enforcer().await;
        assert_eq!(window_usage(&mut e, "gamma", "calls", "day").await.0, 270);
    }
    // It comes back on the same data, cut off from its peers: its own counts come from
    // its store, the peer's from its soft.redb, and nothing counts twice.
    for p in &cluster.proxies {
        p.block();
    }
    let dir = cluster.nodes[0].data_dir.clone();
    let node = cluster.builder(0, None).data_dir(&dir).start().await;
    cluster.proxies[0].set_target(&node.endpoint);
    let old = std::mem::replace(&mut cluster.nodes[0], node);
    let mut e = cluster.nodes[0].enforcer().await;
    assert_eq!(window_usage(&mut e, "gamma", "calls", "day").await.0, 270);
    // A retry of an event it counted before the crash is a replay.
    let r = e
        .record(record("gamma", "calls", 40, "g-4"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.replayed, "{r:?}");
    let r = e
        .record(record("gamma", "calls", 50, "g-5"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.recorded && !r.replayed);
    for p in &cluster.proxies {
        p.unblock();
    }
    cluster.wait_live(2).await;
    assert_eq!(cluster.converge("gamma", 320).await, vec![320; 3]);
    drop(old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_scope_rate_limit_over_three_nodes_admits_within_the_global_bound() {
    let redis = RedisServer::start().await;
    let cluster = Cluster::start(Some(&redis.url)).await;
    cluster.wait_live(2).await;
    subscribe(&mut cluster.nodes[0].admin().await, "delta", "rated").await;
    // 60 per minute, burst 30, over 3 nodes: each runs 60 per 3 minutes, bursting 10.
    let started = Instant::now();
    let mut load = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let mut e = node.enforcer().await;
        load.push(tokio::spawn(async move {
            let (mut admitted, mut refused_in_a_row, mut k) = (0u64, 0, 0);
            while refused_in_a_row < 5 {
                k += 1;
                let r = e
                    .record(record("delta", "hits", 1, &format!("h{i}-{k}")))
                    .await
                    .unwrap()
                    .into_inner();
                if r.recorded {
                    admitted += 1;
                    refused_in_a_row = 0;
                } else {
                    let d = r.decision.unwrap();
                    assert_eq!(d.reason, "rate_limited", "{d:?}");
                    assert!(d.retry_after.is_some(), "{d:?}");
                    refused_in_a_row += 1;
                }
            }
            admitted
        }));
    }
    let mut per_node = Vec::new();
    for l in load {
        per_node.push(l.await.unwrap());
    }
    let elapsed = started.elapsed();
    let total: u64 = per_node.iter().sum();
    // The documented bound: floor(rate × E / window) + n × ceil(burst / n).
    let bound = (60.0 * elapsed.as_secs_f64() / 60.0).floor() as u64 + 3 * 10;
    println!("admitted {per_node:?} = {total} in {elapsed:?}; bound {bound}");
    assert!(total <= bound, "{total} > {bound}");
    // Every node had its whole share of the burst: the division is by three, not more.
    assert!(per_node.iter().all(|n| *n >= 10), "{per_node:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_only_requests_stay_on_their_node_and_outlive_a_redis_outage() {
    let mut redis = RedisServer::start().await;
    let cluster = Cluster::start(Some(&redis.url)).await;
    cluster.wait_live(2).await;
    subscribe(&mut cluster.nodes[0].admin().await, "eps", "capped").await;
    let mut e0 = cluster.nodes[0].enforcer().await;
    let mut e1 = cluster.nodes[1].enforcer().await;
    let r = e0
        .reserve(reserve("eps", "calls", 30, "k1"))
        .await
        .unwrap()
        .into_inner();
    let id = r.reservation_id.clone();
    assert!(id.starts_with("sf-") && id.ends_with("@n0"), "{id}");
    // Another node does not hold it, and says which one does.
    let commit = |n| pb::CommitRequest {
        tenant: "eps".into(),
        reservation_id: id.clone(),
        actual_amount: n,
    };
    let err = e1.commit(commit(20)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("\"n0\""), "{}", err.message());
    let c = e0.commit(commit(20)).await.unwrap().into_inner();
    assert_eq!((c.committed, c.refunded), (20, 10));
    assert_eq!(cluster.converge("eps", 20).await, vec![20; 3]);

    // Redis goes away: soft-only requests never needed it.
    redis.kill9().await;
    let r = e1
        .record(record("eps", "calls", 5, "during-outage"))
        .await
        .unwrap()
        .into_inner();
    let d = r.decision.unwrap();
    assert!(r.recorded && d.reason != "degraded_fail_open", "{d:?}");
    let r = e0
        .reserve(reserve("eps", "calls", 1, "k2"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.reservation_id.starts_with("sf-"), "{r:?}");
    // Gossip does not need Redis either.
    assert_eq!(cluster.converge("eps", 25).await, vec![25; 3]);
}

/// A node whose peers hold their gossip streams open still stops on SIGTERM (the drain is
/// bounded), and its peers see it gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_connected_peers_stops_on_sigterm() {
    let mut cluster = Cluster::start(None).await;
    cluster.wait_live(2).await;
    let status = cluster.nodes[1].terminate().await;
    assert!(status.success(), "clean exit: {status}");
    // The others keep answering.
    assert_eq!(cluster.peers(0).await.peers.len(), 2);
}
