//! What the end-to-end tests need of ClickHouse: the aggregator's throwaway server,
//! `allot aggregate` processes, and waiting for the monthly rollup to match a client's
//! ledger.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use chrono::Datelike;
use tokio::process::{Child, Command};

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

/// Usage per (tenant, metric) in database `allot`'s monthly rollup, all months summed.
pub async fn monthly_totals(ch: &ClickHouseServer) -> Totals {
    let rows: Vec<MonthRow> = ch
        .client("allot")
        .query(aggregator::queries::MONTHLY_USAGE)
        .fetch_all()
        .await
        .expect("monthly rollup readable");
    let mut out = Totals::new();
    for (t, m, _, a, _) in rows {
        *out.entry((t, m)).or_default() += a;
    }
    out
}

/// An `allot aggregate --redis` process into database `allot`, its stderr in a file.
pub struct Aggregator {
    child: Child,
    log: PathBuf,
}

impl Aggregator {
    /// Starts `allot aggregate` into the ClickHouse at `clickhouse_url` as `id` with
    /// `extra` arguments, logging (`RUST_LOG` `warn,aggregator=info`) to
    /// `<log_dir>/<id>.log`, appended across restarts.
    pub fn start(
        clickhouse_url: &str,
        redis_url: &str,
        id: &str,
        extra: &[&str],
        log_dir: &Path,
    ) -> Aggregator {
        let log = log_dir.join(format!("{id}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("aggregator log file");
        let child = Command::new(env!("CARGO_BIN_EXE_allot"))
            .args(["aggregate", "--clickhouse", clickhouse_url])
            .args(["--redis", redis_url])
            .args(["--database", "allot", "--id", id])
            .args(extra)
            .env("RUST_LOG", "warn,aggregator=info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("allot aggregate starts");
        Aggregator { child, log }
    }

    /// Its exit status if it has exited (by itself: a kill through this handle waits).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("aggregator status")
    }

    /// Kills it with SIGKILL and waits: no shutdown code runs.
    pub async fn kill9(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Stops it with SIGTERM and waits (at most 60 s); its status.
    pub async fn terminate(&mut self) -> ExitStatus {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("the aggregator stops within 60 s of SIGTERM")
            .expect("aggregator status")
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(40);
        format!(
            "--- {} ---\n{}",
            self.log.display(),
            lines[from..].join("\n")
        )
    }
}

/// `expected` and what was found, as (missing, unexpected, found more than once), with a
/// few examples of each.
pub fn compare(expected: &HashSet<String>, found: &[String]) -> (usize, usize, usize, String) {
    let mut seen: HashMap<&str, u32> = HashMap::new();
    for id in found {
        *seen.entry(id.as_str()).or_default() += 1;
    }
    let missing: Vec<&String> = expected
        .iter()
        .filter(|id| !seen.contains_key(id.as_str()))
        .collect();
    let extra: Vec<&&str> = seen.keys().filter(|id| !expected.contains(**id)).collect();
    let twice: Vec<(&&str, &u32)> = seen.iter().filter(|(_, n)| **n > 1).collect();
    let examples = format!(
        "missing {:?}, unexpected {:?}, more than once {:?}",
        &missing[..missing.len().min(5)],
        &extra[..extra.len().min(5)],
        &twice[..twice.len().min(5)]
    );
    (missing.len(), extra.len(), twice.len(), examples)
}
