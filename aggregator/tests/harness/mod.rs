//! The aggregator's integration harness: real servers (Redis from the enforcer's harness,
//! ClickHouse 18.16, current ClickHouse in-process through chdb), a producer that writes
//! spooled events the way nodes do and keeps a ledger of what it wrote, aggregators in
//! this process or as `allot-aggregator` processes, and the checks that totals equal the
//! ledger exactly.
//!
//! ```ignore
//! let redis = RedisServer::start().await;
//! let ch = ClickHouseServer::start().await;
//! let mut producer = Producer::connect(&redis.url).await;
//! producer.emit_many(&events(1000, 0)).await;
//! let agg = InProcess::start(options(&ch, &redis.url, "a1"));
//! wait_drained(&ch, &producer, Duration::from_secs(60)).await;
//! assert_exact(&ch, &producer.ledger).await;
//! ```
#![allow(dead_code)]

pub mod chdb;
pub mod clickhouse;
#[path = "../../../enforcer/tests/harness/redis.rs"]
pub mod redis;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use aggregator::queries;
use aggregator::source::redis::GROUP;
use aggregator::AggregateOptions;
use chrono::{Datelike, TimeZone, Utc};
use fred::prelude::*;
use meter::event::{partition, stream_key, EventKind, Pending, Spooled, PARTITIONS};
use meter::quota::QuotaSlot;
use meter::store::{SlotSpec, SlotUsage};
use meter::window::Window;
use tokio::process::{Child, Command};

pub use self::clickhouse::ClickHouseServer;

/// The database the tests use.
pub const DB: &str = "allot_test";

/// One event to write.
#[derive(Debug, Clone)]
pub struct Ev {
    /// Kind.
    pub kind: EventKind,
    /// Tenant.
    pub tenant: String,
    /// Metric.
    pub metric: String,
    /// Units.
    pub amount: i64,
    /// Unix ms.
    pub at_ms: i64,
}

/// `n` events over 12 tenants, 2 metrics and three months (mostly usage, some releases
/// and denials), numbered from `from` (so that two calls give different events).
pub fn events(n: usize, from: usize) -> Vec<Ev> {
    let months = [
        Utc.with_ymd_and_hms(2024, 1, 31, 23, 0, 0).unwrap(),
        Utc.with_ymd_and_hms(2024, 2, 1, 0, 30, 0).unwrap(),
        Utc.with_ymd_and_hms(2024, 3, 15, 12, 0, 0).unwrap(),
    ];
    (from..from + n)
        .map(|i| {
            let kind = match i % 10 {
                0 => EventKind::Denial,
                1 => EventKind::Release,
                2..=5 => EventKind::Commit,
                _ => EventKind::Record,
            };
            // Runs of 1000 events per month, as time goes: batches cross month boundaries
            // now and then.
            let base = months[(i / 1000) % months.len()];
            Ev {
                kind,
                tenant: format!("tenant-{}", i % 12),
                metric: if i % 3 == 0 { "seats" } else { "api_calls" }.to_string(),
                amount: (i % 17) as i64 + 1 - if i % 3 == 0 { 3 } else { 0 },
                at_ms: base.timestamp_millis() + (i % 1000) as i64 * 1000,
            }
        })
        .collect()
}

/// What the producer wrote: usage totals per (tenant, metric, yyyymm) as (amount, events),
/// and how many rows `usage_events` must hold.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    /// Usage totals.
    pub totals: BTreeMap<(String, String, u32), (i64, u64)>,
    /// Events of every kind (rows expected in `usage_events`).
    pub rows: u64,
    /// Entries written that must go to the dead letters instead.
    pub bad: u64,
}

/// The context every test event carries: one soft day slot.
fn pending(tenant: &str, metric: &str, amount: i64) -> Pending {
    Pending {
        tenant: tenant.into(),
        metric: metric.into(),
        amount,
        gauge: metric == "seats",
        slots: vec![QuotaSlot {
            window: Window::Day,
            limit: 1_000_000,
            soft: true,
            warn_at: vec![80],
            resets_at: None,
            spec: SlotSpec {
                key: format!("{metric}|day|0"),
                cap: None,
                ends_at: None,
            },
            fail_open: false,
            period: None,
        }],
        plan: "pro".into(),
        plan_version: 3,
        dimensions: [("api_key".to_string(), "k1".to_string())].into(),
        node: "node-1".into(),
        degraded: false,
        decided: None,
    }
}

/// Writes spooled events into the partition streams, as nodes do, and keeps the ledger.
pub struct Producer {
    /// Redis.
    pub client: Client,
    /// What it wrote.
    pub ledger: Ledger,
    next_id: u64,
}

impl Producer {
    /// Connects to `url`.
    pub async fn connect(url: &str) -> Producer {
        let client = Builder::from_config(Config::from_url(url).unwrap())
            .build()
            .unwrap();
        client.init().await.expect("redis reachable");
        Producer {
            client,
            ledger: Ledger::default(),
            next_id: 0,
        }
    }

    fn spooled(&mut self, ev: &Ev) -> Spooled {
        self.next_id += 1;
        Spooled {
            kind: ev.kind,
            id: format!("ev-{}", self.next_id),
            amount: ev.amount,
            at_ms: ev.at_ms,
            context: pending(&ev.tenant, &ev.metric, ev.amount).to_json(),
            usage: vec![SlotUsage {
                used: 10,
                reserved: 0,
            }],
            granted: ev.kind != EventKind::Denial,
        }
    }

    /// Writes events (pipelined) and records them in the ledger.
    pub async fn emit_many(&mut self, evs: &[Ev]) {
        for chunk in evs.chunks(2000) {
            let pipe = self.client.pipeline();
            for ev in chunk {
                let s = self.spooled(ev);
                let fields: Vec<(&str, String)> = s.to_fields();
                let _: () = pipe
                    .xadd(stream_key(partition(&ev.tenant)), false, None, "*", fields)
                    .await
                    .unwrap();
            }
            let _: Vec<Value> = pipe.all().await.expect("XADD pipeline");
            for ev in chunk {
                self.ledger.rows += 1;
                if ev.kind.is_usage() {
                    let at = Utc.timestamp_millis_opt(ev.at_ms).unwrap();
                    let key = (
                        ev.tenant.clone(),
                        ev.metric.clone(),
                        at.year() as u32 * 100 + at.month(),
                    );
                    let e = self.ledger.totals.entry(key).or_default();
                    e.0 += ev.amount;
                    e.1 += 1;
                }
            }
        }
    }

    /// Writes raw fields to `partition`'s stream (a bad entry); counted as bad.
    pub async fn emit_raw(&mut self, partition: u16, fields: Vec<(&str, &str)>) -> String {
        let id: String = self
            .client
            .xadd(stream_key(partition), false, None, "*", fields)
            .await
            .unwrap();
        self.ledger.bad += 1;
        id
    }

    /// Entries of every partition not acknowledged yet (pending, or never delivered).
    pub async fn unacknowledged(&self) -> u64 {
        let mut total = 0;
        for p in 0..PARTITIONS {
            let key = stream_key(p);
            let exists: i64 = self.client.exists(&key).await.unwrap();
            if exists == 0 {
                continue;
            }
            let groups: Value = self.client.xinfo_groups(&key).await.unwrap();
            let mut lag = None;
            let mut pending = 0;
            if let Value::Array(groups) = groups {
                for g in groups {
                    let map = group_fields(g);
                    if map.get("name").map(String::as_str) == Some(GROUP) {
                        pending = map.get("pending").and_then(|v| v.parse().ok()).unwrap_or(0);
                        lag = map.get("lag").and_then(|v| v.parse::<u64>().ok());
                    }
                }
            }
            let len: u64 = self.client.xlen(&key).await.unwrap();
            // No group yet: nothing was read.
            total += pending + lag.unwrap_or(len);
        }
        total
    }

    /// The dead letters of a partition: (entry id, error, original fields).
    pub async fn dead_letters(&self, partition: u16) -> Vec<BTreeMap<String, String>> {
        let entries: Vec<(String, BTreeMap<String, String>)> = self
            .client
            .xrange(
                aggregator::source::redis::dead_key(partition),
                "-",
                "+",
                None,
            )
            .await
            .unwrap();
        entries.into_iter().map(|(_, f)| f).collect()
    }
}

fn group_fields(v: Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Value::Array(items) = v {
        for kv in items.chunks(2) {
            if let (Some(k), Some(v)) = (kv[0].as_string(), kv.get(1).and_then(|v| v.as_string())) {
                out.insert(k, v);
            }
        }
    }
    out
}

/// Aggregator options for tests: short leases and batches, quick retries.
pub fn options(ch: &ClickHouseServer, redis_url: &str, id: &str) -> AggregateOptions {
    let mut o = AggregateOptions::new(&ch.url, redis_url);
    o.database = DB.into();
    o.aggregator_id = id.into();
    o.batch_size = 500;
    o.batch_interval = Duration::from_millis(200);
    o.lease_ttl = Duration::from_secs(2);
    o.poll_interval = Duration::from_millis(50);
    o.retry_min = Duration::from_millis(50);
    o.retry_max = Duration::from_millis(1000);
    o
}

/// An aggregator running in this process.
pub struct InProcess {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Result<(), aggregator::AggregateError>>,
}

impl InProcess {
    /// Starts `aggregator::run`.
    pub fn start(opts: AggregateOptions) -> InProcess {
        // Logs of in-process aggregators: RUST_LOG=aggregator=info to see them.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let handle = tokio::spawn(aggregator::run(opts, async move {
            let _ = rx.await;
        }));
        InProcess {
            stop: Some(tx),
            handle,
        }
    }

    /// Shuts it down and waits; panics if it failed.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        (&mut self.handle)
            .await
            .expect("aggregator task")
            .expect("aggregator ran without error");
    }
}

/// An `allot-aggregator` process.
pub struct Process {
    child: Child,
}

impl Process {
    /// Starts the binary with the test options plus `extra` arguments (`--batch-size`
    /// there replaces the test batch size and interval).
    pub fn start(ch: &ClickHouseServer, redis_url: &str, id: &str, extra: &[&str]) -> Process {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_allot-aggregator"));
        cmd.args(["--clickhouse", &ch.url, "--database", DB])
            .args(["--redis", redis_url, "--id", id]);
        if !extra.contains(&"--batch-size") {
            cmd.args(["--batch-size", "500", "--batch-interval", "200ms"]);
        }
        let child = cmd
            .args(["--lease-ttl", "2s", "--poll-interval", "50ms"])
            .args(["--retry-min", "50ms", "--retry-max", "1s"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("allot-aggregator starts");
        Process { child }
    }

    /// Kills it with SIGKILL (no shutdown code runs).
    pub async fn kill9(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Waits for it to exit by itself (e.g. at a failpoint); its status.
    pub async fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .expect("the aggregator exits in time")
            .unwrap()
    }

    /// Stops it with SIGTERM and waits.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        self.wait(Duration::from_secs(30)).await
    }
}

/// Rows in `usage_events` (0 if the table does not exist yet).
pub async fn row_count(ch: &ClickHouseServer) -> u64 {
    ch.client(DB)
        .query("SELECT count() FROM usage_events")
        .fetch_one::<u64>()
        .await
        .unwrap_or(0)
}

/// Waits until every written entry is acknowledged and `usage_events` holds at least the
/// ledger's rows; panics after `timeout` with what is missing.
pub async fn wait_drained(ch: &ClickHouseServer, producer: &Producer, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let rows = row_count(ch).await;
        let open = producer.unacknowledged().await;
        if rows >= producer.ledger.rows && open == 0 {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "not drained within {timeout:?}: {rows} of {} rows, {open} entries unacknowledged",
                producer.ledger.rows
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

type Totals = BTreeMap<(String, String, u32), (i64, u64)>;

async fn totals(ch: &ClickHouseServer, sql: &str) -> Totals {
    let rows: Vec<(String, String, u32, i64, u64)> = ch
        .client(DB)
        .query(sql)
        .fetch_all()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.into_iter()
        .map(|(t, m, ym, a, n)| ((t, m, ym), (a, n)))
        .collect()
}

/// Every row once, and every rollup equal to the ledger.
pub async fn assert_exact(ch: &ClickHouseServer, ledger: &Ledger) {
    let (count, unique): (u64, u64) = ch
        .client(DB)
        .query("SELECT count(), uniqExact(event_id) FROM usage_events")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(unique, ledger.rows, "distinct events in usage_events");
    assert_eq!(count, ledger.rows, "rows in usage_events (duplicates?)");
    let monthly = totals(ch, queries::MONTHLY_USAGE).await;
    assert_eq!(monthly, ledger.totals, "monthly rollup vs ledger");
    let raw = totals(ch, queries::MONTHLY_USAGE_FROM_EVENTS).await;
    assert_eq!(
        raw, ledger.totals,
        "monthly totals from raw events vs ledger"
    );
    // Daily and hourly rollups add up to the same totals per month.
    for sql in [queries::DAILY_USAGE, queries::HOURLY_USAGE] {
        let rows: Vec<(String, String, u32, i64, u64)> =
            ch.client(DB).query(sql).fetch_all().await.unwrap();
        let mut by_month: Totals = BTreeMap::new();
        for (t, m, period, a, n) in rows {
            let month = if period > 100_000_000 {
                let at = Utc.timestamp_opt(i64::from(period), 0).unwrap();
                at.year() as u32 * 100 + at.month()
            } else {
                period / 100
            };
            let e = by_month.entry((t, m, month)).or_default();
            e.0 += a;
            e.1 += n;
        }
        assert_eq!(by_month, ledger.totals, "{sql} vs ledger");
    }
}

/// Where the workspace's target directory keeps test files.
pub fn target_tmp() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}
