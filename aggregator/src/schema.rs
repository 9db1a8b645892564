//! The ClickHouse schema, owned by the aggregator as versioned migrations applied at start.
//!
//! Each [`Migration`] is a list of statements; `schema_migrations` records the versions
//! applied. [`migrate`] applies the missing ones in order and records each after its last
//! statement, so re-running it is a no-op. Every statement is idempotent on its own
//! (`IF NOT EXISTS`) too, so a migration interrupted half-way (or run by two aggregators
//! starting at once) completes when run again; `schema_migrations` may then hold a version
//! twice, which is why it is read with `DISTINCT`.
//!
//! The SQL runs unchanged on ClickHouse 18.16 and on current ClickHouse (checked by the
//! tests on both): no `LowCardinality`, `DateTime64`, `Map`, TTL or CODEC, and the
//! `ENGINE = MergeTree PARTITION BY … ORDER BY …` form only. The rollups are
//! `SummingMergeTree` tables fed by materialized views: parts are summed when they merge,
//! which happens lazily, so a query must always `sum()` and `GROUP BY` its key (see
//! [`crate::queries`]). A materialized view sees only inserts made after it exists, which
//! is why the schema is migrated before any event is inserted. `docs/clickhouse.md`
//! describes the tables and the replicated variants for a cluster.

use std::collections::BTreeSet;

use async_trait::async_trait;

use crate::error::SinkError;

/// One schema version: statements applied in order.
#[derive(Debug)]
pub struct Migration {
    /// Its version (ascending, never reused).
    pub version: u32,
    /// A short name, recorded with it.
    pub name: &'static str,
    /// The statements.
    pub statements: &'static [&'static str],
}

/// The bookkeeping table, created before anything else.
pub const CREATE_SCHEMA_MIGRATIONS: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version UInt32,
    name String,
    applied_at DateTime('UTC')
) ENGINE = MergeTree
ORDER BY version";

/// The versions applied so far.
pub const APPLIED_VERSIONS: &str =
    "SELECT DISTINCT version FROM schema_migrations ORDER BY version";

/// Every migration, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "usage_events",
        statements: &["CREATE TABLE IF NOT EXISTS usage_events (
    event_id String,
    event_time DateTime('UTC'),
    kind Enum8('commit' = 1, 'record' = 2, 'release' = 3, 'expire' = 4, 'denial' = 5),
    tenant String,
    metric String,
    amount Int64,
    `window` String,
    plan String,
    plan_version UInt32,
    outcome String,
    reason String,
    overage UInt8,
    degraded UInt8,
    dim_keys Array(String),
    dim_values Array(String),
    node String,
    src String,
    src_offset UInt64,
    inserted_at DateTime('UTC') DEFAULT now()
) ENGINE = MergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (tenant, metric, event_time, event_id)"],
    },
    Migration {
        version: 2,
        name: "usage_rollups",
        statements: &[
            "CREATE TABLE IF NOT EXISTS usage_hourly (
    tenant String,
    metric String,
    hour DateTime('UTC'),
    amount Int64,
    events UInt64
) ENGINE = SummingMergeTree((amount, events))
PARTITION BY toYYYYMM(hour)
ORDER BY (tenant, metric, hour)",
            "CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hourly_mv TO usage_hourly AS
SELECT tenant, metric, toStartOfHour(event_time) AS hour,
       sum(amount) AS amount, count() AS events
FROM usage_events
WHERE kind IN ('commit', 'record')
GROUP BY tenant, metric, hour",
            "CREATE TABLE IF NOT EXISTS usage_daily (
    tenant String,
    metric String,
    day Date,
    amount Int64,
    events UInt64
) ENGINE = SummingMergeTree((amount, events))
PARTITION BY toYYYYMM(day)
ORDER BY (tenant, metric, day)",
            "CREATE MATERIALIZED VIEW IF NOT EXISTS usage_daily_mv TO usage_daily AS
SELECT tenant, metric, toDate(event_time) AS day,
       sum(amount) AS amount, count() AS events
FROM usage_events
WHERE kind IN ('commit', 'record')
GROUP BY tenant, metric, day",
            "CREATE TABLE IF NOT EXISTS usage_monthly (
    tenant String,
    metric String,
    month Date,
    amount Int64,
    events UInt64
) ENGINE = SummingMergeTree((amount, events))
PARTITION BY toYear(month)
ORDER BY (tenant, metric, month)",
            "CREATE MATERIALIZED VIEW IF NOT EXISTS usage_monthly_mv TO usage_monthly AS
SELECT tenant, metric, toStartOfMonth(event_time) AS month,
       sum(amount) AS amount, count() AS events
FROM usage_events
WHERE kind IN ('commit', 'record')
GROUP BY tenant, metric, month",
        ],
    },
    Migration {
        version: 3,
        name: "denials",
        statements: &[
            "CREATE TABLE IF NOT EXISTS denials (
    event_time DateTime('UTC'),
    tenant String,
    metric String,
    plan String,
    plan_version UInt32,
    reason String,
    `window` String,
    amount Int64,
    event_id String,
    node String
) ENGINE = MergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (tenant, metric, event_time)",
            "CREATE MATERIALIZED VIEW IF NOT EXISTS denials_mv TO denials AS
SELECT event_time, tenant, metric, plan, plan_version, reason, `window`, amount,
       event_id, node
FROM usage_events
WHERE kind = 'denial'",
        ],
    },
    Migration {
        version: 4,
        name: "audit_log",
        statements: &["CREATE TABLE IF NOT EXISTS audit_log (
    at DateTime('UTC'),
    actor String,
    action String,
    tenant String,
    reason String,
    before String,
    after String,
    correlation_id String
) ENGINE = MergeTree
PARTITION BY toYYYYMM(at)
ORDER BY (tenant, at)"],
    },
    Migration {
        version: 5,
        name: "dead_letters",
        statements: &["CREATE TABLE IF NOT EXISTS dead_letters (
    src String,
    src_offset UInt64,
    fields String,
    error String,
    at DateTime('UTC')
) ENGINE = ReplacingMergeTree
ORDER BY (src, src_offset)"],
    },
    Migration {
        version: 6,
        name: "event_allowance",
        // The billing allowance in force for each event (`UsageEvent::included`): what
        // quota fill and billing overage are measured against. Older rows have NULL.
        statements: &["ALTER TABLE usage_events ADD COLUMN included Nullable(UInt64)"],
    },
    Migration {
        version: 7,
        name: "billing",
        // Each event's billing period (`UsageEvent::billing_period`, empty when it has
        // none), and the exports of billing periods: frozen lines, then adjustments.
        // Exports have no partitions, so that one export is one part, landing whole.
        statements: &[
            "ALTER TABLE usage_events ADD COLUMN billing_period String",
            "CREATE TABLE IF NOT EXISTS billing_exports (
    export_period String,
    exported_at DateTime('UTC'),
    kind Enum8('period' = 1, 'adjustment' = 2),
    for_period String,
    tenant String,
    metric String,
    included Nullable(UInt64),
    used Int64,
    overage Int64,
    amount_micros Int64,
    unpriced Int64,
    currency String
) ENGINE = MergeTree
ORDER BY (export_period, for_period, tenant, metric)",
        ],
    },
];

/// Whether a statement adds a column (idempotent by its error, not by `IF NOT EXISTS`,
/// which 18.16 lacks for columns).
fn adds_column(sql: &str) -> bool {
    let upper = sql.to_uppercase();
    upper.starts_with("ALTER TABLE") && upper.contains(" ADD COLUMN ")
}

/// The rollups fed by materialized views from `usage_events` (usage kinds only): table,
/// period column, and the period of an event (the same expression as in its view).
pub const ROLLUPS: &[(&str, &str, &str)] = &[
    ("usage_hourly", "hour", "toStartOfHour(event_time)"),
    ("usage_daily", "day", "toDate(event_time)"),
    ("usage_monthly", "month", "toStartOfMonth(event_time)"),
];

/// A ClickHouse string literal.
pub(crate) fn literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

fn array(items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|s| literal(s)).collect();
    format!("[{}]", items.join(", "))
}

/// Statements that make the rollups and `denials` agree with `usage_events` for
/// `tenants` × `metrics` in `month` (`yyyymm`): per rollup, the difference between the raw
/// events and the rollup, inserted for each key where they differ; the denials missing
/// from `denials`. Running them again adds nothing. See
/// [`crate::sink::ClickHouse::repair_derived`] for when they are needed.
pub fn repair_statements(month: u32, tenants: &[String], metrics: &[String]) -> Vec<String> {
    let (tenants, metrics) = (array(tenants), array(metrics));
    let keys = format!("has({tenants}, tenant) AND has({metrics}, metric)");
    let mut out: Vec<String> = ROLLUPS
        .iter()
        .map(|(table, column, period)| {
            format!(
                "INSERT INTO {table} (tenant, metric, {column}, amount, events)
SELECT tenant, metric, period, raw_amount - rolled_amount, raw_events - rolled_events
FROM
(
    SELECT tenant, metric, {period} AS period,
           sum(amount) AS raw_amount, toInt64(count()) AS raw_events
    FROM usage_events
    WHERE kind IN ('commit', 'record') AND toYYYYMM(event_time) = {month} AND {keys}
    GROUP BY tenant, metric, period
) AS from_events
ANY LEFT JOIN
(
    SELECT tenant, metric, {column} AS period,
           sum(amount) AS rolled_amount, toInt64(sum(events)) AS rolled_events
    FROM {table}
    WHERE toYYYYMM({column}) = {month} AND {keys}
    GROUP BY tenant, metric, period
) AS from_rollup USING (tenant, metric, period)
WHERE raw_amount != rolled_amount OR raw_events != rolled_events"
            )
        })
        .collect();
    out.push(format!(
        "INSERT INTO denials (event_time, tenant, metric, plan, plan_version, reason, `window`,
                     amount, event_id, node)
SELECT event_time, tenant, metric, plan, plan_version, reason, `window`, amount, event_id, node
FROM usage_events
WHERE kind = 'denial' AND toYYYYMM(event_time) = {month} AND {keys}
  AND event_id NOT IN (
      SELECT event_id FROM denials WHERE toYYYYMM(event_time) = {month} AND {keys})"
    ));
    out
}

/// The statement that records `m` as applied.
pub fn record_statement(m: &Migration) -> String {
    format!(
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES ({}, '{}', now())",
        m.version, m.name
    )
}

/// What [`migrate`] needs from a database: run a statement, read one `UInt32` column.
/// Implemented by [`crate::sink::ClickHouse`] (HTTP) and, in the tests, by an in-process
/// current ClickHouse.
#[async_trait]
pub trait Sql: Send + Sync {
    /// Runs a statement that returns no rows.
    async fn execute(&self, sql: &str) -> Result<(), SinkError>;
    /// Runs a query returning one `UInt32` column; its values.
    async fn fetch_u32(&self, sql: &str) -> Result<Vec<u32>, SinkError>;
}

/// A migration that failed; the versions before it are applied, none after it.
#[derive(Debug, thiserror::Error)]
#[error("schema migration {version} ({name}), statement {statement}: {error}")]
pub struct MigrationError {
    /// The version that failed (0: the bookkeeping itself).
    pub version: u32,
    /// Its name.
    pub name: &'static str,
    /// Which statement (1-based; one past the last: recording the version).
    pub statement: usize,
    /// What the database said.
    #[source]
    pub error: SinkError,
}

impl MigrationError {
    /// Whether running the migrations again later may succeed (the database was
    /// unreachable rather than refusing the SQL).
    pub fn is_transient(&self) -> bool {
        self.error.is_transient()
    }
}

/// Applies the migrations not yet recorded, in order; returns the versions it applied
/// (empty when the schema was up to date).
pub async fn migrate(db: &dyn Sql) -> Result<Vec<u32>, MigrationError> {
    let bookkeeping = |statement: usize| {
        move |error| MigrationError {
            version: 0,
            name: "schema_migrations",
            statement,
            error,
        }
    };
    db.execute(CREATE_SCHEMA_MIGRATIONS)
        .await
        .map_err(bookkeeping(1))?;
    let applied: BTreeSet<u32> = db
        .fetch_u32(APPLIED_VERSIONS)
        .await
        .map_err(bookkeeping(2))?
        .into_iter()
        .collect();
    if let Some(newest) = applied.last() {
        if *newest > MIGRATIONS.last().map_or(0, |m| m.version) {
            tracing::warn!(
                newest,
                "the schema has migrations this aggregator does not know (a newer one ran)"
            );
        }
    }
    let mut done = Vec::new();
    for m in MIGRATIONS {
        if applied.contains(&m.version) {
            continue;
        }
        let fail = |statement: usize| {
            move |error| MigrationError {
                version: m.version,
                name: m.name,
                statement,
                error,
            }
        };
        for (i, sql) in m.statements.iter().enumerate() {
            match db.execute(sql).await {
                Ok(()) => {}
                // 18.16 has no ADD COLUMN IF NOT EXISTS: the column may be there from an
                // attempt that stopped before it recorded its version.
                Err(e) if adds_column(sql) && e.to_string().contains("already exists") => {}
                Err(e) => return Err(fail(i + 1)(e)),
            }
        }
        db.execute(&record_statement(m))
            .await
            .map_err(fail(m.statements.len() + 1))?;
        tracing::info!(
            version = m.version,
            name = m.name,
            "schema migration applied"
        );
        done.push(m.version);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_ascend_and_sql_avoids_what_old_servers_lack() {
        let mut last = 0;
        for m in MIGRATIONS {
            assert!(m.version > last, "version {} after {last}", m.version);
            last = m.version;
            assert!(!m.name.contains('\''));
            for s in m.statements {
                let upper = s.to_uppercase();
                for banned in ["LOWCARDINALITY", "DATETIME64", "MAP(", " TTL ", "CODEC("] {
                    assert!(
                        !upper.contains(banned),
                        "{banned} in migration {}",
                        m.version
                    );
                }
                assert!(
                    upper.contains("IF NOT EXISTS") || adds_column(s),
                    "migration {} not idempotent",
                    m.version
                );
            }
        }
    }

    #[test]
    fn repair_statements_quote_their_keys() {
        let sql = repair_statements(
            202401,
            &["o'hara\\x".to_string()],
            &["api_calls".to_string()],
        );
        assert_eq!(sql.len(), ROLLUPS.len() + 1);
        assert!(
            sql[0].contains(r"has(['o\'hara\\x'], tenant) AND has(['api_calls'], metric)"),
            "{}",
            sql[0]
        );
    }

    #[test]
    fn rollup_repairs_use_the_views_own_periods() {
        let all: Vec<&str> = MIGRATIONS
            .iter()
            .flat_map(|m| m.statements.iter().copied())
            .collect();
        for (table, column, period) in ROLLUPS {
            let head = format!("MATERIALIZED VIEW IF NOT EXISTS {table}_mv TO {table}");
            let view = all
                .iter()
                .find(|s| s.contains(&head))
                .unwrap_or_else(|| panic!("no view for {table}"));
            assert!(
                view.contains(&format!("{period} AS {column}")),
                "{table}: {view}"
            );
        }
    }
}
