//! The aggregator: moves usage events from where nodes spool them into ClickHouse,
//! exactly once, and owns the ClickHouse schema and its rollups.
//!
//! A tour:
//!
//! - [`run`] is `allot aggregate`: migrate the schema ([`schema`]), then share the event
//!   partitions with the other aggregators and consume the ones it holds until shut down.
//! - [`source`] is where events come from: the [`source::Source`] trait (partitions,
//!   leases, offsets, acknowledgement, dead letters) and its implementations: Redis
//!   streams, and embedded nodes' spools over gRPC.
//! - `worker` (private) consumes one partition: this is where exactly once is made
//!   (read in order, skip what ClickHouse has, one month per insert, acknowledge after).
//! - [`sink`] talks to ClickHouse; [`row`] turns an entry into a `usage_events` row.
//! - [`queries`] are the rollup queries; [`billing`] bills overage from the raw events
//!   and exports periods; [`options`] the knobs and their defaults.
//!
//! `docs/clickhouse.md` has the schema, the exactly-once argument and the cluster DDL.

pub mod billing;
pub mod error;
pub mod metrics;
pub mod options;
pub mod queries;
pub mod row;
pub mod schema;
pub mod sink;
pub mod source;
mod worker;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use error::{AggregateError, SinkError, SourceError};
pub use options::{AggregateArgs, AggregateOptions, LogFormat};
pub use worker::Stats;

use sink::ClickHouse;
use source::Source;
use worker::{Backoff, Ctx, End};

/// Runs an aggregator until `shutdown` completes: migrates the schema (waiting for
/// ClickHouse while it is unreachable), connects to Redis (or to the embedded nodes'
/// spools: one partition each, dead letters in ClickHouse), then consumes its share of the
/// partitions. On shutdown each partition's current batch is inserted if ClickHouse
/// answers, and the leases are given back. Acknowledged entries are trimmed from the
/// streams after each batch unless `keep_acknowledged`.
pub async fn run(
    opts: AggregateOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AggregateError> {
    opts.validate()?;
    tokio::pin!(shutdown);
    let cfg = opts.clickhouse();
    let sink = ClickHouse::new(&cfg);
    if let Some(addr) = opts.http_listen {
        metrics::serve(addr, sink.clone())
            .await
            .map_err(|e| AggregateError::Http(format!("--http-listen {addr}: {e}")))?;
    }
    let mut backoff = Backoff::new(opts.retry_min, opts.retry_max);
    loop {
        let attempt = async {
            ClickHouse::create_database(&cfg)
                .await
                .map_err(|error| schema::MigrationError {
                    version: 0,
                    name: "create database",
                    statement: 1,
                    error,
                })?;
            schema::migrate(&sink).await
        };
        match attempt.await {
            Ok(applied) => {
                tracing::info!(?applied, database = %opts.database, "schema up to date");
                break;
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "clickhouse unavailable for migrations; retrying");
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep(backoff.step()) => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    backoff.reset();
    if !opts.spool.is_empty() {
        let source = source::spool::SpoolSource::new(
            &opts.spool,
            &opts.aggregator_id,
            opts.lease_ttl,
            opts.spool_token.as_deref(),
            opts.spool_tls.as_ref().map(|t| &t.0),
            sink.clone(),
        )?;
        return consume(
            Arc::new(source),
            sink,
            opts,
            Arc::new(Stats::default()),
            shutdown,
        )
        .await;
    }
    let source = loop {
        match source::redis::RedisSource::connect(
            &opts.redis_url,
            &opts.aggregator_id,
            opts.lease_ttl,
        )
        .await
        {
            Ok(s) => break s.keep_acknowledged(opts.keep_acknowledged),
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "redis unavailable; retrying");
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep(backoff.step()) => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
    };
    consume(
        Arc::new(source),
        sink,
        opts,
        Arc::new(Stats::default()),
        shutdown,
    )
    .await
}

struct Running {
    stop: watch::Sender<bool>,
    handle: JoinHandle<End>,
    stopping: bool,
}

/// Shares `source`'s partitions with the other aggregators and consumes the ones it takes,
/// until `shutdown`: every third of a lease term, says it is alive, computes its share
/// (the partitions divided by the live aggregators, rounded up), takes free partitions up
/// to it and gives back any beyond it.
pub async fn consume(
    source: Arc<dyn Source>,
    sink: ClickHouse,
    opts: AggregateOptions,
    stats: Arc<Stats>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AggregateError> {
    tokio::pin!(shutdown);
    let me = opts.aggregator_id.clone();
    let tick = opts.lease_ttl / 3;
    let ctx = Arc::new(Ctx {
        sink,
        opts,
        stats: stats.clone(),
        query_seq: Default::default(),
    });
    let partitions = source.partitions();
    // Where this aggregator starts looking for free partitions: spread, so that several
    // starting at once do not all race for the same ones.
    let start = me
        .bytes()
        .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
        % partitions.len().max(1);
    let mut running: BTreeMap<u16, Running> = BTreeMap::new();
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(id = %me, partitions = partitions.len(), "aggregator running");
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = ticker.tick() => {}
        }
        // Workers that ended (lease lost, or stopped after their share shrank).
        let done: Vec<u16> = running
            .iter()
            .filter(|(_, r)| r.handle.is_finished())
            .map(|(p, _)| *p)
            .collect();
        for p in done {
            if let Some(r) = running.remove(&p) {
                if let Err(e) = r.handle.await {
                    tracing::error!(partition = p, error = %e, "partition worker panicked");
                }
            }
        }
        let live = match source.heartbeat().await {
            Ok(n) => {
                metrics::SOURCE_UP.store(true, Ordering::Relaxed);
                n
            }
            Err(e) => {
                metrics::SOURCE_UP.store(false, Ordering::Relaxed);
                tracing::warn!(error = %e, "heartbeat failed");
                continue;
            }
        };
        let share = partitions.len().div_ceil(live);
        let active = running.values().filter(|r| !r.stopping).count();
        if active < share {
            let mut active = active;
            for i in 0..partitions.len() {
                let p = partitions[(start + i) % partitions.len()];
                if running.contains_key(&p) {
                    continue;
                }
                match source.acquire(p).await {
                    Ok(Some(claim)) => {
                        let (stop, rx) = watch::channel(false);
                        let handle = tokio::spawn(worker::consume(claim, ctx.clone(), rx));
                        running.insert(
                            p,
                            Running {
                                stop,
                                handle,
                                stopping: false,
                            },
                        );
                        active += 1;
                        if active >= share {
                            break;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(partition = p, error = %e, "cannot take partition");
                        break;
                    }
                }
            }
        } else if active > share {
            let extra: Vec<u16> = running
                .iter()
                .filter(|(_, r)| !r.stopping)
                .map(|(p, _)| *p)
                .rev()
                .take(active - share)
                .collect();
            tracing::info!(live, share, giving_back = ?extra, "giving partitions back");
            for p in extra {
                if let Some(r) = running.get_mut(&p) {
                    r.stopping = true;
                    let _ = r.stop.send(true);
                }
            }
        }
        let held = running.values().filter(|r| !r.stopping).count();
        ::metrics::gauge!(metrics::PARTITIONS).set(held as f64);
    }
    tracing::info!(partitions = running.len(), "aggregator stopping");
    for r in running.values() {
        let _ = r.stop.send(true);
    }
    for (p, r) in running {
        if let Err(e) = r.handle.await {
            tracing::error!(partition = p, error = %e, "partition worker panicked");
        }
    }
    source.leave().await;
    tracing::info!(
        inserted = stats.inserted.load(Ordering::Relaxed),
        inserts = stats.inserts.load(Ordering::Relaxed),
        skipped = stats.skipped.load(Ordering::Relaxed),
        dead = stats.dead.load(Ordering::Relaxed),
        "aggregator stopped"
    );
    Ok(())
}

/// Sets up logs on stderr (levels from `RUST_LOG`, default `info`).
pub fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return ctrl_c.await.unwrap_or(()),
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

/// `allot aggregate` with parsed arguments: logs, signals, [`run`].
pub async fn main(args: AggregateArgs) -> Result<(), AggregateError> {
    init_logs(args.log_format);
    run(args.options(), shutdown_signal()).await
}
