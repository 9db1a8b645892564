//! A whole bench run: start or reach the targets, prepare the node, run every cell, report.

use anyhow::{bail, Context as _};
use prost::Message as _;

use crate::cli::{RunArgs, Scenario};
use crate::node::{self, ServerProcess};
use crate::report::{self, Row, RunInfo};
use crate::scenario::{run_cell, CellSpec};
use crate::setup;

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

    let needs_node = scenarios.iter().any(|s| s.needs_node());
    let mut node: Option<ServerProcess> = None;
    let mut node_channels = Vec::new();
    let mut ceiling_response = node_response_default();
    let node_kind = match (&args.endpoint, needs_node) {
        (_, false) => "none",
        (Some(_), true) => "endpoint",
        (None, true) => "spawned",
    };
    if needs_node {
        let url = match &args.endpoint {
            Some(url) => {
                setup::ensure_loopback(url)?;
                url.clone()
            }
            None => {
                let bin = match &args.allot_bin {
                    Some(bin) => bin.clone(),
                    None => node::default_allot_bin()?,
                };
                let started = node::start_allot(&bin, &args.node_args).await?;
                eprintln!("node: started {} on {}", bin.display(), started.addr());
                let url = started.url();
                node = Some(started);
                url
            }
        };
        node_channels = setup::connect(&url, args.channels).await?;
        setup::prepare(
            node_channels[0].clone(),
            args.tenants,
            args.endpoint.is_none(),
        )
        .await
        .context("preparing the node")?;
        eprintln!(
            "node: catalog applied, {} tenants subscribed to plan `{}`",
            args.tenants,
            setup::PLAN
        );
        ceiling_response = setup::probe(node_channels[0].clone())
            .await?
            .encode_to_vec();
    }

    let mut noop: Option<ServerProcess> = None;
    let mut noop_channels = Vec::new();
    if scenarios.contains(&Scenario::Ceiling) {
        let started = node::start_noop(&ceiling_response).await?;
        eprintln!(
            "ceiling: no-op server on {} (request {} bytes, response {} bytes, as Check's)",
            started.addr(),
            setup::check_request(0).encoded_len(),
            ceiling_response.len()
        );
        noop_channels = setup::connect(&started.url(), args.channels).await?;
        noop = Some(started);
    }

    let info = RunInfo {
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        duration_s: args.duration.as_secs_f64(),
        warmup_s: args.warmup.as_secs_f64(),
        channels: args.channels,
        tenants: args.tenants,
        node: node_kind.to_owned(),
    };
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let mut rows = Vec::new();
    for &concurrency in &args.concurrency {
        let mut ceiling_ops = None;
        for &scenario in &scenarios {
            let spec = CellSpec {
                scenario,
                concurrency,
                warmup: args.warmup,
                duration: args.duration,
                tenants: args.tenants,
                run_id: run_id.clone(),
            };
            eprintln!(
                "running {} at concurrency {concurrency} ({:?} warmup + {:?})",
                scenario.name(),
                args.warmup,
                args.duration
            );
            let channels = if scenario == Scenario::Ceiling {
                &noop_channels
            } else {
                &node_channels
            };
            let cell = run_cell(&spec, channels).await?;
            for (kind, e) in &cell.error_kinds {
                eprintln!("  {} errors of kind {kind}, e.g.: {}", e.count, e.example);
            }
            for child in [node.as_mut(), noop.as_mut()].into_iter().flatten() {
                child.ensure_running()?;
            }
            if scenario == Scenario::Ceiling {
                ceiling_ops = Some(cell.ops_per_sec());
            }
            let row = Row::new(&cell, ceiling_ops, &info);
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

    for child in [node, noop].into_iter().flatten() {
        child.stop().await;
    }
    output(&args, &rows)
}

/// The scenarios once each, ceiling first (the others' ratio needs it), then as given.
fn ordered(given: &[Scenario]) -> Vec<Scenario> {
    let mut out = Vec::new();
    if given.contains(&Scenario::Ceiling) {
        out.push(Scenario::Ceiling);
    }
    for s in given {
        if !out.contains(s) {
            out.push(*s);
        }
    }
    out
}

fn node_response_default() -> Vec<u8> {
    crate::noop::typical_check_response().encode_to_vec()
}

fn output(args: &RunArgs, rows: &[Row]) -> anyhow::Result<()> {
    let json = report::json(rows)?;
    if !args.json {
        println!("{}", report::table(rows));
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
    }
}
