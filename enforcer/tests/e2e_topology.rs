//! The end-to-end test of the whole topology (the issue's acceptance): `deploy/up` brings
//! up a 6-node Redis Cluster, ClickHouse, three enforcers and two aggregators with this
//! build's binary and the catalog below, on a free block of ports in a temporary state
//! directory (always taken down with `deploy/down --purge`). A few dozen clients spread
//! over the three enforcers' gRPC ports drive `Check` (features), `Reserve` → `Commit` on
//! a hard, fail-closed day cap, and `Record` on a soft metric (soft limit plus overage
//! allowance) and a priced one (`unit_price` on its month limit). Mid-run:
//!
//! - one tenant is upgraded (Admin `ChangeSubscription`, now: higher cap, more included
//!   units, another price, one more feature) and another is granted extra units (Admin
//!   `GrantOverride`);
//! - enforcer-2 is SIGKILLed: clients go to the other two, retrying what was in doubt with
//!   the same idempotency key (hard) or, for soft-only records, which only that node can
//!   deduplicate, on enforcer-2 once `deploy/up` has started it again (it also still has
//!   acknowledged events of its own to ship);
//! - aggregator-1 is SIGKILLed and left dead: aggregator-2 takes its partitions over once
//!   their leases lapse (30 s in deploy);
//! - a Redis master is SIGKILLed and left dead: its replica is promoted after the cluster
//!   node timeout; meanwhile that shard's tenants get fail-closed denials or answers in
//!   doubt, retried until definite.
//!
//! Only definite answers enter the client's ledger. At the end: the hard cap per tenant ×
//! day (plan and grant included) was never exceeded, by the ledger, in Redis and in
//! ClickHouse; soft usage stays within the documented gossip bound (docs/soft-limits.md)
//! and every enforcer reports it exactly; ClickHouse `usage_events` holds exactly the
//! acknowledged commit and record event ids, each once; and the Billing service's used,
//! overage, amount and unpriced units per tenant × metric equal the client's ledger.
//! Timings and counts are printed, not asserted.

mod harness;

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use allot_proto::v1 as pb;
use harness::topology::{slot, Authed, Topology};
use harness::warehouse::compare;
use harness::{in_doubt, mix, outcome, record, reserve};
use pb::enforcer_client::EnforcerClient;
use tonic::{Code, Response, Status};

const CATALOG: &str = r#"version: 1
currency: USD
metrics:
  calls: { unit: call }
  soft_calls: { unit: call }
  priced: { unit: call }
features:
  exports: { kind: boolean }
  analytics: { kind: boolean }
plans:
  basic:
    tier: 1
    versions:
      1:
        features:
          exports: true
        limits:
          calls:
            - { window: day, amount: 2000, on_backend_failure: fail_closed }
          soft_calls:
            - { window: month, amount: 600, enforcement: soft, overage: 300, warn_at: [80] }
          priced:
            - { window: month, amount: 200, enforcement: soft, unit_price: "0.01" }
  pro:
    tier: 2
    versions:
      1:
        features:
          exports: true
          analytics: true
        limits:
          calls:
            - { window: day, amount: 4000, on_backend_failure: fail_closed }
          soft_calls:
            - { window: month, amount: 600, enforcement: soft, overage: 300, warn_at: [80] }
          priced:
            - { window: month, amount: 1500, enforcement: soft, unit_price: "0.004" }
"#;

/// The hard day cap on `basic` and on `pro`.
const CAP_BASIC: u64 = 2000;
const CAP_PRO: u64 = 4000;
/// Extra units granted to one tenant on `calls`.
const GRANT: u64 = 1000;
/// `soft_calls`: the soft limit and its overage allowance (denied past their sum).
const SOFT_LIMIT: u64 = 600;
const SOFT_OVERAGE: u64 = 300;
/// `priced`: (included, price in millionths) on `basic` and on `pro`.
const PRICED_BASIC: (u64, u64) = (200, 10_000);
const PRICED_PRO: (u64, u64) = (1500, 4_000);
/// Largest amounts a client asks for.
const MAX_RESERVE: u64 = 20;
const MAX_SOFT_RECORD: u64 = 3;
/// Tenants; index 0 is upgraded mid-run, index 1 granted extra units.
const TENANTS: usize = 6;
const UPGRADED: usize = 0;
const GRANTED: usize = 1;
/// Concurrent clients, spread over the three enforcers.
const WORKERS: usize = 36;
/// The load runs at least this long, and on until every tenant has met its caps.
const MIN_LOAD: Duration = Duration::from_secs(30);
/// ...but no longer than this (then the test fails: the caps were never reached).
const MAX_LOAD: Duration = Duration::from_secs(300);
/// Longest wait for a definite answer to one operation.
const DOUBT_DEADLINE: Duration = Duration::from_secs(90);
/// The gossip interval (`--sync-interval`, default).
const SYNC_INTERVAL: Duration = Duration::from_millis(100);

/// What the client was told, definitely.
#[derive(Default)]
struct Ledger {
    /// Committed units of `calls` per tenant.
    hard: BTreeMap<String, u64>,
    /// Recorded units of `soft_calls` per tenant, with the first and last admission.
    soft: BTreeMap<String, (u64, Instant, Instant)>,
    /// Recorded units of `priced` per tenant: (before the upgrade, after it).
    priced: BTreeMap<String, (u64, u64)>,
    /// Event ids of acknowledged commits and records.
    usage: HashSet<String>,
    /// Denials per (metric, reason).
    denials: BTreeMap<(String, String), u64>,
    /// (tenant, metric) that met the metric's cap (a `limit_exceeded` denial).
    capped: HashSet<(String, &'static str)>,
    /// Check answers per (feature, outcome).
    checks: BTreeMap<(String, String), u64>,
    /// Check answers that contradict the tenant's plan (should be none).
    wrong_checks: Vec<String>,
}

/// One enforcer as the clients see it.
#[derive(Default)]
struct NodeState {
    /// Killed and not yet started again: clients go elsewhere.
    down: AtomicBool,
    /// Times it was killed (an error during a kill is in doubt, whatever its code).
    kills: AtomicU64,
}

#[derive(Default)]
struct Counters {
    ops: AtomicU64,
    /// "May have been applied" answers (Redis unreachable or failing over).
    in_doubt: AtomicU64,
    /// Calls cut off by the enforcer's death.
    cut_off: AtomicU64,
    /// Other UNAVAILABLE answers (nothing applied; retried).
    unavailable: AtomicU64,
    /// Operations sent to another enforcer than the client's own because it was down, and
    /// calls answered by another enforcer than the one first asked (it died meanwhile).
    rerouted: AtomicU64,
    /// Answers to the killed master's tenants, after the kill, that were no plain answer:
    /// in doubt, unavailable or `backend_unavailable`.
    outage_answers: AtomicU64,
}

struct Shared {
    clients: Vec<EnforcerClient<Authed>>,
    nodes: [NodeState; 3],
    tenants: Vec<String>,
    /// Tenants on the Redis master that is killed.
    on_victim: Vec<bool>,
    victim_killed: AtomicBool,
    paused: Vec<AtomicBool>,
    inflight: Vec<AtomicU64>,
    /// The upgraded tenant's new plan is in force on every enforcer.
    upgraded: AtomicBool,
    stop: AtomicBool,
    ledger: Mutex<Ledger>,
    n: Counters,
}

impl Shared {
    /// The first live enforcer from `from` on (0-based).
    fn live_from(&self, from: usize) -> usize {
        (0..3)
            .map(|i| (from + i) % 3)
            .find(|&i| !self.nodes[i].down.load(Ordering::SeqCst))
            .expect("at most one enforcer is down")
    }

    /// Sends a call to enforcer `node` until the answer is definite; returns it and the
    /// enforcer that gave it. `sticky`: retries go to the same enforcer, waiting while it
    /// is down (soft-only records: only that node knows their event ids); otherwise they
    /// go to another one while it is down.
    async fn call<T, F, Fut>(
        &self,
        what: &str,
        tenant: usize,
        mut node: usize,
        sticky: bool,
        f: F,
    ) -> (T, usize)
    where
        F: Fn(EnforcerClient<Authed>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let first = node;
        let deadline = Instant::now() + DOUBT_DEADLINE;
        loop {
            if self.nodes[node].down.load(Ordering::SeqCst) {
                if sticky {
                    assert!(
                        Instant::now() < deadline,
                        "{what}: enforcer-{} never came back",
                        node + 1
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                node = self.live_from(node + 1);
            }
            let kills = self.nodes[node].kills.load(Ordering::SeqCst);
            let victim = self.victim_killed.load(Ordering::SeqCst) && self.on_victim[tenant];
            let s = match f(self.clients[node].clone()).await {
                Ok(r) => {
                    if node != first {
                        self.n.rerouted.fetch_add(1, Ordering::Relaxed);
                    }
                    return (r.into_inner(), node);
                }
                Err(s) => s,
            };
            let killed = self.nodes[node].kills.load(Ordering::SeqCst) != kills
                || self.nodes[node].down.load(Ordering::SeqCst);
            if in_doubt(&s) {
                self.n.in_doubt.fetch_add(1, Ordering::Relaxed);
            } else if killed {
                self.n.cut_off.fetch_add(1, Ordering::Relaxed);
            } else if s.code() == Code::Unavailable {
                self.n.unavailable.fetch_add(1, Ordering::Relaxed);
            } else {
                panic!("{what} on enforcer-{}: {s:?}", node + 1);
            }
            if victim && !killed {
                self.n.outage_answers.fetch_add(1, Ordering::Relaxed);
            }
            assert!(
                Instant::now() < deadline,
                "{what}: no definite answer within {DOUBT_DEADLINE:?}; last {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Counts a denial.
    fn deny(&self, l: &mut Ledger, tenant: usize, metric: &'static str, reason: &str) {
        *l.denials
            .entry((metric.to_string(), reason.to_string()))
            .or_default() += 1;
        if reason == "limit_exceeded" {
            l.capped.insert((self.tenants[tenant].clone(), metric));
        }
        if reason == "backend_unavailable" && self.on_victim[tenant] {
            self.n.outage_answers.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One client operation on tenant `k` through enforcer `node`, chosen by `r`; `w` and
/// `i` make its ids unique.
async fn operate(sh: &Shared, w: usize, i: u64, k: usize, node: usize, r: u64) {
    let tenant = sh.tenants[k].clone();
    let t = tenant.as_str();
    match r % 100 {
        0..=24 => {
            let feature = if r & 0x100 == 0 {
                "exports"
            } else {
                "analytics"
            };
            let req = pb::CheckRequest {
                tenant: tenant.clone(),
                feature: feature.into(),
                ..Default::default()
            };
            // Read before asking: once set, the new plan is in force everywhere.
            let upgraded = k == UPGRADED && sh.upgraded.load(Ordering::SeqCst);
            let (c, _) = sh
                .call("check", k, node, false, |mut e| {
                    let req = req.clone();
                    async move { e.check(req).await }
                })
                .await;
            let got = outcome(&c.decision);
            let want = if feature == "exports" || upgraded {
                pb::Outcome::Allow
            } else {
                pb::Outcome::Deny
            };
            let mut l = sh.ledger.lock().unwrap();
            *l.checks
                .entry((feature.to_string(), format!("{got:?}")))
                .or_default() += 1;
            // Before the upgrade is known everywhere, the upgraded tenant may get either.
            let unsure = k == UPGRADED && !upgraded;
            if got != want && !unsure {
                l.wrong_checks
                    .push(format!("{t} {feature}: {:?}", c.decision));
            }
        }
        25..=59 => {
            let amount = 5 + (r >> 8) % (MAX_RESERVE - 4);
            let actual = amount - (r >> 16) % (amount / 2 + 1);
            let mut req = reserve(t, "calls", amount as i64, &format!("{t}-w{w}-{i}"));
            req.ttl = Some(prost_types::Duration {
                seconds: 300,
                nanos: 0,
            });
            let (g, node) = sh
                .call("reserve", k, node, false, |mut e| {
                    let req = req.clone();
                    async move { e.reserve(req).await }
                })
                .await;
            if g.reservation_id.is_empty() {
                let reason = g.decision.expect("a decision").reason;
                assert!(
                    ["limit_exceeded", "backend_unavailable"].contains(&reason.as_str()),
                    "reserve {t}: {reason}"
                );
                return sh.deny(&mut sh.ledger.lock().unwrap(), k, "calls", &reason);
            }
            let id = g.reservation_id;
            assert!(
                !id.starts_with("sf-") && !id.starts_with("dg-"),
                "a hard, fail-closed reservation is in Redis: {id}"
            );
            let req = pb::CommitRequest {
                tenant: tenant.clone(),
                reservation_id: id.clone(),
                actual_amount: actual as i64,
            };
            let (c, _) = sh
                .call("commit", k, node, false, |mut e| {
                    let req = req.clone();
                    async move { e.commit(req).await }
                })
                .await;
            assert_eq!(c.committed, actual, "commit {id}: {c:?}");
            let mut l = sh.ledger.lock().unwrap();
            *l.hard.entry(tenant.clone()).or_default() += actual;
            l.usage.insert(format!("{id}/commit"));
        }
        _ => {
            let soft = r % 100 < 80;
            let (metric, amount) = if soft {
                ("soft_calls", 1 + (r >> 8) % MAX_SOFT_RECORD)
            } else {
                ("priced", 1 + (r >> 8) % 5)
            };
            // Read before sending: set once the upgrade is in force everywhere, and the
            // tenant's traffic is paused around it.
            let after = k == UPGRADED && sh.upgraded.load(Ordering::SeqCst);
            let id = format!("{t}-{metric}-w{w}-{i}");
            let req = record(t, metric, amount as i64, &id);
            let (rec, _) = sh
                .call("record", k, node, true, |mut e| {
                    let req = req.clone();
                    async move { e.record(req).await }
                })
                .await;
            let mut l = sh.ledger.lock().unwrap();
            if !rec.recorded {
                let reason = rec.decision.expect("a decision").reason;
                assert!(soft, "{metric} has no cap, yet {id} was denied: {reason}");
                assert_eq!(reason, "limit_exceeded", "{id}");
                return sh.deny(&mut l, k, metric, &reason);
            }
            l.usage.insert(id);
            if soft {
                let now = Instant::now();
                let e = l.soft.entry(tenant.clone()).or_insert((0, now, now));
                e.0 += amount;
                e.2 = now;
            } else {
                let e = l.priced.entry(tenant.clone()).or_default();
                if after {
                    e.1 += amount;
                } else {
                    e.0 += amount;
                }
            }
        }
    }
}

/// A client: operations on random tenants through its own enforcer (another while that
/// one is down) until told to stop.
async fn client(sh: Arc<Shared>, w: usize) {
    let mut i = 0u64;
    while !sh.stop.load(Ordering::SeqCst) {
        i += 1;
        let r = mix(((w as u64) << 40) ^ i);
        let k = (r >> 48) as usize % TENANTS;
        // Counted in flight before looking at the pause, so that a pause that starts now
        // waits for this operation.
        sh.inflight[k].fetch_add(1, Ordering::SeqCst);
        if sh.paused[k].load(Ordering::SeqCst) {
            sh.inflight[k].fetch_sub(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let node = sh.live_from(w % 3);
        if node != w % 3 {
            // Its own enforcer is down: this one goes around it.
            sh.n.rerouted.fetch_add(1, Ordering::Relaxed);
        }
        operate(&sh, w, i, k, node, r).await;
        sh.inflight[k].fetch_sub(1, Ordering::SeqCst);
        sh.n.ops.fetch_add(1, Ordering::Relaxed);
    }
}

/// One window of a metric on one enforcer: (limit, used).
async fn window(
    e: &mut EnforcerClient<Authed>,
    tenant: &str,
    metric: &str,
    w: &str,
) -> Option<(u64, u64)> {
    let u = e
        .get_usage(pb::GetUsageRequest {
            tenant: tenant.into(),
            metric: metric.into(),
        })
        .await
        .ok()?
        .into_inner();
    let w = u.windows.iter().find(|x| x.window == w)?;
    Some((w.limit, w.used))
}

/// Whole seconds of the wall clock.
fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Upgrades tenant `UPGRADED` to `pro` with its traffic paused: no operation of it is in
/// flight across the change, and it resumes once every enforcer decides by the new plan,
/// in a later second than its last event under the old one (billing orders events by
/// second), so the client knows which allowance and price each of its events had.
async fn upgrade(sh: &Shared, topo: &Topology) -> Duration {
    let t = sh.tenants[UPGRADED].clone();
    // Past the old allowance first, so that both prices are billed.
    let deadline = Instant::now() + MAX_LOAD;
    while sh.ledger.lock().unwrap().priced.get(&t).map_or(0, |p| p.0) <= PRICED_BASIC.0 {
        assert!(
            Instant::now() < deadline,
            "{t} never passed its priced allowance"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    sh.paused[UPGRADED].store(true, Ordering::SeqCst);
    let deadline = Instant::now() + DOUBT_DEADLINE;
    while sh.inflight[UPGRADED].load(Ordering::SeqCst) != 0 {
        assert!(Instant::now() < deadline, "{t}'s operations never settled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let last_old_second = unix_secs();
    let before = sh.ledger.lock().unwrap().hard.get(&t).copied().unwrap_or(0);
    assert!(
        before <= CAP_BASIC,
        "{t}: {before} > {CAP_BASIC} before the upgrade"
    );
    topo.admin(1)
        .change_subscription(pb::ChangeSubscriptionRequest {
            tenant: t.clone(),
            plan: "pro".into(),
            timing: pb::ChangeTiming::Immediately as i32,
            actor: "e2e".into(),
            reason: "upgrade mid-run".into(),
            ..Default::default()
        })
        .await
        .expect("upgrade");
    for n in 1..=3 {
        let mut e = topo.enforcer(n);
        let mut seen = None;
        for _ in 0..200 {
            seen = window(&mut e, &t, "priced", "month").await;
            if seen.map(|s| s.0) == Some(PRICED_PRO.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            seen.map(|s| s.0),
            Some(PRICED_PRO.0),
            "enforcer-{n} never applied {t}'s upgrade"
        );
    }
    while unix_secs() <= last_old_second {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sh.upgraded.store(true, Ordering::SeqCst);
    sh.paused[UPGRADED].store(false, Ordering::SeqCst);
    started.elapsed()
}

/// The worst age of a merge of a live peer into any live enforcer's counters, sampled
/// every 100 ms until told to stop (enforcer-2 left out while it is down).
async fn sample_lag(
    sh: Arc<Shared>,
    admins: Vec<pb::admin_client::AdminClient<Authed>>,
) -> Duration {
    let mut worst = Duration::ZERO;
    while !sh.stop.load(Ordering::SeqCst) {
        let e2_down = sh.nodes[1].down.load(Ordering::SeqCst);
        for (n, a) in admins.iter().enumerate() {
            if sh.nodes[n].down.load(Ordering::SeqCst) {
                continue;
            }
            let Ok(p) = a.clone().get_peers(pb::GetPeersRequest {}).await else {
                continue;
            };
            for peer in p.into_inner().peers {
                if !peer.live || (e2_down && peer.node == "enforcer-2") {
                    continue;
                }
                if let Some(age) = peer.last_merge_age {
                    worst = worst.max(Duration::new(age.seconds as u64, age.nanos as u32));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worst
}

/// Tenant names, and whether each is on Redis master `victim`'s slots: two are, four
/// are not; the upgraded tenant is not, the granted one is.
fn tenants_for(masters: &[(u16, Vec<(u16, u16)>)], victim: u16) -> (Vec<String>, Vec<bool>) {
    let on = |name: &str| {
        let s = slot(&meter::event::hash_tag(name));
        masters
            .iter()
            .find(|(_, r)| r.iter().any(|&(a, b)| (a..=b).contains(&s)))
            .map(|m| m.0)
            == Some(victim)
    };
    let (mut hit, mut miss) = (Vec::new(), Vec::new());
    let mut i = 0;
    while hit.len() < 2 || miss.len() < TENANTS - 2 {
        let name = format!("e2e-{i}");
        i += 1;
        if on(&name) {
            if hit.len() < 2 {
                hit.push(name);
            }
        } else if miss.len() < TENANTS - 2 {
            miss.push(name);
        }
    }
    let names = vec![
        miss[0].clone(),
        hit[0].clone(),
        miss[1].clone(),
        hit[1].clone(),
        miss[2].clone(),
        miss[3].clone(),
    ];
    (names, vec![false, true, false, true, false, false])
}

/// A billing line: (tenant, metric, used, overage, amount in millionths, unpriced).
type Line = (String, String, i64, i64, i64, i64);

/// The billing lines the client's ledger implies.
fn expected_bill(l: &Ledger, tenants: &[String]) -> Vec<Line> {
    let mut want = Vec::new();
    for (k, t) in tenants.iter().enumerate() {
        if let Some(&u) = l.hard.get(t) {
            // A day cap is no billing allowance: nothing is overage.
            want.push((t.clone(), "calls".into(), u as i64, 0, 0, 0));
        }
        if let Some(&(u, _, _)) = l.soft.get(t) {
            // Included but not priced: the overage is unpriced.
            let over = u.saturating_sub(SOFT_LIMIT) as i64;
            want.push((t.clone(), "soft_calls".into(), u as i64, over, 0, over));
        }
        if let Some(&(before, after)) = l.priced.get(t) {
            // Each event is over for what takes the running total past its own allowance,
            // at its own price: with one allowance per phase, a phase's overage is
            // max(0, total after it − allowance) − max(0, total before it − allowance).
            let (a0, p0) = PRICED_BASIC;
            let over0 = before.saturating_sub(a0);
            let (a1, p1) = if k == UPGRADED {
                PRICED_PRO
            } else {
                PRICED_BASIC
            };
            let over1 = (before + after).saturating_sub(a1) - before.saturating_sub(a1);
            want.push((
                t.clone(),
                "priced".into(),
                (before + after) as i64,
                (over0 + over1) as i64,
                (over0 * p0 + over1 * p1) as i64,
                0,
            ));
        }
    }
    want.sort();
    want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_topology_keeps_caps_and_events_exact_through_kills() {
    let t_up = Instant::now();
    let topo = Topology::builder()
        .catalog(CATALOG)
        // A hard-cap write waits until a replica has it, so that the promoted replica of
        // the killed master has every acknowledged change (docs/redis.md).
        .serve_args("--redis-wait-replicas 1")
        .up()
        .await;
    let up_took = t_up.elapsed();

    // The master to kill: not node 1, the seed every process starts from.
    let masters = topo.masters(1);
    assert_eq!(masters.len(), 3, "three masters: {masters:?}");
    let victim = masters
        .iter()
        .map(|m| m.0)
        .find(|&n| n != 1)
        .expect("a master other than node 1");
    let (tenants, on_victim) = tenants_for(&masters, victim);
    let mut admin = topo.admin(1);
    for t in &tenants {
        admin
            .put_subscription(pb::PutSubscriptionRequest {
                tenant: t.clone(),
                plan: "basic".into(),
                actor: "e2e".into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("subscribe {t}: {e}"));
    }
    println!("tenants {tenants:?}; on Redis node {victim} (to be killed): {on_victim:?}");

    let sh = Arc::new(Shared {
        clients: (1..=3).map(|n| topo.enforcer(n)).collect(),
        nodes: Default::default(),
        tenants: tenants.clone(),
        on_victim,
        victim_killed: AtomicBool::new(false),
        paused: (0..TENANTS).map(|_| AtomicBool::new(false)).collect(),
        inflight: (0..TENANTS).map(|_| AtomicU64::new(0)).collect(),
        upgraded: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        ledger: Mutex::default(),
        n: Counters::default(),
    });
    let load_started = Instant::now();
    let load_day = chrono::Utc::now().date_naive();
    let clients: Vec<_> = (0..WORKERS)
        .map(|w| tokio::spawn(client(sh.clone(), w)))
        .collect();
    let sampler = tokio::spawn(sample_lag(
        sh.clone(),
        (1..=3).map(|n| topo.admin(n)).collect(),
    ));

    // The mid-run changes and faults, one after the other.
    let at = |s: u64| tokio::time::Instant::from_std(load_started + Duration::from_secs(s));
    tokio::time::sleep_until(at(4)).await;
    let upgrade_pause = upgrade(&sh, &topo).await;
    tokio::time::sleep_until(at(7)).await;
    let granted = &tenants[GRANTED];
    let before_grant = sh
        .ledger
        .lock()
        .unwrap()
        .hard
        .get(granted)
        .copied()
        .unwrap_or(0);
    assert!(
        before_grant <= CAP_BASIC,
        "{granted}: {before_grant} before the grant"
    );
    admin
        .grant_override(pb::GrantOverrideRequest {
            tenant: granted.clone(),
            kind: "extra_units".into(),
            metric: "calls".into(),
            amount: GRANT as i64,
            actor: "e2e".into(),
            reason: "goodwill mid-run".into(),
            ..Default::default()
        })
        .await
        .expect("grant");
    tokio::time::sleep_until(at(10)).await;
    let e2_killed = Instant::now();
    sh.nodes[1].down.store(true, Ordering::SeqCst);
    sh.nodes[1].kills.fetch_add(1, Ordering::SeqCst);
    topo.kill9("enforcer-2").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t = Instant::now();
    topo.up_again().await;
    let e2_restart = t.elapsed();
    sh.nodes[1].down.store(false, Ordering::SeqCst);
    let e2_away = e2_killed.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    topo.kill9("aggregator-1").await;
    let agg_killed = load_started.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let victim_dir = format!("redis/{}", topo.redis_port(victim));
    sh.victim_killed.store(true, Ordering::SeqCst);
    let redis_killed = Instant::now();
    let redis_killed_at = load_started.elapsed();
    topo.kill9(&victim_dir).await;
    // The replica is promoted once the others mark the master failed (node timeout 5 s).
    let victim_slots = masters.iter().find(|m| m.0 == victim).unwrap().1.clone();
    let mut promoted = None;
    for _ in 0..600 {
        let now = topo.masters(1);
        if let Some(m) = now.iter().find(|m| m.0 != victim && m.1 == victim_slots) {
            promoted = Some(m.0);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failover = redis_killed.elapsed();
    let promoted = promoted.expect("a replica took over the killed master's slots");
    let faults_done = load_started.elapsed();

    // On until the minimum duration has passed, every tenant has met its hard cap and its
    // soft limit (so that neither bound below holds for want of trying), and the upgraded
    // tenant is past its new priced allowance (overage at both prices).
    loop {
        let met = {
            let l = sh.ledger.lock().unwrap();
            tenants.iter().all(|t| {
                l.capped.contains(&(t.clone(), "calls"))
                    && l.capped.contains(&(t.clone(), "soft_calls"))
            }) && l
                .priced
                .get(&tenants[UPGRADED])
                .is_some_and(|p| p.0 + p.1 > PRICED_PRO.0)
        };
        let elapsed = load_started.elapsed();
        if met && elapsed >= MIN_LOAD.max(faults_done + Duration::from_secs(5)) {
            break;
        }
        assert!(
            elapsed < MAX_LOAD,
            "the load did not bring every tenant to its caps within {MAX_LOAD:?}: {:?}",
            sh.ledger.lock().unwrap().capped
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sh.stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.expect("a client failed");
    }
    let load_took = load_started.elapsed();
    let worst_lag = sampler.await.unwrap();
    let n = &sh.n;
    // Every client has stopped: the ledger is final.
    let l = std::mem::take(&mut *sh.ledger.lock().unwrap());
    println!(
        "load: {} ops by {WORKERS} clients in {load_took:.1?}; answers in doubt {}, cut off by \
         the kill {}, unavailable {}, answered elsewhere {}; outage answers on the killed shard {}",
        n.ops.load(Ordering::Relaxed),
        n.in_doubt.load(Ordering::Relaxed),
        n.cut_off.load(Ordering::Relaxed),
        n.unavailable.load(Ordering::Relaxed),
        n.rerouted.load(Ordering::Relaxed),
        n.outage_answers.load(Ordering::Relaxed),
    );
    println!("denials {:?}", l.denials);
    println!("checks {:?}", l.checks);
    println!(
        "faults: upgrade pause {upgrade_pause:.1?}; enforcer-2 away {e2_away:.1?} (deploy/up \
         {e2_restart:.1?}); aggregator-1 killed at {agg_killed:.1?}; Redis node {victim} \
         killed at {redis_killed_at:.1?}, node {promoted} master after {failover:.1?}"
    );

    // Feature checks followed the plans.
    assert!(
        l.wrong_checks.is_empty(),
        "wrong checks: {:?}",
        l.wrong_checks
    );
    // The faults were felt: the killed shard's tenants got fail-closed denials or answers
    // not definite, and calls went around the dead enforcer.
    assert!(
        n.outage_answers.load(Ordering::Relaxed) > 0,
        "the Redis kill went unnoticed"
    );
    assert!(
        n.rerouted.load(Ordering::Relaxed) > 0,
        "no call went around enforcer-2"
    );

    // Hard caps: never exceeded by what the client was acknowledged...
    let cap = |k: usize| match k {
        UPGRADED => CAP_PRO,
        GRANTED => CAP_BASIC + GRANT,
        _ => CAP_BASIC,
    };
    for (k, t) in tenants.iter().enumerate() {
        let used = l.hard.get(t).copied().unwrap_or(0);
        println!("{t}: calls {used} of {}", cap(k));
        assert!(
            used <= cap(k),
            "{t}: {used} units of calls > cap {}",
            cap(k)
        );
    }
    // ...and the upgrade and the grant did raise them.
    assert!(
        l.hard[&tenants[UPGRADED]] > CAP_BASIC,
        "the upgrade raised no cap"
    );
    assert!(l.hard[granted] > CAP_BASIC, "the grant added no units");

    // Soft: within the documented bound, what the other nodes admitted during the lag of
    // a node's view (worst last-merge age, plus the interval) plus a request per node.
    for t in &tenants {
        let (used, first, last) = l.soft[t];
        let rate = used as f64 / (last - first).as_secs_f64().max(0.001);
        let over =
            (rate * (worst_lag + SYNC_INTERVAL).as_secs_f64()).ceil() as u64 + 3 * MAX_SOFT_RECORD;
        let cap = SOFT_LIMIT + SOFT_OVERAGE;
        println!(
            "{t}: soft_calls {used} of {cap} at {rate:.0}/s; worst view lag {worst_lag:?}; \
             bound {cap} + {over}"
        );
        assert!(
            used <= cap + over,
            "{t}: soft_calls {used} > {cap} + {over}"
        );
    }
    // Every enforcer counts exactly what was acknowledged: soft (gossiped) and hard (in
    // Redis; day windows only if the run stayed within one UTC day).
    let same_day = chrono::Utc::now().date_naive() == load_day;
    for n in 1..=3 {
        let mut e = topo.enforcer(n);
        for t in &tenants {
            let want = l.soft[t].0;
            let mut seen = None;
            for _ in 0..100 {
                seen = window(&mut e, t, "soft_calls", "month").await.map(|w| w.1);
                if seen == Some(want) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(seen, Some(want), "enforcer-{n}: {t}'s soft_calls");
            if same_day {
                let hard = window(&mut e, t, "calls", "day").await.map(|w| w.1);
                assert_eq!(hard, Some(l.hard[t]), "enforcer-{n}: {t}'s calls today");
            }
        }
    }

    // ClickHouse: every acknowledged commit and record, once, and no other usage.
    // Aggregator-1's partitions move to aggregator-2 once their leases lapse.
    let ch = topo.clickhouse();
    let drain_started = Instant::now();
    let mut found: Vec<String> = Vec::new();
    let mut result = (usize::MAX, 0, 0, String::from("ClickHouse never answered"));
    for _ in 0..240 {
        if let Ok(rows) = ch
            .query("SELECT event_id FROM usage_events WHERE kind IN ('commit', 'record')")
            .fetch_all::<String>()
            .await
        {
            found = rows;
            result = compare(&l.usage, &found);
            if result.0 == 0 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let drained = drain_started.elapsed();
    println!(
        "clickhouse: {} acknowledged usage events, {} rows, all in {drained:.1?} after the load",
        l.usage.len(),
        found.len()
    );
    let (missing, unexpected, twice, examples) = result;
    assert_eq!(
        (missing, unexpected, twice),
        (0, 0, 0),
        "usage_events vs the client's ledger: {examples}\n{}",
        topo.log_tails()
    );
    // Per tenant × day, as ClickHouse has it: within the cap.
    let days: Vec<(String, String, i64)> = ch
        .query(
            "SELECT tenant, toString(toDate(event_time)), sum(amount) FROM usage_events \
             WHERE kind = 'commit' AND metric = 'calls' GROUP BY tenant, toDate(event_time)",
        )
        .fetch_all()
        .await
        .expect("daily usage");
    assert!(days.len() >= TENANTS, "{days:?}");
    for (t, day, used) in &days {
        let k = tenants.iter().position(|x| x == t).expect("a known tenant");
        assert!(*used as u64 <= cap(k), "{t} on {day}: {used} > {}", cap(k));
    }

    // Billing: the Billing service (an enforcer started with --clickhouse) equals the
    // client's ledger per tenant × metric, to the unit and the millionth.
    let periods: Vec<String> = ch
        .query("SELECT DISTINCT billing_period FROM usage_events WHERE metric = 'priced'")
        .fetch_all()
        .await
        .expect("billing periods");
    assert_eq!(periods.len(), 1, "one billing period: {periods:?}");
    let t = Instant::now();
    let bill = topo
        .billing(3)
        .overage(pb::OverageRequest {
            period: periods[0].clone(),
            tenant: String::new(),
        })
        .await
        .expect("billing overage")
        .into_inner();
    assert_eq!(bill.currency, "USD");
    let mut got: Vec<Line> = bill
        .lines
        .iter()
        .map(|x| {
            (
                x.tenant.clone(),
                x.metric.clone(),
                x.used,
                x.overage,
                x.amount_micros,
                x.unpriced,
            )
        })
        .collect();
    got.sort();
    let want = expected_bill(&l, &tenants);
    println!("billing: {} lines in {:.1?}", got.len(), t.elapsed());
    for line in &want {
        println!("  {line:?}");
    }
    assert_eq!(got, want, "billing vs the client's ledger");
    // The upgraded tenant's priced overage was billed at both prices: 0.01 before the
    // upgrade, 0.004 after it.
    let (before, after) = l.priced[&tenants[UPGRADED]];
    let over_before = before.saturating_sub(PRICED_BASIC.0);
    let over_after =
        (before + after).saturating_sub(PRICED_PRO.0) - before.saturating_sub(PRICED_PRO.0);
    println!("{}: priced {before} before the upgrade ({over_before} over), {after} after ({over_after} over)", tenants[UPGRADED]);
    assert!(
        before > PRICED_BASIC.0 && before + after > PRICED_PRO.0,
        "priced usage before {before} and after {after} the upgrade"
    );
    println!("total {:.1?} (up {up_took:.1?})", t_up.elapsed());
}
