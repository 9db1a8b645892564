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

/// Usage per tenant, metric and day for one month (`yyyymm`), from the daily rollup.
pub fn daily_usage_in(yyyymm: u32) -> String {
    format!(
        "SELECT tenant, metric, toYYYYMMDD(day) AS yyyymmdd,
       sum(amount) AS amount, sum(events) AS events
FROM usage_daily
WHERE toYYYYMM(day) = {yyyymm}
GROUP BY tenant, metric, yyyymmdd
ORDER BY tenant, metric, yyyymmdd"
    )
}

/// The `limit` largest tenants of a metric in a month: tenant, amount, events.
pub fn top_tenants(metric_code: &str, yyyymm: u32, limit: u32) -> String {
    format!(
        "SELECT tenant, sum(amount) AS amount, sum(events) AS events
FROM usage_monthly
WHERE metric = {} AND toYYYYMM(month) = {yyyymm}
GROUP BY tenant
ORDER BY amount DESC, tenant
LIMIT {limit}",
        crate::schema::literal(metric_code)
    )
}

/// The upsell signal: tenants × metrics × months whose usage reached `min_percent` of
/// the billing allowance in force at their last event of the month (events carry it:
/// `included`); months without an allowance are left out. Columns: tenant, metric,
/// yyyymm, used, allowance, percent (integer, rounded down).
pub fn quota_fill(min_percent: u32) -> String {
    format!(
        "SELECT tenant, metric, yyyymm, used, allowance, intDiv(used * 100, allowance) AS percent
FROM
(
    SELECT tenant, metric, toYYYYMM(event_time) AS yyyymm,
           sum(amount) AS used,
           argMaxIf(assumeNotNull(included), event_time, isNotNull(included)) AS allowance,
           countIf(isNotNull(included)) AS with_allowance
    FROM usage_events
    WHERE kind IN ('commit', 'record')
    GROUP BY tenant, metric, yyyymm
)
WHERE with_allowance > 0 AND allowance > 0 AND used * 100 >= allowance * {min_percent}
ORDER BY percent DESC, tenant, metric, yyyymm"
    )
}

/// Denials by reason and plan: reason, plan, plan_version, denials.
pub const DENIALS_BY_REASON_AND_PLAN: &str = "SELECT reason, plan, plan_version, count() AS denials
FROM denials
GROUP BY reason, plan, plan_version
ORDER BY denials DESC, reason, plan, plan_version";

/// Adoption of each metered feature by plan in a month: of the tenants on a plan that
/// used anything, how many used this metric. Columns: plan, metric, tenants (that used
/// the metric), plan_tenants (that used anything on the plan).
pub fn adoption_by_plan(yyyymm: u32) -> String {
    format!(
        "SELECT plan, metric, tenants, plan_tenants
FROM
(
    SELECT plan, metric, uniqExact(tenant) AS tenants
    FROM usage_events
    WHERE kind IN ('commit', 'record') AND toYYYYMM(event_time) = {yyyymm}
    GROUP BY plan, metric
) AS per_metric
ANY LEFT JOIN
(
    SELECT plan, uniqExact(tenant) AS plan_tenants
    FROM usage_events
    WHERE kind IN ('commit', 'record') AND toYYYYMM(event_time) = {yyyymm}
    GROUP BY plan
) AS per_plan USING (plan)
ORDER BY plan, metric"
    )
}
