//! The ingest scenario: how many usage events per second reach ClickHouse, and how long
//! an acknowledged event takes to show in the rollup.
//!
//! The bench starts a redis-server, a clickhouse-server, one node on that Redis and one
//! `allot aggregate` between the two (from the same `allot` binary), then, per
//! concurrency and `--rate`, drives `Enforcer.Record` (1 unit of `api_calls`, a new event
//! id each) for a warmup and a measured duration. The node writes each event into its
//! tenant's partition stream in the same script as the count; the aggregator moves the
//! streams into `usage_events`, whose materialized views feed the rollups.
//!
//! Meanwhile the monthly rollup is read every `--poll-interval` (`sum(events)` per tenant,
//! as the rollups must be read) and [`LagBook`] turns the counts into one lag per event,
//! from its acknowledgement to the first read that shows it. That needs each tenant's
//! events to reach its stream in the order they were acknowledged: each worker owns its
//! tenants (tenant `t` belongs to worker `t mod concurrency`) and keeps one Record in
//! flight, so no tenant ever has two. A failed Record is retried with the same event id
//! (Record is idempotent by it), so a failure that was written after all counts once.
//! After the load stops the reads go on until every acknowledged event shows, or
//! `--drain-timeout`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use allot_proto::v1::enforcer_client::EnforcerClient;
use allot_proto::v1::RecordRequest;
use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use crate::cli::{RunArgs, Scenario};
use crate::lag::LagBook;
use crate::node::{self, log_tail, ServerProcess};
use crate::report::{Row, RunInfo};
use crate::resources::{self, Meter, Sample, Usage};
use crate::scenario::{allowed, ErrorKind, Failure, MAX_NANOS};
use crate::setup::{self, tenant, METRIC};

/// The ClickHouse database the bench tells the aggregator to use, and reads.
const DATABASE: &str = "allot";
/// The aggregator's id in its leases.
const AGGREGATOR_ID: &str = "bench-ingest";
/// Longest wait for the aggregator to migrate the schema and take every partition.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Reads of the rollup may fail for this long in a row before the run gives up.
const POLL_FAILURE_LIMIT: Duration = Duration::from_secs(10);
/// Longest wait for one Record's answer (the node bounds its own wait for Redis far
/// below this; this only keeps a hung node from holding the run).
const RECORD_TIMEOUT: Duration = Duration::from_secs(10);
/// Highest lag the histograms keep: an hour, in nanoseconds (a backlog can grow).
const MAX_LAG_NANOS: u64 = 3_600_000_000_000;

/// The ingest scenario's own figures, beside a row's usual ones (whose percentiles are
/// the lag's and whose ops/s is the acknowledged Records').
#[derive(Debug, Clone, Serialize)]
pub struct IngestFigures {
    /// Records per second asked for (`--rate`); none: as fast as the workers go.
    pub target_rate: Option<f64>,
    /// Records acknowledged within the measured window.
    pub acked: u64,
    /// Events per second that became visible in the rollup over the measured window.
    pub visible_per_sec: f64,
    /// Events acknowledged but not visible yet at the start of the measured window.
    pub backlog_start: u64,
    /// The same at its end. `visible_per_sec` is the acknowledged rate plus the backlog's
    /// shrinking over the window: the two rates differ when the backlog changed.
    pub backlog: u64,
    /// Events of the window still not visible when the drain ended (0: all arrived).
    pub unseen: u64,
    /// Events the rollup counted beyond those acknowledged once drained (should be 0).
    pub surplus: u64,
    /// From the end of the load to the read that showed the last event of the window,
    /// milliseconds (none when some never showed).
    pub drain_ms: Option<f64>,
    /// Record latency (to acknowledgement), median, microseconds.
    pub record_p50_us: Option<f64>,
    /// Record latency, 99th percentile, microseconds.
    pub record_p99_us: Option<f64>,
    /// Interval between reads of the rollup, microseconds.
    pub poll_interval_us: f64,
    /// Median time of one read of the rollup, microseconds. A lag is too long by at most
    /// the interval plus a read.
    pub poll_p50_us: Option<f64>,
    /// Partition streams the tenants fall in (of 64).
    pub partitions: usize,
    /// INSERT queries ClickHouse ran per second in the measured window (the aggregator's
    /// batches: one per partition per batch, at most).
    pub inserts_per_sec: Option<f64>,
    /// Rows per INSERT in the window, on average.
    pub rows_per_insert: Option<f64>,
    /// Rows ClickHouse's background merges rewrote per row inserted in the window (every
    /// table: the events and the rollups): the cost of many small parts.
    pub merged_per_inserted: Option<f64>,
    /// CPU used during the measured window by each process (`bench`, `node`, `redis`,
    /// `clickhouse`, `aggregator`) and by the whole machine (`machine`: what is not
    /// theirs is other work), in cores (CPU seconds per second); empty where `/proc`
    /// cannot tell.
    pub cpu_cores: BTreeMap<String, f64>,
}

/// Checks the options ingest needs before anything starts.
pub fn check_args(args: &RunArgs) -> anyhow::Result<()> {
    let most = args.concurrency.iter().copied().max().unwrap_or(1);
    if args.tenants < most {
        bail!(
            "ingest needs --tenants ({}) at least the highest --concurrency ({most}): a \
             tenant may have one Record in flight at most, so that its events reach the \
             stream in the order they are acknowledged",
            args.tenants
        );
    }
    if args.rate.contains(&0) {
        bail!("--rate: each rate must be at least 1 Record per second");
    }
    if args.poll_interval.is_zero() || args.drain_timeout.is_zero() {
        bail!("--poll-interval and --drain-timeout must be more than 0");
    }
    Ok(())
}

/// Starts the servers, runs every (concurrency, rate) cell, and returns one row per cell.
pub async fn run(args: &RunArgs, info: &RunInfo) -> anyhow::Result<Vec<Row>> {
    let mut servers = Servers::start(args).await?;
    let result = measure(args, info, &mut servers).await;
    servers.stop().await;
    result
}

/// The ingest pipeline's processes; dropping it kills them all.
struct Servers {
    /// Declared first: killed before what it reads and writes.
    aggregator: Aggregator,
    node: ServerProcess,
    redis: ServerProcess,
    clickhouse: ServerProcess,
    clickhouse_version: String,
}

impl Servers {
    async fn start(args: &RunArgs) -> anyhow::Result<Servers> {
        let redis = crate::redis::start_server(&args.redis_server).await?;
        let redis_url = crate::redis::url(&redis);
        eprintln!("ingest: redis-server on {}", redis.addr());
        let clickhouse = crate::clickhouse::start_server(&args.clickhouse_server).await?;
        let clickhouse_version = crate::clickhouse::version(clickhouse.addr()).await?;
        eprintln!(
            "ingest: clickhouse-server {clickhouse_version} on {}",
            clickhouse.addr()
        );
        let bin = node::allot_bin(args.allot_bin.as_deref())?;
        let mut node_args = vec!["--redis".to_owned(), redis_url.clone()];
        node_args.extend(args.node_args.iter().cloned());
        let node = node::start_allot(&bin, "allot node on Redis", &node_args).await?;
        eprintln!("ingest: node on {}", node.addr());
        let aggregator = Aggregator::start(&bin, &clickhouse, &redis_url, args).await?;
        Ok(Servers {
            aggregator,
            node,
            redis,
            clickhouse,
            clickhouse_version,
        })
    }

    fn ensure_running(&mut self) -> anyhow::Result<()> {
        self.aggregator.ensure_running()?;
        for child in [&mut self.node, &mut self.redis, &mut self.clickhouse] {
            child.ensure_running()?;
        }
        Ok(())
    }

    /// The processes whose CPU time the report gives, by name (the bench itself included).
    fn pids(&self) -> Vec<(&'static str, Option<u32>)> {
        vec![
            ("bench", Some(std::process::id())),
            ("node", self.node.pid()),
            ("redis", self.redis.pid()),
            ("clickhouse", self.clickhouse.pid()),
            ("aggregator", self.aggregator.child.id()),
        ]
    }

    /// Kills every child, the aggregator and the node before the servers they use.
    async fn stop(self) {
        self.aggregator.stop().await;
        self.node.stop().await;
        self.redis.stop().await;
        self.clickhouse.stop().await;
    }
}

/// `allot aggregate`, a child of the bench; its stderr goes to a log file.
struct Aggregator {
    child: Child,
    log: PathBuf,
    /// How much of the log [`Aggregator::new_complaints`] has read.
    log_read: usize,
    _dir: tempfile::TempDir,
}

impl Aggregator {
    async fn start(
        bin: &std::path::Path,
        clickhouse: &ServerProcess,
        redis_url: &str,
        args: &RunArgs,
    ) -> anyhow::Result<Aggregator> {
        let dir = tempfile::Builder::new()
            .prefix("allot-bench-aggregator-")
            .tempdir()
            .context("creating a temporary directory for the aggregator's log")?;
        let log = dir.path().join("aggregator.log");
        let mut cmd = Command::new(bin);
        cmd.arg("aggregate")
            .arg("--clickhouse")
            .arg(format!("http://{}", clickhouse.addr()))
            .arg("--database")
            .arg(DATABASE)
            .arg("--redis")
            .arg(redis_url)
            .arg("--id")
            .arg(AGGREGATOR_ID)
            .args(&args.aggregator_args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} aggregate", bin.display()))?;
        let extra: String = args
            .aggregator_args
            .iter()
            .map(|a| format!(" {a}"))
            .collect();
        eprintln!(
            "ingest: {} aggregate --redis {redis_url}{extra}, log {}",
            bin.display(),
            log.display()
        );
        Ok(Aggregator {
            child,
            log,
            log_read: 0,
            _dir: dir,
        })
    }

    /// Warnings and errors the aggregator logged since the last call: how many, and the
    /// first one.
    fn new_complaints(&mut self) -> (usize, Option<String>) {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let fresh = text.get(self.log_read..).unwrap_or_default();
        self.log_read = text.len();
        let mut lines = fresh
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "));
        let first = lines.next().map(str::to_owned);
        (first.iter().count() + lines.count(), first)
    }

    fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the aggregator exited ({status}){}",
                log_tail(Some(&self.log))
            );
        }
        Ok(())
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Waits until the aggregator has migrated the schema (the rollup can be read) and holds
/// a lease on every partition.
async fn wait_ready(servers: &mut Servers, redis_url: &str) -> anyhow::Result<()> {
    use fred::prelude::*;
    let client = Builder::from_config(Config::from_url(redis_url)?).build()?;
    client
        .init()
        .await
        .context("connecting to the bench's Redis")?;
    let leases: Vec<String> = (0..meter::event::PARTITIONS)
        .map(aggregator::source::redis::lease_key)
        .collect();
    let begin = Instant::now();
    let mut readable = false;
    loop {
        servers.ensure_running()?;
        if !readable {
            readable = read_rollup(servers.clickhouse.addr(), usize::MAX)
                .await
                .is_ok();
        }
        let mut held = 0;
        for key in &leases {
            let n: i64 = client.exists(key).await?;
            held += n;
        }
        if readable && held == leases.len() as i64 {
            client.quit().await.ok();
            return Ok(());
        }
        if begin.elapsed() > READY_TIMEOUT {
            bail!(
                "the aggregator was not ready within {}s (rollup readable: {readable}, \
                 partitions held: {held} of {}){}",
                READY_TIMEOUT.as_secs(),
                leases.len(),
                log_tail(Some(&servers.aggregator.log))
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The monthly rollup's event count per bench tenant (`bench-N`, N below `tenants`),
/// every month of the metric summed.
async fn read_rollup(addr: SocketAddr, tenants: usize) -> anyhow::Result<Vec<(usize, u64)>> {
    let sql = format!(
        "SELECT tenant, sum(events) FROM {DATABASE}.usage_monthly WHERE metric = '{METRIC}' \
         GROUP BY tenant FORMAT TabSeparated"
    );
    let text = crate::clickhouse::query(addr, &sql).await?;
    parse_counts(&text, tenants)
}

/// `tenant \t count` lines; tenants that are not `bench-N` with N below `tenants` are
/// left out.
fn parse_counts(text: &str, tenants: usize) -> anyhow::Result<Vec<(usize, u64)>> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let (name, count) = line
            .split_once('\t')
            .with_context(|| format!("a rollup line without a tab: {line:?}"))?;
        let count: u64 = count
            .trim()
            .parse()
            .with_context(|| format!("a rollup line with a bad count: {line:?}"))?;
        let index = name
            .strip_prefix("bench-")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|i| *i < tenants);
        if let Some(i) = index {
            out.push((i, count));
        }
    }
    Ok(out)
}

/// What every cell shares.
struct Ctx<'a> {
    args: &'a RunArgs,
    info: RunInfo,
    channels: Vec<Channel>,
    book: Arc<Mutex<LagBook>>,
    run_id: String,
    partitions: usize,
    meter: Meter,
}

async fn measure(
    args: &RunArgs,
    info: &RunInfo,
    servers: &mut Servers,
) -> anyhow::Result<Vec<Row>> {
    let channels = setup::connect(&servers.node.url(), args.channels).await?;
    setup::prepare(channels[0].clone(), args.tenants, true, None)
        .await
        .context("preparing the node on Redis")?;
    setup::probe(channels[0].clone(), None).await?;
    let redis_url = crate::redis::url(&servers.redis);
    wait_ready(servers, &redis_url).await?;
    let partitions = (0..args.tenants)
        .map(|t| meter::event::partition(&tenant(t)))
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    eprintln!(
        "ingest: {} tenants in {partitions} of {} partitions; the aggregator holds every \
         partition",
        args.tenants,
        meter::event::PARTITIONS
    );
    let base = read_rollup(servers.clickhouse.addr(), args.tenants).await?;
    let mut info = info.clone();
    info.clickhouse = Some(servers.clickhouse_version.clone());
    let ctx = Ctx {
        args,
        info,
        channels,
        book: Arc::new(Mutex::new(LagBook::new(args.tenants, base))),
        run_id: uuid::Uuid::new_v4().simple().to_string(),
        partitions,
        meter: Meter::new(servers.pids(), Some(servers.clickhouse.addr())),
    };
    probe_pipeline(&ctx, servers).await?;
    if let (n, Some(first)) = servers.aggregator.new_complaints() {
        eprintln!(
            "ingest: the aggregator logged {n} warnings or errors at start, the first: {first}"
        );
    }

    let rates: Vec<Option<u32>> = if args.rate.is_empty() {
        vec![None]
    } else {
        args.rate.iter().copied().map(Some).collect()
    };
    let mut rows = Vec::new();
    let mut cell = 0u32;
    for &concurrency in &args.concurrency {
        for &rate in &rates {
            cell += 1;
            eprintln!(
                "running ingest at concurrency {concurrency}{} ({:?} warmup + {:?}, then \
                 up to {:?} of drain)",
                rate.map_or_else(String::new, |r| format!(", {r} Records/s")),
                args.warmup,
                args.duration,
                args.drain_timeout
            );
            let row = run_cell(&ctx, servers, cell, concurrency, rate)
                .await
                .with_context(|| format!("ingest at concurrency {concurrency}"))?;
            rows.push(row);
        }
    }
    Ok(rows)
}

/// One Record through the whole pipeline before measuring: proves it works, with a clear
/// error when it does not.
async fn probe_pipeline(ctx: &Ctx<'_>, servers: &mut Servers) -> anyhow::Result<()> {
    let mut client = EnforcerClient::new(ctx.channels[0].clone());
    let response = client
        .record(record_request(0, format!("bench-{}-probe", ctx.run_id)))
        .await
        .map_err(|s| setup::status_error("probe Enforcer.Record", &s))?
        .into_inner();
    if let Err(f) = recorded(&response) {
        bail!("probe Enforcer.Record was not counted: {}", f.detail);
    }
    let acked = Instant::now();
    ctx.book.lock().expect("lag book").acked(0, acked, None);
    loop {
        servers.ensure_running()?;
        let counts = read_rollup(servers.clickhouse.addr(), ctx.args.tenants).await?;
        let at = Instant::now();
        {
            let mut book = ctx.book.lock().expect("lag book");
            for (t, count) in counts {
                book.visible(t, count, at, |_, _| {})?;
            }
            if book.waiting() == 0 {
                eprintln!(
                    "ingest: a probe Record showed in the rollup {} ms after its \
                     acknowledgement",
                    (at - acked).as_millis()
                );
                return Ok(());
            }
        }
        if acked.elapsed() > ctx.args.drain_timeout {
            bail!(
                "a probe Record did not show in the rollup within {:?}{}",
                ctx.args.drain_timeout,
                log_tail(Some(&servers.aggregator.log))
            );
        }
        tokio::time::sleep(ctx.args.poll_interval).await;
    }
}

fn record_request(t: usize, event_id: String) -> RecordRequest {
    RecordRequest {
        tenant: tenant(t),
        metric: METRIC.to_owned(),
        amount: 1,
        event_id,
        ..Default::default()
    }
}

/// Ok when the Record was allowed and counted.
fn recorded(r: &allot_proto::v1::RecordResponse) -> Result<(), Failure> {
    allowed(r.decision.as_ref())?;
    if !r.recorded {
        return Err(Failure {
            kind: "not_recorded".into(),
            detail: "Record was allowed but says nothing was counted".into(),
        });
    }
    Ok(())
}

/// When a worker's operations may start, and until when.
#[derive(Clone, Copy)]
struct Schedule {
    cell: u32,
    measure_from: Instant,
    deadline: Instant,
    /// Time between a worker's Records, when paced.
    pace: Option<Duration>,
    /// Failed Records left at the deadline are retried until then (the end of the drain).
    settle_by: Instant,
}

struct WorkerOutcome {
    /// Record latencies (sent to acknowledged) in the measured window, nanoseconds.
    latency: Histogram<u64>,
    /// Records acknowledged within the measured window.
    acked: u64,
    errors: u64,
    error_kinds: BTreeMap<String, ErrorKind>,
}

/// One worker: Records for its own tenants, round-robin, one in flight.
async fn worker(
    mut client: EnforcerClient<Channel>,
    tenants: Vec<usize>,
    id_prefix: String,
    book: Arc<Mutex<LagBook>>,
    schedule: Schedule,
    first_at: Instant,
) -> anyhow::Result<WorkerOutcome> {
    let mut out = WorkerOutcome {
        latency: Histogram::new_with_bounds(1, MAX_NANOS, 3)?,
        acked: 0,
        errors: 0,
        error_kinds: BTreeMap::new(),
    };
    // Per owned tenant, the number of its next event; it moves on only once the event is
    // counted, so a failed Record is sent again with the same id.
    let mut next_seq = vec![0u64; tenants.len()];
    // Whether the tenant's last Record failed: it may have been written all the same.
    let mut failed = vec![false; tenants.len()];
    let mut next_at = first_at;
    let mut i = 0;
    loop {
        if let Some(pace) = schedule.pace {
            tokio::time::sleep_until(next_at.into()).await;
            next_at += pace;
        }
        let start = Instant::now();
        if start >= schedule.deadline {
            break;
        }
        let slot = i % tenants.len();
        i += 1;
        let t = tenants[slot];
        let result = send(&mut client, t, &id_prefix, next_seq[slot]).await;
        failed[slot] = result.is_err();
        let done = Instant::now();
        let measured = start >= schedule.measure_from;
        match result {
            Ok(()) => {
                next_seq[slot] += 1;
                let in_window = done >= schedule.measure_from && done < schedule.deadline;
                book.lock()
                    .expect("lag book")
                    .acked(t, done, in_window.then_some(schedule.cell));
                if in_window {
                    out.acked += 1;
                }
                if measured {
                    let nanos = u64::try_from((done - start).as_nanos()).unwrap_or(u64::MAX);
                    out.latency.saturating_record(nanos.max(1));
                }
            }
            Err(f) if measured => {
                out.errors += 1;
                let kind = out.error_kinds.entry(f.kind).or_default();
                if kind.count == 0 {
                    kind.example = f.detail;
                }
                kind.count += 1;
            }
            Err(_) => {}
        }
    }
    // A failed Record left behind may still be in the stream: settle it (the same event id
    // again, until the drain ends), so that every tenant's count in the rollup matches
    // its acknowledgements and the next cell's lags are right.
    for (slot, &t) in tenants.iter().enumerate() {
        while failed[slot] && Instant::now() < schedule.settle_by {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if send(&mut client, t, &id_prefix, next_seq[slot])
                .await
                .is_ok()
            {
                failed[slot] = false;
                next_seq[slot] += 1;
                book.lock()
                    .expect("lag book")
                    .acked(t, Instant::now(), None);
            }
        }
    }
    Ok(out)
}

/// Records event `seq` of tenant `t`; Ok when it was counted (now or before).
async fn send(
    client: &mut EnforcerClient<Channel>,
    t: usize,
    id_prefix: &str,
    seq: u64,
) -> Result<(), Failure> {
    let event_id = format!("{id_prefix}-{t}-{seq}");
    match tokio::time::timeout(RECORD_TIMEOUT, client.record(record_request(t, event_id))).await {
        Ok(Ok(r)) => recorded(r.get_ref()),
        Ok(Err(s)) => Err(Failure::from(s)),
        Err(_) => Err(Failure {
            kind: "timeout".into(),
            detail: format!("no answer within {}s", RECORD_TIMEOUT.as_secs()),
        }),
    }
}

/// Reads of the rollup during one cell.
struct Reads {
    /// Lags of the cell's events, nanoseconds.
    lags: Histogram<u64>,
    /// Time of each read, nanoseconds.
    times: Histogram<u64>,
    /// (answer time, events counted, all bench tenants).
    totals: Vec<(Instant, u64)>,
    failed_since: Option<Instant>,
    failures: u64,
    went_back: u64,
}

impl Reads {
    fn new() -> anyhow::Result<Reads> {
        Ok(Reads {
            lags: Histogram::new_with_bounds(1, MAX_LAG_NANOS, 3)?,
            times: Histogram::new_with_bounds(1, MAX_NANOS, 3)?,
            totals: Vec::new(),
            failed_since: None,
            failures: 0,
            went_back: 0,
        })
    }

    /// Reads the rollup once and settles what it shows; fails only when reads have
    /// failed for [`POLL_FAILURE_LIMIT`].
    async fn once(&mut self, ctx: &Ctx<'_>, addr: SocketAddr, cell: u32) -> anyhow::Result<()> {
        let sent = Instant::now();
        let counts = match read_rollup(addr, ctx.args.tenants).await {
            Ok(c) => c,
            Err(e) => {
                self.failures += 1;
                let since = *self.failed_since.get_or_insert(sent);
                if since.elapsed() > POLL_FAILURE_LIMIT {
                    return Err(e.context(format!(
                        "reading the rollup failed for {}s in a row",
                        POLL_FAILURE_LIMIT.as_secs()
                    )));
                }
                return Ok(());
            }
        };
        let at = Instant::now();
        self.failed_since = None;
        self.times
            .saturating_record(u64::try_from((at - sent).as_nanos()).unwrap_or(u64::MAX));
        let mut book = ctx.book.lock().expect("lag book");
        let mut total = 0;
        for (t, count) in counts {
            total += count;
            let lags = &mut self.lags;
            let r = book.visible(t, count, at, |c, lag| {
                if c == Some(cell) {
                    lags.saturating_record(u64::try_from(lag.as_nanos()).unwrap_or(u64::MAX));
                }
            });
            if let Err(e) = r {
                self.went_back += 1;
                if self.went_back == 1 {
                    eprintln!("  ingest: {e}");
                }
            }
        }
        self.totals.push((at, total));
        Ok(())
    }
}

/// Events per second that became visible between the first read answered at or after
/// `from` and the last one answered by `to`.
fn visible_rate(totals: &[(Instant, u64)], from: Instant, to: Instant) -> f64 {
    let first = totals.iter().find(|(at, _)| *at >= from);
    let last = totals.iter().rev().find(|(at, _)| *at <= to);
    match (first, last) {
        (Some((a, x)), Some((b, y))) if b > a => {
            y.saturating_sub(*x) as f64 / (*b - *a).as_secs_f64()
        }
        _ => 0.0,
    }
}

async fn run_cell(
    ctx: &Ctx<'_>,
    servers: &mut Servers,
    cell: u32,
    concurrency: usize,
    rate: Option<u32>,
) -> anyhow::Result<Row> {
    let args = ctx.args;
    let begin = Instant::now();
    let schedule = Schedule {
        cell,
        measure_from: begin + args.warmup,
        deadline: begin + args.warmup + args.duration,
        pace: rate.map(|r| Duration::from_secs_f64(concurrency as f64 / f64::from(r))),
        settle_by: begin + args.warmup + args.duration + args.drain_timeout,
    };
    let handles: Vec<_> = (0..concurrency)
        .map(|w| {
            let tenants: Vec<usize> = (w..args.tenants).step_by(concurrency).collect();
            let client = EnforcerClient::new(ctx.channels[w % ctx.channels.len()].clone());
            // Paced workers start spread over one interval, not all at once.
            let first_at = begin
                + schedule
                    .pace
                    .map_or(Duration::ZERO, |p| p.mul_f64(w as f64 / concurrency as f64));
            tokio::spawn(worker(
                client,
                tenants,
                format!("bench-{}-i{cell}", ctx.run_id),
                ctx.book.clone(),
                schedule,
                first_at,
            ))
        })
        .collect();

    let addr = servers.clickhouse.addr();
    let mut reads = Reads::new()?;
    let mut backlog_start = None;
    let mut backlog = None;
    // What the processes had used at the window's start, and what they used in it.
    let mut window_start: Option<Sample> = None;
    let mut window_use: Option<Usage> = None;
    let mut drained_at = None;
    let mut ticker = tokio::time::interval(args.poll_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checked = Instant::now();
    loop {
        ticker.tick().await;
        reads.once(ctx, addr, cell).await?;
        let now = Instant::now();
        if now.duration_since(checked) > Duration::from_millis(500) {
            servers.ensure_running()?;
            checked = now;
        }
        if now < schedule.deadline {
            if now >= schedule.measure_from && window_start.is_none() {
                window_start = Some(ctx.meter.sample().await);
                backlog_start = Some(ctx.book.lock().expect("lag book").waiting());
            }
            backlog = Some(ctx.book.lock().expect("lag book").waiting());
            continue;
        }
        if let (None, Some(start)) = (&window_use, &window_start) {
            window_use = Some(start.until(&ctx.meter.sample().await));
        }
        let timed_out = now > schedule.deadline + args.drain_timeout;
        if !handles.iter().all(|h| h.is_finished()) && !timed_out {
            continue;
        }
        let (mine, all) = {
            let book = ctx.book.lock().expect("lag book");
            (book.waiting_in(cell), book.waiting())
        };
        if mine == 0 && drained_at.is_none() {
            drained_at = Some(reads.totals.last().map_or(now, |(at, _)| *at));
        }
        if all == 0 || timed_out {
            break;
        }
    }

    let mut latency = Histogram::<u64>::new_with_bounds(1, MAX_NANOS, 3)?;
    let mut acked = 0;
    let mut errors = 0;
    let mut error_kinds: BTreeMap<String, ErrorKind> = BTreeMap::new();
    for handle in handles {
        let out = handle.await.context("a worker panicked")??;
        latency.add(&out.latency)?;
        acked += out.acked;
        errors += out.errors;
        for (k, v) in out.error_kinds {
            let merged = error_kinds.entry(k).or_default();
            if merged.count == 0 {
                merged.example = v.example;
            }
            merged.count += v.count;
        }
    }
    for (kind, e) in &error_kinds {
        eprintln!("  {} errors of kind {kind}, e.g.: {}", e.count, e.example);
    }
    if let (n, Some(first)) = servers.aggregator.new_complaints() {
        eprintln!("  the aggregator logged {n} warnings or errors, the first: {first}");
    }
    if reads.failures > 0 {
        eprintln!("  {} reads of the rollup failed", reads.failures);
    }
    let (unseen, surplus) = {
        let book = ctx.book.lock().expect("lag book");
        (book.waiting_in(cell), book.ahead())
    };
    if reads.went_back > 0 {
        errors += reads.went_back;
        error_kinds
            .entry("rollup_went_back".into())
            .or_default()
            .count += reads.went_back;
    }

    let acked_per_sec = acked as f64 / args.duration.as_secs_f64();
    let mut row = Row::of_histogram(Scenario::Ingest, &reads.lags, acked_per_sec, &ctx.info);
    row.concurrency = concurrency;
    row.errors = errors;
    row.error_rate = if acked + errors == 0 {
        0.0
    } else {
        errors as f64 / (acked + errors) as f64
    };
    row.error_kinds = error_kinds.into_iter().map(|(k, v)| (k, v.count)).collect();
    let Usage { cpu_cores, inserts } = window_use.unwrap_or_default();
    let us = |h: &Histogram<u64>, q: f64| {
        (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
    };
    let figures = IngestFigures {
        target_rate: rate.map(f64::from),
        acked,
        visible_per_sec: visible_rate(&reads.totals, schedule.measure_from, schedule.deadline),
        backlog_start: backlog_start.unwrap_or(0),
        backlog: backlog.unwrap_or(0),
        unseen,
        surplus,
        drain_ms: drained_at.filter(|_| unseen == 0).map(|at| {
            at.saturating_duration_since(schedule.deadline)
                .as_secs_f64()
                * 1000.0
        }),
        record_p50_us: us(&latency, 0.5),
        record_p99_us: us(&latency, 0.99),
        poll_interval_us: args.poll_interval.as_secs_f64() * 1e6,
        poll_p50_us: us(&reads.times, 0.5),
        partitions: ctx.partitions,
        inserts_per_sec: inserts.per_sec,
        rows_per_insert: inserts.rows_per_insert,
        merged_per_inserted: inserts.merged_per_inserted,
        cpu_cores,
    };
    eprintln!(
        "  {:.0} Records/s acknowledged, {:.0} events/s into the rollup, lag p50 {:.0} ms, \
         p99 {:.0} ms, max {:.0} ms; backlog {} → {} over the window, drained in {}, \
         {} unseen, {} errors",
        row.ops_per_sec,
        figures.visible_per_sec,
        row.p50_us.unwrap_or(f64::NAN) / 1000.0,
        row.p99_us.unwrap_or(f64::NAN) / 1000.0,
        row.max_us.unwrap_or(f64::NAN) / 1000.0,
        figures.backlog_start,
        figures.backlog,
        figures
            .drain_ms
            .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.0} ms")),
        figures.unseen,
        row.errors
    );
    if !figures.cpu_cores.is_empty() {
        let used: Vec<String> = figures
            .cpu_cores
            .iter()
            .filter(|(name, _)| *name != resources::MACHINE)
            .map(|(name, c)| format!("{name} {c:.2}"))
            .collect();
        let machine = figures
            .cpu_cores
            .get(resources::MACHINE)
            .map_or_else(String::new, |c| {
                format!(" (the whole machine: {c:.2} of {})", ctx.info.nproc)
            });
        eprintln!(
            "  CPU cores used in the window: {}{machine}",
            used.join(", ")
        );
    }
    if let (Some(i), Some(r)) = (figures.inserts_per_sec, figures.rows_per_insert) {
        eprintln!(
            "  clickhouse: {i:.1} inserts/s of {r:.0} rows on average, {} rows merged per \
             row inserted",
            figures
                .merged_per_inserted
                .map_or_else(|| "-".to_owned(), |m| format!("{m:.1}"))
        );
    }
    if figures.surplus > 0 {
        eprintln!(
            "  the rollup counts {} events more than were acknowledged",
            figures.surplus
        );
    }
    row.ingest = Some(figures);
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollup_lines() {
        let text = "bench-3\t12\nbench-0\t1\nacme\t99\nbench-70\t5\n\n";
        assert_eq!(parse_counts(text, 64).unwrap(), vec![(3, 12), (0, 1)]);
        assert!(parse_counts("bench-1 12\n", 64).is_err());
        assert!(parse_counts("bench-1\tx\n", 64).is_err());
        assert_eq!(parse_counts("", 64).unwrap(), vec![]);
    }

    #[test]
    fn visible_rate_uses_the_reads_inside_the_window() {
        let t0 = Instant::now();
        let s = |ms: u64| t0 + Duration::from_millis(ms);
        let totals = [
            (s(0), 0),
            (s(900), 50),
            (s(1000), 100),
            (s(2000), 600),
            (s(3000), 1100),
            (s(3100), 1200),
        ];
        // From the read at 1 s (100) to the one at 3 s (1100): 500 a second.
        assert_eq!(visible_rate(&totals, s(950), s(3050)), 500.0);
        // One read in the window gives no rate.
        assert_eq!(visible_rate(&totals, s(1500), s(2500)), 0.0);
        assert_eq!(visible_rate(&[], s(0), s(10)), 0.0);
    }

    #[test]
    fn ingest_options() {
        use clap::Parser as _;
        let parse = |extra: &[&str]| {
            let mut argv = vec!["bench", "--scenario", "ingest"];
            argv.extend_from_slice(extra);
            crate::cli::Cli::try_parse_from(argv).unwrap().run
        };
        assert!(check_args(&parse(&[])).is_ok());
        let err = check_args(&parse(&["--tenants", "8", "--concurrency", "4,16"])).unwrap_err();
        assert!(err.to_string().contains("--tenants (8)"), "{err}");
        assert!(check_args(&parse(&["--rate", "100,0"])).is_err());
        assert!(check_args(&parse(&["--poll-interval", "0"])).is_err());
    }
}
