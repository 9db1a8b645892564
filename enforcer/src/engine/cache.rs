//! Effective entitlements per tenant, so the hot path resolves nothing and reads no store.
//!
//! An entry is used while the catalog generation is unchanged, the instant asked for is
//! before the entitlements' `valid_until` (trial end, override expiry…), and it is younger
//! than the TTL, which is the backstop for a change this node was not told about.
//! Admin calls on this node drop the tenant's entry at once.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::TenantContext;

struct Entry {
    generation: u64,
    fetched: Instant,
    ctx: TenantContext,
}

/// The cache.
pub struct EntitlementCache {
    ttl: Duration,
    /// Bumped by every invalidation: a context read from the store before an admin write
    /// must not be cached after that write dropped the entry.
    epoch: std::sync::atomic::AtomicU64,
    entries: RwLock<HashMap<String, Entry>>,
}

impl EntitlementCache {
    /// A cache whose entries live at most `ttl`.
    pub fn new(ttl: Duration) -> Self {
        EntitlementCache {
            ttl,
            epoch: Default::default(),
            entries: RwLock::new(HashMap::new()),
        }
    }

    /// The tenant's context, if cached and still valid at `at`.
    pub fn get(&self, tenant: &str, generation: u64, at: DateTime<Utc>) -> Option<TenantContext> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let e = entries.get(tenant)?;
        let fresh = e.generation == generation && e.fetched.elapsed() < self.ttl;
        (fresh && holds_at(&e.ctx, at)).then(|| e.ctx.clone())
    }

    /// The tenant's last context whatever its age, if it is still right at `at` (same
    /// catalog generation is not required: better an old catalog than no answer).
    pub fn get_stale(&self, tenant: &str, at: DateTime<Utc>) -> Option<TenantContext> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let e = entries.get(tenant)?;
        holds_at(&e.ctx, at).then(|| e.ctx.clone())
    }

    /// The invalidation epoch; read it before reading the store.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Stores a freshly resolved context, unless an invalidation happened since `epoch`
    /// was read (the context may predate it).
    pub fn put(&self, tenant: &str, generation: u64, epoch: u64, ctx: &TenantContext) {
        let entry = Entry {
            generation,
            fetched: Instant::now(),
            ctx: ctx.clone(),
        };
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if self.epoch() == epoch {
            entries.insert(tenant.to_string(), entry);
        }
    }

    /// Drops one tenant.
    pub fn invalidate(&self, tenant: &str) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.entries
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant);
    }

    /// Drops everything (a new catalog).
    pub fn clear(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.entries
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// Whether resolved entitlements are still the answer at `at`: not asked for an earlier
/// instant, and nothing scheduled (trial end, override expiry) has happened since.
fn holds_at(ctx: &TenantContext, at: DateTime<Utc>) -> bool {
    let ent = &ctx.entitlements;
    at >= ent.at && ent.valid_until.is_none_or(|until| at < until)
}
