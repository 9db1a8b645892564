//! The acceptance fault run for usage events. 100,000 events (records mostly, some
//! reserve → commit and reserve → release, with dimensions, on fail-closed, fail-open,
//! soft-only and tightly capped metrics, 12 tenants over their partitions) go from many
//! concurrent clients of two `allot serve --redis` nodes through the partition streams and
//! two `allot aggregate` processes sharing the consumer group into ClickHouse 18.16, while:
//!
//! - an aggregator is SIGKILLed at random points (seeded: the seed is printed, and
//!   `ALLOT_TEST_SEED=<seed>` replays the workload and the fault schedule, by operations
//!   answered: the timing still varies) and restarted,
//!   once with the `--exit-after-insert` failpoint, which aborts it between an insert and
//!   its acknowledgement; two of the kills fall while the backlog of the ClickHouse outage
//!   is being inserted;
//! - ClickHouse is SIGKILLed mid-run and started again on the same data and ports 30 s
//!   later (the nodes and clients go on meanwhile);
//! - Redis (AOF with `appendfsync always`, the setup `docs/redis.md` names for losing
//!   nothing acknowledged on a restart) is SIGKILLed mid-run and restarted on its data. The
//!   nodes ride through it by each limit's policy, and the client keeps its ledger honest:
//!   an answer that "may have been applied" is set aside and retried with the same event id
//!   or idempotency key until it is definite; only definite answers are counted;
//! - bad input flows alongside: malformed dimensions (value, name, count, length), an
//!   oversized event id, amount and message, each refused with a clear error naming the
//!   field (or the size), and one tenant whose events ClickHouse rejects (a column whose
//!   default throws for it), sharing a partition with a good tenant.
//!
//! Once the streams are drained, it proves: the monthly rollup per tenant × metric (and the
//! daily rollup, and the raw events) equals the client's ledger of acknowledged units, to
//! the unit; `usage_events` holds every acknowledged commit and record exactly once and no
//! other usage (compared id by id, so nothing is missing and nothing is there twice); every
//! acknowledged release and every denial the client saw is there; the rejected tenant's
//! events are all in the dead letters, once each, with their fields, and nothing else is;
//! Redis still counts the rejected tenant's usage; no bad request left an event; soft
//! overage and degraded (fail-open) admissions are marked. It also checks that each fault
//! really happened (an aggregator never exits by itself, the failpoint fired, clients were
//! acknowledged while ClickHouse was down, the Redis outage was seen by both policies).

mod harness;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use allot_proto::v1 as pb;
use fred::prelude::*;
use harness::redis::RedisServer;
use harness::warehouse::{
    compare, monthly_totals, usage_rows, Aggregator, ClickHouseServer, Totals,
};
use harness::{in_doubt, mix, record, reserve, subscribe, window_usage, Node};
use meter::event::{partition, stream_key, PARTITIONS};
use pb::enforcer_client::EnforcerClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Usage events the clients drive (each operation makes one: a record, a commit, a
/// release or a denial).
const EVENTS: u64 = 100_000;
/// Tenants with good events, spread over the nodes (tenant `k` on node `k % 2`).
const TENANTS: u64 = 12;
/// Concurrent client operations.
const WORKERS: usize = 64;
/// gRPC connections per node.
const CHANNELS: usize = 4;
/// How long ClickHouse stays down.
const CLICKHOUSE_OUTAGE: Duration = Duration::from_secs(30);
/// How long Redis stays down: long enough for the nodes' breakers to open.
const REDIS_OUTAGE: Duration = Duration::from_millis(1500);
/// Aggregator kills during the load.
const KILLS_DURING_LOAD: usize = 4;
/// Aggregator kills once ClickHouse is back, while the backlog of its outage goes in.
const KILLS_AFTER_OUTAGE: usize = 2;
/// Longest wait for a definite answer to an operation in doubt.
const DOUBT_DEADLINE: Duration = Duration::from_secs(120);
/// Longest wait for the streams to drain after the load (generous; not a measurement).
const DRAIN_DEADLINE: Duration = Duration::from_secs(150);
/// The soft monthly allowance of `soft_calls`.
const SOFT_LIMIT: i64 = 2000;

const CATALOG: &str = "version: 1
metrics:
  calls: { unit: call }
  open_calls: { unit: call }
  soft_calls: { unit: call }
  capped: { unit: call }
plans:
  p:
    versions:
      1:
        limits:
          calls:
            - { window: day, amount: 1000000000 }
          open_calls:
            - { window: month, amount: 1000000000, on_backend_failure: fail_open }
          soft_calls:
            - { window: month, amount: 2000, enforcement: soft }
          capped:
            - { window: day, amount: 400 }
";

/// Aggregator options: short leases so that a killed one's partitions move on quickly.
const AGGREGATE_ARGS: &[&str] = &[
    "--lease-ttl",
    "3s",
    "--batch-size",
    "5000",
    "--batch-interval",
    "1s",
    "--poll-interval",
    "50ms",
    "--retry-min",
    "50ms",
    "--retry-max",
    "1s",
];

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix(self.0) % n
    }

    /// A fraction in [lo, hi).
    fn between(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.below(1 << 20) as f64 / (1u64 << 20) as f64
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Record,
    ReserveCommit,
    ReserveRelease,
}

/// One client operation.
#[derive(Clone, Debug)]
struct Op {
    i: u64,
    tenant: String,
    node: usize,
    metric: &'static str,
    kind: Kind,
    amount: i64,
    actual: i64,
    dims: HashMap<String, String>,
}

impl Op {
    /// Operation `i` of the run with `seed`; every 10,000th is the rejected tenant's.
    fn new(seed: u64, i: u64, rejected: &str) -> Op {
        let h = mix(seed ^ i.wrapping_mul(0x2545_F491_4F6C_DD1D));
        let poisoned = i % 10_000 == 5_000;
        let t = h % TENANTS;
        let r = (h >> 16) % 100;
        let (kind, metric) = match r {
            _ if poisoned => (Kind::Record, "calls"),
            0..=9 => (
                Kind::ReserveCommit,
                ["calls", "open_calls"][(r % 2) as usize],
            ),
            10..=12 => (
                Kind::ReserveRelease,
                ["calls", "open_calls"][(r % 2) as usize],
            ),
            13..=17 => (Kind::Record, "capped"),
            18..=42 => (Kind::Record, "soft_calls"),
            43..=70 => (Kind::Record, "calls"),
            _ => (Kind::Record, "open_calls"),
        };
        let amount = match kind {
            Kind::Record => 1 + (h >> 32) % 4,
            _ => 5 + (h >> 32) % 16,
        } as i64;
        let actual = ((h >> 40) % (amount as u64 + 1)) as i64;
        let dims = HashMap::from([
            ("api_key".to_string(), format!("k{}", (h >> 48) % 7)),
            (
                "endpoint_class".to_string(),
                ["read", "write", "admin"][((h >> 56) % 3) as usize].to_string(),
            ),
        ]);
        Op {
            i,
            tenant: if poisoned {
                rejected.to_string()
            } else {
                format!("t{t:02}")
            },
            node: if poisoned { 0 } else { (t % 2) as usize },
            metric,
            kind,
            amount,
            actual,
            dims,
        }
    }

    fn event_id(&self) -> String {
        format!("ev-{}", self.i)
    }
}

/// Where a reserve → settle operation stands.
enum Stage {
    Start,
    Held(String),
}

/// A definite answer.
enum Done {
    Recorded { degraded: bool },
    RecordDenied { reason: String },
    ReserveDenied { reason: String },
    Committed { reservation: String, amount: u64 },
    Released { reservation: String },
}

/// What the client was told, definitely.
#[derive(Default)]
struct Ledger {
    /// Acknowledged units per (tenant, metric), the rejected tenant left out.
    totals: Totals,
    /// Event ids of the acknowledged commits and records `usage_events` must hold.
    usage: HashSet<String>,
    /// Event ids of acknowledged releases.
    releases: HashSet<String>,
    /// Event ids of the record denials seen.
    record_denials: HashSet<String>,
    /// Denials seen (records and reserves), the rejected tenant's left out.
    denials: u64,
    /// Denials seen, by reason.
    reasons: BTreeMap<String, u64>,
    /// Operations admitted while Redis was unreachable (fail open).
    degraded: u64,
    /// Event ids of the usage admitted while Redis was unreachable: ClickHouse must mark
    /// them degraded, unless an earlier attempt of the same operation (its answer lost)
    /// counted it before the outage was noticed...
    degraded_usage: HashSet<String>,
    /// ...so those of operations that never had an answer in doubt must all be marked.
    degraded_sure: HashSet<String>,
    /// Event ids of the rejected tenant's events: the dead letters must hold exactly these.
    rejected: HashSet<String>,
    /// The rejected tenant's acknowledged units (Redis counts them).
    rejected_units: u64,
}

struct Shared {
    seed: u64,
    rejected: String,
    next: AtomicU64,
    /// Operations with a definite answer.
    done: AtomicU64,
    /// Answers that were not definite (each attempt; the operation was retried).
    doubts: AtomicU64,
    ledger: Mutex<Ledger>,
    retries: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Shared {
    /// Counts a definite answer; `retried`: an earlier answer was not definite.
    fn apply(&self, op: &Op, done: Done, retried: bool) {
        let mut l = self.ledger.lock().unwrap();
        let mut degraded_usage = None;
        let rejected = op.tenant == self.rejected;
        let key = (op.tenant.clone(), op.metric.to_string());
        match done {
            Done::Recorded { degraded } => {
                if rejected {
                    l.rejected.insert(op.event_id());
                    l.rejected_units += op.amount as u64;
                } else {
                    *l.totals.entry(key).or_default() += op.amount;
                    l.usage.insert(op.event_id());
                    if degraded {
                        degraded_usage = Some(op.event_id());
                    }
                }
                l.degraded += u64::from(degraded);
            }
            Done::RecordDenied { reason } if rejected => {
                assert_ne!(reason, "limit_exceeded", "op {}", op.i);
                l.rejected.insert(format!("{}/denied", op.event_id()));
            }
            Done::RecordDenied { reason } => {
                l.record_denials.insert(format!("{}/denied", op.event_id()));
                l.denials += 1;
                *l.reasons.entry(reason).or_default() += 1;
            }
            Done::ReserveDenied { reason } => {
                l.denials += 1;
                *l.reasons.entry(reason).or_default() += 1;
            }
            Done::Committed {
                reservation,
                amount,
            } => {
                *l.totals.entry(key).or_default() += amount as i64;
                if reservation.starts_with("dg-") {
                    // Counted in Redis when it comes back, as a record named after the
                    // reservation; a commit of nothing counts nothing and writes nothing.
                    l.degraded += 1;
                    if amount > 0 {
                        l.usage.insert(format!("dg-{reservation}"));
                        degraded_usage = Some(format!("dg-{reservation}"));
                    }
                } else {
                    l.usage.insert(format!("{reservation}/commit"));
                }
            }
            Done::Released { reservation } => {
                if reservation.starts_with("dg-") {
                    l.degraded += 1;
                } else {
                    l.releases.insert(format!("{reservation}/release"));
                }
            }
        }
        if let Some(id) = degraded_usage {
            if !retried {
                l.degraded_sure.insert(id.clone());
            }
            l.degraded_usage.insert(id);
        }
        self.done.fetch_add(1, Ordering::Relaxed);
    }
}

/// Errors worth retrying: UNAVAILABLE, in doubt ("may have been applied") or not (the
/// node could not reach Redis and knows nothing was applied). Anything else is a failure.
fn retryable(op: &Op, s: Status) -> Status {
    assert_eq!(s.code(), Code::Unavailable, "op {op:?}: {s:?}");
    s
}

/// Advances an operation as far as it goes; `Err` when it must be retried later (with
/// the same event id or idempotency key, from the same stage).
async fn step(e: &mut EnforcerClient<Channel>, op: &Op, stage: &mut Stage) -> Result<Done, Status> {
    if op.kind == Kind::Record {
        let mut req = record(&op.tenant, op.metric, op.amount, &op.event_id());
        req.dimensions = op.dims.clone();
        let r = e
            .record(req)
            .await
            .map_err(|s| retryable(op, s))?
            .into_inner();
        let reason = r.decision.expect("a decision").reason;
        return Ok(if r.recorded {
            Done::Recorded {
                degraded: reason == "degraded_fail_open",
            }
        } else {
            Done::RecordDenied { reason }
        });
    }
    if let Stage::Start = stage {
        let mut req = reserve(
            op.tenant.as_str(),
            op.metric,
            op.amount,
            &format!("rk-{}", op.i),
        );
        req.dimensions = op.dims.clone();
        let r = e
            .reserve(req)
            .await
            .map_err(|s| retryable(op, s))?
            .into_inner();
        if r.reservation_id.is_empty() {
            let reason = r.decision.expect("a decision").reason;
            return Ok(Done::ReserveDenied { reason });
        }
        *stage = Stage::Held(r.reservation_id);
    }
    let Stage::Held(reservation) = stage else {
        unreachable!()
    };
    let reservation = reservation.clone();
    if op.kind == Kind::ReserveCommit {
        let c = e
            .commit(pb::CommitRequest {
                tenant: op.tenant.clone(),
                reservation_id: reservation.clone(),
                actual_amount: op.actual,
            })
            .await
            .map_err(|s| retryable(op, s))?
            .into_inner();
        assert_eq!(c.committed as i64, op.actual, "op {op:?}: {c:?}");
        Ok(Done::Committed {
            reservation,
            amount: c.committed,
        })
    } else {
        e.release(pb::ReleaseRequest {
            tenant: op.tenant.clone(),
            reservation_id: reservation.clone(),
        })
        .await
        .map_err(|s| retryable(op, s))?;
        Ok(Done::Released { reservation })
    }
}

/// Retries an operation set aside until its answer is definite.
async fn settle_later(
    shared: Arc<Shared>,
    mut e: EnforcerClient<Channel>,
    op: Op,
    mut stage: Stage,
    first: Status,
) {
    let deadline = Instant::now() + DOUBT_DEADLINE;
    let mut last = first;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        match step(&mut e, &op, &mut stage).await {
            Ok(done) => return shared.apply(&op, done, true),
            Err(s) => {
                shared.doubts.fetch_add(1, Ordering::Relaxed);
                last = s;
            }
        }
    }
    panic!(
        "op {op:?}: no definite answer within {DOUBT_DEADLINE:?}; last: {:?} {} (in doubt: {})",
        last.code(),
        last.message(),
        in_doubt(&last)
    );
}

/// Drives every operation through `WORKERS` concurrent clients; an answer that is not
/// definite sets the operation aside (retried by its own task) and the worker goes on.
async fn load(shared: Arc<Shared>, clients: Arc<Vec<Vec<EnforcerClient<Channel>>>>) {
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (shared, clients) = (shared.clone(), clients.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = shared.next.fetch_add(1, Ordering::Relaxed);
                if i >= EVENTS {
                    break;
                }
                let op = Op::new(shared.seed, i, &shared.rejected);
                let mut e = clients[op.node][w % CHANNELS].clone();
                let mut stage = Stage::Start;
                match step(&mut e, &op, &mut stage).await {
                    Ok(done) => shared.apply(&op, done, false),
                    Err(s) => {
                        shared.doubts.fetch_add(1, Ordering::Relaxed);
                        let task = tokio::spawn(settle_later(shared.clone(), e, op, stage, s));
                        shared.retries.lock().unwrap().push(task);
                    }
                }
            }
        }));
    }
    for w in workers {
        w.await.expect("load worker");
    }
    let retries = std::mem::take(&mut *shared.retries.lock().unwrap());
    for r in retries {
        r.await.expect("retry of an operation in doubt");
    }
}

/// A bad request, what it must be answered, and how the message must start.
fn bad_request(n: u64) -> (pb::RecordRequest, Code, String) {
    let id = format!("bad-{n}");
    let mut r = record(&format!("t{:02}", n % TENANTS), "calls", 1, &id);
    let field = |f: &str| format!("{f}:");
    match n % 7 {
        0 => {
            r.dimensions.insert("api_key".into(), "has space".into());
            (r, Code::InvalidArgument, field("dimensions.api_key"))
        }
        1 => {
            r.dimensions.insert("api key".into(), "k1".into());
            (r, Code::InvalidArgument, field("dimensions[\"api key\"]"))
        }
        2 => {
            for d in 0..17 {
                r.dimensions.insert(format!("d{d}"), "v".into());
            }
            (r, Code::InvalidArgument, field("dimensions"))
        }
        3 => {
            r.dimensions.insert("api_key".into(), "k".repeat(257));
            (r, Code::InvalidArgument, field("dimensions.api_key"))
        }
        4 => {
            r.event_id = format!("{id}-{}", "x".repeat(300));
            (r, Code::InvalidArgument, field("event_id"))
        }
        5 => {
            r.amount = 1_000_000_000_000_001;
            (r, Code::InvalidArgument, field("amount"))
        }
        _ => {
            // Past the node's 4 MiB message limit.
            r.dimensions.insert("api_key".into(), "k".repeat(5 << 20));
            (
                r,
                Code::OutOfRange,
                "Error, decoded message length too large".into(),
            )
        }
    }
}

/// Sends bad requests until told to stop; each must get its clear error. Returns how many.
async fn bad_input(clients: Arc<Vec<Vec<EnforcerClient<Channel>>>>, stop: Arc<AtomicBool>) -> u64 {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let (req, code, prefix) = bad_request(n);
        let mut e = clients[(n % 2) as usize][0].clone();
        let s = e.record(req).await.expect_err("bad input must be refused");
        assert_eq!(s.code(), code, "bad request {n}: {s:?}");
        assert!(
            s.message().starts_with(&prefix),
            "bad request {n}: {:?} should start with {prefix:?}",
            s.message()
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    n
}

/// The fields of a Redis reply that is a flat list of name, value pairs (values that are
/// not strings or integers are skipped).
fn pairs(v: &Value) -> HashMap<String, String> {
    let mut out = HashMap::new();
    if let Value::Array(items) = v {
        for kv in items.chunks(2) {
            if let (Some(k), Some(v)) = (kv[0].as_string(), kv.get(1).and_then(Value::as_string)) {
                out.insert(k, v);
            }
        }
    }
    out
}

/// Entries of every partition stream not yet acknowledged by the aggregators: pending in
/// the group, or not delivered yet (then the stream's lag, at least 1).
async fn unacknowledged(redis: &Client) -> Result<u64, Error> {
    let mut total = 0;
    for p in 0..PARTITIONS {
        let key = stream_key(p);
        let exists: i64 = redis.exists(&key).await?;
        if exists == 0 {
            continue;
        }
        let stream: Value = redis.xinfo_stream(&key, false, None).await?;
        let last = pairs(&stream)
            .get("last-generated-id")
            .cloned()
            .unwrap_or_default();
        let groups: Value = redis.xinfo_groups(&key).await?;
        let group = match &groups {
            Value::Array(gs) => gs
                .iter()
                .map(pairs)
                .find(|g| g.get("name").map(String::as_str) == Some("aggregators")),
            _ => None,
        };
        let Some(g) = group else {
            let len: u64 = redis.xlen(&key).await?;
            total += len;
            continue;
        };
        total += g.get("pending").and_then(|v| v.parse().ok()).unwrap_or(1);
        if g.get("last-delivered-id") != Some(&last) {
            total += g
                .get("lag")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1)
                .max(1);
        }
    }
    Ok(total)
}

/// Every dead letter of every partition: its fields (with `entry` and `error`).
async fn dead_letters(redis: &Client) -> Vec<HashMap<String, String>> {
    let mut out = Vec::new();
    for p in 0..PARTITIONS {
        let entries: Vec<(String, HashMap<String, String>)> = redis
            .xrange(aggregator::source::redis::dead_key(p), "-", "+", None)
            .await
            .expect("dead letters readable");
        out.extend(entries.into_iter().map(|(_, f)| f));
    }
    out
}

/// One aggregator's place: its process (none between a kill and its restart).
struct Slot {
    id: String,
    process: Option<Aggregator>,
    /// Started with the failpoint: it may end by itself.
    failpoint: bool,
    /// When to start it again after a kill, and with which failpoint.
    restart: Option<(Instant, Option<u64>)>,
}

/// The two aggregators: started, killed, restarted; only a failpoint may end one.
struct Aggregators {
    clickhouse: String,
    redis: String,
    logs: tempfile::TempDir,
    slots: Vec<Slot>,
    kills: usize,
    failpoints_fired: usize,
}

impl Aggregators {
    fn start(clickhouse: &str, redis: &str) -> Aggregators {
        let logs = tempfile::Builder::new()
            .prefix("aggregators-")
            .tempdir()
            .unwrap();
        let mut aggs = Aggregators {
            clickhouse: clickhouse.into(),
            redis: redis.into(),
            logs,
            slots: Vec::new(),
            kills: 0,
            failpoints_fired: 0,
        };
        for id in ["agg-a", "agg-b"] {
            let process = Some(aggs.spawn(id, None));
            aggs.slots.push(Slot {
                id: id.into(),
                process,
                failpoint: false,
                restart: None,
            });
        }
        aggs
    }

    fn spawn(&self, id: &str, failpoint: Option<u64>) -> Aggregator {
        let mut args: Vec<String> = AGGREGATE_ARGS.iter().map(|s| s.to_string()).collect();
        if let Some(n) = failpoint {
            args.extend(["--exit-after-insert".to_string(), n.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Aggregator::start(&self.clickhouse, &self.redis, id, &args, self.logs.path())
    }

    /// Starts what is due to restart, and restarts an aggregator its failpoint ended; any
    /// other exit fails the test.
    fn supervise(&mut self) {
        for k in 0..self.slots.len() {
            if let Some((when, failpoint)) = self.slots[k].restart {
                if Instant::now() >= when {
                    let process = self.spawn(&self.slots[k].id, failpoint);
                    let slot = &mut self.slots[k];
                    slot.process = Some(process);
                    slot.failpoint = failpoint.is_some();
                    slot.restart = None;
                }
                continue;
            }
            let slot = &mut self.slots[k];
            let process = slot.process.as_mut().expect("running");
            let Some(status) = process.exited() else {
                continue;
            };
            assert!(
                slot.failpoint && !status.success(),
                "aggregator {} exited by itself ({status})\n{}",
                slot.id,
                process.log_tail()
            );
            eprintln!(
                "{}: the failpoint fired (aborted between an insert and its acknowledgement); restarted",
                slot.id
            );
            self.failpoints_fired += 1;
            let process = self.spawn(&self.slots[k].id, None);
            let slot = &mut self.slots[k];
            slot.process = Some(process);
            slot.failpoint = false;
        }
    }

    /// Whether every aggregator runs (none waits for its restart).
    fn all_running(&self) -> bool {
        self.slots.iter().all(|s| s.restart.is_none())
    }

    /// SIGKILLs the aggregator in slot `k` (or, if that one waits for its restart or its
    /// failpoint, the other one; if neither runs free of a failpoint, the first that does)
    /// and schedules its restart after `pause`, with the failpoint if given. Returns its id.
    async fn kill(&mut self, k: usize, pause: Duration, failpoint: Option<u64>) -> String {
        let k = loop {
            self.supervise();
            let free = |s: &Slot| s.process.is_some() && s.restart.is_none() && !s.failpoint;
            if let Some(k) = [k, 1 - k].into_iter().find(|k| free(&self.slots[*k])) {
                break k;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let slot = &mut self.slots[k];
        let mut process = slot.process.take().expect("running");
        process.kill9().await;
        slot.restart = Some((Instant::now() + pause, failpoint));
        self.kills += 1;
        slot.id.clone()
    }

    /// Stops every aggregator with SIGTERM; each must exit cleanly.
    async fn terminate(&mut self) {
        self.supervise();
        for slot in &mut self.slots {
            let process = slot.process.as_mut().expect("running");
            let status = process.terminate().await;
            assert!(
                status.success(),
                "{} stopped with {status}\n{}",
                slot.id,
                process.log_tail()
            );
        }
    }

    fn log_tails(&self) -> String {
        self.slots
            .iter()
            .filter_map(|s| s.process.as_ref().map(Aggregator::log_tail))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A fault, once enough operations are answered.
#[derive(Debug)]
enum Fault {
    Kill { slot: usize, failpoint: Option<u64> },
    StopClickHouse,
    RestartRedis,
}

/// Rows of a query of one string column.
async fn strings(ch: &ClickHouseServer, sql: &str) -> Vec<String> {
    ch.client("allot")
        .query(sql)
        .fetch_all::<String>()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_events_survive_kills_outages_and_bad_input_exactly_once() {
    let seed = std::env::var("ALLOT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("seed {seed} (ALLOT_TEST_SEED={seed} replays the workload and the fault schedule)");
    let mut rng = Rng(seed);
    let started = Instant::now();
    let at = || format!("{:>6.1}s", started.elapsed().as_secs_f64());

    // appendfsync always: what Redis acknowledged survives its SIGKILL.
    let mut redis = RedisServer::start_with(&["--appendfsync", "always"]).await;
    let mut ch = ClickHouseServer::start().await;

    // The schema first, then the rejection: a column whose default throws for one tenant,
    // which shares its partition with a good tenant (t00) so that its events sit inside
    // batches of good ones.
    let rejected = (0..)
        .map(|k| format!("rejected-{k}"))
        .find(|t| partition(t) == partition("t00"))
        .unwrap();
    let mut opts = aggregator::AggregateOptions::new(&ch.url, &redis.url);
    opts.database = "allot".into();
    let cfg = opts.clickhouse();
    aggregator::sink::ClickHouse::create_database(&cfg)
        .await
        .unwrap();
    aggregator::schema::migrate(&aggregator::sink::ClickHouse::new(&cfg))
        .await
        .unwrap();
    ch.client("allot")
        .query("ALTER TABLE usage_events ADD COLUMN poison UInt8 DEFAULT throwIf(tenant = ?)")
        .bind(&rejected)
        .execute()
        .await
        .unwrap();

    let mut nodes = Vec::new();
    for _ in 0..2 {
        nodes.push(
            Node::on_redis(CATALOG, &redis.url)
                .arg("--sweep-interval")
                .arg("200ms")
                .start()
                .await,
        );
    }
    let mut admin = nodes[0].admin().await;
    let tenants: Vec<String> = (0..TENANTS).map(|k| format!("t{k:02}")).collect();
    for t in tenants.iter().chain([&rejected]) {
        subscribe(&mut admin, t, "p").await;
    }
    let parts: HashSet<u16> = tenants.iter().map(|t| partition(t)).collect();
    eprintln!(
        "{} tenants in {} partitions; rejected tenant {rejected} shares p{:02} with t00",
        tenants.len(),
        parts.len(),
        partition(&rejected)
    );
    let mut clients = Vec::new();
    for node in &nodes {
        let mut cs = Vec::new();
        for _ in 0..CHANNELS {
            cs.push(node.enforcer().await);
        }
        clients.push(cs);
    }
    let clients = Arc::new(clients);
    let redis_client = Builder::from_config(Config::from_url(&redis.url).unwrap())
        .set_policy(ReconnectPolicy::new_constant(0, 100))
        .build()
        .unwrap();
    redis_client.init().await.unwrap();

    let mut aggs = Aggregators::start(&ch.url, &redis.url);

    // The fault schedule, by operations answered.
    let n = EVENTS as f64;
    // The kill whose restart has the failpoint comes early enough for it to fire.
    let mut faults: Vec<(u64, Fault)> = (0..KILLS_DURING_LOAD)
        .map(|k| {
            let failpoint = (k == 0).then(|| 1 + rng.below(3));
            let slot = rng.below(2) as usize;
            let point = if k == 0 {
                rng.between(0.1, 0.6)
            } else {
                rng.between(0.05, 0.9)
            };
            ((n * point) as u64, Fault::Kill { slot, failpoint })
        })
        .collect();
    faults.push(((n * rng.between(0.1, 0.25)) as u64, Fault::StopClickHouse));
    faults.push(((n * rng.between(0.35, 0.75)) as u64, Fault::RestartRedis));
    faults.sort_by_key(|(p, _)| *p);
    eprintln!("fault schedule (operations answered, fault): {faults:?}");

    let shared = Arc::new(Shared {
        seed,
        rejected: rejected.clone(),
        next: AtomicU64::new(0),
        done: AtomicU64::new(0),
        doubts: AtomicU64::new(0),
        ledger: Mutex::new(Ledger::default()),
        retries: Mutex::new(Vec::new()),
    });
    let loader = tokio::spawn(load(shared.clone(), clients.clone()));
    let stop_bad = Arc::new(AtomicBool::new(false));
    let bad = tokio::spawn(bad_input(clients.clone(), stop_bad.clone()));

    // The fault loop: faults at their points, ClickHouse back after its outage (and two
    // more kills soon after, while its backlog goes in), killed aggregators back after
    // their pause; until the load is done and every aggregator runs.
    let mut faults = faults.into_iter().peekable();
    let mut clickhouse_down: Option<(Instant, u64)> = None;
    let mut answered_while_clickhouse_down = None;
    let mut backlog_kills: Option<Vec<Instant>> = None;
    let mut said = Instant::now();
    loop {
        aggs.supervise();
        let done = shared.done.load(Ordering::Relaxed);
        if said.elapsed() >= Duration::from_secs(10) && !loader.is_finished() {
            eprintln!("{} {done} answered", at());
            said = Instant::now();
        }
        if let Some((since, before)) = clickhouse_down {
            if since.elapsed() >= CLICKHOUSE_OUTAGE {
                answered_while_clickhouse_down = Some(done - before);
                ch.start_again().await;
                clickhouse_down = None;
                backlog_kills = Some(
                    (0..KILLS_AFTER_OUTAGE)
                        .map(|_| Instant::now() + Duration::from_millis(300 + rng.below(3000)))
                        .collect(),
                );
                eprintln!(
                    "{} clickhouse back; {} operations answered while it was down",
                    at(),
                    done - before
                );
            }
        }
        let point_reached = faults
            .peek()
            .is_some_and(|(point, _)| done >= *point || loader.is_finished());
        if point_reached {
            let (_, fault) = faults.next().unwrap();
            match fault {
                Fault::Kill { slot, failpoint } => {
                    let pause = Duration::from_millis(rng.below(1500));
                    let id = aggs.kill(slot, pause, failpoint).await;
                    eprintln!(
                        "{} {done} answered: SIGKILL {id}, restart after {pause:?}{}",
                        at(),
                        failpoint
                            .map_or(String::new(), |k| format!(" with --exit-after-insert {k}"))
                    );
                }
                Fault::StopClickHouse => {
                    eprintln!(
                        "{} {done} answered: SIGKILL clickhouse for {CLICKHOUSE_OUTAGE:?}",
                        at()
                    );
                    ch.kill9().await;
                    clickhouse_down = Some((Instant::now(), done));
                }
                Fault::RestartRedis => {
                    eprintln!(
                        "{} {done} answered: SIGKILL redis for {REDIS_OUTAGE:?}",
                        at()
                    );
                    redis.kill9().await;
                    tokio::time::sleep(REDIS_OUTAGE).await;
                    redis.restart().await;
                    eprintln!("{} redis back", at());
                }
            }
            continue;
        }
        if let Some(kills) = &mut backlog_kills {
            if let Some(k) = kills.iter().position(|t| Instant::now() >= *t) {
                kills.remove(k);
                let slot = rng.below(2) as usize;
                let pause = Duration::from_millis(rng.below(1500));
                let id = aggs.kill(slot, pause, None).await;
                eprintln!(
                    "{} {done} answered, clickhouse's backlog going in: SIGKILL {id}, restart after {pause:?}",
                    at()
                );
                continue;
            }
        }
        let finished = loader.is_finished()
            && faults.peek().is_none()
            && backlog_kills.as_ref().is_some_and(Vec::is_empty)
            && aggs.all_running();
        if finished {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    loader.await.expect("the load");
    stop_bad.store(true, Ordering::Relaxed);
    let bad_sent = bad.await.expect("bad input");
    eprintln!(
        "{} load done: {EVENTS} operations answered ({} answers were not definite and were retried); {bad_sent} bad requests refused; {} aggregator kills",
        at(),
        shared.doubts.load(Ordering::Relaxed),
        aggs.kills
    );

    // Drained: every stream entry acknowledged, and ClickHouse (or the dead letters) has
    // at least what the client saw (the nodes' local events are shipped to the streams
    // last). Bounded, and the checks below say what is missing if the time runs out.
    let ledger = std::mem::take(&mut *shared.ledger.lock().unwrap());
    let expected = (
        ledger.usage.len() as u64,
        ledger.releases.len() as u64,
        ledger.denials,
        ledger.rejected.len() as u64,
    );
    let deadline = Instant::now() + DRAIN_DEADLINE;
    let mut said = Instant::now();
    let mut seen = (0, 0, 0, 0);
    let mut open = u64::MAX;
    while Instant::now() < deadline {
        aggs.supervise();
        open = unacknowledged(&redis_client).await.unwrap_or(u64::MAX);
        let (usage, releases): (u64, u64) = ch
            .client("allot")
            .query("SELECT countIf(kind IN ('commit', 'record')), countIf(kind = 'release') FROM usage_events")
            .fetch_one()
            .await
            .unwrap_or_default();
        let denials: u64 = ch
            .client("allot")
            .query("SELECT count() FROM denials")
            .fetch_one()
            .await
            .unwrap_or_default();
        seen = (
            usage,
            releases,
            denials,
            dead_letters(&redis_client).await.len() as u64,
        );
        let all = seen.0 >= expected.0
            && seen.1 >= expected.1
            && seen.2 >= expected.2
            && seen.3 >= expected.3;
        if open == 0 && all {
            break;
        }
        if said.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "{} draining: {open} entries unacknowledged; (usage, releases, denials, dead letters) {seen:?} of {expected:?}",
                at()
            );
            said = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "{} drained: {open} entries unacknowledged; (usage, releases, denials, dead letters) {seen:?} of {expected:?}",
        at()
    );
    // Streams may still get the nodes' last shipments: give them a moment to show, then
    // stop the aggregators (each inserts what it holds) and look.
    tokio::time::sleep(Duration::from_secs(1)).await;
    while unacknowledged(&redis_client).await.unwrap_or(1) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let logs = aggs.log_tails();
    aggs.terminate().await;

    // Usage: every acknowledged commit and record, once, and nothing else.
    let found = strings(
        &ch,
        "SELECT event_id FROM usage_events WHERE kind IN ('commit', 'record')",
    )
    .await;
    let (missing, extra, twice, examples) = compare(&ledger.usage, &found);
    assert_eq!(
        (missing, extra, twice),
        (0, 0, 0),
        "usage_events vs the acknowledged commits and records: {examples}\n{logs}"
    );
    let (rows, unique) = usage_rows(&ch).await;
    assert_eq!(
        (rows, unique),
        (ledger.usage.len() as u64, ledger.usage.len() as u64)
    );

    // Totals, to the unit: the monthly rollup, the daily rollup, the raw events.
    assert_eq!(
        monthly_totals(&ch).await,
        ledger.totals,
        "monthly rollup vs ledger"
    );
    for (what, sql) in [
        ("daily rollup", aggregator::queries::DAILY_USAGE),
        ("raw events", aggregator::queries::MONTHLY_USAGE_FROM_EVENTS),
    ] {
        let rows: Vec<(String, String, u32, i64, u64)> =
            ch.client("allot").query(sql).fetch_all().await.unwrap();
        let mut totals = Totals::new();
        for (t, m, _, a, _) in rows {
            *totals.entry((t, m)).or_default() += a;
        }
        assert_eq!(totals, ledger.totals, "{what} vs ledger");
    }

    // Releases, once each; every denial the client saw (a denial answer that was lost in
    // an outage and retried may be there twice: each attempt is an event).
    let found = strings(
        &ch,
        "SELECT event_id FROM usage_events WHERE kind = 'release'",
    )
    .await;
    let (missing, extra, twice, examples) = compare(&ledger.releases, &found);
    assert_eq!((missing, extra, twice), (0, 0, 0), "releases: {examples}");
    let denials = strings(&ch, "SELECT event_id FROM denials").await;
    let denied: HashSet<&str> = denials.iter().map(String::as_str).collect();
    let lost: Vec<&String> = ledger
        .record_denials
        .iter()
        .filter(|id| !denied.contains(id.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "denials the client saw, not in ClickHouse: {lost:?}"
    );
    let doubts = shared.doubts.load(Ordering::Relaxed);
    assert!(
        (ledger.denials..=ledger.denials + doubts).contains(&(denials.len() as u64)),
        "{} denials in ClickHouse; the client saw {} and retried {doubts} answers",
        denials.len(),
        ledger.denials
    );
    let expired: u64 = ch
        .client("allot")
        .query("SELECT count() FROM usage_events WHERE kind = 'expire'")
        .fetch_one()
        .await
        .unwrap();
    assert!(
        expired <= doubts,
        "{expired} expiries, {doubts} retried answers"
    );

    // The rejected tenant: nothing in usage_events, every event of it in the dead letters
    // once, with its fields and ClickHouse's reason; nothing else there. Redis counted it.
    let dead = dead_letters(&redis_client).await;
    let ids: Vec<String> = dead
        .iter()
        .map(|d| d.get("i").cloned().unwrap_or_default())
        .collect();
    let (missing, extra, twice, examples) = compare(&ledger.rejected, &ids);
    assert_eq!(
        (missing, extra, twice),
        (0, 0, 0),
        "dead letters: {examples}"
    );
    assert!(
        !ledger.rejected.is_empty(),
        "the rejected tenant's events were acknowledged"
    );
    for d in &dead {
        assert!(
            d.get("error")
                .is_some_and(|e| e.starts_with("clickhouse") && e.contains("code 395"))
                && d.contains_key("entry"),
            "a dead letter names its entry and ClickHouse's reason: {d:?}"
        );
        assert!(
            d.get("c")
                .is_some_and(|c| c.contains(&format!("\"{rejected}\""))),
            "the fields are kept: {d:?}"
        );
    }
    let rejected_rows: u64 = ch
        .client("allot")
        .query("SELECT count() FROM usage_events WHERE tenant = ?")
        .bind(&rejected)
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(rejected_rows, 0);
    let mut e = nodes[0].enforcer().await;
    assert_eq!(
        window_usage(&mut e, &rejected, "calls", "day").await.0,
        ledger.rejected_units,
        "Redis counted the rejected tenant's acknowledged usage"
    );

    // No bad request left an event.
    let traces: u64 = ch
        .client("allot")
        .query("SELECT count() FROM usage_events WHERE startsWith(event_id, 'bad-')")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(traces, 0, "events of refused bad requests");
    assert!(
        bad_sent >= 7,
        "every kind of bad request was sent ({bad_sent})"
    );

    // What the events say: dimensions on every usage row; soft overage flagged past the
    // allowance and only there; fail-open admissions during the Redis outage marked.
    let undimensioned: u64 = ch
        .client("allot")
        .query("SELECT count() FROM usage_events WHERE kind IN ('commit', 'record') AND dim_keys != ['api_key', 'endpoint_class']")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(undimensioned, 0, "usage rows without their dimensions");
    // Per tenant and month (the soft window): what was not flagged fits the allowance.
    let soft: Vec<(String, u32, i64, u64)> = ch
        .client("allot")
        .query("SELECT tenant, toYYYYMM(event_time) AS m, sumIf(amount, overage = 0), countIf(overage = 1) FROM usage_events WHERE metric = 'soft_calls' AND kind = 'record' GROUP BY tenant, m ORDER BY tenant, m")
        .fetch_all()
        .await
        .unwrap();
    let flagged: HashSet<&str> = soft
        .iter()
        .filter(|s| s.3 > 0)
        .map(|s| s.0.as_str())
        .collect();
    assert_eq!(flagged.len() as u64, TENANTS, "overage flagged: {soft:?}");
    for (t, month, within, over) in &soft {
        assert!(
            *within <= SOFT_LIMIT,
            "{t} in {month}: {within} units within the soft allowance of {SOFT_LIMIT}, {over} events past it"
        );
    }
    let marked = strings(
        &ch,
        "SELECT event_id FROM usage_events WHERE kind IN ('commit', 'record') AND degraded = 1",
    )
    .await;
    let degraded = marked.len();
    let marked: HashSet<String> = marked.into_iter().collect();
    assert!(
        !ledger.degraded_sure.is_empty(),
        "usage admitted while Redis was down"
    );
    let unmarked: Vec<&String> = ledger.degraded_sure.difference(&marked).collect();
    let wrongly: Vec<&String> = marked.difference(&ledger.degraded_usage).collect();
    assert!(
        unmarked.is_empty() && wrongly.is_empty() && degraded == marked.len(),
        "degraded marks: admitted while Redis was down but not marked {:?}; marked but not so admitted {:?}",
        &unmarked[..unmarked.len().min(5)],
        &wrongly[..wrongly.len().min(5)]
    );

    // Each fault happened.
    assert_eq!(aggs.kills, KILLS_DURING_LOAD + KILLS_AFTER_OUTAGE, "kills");
    assert_eq!(aggs.failpoints_fired, 1, "the failpoint fired");
    assert!(
        answered_while_clickhouse_down.is_some_and(|n| n > 0),
        "operations answered while ClickHouse was down: {answered_while_clickhouse_down:?}"
    );
    assert!(
        ledger
            .reasons
            .get("backend_unavailable")
            .is_some_and(|n| *n > 0)
            && ledger.reasons.get("limit_exceeded").is_some_and(|n| *n > 0),
        "denials by reason: {:?}",
        ledger.reasons
    );

    let units: i64 = ledger.totals.values().sum();
    eprintln!(
        "{} exact: {} usage events ({units} units) over {} tenant × metric totals, {} releases, {} denials ({:?}), {} admitted while Redis was down ({degraded} rows marked degraded), {} events rejected by ClickHouse in the dead letters, {expired} expiries",
        at(),
        ledger.usage.len(),
        ledger.totals.len(),
        ledger.releases.len(),
        denials.len(),
        ledger.reasons,
        ledger.degraded,
        ledger.rejected.len()
    );
    // Stopped here, waiting asynchronously: quicker than their Drop.
    ch.kill9().await;
    redis.kill9().await;
}
