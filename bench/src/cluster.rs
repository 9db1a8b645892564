//! The `cluster` scenario: the whole topology under the bench's load.
//!
//! The bench brings the topology up with the repository's `deploy/up` (a 6-node Redis
//! Cluster, ClickHouse, three enforcers that gossip, two aggregators) in a temporary state
//! directory on a free block of ports, or takes the enforcers of a running one
//! (`--endpoints` and `--token`). It subscribes the bench tenants through the first
//! enforcer, proves every enforcer answers, then runs one cell per operation
//! (`--cluster-ops`) and concurrency, the workers spread evenly over the enforcers: worker
//! `w` talks to enforcer `w mod n` over one of that enforcer's `--channels` connections,
//! so each enforcer gets a third of the workers and of the tenants. The operations are the
//! single-node scenarios' own ([`crate::scenario`]); over the topology `reserve-commit`
//! takes hard limits, i.e. one Lua script per call in the Redis Cluster, and every commit
//! and record also writes a usage event that the aggregators carry into ClickHouse while
//! the load runs.
//!
//! A topology the bench brought up is torn down (`deploy/down --purge`) when the run
//! ends, fails, panics or is interrupted: [`Deployment`]'s `Drop` runs it.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use crate::cli::{RunArgs, Scenario};
use crate::node::{self, CATALOG_YAML};
use crate::report::{Row, RunInfo};
use crate::resources::{Meter, Usage};
use crate::scenario::{bearer, run_cell, CellSpec, Target};
use crate::setup;

/// Enforcers, Redis nodes and aggregators of `deploy/up` (`deploy/lib/common.sh`).
const ENFORCERS: u16 = 3;
const REDIS_NODES: u16 = 6;
const AGGREGATORS: u16 = 2;

/// Longest wait for `deploy/up` (it waits up to 90 s for health itself).
const UP_TIMEOUT: Duration = Duration::from_secs(180);

/// Checks the cluster options before anything starts.
pub fn check_args(args: &RunArgs) -> anyhow::Result<()> {
    if args.cluster_ops.is_empty() {
        bail!("--cluster-ops: give at least one operation");
    }
    if let Some(op) = args.cluster_ops.iter().find(|s| !s.is_cluster_op()) {
        bail!(
            "--cluster-ops: {} is not an operation (use check, check-feature, \
             reserve-commit, soft-reserve or record)",
            op.name()
        );
    }
    if !args.endpoints.is_empty() {
        for url in &args.endpoints {
            setup::ensure_loopback(url)?;
        }
        if args.token.as_deref().is_none_or(|t| t.trim().is_empty()) {
            bail!(
                "--endpoints needs --token (or ALLOT_TOKEN): a token with scope admin, \
                 e.g. secrets/admin.token of the topology's state directory"
            );
        }
    }
    Ok(())
}

/// Brings up (or reaches) the topology, runs every cell, and tears it down.
pub async fn run(args: &RunArgs, info: &RunInfo) -> anyhow::Result<Vec<Row>> {
    let mut deployment = None;
    let topology = if args.endpoints.is_empty() {
        let (d, t) = Deployment::up(args).await?;
        deployment = Some(d);
        t
    } else {
        Topology::external(args)?
    };
    let rows = run_on(args, info, &topology).await?;
    if let Some(d) = deployment {
        d.finish();
    }
    Ok(rows)
}

/// What the cells run against.
struct Topology {
    /// The enforcers' gRPC URLs.
    endpoints: Vec<String>,
    /// A token with scope `admin` (catalog, subscriptions).
    admin: MetadataValue<Ascii>,
    /// A token with scope `enforce` (the load).
    service: MetadataValue<Ascii>,
    /// The topology's processes by group, when the bench brought it up.
    pids: Vec<(&'static str, Option<u32>)>,
    /// `deploy` (brought up by the bench) or `endpoints`.
    kind: &'static str,
}

impl Topology {
    fn external(args: &RunArgs) -> anyhow::Result<Topology> {
        let admin = args.token.as_deref().unwrap_or_default();
        Ok(Topology {
            endpoints: args.endpoints.clone(),
            admin: bearer(admin)?,
            service: bearer(args.service_token.as_deref().unwrap_or(admin))?,
            pids: vec![("bench", Some(std::process::id()))],
            kind: "endpoints",
        })
    }

    /// Fails when a process of the topology has gone.
    fn ensure_running(&self) -> anyhow::Result<()> {
        for (name, pid) in &self.pids {
            if let Some(pid) = pid {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    bail!("a process of the topology ({name}, pid {pid}) exited during the run");
                }
            }
        }
        Ok(())
    }
}

async fn run_on(args: &RunArgs, info: &RunInfo, topology: &Topology) -> anyhow::Result<Vec<Row>> {
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let n = topology.endpoints.len();
    // Interleaved (e1, e2, e3, e1, e2, e3, …): worker w gets channel w mod len, which is
    // on enforcer w mod n.
    let mut per_endpoint = Vec::with_capacity(n);
    for url in &topology.endpoints {
        per_endpoint.push(setup::connect(url, args.channels).await?);
    }
    let channels: Vec<Channel> = (0..args.channels.max(1))
        .flat_map(|c| per_endpoint.iter().map(move |chs| chs[c].clone()))
        .collect();

    setup::prepare(
        per_endpoint[0][0].clone(),
        args.tenants,
        topology.kind == "deploy",
        Some(&topology.admin),
    )
    .await
    .context("preparing the topology through the first enforcer")?;
    eprintln!(
        "cluster: catalog applied, {} tenants subscribed to plan `{}` through {}",
        args.tenants,
        setup::PLAN,
        topology.endpoints[0]
    );
    for (url, chs) in topology.endpoints.iter().zip(&per_endpoint) {
        setup::probe(chs[0].clone(), Some(&topology.service))
            .await
            .with_context(|| format!("probe Check on {url}"))?;
    }
    probe_reserves(args, topology, &per_endpoint, &run_id).await?;
    eprintln!("cluster: every enforcer allowed the probe Check");

    let mut info = info.clone();
    info.node = topology.kind.to_owned();
    let meter = Meter::new(topology.pids.clone(), None);
    let mut rows = Vec::new();
    for &concurrency in &args.concurrency {
        for &op in &args.cluster_ops {
            let spec = CellSpec {
                scenario: op,
                concurrency,
                warmup: args.warmup,
                duration: args.duration,
                tenants: args.tenants,
                run_id: format!("{run_id}-cl"),
                bearer: Some(topology.service.clone()),
            };
            eprintln!(
                "running cluster {} at concurrency {concurrency} over {n} enforcers \
                 ({:?} warmup + {:?})",
                op.name(),
                args.warmup,
                args.duration
            );
            let begin = Instant::now();
            let measure_from = begin + args.warmup;
            let deadline = measure_from + args.duration;
            let window = async {
                tokio::time::sleep_until(measure_from.into()).await;
                let first = meter.sample().await;
                tokio::time::sleep_until(deadline.into()).await;
                first.until(&meter.sample().await)
            };
            let (cell, Usage { cpu_cores, .. }) =
                tokio::join!(run_cell(&spec, Target::Grpc(&channels)), window);
            let cell = cell.with_context(|| format!("cluster {} at {concurrency}", op.name()))?;
            for (kind, e) in &cell.error_kinds {
                eprintln!("  {} errors of kind {kind}, e.g.: {}", e.count, e.example);
            }
            topology.ensure_running()?;
            let mut row = Row::new(&cell, None, &info);
            row.scenario = Scenario::Cluster.name().to_owned();
            row.operation = Some(op.name().to_owned());
            row.enforcers = Some(n);
            eprintln!(
                "  {:.0} ops/s, p50 {:.0} µs, p99 {:.0} µs, {} errors; CPU cores: {}",
                row.ops_per_sec,
                row.p50_us.unwrap_or(f64::NAN),
                row.p99_us.unwrap_or(f64::NAN),
                row.errors,
                cpu_cores
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            row.cluster_cpu_cores = Some(cpu_cores);
            rows.push(row);
        }
    }
    Ok(rows)
}

/// Proves the write paths before measuring: a hard Reserve + Commit goes to Redis, a
/// soft-only one stays in the enforcer's local store (each only if that operation runs).
async fn probe_reserves(
    args: &RunArgs,
    topology: &Topology,
    per_endpoint: &[Vec<Channel>],
    run_id: &str,
) -> anyhow::Result<()> {
    let service = Some(&topology.service);
    for (i, chs) in per_endpoint.iter().enumerate() {
        if args.cluster_ops.contains(&Scenario::ReserveCommit) {
            let key = format!("bench-{run_id}-probe-{i}");
            let id = setup::probe_reserve(chs[0].clone(), setup::METRIC, &key, service).await?;
            anyhow::ensure!(
                !setup::is_local_reservation(&id),
                "enforcer {} kept the probe Reserve of {} (hard limits) in its local store \
                 ({id}), not in Redis",
                topology.endpoints[i],
                setup::METRIC
            );
        }
        if args.cluster_ops.contains(&Scenario::SoftReserve) {
            let key = format!("bench-{run_id}-soft-probe-{i}");
            let id =
                setup::probe_reserve(chs[0].clone(), setup::SOFT_METRIC, &key, service).await?;
            anyhow::ensure!(
                setup::is_local_reservation(&id),
                "enforcer {} sent the probe Reserve of {} (soft limits only) to Redis ({id})",
                topology.endpoints[i],
                setup::SOFT_METRIC
            );
        }
    }
    Ok(())
}

/// A topology brought up by `deploy/up` in a temporary directory. Dropping it runs
/// `deploy/down --purge` (or, after a failure with `--keep-failed`, `deploy/down` and
/// keeps the directory), then removes the directory.
struct Deployment {
    deploy: PathBuf,
    state: PathBuf,
    dir: Option<tempfile::TempDir>,
    ok: bool,
    keep_failed: bool,
}

impl Deployment {
    /// Runs `deploy/up` on a free block of ports with the bench catalog, and reads the
    /// tokens, ports and pids it left in its state directory.
    async fn up(args: &RunArgs) -> anyhow::Result<(Deployment, Topology)> {
        let deploy = match &args.deploy {
            Some(d) => d.clone(),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy"),
        };
        let deploy = deploy
            .canonicalize()
            .with_context(|| format!("the deploy directory {}", deploy.display()))?;
        for script in ["up", "down"] {
            anyhow::ensure!(
                deploy.join(script).is_file(),
                "{} has no `{script}` script (--deploy DIR)",
                deploy.display()
            );
        }
        let bin = node::allot_bin(args.allot_bin.as_deref())?;
        let bin = bin.canonicalize().with_context(|| {
            format!(
                "the allot binary {}: build it with `cargo build --release --bin allot`",
                bin.display()
            )
        })?;
        let base = free_base_port()?;
        let dir = tempfile::Builder::new()
            .prefix("allot-bench-cluster-")
            .tempdir()
            .context("creating a temporary directory for the topology")?;
        let state = dir.path().join("deploy");
        // From here on, dropping `deployment` tears down whatever `up` started.
        let deployment = Deployment {
            deploy: deploy.clone(),
            state: state.clone(),
            dir: Some(dir),
            ok: false,
            keep_failed: args.keep_failed,
        };
        let root = deployment.dir.as_ref().map(|d| d.path().to_owned());
        let root = root.context("temporary directory")?;
        let catalog = root.join("catalog.yaml");
        std::fs::write(&catalog, CATALOG_YAML)?;
        let log = root.join("up.log");
        eprintln!(
            "cluster: deploy/up with {} on ports {}–{} (and {}–{}), state {} (log {})",
            bin.display(),
            base + 11,
            base + 56,
            base + 10051,
            base + 10056,
            state.display(),
            log.display()
        );
        let started = Instant::now();
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let mut cmd = tokio::process::Command::new(deploy.join("up"));
        cmd.env("ALLOT_DEPLOY_DIR", &state)
            .env("ALLOT_DEPLOY_BASE_PORT", base.to_string())
            .env("ALLOT_BIN", &bin)
            .env("ALLOT_DEPLOY_CATALOG", &catalog)
            .env("ALLOT_SERVE_ARGS", args.node_args.join(" "))
            .env("ALLOT_AGGREGATE_ARGS", args.aggregator_args.join(" "))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("running deploy/up")?;
        let status = match tokio::time::timeout(UP_TIMEOUT, child.wait()).await {
            Ok(status) => status?,
            Err(_) => bail!(
                "deploy/up did not finish within {}s{}",
                UP_TIMEOUT.as_secs(),
                node::log_tail(Some(&log))
            ),
        };
        if !status.success() {
            bail!("deploy/up failed ({status}){}", node::log_tail(Some(&log)));
        }
        eprintln!(
            "cluster: up in {:.1}s: Redis Cluster ({REDIS_NODES} nodes), ClickHouse, \
             {ENFORCERS} enforcers, {AGGREGATORS} aggregators",
            started.elapsed().as_secs_f64()
        );
        let topology = deployment.topology(base)?;
        Ok((deployment, topology))
    }

    fn topology(&self, base: u16) -> anyhow::Result<Topology> {
        let secret = |name: &str| -> anyhow::Result<MetadataValue<Ascii>> {
            let path = self.state.join("secrets").join(format!("{name}.token"));
            let token = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            bearer(&token)
        };
        let pid = |dir: PathBuf| -> Option<u32> {
            std::fs::read_to_string(dir.join("pid"))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        let mut pids = vec![("bench", Some(std::process::id()))];
        for n in 1..=ENFORCERS {
            pids.push(("enforcers", pid(self.state.join(format!("enforcer-{n}")))));
        }
        for n in 1..=REDIS_NODES {
            let port = base + 50 + n;
            pids.push(("redis", pid(self.state.join(format!("redis/{port}")))));
        }
        pids.push(("clickhouse", pid(self.state.join("clickhouse"))));
        for n in 1..=AGGREGATORS {
            pids.push((
                "aggregators",
                pid(self.state.join(format!("aggregator-{n}"))),
            ));
        }
        if let Some((name, _)) = pids.iter().find(|(_, p)| p.is_none()) {
            bail!(
                "deploy/up left no pid file for a process of group {name} under {}",
                self.state.display()
            );
        }
        Ok(Topology {
            endpoints: (1..=ENFORCERS)
                .map(|n| format!("http://127.0.0.1:{}", base + 10 + n))
                .collect(),
            admin: secret("admin")?,
            service: secret("service")?,
            pids,
            kind: "deploy",
        })
    }

    /// The run went well: tear down and purge.
    fn finish(mut self) {
        self.ok = true;
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let purge = self.ok || !self.keep_failed;
        let started = Instant::now();
        let mut cmd = std::process::Command::new(self.deploy.join("down"));
        if purge {
            cmd.arg("--purge");
        }
        let status = cmd
            .env("ALLOT_DEPLOY_DIR", &self.state)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => eprintln!(
                "cluster: deploy/down{} in {:.1}s",
                if purge { " --purge" } else { "" },
                started.elapsed().as_secs_f64()
            ),
            Ok(s) => eprintln!(
                "cluster: deploy/down failed ({s}); state in {}",
                self.state.display()
            ),
            Err(e) => eprintln!("cluster: could not run deploy/down: {e}"),
        }
        if let Some(dir) = self.dir.take() {
            if purge {
                drop(dir);
            } else {
                eprintln!(
                    "cluster: kept the topology's files in {}",
                    dir.keep().display()
                );
            }
        }
    }
}

/// A base port for `deploy/up` whose whole block (base + 10 … base + 60, and the Redis
/// cluster bus at + 10000) is free, below the kernel's ephemeral range (as `deploy/smoke`
/// picks it), so that no outgoing connection takes one of its ports meanwhile.
fn free_base_port() -> anyhow::Result<u16> {
    let start = (std::process::id() % 120) as u16;
    for i in 0..120u16 {
        let base = 10_000 + ((start + i) % 120) * 100;
        let offsets = (10..=60).chain(10_050..=10_060);
        if offsets.into_iter().all(|off| port_free(base + off)) {
            return Ok(base);
        }
    }
    bail!("no free block of ports between 10000 and 22000 for deploy/up")
}

fn port_free(port: u16) -> bool {
    TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn base_port_in_range() {
        let base = free_base_port().unwrap();
        assert!((10_000..22_000).contains(&base) && base.is_multiple_of(100));
    }

    #[test]
    fn checks_options() {
        let parse = |argv: &[&str]| crate::cli::Cli::try_parse_from(argv).unwrap().run;
        assert!(check_args(&parse(&["bench", "--scenario", "cluster"])).is_ok());
        let bad = parse(&["bench", "--scenario", "cluster", "--cluster-ops", "ceiling"]);
        assert!(check_args(&bad).is_err());
        let mut no_token = parse(&[
            "bench",
            "--scenario",
            "cluster",
            "--endpoints",
            "http://127.0.0.1:7411",
        ]);
        no_token.token = None;
        assert!(check_args(&no_token).is_err());
        let far = parse(&[
            "bench",
            "--scenario",
            "cluster",
            "--endpoints",
            "http://10.0.0.1:7411",
            "--token",
            "t",
        ]);
        assert!(check_args(&far).is_err());
    }
}
