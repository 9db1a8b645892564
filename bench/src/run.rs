//! A whole bench run: start or reach the targets, prepare the nodes, run every cell, then
//! propagation, ingest and cluster (each on servers of its own), and report.

use anyhow::{bail, Context as _};

use crate::cli::{RunArgs, Scenario};
use crate::report::{self, Row, RunInfo};
use crate::scenario::{run_cell, CellSpec};
use crate::targets::Targets;

/// Runs the bench described by `args` and prints or writes its report.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let scenarios = ordered(&args.scenario);
    if scenarios.is_empty() {
        bail!("--scenario: give at least one scenario");
    }
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency: give one or more values, each at least 1");
    }
    if args.duration.is_zero() {
        bail!("--duration must be more than 0");
    }
    if args.channels == 0 || args.tenants == 0 {
        bail!("--channels and --tenants must be at least 1");
    }
    // The cluster scenario on --endpoints starts nothing.
    let external_cluster = |s: &Scenario| *s == Scenario::Cluster && !args.endpoints.is_empty();
    let uses_redis = scenarios
        .iter()
        .any(|s| (s.needs_redis_node() || s.runs_alone()) && !external_cluster(s));
    if uses_redis && args.endpoint.is_some() {
        bail!(
            "--endpoint cannot be used with hard-reserve, soft-reserve, redis-script, \
             propagation, ingest or cluster: they start their own redis-server and nodes              (cluster takes --endpoints)"
        );
    }
    if scenarios.contains(&Scenario::Propagation) && args.changes == 0 {
        bail!("--changes must be at least 1");
    }
    if scenarios.contains(&Scenario::Ingest) {
        crate::ingest::check_args(&args)?;
    }
    if scenarios.contains(&Scenario::Cluster) {
        crate::cluster::check_args(&args)?;
    } else if !args.endpoints.is_empty() {
        bail!("--endpoints is for the cluster scenario (one node: --endpoint)");
    }

    let info = RunInfo {
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        duration_s: args.duration.as_secs_f64(),
        warmup_s: args.warmup.as_secs_f64(),
        channels: args.channels,
        tenants: args.tenants,
        node: node_kind(&args, &scenarios).to_owned(),
        redis: if uses_redis {
            Some(crate::redis::version(&args.redis_server)?)
        } else {
            None
        },
        clickhouse: None,
    };
    let cells: Vec<Scenario> = scenarios
        .iter()
        .copied()
        .filter(|s| !s.runs_alone())
        .collect();
    let mut rows = Vec::new();
    if !cells.is_empty() {
        rows = run_cells(&args, &cells, &info).await?;
    }
    if scenarios.contains(&Scenario::Propagation) {
        rows.extend(crate::propagation::run(&args, &info).await?);
    }
    if scenarios.contains(&Scenario::Ingest) {
        rows.extend(crate::ingest::run(&args, &info).await?);
    }
    if scenarios.contains(&Scenario::Cluster) {
        rows.extend(crate::cluster::run(&args, &info).await?);
    }
    output(&args, &rows)
}

fn node_kind(args: &RunArgs, scenarios: &[Scenario]) -> &'static str {
    let embedded = scenarios.iter().any(|s| s.needs_node());
    let spawns = scenarios
        .iter()
        .any(|s| s.needs_redis_node() || s.runs_alone());
    match (embedded, args.endpoint.is_some(), spawns) {
        (true, true, _) => "endpoint",
        (true, false, _) | (false, _, true) => "spawned",
        (false, _, false) => "none",
    }
}

/// Every scenario but propagation at every concurrency; the children live as long as this.
async fn run_cells(
    args: &RunArgs,
    scenarios: &[Scenario],
    info: &RunInfo,
) -> anyhow::Result<Vec<Row>> {
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let mut targets = Targets::start(args, scenarios, &run_id).await?;
    let mut rows = Vec::new();
    for &concurrency in &args.concurrency {
        let mut basis_ops: Vec<(Scenario, f64)> = Vec::new();
        for &scenario in scenarios {
            let spec = CellSpec {
                scenario,
                concurrency,
                warmup: args.warmup,
                duration: args.duration,
                tenants: args.tenants,
                run_id: run_id.clone(),
                bearer: None,
            };
            eprintln!(
                "running {} at concurrency {concurrency} ({:?} warmup + {:?})",
                scenario.name(),
                args.warmup,
                args.duration
            );
            let cell = run_cell(&spec, targets.target(scenario)?)
                .await
                .with_context(|| format!("{} at concurrency {concurrency}", scenario.name()))?;
            for (kind, e) in &cell.error_kinds {
                eprintln!("  {} errors of kind {kind}, e.g.: {}", e.count, e.example);
            }
            targets.ensure_running()?;
            basis_ops.push((scenario, cell.ops_per_sec()));
            let basis = scenario
                .ratio_basis()
                .and_then(|b| basis_ops.iter().find(|(s, _)| *s == b).map(|(_, ops)| *ops));
            let row = Row::new(&cell, basis, info);
            eprintln!(
                "  {:.0} ops/s, p50 {:.0} µs, p99 {:.0} µs, {} errors",
                row.ops_per_sec,
                row.p50_us.unwrap_or(f64::NAN),
                row.p99_us.unwrap_or(f64::NAN),
                row.errors
            );
            rows.push(row);
        }
    }
    targets.stop().await;
    Ok(rows)
}

/// The scenarios once each: the ceilings first (the others' ratios need them; hard-reserve
/// brings redis-script along), then as given, except that hard-reserve comes before
/// soft-reserve (soft-reserve's ratio is to it), then propagation, ingest and cluster.
fn ordered(given: &[Scenario]) -> Vec<Scenario> {
    let mut out = Vec::new();
    if given.contains(&Scenario::Ceiling) {
        out.push(Scenario::Ceiling);
    }
    if given.contains(&Scenario::RedisScript) || given.contains(&Scenario::HardReserve) {
        out.push(Scenario::RedisScript);
    }
    for s in given.iter().filter(|s| !s.runs_alone()) {
        if *s == Scenario::SoftReserve
            && given.contains(&Scenario::HardReserve)
            && !out.contains(&Scenario::HardReserve)
        {
            out.push(Scenario::HardReserve);
        }
        if !out.contains(s) {
            out.push(*s);
        }
    }
    for alone in [Scenario::Propagation, Scenario::Ingest, Scenario::Cluster] {
        if given.contains(&alone) {
            out.push(alone);
        }
    }
    out
}

fn output(args: &RunArgs, rows: &[Row]) -> anyhow::Result<()> {
    let json = report::json(rows)?;
    if !args.json {
        println!("{}", report::tables(rows));
    }
    match &args.out {
        Some(path) => {
            std::fs::write(path, format!("{json}\n"))
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("JSON report written to {}", path.display());
        }
        None => println!("{json}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_runs_first_and_once() {
        use Scenario::*;
        assert_eq!(
            ordered(&[Check, ReserveCommit, Ceiling, Check]),
            vec![Ceiling, Check, ReserveCommit]
        );
        assert_eq!(ordered(&[Check]), vec![Check]);
        assert_eq!(
            ordered(&[Propagation, HardReserve, Check, Ceiling]),
            vec![Ceiling, RedisScript, HardReserve, Check, Propagation]
        );
        assert_eq!(
            ordered(&[SoftReserve, Check, HardReserve]),
            vec![RedisScript, HardReserve, SoftReserve, Check]
        );
        assert_eq!(
            ordered(&[HardReserve, SoftReserve]),
            vec![RedisScript, HardReserve, SoftReserve]
        );
        assert_eq!(
            ordered(&[Ingest, Check, Propagation, Ingest]),
            vec![Check, Propagation, Ingest]
        );
        assert_eq!(
            ordered(&[Cluster, Record, Check, Ingest]),
            vec![Record, Check, Ingest, Cluster]
        );
        // Alone, soft-reserve brings nothing along (and has no ratio).
        assert_eq!(ordered(&[SoftReserve]), vec![SoftReserve]);
    }
}
