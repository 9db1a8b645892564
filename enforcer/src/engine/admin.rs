//! Admin operations: catalog, subscriptions, overrides, and the tenant view.
//!
//! Every change is validated against the catalog before anything is written, is written
//! together with its ledger entry (who, why, before → after: [`meter::ledger`]), and drops
//! the tenant's cached entitlements on this node so the next request sees it.

use chrono::{DateTime, Utc};
use meter::catalog::{self, Catalog};
use meter::grant::Override;
use meter::ledger::{snapshot, LedgerEntry, Source};
use meter::lifecycle::{AddonRef, ChangeTiming, PlanRef, Status, Subscription};
use meter::resolve::{resolve, Entitlements};
use meter::status_machine::{is_ended, IllegalTransition, StatusMachine, Step};
use serde::Serialize;

use super::{check_tenant, Engine, EngineError};

/// The result of applying a catalog.
pub struct Applied {
    /// Whether it differs from the one in force.
    pub changed: bool,
    /// Whether it was installed.
    pub applied: bool,
    /// Plans with their versions.
    pub plans: Vec<String>,
}

/// A new subscription, as asked for.
#[derive(Debug, Clone, Default)]
pub struct NewSubscription {
    /// Tenant.
    pub tenant: String,
    /// Plan code.
    pub plan: String,
    /// Version; `None` for the newest published.
    pub version: Option<u32>,
    /// Add-ons with quantities.
    pub addons: Vec<(String, u32)>,
    /// Status; `None` for active (trialing with a trial end).
    pub status: Option<String>,
    /// Time zone; `None` for UTC.
    pub time_zone: Option<String>,
    /// Billing anchor; `None` for now.
    pub billing_anchor: Option<DateTime<Utc>>,
    /// Trial end.
    pub trial_ends_at: Option<DateTime<Utc>>,
    /// Plan after the trial, with optional version.
    pub post_trial_plan: Option<(String, Option<u32>)>,
}

/// A change to a subscription; `None` fields stay.
#[derive(Default)]
pub struct SubscriptionChange {
    /// New plan and version.
    pub plan: Option<(String, Option<u32>)>,
    /// When the plan change applies; `None` chooses by tier (up now, down at period end).
    pub timing: Option<ChangeTiming>,
    /// Add-ons to add or set the quantity of.
    pub add_addons: Vec<(String, u32)>,
    /// Add-ons to remove.
    pub remove_addons: Vec<String>,
    /// New status.
    pub status: Option<String>,
}

/// Who asks for a change, and why: what its ledger entry says.
#[derive(Debug, Clone)]
pub struct Who {
    /// Where the request came from.
    pub source: Source,
    /// The principal (a token's, else the one the request names).
    pub actor: String,
    /// Why, as given.
    pub reason: String,
    /// The caller's correlation id (`x-correlation-id`), or empty.
    pub correlation_id: String,
}

impl Who {
    /// An Admin API caller.
    pub fn admin(actor: &str, reason: &str) -> Who {
        Who {
            source: Source::Admin,
            actor: actor.to_string(),
            reason: reason.to_string(),
            correlation_id: String::new(),
        }
    }

    /// The entry of a change of `tenant` by this caller.
    fn entry<B: Serialize, A: Serialize>(
        &self,
        at: DateTime<Utc>,
        tenant: &str,
        action: &str,
        before: Option<&B>,
        after: Option<&A>,
    ) -> LedgerEntry {
        LedgerEntry {
            id: uuid::Uuid::now_v7().simple().to_string(),
            at,
            tenant: tenant.to_string(),
            source: self.source,
            action: action.to_string(),
            actor: self.actor.clone(),
            reason: self.reason.clone(),
            correlation_id: self.correlation_id.clone(),
            before: before.map(snapshot).unwrap_or_default(),
            after: after.map(snapshot).unwrap_or_default(),
            applied: true,
        }
    }
}

/// The support view of a tenant.
pub struct TenantView {
    /// The stored subscription.
    pub subscription: Subscription,
    /// Effective entitlements at the instant asked for.
    pub entitlements: Entitlements,
    /// Overrides, expired ones included.
    pub overrides: Vec<Override>,
}

fn plan_ref(
    c: &Catalog,
    field: &str,
    code: &str,
    version: Option<u32>,
) -> Result<PlanRef, EngineError> {
    let p = c
        .plans
        .get(code)
        .ok_or_else(|| EngineError::not_found(field, format!("unknown plan {code:?}")))?;
    let version = match version {
        Some(v) => v,
        None => {
            p.latest_published()
                .ok_or_else(|| {
                    EngineError::invalid(field, format!("plan {code} has no published version"))
                })?
                .0
        }
    };
    Ok(PlanRef {
        code: code.to_string(),
        version,
    })
}

fn parse_status(s: &str) -> Result<Status, EngineError> {
    Status::parse(s).ok_or_else(|| {
        let all: Vec<_> = Status::ALL.iter().map(|s| s.as_str()).collect();
        EngineError::invalid(
            "status",
            format!("unknown status {s:?}; one of {}", all.join(", ")),
        )
    })
}

fn addon_refs(list: &[(String, u32)], since: DateTime<Utc>) -> Vec<AddonRef> {
    list.iter()
        .map(|(code, q)| AddonRef {
            code: code.clone(),
            quantity: (*q).max(1),
            since,
        })
        .collect()
}

/// `code@1,2` for each plan of `c`: what a catalog offers, as its ledger entry shows it.
fn plan_versions(c: &Catalog) -> Vec<String> {
    c.plans
        .iter()
        .map(|(code, p)| {
            let versions: Vec<String> = p.versions.keys().map(u32::to_string).collect();
            format!("{code}@{}", versions.join(","))
        })
        .collect()
}

fn checked(sub: &Subscription, c: &Catalog) -> Result<(), EngineError> {
    sub.check_against(c)
        .map_err(|(field, reason)| EngineError::Invalid { field, reason })
}

impl Engine {
    /// Validates `yaml` and, unless `dry_run`, installs it.
    pub async fn apply_catalog(
        &self,
        yaml: &str,
        source: &str,
        dry_run: bool,
        who: &Who,
    ) -> Result<Applied, EngineError> {
        let source = if source.is_empty() { "catalog" } else { source };
        let new = catalog::parse(yaml, source).map_err(|e| {
            let first = &e.problems[0];
            let more = e.problems.len() - 1;
            let mut reason = format!("{}: {}: {}", e.source_name, first.path, first.reason);
            if more > 0 {
                reason.push_str(&format!(
                    " (and {more} more: {})",
                    e.problems[1..]
                        .iter()
                        .map(|p| format!("{}: {}", p.path, p.reason))
                        .collect::<Vec<_>>()
                        .join("; ")
                ));
            }
            EngineError::invalid("yaml", reason)
        })?;
        // Validation against the catalog in force and the switch happen under one lock, so
        // two concurrent applies cannot both pass against the same predecessor.
        let _serial = self.admin_lock.lock().await;
        let old = self
            .catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some((_, old)) = &old {
            catalog::validate_successor(old, &new).map_err(|problems| {
                EngineError::FailedPrecondition(
                    problems
                        .iter()
                        .map(|p| format!("{source}: {}: {}", p.path, p.reason))
                        .collect::<Vec<_>>()
                        .join("; "),
                )
            })?;
        }
        let changed = old.as_ref().is_none_or(|(_, o)| **o != new);
        let plans = plan_versions(&new);
        if dry_run || !changed {
            return Ok(Applied {
                changed,
                applied: false,
                plans,
            });
        }
        // The entry names the plan versions, not the whole catalog: the catalog itself is
        // kept, and published versions never change.
        let entry = who.entry(
            self.now(),
            "",
            "catalog.apply",
            old.as_ref().map(|(_, c)| plan_versions(c)).as_ref(),
            Some(&plans),
        );
        self.control.save_catalog(&new, &entry).await?;
        tracing::info!(source, "catalog applied");
        self.set_catalog(new);
        Ok(Applied {
            changed,
            applied: true,
            plans,
        })
    }

    /// The catalog in force, as YAML.
    pub fn catalog_yaml(&self) -> Result<Option<String>, EngineError> {
        match self
            .catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            None => Ok(None),
            Some((_, c)) => serde_yaml_ng::to_string(c.as_ref())
                .map(Some)
                .map_err(|e| EngineError::Internal(format!("catalog does not serialize: {e}"))),
        }
    }

    /// Creates or replaces a subscription.
    pub async fn put_subscription(
        &self,
        req: NewSubscription,
        who: &Who,
    ) -> Result<Subscription, EngineError> {
        let _serial = self.admin_lock.lock().await;
        check_tenant(&req.tenant)?;
        let (_, c) = self.catalog()?;
        let now = self.now();
        let plan = plan_ref(&c, "plan", &req.plan, req.version)?;
        let post_trial_plan = match &req.post_trial_plan {
            Some((code, v)) => Some(plan_ref(&c, "post_trial_plan", code, *v)?),
            None => None,
        };
        let status = match req.status.as_deref() {
            Some(s) => parse_status(s)?,
            None if req.trial_ends_at.is_some() => Status::Trialing,
            None => Status::Active,
        };
        if status == Status::Trialing && req.trial_ends_at.is_none() {
            return Err(EngineError::invalid(
                "trial_ends_at",
                "required when status is trialing",
            ));
        }
        if req.trial_ends_at.is_some() && status != Status::Trialing {
            return Err(EngineError::invalid(
                "trial_ends_at",
                "only a trialing subscription has a trial end",
            ));
        }
        let mut addons = addon_refs(&req.addons, now);
        addons.sort_by(|a, b| a.code.cmp(&b.code));
        // Replacing a subscription keeps its billing anchor and time zone unless new ones
        // are given: both key the usage counters, and changing them by accident would
        // start every period afresh.
        let previous = self.control.subscription(&req.tenant).await?;
        let before = previous.clone();
        let sub = Subscription {
            tenant: req.tenant.clone(),
            plan,
            plan_since: now,
            addons,
            status,
            status_since: now,
            billing_anchor: req
                .billing_anchor
                .or(previous.as_ref().map(|p| p.billing_anchor))
                .unwrap_or(now),
            time_zone: req
                .time_zone
                .or(previous.map(|p| p.time_zone))
                .unwrap_or_else(|| "UTC".into()),
            trial_ends_at: req.trial_ends_at,
            post_trial_plan,
            scheduled_change: None,
            cancel_at: None,
        };
        checked(&sub, &c)?;
        let entry = who.entry(
            now,
            &sub.tenant,
            "subscription.put",
            before.as_ref(),
            Some(&sub),
        );
        self.control.save_subscription(&sub, &entry).await?;
        self.changed(&sub.tenant);
        Ok(sub)
    }

    async fn existing(&self, tenant: &str) -> Result<Subscription, EngineError> {
        check_tenant(tenant)?;
        self.control.subscription(tenant).await?.ok_or_else(|| {
            EngineError::not_found(
                "tenant",
                format!("unknown tenant {tenant:?}: it has no subscription"),
            )
        })
    }

    /// Changes plan, add-ons or status. A status change is a step of the catalog's
    /// [`StatusMachine`]: one that is not an edge of its table (`canceled → active`,
    /// anything → `pending`) is refused with FAILED_PRECONDITION naming from, to and the
    /// allowed next statuses, changes nothing, and is recorded in the tenant's ledger with
    /// `applied: false`.
    pub async fn change_subscription(
        &self,
        tenant: &str,
        change: SubscriptionChange,
        who: &Who,
    ) -> Result<Subscription, EngineError> {
        let (_, c) = self.catalog()?;
        let machine = c.status_machine();
        let _serial = self.admin_lock.lock().await;
        let mut sub = self.existing(tenant).await?;
        let before = sub.clone();
        let now = self.now();
        // What time did by now first (a trial end, a grace end, a scheduled change): the
        // change applies to what is in force.
        let mut steps = machine.advance(&mut sub, now);
        // Add-ons stop applying when a scheduled change or a trial end moves the tenant to
        // a plan they are not sold on; drop them from the record too.
        let current = sub.plan.code.clone();
        sub.addons.retain(|a| {
            c.addons
                .get(&a.code)
                .is_some_and(|d| d.plans.is_empty() || d.plans.contains(&current))
        });
        if let Some((code, version)) = &change.plan {
            let plan = plan_ref(&c, "plan", code, *version)?;
            let timing = change.timing.unwrap_or_else(|| {
                let tier = |p: &PlanRef| c.plans.get(&p.code).map_or(0, |d| d.tier);
                if tier(&plan) >= tier(&sub.plan) {
                    ChangeTiming::Immediately
                } else {
                    ChangeTiming::PeriodEnd
                }
            });
            steps.extend(sub.change_plan(&machine, plan, timing, now));
        }
        for code in &change.remove_addons {
            let before = sub.addons.len();
            sub.addons.retain(|a| &a.code != code);
            if before == sub.addons.len() {
                return Err(EngineError::not_found(
                    "remove_addons",
                    format!("the subscription has no add-on {code:?}"),
                ));
            }
        }
        for a in addon_refs(&change.add_addons, now) {
            match sub.addons.iter_mut().find(|x| x.code == a.code) {
                Some(x) => x.quantity = a.quantity,
                None => sub.addons.push(a),
            }
        }
        sub.addons.sort_by(|a, b| a.code.cmp(&b.code));
        if let Some(s) = &change.status {
            let status = parse_status(s)?;
            if status == Status::Trialing && sub.trial_ends_at.is_none() {
                return Err(EngineError::invalid(
                    "status",
                    "trialing needs a trial end: use PutSubscription with trial_ends_at",
                ));
            }
            match machine.transition(&mut sub, status, now) {
                Ok(more) => steps.extend(more),
                Err(e) => return Err(self.refuse(&before, "subscription.change", &e, who).await),
            }
            if !is_ended(status) {
                // Moving to (or confirming) a live status undoes a scheduled cancellation.
                sub.cancel_at = None;
            }
        }
        checked(&sub, &c)?;
        self.record_steps(&machine, &before, &steps).await?;
        let entry = who.entry(
            now,
            tenant,
            "subscription.change",
            Some(&before),
            Some(&sub),
        );
        self.control.save_subscription(&sub, &entry).await?;
        self.changed(tenant);
        Ok(sub)
    }

    /// Cancels now (a step to `canceled` of the catalog's [`StatusMachine`]) or at period
    /// end. A subscription that is refunded or charged back cannot be canceled (it is
    /// more serious already): refused like an illegal status change.
    pub async fn cancel_subscription(
        &self,
        tenant: &str,
        at_period_end: bool,
        who: &Who,
    ) -> Result<Subscription, EngineError> {
        let (_, c) = self.catalog()?;
        let machine = c.status_machine();
        let _serial = self.admin_lock.lock().await;
        let mut sub = self.existing(tenant).await?;
        let before = sub.clone();
        let timing = if at_period_end {
            ChangeTiming::PeriodEnd
        } else {
            ChangeTiming::Immediately
        };
        let now = self.now();
        let steps = match sub.cancel(&machine, timing, now) {
            Ok(steps) => steps,
            Err(e) => return Err(self.refuse(&before, "subscription.cancel", &e, who).await),
        };
        self.record_steps(&machine, &before, &steps).await?;
        let entry = who.entry(
            now,
            tenant,
            "subscription.cancel",
            Some(&before),
            Some(&sub),
        );
        self.control.save_subscription(&sub, &entry).await?;
        self.changed(tenant);
        Ok(sub)
    }

    /// Records the steps time took that a change is about to fold into the stored
    /// subscription: once folded, [`Engine::record_due`] cannot find them any more. Their
    /// ids are the ones `record_due` would give, so each is kept once either way.
    async fn record_steps(
        &self,
        machine: &StatusMachine,
        start: &Subscription,
        steps: &[Step],
    ) -> Result<(), EngineError> {
        for e in meter::ledger::step_entries(machine, start, steps) {
            self.control.record_entry(&e).await?;
        }
        Ok(())
    }

    /// Records a refused status change in the tenant's ledger (`applied: false`, the
    /// subscription as it stays in `before`) and returns the error for the caller. A
    /// ledger that cannot be written does not hide the refusal: it is logged.
    async fn refuse(
        &self,
        current: &Subscription,
        action: &str,
        e: &IllegalTransition,
        who: &Who,
    ) -> EngineError {
        let why = format!("status: {e}");
        let mut entry = who.entry(
            e.at,
            &current.tenant,
            action,
            Some(current),
            None::<&Subscription>,
        );
        entry.applied = false;
        entry.reason = if who.reason.is_empty() {
            format!("refused: {why}")
        } else {
            format!("refused: {why} (asked because: {})", who.reason)
        };
        if let Err(err) = self.control.record_entry(&entry).await {
            tracing::warn!(tenant = %current.tenant, error = %err, "refused status change not recorded in the ledger");
        }
        tracing::info!(tenant = %current.tenant, from = e.from.as_str(), to = e.to.as_str(), actor = %who.actor, "status change refused");
        EngineError::FailedPrecondition(why)
    }

    /// Adds an override.
    pub async fn grant(&self, o: Override, who: &Who) -> Result<Override, EngineError> {
        let _serial = self.admin_lock.lock().await;
        let (_, c) = self.catalog()?;
        self.existing(&o.tenant).await?;
        meter::keys::check_key(&o.id).map_err(|r| EngineError::invalid("id", r))?;
        o.check_against(&c)?;
        let entry = who.entry(
            o.created_at,
            &o.tenant,
            "override.grant",
            None::<&Override>,
            Some(&o),
        );
        self.control
            .add_override(&o, &entry)
            .await
            .map_err(|e| match e {
                meter::store::StoreError::Conflict(m) => EngineError::AlreadyExists(m),
                e => e.into(),
            })?;
        tracing::info!(tenant = %o.tenant, id = %o.id, actor = %o.actor, reason = %o.reason, "override granted");
        self.changed(&o.tenant);
        Ok(o)
    }

    /// Removes an override; false if it was not there.
    pub async fn revoke(&self, tenant: &str, id: &str, who: &Who) -> Result<bool, EngineError> {
        let _serial = self.admin_lock.lock().await;
        check_tenant(tenant)?;
        meter::keys::check_key(id).map_err(|r| EngineError::invalid("id", r))?;
        if who.actor.trim().is_empty() {
            return Err(EngineError::invalid(
                "actor",
                "must not be empty: say who revokes it",
            ));
        }
        let before = self
            .control
            .overrides(tenant)
            .await?
            .into_iter()
            .find(|o| o.id == id);
        let entry = who.entry(
            self.now(),
            tenant,
            "override.revoke",
            before.as_ref(),
            None::<&Override>,
        );
        let removed = self.control.remove_override(tenant, id, &entry).await?;
        tracing::info!(tenant, id, actor = %who.actor, reason = %who.reason, removed, "override revoked");
        self.changed(tenant);
        Ok(removed)
    }

    /// Records the changes time made in `(after, upto]` (trial ends, grace ends, scheduled
    /// plan changes and cancellations, overrides starting or expiring), as the catalog's
    /// [`StatusMachine`] takes them, for every tenant; returns how
    /// many were new. Entry ids derive from the change, so nodes running this at once, or
    /// a node running it again after a restart, record each change once.
    pub async fn record_due(
        &self,
        after: DateTime<Utc>,
        upto: DateTime<Utc>,
    ) -> Result<usize, EngineError> {
        // No catalog yet: no subscription can have been written either.
        let Ok((_, c)) = self.catalog() else {
            return Ok(0);
        };
        let machine = c.status_machine();
        let mut new = 0;
        for tenant in self.control.tenants().await? {
            let Some(sub) = self.control.subscription(&tenant).await? else {
                continue;
            };
            let overrides = self.control.overrides(&tenant).await?;
            for e in meter::ledger::due(&machine, &sub, &overrides, after, upto) {
                if self.control.record_entry(&e).await? {
                    tracing::info!(tenant = %e.tenant, action = %e.action, at = %e.at, "scheduled change recorded");
                    new += 1;
                }
            }
        }
        Ok(new)
    }

    /// Records an entry no change carries (a refused call).
    pub async fn audit(&self, entry: &LedgerEntry) -> Result<bool, EngineError> {
        Ok(self.control.record_entry(entry).await?)
    }

    /// The last `limit` entries of a tenant's ledger (`""`: catalog changes), oldest first.
    pub async fn history(
        &self,
        tenant: &str,
        limit: usize,
    ) -> Result<Vec<LedgerEntry>, EngineError> {
        if !tenant.is_empty() {
            check_tenant(tenant)?;
        }
        Ok(self.control.ledger(tenant, limit).await?)
    }

    /// The tenant's subscription, overrides and effective entitlements at `at` (default
    /// now). Bypasses the cache: support wants the truth, not the node's view.
    pub async fn tenant_view(
        &self,
        tenant: &str,
        at: Option<DateTime<Utc>>,
    ) -> Result<TenantView, EngineError> {
        let (_, c) = self.catalog()?;
        let sub = self.existing(tenant).await?;
        let overrides = self.control.overrides(tenant).await?;
        let entitlements = resolve(&c, &sub, &overrides, at.unwrap_or_else(|| self.now()));
        Ok(TenantView {
            subscription: sub,
            entitlements,
            overrides,
        })
    }
}
