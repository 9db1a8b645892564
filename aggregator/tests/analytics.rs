//! The analysts' queries (docs/analytics.md) give the same, expected answers on ClickHouse
//! 18.16 (a real server) and on current ClickHouse (chdb).

mod harness;

use aggregator::queries;
use aggregator::schema::migrate;
use aggregator::sink::ClickHouse;
use harness::chdb::Chdb;
use harness::{ClickHouseServer, DB};
use serde_json::Value;

/// January 2024: a at 90% of its allowance, b past it, c barely started; b and c denied.
const SAMPLE: &str = "INSERT INTO usage_events
    (event_id, event_time, kind, tenant, metric, amount, plan, plan_version, reason, src, src_offset, included)
VALUES
    ('a1', '2024-01-03 10:00:00', 'record', 'a', 'api_calls', 400, 'pro', 1, 'ok', 'p01', 1, 1000),
    ('a2', '2024-01-20 10:00:00', 'commit', 'a', 'api_calls', 500, 'pro', 1, 'ok', 'p01', 2, 1000),
    ('a3', '2024-01-20 11:00:00', 'record', 'a', 'storage', 7, 'pro', 1, 'ok', 'p01', 3, NULL),
    ('b1', '2024-01-03 09:00:00', 'record', 'b', 'api_calls', 1200, 'pro', 1, 'overage', 'p02', 1, 1000),
    ('b2', '2024-01-04 09:00:00', 'denial', 'b', 'api_calls', 1, 'pro', 1, 'rate_limited', 'p02', 2, 1000),
    ('b3', '2024-01-04 09:00:01', 'denial', 'b', 'api_calls', 1, 'pro', 1, 'rate_limited', 'p02', 3, 1000),
    ('b4', '2024-01-05 09:00:00', 'release', 'b', 'api_calls', 50, 'pro', 1, 'ok', 'p02', 4, 1000),
    ('c1', '2024-01-03 08:00:00', 'record', 'c', 'api_calls', 100, 'free', 2, 'ok', 'p03', 1, 1000),
    ('c2', '2024-01-03 08:30:00', 'denial', 'c', 'api_calls', 5000, 'free', 2, 'limit_exceeded', 'p03', 2, 1000)";

fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

fn table(rows: &[Value], columns: &[&str]) -> Vec<Vec<String>> {
    rows.iter()
        .map(|r| columns.iter().map(|c| text(&r[*c])).collect())
        .collect()
}

fn strings(rows: &[&[&str]]) -> Vec<Vec<String>> {
    rows.iter()
        .map(|r| r.iter().map(|s| s.to_string()).collect())
        .collect()
}

/// A query, the columns compared, and the rows expected.
type Case = (String, Vec<&'static str>, Vec<Vec<String>>);

fn cases() -> Vec<Case> {
    vec![
        (
            queries::quota_fill(80),
            vec!["tenant", "metric", "yyyymm", "used", "allowance", "percent"],
            strings(&[
                &["b", "api_calls", "202401", "1200", "1000", "120"],
                &["a", "api_calls", "202401", "900", "1000", "90"],
            ]),
        ),
        (
            queries::quota_fill(100),
            vec!["tenant", "percent"],
            strings(&[&["b", "120"]]),
        ),
        (
            queries::top_tenants("api_calls", 202401, 2),
            vec!["tenant", "amount", "events"],
            strings(&[&["b", "1200", "1"], &["a", "900", "2"]]),
        ),
        (
            queries::DENIALS_BY_REASON_AND_PLAN.to_string(),
            vec!["reason", "plan", "plan_version", "denials"],
            strings(&[
                &["rate_limited", "pro", "1", "2"],
                &["limit_exceeded", "free", "2", "1"],
            ]),
        ),
        (
            queries::adoption_by_plan(202401),
            vec!["plan", "metric", "tenants", "plan_tenants"],
            strings(&[
                &["free", "api_calls", "1", "1"],
                &["pro", "api_calls", "2", "2"],
                &["pro", "storage", "1", "2"],
            ]),
        ),
        (
            queries::daily_usage_in(202401),
            vec!["tenant", "metric", "yyyymmdd", "amount"],
            strings(&[
                &["a", "api_calls", "20240103", "400"],
                &["a", "api_calls", "20240120", "500"],
                &["a", "storage", "20240120", "7"],
                &["b", "api_calls", "20240103", "1200"],
                &["c", "api_calls", "20240103", "100"],
            ]),
        ),
    ]
}

async fn rows_18(ch: &ClickHouseServer, sql: &str) -> Vec<Value> {
    ch.json_rows(DB, sql).await
}

#[tokio::test(flavor = "multi_thread")]
async fn analytics_queries_answer_the_same_on_clickhouse_18_and_current() {
    let ch = ClickHouseServer::start().await;
    let mut opts = aggregator::AggregateOptions::new(&ch.url, "redis://127.0.0.1:1");
    opts.database = DB.into();
    let cfg = opts.clickhouse();
    ClickHouse::create_database(&cfg).await.unwrap();
    migrate(&ClickHouse::new(&cfg)).await.unwrap();
    ch.client(DB).query(SAMPLE).execute().await.unwrap();

    let chdb = Chdb::start().await;
    migrate(&chdb).await.unwrap();
    chdb.query(SAMPLE).await.unwrap();

    // Migration 6 adds a column, which 18.16 cannot do IF NOT EXISTS: a second attempt
    // must fail with the message `migrate` takes for "done before".
    let again = "ALTER TABLE usage_events ADD COLUMN included Nullable(UInt64)";
    let err = ch.client(DB).query(again).execute().await.unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    let err = chdb.query(again).await.unwrap_err();
    assert!(err.contains("already exists"), "{err}");

    for (sql, columns, want) in cases() {
        let old = table(&rows_18(&ch, &sql).await, &columns);
        assert_eq!(old, want, "ClickHouse 18.16: {sql}");
        let current = table(&chdb.rows(&sql).await, &columns);
        assert_eq!(
            current, want,
            "current ClickHouse ({}): {sql}",
            chdb.version
        );
    }
}
