//! The schema's migrations on ClickHouse 18.16 (a real server) and on current ClickHouse
//! (chdb, in-process): applied twice, the second time a no-op; the rollup queries on both;
//! a failed migration stops with its version.

mod harness;

use aggregator::schema::{migrate, repair_statements, MIGRATIONS};
use aggregator::sink::ClickHouse;
use aggregator::{queries, SinkError};
use harness::chdb::Chdb;
use harness::{ClickHouseServer, DB};

/// Rollup and denial rows lost (as when a server stops between an insert's part and its
/// views), then put back by the repair statements, run twice.
const LOSE_DERIVED: [&str; 3] = [
    "ALTER TABLE usage_monthly DROP PARTITION 2024",
    "ALTER TABLE usage_hourly DROP PARTITION 202401",
    "ALTER TABLE denials DROP PARTITION 202401",
];

fn lose_and_repair() -> Vec<String> {
    let (t, m) = (vec!["acme".to_string()], vec!["api_calls".to_string()]);
    let mut all: Vec<String> = LOSE_DERIVED.iter().map(|s| s.to_string()).collect();
    for _ in 0..2 {
        for month in [202401, 202402] {
            all.extend(repair_statements(month, &t, &m));
        }
    }
    all
}

fn all_versions() -> Vec<u32> {
    MIGRATIONS.iter().map(|m| m.version).collect()
}

async fn database(ch: &ClickHouseServer) -> ClickHouse {
    let mut opts = aggregator::AggregateOptions::new(&ch.url, "redis://127.0.0.1:1");
    opts.database = DB.into();
    let cfg = opts.clickhouse();
    ClickHouse::create_database(&cfg).await.unwrap();
    ClickHouse::new(&cfg)
}

const TABLES: [&str; 13] = [
    "audit_log",
    "billing_exports",
    "dead_letters",
    "denials",
    "denials_mv",
    "schema_migrations",
    "usage_daily",
    "usage_daily_mv",
    "usage_events",
    "usage_hourly",
    "usage_hourly_mv",
    "usage_monthly",
    "usage_monthly_mv",
];

/// Rows for the rollup checks: two inserts (two parts) with the same keys, a denial and a
/// release that rollups must leave out.
const SAMPLE_INSERTS: [&str; 2] = [
    "INSERT INTO usage_events (event_id, event_time, kind, tenant, metric, amount, src, src_offset)
     VALUES ('e1', '2024-01-31 23:10:00', 'commit', 'acme', 'api_calls', 5, 'p01', 1),
            ('e2', '2024-01-31 23:50:00', 'record', 'acme', 'api_calls', 7, 'p01', 2),
            ('e3', '2024-01-31 23:55:00', 'denial', 'acme', 'api_calls', 100, 'p01', 3)",
    "INSERT INTO usage_events (event_id, event_time, kind, tenant, metric, amount, src, src_offset)
     VALUES ('e4', '2024-01-31 23:59:59', 'commit', 'acme', 'api_calls', 11, 'p01', 4),
            ('e5', '2024-02-01 00:00:00', 'record', 'acme', 'api_calls', 2, 'p01', 5),
            ('e6', '2024-02-01 00:00:01', 'release', 'acme', 'api_calls', 40, 'p01', 6)",
];

#[tokio::test(flavor = "multi_thread")]
async fn migrations_apply_twice_on_clickhouse_18() {
    let ch = ClickHouseServer::start().await;
    let db = database(&ch).await;
    assert_eq!(migrate(&db).await.unwrap(), all_versions());
    assert_eq!(
        migrate(&db).await.unwrap(),
        Vec::<u32>::new(),
        "second run applies nothing"
    );
    let client = ch.client(DB);
    let versions: Vec<u32> = client
        .query("SELECT version FROM schema_migrations ORDER BY version")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(versions, all_versions(), "each version recorded once");
    let tables: Vec<String> = client
        .query("SELECT name FROM system.tables WHERE database = ? ORDER BY name")
        .bind(DB)
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(tables, TABLES);
    for sql in SAMPLE_INSERTS {
        client.query(sql).execute().await.unwrap();
    }
    let monthly: Vec<(String, String, u32, i64, u64)> = client
        .query(queries::MONTHLY_USAGE)
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(
        monthly,
        vec![
            ("acme".into(), "api_calls".into(), 202401, 23, 3),
            ("acme".into(), "api_calls".into(), 202402, 2, 1),
        ]
    );
    let hourly: Vec<(String, String, u32, i64, u64)> = client
        .query(queries::HOURLY_USAGE)
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(
        hourly.iter().map(|r| (r.3, r.4)).collect::<Vec<_>>(),
        vec![(23, 3), (2, 1)]
    );
    let denials: Vec<(String, String, String, u64)> = client
        .query(queries::DENIALS_BY_REASON)
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(
        denials,
        vec![("acme".into(), "api_calls".into(), String::new(), 1)]
    );

    for sql in lose_and_repair() {
        client
            .query_raw(&sql)
            .execute()
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let again: Vec<(String, String, u32, i64, u64)> = client
        .query(queries::MONTHLY_USAGE)
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(again, monthly, "monthly rollup repaired, once");
    let again: Vec<(String, String, u32, i64, u64)> = client
        .query(queries::HOURLY_USAGE)
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(again, hourly, "hourly rollup repaired, once");
    let again: Vec<(String, String, String, u64)> = client
        .query(queries::DENIALS_BY_REASON)
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(again, denials, "denials repaired, once");
}

#[tokio::test(flavor = "multi_thread")]
async fn migrations_and_rollup_queries_run_on_current_clickhouse() {
    let chdb = Chdb::start().await;
    eprintln!("current ClickHouse (chdb): {}", chdb.version);
    assert!(
        !chdb.version.starts_with("18."),
        "chdb is a current ClickHouse"
    );
    assert_eq!(migrate(&chdb).await.unwrap(), all_versions());
    assert_eq!(
        migrate(&chdb).await.unwrap(),
        Vec::<u32>::new(),
        "second run applies nothing"
    );
    let tables: Vec<String> = chdb
        .rows("SELECT name FROM system.tables WHERE database = 'allot' ORDER BY name")
        .await
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(tables, TABLES);
    for sql in SAMPLE_INSERTS {
        chdb.query(sql).await.unwrap();
    }
    let monthly = chdb.rows(queries::MONTHLY_USAGE).await;
    let got: Vec<(u64, i64, u64)> = monthly
        .iter()
        .map(|r| {
            (
                r["yyyymm"].as_u64().unwrap(),
                r["amount"]
                    .as_str()
                    .map_or_else(|| r["amount"].as_i64().unwrap(), |s| s.parse().unwrap()),
                r["events"]
                    .as_str()
                    .map_or_else(|| r["events"].as_u64().unwrap(), |s| s.parse().unwrap()),
            )
        })
        .collect();
    assert_eq!(got, vec![(202401, 23, 3), (202402, 2, 1)]);
    let hourly = chdb.rows(queries::HOURLY_USAGE).await;
    let denials = chdb.rows(queries::DENIALS_BY_REASON).await;
    for sql in lose_and_repair() {
        chdb.query(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    assert_eq!(
        chdb.rows(queries::MONTHLY_USAGE).await,
        monthly,
        "monthly rollup repaired, once"
    );
    assert_eq!(
        chdb.rows(queries::HOURLY_USAGE).await,
        hourly,
        "hourly rollup repaired, once"
    );
    assert_eq!(
        chdb.rows(queries::DENIALS_BY_REASON).await,
        denials,
        "denials repaired, once"
    );
    for sql in [
        queries::DAILY_USAGE,
        queries::HOURLY_USAGE,
        queries::MONTHLY_USAGE_FROM_EVENTS,
        queries::DENIALS_BY_REASON,
    ] {
        assert!(!chdb.rows(sql).await.is_empty(), "{sql} returns rows");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_migration_stops_and_names_its_version() {
    let ch = ClickHouseServer::start().await;
    let db = database(&ch).await;
    // A usage_events someone else made, whose event_time is a String: migration 1 keeps
    // it (IF NOT EXISTS), migration 2's hourly view cannot be built on it.
    ch.client(DB)
        .query(
            "CREATE TABLE usage_events (event_id String, event_time String, kind String,
             tenant String, metric String, amount Int64) ENGINE = MergeTree ORDER BY event_id",
        )
        .execute()
        .await
        .unwrap();
    let err = migrate(&db).await.unwrap_err();
    assert_eq!(
        (err.version, err.name, err.statement),
        (2, "usage_rollups", 2),
        "{err}"
    );
    assert!(matches!(err.error, SinkError::Rejected { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("schema migration 2 (usage_rollups), statement 2: rejected"),
        "{err}"
    );
    let versions: Vec<u32> = ch
        .client(DB)
        .query("SELECT version FROM schema_migrations")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(
        versions,
        vec![1],
        "nothing after the failed migration is recorded"
    );
}
