//! Billing from the raw events: the same period selection on ClickHouse 18.16 and on
//! current ClickHouse (chdb), lines that follow each event's allowance and price, and
//! exports that freeze a period and carry later changes as adjustments.

mod harness;

use aggregator::billing::{
    earlier_exports_query, events_query, stored_export_query, Billing, BillingError, LineKind,
    Period, PriceList,
};
use aggregator::schema::migrate;
use aggregator::sink::ClickHouse;
use chrono::{TimeZone, Utc};
use harness::chdb::Chdb;
use harness::{ClickHouseServer, DB};
use meter::billing::Price;
use serde_json::Value;

/// January 2024 (and around it):
/// - a is billed from the 15th: its period 2024-01 runs into February;
/// - b upgrades from free (500 included, no price) to pro (2,000) mid-month;
/// - c's storage has no allowance: its period is the calendar month;
/// - a denial, a release and a gauge are not billed.
const SAMPLE: &str = "INSERT INTO usage_events
    (event_id, event_time, kind, tenant, metric, amount, plan, plan_version, reason, src, src_offset, included, billing_period)
VALUES
    ('a0', '2024-01-14 10:00:00', 'record', 'a', 'api_calls', 999, 'pro', 1, 'ok', 'p01', 1, 1000, '2023-12'),
    ('a1', '2024-01-20 10:00:00', 'record', 'a', 'api_calls', 400, 'pro', 1, 'ok', 'p01', 2, 1000, '2024-01'),
    ('a2', '2024-02-10 10:00:00', 'commit', 'a', 'api_calls', 700, 'pro', 1, 'overage', 'p01', 3, 1000, '2024-01'),
    ('a3', '2024-02-16 10:00:00', 'record', 'a', 'api_calls', 50, 'pro', 1, 'ok', 'p01', 4, 1000, '2024-02'),
    ('b1', '2024-01-05 09:00:00', 'record', 'b', 'api_calls', 800, 'free', 1, 'overage', 'p02', 1, 500, '2024-01'),
    ('b2', '2024-01-25 09:00:00', 'record', 'b', 'api_calls', 300, 'pro', 1, 'ok', 'p02', 2, 2000, '2024-01'),
    ('b3', '2024-01-26 09:00:00', 'denial', 'b', 'api_calls', 9000, 'pro', 1, 'limit_exceeded', 'p02', 3, 2000, '2024-01'),
    ('b4', '2024-01-27 09:00:00', 'release', 'b', 'api_calls', 5, 'pro', 1, 'ok', 'p02', 4, 2000, '2024-01'),
    ('b5', '2024-01-27 10:00:00', 'record', 'b', 'seats', 3, 'pro', 1, 'ok', 'p02', 5, NULL, ''),
    ('c1', '2024-01-31 23:00:00', 'record', 'c', 'storage', 7, 'pro', 1, 'ok', 'p03', 1, NULL, ''),
    ('c2', '2024-02-01 00:30:00', 'record', 'c', 'storage', 9, 'pro', 1, 'ok', 'p03', 2, NULL, '')";

/// Pro costs 0.01 per unit past its allowance; free has no price; seats are a gauge.
struct Prices;

impl PriceList for Prices {
    fn is_billed(&self, metric: &str) -> bool {
        metric != "seats"
    }
    fn unit_price(&self, plan: &str, _: u32, _: &str) -> Option<Price> {
        (plan == "pro").then(|| Price::from_micros(10_000))
    }
    fn currency(&self) -> String {
        "USD".into()
    }
}

fn period(s: &str) -> Period {
    s.parse().unwrap()
}

async fn rows_18(ch: &ClickHouseServer, sql: &str) -> Vec<Value> {
    ch.json_rows(DB, sql).await
}

fn ids(rows: &[Value]) -> Vec<String> {
    rows.iter()
        .map(|r| r["event_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn periods_select_the_same_events_on_clickhouse_18_and_current() {
    let ch = ClickHouseServer::start().await;
    let mut opts = aggregator::AggregateOptions::new(&ch.url, "redis://127.0.0.1:1");
    opts.database = DB.into();
    let cfg = opts.clickhouse();
    ClickHouse::create_database(&cfg).await.unwrap();
    let db = ClickHouse::new(&cfg);
    migrate(&db).await.unwrap();
    ch.client(DB).query(SAMPLE).execute().await.unwrap();
    let chdb = Chdb::start().await;
    migrate(&chdb).await.unwrap();
    chdb.query(SAMPLE).await.unwrap();

    let cases = [
        ("2024-01", None, vec!["a1", "a2", "b1", "b2", "b5", "c1"]),
        ("2024-02", None, vec!["a3", "c2"]),
        ("2023-12", None, vec!["a0"]),
        ("2024-01", Some("b"), vec!["b1", "b2", "b5"]),
        ("2024-03", None, vec![]),
    ];
    for (p, tenant, want) in cases {
        let sql = events_query(period(p), tenant);
        assert_eq!(
            ids(&rows_18(&ch, &sql).await),
            want,
            "18.16: {p} {tenant:?}"
        );
        assert_eq!(ids(&chdb.rows(&sql).await), want, "{}: {p}", chdb.version);
    }
    // The export queries parse and run on both (no exports yet).
    for sql in [
        stored_export_query(period("2024-02")),
        earlier_exports_query(period("2024-02")),
    ] {
        assert!(rows_18(&ch, &sql).await.is_empty(), "{sql}");
        assert!(chdb.rows(&sql).await.is_empty(), "{sql}");
    }

    // The lines, through the typed client on 18.16.
    let billing = Billing::new(db.clone());
    let l = billing
        .overage(period("2024-01"), None, &Prices)
        .await
        .unwrap();
    let got: Vec<_> = l
        .iter()
        .map(|l| {
            (
                l.tenant.as_str(),
                l.metric.as_str(),
                l.used,
                l.overage,
                l.amount_micros,
                l.unpriced,
                l.included,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            // 400 then 700 against 1,000: 100 over at 0.01. a0 belongs to 2023-12.
            ("a", "api_calls", 1100, 100, 1_000_000, 0, Some(1000)),
            // 800 against free's 500: 300 over, unpriced; then pro's 2,000 leaves room.
            ("b", "api_calls", 1100, 300, 0, 300, Some(2000)),
            ("c", "storage", 7, 0, 0, 0, None),
        ]
    );
    assert_eq!((l[1].plan.as_str(), l[1].plan_version), ("pro", 1));
    let bad = billing
        .overage(period("2024-01"), Some("no spaces"), &Prices)
        .await;
    assert!(
        matches!(
            bad,
            Err(BillingError::Invalid {
                field: "tenant",
                ..
            })
        ),
        "{bad:?}"
    );

    // Export January (long over), then again: the same lines, said to be old.
    let now = Utc.with_ymd_and_hms(2026, 11, 22, 0, 0, 0).unwrap();
    let first = billing
        .export(period("2024-01"), now, &Prices)
        .await
        .unwrap();
    assert!(!first.already_exported);
    assert_eq!(first.lines.len(), 3);
    assert!(first.lines.iter().all(|l| l.kind == LineKind::Period));
    let again = billing
        .export(period("2024-01"), now, &Prices)
        .await
        .unwrap();
    assert!(again.already_exported);
    assert_eq!(again.lines, first.lines);
    assert_eq!(again.currency, "USD");

    // A late event reaches January after its export: January's export does not change;
    // February's carries the difference as an adjustment.
    ch.client(DB)
        .query("INSERT INTO usage_events (event_id, event_time, kind, tenant, metric, amount, plan, plan_version, src, src_offset, included, billing_period)
                VALUES ('b6', '2024-01-06 09:00:00', 'record', 'b', 'api_calls', 100, 'free', 1, 'p02', 6, 500, '2024-01')")
        .execute()
        .await
        .unwrap();
    let jan = billing
        .export(period("2024-01"), now, &Prices)
        .await
        .unwrap();
    assert_eq!(jan.lines, first.lines);
    let feb = billing
        .export(period("2024-02"), now, &Prices)
        .await
        .unwrap();
    let got: Vec<_> = feb
        .lines
        .iter()
        .map(|l| {
            (
                l.kind,
                l.for_period.as_str(),
                l.tenant.as_str(),
                l.used,
                l.overage,
                l.unpriced,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (LineKind::Period, "2024-02", "a", 50, 0, 0),
            (LineKind::Period, "2024-02", "c", 9, 0, 0),
            // b6 came before the upgrade: 100 more over free's 500, unpriced.
            (LineKind::Adjustment, "2024-01", "b", 100, 100, 100),
        ]
    );
    // The adjustment is exported once: March finds January and February square.
    let mar = billing
        .export(period("2024-03"), now, &Prices)
        .await
        .unwrap();
    assert!(mar.lines.is_empty(), "{:?}", mar.lines);

    // A period that has not ended cannot be exported.
    let e = billing
        .export(period("2026-11"), now, &Prices)
        .await
        .unwrap_err();
    assert!(matches!(e, BillingError::NotEnded { .. }), "{e}");
    assert!(e.to_string().contains("2026-12-01T12:00:00"), "{e}");
}
