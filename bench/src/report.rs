//! Turning cell results into report rows, a table for people and JSON for machines.

use std::collections::BTreeMap;

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{CellAlignment, Table};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cli::Scenario;
use crate::ingest::IngestFigures;
use crate::scenario::CellResult;

/// Facts about the run, repeated in every JSON row.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// Logical CPUs of the machine (client and servers share them).
    pub nproc: usize,
    /// Measured seconds per cell.
    pub duration_s: f64,
    /// Unmeasured seconds before each cell.
    pub warmup_s: f64,
    /// gRPC connections per target.
    pub channels: usize,
    /// Tenants the workers are spread over.
    pub tenants: usize,
    /// `spawned` (the bench started the node), `endpoint` (a running node), or `none`.
    pub node: String,
    /// Version of the redis-server the bench started, if it started one.
    pub redis: Option<String>,
    /// Version of the clickhouse-server ingest started (in ingest's rows only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clickhouse: Option<String>,
}

/// One line of the report: a scenario at a concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Scenario name.
    pub scenario: String,
    /// Operations in flight.
    pub concurrency: usize,
    /// Successful operations per second (reserve-commit: pairs per second).
    pub ops_per_sec: f64,
    /// Median latency, microseconds (absent when nothing succeeded).
    pub p50_us: Option<f64>,
    /// 90th percentile, microseconds.
    pub p90_us: Option<f64>,
    /// 99th percentile, microseconds.
    pub p99_us: Option<f64>,
    /// 99.9th percentile, microseconds.
    pub p999_us: Option<f64>,
    /// Mean latency, microseconds.
    pub mean_us: Option<f64>,
    /// Slowest operation, microseconds.
    pub max_us: Option<f64>,
    /// Successful operations measured.
    pub ops: u64,
    /// Failed operations.
    pub errors: u64,
    /// errors / (ops + errors).
    pub error_rate: f64,
    /// Failed operations by kind (gRPC code, or `denied:<reason>`).
    pub error_kinds: BTreeMap<String, u64>,
    /// ops_per_sec over the ceiling's at the same concurrency in the same run.
    pub ratio_to_ceiling: Option<f64>,
    /// The scenario the ratio is taken against: `ceiling`, `redis-script` for
    /// hard-reserve, or `hard-reserve` for soft-reserve.
    pub ratio_basis: Option<String>,
    /// Calls per operation (2 for reserve-commit, hard-reserve, soft-reserve and
    /// redis-script).
    pub rpcs_per_op: u32,
    /// propagation: the node whose delays the row gives (`node2`, `node3`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// propagation: median time of one polling Check on that node, in µs (the
    /// resolution of the delays).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub poll_p50_us: Option<f64>,
    /// propagation: changes that the first Check sent after the Admin call already showed
    /// (then the delay is at most one Check's time, and the real lag is hidden in it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seen_by_first_poll: Option<u64>,
    /// cluster: the operation of the row (`check`, `reserve-commit`, `record`, …); the
    /// scenario is then `cluster`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// cluster: how many enforcers the workers were spread over.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enforcers: Option<usize>,
    /// cluster: CPU seconds per second (cores) used over the measured window by each
    /// group of processes (`enforcers`, `redis`, `clickhouse`, `aggregators`, `bench`;
    /// the topology's only when the bench brought it up) and by the whole `machine`.
    #[serde(rename = "cpu_cores", skip_serializing_if = "Option::is_none")]
    pub cluster_cpu_cores: Option<BTreeMap<String, f64>>,
    /// ingest: its own figures (the percentiles above are then the lag's, from
    /// acknowledgement to the rollup, and ops/s the acknowledged Records').
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub ingest: Option<IngestFigures>,
    /// Run facts.
    #[serde(flatten)]
    pub run: RunInfo,
}

impl Row {
    /// Summarizes a cell; `ceiling_ops` is the throughput, at the same concurrency, of the
    /// scenario's [`Scenario::ratio_basis`].
    pub fn new(cell: &CellResult, ceiling_ops: Option<f64>, run: &RunInfo) -> Self {
        let mut row = Row::of_histogram(cell.scenario, &cell.histogram, cell.ops_per_sec(), run);
        row.concurrency = cell.concurrency;
        row.errors = cell.errors;
        row.error_rate = cell.error_rate();
        row.error_kinds = cell
            .error_kinds
            .iter()
            .map(|(k, v)| (k.clone(), v.count))
            .collect();
        row.ratio_to_ceiling = ceiling_ops
            .filter(|c| *c > 0.0)
            .map(|c| row.ops_per_sec / c);
        row.ratio_basis = cell
            .scenario
            .ratio_basis()
            .filter(|_| row.ratio_to_ceiling.is_some())
            .map(|b| b.name().to_owned());
        row
    }

    /// A row with the percentiles of `h` (nanoseconds), concurrency 1 and no errors.
    pub fn of_histogram(
        scenario: Scenario,
        h: &Histogram<u64>,
        ops_per_sec: f64,
        run: &RunInfo,
    ) -> Self {
        let us = |nanos: u64| nanos as f64 / 1000.0;
        let q = |quantile: f64| (!h.is_empty()).then(|| us(h.value_at_quantile(quantile)));
        Row {
            scenario: scenario.name().to_owned(),
            concurrency: 1,
            ops_per_sec,
            p50_us: q(0.50),
            p90_us: q(0.90),
            p99_us: q(0.99),
            p999_us: q(0.999),
            mean_us: (!h.is_empty()).then(|| h.mean() / 1000.0),
            max_us: (!h.is_empty()).then(|| us(h.max())),
            ops: h.len(),
            errors: 0,
            error_rate: 0.0,
            error_kinds: BTreeMap::new(),
            ratio_to_ceiling: None,
            ratio_basis: None,
            rpcs_per_op: scenario.rpcs_per_op(),
            target: None,
            poll_p50_us: None,
            seen_by_first_poll: None,
            operation: None,
            enforcers: None,
            cluster_cpu_cores: None,
            ingest: None,
            run: run.clone(),
        }
    }

    fn errors_text(&self) -> String {
        if self.errors == 0 {
            "0".to_owned()
        } else {
            format!("{} ({:.2}%)", self.errors, self.error_rate * 100.0)
        }
    }
}

/// The ratio column: the bare figure against the ceiling, else followed by its basis.
fn ratio_text(ratio: Option<f64>, basis: Option<&str>) -> String {
    match (ratio, basis) {
        (Some(x), Some(b)) if b != Scenario::Ceiling.name() => format!("{x:.2} ({b})"),
        (Some(x), _) => format!("{x:.2}"),
        (None, _) => "-".to_owned(),
    }
}

fn us_text(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"))
}

/// The report for people: the cells' table, then propagation's, then ingest's (each when
/// it has rows).
pub fn tables(rows: &[Row]) -> String {
    let of = |s: Scenario| -> Vec<Row> {
        rows.iter()
            .filter(|r| r.scenario == s.name())
            .cloned()
            .collect()
    };
    let cells: Vec<Row> = rows
        .iter()
        .filter(|r| {
            r.ingest.is_none()
                && r.scenario != Scenario::Propagation.name()
                && r.scenario != Scenario::Cluster.name()
        })
        .cloned()
        .collect();
    let mut out = Vec::new();
    if !cells.is_empty() {
        out.push(table(&cells));
    }
    let cluster = of(Scenario::Cluster);
    if !cluster.is_empty() {
        out.push(cluster_table(&cluster));
    }
    let propagation = of(Scenario::Propagation);
    if !propagation.is_empty() {
        out.push(propagation_table(&propagation));
    }
    let ingest = of(Scenario::Ingest);
    if !ingest.is_empty() {
        out.push(ingest_table(&ingest));
    }
    out.join("\n\n")
}

/// The CPU groups of the cluster table, in its column's order.
const CLUSTER_CPU: [&str; 5] = ["enforcers", "redis", "clickhouse", "aggregators", "bench"];

/// Per operation and concurrency, through all the enforcers: ops/s, percentiles, errors,
/// and the cores each group of processes used (then the whole machine's busy cores).
fn cluster_table(rows: &[Row]) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "scenario",
        "operation",
        "concurrency",
        "ops/s",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "p99.9 µs",
        "errors",
        "CPU cores: enforcers, redis, clickhouse, aggregators, bench",
        "machine",
    ]);
    for r in rows {
        let cpu = r.cluster_cpu_cores.clone().unwrap_or_default();
        let core = |name: &str| {
            cpu.get(name)
                .map_or_else(|| "-".to_owned(), |c| format!("{c:.2}"))
        };
        t.add_row(vec![
            r.scenario.clone(),
            r.operation.clone().unwrap_or_default(),
            r.concurrency.to_string(),
            thousands(r.ops_per_sec.round() as u64),
            us_text(r.p50_us),
            us_text(r.p90_us),
            us_text(r.p99_us),
            us_text(r.p999_us),
            r.errors_text(),
            CLUSTER_CPU.map(core).join(", "),
            core(crate::resources::MACHINE),
        ]);
    }
    for i in 2..11 {
        if let Some(col) = t.column_mut(i) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
    t.to_string()
}

/// Per cell: concurrency, rate asked, Records acknowledged and events into the rollup per
/// second, lag percentiles and max in ms, events never seen, drain time, errors, Record
/// latency, and the lag's resolution (poll interval + median read).
fn ingest_table(rows: &[Row]) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "scenario",
        "concurrency",
        "target/s",
        "acked/s",
        "rollup/s",
        "lag p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "unseen",
        "drain ms",
        "errors",
        "Record p50/p99 µs",
        "resolution ms",
    ]);
    let scaled = |v: Option<f64>, by: f64| {
        v.map_or_else(|| "-".to_owned(), |v| thousands((v / by).round() as u64))
    };
    let ms = |v: Option<f64>| scaled(v, 1000.0);
    let us = |v: Option<f64>| scaled(v, 1.0);
    for r in rows {
        let Some(f) = &r.ingest else { continue };
        t.add_row(vec![
            r.scenario.clone(),
            r.concurrency.to_string(),
            f.target_rate
                .map_or_else(|| "max".to_owned(), |x| thousands(x.round() as u64)),
            thousands(r.ops_per_sec.round() as u64),
            thousands(f.visible_per_sec.round() as u64),
            ms(r.p50_us),
            ms(r.p90_us),
            ms(r.p99_us),
            ms(r.max_us),
            f.unseen.to_string(),
            ms(f.drain_ms.map(|d| d * 1000.0)),
            r.errors_text(),
            format!("{} / {}", us(f.record_p50_us), us(f.record_p99_us)),
            format!(
                "{:.0} + {:.1}",
                f.poll_interval_us / 1000.0,
                f.poll_p50_us.unwrap_or(0.0) / 1000.0
            ),
        ]);
    }
    for i in 1..14 {
        if let Some(col) = t.column_mut(i) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
    t.to_string()
}

/// Per node: changes timed, changes/s, delay percentiles and max, errors (waits that hit
/// the cap), the median time of one polling Check, and how many changes the first Check
/// already showed.
fn propagation_table(rows: &[Row]) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "scenario",
        "node",
        "changes",
        "changes/s",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "max µs",
        "errors",
        "poll p50 µs",
        "1st poll",
    ]);
    for r in rows {
        t.add_row(vec![
            r.scenario.clone(),
            r.target.clone().unwrap_or_default(),
            r.ops.to_string(),
            format!("{:.0}", r.ops_per_sec),
            us_text(r.p50_us),
            us_text(r.p90_us),
            us_text(r.p99_us),
            us_text(r.max_us),
            r.errors_text(),
            us_text(r.poll_p50_us),
            r.seen_by_first_poll
                .map_or_else(|| "-".to_owned(), |n| n.to_string()),
        ]);
    }
    for i in 2..11 {
        if let Some(col) = t.column_mut(i) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
    t.to_string()
}

/// The rows as a table: scenario, concurrency, ops/s, percentiles, errors, ratio (to
/// `ceiling`; to the scenario named after it otherwise: `redis-script` for hard-reserve,
/// `hard-reserve` for soft-reserve).
fn table(rows: &[Row]) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "scenario",
        "concurrency",
        "ops/s",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "p99.9 µs",
        "errors",
        "ratio_to_ceiling",
    ]);
    for r in rows {
        let ratio = ratio_text(r.ratio_to_ceiling, r.ratio_basis.as_deref());
        t.add_row(vec![
            r.scenario.clone(),
            r.concurrency.to_string(),
            thousands(r.ops_per_sec.round() as u64),
            us_text(r.p50_us),
            us_text(r.p90_us),
            us_text(r.p99_us),
            us_text(r.p999_us),
            r.errors_text(),
            ratio,
        ]);
    }
    for i in 1..9 {
        if let Some(col) = t.column_mut(i) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
    t.to_string()
}

/// The rows as one line of JSON (an array).
pub fn json(rows: &[Row]) -> anyhow::Result<String> {
    Ok(serde_json::to_string(rows)?)
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{CellResult, ErrorKind};
    use std::time::Duration;

    fn cell(scenario: Scenario, latencies_us: &[u64], errors: u64) -> CellResult {
        let mut histogram = Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap();
        for l in latencies_us {
            histogram.record(l * 1000).unwrap();
        }
        let mut error_kinds = BTreeMap::new();
        if errors > 0 {
            error_kinds.insert(
                "Unavailable".to_owned(),
                ErrorKind {
                    count: errors,
                    example: "down".into(),
                },
            );
        }
        CellResult {
            scenario,
            concurrency: 4,
            histogram,
            errors,
            error_kinds,
            measured: Duration::from_secs(2),
        }
    }

    fn info() -> RunInfo {
        RunInfo {
            nproc: 2,
            duration_s: 2.0,
            warmup_s: 1.0,
            channels: 4,
            tenants: 64,
            node: "none".into(),
            redis: None,
            clickhouse: None,
        }
    }

    #[test]
    fn rows_and_outputs() {
        let ceiling = Row::new(&cell(Scenario::Ceiling, &[100; 1000], 0), None, &info());
        assert_eq!(ceiling.ops_per_sec, 500.0);
        let check = Row::new(
            &cell(Scenario::Check, &[200; 250], 250),
            Some(ceiling.ops_per_sec),
            &info(),
        );
        assert_eq!(check.ratio_to_ceiling, Some(0.25));
        assert_eq!(check.error_rate, 0.5);
        assert!((check.p50_us.unwrap() - 200.0).abs() < 1.0);

        let empty = Row::new(&cell(Scenario::Check, &[], 3), Some(500.0), &info());
        assert_eq!(empty.p99_us, None);

        let hard = Row::new(
            &cell(Scenario::HardReserve, &[400; 100], 0),
            Some(100.0),
            &info(),
        );
        assert_eq!(hard.ratio_to_ceiling, Some(0.5));
        assert_eq!(hard.ratio_basis.as_deref(), Some("redis-script"));
        assert_eq!(hard.rpcs_per_op, 2);

        let soft = Row::new(
            &cell(Scenario::SoftReserve, &[300; 150], 0),
            Some(hard.ops_per_sec),
            &info(),
        );
        assert_eq!(soft.ratio_to_ceiling, Some(1.5));
        assert_eq!(soft.ratio_basis.as_deref(), Some("hard-reserve"));
        assert_eq!(soft.rpcs_per_op, 2);
        let alone = Row::new(&cell(Scenario::SoftReserve, &[300; 150], 0), None, &info());
        assert_eq!((alone.ratio_to_ceiling, alone.ratio_basis), (None, None));

        let mut h = Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap();
        for d in [300_000, 500_000, 900_000] {
            h.record(d).unwrap();
        }
        let mut prop = Row::of_histogram(Scenario::Propagation, &h, 150.0, &info());
        prop.target = Some("node2".into());
        prop.poll_p50_us = Some(80.0);
        prop.seen_by_first_poll = Some(2);

        let rows = [ceiling, check, empty, hard, prop, soft];
        let text = tables(&rows);
        assert!(text.contains("ratio_to_ceiling") && text.contains("250 (50.00%)"));
        assert!(text.contains("0.50 (redis-script)") && text.contains("max µs"));
        assert!(text.contains("soft-reserve") && text.contains("1.50 (hard-reserve)"));
        let v: serde_json::Value = serde_json::from_str(&json(&rows).unwrap()).unwrap();
        assert_eq!(v[1]["ratio_to_ceiling"], 0.25);
        assert_eq!(v[1]["ratio_basis"], "ceiling");
        assert_eq!(v[1]["nproc"], 2);
        assert_eq!(v[1]["error_kinds"]["Unavailable"], 250);
        assert!(v[1].get("target").is_none());
        assert_eq!(v[4]["target"], "node2");
        assert_eq!(v[4]["ops"], 3);
        assert_eq!(v[4]["seen_by_first_poll"], 2);
        assert!(v[0].get("seen_by_first_poll").is_none());
        assert!((v[4]["max_us"].as_f64().unwrap() - 900.0).abs() < 1.0);
        assert_eq!(v[5]["scenario"], "soft-reserve");
        assert_eq!(v[5]["ratio_basis"], "hard-reserve");
    }

    #[test]
    fn ingest_rows() {
        let mut h = Histogram::new_with_bounds(1, 3_600_000_000_000, 3).unwrap();
        for lag_ms in [400, 700, 1200] {
            h.record(lag_ms * 1_000_000).unwrap();
        }
        let mut row = Row::of_histogram(Scenario::Ingest, &h, 2_500.0, &info());
        row.concurrency = 16;
        row.ingest = Some(IngestFigures {
            target_rate: Some(3_000.0),
            acked: 50_000,
            visible_per_sec: 2_480.0,
            backlog_start: 900,
            backlog: 1_300,
            unseen: 0,
            surplus: 0,
            drain_ms: Some(1_040.0),
            record_p50_us: Some(2_100.0),
            record_p99_us: Some(9_000.0),
            poll_interval_us: 25_000.0,
            poll_p50_us: Some(3_400.0),
            partitions: 64,
            inserts_per_sec: Some(64.0),
            rows_per_insert: Some(39.0),
            merged_per_inserted: Some(12.5),
            cpu_cores: BTreeMap::from([("clickhouse".to_owned(), 0.61)]),
        });
        let text = tables(std::slice::from_ref(&row));
        // Its own table, lags in ms, and not the cells' table.
        assert!(text.contains("rollup/s") && !text.contains("ratio_to_ceiling"));
        // The lags in ms: p50 700, and 1,200 for the top ones (give or take the
        // histogram's precision).
        assert!(text.contains("3,000") && text.contains("2,480") && text.contains("┆  1,20"));
        assert!(text.contains("┆        700 ┆") && text.contains("1,040"));
        assert!(text.contains("2,100 / 9,000") && text.contains("25 + 3.4"));
        let v: serde_json::Value = serde_json::from_str(&json(&[row]).unwrap()).unwrap();
        assert_eq!(v[0]["scenario"], "ingest");
        assert_eq!(v[0]["visible_per_sec"], 2_480.0);
        assert_eq!(v[0]["backlog_start"], 900);
        assert_eq!(v[0]["cpu_cores"]["clickhouse"], 0.61);
        assert!((v[0]["p50_us"].as_f64().unwrap() - 700_000.0).abs() < 1_000.0);
    }

    #[test]
    fn cluster_rows() {
        let mut row = Row::new(
            &cell(Scenario::ReserveCommit, &[900; 2000], 2),
            None,
            &info(),
        );
        row.scenario = Scenario::Cluster.name().to_owned();
        row.operation = Some("reserve-commit".into());
        row.enforcers = Some(3);
        row.cluster_cpu_cores = Some(BTreeMap::from([
            ("enforcers".to_owned(), 0.9),
            ("redis".to_owned(), 0.35),
            ("machine".to_owned(), 1.8),
        ]));
        let text = tables(std::slice::from_ref(&row));
        assert!(text.contains("reserve-commit") && text.contains("1,000"));
        assert!(text.contains("0.90, 0.35, -, -, -") && text.contains("1.80"));
        assert!(!text.contains("ratio_to_ceiling"));
        let v: serde_json::Value = serde_json::from_str(&json(&[row]).unwrap()).unwrap();
        assert_eq!(v[0]["scenario"], "cluster");
        assert_eq!(v[0]["operation"], "reserve-commit");
        assert_eq!(v[0]["enforcers"], 3);
        assert_eq!(v[0]["rpcs_per_op"], 2);
        assert_eq!(v[0]["cpu_cores"]["redis"], 0.35);
    }

    #[test]
    fn ratio_texts() {
        assert_eq!(ratio_text(Some(0.912), Some("ceiling")), "0.91");
        assert_eq!(
            ratio_text(Some(0.3), Some("redis-script")),
            "0.30 (redis-script)"
        );
        assert_eq!(
            ratio_text(Some(1.25), Some("hard-reserve")),
            "1.25 (hard-reserve)"
        );
        assert_eq!(ratio_text(None, None), "-");
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(61234), "61,234");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
