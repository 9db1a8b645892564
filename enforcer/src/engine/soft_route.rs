//! Which store counts a request, and how its soft windows meet the gossiped counters.
//!
//! A soft window is decided from this node's store plus what peers counted (the CRDT
//! counters of [`crate::soft`]); the store's own check runs against the cap minus the
//! peers' share, so the node's own admissions stay exact and only the peers' latest,
//! not yet gossiped admissions can push a window past its limit. With the embedded store
//! everything is local. With Redis, a request whose windows are all soft (or that has
//! only rate limits) is kept in the node's local store and never waits for the network;
//! a request with a hard window goes to Redis whole, its soft windows counted there
//! exactly alongside the hard ones.

use std::sync::Arc;

use meter::quota::RequestPlan;
use meter::soft::SlotId;
use meter::store::{SlotSpec, SlotUsage, StoreError, UsageStore};

use super::{Engine, EngineError};

/// Reservation ids kept in a node's local store (with Redis) start with this and end with
/// `@node`, the node that holds them.
pub const LOCAL_PREFIX: &str = "sf-";

/// Where a request is counted.
pub(crate) struct Route<'a> {
    /// The store.
    pub store: &'a Arc<dyn UsageStore>,
    /// Its soft windows are shared through the gossiped counters.
    pub gossiped: bool,
    /// The node's local store beside a shared one (reservation ids say so).
    pub local: bool,
}

fn slot_id(tenant: &str, key: &str) -> SlotId {
    SlotId {
        tenant: tenant.to_string(),
        key: key.to_string(),
    }
}

impl Engine {
    pub(crate) fn route(&self, plan: &RequestPlan) -> Route<'_> {
        match &self.local {
            None => Route {
                store: &self.usage,
                gossiped: true,
                local: false,
            },
            Some(local) if plan.slots.iter().all(|s| s.soft) => Route {
                store: local,
                gossiped: true,
                local: true,
            },
            Some(_) => Route {
                store: &self.usage,
                gossiped: false,
                local: false,
            },
        }
    }

    /// The slot specs for the store: soft caps lowered by what peers counted.
    pub(crate) fn store_slots(
        &self,
        tenant: &str,
        plan: &RequestPlan,
        route: &Route,
    ) -> Vec<SlotSpec> {
        plan.slots
            .iter()
            .map(|s| {
                let mut spec = s.spec.clone();
                if route.gossiped && s.soft {
                    let others = self.soft.others(&slot_id(tenant, &s.spec.key));
                    spec.cap = spec.cap.map(|c| c.saturating_sub(others));
                }
                spec
            })
            .collect()
    }

    /// Sets this node's share of each soft window from what its store now holds (`usage`
    /// as the store saw it before the request, plus `added`), then adds the peers' share
    /// to `usage` so that decisions and reports see the whole.
    pub(crate) fn share_usage(
        &self,
        tenant: &str,
        plan: &RequestPlan,
        route: &Route,
        usage: &mut [SlotUsage],
        added: i64,
    ) {
        if !route.gossiped {
            return;
        }
        for (s, u) in plan.slots.iter().zip(usage.iter_mut()) {
            if !s.soft {
                continue;
            }
            let id = slot_id(tenant, &s.spec.key);
            let own = if added >= 0 {
                u.used.saturating_add(added as u64)
            } else {
                u.used.saturating_sub(added.unsigned_abs())
            };
            self.soft.set_own(&id, own, plan.gauge, s.spec.ends_at);
            u.used = u.used.saturating_add(self.soft.others(&id));
        }
    }

    /// After a commit: sets this node's share of the reservation's soft windows from the
    /// store. Windows the counters do not hold are hard ones (or the node restarted and
    /// the next request sets them).
    pub(crate) async fn share_settled(
        &self,
        store: &Arc<dyn UsageStore>,
        tenant: &str,
        reservation_id: &str,
    ) -> Result<(), EngineError> {
        // A node with no soft counters has nothing to set: spare the hard path a read.
        if self.soft.is_empty() {
            return Ok(());
        }
        let Some(r) = store.reservation(tenant, reservation_id).await? else {
            return Ok(());
        };
        let soft: Vec<(String, bool)> = r
            .slots
            .into_iter()
            .filter_map(|k| {
                let g = self.soft.is_gauge(&slot_id(tenant, &k))?;
                Some((k, g))
            })
            .collect();
        if soft.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = soft.iter().map(|(k, _)| k.clone()).collect();
        let usage = store.usage(tenant, &keys).await?;
        for ((k, gauge), u) in soft.iter().zip(usage) {
            self.soft.set_own(&slot_id(tenant, k), u.used, *gauge, None);
        }
        Ok(())
    }

    /// Sets this node's share of every slot the counters hold from its stores: run at
    /// start, because the counters on disk may lag what the store acknowledged.
    pub async fn resync_soft(&self) -> Result<(), StoreError> {
        let store = self.local.as_ref().unwrap_or(&self.usage);
        let mut by_tenant: std::collections::BTreeMap<String, Vec<(String, bool)>> =
            Default::default();
        for (slot, gauge) in self.soft.slots() {
            by_tenant
                .entry(slot.tenant)
                .or_default()
                .push((slot.key, gauge));
        }
        for (tenant, slots) in by_tenant {
            let keys: Vec<String> = slots.iter().map(|(k, _)| k.clone()).collect();
            let usage = store.usage(&tenant, &keys).await?;
            for ((k, gauge), u) in slots.iter().zip(usage) {
                self.soft
                    .set_own(&slot_id(&tenant, k), u.used, *gauge, None);
            }
        }
        Ok(())
    }

    /// The store holding a reservation, by its id; `Err` when another node holds it.
    pub(crate) fn store_of(
        &self,
        reservation_id: &str,
    ) -> Result<(&Arc<dyn UsageStore>, bool), EngineError> {
        match (&self.local, reservation_id.strip_prefix(LOCAL_PREFIX)) {
            (Some(local), Some(rest)) => {
                let owner = rest.rsplit_once('@').map_or("", |(_, n)| n);
                if owner != self.node_id() {
                    return Err(EngineError::not_found(
                        "reservation_id",
                        format!(
                            "reservation {reservation_id:?} is held by node {owner:?}: commit or release it there"
                        ),
                    ));
                }
                Ok((local, true))
            }
            _ => Ok((&self.usage, false)),
        }
    }
}
