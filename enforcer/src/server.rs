//! Wiring of a node: store → engine → gRPC services, plus the background sweeper.
//!
//! [`run`] takes a bound listener and a shutdown future (mini-redis style) so tests and the
//! binary start nodes the same way.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use allot_proto::v1::admin_server::AdminServer;
use allot_proto::v1::billing_server::BillingServer;
use allot_proto::v1::enforcer_server::EnforcerServer;
use allot_proto::v1::peer_server::PeerServer;
use allot_proto::v1::spool_server::SpoolServer;
use meter::store::{ControlStore, UsageStore};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::config::ServeConfig;
use crate::degraded::{EntryState, Journal};
use crate::embedded::EmbeddedStore;
use crate::engine::{Engine, SystemClock};
use crate::grpc::admin::AdminService;
use crate::grpc::billing::BillingService;
use crate::grpc::enforcer::EnforcerService;
use crate::grpc::spool::SpoolService;
use crate::peer::{PeerService, Peers};
use crate::redis::{RedisStore, Shipment};
use crate::soft::SoftState;

/// Most reservations released per sweep; the rest wait for the next one.
const SWEEP_BATCH: usize = 10_000;
/// Sweeps between prunings of full token buckets (they key on client-chosen dimension
/// values, so the map must not wait long to shrink).
const SWEEPS_PER_PRUNE: u64 = 10;
/// Sweeps between full checks of the Redis sweep index (the backstop for an index update
/// lost with a node).
const SWEEPS_PER_REINDEX: u64 = 60;
/// Sweeps between compactions of the store.
const SWEEPS_PER_COMPACTION: u64 = 600;

/// Why a node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] meter::store::StoreError),
    /// The engine could not start.
    #[error("{0}")]
    Engine(#[from] crate::engine::EngineError),
    /// The start catalog could not be read.
    #[error("cannot read catalog {path}: {source}")]
    CatalogFile {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A listener could not be bound.
    #[error("{what} {addr}: {source}")]
    Bind {
        /// The option.
        what: &'static str,
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A configuration file named by an option is unusable.
    #[error("{path}: {message}")]
    Config {
        /// The file.
        path: String,
        /// What is wrong, with the key.
        message: String,
    },
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Opens the store in `cfg.data_dir`, applies the start catalog, and serves on `listener`
/// until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    cfg: &ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    // Before anything records a metric.
    crate::metrics::handle();
    let backend = match &cfg.redis {
        Some(opts) => Backend::Redis(Box::new(RedisStore::connect(opts.clone()).await?)),
        None => Backend::Embedded(EmbeddedStore::open(&cfg.data_dir)?),
    };
    // The node's own disk store: the whole store when embedded, else the one that keeps
    // requests needing no network (soft windows only) beside Redis.
    let disk = match &backend {
        Backend::Embedded(s) => s.clone(),
        Backend::Redis(_) => EmbeddedStore::open(&cfg.data_dir.join("local"))?,
    };
    let advertise = match &cfg.peering.advertise {
        Some(a) => a.clone(),
        None => listener
            .local_addr()
            .map_err(|e| crate::engine::EngineError::Internal(format!("listen address: {e}")))?
            .to_string(),
    };
    let node_id = cfg
        .peering
        .node_id
        .clone()
        .unwrap_or_else(|| advertise.clone());
    crate::config::check_node_id(&node_id)
        .map_err(|e| crate::engine::EngineError::Internal(format!("{e} (set --node-id)")))?;
    let soft = Arc::new(SoftState::open(&node_id, &cfg.data_dir)?);
    let mut peers = Peers::new(
        &node_id,
        &advertise,
        cfg.peering.timeout,
        &cfg.peering.peers,
    );
    if let Some(t) = &cfg.peer_token {
        peers = peers
            .with_token(t)
            .map_err(crate::engine::EngineError::Internal)?;
    }
    if let Some(tls) = &cfg.tls {
        // Nodes of one cluster either all serve TLS or none does: peers are dialed the way
        // this node is served.
        peers = peers.with_tls(tls.peer.clone());
    }
    let peers = Arc::new(peers);
    let (usage, control): (Arc<dyn UsageStore>, Arc<dyn ControlStore>) = match &backend {
        Backend::Embedded(s) => (Arc::new(s.clone()), Arc::new(s.clone())),
        Backend::Redis(s) => (Arc::new((**s).clone()), Arc::new((**s).clone())),
    };
    let mut engine = Engine::new(
        usage,
        control,
        Arc::new(SystemClock::default()),
        cfg.cache_ttl,
    )
    .await?;
    let local: Option<Arc<dyn UsageStore>> = match &backend {
        Backend::Embedded(_) => None,
        Backend::Redis(_) => Some(Arc::new(disk.clone())),
    };
    engine = engine
        .with_soft(soft.clone(), local, peers.clone())
        .with_max_lateness(
            chrono::Duration::from_std(cfg.max_lateness).unwrap_or(chrono::Duration::MAX),
        );
    if let Backend::Redis(store) = &backend {
        let journal = Arc::new(Journal::open(&cfg.data_dir)?);
        // WAIT happens after the write: its time must not turn a done write into a timeout.
        let wait = cfg
            .redis
            .as_ref()
            .and_then(|r| r.wait_replicas)
            .map_or(Duration::ZERO, |(_, t)| t);
        engine = engine
            .with_degraded(journal, cfg.backend_deadline + wait)
            .with_global_rates(Arc::new((**store).clone()));
    }
    let engine = Arc::new(engine);
    engine.resync_soft().await?;

    if let Some((path, explicit)) = &cfg.catalog {
        let text = std::fs::read_to_string(path).map_err(|source| ServeError::CatalogFile {
            path: path.display().to_string(),
            source,
        })?;
        let who = crate::engine::admin::Who {
            source: meter::ledger::Source::System,
            actor: format!("node {}", engine.node_id()),
            reason: format!("catalog file {} at start", path.display()),
            correlation_id: String::new(),
        };
        match engine
            .apply_catalog(&text, &path.display().to_string(), false, &who)
            .await
        {
            Ok(a) => {
                tracing::info!(path = %path.display(), changed = a.changed, "start catalog loaded")
            }
            // An implicit default catalog that conflicts with the stored one must not
            // stop a node that has a good catalog already.
            Err(e) if !explicit && engine.catalog().is_ok() => {
                tracing::warn!(path = %path.display(), error = %e, "default catalog not applied; keeping the stored one")
            }
            Err(e) => return Err(e.into()),
        }
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<EnforcerServer<EnforcerService>>()
        .await;
    health.set_serving::<AdminServer<AdminService>>().await;
    let live = engine.clone();
    let shared_store = matches!(backend, Backend::Redis(_));
    let mut tasks = vec![tokio::spawn(crate::peer::run(
        soft.clone(),
        peers.clone(),
        cfg.peering.interval,
        move |n| live.set_live_nodes(n),
    ))];
    if let Backend::Redis(store) = &backend {
        tasks.push(tokio::spawn(follow_changes(
            engine.clone(),
            store.options().clone(),
        )));
        tasks.push(tokio::spawn(ship_spool(
            disk.clone(),
            (**store).clone(),
            engine.node_id().to_string(),
        )));
        tasks.push(tokio::spawn(crate::peer::follow_membership(
            (**store).clone(),
            peers.clone(),
            cfg.peering.timeout / 3,
            cfg.peering.timeout,
        )));
    }
    let spool_service = (!shared_store).then(|| SpoolService::new(disk.clone()));
    tasks.push(tokio::spawn(record_scheduled(
        engine.clone(),
        cfg.retention,
    )));
    let shared_redis = match &backend {
        Backend::Redis(s) => Some((**s).clone()),
        Backend::Embedded(_) => None,
    };
    tasks.push(tokio::spawn(sweep(
        engine.clone(),
        backend,
        disk.clone(),
        health,
        Timing {
            every: cfg.sweep_interval,
            retention: cfg.retention,
            cache_ttl: cfg.cache_ttl,
            soft_grace: cfg.peering.grace,
        },
    )));

    // Billing only reads ClickHouse, on request: no connection is made here, and a
    // ClickHouse that is down fails billing calls, never enforcement.
    let billing = cfg
        .clickhouse
        .as_ref()
        .map(|ch| aggregator::billing::Billing::new(aggregator::sink::ClickHouse::new(ch)));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(allot_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| crate::engine::EngineError::Internal(format!("reflection: {e}")))?;

    let stripe = match &cfg.stripe_config {
        Some(path) => Some(Arc::new(stripe_endpoint(path, &engine)?)),
        None => None,
    };
    if let Some(addr) = cfg.http_listen {
        let http = TcpListener::bind(addr)
            .await
            .map_err(|e| ServeError::Bind {
                what: "--http-listen",
                addr: addr.to_string(),
                source: e,
            })?;
        tracing::info!(%addr, stripe = stripe.is_some(), "serving HTTP");
        let probe = Arc::new(crate::http::Probe {
            engine: engine.clone(),
            disk: disk.clone(),
            shared: shared_store,
            peers: peers.clone(),
            redis: shared_redis,
        });
        let app = crate::http::router(probe, stripe.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = axum::serve(http, app).await {
                tracing::error!(error = %e, "HTTP listener stopped");
            }
        }));
    }

    let auth = auth_layer(cfg, &engine)?;
    // Shutdown waits for open calls, but peers hold their Sync streams open for good:
    // draining is bounded, then the node stops (every acknowledged write is already
    // durable, so cutting a stream loses nothing).
    let stopping = Arc::new(tokio::sync::Notify::new());
    let shutdown = {
        let stopping = stopping.clone();
        async move {
            shutdown.await;
            stopping.notify_one();
        }
    };
    let drained = async move {
        stopping.notified().await;
        tokio::time::sleep(SHUTDOWN_DRAIN).await;
        tracing::warn!(
            drain = ?SHUTDOWN_DRAIN,
            "calls or peer streams still open after the drain; stopping anyway"
        );
    };
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &cfg.tls {
        server = server.tls_config(tls.server.clone())?;
        tracing::info!(mutual = tls.mutual, "serving grpc over tls");
    }
    let serving = server
        .layer(
            tower::ServiceBuilder::new()
                .layer(crate::metrics::RpcMetricsLayer)
                .layer(auth),
        )
        .add_service(health_service)
        .add_service(reflection)
        .add_service(EnforcerServer::new(EnforcerService::new(engine.clone())))
        .add_service(crate::grpc::envoy_rls::server(
            engine.clone(),
            &cfg.rls_domain,
        ))
        .add_service(BillingServer::new(BillingService::new(
            engine.clone(),
            billing,
        )))
        .add_service(
            AdminServer::new(AdminService::new(engine).with_stripe(stripe))
                .max_decoding_message_size(crate::grpc::admin::MAX_MESSAGE)
                .max_encoding_message_size(crate::grpc::admin::MAX_MESSAGE),
        )
        .add_service(PeerServer::new(PeerService::new(soft, peers)))
        // With Redis the node ships its spool to the Redis streams itself.
        .add_optional_service(spool_service.map(SpoolServer::new))
        .serve_with_incoming_shutdown(incoming(listener), shutdown);
    let result = tokio::select! {
        r = serving => r,
        () = drained => Ok(()),
    };
    for t in tasks {
        t.abort();
    }
    result?;
    Ok(())
}

/// How long a stopping node waits for open calls and streams before it stops anyway.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(3);

/// The Stripe endpoint from its configuration file, checked against the catalog in force.
fn stripe_endpoint(
    path: &std::path::Path,
    engine: &Arc<Engine>,
) -> Result<crate::webhook::http::StripeEndpoint, ServeError> {
    use crate::webhook::stripe::{StripeAdapter, StripeConfig};
    let bad = |message: String| ServeError::Config {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let config: StripeConfig = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let (_, catalog) = engine.catalog()?;
    let adapter = StripeAdapter::new(&config, &catalog).map_err(|e| bad(e.to_string()))?;
    Ok(crate::webhook::http::StripeEndpoint {
        adapter,
        sync: crate::webhook::sync::ProviderSync::new(engine.clone(), "stripe"),
    })
}

/// Accepted connections with Nagle's algorithm off: small unary answers must not wait
/// for more bytes to fill a segment.
fn incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
}

/// Replays into Redis what was admitted while it was unreachable, once it answers again.
async fn reconcile(engine: &Engine, redis: &RedisStore, retention: chrono::Duration) {
    let Some(d) = engine.degraded() else { return };
    if !d.breaker.closed() {
        return;
    }
    let now = engine.now();
    if let Err(e) = d.journal.prune(now, retention) {
        tracing::warn!(error = %e, "degraded journal not pruned");
    }
    let entries = match d.journal.settled(now, SWEEP_BATCH) {
        Ok(e) if e.is_empty() => return,
        Ok(e) => e,
        Err(e) => return tracing::warn!(error = %e, "degraded journal unreadable"),
    };
    let mut counted = 0;
    for e in entries {
        let (amount, event_id, context) = match e.state_at(now) {
            EntryState::Committed(a) => (
                a as i64,
                format!("{}{}", crate::engine::enforce::DEGRADED_PREFIX, e.id),
                e.context.clone(),
            ),
            EntryState::Recorded => (e.amount, e.id.clone(), e.context.clone()),
            EntryState::Released | EntryState::Held { .. } => (0, String::new(), String::new()),
        };
        if amount != 0 {
            if let Err(err) = redis
                .record_forced(
                    &e.tenant,
                    amount,
                    &event_id,
                    &e.slots,
                    &context,
                    e.at.unwrap_or(now),
                )
                .await
            {
                // Still down after all: keep the entry for the next sweep.
                return tracing::warn!(error = %err, "reconciliation paused");
            }
            counted += 1;
        }
        // A settle that landed meanwhile leaves the entry for the next pass; its record in
        // Redis is keyed by event id, so counting it again there is a no-op.
        if let Err(err) = d.journal.mark_reconciled(&e, now) {
            return tracing::warn!(error = %err, "degraded journal not updated");
        }
    }
    tracing::info!(
        counted,
        "usage admitted while degraded reconciled into redis"
    );
}

/// With Redis: moves the events of the node's local store (soft-only requests, denials
/// decided on the node) to the Redis streams, in order, then forgets them locally. A
/// shipment repeated after a crash is recognized by the stream's per-node mark, and a
/// record another node (or Redis) counted first by its event id.
async fn ship_spool(disk: EmbeddedStore, redis: RedisStore, node: String) {
    const BATCH: usize = 1_000;
    let idle = Duration::from_millis(100);
    let mut backoff = idle;
    loop {
        let d = disk.clone();
        let rows = match tokio::task::spawn_blocking(move || d.spool_read(0, BATCH)).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "local spool unreadable");
                Vec::new()
            }
            Err(e) => {
                tracing::warn!(error = %e, "local spool unreadable");
                Vec::new()
            }
        };
        // One call per partition, its events in sequence order: a round trip (and with
        // `appendfsync always` an fsync) per event would cap shipping far below what the
        // node admits. A batch is forgotten locally only once every partition has it;
        // after a failure it is shipped again, and the marks skip what landed.
        let tenants: Vec<String> = rows
            .iter()
            .map(|(_, fields)| {
                fields
                    .iter()
                    .find(|(k, _)| k == "c")
                    .and_then(|(_, c)| meter::event::Pending::from_json(c).ok())
                    .map(|p| p.tenant)
                    .unwrap_or_default()
            })
            .collect();
        let mut by_partition: BTreeMap<u16, Vec<Shipment>> = BTreeMap::new();
        for ((seq, fields), tenant) in rows.iter().zip(&tenants) {
            by_partition
                .entry(meter::event::partition(tenant))
                .or_default()
                .push((*seq, tenant, fields.as_slice()));
        }
        let mut failed = false;
        for (partition, events) in &by_partition {
            if let Err(e) = redis.ship_many(&node, *partition, events).await {
                tracing::warn!(error = %e, "spool not shipped to redis; retrying");
                failed = true;
                break;
            }
        }
        if let (false, Some((upto, _))) = (failed, rows.last()) {
            if let Err(e) = disk.spool_ack(*upto).await {
                tracing::warn!(error = %e, "shipped events not forgotten locally");
            }
        }
        if failed {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        } else {
            backoff = idle;
            if rows.len() < BATCH {
                tokio::time::sleep(idle).await;
            }
        }
    }
}

/// Where a node keeps its state.
enum Backend {
    /// Single node, on local disk.
    Embedded(EmbeddedStore),
    /// Shared by every node.
    Redis(Box<RedisStore>),
}

/// Applies changes announced by other nodes: a tenant's entitlements are dropped from the
/// cache, a new catalog is loaded. Resubscribes after a lost connection; the cache TTL
/// covers what was announced while disconnected.
async fn follow_changes(engine: Arc<Engine>, opts: crate::redis::RedisOptions) {
    loop {
        match crate::redis::subscribe_changes(&opts).await {
            Ok(mut changes) => {
                tracing::info!("following control-state changes");
                // Whatever changed while we were not listening.
                engine.invalidate_all();
                if let Err(e) = engine.reload_catalog().await {
                    tracing::warn!(error = %e, "catalog reload failed");
                }
                while let Some(change) = changes.recv().await {
                    if change == crate::redis::EVERYTHING_CHANGED {
                        engine.invalidate_all();
                    } else if change == crate::redis::CATALOG_CHANGED {
                        if let Err(e) = engine.reload_catalog().await {
                            tracing::warn!(error = %e, "catalog reload failed");
                        }
                    } else {
                        engine.invalidate(&change);
                    }
                }
                tracing::warn!("change subscription ended; resubscribing");
            }
            Err(e) => tracing::warn!(error = %e, "cannot subscribe to changes; retrying"),
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// The sweeper's intervals.
struct Timing {
    every: std::time::Duration,
    retention: std::time::Duration,
    cache_ttl: std::time::Duration,
    soft_grace: std::time::Duration,
}

/// Releases reservations past their TTL, and now and then forgets what expired.
/// The token check in front of every service: tokens from the file (an admin token is
/// created and printed when it has none), reloaded when it changes; refusals of Admin and
/// Billing calls are recorded in the ledger. Without a token file, calls pass unchecked.
fn auth_layer(
    cfg: &ServeConfig,
    engine: &Arc<Engine>,
) -> Result<crate::auth::AuthLayer, crate::engine::EngineError> {
    use crate::auth::{AuthLayer, TokenFile, Tokens};
    let internal = |e: crate::auth::TokenError| crate::engine::EngineError::Internal(e.to_string());
    let Some(path) = &cfg.tokens else {
        tracing::warn!("--insecure-no-auth: every call is served without a token");
        return Ok(AuthLayer::open());
    };
    let mut tokens = Tokens::load(path).map_err(internal)?;
    if tokens.is_empty() {
        let token = TokenFile::add(path, "admin", &["admin".to_string()]).map_err(internal)?;
        eprintln!(
            "no API tokens yet: created an admin token, shown only now (stored hashed in {}):\n\n    export ALLOT_TOKEN={token}\n\nMake narrower ones with `allot token create`.",
            path.display()
        );
        tokens = Tokens::load(path).map_err(internal)?;
    }
    let tokens = Arc::new(tokens);
    let watched = tokens.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            watched.refresh();
        }
    });
    let engine = engine.clone();
    let on_refusal = Arc::new(move |path: &str, r: &crate::auth::Refusal| {
        let actor = r.principal.clone().unwrap_or_else(|| "anonymous".into());
        tracing::warn!(path, actor = %actor, code = ?r.status.code(), "call refused");
        if !(path.starts_with("/allot.v1.Admin/") || path.starts_with("/allot.v1.Billing/")) {
            return;
        }
        let entry = meter::ledger::LedgerEntry {
            id: uuid::Uuid::now_v7().simple().to_string(),
            at: engine.now(),
            tenant: String::new(),
            source: meter::ledger::Source::Admin,
            action: "access.denied".into(),
            actor,
            reason: r.status.message().to_string(),
            correlation_id: path.to_string(),
            before: String::new(),
            after: String::new(),
            applied: false,
        };
        let engine = engine.clone();
        tokio::spawn(async move {
            if let Err(e) = engine.audit(&entry).await {
                tracing::warn!(error = %e, "refusal not recorded in the ledger");
            }
        });
    });
    Ok(AuthLayer::new(tokens, on_refusal))
}

/// How often changes made by time are looked for and recorded in the ledger. They take
/// effect at their instant regardless (resolution is by time); this is only how soon the
/// ledger shows them, each with its exact instant.
const SCHEDULE_SCAN: Duration = Duration::from_secs(10);

/// Records the changes time makes (trial ends, scheduled changes, expiring overrides) in
/// the ledger, with their instants. At start it looks back over the retention period, so
/// changes that fell while no node ran are recorded too.
async fn record_scheduled(engine: Arc<Engine>, retention: Duration) {
    let back = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::days(7));
    let mut after = engine.now() - back;
    let mut tick = tokio::time::interval(SCHEDULE_SCAN);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let upto = engine.now();
        match engine.record_due(after, upto).await {
            Ok(_) => after = upto,
            // Retried from the same instant next time: nothing is skipped.
            Err(e) => tracing::warn!(error = %e, "scheduled changes not recorded yet"),
        }
    }
}

async fn sweep(
    engine: Arc<Engine>,
    backend: Backend,
    disk: EmbeddedStore,
    health: tonic_health::server::HealthReporter,
    t: Timing,
) {
    let Timing {
        every,
        retention,
        cache_ttl,
        soft_grace,
    } = t;
    let shared = matches!(backend, Backend::Redis(_));
    let soft_grace = chrono::Duration::from_std(soft_grace).unwrap_or(chrono::Duration::MAX);
    let sweeps_per_refresh = (cache_ttl.as_millis() / every.as_millis().max(1)).max(1) as u64;
    let retention =
        chrono::Duration::from_std(retention).unwrap_or(crate::embedded::DEFAULT_RETENTION);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        n += 1;
        if !disk.healthy() {
            // Load balancers stop sending traffic; the node needs a restart to reload.
            health
                .set_not_serving::<EnforcerServer<EnforcerService>>()
                .await;
            health.set_not_serving::<AdminServer<AdminService>>().await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        }
        match engine
            .usage_store()
            .expire_due(engine.now(), SWEEP_BATCH)
            .await
        {
            Ok(expired) if !expired.is_empty() => {
                metrics::counter!(crate::metrics::RESERVATIONS_EXPIRED)
                    .increment(expired.len() as u64);
                tracing::info!(count = expired.len(), "reservations expired")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "expiring reservations failed"),
        }
        if let Some(local) = engine.local_store() {
            if let Err(e) = local.expire_due(engine.now(), SWEEP_BATCH).await {
                tracing::warn!(error = %e, "expiring local reservations failed");
            }
        }
        if n.is_multiple_of(SWEEPS_PER_PRUNE) {
            engine.prune();
            if let Err(e) = engine.soft().forget_ended(engine.now(), soft_grace) {
                tracing::warn!(error = %e, "ended soft counters not forgotten");
            }
        }
        if let Backend::Redis(redis) = &backend {
            reconcile(&engine, redis, retention).await;
            if n.is_multiple_of(SWEEPS_PER_REINDEX) {
                match redis.reindex_pending().await {
                    Ok(0) => {}
                    Ok(restored) => tracing::warn!(
                        restored,
                        "tenants with open reservations were missing from the sweep index"
                    ),
                    Err(e) => tracing::warn!(error = %e, "sweep index check failed"),
                }
            }
        }
        if n.is_multiple_of(SWEEPS_PER_COMPACTION) {
            if let Err(e) = disk.compact(engine.now(), retention).await {
                tracing::warn!(error = %e, "compaction failed");
            }
        }
        if shared && n.is_multiple_of(sweeps_per_refresh) {
            // The backstop for a missed catalog announcement.
            if let Err(e) = engine.reload_catalog().await {
                tracing::warn!(error = %e, "catalog reload failed");
            }
        }
    }
}
