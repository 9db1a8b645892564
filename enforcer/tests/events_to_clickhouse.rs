//! End to end: gRPC Reserve/Commit/Record on a real node over Redis → the partition
//! streams (hard-cap events from the scripts, soft-only ones shipped by the node) →
//! `allot aggregate` → ClickHouse 18.16. The monthly rollup equals what the client
//! counted, to the unit, and every denial is there once; billing overage (through the
//! node's Billing service and `allot billing overage`) equals the client's ledger across
//! a mid-period plan change.

mod harness;

use std::collections::BTreeMap;
use std::process::Stdio;

use allot_proto::v1 as pb;
use harness::redis::RedisServer;
use harness::warehouse::{usage_rows, wait_rollup, ClickHouseServer, Totals};
use harness::{record, reserve, subscribe, Node};

const CATALOG: &str = "version: 1
currency: USD
metrics:
  calls: { unit: call }
  soft_calls: { unit: call }
plans:
  p:
    tier: 1
    versions:
      1:
        limits:
          calls:
            - { window: day, amount: 2000 }
          soft_calls:
            - { window: month, amount: 50, enforcement: soft, unit_price: \"0.5\" }
  bigger:
    tier: 2
    versions:
      1:
        limits:
          calls:
            - { window: day, amount: 2000 }
          soft_calls:
            - { window: month, amount: 100, enforcement: soft, unit_price: \"0.25\" }
";

/// A tenant's soft usage as the client saw it: each acknowledged amount with the
/// allowance and price of the plan it was on.
#[derive(Default)]
struct SoftLedger {
    events: Vec<(u64, u64, u64)>,
}

impl SoftLedger {
    /// (used, overage, amount in millionths): each event is over for what takes the
    /// running total past its own allowance.
    fn bill(&self) -> (u64, u64, u64) {
        let (mut used, mut over, mut micros) = (0, 0, 0);
        for (amount, included, price) in &self.events {
            let past = (used + amount).saturating_sub(*included).min(*amount);
            over += past;
            micros += past * price;
            used += amount;
        }
        (used, over, micros)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_through_a_node_reaches_the_monthly_rollup_exactly() {
    let redis = RedisServer::start().await;
    let ch = ClickHouseServer::start().await;
    let node = Node::builder()
        .catalog(CATALOG)
        .arg("--redis")
        .arg(&redis.url)
        .arg("--clickhouse")
        .arg(&ch.url)
        .start()
        .await;
    let mut admin = node.admin().await;
    for t in ["acme", "globex"] {
        subscribe(&mut admin, t, "p").await;
    }
    let mut e = node.enforcer().await;
    let mut ledger: Totals = BTreeMap::new();
    let mut denials = 0u64;
    let mut soft: BTreeMap<&str, SoftLedger> = BTreeMap::new();
    for i in 0..60i64 {
        if i == 30 {
            // Mid-period upgrade: acme's allowance is 100 at 0.25 from now on.
            admin
                .change_subscription(pb::ChangeSubscriptionRequest {
                    tenant: "acme".into(),
                    plan: "bigger".into(),
                    timing: pb::ChangeTiming::Immediately as i32,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        for t in ["acme", "globex"] {
            let r = e
                .reserve(reserve(t, "calls", 10 + i % 7, &format!("{t}-r{i}")))
                .await
                .unwrap()
                .into_inner();
            let actual = i % 9;
            let c = e
                .commit(pb::CommitRequest {
                    tenant: t.into(),
                    reservation_id: r.reservation_id,
                    actual_amount: actual,
                })
                .await
                .unwrap()
                .into_inner();
            *ledger.entry((t.into(), "calls".into())).or_default() += c.committed as i64;
            let r = e
                .record(record(t, "calls", 1 + i % 4, &format!("{t}-e{i}")))
                .await
                .unwrap()
                .into_inner();
            assert!(r.recorded);
            *ledger.entry((t.into(), "calls".into())).or_default() += 1 + i % 4;
            // Soft-only: counted on the node, shipped to the streams.
            let r = e
                .record(record(t, "soft_calls", 2, &format!("{t}-s{i}")))
                .await
                .unwrap()
                .into_inner();
            assert!(r.recorded);
            *ledger.entry((t.into(), "soft_calls".into())).or_default() += 2;
            let (included, price) = if t == "acme" && i >= 30 {
                (100, 250_000)
            } else {
                (50, 500_000)
            };
            soft.entry(t).or_default().events.push((2, included, price));
        }
    }
    // Refused by the day cap: a denial, not usage.
    let r = e
        .record(record("acme", "calls", 5000, "too-much"))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.recorded);
    denials += 1;

    let metrics_port = harness::free_port();
    let metrics_url = format!("http://127.0.0.1:{metrics_port}");
    let mut aggregator = tokio::process::Command::new(env!("CARGO_BIN_EXE_allot"))
        .args(["aggregate", "--clickhouse", &ch.url, "--redis", &redis.url])
        .args(["--database", "allot", "--batch-interval", "200ms"])
        .args(["--http-listen", &format!("127.0.0.1:{metrics_port}")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    wait_rollup(&ch, &ledger).await;
    let client = ch.client("allot");

    // The aggregator's metrics count what it wrote (the denial may land a batch after
    // the rollup is complete: compare once both agree, or when the attempts run out),
    // and it says it is ready.
    let series = |scrape: &str, name: &str| -> f64 {
        scrape
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    let mut seen = (0.0, 0u64, String::new());
    for _ in 0..100 {
        let stored: u64 = client
            .query("SELECT count() FROM usage_events")
            .fetch_one()
            .await
            .unwrap();
        let (status, scrape) =
            harness::http("GET", &format!("{metrics_url}/metrics"), &[], b"").await;
        assert_eq!(status, 200);
        seen = (
            series(&scrape, "allot_aggregator_rows_inserted_total"),
            stored,
            scrape,
        );
        let backlog = series(&seen.2, "allot_aggregator_backlog_events");
        if seen.0 == seen.1 as f64 && backlog == 0.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (inserted, stored, scrape) = seen;
    assert_eq!(inserted, stored as f64, "{scrape}");
    assert_eq!(series(&scrape, "allot_aggregator_backlog_events"), 0.0);
    assert!(series(&scrape, "allot_aggregator_partitions_held") >= 1.0);
    assert!(series(&scrape, "allot_aggregator_insert_duration_seconds_count") >= 1.0);
    assert_eq!(series(&scrape, "allot_aggregator_dead_letters_total"), 0.0);
    let (status, body) = harness::http("GET", &format!("{metrics_url}/readyz"), &[], b"").await;
    assert_eq!(status, 200, "{body}");

    let (events, unique) = usage_rows(&ch).await;
    assert_eq!(events, unique, "no event twice");
    assert_eq!(events, 60 * 2 * 3, "every commit and record");
    let refused: u64 = client
        .query("SELECT count() FROM denials WHERE reason = 'limit_exceeded'")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(refused, denials);
    let over: u64 = client
        .query("SELECT count() FROM usage_events WHERE metric = 'soft_calls' AND overage = 1")
        .fetch_one()
        .await
        .unwrap();
    // 2 per record. globex: 50 included, records 26 to 60 are overage (35). acme: the
    // same to record 30 (5), then 100 included: records 51 to 60 (10).
    assert_eq!(over, 35 + 5 + 10);

    // Billing, through the node: every line equals the client's ledger.
    let periods: Vec<String> = client
        .query("SELECT DISTINCT billing_period FROM usage_events WHERE metric = 'soft_calls'")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(periods.len(), 1, "one billing period: {periods:?}");
    let period = &periods[0];
    let mut billing = pb::billing_client::BillingClient::connect(node.endpoint.clone())
        .await
        .unwrap();
    let r = billing
        .overage(pb::OverageRequest {
            period: period.clone(),
            tenant: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.currency, "USD");
    let got: Vec<(String, String, i64, i64, i64)> = r
        .lines
        .iter()
        .map(|l| {
            (
                l.tenant.clone(),
                l.metric.clone(),
                l.used,
                l.overage,
                l.amount_micros,
            )
        })
        .collect();
    let mut want = Vec::new();
    for ((t, m), used) in &ledger {
        let (over, micros) = match m.as_str() {
            "soft_calls" => {
                let (u, o, a) = soft[t.as_str()].bill();
                assert_eq!(u as i64, *used);
                (o as i64, a as i64)
            }
            // A day limit is no billing allowance: nothing is overage.
            _ => (0, 0),
        };
        want.push((t.clone(), m.clone(), *used, over, micros));
    }
    assert_eq!(got, want);
    // acme: 10 over at 0.50, then 20 at 0.25; globex: 70 at 0.50.
    assert_eq!((want[1].3, want[1].4, want[3].3), (30, 10_000_000, 70));
    let acme = r
        .lines
        .iter()
        .find(|l| l.tenant == "acme" && l.metric == "soft_calls");
    assert_eq!(
        acme.map(|l| (l.plan.as_str(), l.included, l.amount.as_str())),
        Some(("bigger", Some(100), "10.00"))
    );

    // As a user: the CLI's CSV for one tenant.
    let (code, out, err) = node
        .cli(&[
            "billing", "overage", "--period", period, "--tenant", "globex", "--format", "csv",
        ])
        .await;
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = out.lines().collect();
    assert_eq!(rows.len(), 3, "{out}");
    assert!(
        rows[0].starts_with("kind,period,tenant,metric,plan,included"),
        "{out}"
    );
    assert_eq!(
        rows[2],
        format!("period,{period},globex,soft_calls,p@1,50,120,70,35.00,35000000,0,USD")
    );
    // The period is still running: it cannot be exported yet, and says from when.
    let e = billing
        .export(pb::ExportRequest {
            period: period.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("has not ended yet"), "{}", e.message());
    aggregator.start_kill().unwrap();
    let _ = aggregator.wait().await;
}
