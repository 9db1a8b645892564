//! Effective entitlements per tenant, so the hot path resolves nothing and reads no store.
//!
//! An entry is used while the catalog generation is unchanged, the instant asked for is
//! before the entitlements' `valid_until` (trial end, override expiry…), and it is younger
//! than the TTL, which is the backstop for a change this node was not told about.
//! Admin calls on this node drop the tenant's entry at once. A lost subscription to other
//! nodes' announcements only marks every entry stale: it is read again from the store,
//! but while that store is down it is still the best answer there is.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::TenantContext;

struct Entry {
    generation: u64,
    fetched: Instant,
    /// False once something may have changed unannounced (see [`EntitlementCache::expire_all`]).
    current: bool,
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
        let fresh = e.current && e.generation == generation && e.fetched.elapsed() < self.ttl;
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
            current: true,
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

    /// Makes every entry stale, kept for [`Self::get_stale`]: changes may have been missed,
    /// so each is read again, yet when the store cannot answer it still beats no answer.
    pub fn expire_all(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        for e in self
            .entries
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .values_mut()
        {
            e.current = false;
        }
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::TimeZone;
    use meter::lifecycle::{PlanRef, Status, Subscription};

    use super::*;

    fn context(at: DateTime<Utc>) -> TenantContext {
        let catalog = meter::catalog::parse(
            "version: 1\nmetrics:\n  calls: { unit: call }\nplans:\n  p:\n    versions:\n      1:\n        limits:\n          calls:\n            - { window: day, amount: 10 }\n",
            "test",
        )
        .unwrap();
        let sub = Subscription {
            tenant: "acme".into(),
            plan: PlanRef {
                code: "p".into(),
                version: 1,
            },
            plan_since: at,
            addons: vec![],
            status: Status::Active,
            status_since: at,
            billing_anchor: at,
            time_zone: "UTC".into(),
            trial_ends_at: None,
            post_trial_plan: None,
            scheduled_change: None,
            cancel_at: None,
        };
        let entitlements = meter::resolve::resolve(&catalog, &sub, &[], at);
        TenantContext {
            catalog: Arc::new(catalog),
            subscription: Arc::new(sub),
            overrides: Arc::new(vec![]),
            entitlements: Arc::new(entitlements),
        }
    }

    #[test]
    fn a_missed_announcement_makes_entries_stale_but_keeps_them_for_an_outage() {
        let at = Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap();
        let cache = EntitlementCache::new(Duration::from_secs(3600));
        cache.put("acme", 1, cache.epoch(), &context(at));
        assert!(cache.get("acme", 1, at).is_some());

        let before = cache.epoch();
        cache.expire_all();
        assert!(
            cache.get("acme", 1, at).is_none(),
            "read again from the store"
        );
        assert!(
            cache.get_stale("acme", at).is_some(),
            "still there if it is down"
        );
        // A context read before the expiry is not cached as current after it.
        cache.put("acme", 1, before, &context(at));
        assert!(cache.get("acme", 1, at).is_none());
        cache.put("acme", 1, cache.epoch(), &context(at));
        assert!(cache.get("acme", 1, at).is_some());

        cache.clear();
        assert!(
            cache.get_stale("acme", at).is_none(),
            "a new catalog drops all"
        );
    }
}
