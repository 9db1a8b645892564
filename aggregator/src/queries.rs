//! Queries over the rollups, as analysts and billing run them.
//!
//! The rollup tables are `SummingMergeTree`: rows with the same key are summed only when
//! ClickHouse merges parts, in the background, at no particular time. Until then a key may
//! have several rows, so every query sums and groups by the key (never `SELECT amount …
//! WHERE key = …` alone, and `FINAL` is not needed). The same holds on a cluster, behind
//! `Distributed` tables.

/// Usage per tenant, metric and month (`yyyymm`), all tenants: tenant, metric, yyyymm
/// (`UInt32`), amount (`Int64`), events (`UInt64`).
pub const MONTHLY_USAGE: &str = "SELECT tenant, metric, toYYYYMM(month) AS yyyymm,
       sum(amount) AS amount, sum(events) AS events
FROM usage_monthly
GROUP BY tenant, metric, yyyymm
ORDER BY tenant, metric, yyyymm";

/// Usage per tenant, metric and day (`yyyymmdd`).
pub const DAILY_USAGE: &str = "SELECT tenant, metric, toYYYYMMDD(day) AS yyyymmdd,
       sum(amount) AS amount, sum(events) AS events
FROM usage_daily
GROUP BY tenant, metric, yyyymmdd
ORDER BY tenant, metric, yyyymmdd";

/// Usage per tenant, metric and hour (unix seconds of the hour's start).
pub const HOURLY_USAGE: &str = "SELECT tenant, metric, toUInt32(hour) AS hour_start,
       sum(amount) AS amount, sum(events) AS events
FROM usage_hourly
GROUP BY tenant, metric, hour_start
ORDER BY tenant, metric, hour_start";

/// The same monthly totals computed from the raw events (what the rollups must equal):
/// a reconciliation check, and how a rollup is rebuilt.
pub const MONTHLY_USAGE_FROM_EVENTS: &str = "SELECT tenant, metric, toYYYYMM(event_time) AS yyyymm,
       sum(amount) AS amount, count() AS events
FROM usage_events
WHERE kind IN ('commit', 'record')
GROUP BY tenant, metric, yyyymm
ORDER BY tenant, metric, yyyymm";

/// Denials per tenant, metric and reason.
pub const DENIALS_BY_REASON: &str = "SELECT tenant, metric, reason, count() AS denials
FROM denials
GROUP BY tenant, metric, reason
ORDER BY tenant, metric, reason";
