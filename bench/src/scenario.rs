//! Running one cell: a scenario at a concurrency for a warmup then a measured duration.
//!
//! Each worker owns one request in flight and loops until the deadline, on a channel
//! picked round-robin (or, for redis-script, on the one shared Redis client) and a tenant
//! picked round-robin. Latencies of successful operations
//! go to a per-worker HDR histogram (nanoseconds), merged at the end; failed operations
//! (gRPC errors, and denials, which the bench catalog never warrants) are counted by kind.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use allot_proto::v1::enforcer_client::EnforcerClient;
use allot_proto::v1::{
    CheckRequest, CommitRequest, Decision, Outcome, RecordRequest, ReserveRequest,
};
use anyhow::Context as _;
use hdrhistogram::Histogram;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use crate::cli::Scenario;
use crate::noop::pb::noop_client::NoopClient;
use crate::noop::pb::EchoRequest;
use crate::redis::{ScriptPair, ScriptTarget};
use crate::setup::{check_request, is_local_reservation, tenant, FEATURE, METRIC, SOFT_METRIC};

/// Highest latency the histograms track: one minute, in nanoseconds.
pub const MAX_NANOS: u64 = 60_000_000_000;

/// What a cell's workers talk to.
#[derive(Clone, Copy)]
pub enum Target<'a> {
    /// gRPC channels to a node or the no-op server, taken round-robin.
    Grpc(&'a [Channel]),
    /// The bench's Redis, through one shared client (redis-script).
    Script(&'a Arc<ScriptTarget>),
}

/// What a cell needs besides its channels.
#[derive(Debug, Clone)]
pub struct CellSpec {
    /// The scenario.
    pub scenario: Scenario,
    /// Workers, i.e. operations in flight.
    pub concurrency: usize,
    /// Unmeasured time first.
    pub warmup: Duration,
    /// Measured time.
    pub duration: Duration,
    /// Tenants to spread workers over.
    pub tenants: usize,
    /// Unique per run; makes idempotency keys unique across runs on the same node.
    pub run_id: String,
    /// `authorization` sent with every call (`Bearer <token>`), for nodes that check
    /// tokens (the cluster's); none for the nodes the bench starts (`--insecure-no-auth`).
    pub bearer: Option<MetadataValue<Ascii>>,
}

/// The `authorization` value for `token`.
pub fn bearer(token: &str) -> anyhow::Result<MetadataValue<Ascii>> {
    format!("Bearer {}", token.trim())
        .parse()
        .context("the token is not a valid header value")
}

/// `message` as a request carrying `bearer`, if any.
pub fn authed<T>(bearer: Option<&MetadataValue<Ascii>>, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(b) = bearer {
        request.metadata_mut().insert("authorization", b.clone());
    }
    request
}

/// Failed operations of one kind.
#[derive(Debug, Clone, Default)]
pub struct ErrorKind {
    /// How many.
    pub count: u64,
    /// The message of the first one.
    pub example: String,
}

/// What a cell measured.
#[derive(Debug)]
pub struct CellResult {
    /// The scenario.
    pub scenario: Scenario,
    /// Workers.
    pub concurrency: usize,
    /// Latencies of successful operations, in nanoseconds.
    pub histogram: Histogram<u64>,
    /// Failed operations.
    pub errors: u64,
    /// Failed operations by kind (gRPC code, or `denied:<reason>`).
    pub error_kinds: BTreeMap<String, ErrorKind>,
    /// Length of the measurement.
    pub measured: Duration,
}

impl CellResult {
    /// Successful operations.
    pub fn ok(&self) -> u64 {
        self.histogram.len()
    }

    /// Successful operations per second.
    pub fn ops_per_sec(&self) -> f64 {
        self.ok() as f64 / self.measured.as_secs_f64().max(1e-9)
    }

    /// Failed operations over all operations, 0 to 1.
    pub fn error_rate(&self) -> f64 {
        let total = self.ok() + self.errors;
        if total == 0 {
            0.0
        } else {
            self.errors as f64 / total as f64
        }
    }
}

/// Why an operation failed.
pub struct Failure {
    /// Its kind, the key errors are counted by.
    pub kind: String,
    /// A message, shown once per kind.
    pub detail: String,
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        Failure {
            kind: format!("{:?}", s.code()),
            detail: s.message().to_owned(),
        }
    }
}

/// Ok when the decision allows.
pub fn allowed(decision: Option<&Decision>) -> Result<(), Failure> {
    let Some(d) = decision else {
        return Err(Failure {
            kind: "no_decision".into(),
            detail: "the response carried no decision".into(),
        });
    };
    match d.outcome() {
        Outcome::Allow | Outcome::AllowWithWarning => Ok(()),
        other => Err(Failure {
            kind: format!("denied:{}", d.reason),
            detail: format!("{other:?}: {}", d.message),
        }),
    }
}

/// One worker's way of doing one operation, and the token it presents.
struct Driver {
    op: Op,
    bearer: Option<MetadataValue<Ascii>>,
}

/// The operation itself.
enum Op {
    Ceiling {
        client: NoopClient<Channel>,
        request: EchoRequest,
    },
    Check {
        client: EnforcerClient<Channel>,
        request: CheckRequest,
    },
    ReserveCommit {
        client: EnforcerClient<Channel>,
        tenant: String,
        metric: &'static str,
        /// soft-reserve: the reservation must come from the node's local store.
        expect_local: bool,
        key_prefix: String,
        seq: u64,
    },
    Record {
        client: EnforcerClient<Channel>,
        tenant: String,
        key_prefix: String,
        seq: u64,
    },
    Script(ScriptPair),
}

impl Driver {
    fn new(spec: &CellSpec, worker: usize, target: Target<'_>) -> anyhow::Result<Self> {
        Ok(Driver {
            op: Op::new(spec, worker, target)?,
            bearer: spec.bearer.clone(),
        })
    }

    async fn once(&mut self) -> Result<(), Failure> {
        self.op.once(self.bearer.as_ref()).await
    }
}

impl Op {
    fn new(spec: &CellSpec, worker: usize, target: Target<'_>) -> anyhow::Result<Self> {
        let t = worker % spec.tenants.max(1);
        let key_prefix = format!(
            "bench-{}-{}-c{}-w{worker}",
            spec.run_id,
            key_tag(spec.scenario),
            spec.concurrency
        );
        let channel = match (spec.scenario, target) {
            (Scenario::RedisScript, Target::Script(script)) => {
                return Ok(Op::Script(ScriptPair::new(
                    script.clone(),
                    tenant(t),
                    key_prefix,
                )));
            }
            (
                Scenario::RedisScript
                | Scenario::Propagation
                | Scenario::Ingest
                | Scenario::Cluster,
                _,
            )
            | (_, Target::Script(_)) => {
                anyhow::bail!("{} cannot run on this target", spec.scenario.name())
            }
            (_, Target::Grpc(channels)) => {
                anyhow::ensure!(!channels.is_empty(), "no channel to run on");
                channels[worker % channels.len()].clone()
            }
        };
        Ok(match spec.scenario {
            Scenario::Ceiling => Op::Ceiling {
                client: NoopClient::new(channel),
                request: crate::noop::echo_request(&check_request(t)),
            },
            Scenario::Check => Op::Check {
                client: EnforcerClient::new(channel),
                request: check_request(t),
            },
            Scenario::CheckFeature => Op::Check {
                client: EnforcerClient::new(channel),
                request: CheckRequest {
                    tenant: tenant(t),
                    feature: FEATURE.to_owned(),
                    ..Default::default()
                },
            },
            Scenario::ReserveCommit | Scenario::HardReserve | Scenario::SoftReserve => {
                let soft = spec.scenario == Scenario::SoftReserve;
                Op::ReserveCommit {
                    client: EnforcerClient::new(channel),
                    tenant: tenant(t),
                    metric: if soft { SOFT_METRIC } else { METRIC },
                    expect_local: soft,
                    key_prefix,
                    seq: 0,
                }
            }
            Scenario::Record => Op::Record {
                client: EnforcerClient::new(channel),
                tenant: tenant(t),
                key_prefix,
                seq: 0,
            },
            Scenario::RedisScript
            | Scenario::Propagation
            | Scenario::Ingest
            | Scenario::Cluster => {
                unreachable!("matched above")
            }
        })
    }

    async fn once(&mut self, bearer: Option<&MetadataValue<Ascii>>) -> Result<(), Failure> {
        match self {
            Op::Ceiling { client, request } => {
                client.echo(request.clone()).await?;
                Ok(())
            }
            Op::Check { client, request } => {
                let r = client
                    .check(authed(bearer, request.clone()))
                    .await?
                    .into_inner();
                allowed(r.decision.as_ref())
            }
            Op::Record {
                client,
                tenant,
                key_prefix,
                seq,
            } => {
                *seq += 1;
                let r = client
                    .record(authed(
                        bearer,
                        RecordRequest {
                            tenant: tenant.clone(),
                            metric: METRIC.to_owned(),
                            amount: 1,
                            event_id: format!("{key_prefix}-{seq}"),
                            ..Default::default()
                        },
                    ))
                    .await?
                    .into_inner();
                allowed(r.decision.as_ref())
            }
            Op::ReserveCommit {
                client,
                tenant,
                metric,
                expect_local,
                key_prefix,
                seq,
            } => {
                *seq += 1;
                let reserved = client
                    .reserve(authed(
                        bearer,
                        ReserveRequest {
                            tenant: tenant.clone(),
                            metric: (*metric).to_owned(),
                            amount: 1,
                            idempotency_key: format!("{key_prefix}-{seq}"),
                            ..Default::default()
                        },
                    ))
                    .await?
                    .into_inner();
                allowed(reserved.decision.as_ref())?;
                if reserved.reservation_id.is_empty() {
                    return Err(Failure {
                        kind: "no_reservation_id".into(),
                        detail: "Reserve was allowed but returned no reservation id".into(),
                    });
                }
                local_as_expected(*expect_local, &reserved.reservation_id)?;
                client
                    .commit(authed(
                        bearer,
                        CommitRequest {
                            tenant: tenant.clone(),
                            reservation_id: reserved.reservation_id,
                            actual_amount: 1,
                        },
                    ))
                    .await?;
                Ok(())
            }
            Op::Script(pair) => pair.once().await,
        }
    }
}

/// soft-reserve measures the local path only: a reservation that Redis made (the
/// node sent the request to Redis after all) is a failure, not a sample.
fn local_as_expected(expect_local: bool, reservation_id: &str) -> Result<(), Failure> {
    if expect_local && !is_local_reservation(reservation_id) {
        return Err(Failure {
            kind: "not_local".into(),
            detail: format!(
                "reservation {reservation_id:?} was not made by the node's local store \
                 (expected an id starting with {:?})",
                crate::setup::LOCAL_PREFIX
            ),
        });
    }
    Ok(())
}

/// Keeps idempotency keys of different scenarios apart (they may share a Redis).
fn key_tag(s: Scenario) -> &'static str {
    match s {
        Scenario::HardReserve => "hr",
        Scenario::RedisScript => "rs",
        Scenario::SoftReserve => "sr",
        Scenario::Record => "rec",
        _ => "rc",
    }
}

struct WorkerOutcome {
    histogram: Histogram<u64>,
    errors: u64,
    error_kinds: BTreeMap<String, ErrorKind>,
}

async fn worker(
    mut driver: Driver,
    measure_from: Instant,
    deadline: Instant,
) -> anyhow::Result<WorkerOutcome> {
    let mut out = WorkerOutcome {
        histogram: Histogram::new_with_bounds(1, MAX_NANOS, 3)?,
        errors: 0,
        error_kinds: BTreeMap::new(),
    };
    loop {
        let start = Instant::now();
        if start >= deadline {
            break;
        }
        let result = driver.once().await;
        let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if start < measure_from {
            continue;
        }
        match result {
            Ok(()) => out.histogram.saturating_record(nanos.max(1)),
            Err(f) => {
                out.errors += 1;
                let kind = out.error_kinds.entry(f.kind).or_default();
                if kind.count == 0 {
                    kind.example = f.detail;
                }
                kind.count += 1;
            }
        }
    }
    Ok(out)
}

/// Runs one cell on `target` and merges what the workers measured.
pub async fn run_cell(spec: &CellSpec, target: Target<'_>) -> anyhow::Result<CellResult> {
    let drivers = (0..spec.concurrency)
        .map(|w| Driver::new(spec, w, target))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let begin = Instant::now();
    let measure_from = begin + spec.warmup;
    let deadline = measure_from + spec.duration;
    let handles: Vec<_> = drivers
        .into_iter()
        .map(|driver| tokio::spawn(worker(driver, measure_from, deadline)))
        .collect();

    let mut result = CellResult {
        scenario: spec.scenario,
        concurrency: spec.concurrency,
        histogram: Histogram::new_with_bounds(1, MAX_NANOS, 3)?,
        errors: 0,
        error_kinds: BTreeMap::new(),
        measured: spec.duration,
    };
    for handle in handles {
        let out = handle.await.context("a worker panicked")??;
        result.histogram.add(&out.histogram)?;
        result.errors += out.errors;
        for (k, v) in out.error_kinds {
            let merged = result.error_kinds.entry(k).or_default();
            if merged.count == 0 {
                merged.example = v.example;
            }
            merged.count += v.count;
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_reserve_wants_local_ids() {
        assert!(local_as_expected(true, "sf-0193@127.0.0.1:1").is_ok());
        let err = local_as_expected(true, "0193c0de").err().unwrap();
        assert_eq!(err.kind, "not_local");
        assert!(local_as_expected(false, "0193c0de").is_ok());
        assert!(local_as_expected(false, "sf-0193@n").is_ok());
    }

    #[test]
    fn key_tags_are_distinct() {
        let tags: std::collections::BTreeSet<_> = [
            Scenario::ReserveCommit,
            Scenario::HardReserve,
            Scenario::RedisScript,
            Scenario::SoftReserve,
            Scenario::Record,
        ]
        .into_iter()
        .map(key_tag)
        .collect();
        assert_eq!(tags.len(), 5);
    }
}
