//! What the end-to-end tests need of ClickHouse: the aggregator's throwaway server, and
//! waiting for the monthly rollup to match a client's ledger.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Datelike;

#[path = "../../../aggregator/tests/harness/clickhouse.rs"]
mod server;

pub use server::ClickHouseServer;

/// Units per (tenant, metric), as a client counted them.
pub type Totals = BTreeMap<(String, String), i64>;

/// A row of `aggregator::queries::MONTHLY_USAGE`: tenant, metric, yyyymm, amount, events.
type MonthRow = (String, String, u32, i64, u64);

/// This month as `yyyymm`.
pub fn this_month() -> u32 {
    let now = chrono::Utc::now();
    (now.year() as u32) * 100 + now.month()
}

/// Waits (up to a minute) for this month's rollup in database `allot` to equal `ledger`;
/// asserts it does.
pub async fn wait_rollup(ch: &ClickHouseServer, ledger: &Totals) {
    let client = ch.client("allot");
    let yyyymm = this_month();
    let mut seen = Totals::new();
    for _ in 0..600 {
        let rows: Result<Vec<MonthRow>, _> = client
            .query(aggregator::queries::MONTHLY_USAGE)
            .fetch_all()
            .await;
        if let Ok(rows) = rows {
            seen = rows
                .into_iter()
                .filter(|r| r.2 == yyyymm)
                .map(|(t, m, _, a, _)| ((t, m), a))
                .collect();
            if &seen == ledger {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(&seen, ledger, "monthly rollup vs the client's ledger");
}

/// Usage events in ClickHouse: (rows, distinct event ids).
pub async fn usage_rows(ch: &ClickHouseServer) -> (u64, u64) {
    ch.client("allot")
        .query("SELECT count(), uniqExact(event_id) FROM usage_events WHERE kind IN ('commit', 'record')")
        .fetch_one()
        .await
        .unwrap()
}
