//! Billing from the raw events: each tenant × metric × billing period's included units,
//! use, overage and its price, and exports that never change silently.
//!
//! The rule (what "included" means when the plan changed mid-period) is
//! [`meter::billing`]'s: the entitlement in force at each event. Here the events of a
//! period are read from `usage_events` in time order and handed to it.
//!
//! A **billing period** is named by the local year and month it starts in (`2026-11`):
//! an event belongs to the period of the billing-period (or month) limit it was decided
//! under (`usage_events.billing_period`), so a tenant billed from the 15th is billed
//! 15th to 14th. Events without such a limit (unlimited metrics) fall in the UTC calendar
//! month of their time.
//!
//! An **export** freezes a period's lines in `billing_exports`. Exporting it again returns
//! the same lines. Usage that reaches a period after its export (late events, an
//! aggregator catching up) is not folded into it: the next period's export carries an
//! *adjustment* line per changed tenant × metric (the difference between what the events
//! say now and everything exported for that period so far), for the 12 periods before.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDate, Utc};
use meter::billing::{line, Billable, Price};
use meter::catalog::{Catalog, MetricKind};
use meter::window::Window;
use serde::{Deserialize, Serialize};

use crate::error::SinkError;
use crate::schema::literal;
use crate::sink::ClickHouse;

/// The table exports are kept in (migration 7).
pub const EXPORTS_TABLE: &str = "billing_exports";
/// How many periods before an export are looked at for adjustments.
pub const ADJUSTMENT_LOOKBACK: u32 = 12;

/// Why a billing request failed.
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    /// A request field is unusable.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The period has not ended yet, so it cannot be exported.
    #[error("period {period} has not ended yet: it can be exported from {} (billing overage shows it so far)", .from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))]
    NotEnded {
        /// The period.
        period: Period,
        /// The first instant it can be exported.
        from: DateTime<Utc>,
    },
    /// An amount does not fit the export table's `Int64`.
    #[error("the amount of {tenant} × {metric} does not fit in Int64 millionths")]
    Overflow {
        /// Tenant.
        tenant: String,
        /// Metric.
        metric: String,
    },
    /// ClickHouse failed.
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] SinkError),
}

/// A billing period's name: the year and month it starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Period {
    year: i32,
    month: u32,
}

impl Period {
    /// The period of `year` and `month` (1–12).
    pub fn new(year: i32, month: u32) -> Option<Period> {
        NaiveDate::from_ymd_opt(year, month, 1).map(|_| Period { year, month })
    }

    /// `yyyymm`, as `toYYYYMM`.
    pub fn yyyymm(self) -> u32 {
        self.year as u32 * 100 + self.month
    }

    /// The period `n` months later (earlier when negative).
    pub fn plus(self, n: i32) -> Period {
        let k = self.year * 12 + self.month as i32 - 1 + n;
        Period {
            year: k.div_euclid(12),
            month: k.rem_euclid(12) as u32 + 1,
        }
    }

    /// Midnight UTC on the first of its month.
    pub fn start_utc(self) -> DateTime<Utc> {
        NaiveDate::from_ymd_opt(self.year, self.month, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map_or(DateTime::<Utc>::UNIX_EPOCH, |t| t.and_utc())
    }

    /// When it has ended in every time zone (UTC−12), so that it may be exported.
    pub fn exportable_from(self) -> DateTime<Utc> {
        self.plus(1).start_utc() + chrono::Duration::hours(12)
    }
}

impl FromStr for Period {
    type Err = BillingError;

    fn from_str(s: &str) -> Result<Period, BillingError> {
        let bad = || BillingError::Invalid {
            field: "period",
            reason: format!("{s:?} is not a month; expected YYYY-MM, e.g. 2026-11"),
        };
        let (y, m) = s.split_once('-').ok_or_else(bad)?;
        if y.len() != 4 || m.len() != 2 || !(y.bytes().chain(m.bytes())).all(|b| b.is_ascii_digit())
        {
            return Err(bad());
        }
        let (year, month) = (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if year < 1970 {
            return Err(bad());
        }
        Period::new(year, month).ok_or_else(bad)
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// What billing needs from the catalog: which metrics are billed and their prices.
pub trait PriceList: Sync {
    /// Whether usage of `metric` is billed by the unit (counters; gauges are not).
    fn is_billed(&self, metric: &str) -> bool;
    /// The price of an overage unit of `metric` under `plan`@`version`.
    fn unit_price(&self, plan: &str, version: u32, metric: &str) -> Option<Price>;
    /// The currency prices are in.
    fn currency(&self) -> String;
}

impl PriceList for Catalog {
    fn is_billed(&self, metric: &str) -> bool {
        self.metrics
            .get(metric)
            .is_none_or(|m| m.kind == MetricKind::Counter)
    }

    fn unit_price(&self, plan: &str, version: u32, metric: &str) -> Option<Price> {
        let limits = self
            .plans
            .get(plan)?
            .versions
            .get(&version)?
            .limits
            .get(metric)?;
        // The limit billing counts against: billing period first, as `included` is.
        [Window::BillingPeriod, Window::Month]
            .iter()
            .find_map(|w| limits.iter().find(|l| l.window == *w))
            .and_then(|l| l.unit_price)
    }

    fn currency(&self) -> String {
        self.currency.clone().unwrap_or_default()
    }
}

/// The usage events of `period` (and of `tenant`, if given), in billing order: tenant,
/// metric, time, then the order their store decided them in. Columns as [`BillableRow`].
pub fn events_query(period: Period, tenant: Option<&str>) -> String {
    // Partition pruning: a period's events lie within a day of its month, or in the
    // month after it (a period anchored after the 1st runs into it).
    let from = period.start_utc().timestamp() - 86_400;
    let to = period.plus(2).start_utc().timestamp() + 86_400;
    let label = literal(&period.to_string());
    let tenant = tenant.map_or(String::new(), |t| {
        format!("\n  AND tenant = {}", literal(t))
    });
    format!(
        "SELECT tenant, metric, toUInt32(event_time) AS at, event_id, src, src_offset, amount, included, plan, plan_version
FROM usage_events
WHERE kind IN ('commit', 'record') AND amount > 0
  AND event_time >= toDateTime({from}) AND event_time < toDateTime({to})
  AND (billing_period = {label} OR (billing_period = '' AND toYYYYMM(event_time) = {}))
  {tenant}
ORDER BY tenant, metric, event_time, src, src_offset",
        period.yyyymm()
    )
}

/// One row of [`events_query`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct BillableRow {
    /// Tenant.
    pub tenant: String,
    /// Metric.
    pub metric: String,
    /// Unix seconds.
    pub at: u32,
    /// Event id.
    pub event_id: String,
    /// Where the event was read from (its partition).
    pub src: String,
    /// Its position there: the order in which its store decided it.
    pub src_offset: u64,
    /// Units.
    pub amount: i64,
    /// The allowance in force for it.
    pub included: Option<u64>,
    /// Plan code in force.
    pub plan: String,
    /// Its version.
    pub plan_version: u32,
}

/// A tenant × metric's line for a period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BillLine {
    /// Tenant.
    pub tenant: String,
    /// Metric.
    pub metric: String,
    /// The plan at its last event.
    pub plan: String,
    /// Its version.
    pub plan_version: u32,
    /// Included units in force at the last event (`None`: unlimited).
    pub included: Option<u64>,
    /// Units used.
    pub used: u64,
    /// Units past what was included, event by event.
    pub overage: u64,
    /// Price of the priced overage units, in millionths of the currency.
    pub amount_micros: u128,
    /// Overage units without a price.
    pub unpriced: u64,
}

/// The lines of a period from its events (any order), priced by `prices`; metrics that
/// are not billed are left out.
pub fn lines(rows: Vec<BillableRow>, prices: &dyn PriceList) -> Vec<BillLine> {
    /// A tenant × metric's events, and its latest event (time, id) with its plan.
    #[derive(Default)]
    struct Group {
        events: Vec<Billable>,
        last: (u32, String),
        plan: (String, u32),
    }
    let mut groups: BTreeMap<(String, String), Group> = BTreeMap::new();
    for r in rows {
        if r.amount <= 0 || !prices.is_billed(&r.metric) {
            continue;
        }
        let g = groups
            .entry((r.tenant.clone(), r.metric.clone()))
            .or_default();
        // Event times have second precision: within a second, the order the store decided
        // in (its position in its partition) orders them, not the ids' spelling.
        let order = format!("{}\u{1f}{:020}", r.src, r.src_offset);
        // The plan of the latest event.
        if (r.at, &order) >= (g.last.0, &g.last.1) {
            g.last = (r.at, order.clone());
            g.plan = (r.plan.clone(), r.plan_version);
        }
        g.events.push(Billable {
            at: DateTime::from_timestamp(i64::from(r.at), 0).unwrap_or_default(),
            unit_price: prices.unit_price(&r.plan, r.plan_version, &r.metric),
            id: order,
            amount: r.amount as u64,
            included: r.included,
        });
    }
    groups
        .into_iter()
        .map(|((tenant, metric), g)| {
            let l = line(g.events);
            BillLine {
                tenant,
                metric,
                plan: g.plan.0,
                plan_version: g.plan.1,
                included: l.included,
                used: l.used,
                overage: l.overage,
                amount_micros: l.amount_micros,
                unpriced: l.unpriced,
            }
        })
        .collect()
}

/// Whether an export line bills a period or adjusts one exported before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LineKind {
    /// The export's own period.
    Period,
    /// A correction of an earlier, already exported period.
    Adjustment,
}

/// One line of an export (signed: an adjustment may take back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExportLine {
    /// Period or adjustment.
    pub kind: LineKind,
    /// The period the line bills.
    pub for_period: String,
    /// Tenant.
    pub tenant: String,
    /// Metric.
    pub metric: String,
    /// Included units in force at the period's last event.
    pub included: Option<u64>,
    /// Units used (for an adjustment: the change).
    pub used: i64,
    /// Overage units (for an adjustment: the change).
    pub overage: i64,
    /// Amount in millionths of the currency (for an adjustment: the change).
    pub amount_micros: i64,
    /// Overage units without a price (for an adjustment: the change).
    pub unpriced: i64,
}

/// An export: the lines sent for a period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Export {
    /// The period exported.
    pub period: String,
    /// When it was first exported.
    pub exported_at: DateTime<Utc>,
    /// Whether this request found it already exported (and returned the same lines).
    pub already_exported: bool,
    /// The currency of the amounts.
    pub currency: String,
    /// The period's lines, then adjustments of earlier periods.
    pub lines: Vec<ExportLine>,
}

fn signed(v: u128, l: &BillLine) -> Result<i64, BillingError> {
    i64::try_from(v).map_err(|_| BillingError::Overflow {
        tenant: l.tenant.clone(),
        metric: l.metric.clone(),
    })
}

/// A period's lines as export lines.
pub fn period_lines(period: Period, now: &[BillLine]) -> Result<Vec<ExportLine>, BillingError> {
    now.iter()
        .map(|l| {
            Ok(ExportLine {
                kind: LineKind::Period,
                for_period: period.to_string(),
                tenant: l.tenant.clone(),
                metric: l.metric.clone(),
                included: l.included,
                used: signed(u128::from(l.used), l)?,
                overage: signed(u128::from(l.overage), l)?,
                amount_micros: signed(l.amount_micros, l)?,
                unpriced: signed(u128::from(l.unpriced), l)?,
            })
        })
        .collect()
}

/// The adjustments of `period`: for each tenant × metric, what its events say `now`
/// minus the sum of everything `exported` for it so far (lines of other periods in
/// `exported` are ignored); zero changes are left out.
pub fn adjustments(
    period: Period,
    exported: &[ExportLine],
    now: &[BillLine],
) -> Result<Vec<ExportLine>, BillingError> {
    let label = period.to_string();
    let mut sums: BTreeMap<(String, String), ExportLine> = BTreeMap::new();
    for current in period_lines(period, now)? {
        sums.insert((current.tenant.clone(), current.metric.clone()), current);
    }
    for e in exported.iter().filter(|e| e.for_period == label) {
        let s = sums
            .entry((e.tenant.clone(), e.metric.clone()))
            .or_insert_with(|| ExportLine {
                included: e.included,
                ..zero(&label, &e.tenant, &e.metric)
            });
        s.used -= e.used;
        s.overage -= e.overage;
        s.amount_micros -= e.amount_micros;
        s.unpriced -= e.unpriced;
    }
    Ok(sums
        .into_values()
        .filter(|s| (s.used, s.overage, s.amount_micros, s.unpriced) != (0, 0, 0, 0))
        .map(|s| ExportLine {
            kind: LineKind::Adjustment,
            ..s
        })
        .collect())
}

fn zero(period: &str, tenant: &str, metric: &str) -> ExportLine {
    ExportLine {
        kind: LineKind::Adjustment,
        for_period: period.to_string(),
        tenant: tenant.to_string(),
        metric: metric.to_string(),
        included: None,
        used: 0,
        overage: 0,
        amount_micros: 0,
        unpriced: 0,
    }
}

/// A row of `billing_exports`.
#[derive(Debug, Clone, Serialize, Deserialize, clickhouse::Row)]
struct ExportRow {
    export_period: String,
    exported_at: u32,
    kind: i8,
    for_period: String,
    tenant: String,
    metric: String,
    included: Option<u64>,
    used: i64,
    overage: i64,
    amount_micros: i64,
    unpriced: i64,
    currency: String,
}

impl ExportRow {
    fn line(&self) -> ExportLine {
        ExportLine {
            kind: if self.kind == 2 {
                LineKind::Adjustment
            } else {
                LineKind::Period
            },
            for_period: self.for_period.clone(),
            tenant: self.tenant.clone(),
            metric: self.metric.clone(),
            included: self.included,
            used: self.used,
            overage: self.overage,
            amount_micros: self.amount_micros,
            unpriced: self.unpriced,
        }
    }
}

const EXPORT_COLUMNS: &str = "export_period, toUInt32(exported_at) AS exported_at, toInt8(kind) AS kind, for_period, tenant, metric, included, used, overage, amount_micros, unpriced, currency";

/// The lines of the export of `period`, if it was exported.
pub fn stored_export_query(period: Period) -> String {
    format!(
        "SELECT {EXPORT_COLUMNS} FROM {EXPORTS_TABLE} WHERE export_period = {} ORDER BY kind, for_period, tenant, metric",
        literal(&period.to_string())
    )
}

/// Every exported line of the [`ADJUSTMENT_LOOKBACK`] periods before `period`.
pub fn earlier_exports_query(period: Period) -> String {
    format!(
        "SELECT {EXPORT_COLUMNS} FROM {EXPORTS_TABLE} WHERE for_period >= {} AND for_period < {}",
        literal(&period.plus(-(ADJUSTMENT_LOOKBACK as i32)).to_string()),
        literal(&period.to_string())
    )
}

/// Billing over a ClickHouse database that the aggregator fills.
#[derive(Clone)]
pub struct Billing {
    db: ClickHouse,
}

impl Billing {
    /// Billing over `db`.
    pub fn new(db: ClickHouse) -> Billing {
        Billing { db }
    }

    /// The lines of `period` as the events say now.
    pub async fn overage(
        &self,
        period: Period,
        tenant: Option<&str>,
        prices: &dyn PriceList,
    ) -> Result<Vec<BillLine>, BillingError> {
        if let Some(t) = tenant {
            meter::keys::check_tenant(t).map_err(|reason| BillingError::Invalid {
                field: "tenant",
                reason,
            })?;
        }
        let rows = self
            .db
            .fetch_all::<BillableRow>(&events_query(period, tenant))
            .await?;
        Ok(lines(rows, prices))
    }

    /// Exports `period` (once `now` is past its end): its lines, and adjustments of the
    /// periods exported before it. A period already exported returns its stored export.
    /// Two exports must not run at once (the node serializes its own).
    pub async fn export(
        &self,
        period: Period,
        now: DateTime<Utc>,
        prices: &dyn PriceList,
    ) -> Result<Export, BillingError> {
        let label = period.to_string();
        let stored: Vec<ExportRow> = self.db.fetch_all(&stored_export_query(period)).await?;
        if let Some(first) = stored.first() {
            return Ok(Export {
                period: label,
                exported_at: DateTime::from_timestamp(i64::from(first.exported_at), 0)
                    .unwrap_or_default(),
                already_exported: true,
                currency: first.currency.clone(),
                lines: stored.iter().map(ExportRow::line).collect(),
            });
        }
        if now < period.exportable_from() {
            return Err(BillingError::NotEnded {
                period,
                from: period.exportable_from(),
            });
        }
        let mut out = period_lines(period, &self.overage(period, None, prices).await?)?;
        let earlier: Vec<ExportRow> = self.db.fetch_all(&earlier_exports_query(period)).await?;
        let earlier: Vec<ExportLine> = earlier.iter().map(ExportRow::line).collect();
        let mut periods: Vec<Period> = earlier
            .iter()
            .filter_map(|e| e.for_period.parse().ok())
            .collect();
        periods.sort();
        periods.dedup();
        for p in periods {
            let now_lines = self.overage(p, None, prices).await?;
            out.extend(adjustments(p, &earlier, &now_lines)?);
        }
        let currency = prices.currency();
        let exported_at = now.timestamp().clamp(0, i64::from(u32::MAX)) as u32;
        let rows: Vec<ExportRow> = out
            .iter()
            .map(|l| ExportRow {
                export_period: label.clone(),
                exported_at,
                kind: if l.kind == LineKind::Adjustment { 2 } else { 1 },
                for_period: l.for_period.clone(),
                tenant: l.tenant.clone(),
                metric: l.metric.clone(),
                included: l.included,
                used: l.used,
                overage: l.overage,
                amount_micros: l.amount_micros,
                unpriced: l.unpriced,
                currency: currency.clone(),
            })
            .collect();
        // One INSERT into a table without partitions: the export lands whole or not at all.
        self.db.insert_rows(EXPORTS_TABLE, &rows).await?;
        Ok(Export {
            period: label,
            exported_at: DateTime::from_timestamp(i64::from(exported_at), 0).unwrap_or_default(),
            already_exported: false,
            currency,
            lines: out,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Flat;
    impl PriceList for Flat {
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

    fn row(tenant: &str, metric: &str, at: u32, amount: i64, plan: &str) -> BillableRow {
        BillableRow {
            tenant: tenant.into(),
            metric: metric.into(),
            at,
            event_id: format!("{tenant}-{at}"),
            src: "p01".into(),
            src_offset: u64::from(at),
            amount,
            included: Some(100),
            plan: plan.into(),
            plan_version: 1,
        }
    }

    #[test]
    fn periods_parse_strictly_and_step_by_month() {
        let p: Period = "2026-11".parse().unwrap();
        assert_eq!((p.to_string(), p.yyyymm()), ("2026-11".into(), 202611));
        assert_eq!(p.plus(2).to_string(), "2027-01");
        assert_eq!(p.plus(-11).to_string(), "2025-12");
        assert_eq!(p.start_utc().to_rfc3339(), "2026-11-01T00:00:00+00:00");
        for bad in [
            "",
            "2026-13",
            "2026-1",
            "26-11",
            "2026/11",
            "2026-00",
            "1969-12",
            "２０２６-11",
        ] {
            let e = bad.parse::<Period>().unwrap_err().to_string();
            assert!(e.starts_with("period: "), "{bad}: {e}");
        }
    }

    #[test]
    fn lines_group_price_and_skip_gauges() {
        let rows = vec![
            row("a", "calls", 2, 80, "pro"),
            row("a", "calls", 1, 50, "free"),
            row("a", "seats", 1, 5, "pro"),
            row("b", "calls", 1, 120, "pro"),
        ];
        let l = lines(rows, &Flat);
        assert_eq!(l.len(), 2);
        // a: 50 on free (no price), then 80 on pro of which 30 are over: 0.30.
        assert_eq!(
            (l[0].used, l[0].overage, l[0].amount_micros, l[0].unpriced),
            (130, 30, 300_000, 0)
        );
        assert_eq!(l[0].plan, "pro");
        assert_eq!((l[1].tenant.as_str(), l[1].overage), ("b", 20));
    }

    #[test]
    fn within_a_second_the_stores_order_counts_not_the_ids() {
        // Both in one second; decided free-first (offset 1), though "x10" < "x9".
        let mut first = row("a", "calls", 7, 60, "free");
        (first.event_id, first.src_offset, first.included) = ("x9".into(), 1, Some(50));
        let mut second = row("a", "calls", 7, 30, "pro");
        (second.event_id, second.src_offset) = ("x10".into(), 2);
        let l = lines(vec![second, first], &Flat);
        // 60 against 50: 10 over (free: no price); then 30 more against 100: none.
        assert_eq!(
            (l[0].overage, l[0].unpriced, l[0].plan.as_str()),
            (10, 10, "pro")
        );
    }

    #[test]
    fn adjustments_are_what_changed_since_the_exports() {
        let p: Period = "2026-10".parse().unwrap();
        let now = lines(
            vec![
                row("a", "calls", 1, 150, "pro"),
                row("b", "calls", 1, 10, "pro"),
            ],
            &Flat,
        );
        let mut exported = period_lines(p, &now).unwrap();
        // Nothing changed: nothing to adjust.
        assert!(adjustments(p, &exported, &now).unwrap().is_empty());
        // a was exported at 120 used (20 over); c's usage has since gone (taken back).
        exported[0].used = 120;
        exported[0].overage = 20;
        exported[0].amount_micros = 200_000;
        exported.push(ExportLine {
            used: 7,
            ..zero("2026-10", "c", "calls")
        });
        // A line of another period is not this one's business.
        exported.push(ExportLine {
            used: 1,
            ..zero("2026-09", "a", "calls")
        });
        let adj = adjustments(p, &exported, &now).unwrap();
        let got: Vec<_> = adj
            .iter()
            .map(|a| {
                (
                    a.tenant.as_str(),
                    a.used,
                    a.overage,
                    a.amount_micros,
                    a.kind,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", 30, 30, 300_000, LineKind::Adjustment),
                ("c", -7, 0, 0, LineKind::Adjustment)
            ]
        );
        // Once the adjustment is exported too, the period is square.
        exported.extend(adj);
        assert!(adjustments(p, &exported, &now).unwrap().is_empty());
    }
}
