//! The engine: the node's request logic, between the gRPC layer and the stores.
//!
//! It validates input, resolves entitlements through a cache, runs token buckets, asks the
//! store to reserve or count, and turns the answers into decisions with `meter`. Nothing
//! here knows about protobuf; nothing in `meter` knows about clocks or stores.
//!
//! - [`enforce`]: Check, Reserve, Commit, Release, Record, GetUsage.
//! - [`admin`]: catalog, subscriptions, overrides, the tenant view.
//! - [`cache`]: effective entitlements per tenant, dropped on change or when they expire.
//! - [`buckets`]: the node's token buckets.
//!
//! Rate limits with `scope: node` run on this node's share of the limit, which depends on
//! how many nodes are live ([`Engine::set_live_nodes`], 1 until something says more);
//! `scope: global` ones run in the shared store's buckets ([`Engine::with_global_rates`])
//! or, without one, on this node with the whole limit.

pub mod admin;
pub mod buckets;
pub mod cache;
pub mod clock;
pub mod denials;
pub mod enforce;
pub mod error;
pub mod soft_route;
pub mod watch;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use meter::catalog::Catalog;
use meter::grant::Override;
use meter::keys;
use meter::lifecycle::Subscription;
use meter::resolve::{resolve, Entitlements};
use meter::store::{ControlStore, RateStore, UsageStore};

pub use clock::{Clock, SystemClock};

/// Default lateness limit of recorded events.
pub const DEFAULT_MAX_LATENESS: chrono::Duration = chrono::Duration::days(35);
pub use error::EngineError;

/// What a request is decided against.
#[derive(Clone)]
pub struct TenantContext {
    /// The catalog in force.
    pub catalog: Arc<Catalog>,
    /// The tenant's subscription.
    pub subscription: Arc<Subscription>,
    /// The tenant's overrides (all, expired included).
    pub overrides: Arc<Vec<Override>>,
    /// The effective entitlements now.
    pub entitlements: Arc<Entitlements>,
}

/// The node's request logic. Shared by all gRPC handlers.
pub struct Engine {
    usage: Arc<dyn UsageStore>,
    control: Arc<dyn ControlStore>,
    clock: Arc<dyn Clock>,
    catalog: RwLock<Option<(u64, Arc<Catalog>)>>,
    cache: cache::EntitlementCache,
    buckets: buckets::Buckets,
    /// How many nodes share each `scope: node` rate limit, this one included (at least 1).
    /// Shared so that whoever follows the membership can set it.
    live_nodes: Arc<AtomicUsize>,
    /// Where `scope: global` buckets live; without it they run on this node, whole.
    global_rates: Option<Arc<dyn RateStore>>,
    /// Serializes admin writes: each reads, validates and writes, which must not
    /// interleave with another (two catalog applies, two add-on changes of one tenant).
    admin_lock: tokio::sync::Mutex<()>,
    /// With a shared store: what decides while it is unreachable.
    degraded: Option<Degraded>,
    /// Serializes catalog reloads.
    reload_lock: tokio::sync::Mutex<()>,
    /// Soft-limit counters shared with peers.
    soft: Arc<crate::soft::SoftState>,
    /// With a shared store: the node's own store for requests that need no network.
    local: Option<Arc<dyn UsageStore>>,
    node_id: String,
    /// The peers the counters are exchanged with.
    peers: Option<Arc<crate::peer::Peers>>,
    /// How late a recorded event may be.
    max_lateness: chrono::Duration,
    /// Tenants whose entitlements changed, for watches ([`watch`]).
    changes: tokio::sync::broadcast::Sender<String>,
    /// The last denials of each tenant on this node.
    pub denials: denials::RecentDenials,
}

/// The degraded-mode equipment of a node with a shared store.
pub struct Degraded {
    /// Skips the store while it is down.
    pub breaker: crate::degraded::Breaker,
    /// What was admitted meanwhile.
    pub journal: Arc<crate::degraded::Journal>,
    /// The longest wait for the store before a limit's failure policy decides.
    pub deadline: std::time::Duration,
    /// Writes that got no answer.
    pub in_doubt: crate::degraded::InDoubt,
}

impl Engine {
    /// An engine over the given stores, loading the catalog the control store holds.
    pub async fn new(
        usage: Arc<dyn UsageStore>,
        control: Arc<dyn ControlStore>,
        clock: Arc<dyn Clock>,
        cache_ttl: std::time::Duration,
    ) -> Result<Engine, EngineError> {
        let catalog = control.catalog().await?.map(|c| (1, Arc::new(c)));
        Ok(Engine {
            usage,
            control,
            clock,
            catalog: RwLock::new(catalog),
            cache: cache::EntitlementCache::new(cache_ttl),
            buckets: buckets::Buckets::default(),
            live_nodes: Arc::new(AtomicUsize::new(1)),
            global_rates: None,
            admin_lock: tokio::sync::Mutex::new(()),
            degraded: None,
            reload_lock: tokio::sync::Mutex::new(()),
            soft: Arc::new(crate::soft::SoftState::in_memory("local")),
            local: None,
            node_id: "local".into(),
            peers: None,
            max_lateness: DEFAULT_MAX_LATENESS,
            changes: tokio::sync::broadcast::channel(1024).0,
            denials: denials::RecentDenials::default(),
        })
    }

    /// Shares soft-limit windows through `soft` (this node's counters); with a shared
    /// store, `local` keeps the requests that need no network (see [`soft_route`]).
    pub fn with_soft(
        mut self,
        soft: Arc<crate::soft::SoftState>,
        local: Option<Arc<dyn UsageStore>>,
        peers: Arc<crate::peer::Peers>,
    ) -> Self {
        self.node_id = soft.node();
        self.soft = soft;
        self.local = local;
        self.peers = Some(peers);
        self
    }

    /// Refuses recorded events older than `d`.
    pub fn with_max_lateness(mut self, d: chrono::Duration) -> Self {
        self.max_lateness = d;
        self
    }

    /// How late a recorded event may be.
    pub fn max_lateness(&self) -> chrono::Duration {
        self.max_lateness
    }

    /// A tenant's context at a past instant (late events), resolved afresh: the cache
    /// holds what is in force now.
    pub async fn context_at(
        &self,
        tenant: &str,
        at: DateTime<Utc>,
    ) -> Result<TenantContext, EngineError> {
        check_tenant(tenant)?;
        let (_, catalog) = self.catalog()?;
        self.resolve_fresh(tenant, at, catalog).await
    }

    /// The peers, when the node exchanges counters.
    pub fn peers(&self) -> Option<&Arc<crate::peer::Peers>> {
        self.peers.as_ref()
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// This node's soft-limit counters.
    pub fn soft(&self) -> &Arc<crate::soft::SoftState> {
        &self.soft
    }

    /// With a shared store, the node's local store.
    pub fn local_store(&self) -> Option<&Arc<dyn UsageStore>> {
        self.local.as_ref()
    }

    /// Decides by each limit's failure policy when the store fails or passes `deadline`,
    /// journaling fail-open admissions in `journal`.
    pub fn with_degraded(
        mut self,
        journal: Arc<crate::degraded::Journal>,
        deadline: std::time::Duration,
    ) -> Self {
        self.degraded = Some(Degraded {
            breaker: Default::default(),
            journal,
            deadline,
            in_doubt: Default::default(),
        });
        self
    }

    /// Keeps `scope: global` rate limits in `store`, shared by every node, instead of on
    /// this node. Their limits' failure policies decide when it cannot be reached, so
    /// this needs [`Engine::with_degraded`] too.
    pub fn with_global_rates(mut self, store: Arc<dyn RateStore>) -> Self {
        self.global_rates = Some(store);
        self
    }

    /// Sets how many live nodes share each `scope: node` rate limit, this one included
    /// (0 counts as 1). Each bucket moves to its new share at its next use, keeping the
    /// instant it is full again (so an emptied bucket stays empty, a full one full).
    pub fn set_live_nodes(&self, n: usize) {
        let n = n.max(1);
        let before = self.live_nodes.swap(n, Ordering::Relaxed);
        if before != n {
            tracing::info!(
                before,
                now = n,
                "live nodes changed; node rate limit shares follow"
            );
        }
    }

    /// How many live nodes share each `scope: node` rate limit (1 unless set).
    pub fn live_nodes(&self) -> usize {
        self.live_nodes.load(Ordering::Relaxed).max(1)
    }

    /// The shared count behind [`Engine::live_nodes`], for a membership task that outlives
    /// borrows of the engine.
    pub fn live_nodes_handle(&self) -> Arc<AtomicUsize> {
        self.live_nodes.clone()
    }

    /// The degraded-mode equipment, if any (for the reconciler).
    pub fn degraded(&self) -> Option<&Degraded> {
        self.degraded.as_ref()
    }

    /// The clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// The usage store (for the sweeper).
    pub fn usage_store(&self) -> &Arc<dyn UsageStore> {
        &self.usage
    }

    /// The control store (for provider sync).
    pub fn control_store(&self) -> &Arc<dyn ControlStore> {
        &self.control
    }

    /// The catalog in force and its generation.
    pub fn catalog(&self) -> Result<(u64, Arc<Catalog>), EngineError> {
        self.catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                EngineError::FailedPrecondition(
                    "no catalog applied yet: run `allot catalog apply FILE`".into(),
                )
            })
    }

    fn set_catalog(&self, c: Catalog) {
        let mut guard = self.catalog.write().unwrap_or_else(|p| p.into_inner());
        let generation = guard.as_ref().map_or(1, |(g, _)| g + 1);
        *guard = Some((generation, Arc::new(c)));
        self.cache.clear();
        let _ = self.changes.send(watch::ALL.to_string());
    }

    /// Resolves the tenant's entitlements at `at`, from the cache when it still holds.
    pub async fn context(
        &self,
        tenant: &str,
        at: DateTime<Utc>,
    ) -> Result<TenantContext, EngineError> {
        check_tenant(tenant)?;
        let (generation, catalog) = self.catalog()?;
        let looked_up = |result: &'static str| {
            metrics::counter!(crate::metrics::CACHE, "result" => result).increment(1)
        };
        if let Some(ctx) = self.cache.get(tenant, generation, at) {
            looked_up("hit");
            return Ok(ctx);
        }
        let epoch = self.cache.epoch();
        if self.degraded.as_ref().is_some_and(|d| !d.breaker.closed()) {
            // The shared store is known to be down: no request should wait for it.
            if let Some(ctx) = self.cache.get_stale(tenant, at) {
                looked_up("stale");
                return Ok(ctx);
            }
        }
        match self.resolve_fresh(tenant, at, catalog).await {
            Ok(ctx) => {
                looked_up("miss");
                self.cache.put(tenant, generation, epoch, &ctx);
                Ok(ctx)
            }
            // With the shared store down, entitlements a little past their TTL beat none:
            // the failure policies of their limits can still decide.
            Err(EngineError::Unavailable(e)) => {
                let stale = self.cache.get_stale(tenant, at);
                if stale.is_some() {
                    looked_up("stale");
                }
                stale.ok_or(EngineError::Unavailable(e))
            }
            Err(e) => Err(e),
        }
    }

    async fn resolve_fresh(
        &self,
        tenant: &str,
        at: DateTime<Utc>,
        catalog: Arc<Catalog>,
    ) -> Result<TenantContext, EngineError> {
        let sub = self.control.subscription(tenant).await?.ok_or_else(|| {
            EngineError::not_found(
                "tenant",
                format!("unknown tenant {tenant:?}: it has no subscription"),
            )
        })?;
        let overrides = self.control.overrides(tenant).await?;
        let ent = resolve(&catalog, &sub, &overrides, at);
        let ctx = TenantContext {
            catalog,
            subscription: Arc::new(sub),
            overrides: Arc::new(overrides),
            entitlements: Arc::new(ent),
        };
        Ok(ctx)
    }

    /// Forgets a tenant's cached entitlements (another node changed them).
    pub fn invalidate(&self, tenant: &str) {
        self.changed(tenant);
    }

    /// Re-reads every cached entitlement on next use (changes may have been missed); the
    /// old ones stay the answer while the store is down.
    pub fn invalidate_all(&self) {
        self.cache.expire_all();
        let _ = self.changes.send(watch::ALL.to_string());
    }

    /// Loads the catalog from the control store if it differs from the one in force
    /// (another node applied it). Returns whether it changed.
    pub async fn reload_catalog(&self) -> Result<bool, EngineError> {
        // One reload at a time: a slow one must not install an older catalog over the one
        // a later announcement just loaded.
        let _serial = self.reload_lock.lock().await;
        let Some(stored) = self.control.catalog().await? else {
            return Ok(false);
        };
        let same = self
            .catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|(_, c)| **c == stored);
        if !same {
            tracing::info!("catalog changed elsewhere; loaded");
            self.set_catalog(stored);
        }
        Ok(!same)
    }

    /// Drops background state that no longer matters (full token buckets).
    pub fn prune(&self) {
        self.buckets.prune(self.clock.monotonic_ns());
    }
}

/// Validates a tenant id, naming the field.
pub fn check_tenant(tenant: &str) -> Result<(), EngineError> {
    keys::check_tenant(tenant).map_err(|r| EngineError::invalid("tenant", r))
}
