//! Command-line interface: the bench options and the hidden `noop-server` subcommand.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// Drives an Allot node over gRPC on loopback and reports throughput and latency
/// percentiles, next to a no-op gRPC ceiling measured in the same run.
#[derive(Debug, Parser)]
#[command(name = "bench", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// Internal subcommands (the bench re-executes itself to run the ceiling server).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options of a bench run.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Internal subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the no-op Echo service until killed; prints `listening on ADDR` on stdout.
    #[command(hide = true)]
    NoopServer(NoopServerArgs),
}

/// Options of the hidden `noop-server` subcommand.
#[derive(Debug, clap::Args)]
pub struct NoopServerArgs {
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,
    /// The canned response, as hex of an encoded allot.v1.CheckResponse (same wire
    /// format as EchoResponse); default: a typical allowed metric check.
    #[arg(long)]
    pub response_hex: Option<String>,
}

/// Options of a bench run.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Scenarios to run, comma-separated. `ceiling` (and `redis-script`, which
    /// `hard-reserve` brings along) run first at each concurrency so the others can be
    /// compared with them, and `hard-reserve` runs before `soft-reserve`. `hard-reserve`,
    /// `soft-reserve` and `propagation` start their own redis-server; `ingest` starts its
    /// own redis-server, clickhouse-server, node and aggregator.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "check,reserve-commit,ceiling"
    )]
    pub scenario: Vec<Scenario>,
    /// Requests in flight (one worker each), comma-separated; one cell per value.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub concurrency: Vec<usize>,
    /// Measured time per (scenario, concurrency) cell: 5s, 500ms, 1m, or plain seconds.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Unmeasured time before each cell's measurement, same format as --duration.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// gRPC channels (HTTP/2 connections) per target; workers share them round-robin.
    #[arg(long, default_value_t = 4)]
    pub channels: usize,
    /// Tenants `bench-0` … `bench-{N-1}` subscribed before measuring; workers take them
    /// round-robin.
    #[arg(long, default_value_t = 64)]
    pub tenants: usize,
    /// Use a running node at this loopback URL (e.g. http://127.0.0.1:50051) instead of
    /// starting one.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// The `allot` binary to start; default: `allot` next to the bench executable.
    #[arg(long, env = "ALLOT_BIN")]
    pub allot_bin: Option<PathBuf>,
    /// Extra argument for `allot serve` (repeatable), appended after the bench's own.
    #[arg(long = "node-arg", allow_hyphen_values = true)]
    pub node_args: Vec<String>,
    /// The `redis-server` binary that hard-reserve, soft-reserve, redis-script and
    /// propagation start.
    #[arg(long, env = "REDIS_SERVER", default_value = "redis-server")]
    pub redis_server: PathBuf,
    /// Plan changes the propagation scenario makes and times.
    #[arg(long, default_value_t = 200)]
    pub changes: usize,
    /// ingest: target Records per second of each cell (all workers together),
    /// comma-separated; one cell per rate and concurrency. Default: as fast as the workers
    /// go.
    #[arg(long, value_delimiter = ',')]
    pub rate: Vec<u32>,
    /// ingest: how often the rollup is read to see which events arrived (the resolution of
    /// the lag), same format as --duration.
    #[arg(long, default_value = "25ms", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// ingest: longest wait, after a cell's load stops, for its events to show in the
    /// rollup; what is still missing then is reported as `unseen`.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// The `clickhouse-server` binary that ingest starts (Debian's 18.16 works).
    #[arg(long, env = "CLICKHOUSE_SERVER", default_value = "clickhouse-server")]
    pub clickhouse_server: PathBuf,
    /// Extra argument for `allot aggregate` (ingest; repeatable), e.g.
    /// `--aggregator-arg=--batch-interval=250ms`.
    #[arg(long = "aggregator-arg", allow_hyphen_values = true)]
    pub aggregator_args: Vec<String>,
    /// cluster: the operations to drive through the three enforcers, comma-separated; one
    /// cell per operation and concurrency (`check`, `check-feature`, `reserve-commit`,
    /// `soft-reserve`, `record`).
    #[arg(
        long = "cluster-ops",
        value_delimiter = ',',
        default_value = "check,reserve-commit,record"
    )]
    pub cluster_ops: Vec<Scenario>,
    /// cluster: the enforcers of a topology that is already running (loopback gRPC URLs,
    /// comma-separated) instead of bringing one up with `deploy/up`.
    #[arg(long, value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// cluster with --endpoints: a token with scope `admin` (`secrets/admin.token` of
    /// `deploy/up`), used to add the bench catalog and subscribe the tenants, and for the
    /// load unless --service-token is given.
    #[arg(long, env = "ALLOT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// cluster with --endpoints: a token with scope `enforce` for the load
    /// (`secrets/service.token`); default: --token.
    #[arg(long, hide_env_values = true)]
    pub service_token: Option<String>,
    /// cluster: the directory holding `up` and `down` (default: this repository's
    /// `deploy/`).
    #[arg(long)]
    pub deploy: Option<PathBuf>,
    /// cluster: keep the topology's state directory (logs, data) when the run fails,
    /// instead of `deploy/down --purge` (the processes are stopped either way).
    #[arg(long)]
    pub keep_failed: bool,
    /// Print only JSON on stdout (no table).
    #[arg(long)]
    pub json: bool,
    /// Write the JSON report to this file instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// What one cell measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
pub enum Scenario {
    /// A no-op gRPC service with Check-sized messages, in its own process.
    Ceiling,
    /// Enforcer.Check of 1 unit of `api_calls`.
    Check,
    /// Enforcer.Check of the boolean feature `reports`.
    CheckFeature,
    /// Enforcer.Reserve of 1 unit then Enforcer.Commit of 1; one sample per pair.
    ReserveCommit,
    /// reserve-commit against a node whose store is a Redis the bench starts.
    HardReserve,
    /// hard-reserve's ceiling: the node's reserve.lua then settle.lua, sent straight to
    /// that Redis with one fred client.
    RedisScript,
    /// hard-reserve's pairs on the same node, on a metric whose limits are all soft: the
    /// node keeps them in its local store and never calls Redis for them.
    SoftReserve,
    /// How long an Admin plan change on one node takes to show on two others that share
    /// its Redis (not run per concurrency).
    Propagation,
    /// Records into a node on Redis, moved by `allot aggregate` into ClickHouse: events
    /// per second into ClickHouse and the lag from acknowledgement to the rollup.
    Ingest,
    /// Enforcer.Record of 1 unit of `api_calls`, a new event id each.
    Record,
    /// The whole topology of `deploy/up` (Redis Cluster, ClickHouse, three enforcers, two
    /// aggregators), or a running one (`--endpoints`): the `--cluster-ops` operations
    /// spread over the three enforcers.
    Cluster,
}

impl Scenario {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Ceiling => "ceiling",
            Scenario::Check => "check",
            Scenario::CheckFeature => "check-feature",
            Scenario::ReserveCommit => "reserve-commit",
            Scenario::HardReserve => "hard-reserve",
            Scenario::RedisScript => "redis-script",
            Scenario::SoftReserve => "soft-reserve",
            Scenario::Propagation => "propagation",
            Scenario::Ingest => "ingest",
            Scenario::Record => "record",
            Scenario::Cluster => "cluster",
        }
    }

    /// Calls (gRPC, or Redis scripts for redis-script) made per measured operation.
    pub fn rpcs_per_op(self) -> u32 {
        match self {
            Scenario::ReserveCommit
            | Scenario::HardReserve
            | Scenario::RedisScript
            | Scenario::SoftReserve => 2,
            _ => 1,
        }
    }

    /// Whether the scenario talks to a node over the embedded store (or `--endpoint`).
    pub fn needs_node(self) -> bool {
        matches!(
            self,
            Scenario::Check | Scenario::CheckFeature | Scenario::ReserveCommit | Scenario::Record
        )
    }

    /// Whether the scenario can be one of the cluster's operations (`--cluster-ops`).
    pub fn is_cluster_op(self) -> bool {
        matches!(
            self,
            Scenario::Check
                | Scenario::CheckFeature
                | Scenario::ReserveCommit
                | Scenario::SoftReserve
                | Scenario::Record
        )
    }

    /// Whether the scenario runs on its own servers, after the other cells (propagation and
    /// ingest start their own redis-server and nodes).
    pub fn runs_alone(self) -> bool {
        matches!(
            self,
            Scenario::Propagation | Scenario::Ingest | Scenario::Cluster
        )
    }

    /// Whether the scenario needs the bench's Redis and the node that uses it.
    pub fn needs_redis_node(self) -> bool {
        matches!(
            self,
            Scenario::HardReserve | Scenario::RedisScript | Scenario::SoftReserve
        )
    }

    /// The scenario whose ops/s this one's is divided by in the ratio column: the
    /// ceiling, redis-script for hard-reserve, and hard-reserve for soft-reserve (soft
    /// over hard on the same node; not a ceiling, it may exceed 1).
    pub fn ratio_basis(self) -> Option<Scenario> {
        match self {
            Scenario::Check
            | Scenario::CheckFeature
            | Scenario::ReserveCommit
            | Scenario::Record => Some(Scenario::Ceiling),
            Scenario::HardReserve => Some(Scenario::RedisScript),
            Scenario::SoftReserve => Some(Scenario::HardReserve),
            Scenario::Ceiling
            | Scenario::RedisScript
            | Scenario::Propagation
            | Scenario::Ingest
            | Scenario::Cluster => None,
        }
    }
}

/// Parses `5s`, `500ms`, `2m`, `1.5s` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with a unit (ms, s, m)"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        other => return Err(format!("{s:?}: unknown unit {other:?} (use ms, s or m)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?}: must be a non-negative duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_reserve_traits() {
        let s = Scenario::SoftReserve;
        assert_eq!(s.name(), "soft-reserve");
        assert_eq!(
            Scenario::from_str("soft-reserve", false),
            Ok(Scenario::SoftReserve)
        );
        assert_eq!(s.rpcs_per_op(), 2);
        assert!(s.needs_redis_node() && !s.needs_node());
        assert_eq!(s.ratio_basis(), Some(Scenario::HardReserve));
        // Every value's command-line name is the name the reports use.
        for v in Scenario::value_variants() {
            let name = v.to_possible_value().unwrap().get_name().to_owned();
            assert_eq!(name, v.name());
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["bench", "--scenario", "ceiling,check", "--json"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.scenario, vec![Scenario::Ceiling, Scenario::Check]);
        assert_eq!(cli.run.concurrency, vec![1, 16, 64]);
        assert_eq!(cli.run.changes, 200);
        let cli = Cli::try_parse_from(["bench"]).unwrap();
        assert_eq!(
            cli.run.scenario,
            vec![Scenario::Check, Scenario::ReserveCommit, Scenario::Ceiling]
        );
        let cli = Cli::try_parse_from(["bench", "--scenario", "hard-reserve,propagation"]).unwrap();
        assert_eq!(
            cli.run.scenario,
            vec![Scenario::HardReserve, Scenario::Propagation]
        );
        let cli =
            Cli::try_parse_from(["bench", "--scenario", "soft-reserve,hard-reserve"]).unwrap();
        assert_eq!(
            cli.run.scenario,
            vec![Scenario::SoftReserve, Scenario::HardReserve]
        );
        let cli = Cli::try_parse_from([
            "bench",
            "--scenario",
            "ingest",
            "--rate",
            "2000,5000",
            "--aggregator-arg=--batch-interval=250ms",
            "--poll-interval",
            "50ms",
        ])
        .unwrap();
        assert_eq!(cli.run.scenario, vec![Scenario::Ingest]);
        assert_eq!(cli.run.rate, vec![2000, 5000]);
        assert_eq!(cli.run.aggregator_args, vec!["--batch-interval=250ms"]);
        assert_eq!(cli.run.poll_interval, Duration::from_millis(50));
        assert_eq!(cli.run.drain_timeout, Duration::from_secs(30));
        assert!(Scenario::Ingest.runs_alone() && !Scenario::Ingest.needs_redis_node());
        let cli = Cli::try_parse_from([
            "bench",
            "--scenario",
            "cluster",
            "--endpoints",
            "http://127.0.0.1:7411,http://127.0.0.1:7412,http://127.0.0.1:7413",
            "--token",
            "al_x",
        ])
        .unwrap();
        assert_eq!(cli.run.scenario, vec![Scenario::Cluster]);
        assert_eq!(cli.run.endpoints.len(), 3);
        assert_eq!(
            cli.run.cluster_ops,
            vec![Scenario::Check, Scenario::ReserveCommit, Scenario::Record]
        );
        assert!(Scenario::Cluster.runs_alone() && Scenario::Record.needs_node());
        let cli = Cli::try_parse_from(["bench", "noop-server", "--listen", "127.0.0.1:0"]).unwrap();
        assert!(matches!(cli.command, Some(Command::NoopServer(_))));
    }
}
