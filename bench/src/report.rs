//! Turning cell results into report rows, a table for people and JSON for machines.

use std::collections::BTreeMap;

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{CellAlignment, Table};
use serde::Serialize;

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
    /// gRPC calls per operation (2 for reserve-commit).
    pub rpcs_per_op: u32,
    /// Run facts.
    #[serde(flatten)]
    pub run: RunInfo,
}

impl Row {
    /// Summarizes a cell; `ceiling_ops` is the ceiling's throughput at its concurrency.
    pub fn new(cell: &CellResult, ceiling_ops: Option<f64>, run: &RunInfo) -> Self {
        let h = &cell.histogram;
        let us = |nanos: u64| nanos as f64 / 1000.0;
        let q = |quantile: f64| (!h.is_empty()).then(|| us(h.value_at_quantile(quantile)));
        let ops_per_sec = cell.ops_per_sec();
        Row {
            scenario: cell.scenario.name().to_owned(),
            concurrency: cell.concurrency,
            ops_per_sec,
            p50_us: q(0.50),
            p90_us: q(0.90),
            p99_us: q(0.99),
            p999_us: q(0.999),
            mean_us: (!h.is_empty()).then(|| h.mean() / 1000.0),
            max_us: (!h.is_empty()).then(|| us(h.max())),
            ops: cell.ok(),
            errors: cell.errors,
            error_rate: cell.error_rate(),
            error_kinds: cell
                .error_kinds
                .iter()
                .map(|(k, v)| (k.clone(), v.count))
                .collect(),
            ratio_to_ceiling: ceiling_ops.filter(|c| *c > 0.0).map(|c| ops_per_sec / c),
            rpcs_per_op: cell.scenario.rpcs_per_op(),
            run: run.clone(),
        }
    }
}

/// The rows as a table: scenario, concurrency, ops/s, percentiles, errors, ratio.
pub fn table(rows: &[Row]) -> String {
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
    let us = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
    for r in rows {
        let errors = if r.errors == 0 {
            "0".to_owned()
        } else {
            format!("{} ({:.2}%)", r.errors, r.error_rate * 100.0)
        };
        t.add_row(vec![
            r.scenario.clone(),
            r.concurrency.to_string(),
            thousands(r.ops_per_sec.round() as u64),
            us(r.p50_us),
            us(r.p90_us),
            us(r.p99_us),
            us(r.p999_us),
            errors,
            r.ratio_to_ceiling
                .map_or_else(|| "-".to_owned(), |x| format!("{x:.2}")),
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
    use crate::cli::Scenario;
    use crate::scenario::{CellResult, ErrorKind};
    use hdrhistogram::Histogram;
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

        let rows = [ceiling, check, empty];
        let text = table(&rows);
        assert!(text.contains("ratio_to_ceiling") && text.contains("250 (50.00%)"));
        let v: serde_json::Value = serde_json::from_str(&json(&rows).unwrap()).unwrap();
        assert_eq!(v[1]["ratio_to_ceiling"], 0.25);
        assert_eq!(v[1]["nproc"], 2);
        assert_eq!(v[1]["error_kinds"]["Unavailable"], 250);
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(61234), "61,234");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
