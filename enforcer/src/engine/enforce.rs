//! Check, Reserve, Commit, Release, Record and GetUsage.
//!
//! Order of a consuming request: validate → entitlements (cache) → plan (meter) → token
//! buckets (taken: the node's own, then the shared store's for `scope: global`) → store
//! (atomic reserve in all slots or none) → decision (meter). A request the store refuses
//! gives its tokens back, to the shared store too, so a denial costs no rate.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use meter::catalog::Scope;
use meter::decision::{Decision, Reason};
use meter::event::Pending;
use meter::hint::{upgrade_options, Need};
use meter::keys;
use meter::quota::RateSlot;
use meter::quota::{self, Demand, Intent, Planned, RequestPlan};
use meter::resolve::{FeatureGrant, ResolvedLimit};
use meter::store::{
    RateOutcome, RecordOp, ReserveOp, SettleOutcome, Settlement, SlotUsage, StoreError,
};
use meter::window::{period_at, Window};

use crate::degraded::{Entry, EntryState};

use super::soft_route::LOCAL_PREFIX;
use super::{Engine, EngineError, TenantContext};

/// Reservation ids made while the shared store was unreachable start with this.
pub const DEGRADED_PREFIX: &str = "dg-";

/// Default reservation TTL.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
/// Longest reservation TTL.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// Most dimensions on one request.
pub const MAX_DIMENSIONS: usize = 16;
/// How far a client's event time may be off this node's clock and still count as now.
pub const CLOCK_SKEW: chrono::Duration = chrono::Duration::seconds(60);

/// The answer to a feature check.
pub struct FeatureCheck {
    /// The decision.
    pub decision: Decision,
    /// The feature's effective value.
    pub grant: FeatureGrant,
    /// Entitlements version.
    pub version: u64,
}

/// The answer to a reserve.
pub struct Reserved {
    /// The decision.
    pub decision: Decision,
    /// The reservation id when granted.
    pub reservation_id: Option<String>,
    /// When it lapses.
    pub expires_at: Option<DateTime<Utc>>,
    /// A repeated answer.
    pub replayed: bool,
}

/// The answer to a record.
pub struct Recorded {
    /// The decision.
    pub decision: Decision,
    /// Whether it was counted.
    pub recorded: bool,
    /// A repeated answer.
    pub replayed: bool,
}

/// One window of a metric, for GetUsage.
pub struct WindowReport {
    /// The limit.
    pub limit: ResolvedLimit,
    /// Used and reserved (zero for rate windows).
    pub usage: SlotUsage,
    /// Current period start.
    pub period_start: DateTime<Utc>,
    /// Current period end.
    pub resets_at: Option<DateTime<Utc>>,
}

/// Whether a request got past planning and token buckets.
enum Admission {
    /// Decided already.
    Denied(Decision),
    /// On to the store, with what it took from the buckets.
    Proceed { plan: RequestPlan, taken: Taken },
}

/// The tokens a request took, to give back if a later step refuses it.
#[derive(Default)]
struct Taken {
    /// When the node's buckets were taken from.
    mono: u64,
    /// Units taken from each bucket.
    n: u64,
    /// The node's buckets, each with the limit it ran (a share, or a whole limit).
    local: Vec<RateSlot>,
    /// Buckets of the shared store.
    shared: Vec<RateSlot>,
    /// Global buckets ran on the node because the shared store could not be reached and
    /// their limits fail open: the decision must say so.
    degraded: bool,
}

impl Taken {
    /// `d`, saying so when global buckets were passed on the node's share.
    fn mark(&self, d: Decision) -> Decision {
        if self.degraded {
            quota::rate_degraded(d)
        } else {
            d
        }
    }
}

/// The first answer again, for a retry of the same request, from the context the store
/// kept with the grant; `field` names the key that was reused when the retry asks for
/// something else.
fn replay_decision(
    text: &str,
    usage: &[SlotUsage],
    field: &str,
    metric: &str,
    amount: i64,
) -> Result<Decision, EngineError> {
    let p = Pending::from_json(text)
        .map_err(|e| EngineError::Internal(format!("stored replay context unreadable: {e}")))?;
    if p.metric != metric || p.amount != amount {
        return Err(EngineError::invalid(
            field,
            format!(
                "already used for {} {}; a retry must repeat the same request",
                p.amount, p.metric
            ),
        ));
    }
    Ok(p.decide(usage, true))
}

/// A request's context marked as decided while the shared store was unreachable, for the
/// journal: the usage event written when it is reconciled says so.
fn degraded_context(context: &str) -> String {
    match Pending::from_json(context) {
        Ok(mut p) => {
            p.degraded = true;
            p.to_json()
        }
        Err(_) => context.to_string(),
    }
}

fn check_dimensions(dims: &BTreeMap<String, String>) -> Result<(), EngineError> {
    if dims.len() > MAX_DIMENSIONS {
        return Err(EngineError::invalid(
            "dimensions",
            format!("at most {MAX_DIMENSIONS} are allowed"),
        ));
    }
    for (k, v) in dims {
        keys::check_code(k)
            .map_err(|r| EngineError::invalid(format!("dimensions[{k:?}]"), format!("name {r}")))?;
        keys::check_key(v).map_err(|r| EngineError::invalid(format!("dimensions.{k}"), r))?;
    }
    Ok(())
}

fn check_metric_code(metric: &str) -> Result<(), EngineError> {
    keys::check_code(metric).map_err(|r| EngineError::invalid("metric", r))
}

impl Engine {
    /// Whether a feature is on for the tenant, and its value.
    pub async fn check_feature(
        &self,
        tenant: &str,
        feature: &str,
    ) -> Result<FeatureCheck, EngineError> {
        keys::check_code(feature).map_err(|r| EngineError::invalid("feature", r))?;
        let now = self.now();
        let ctx = self.context(tenant, now).await?;
        ctx.catalog.features.get(feature).ok_or_else(|| {
            EngineError::not_found("feature", format!("unknown feature {feature:?}"))
        })?;
        let ent = &ctx.entitlements;
        let grant = ent
            .features
            .get(feature)
            .cloned()
            .expect("every catalog feature is resolved");
        let decision = match ent.access {
            meter::catalog::AccessLevel::None => Decision::deny(
                Reason::SubscriptionInactive,
                format!("subscription is {}", ent.status.as_str()),
            ),
            _ if grant.enabled() => Decision::allow(),
            _ if grant.off_by_status().is_some() => {
                let status = ent.status.as_str();
                Decision::deny(
                    Reason::SubscriptionRestricted,
                    format!("subscription is {status}: {feature} is off in this status (catalog access.{status}.features_off)"),
                )
            }
            _ => {
                let mut d = Decision::deny(
                    Reason::FeatureNotInPlan,
                    format!("{feature} is not included in plan {}", ent.plan),
                );
                d.upgrade = upgrade_options(
                    &ctx.catalog,
                    &ctx.subscription,
                    &ctx.overrides,
                    now,
                    &Need::Feature(feature),
                );
                d
            }
        };
        Ok(FeatureCheck {
            decision,
            grant,
            version: ent.version,
        })
    }

    /// Whether `amount` more units of `metric` would fit now. Consumes nothing.
    pub async fn check_metric(
        &self,
        tenant: &str,
        metric: &str,
        amount: i64,
        dims: &BTreeMap<String, String>,
    ) -> Result<(Decision, u64), EngineError> {
        check_metric_code(metric)?;
        check_dimensions(dims)?;
        // Before any store is asked: a bad request gets its error while the store is slow.
        meter::quota::check_amount_size(amount)?;
        let now = self.now();
        let ctx = self.context(tenant, now).await?;
        let demand = Demand {
            metric,
            amount,
            dimensions: dims,
            intent: Intent::Check,
        };
        let version = ctx.entitlements.version;
        let (plan, taken) = match self.admit(&ctx, &demand, now, true).await? {
            Admission::Denied(d) => return Ok((d, version)),
            Admission::Proceed { plan, taken } => (plan, taken),
        };
        let n = amount.max(0) as u64;
        let keys: Vec<String> = plan.slots.iter().map(|s| s.spec.key.clone()).collect();
        let route = self.route(&plan);
        let read = route.store.usage(tenant, &keys);
        let read = if route.local {
            read.await
        } else {
            self.guarded(read).await
        };
        let mut usage = match read {
            Ok(u) => u,
            Err(StoreError::Unavailable(_)) if self.degraded.is_some() && !route.local => {
                return Ok((quota::degraded(&plan), version));
            }
            Err(e) => return Err(e.into()),
        };
        self.share_usage(tenant, &plan, &route, &mut usage, 0);
        let fits = plan.slots.iter().zip(&usage).all(|(s, u)| {
            s.spec
                .cap
                .is_none_or(|cap| u.used.saturating_add(u.reserved).saturating_add(n) <= cap)
        });
        let d = taken.mark(quota::decide(&plan, &usage, fits));
        Ok((
            self.with_hint(&ctx, d, metric, amount, &usage_totals(&plan, &usage), now),
            ctx.entitlements.version,
        ))
    }

    /// Holds units in every window, or in none.
    #[allow(clippy::too_many_arguments)]
    pub async fn reserve(
        &self,
        tenant: &str,
        metric: &str,
        amount: i64,
        idempotency_key: &str,
        ttl: Option<Duration>,
        dims: &BTreeMap<String, String>,
        reservation_id: String,
    ) -> Result<Reserved, EngineError> {
        check_metric_code(metric)?;
        keys::check_key(idempotency_key).map_err(|r| EngineError::invalid("idempotency_key", r))?;
        check_dimensions(dims)?;
        // Before any store is asked: a bad request gets its error while the store is slow.
        meter::quota::check_amount_size(amount)?;
        let ttl = ttl.unwrap_or(DEFAULT_TTL);
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(EngineError::invalid(
                "ttl",
                format!(
                    "must be more than 0 and at most {}",
                    humantime::format_duration(MAX_TTL)
                ),
            ));
        }
        let now = self.now();
        let ctx = self.context(tenant, now).await?;
        let demand = Demand {
            metric,
            amount,
            dimensions: dims,
            intent: Intent::Reserve,
        };
        let (plan, taken) = match self.admit(&ctx, &demand, now, false).await? {
            Admission::Denied(d) => {
                let id = format!("{reservation_id}/denied");
                return self
                    .reserve_denied(&ctx, &demand, idempotency_key, id, d, now)
                    .await;
            }
            Admission::Proceed { plan, taken } => (plan, taken),
        };
        let n = amount as u64;
        let expires_at = now + chrono::Duration::from_std(ttl).expect("ttl bounded");
        let route = self.route(&plan);
        let reservation_id = if route.local {
            format!("{LOCAL_PREFIX}{reservation_id}@{}", self.node_id())
        } else {
            reservation_id
        };
        let op = ReserveOp {
            tenant: tenant.to_string(),
            metric: metric.to_string(),
            amount: n,
            reservation_id,
            idempotency_key: idempotency_key.to_string(),
            slots: self.store_slots(tenant, &plan, &route),
            expires_at,
            at: now,
            context: Pending::of(&plan, &ctx.entitlements, dims, self.node_id()).to_json(),
        };
        let write = route.store.reserve(op.clone());
        let out = if route.local {
            write.await
        } else {
            self.guarded_write(tenant, idempotency_key, write).await
        };
        let mut out = match out {
            Ok(out) => out,
            Err(StoreError::Unavailable(_)) if self.degraded.is_some() && !route.local => {
                let id = format!("{}/denied", op.reservation_id);
                let mut r = self.reserve_degraded(&plan, op)?;
                if r.decision.outcome.allowed() {
                    r.decision = taken.mark(r.decision);
                } else {
                    self.refund(tenant, &taken).await;
                    if !r.replayed {
                        self.log_denial(&ctx, &demand, id, &r.decision, now).await?;
                    }
                }
                return Ok(r);
            }
            Err(e) => {
                self.refund(tenant, &taken).await;
                return Err(e.into());
            }
        };
        if out.replayed || !out.granted {
            self.refund(tenant, &taken).await;
        }
        if out.replayed {
            return Ok(Reserved {
                decision: replay_decision(
                    &out.context,
                    &out.usage,
                    "idempotency_key",
                    metric,
                    amount,
                )?,
                reservation_id: Some(out.reservation_id),
                expires_at: Some(out.expires_at),
                replayed: true,
            });
        }
        self.share_usage(tenant, &plan, &route, &mut out.usage, 0);
        let d = taken.mark(quota::decide(&plan, &out.usage, out.granted));
        if !out.granted {
            return Ok(denied(self.with_hint(
                &ctx,
                d,
                metric,
                amount,
                &usage_totals(&plan, &out.usage),
                now,
            )));
        }
        Ok(Reserved {
            decision: d,
            reservation_id: Some(out.reservation_id),
            expires_at: Some(out.expires_at),
            replayed: false,
        })
    }

    /// Settles a reservation with the amount actually used.
    pub async fn commit(
        &self,
        tenant: &str,
        reservation_id: &str,
        actual: i64,
    ) -> Result<SettleOutcome, EngineError> {
        super::check_tenant(tenant)?;
        keys::check_key(reservation_id).map_err(|r| EngineError::invalid("reservation_id", r))?;
        if actual < 0 {
            return Err(EngineError::invalid(
                "actual_amount",
                "must not be negative",
            ));
        }
        if let Some(out) = self.settle_degraded(tenant, reservation_id, Some(actual as u64))? {
            return Ok(out);
        }
        let (store, local) = self.store_of(reservation_id)?;
        let write = store.commit(tenant, reservation_id, actual as u64, self.now());
        let out = if local {
            write.await?
        } else {
            self.guarded(write).await?
        };
        if !out.replayed && (local || self.local.is_none()) {
            self.share_settled(store, tenant, reservation_id).await?;
        }
        Ok(out)
    }

    /// Returns a reservation's units.
    pub async fn release(
        &self,
        tenant: &str,
        reservation_id: &str,
    ) -> Result<SettleOutcome, EngineError> {
        super::check_tenant(tenant)?;
        keys::check_key(reservation_id).map_err(|r| EngineError::invalid("reservation_id", r))?;
        if let Some(out) = self.settle_degraded(tenant, reservation_id, None)? {
            return Ok(out);
        }
        let (store, local) = self.store_of(reservation_id)?;
        let write = store.release(tenant, reservation_id, self.now());
        Ok(if local {
            write.await?
        } else {
            self.guarded(write).await?
        })
    }

    /// Counts units at once, deduplicated by event id. A late event (`event_time` in the
    /// past, within the node's lateness limit) counts in the windows of its time, under
    /// the entitlements then in force.
    pub async fn record(
        &self,
        tenant: &str,
        metric: &str,
        amount: i64,
        event_id: &str,
        dims: &BTreeMap<String, String>,
        event_time: Option<DateTime<Utc>>,
    ) -> Result<Recorded, EngineError> {
        check_metric_code(metric)?;
        keys::check_key(event_id).map_err(|r| EngineError::invalid("event_id", r))?;
        check_dimensions(dims)?;
        // Before any store is asked: a bad request gets its error while the store is slow.
        meter::quota::check_amount_size(amount)?;
        let (now, late) = self.event_time(event_time)?;
        let ctx = if late {
            self.context_at(tenant, now).await?
        } else {
            self.context(tenant, now).await?
        };
        let demand = Demand {
            metric,
            amount,
            dimensions: dims,
            intent: Intent::Record,
        };
        let (plan, taken) = match self.admit(&ctx, &demand, now, false).await? {
            Admission::Denied(d) => {
                let id = format!("{event_id}/denied");
                return self
                    .record_denied(&ctx, &demand, event_id, id, d, now)
                    .await;
            }
            Admission::Proceed { plan, taken } => (plan, taken),
        };
        let route = self.route(&plan);
        let op = RecordOp {
            tenant: tenant.to_string(),
            metric: metric.to_string(),
            amount,
            event_id: event_id.to_string(),
            slots: self.store_slots(tenant, &plan, &route),
            at: now,
            context: Pending::of(&plan, &ctx.entitlements, dims, self.node_id()).to_json(),
        };
        let write = route.store.record(op.clone());
        let out = if route.local {
            write.await
        } else {
            self.guarded_write(tenant, event_id, write).await
        };
        let mut out = match out {
            Ok(out) => out,
            Err(StoreError::Unavailable(_)) if self.degraded.is_some() && !route.local => {
                let mut r = self.record_degraded(&plan, &op)?;
                if r.recorded {
                    r.decision = taken.mark(r.decision);
                } else {
                    self.refund(tenant, &taken).await;
                    let id = format!("{event_id}/denied");
                    self.log_denial(&ctx, &demand, id, &r.decision, now).await?;
                }
                return Ok(r);
            }
            Err(e) => {
                self.refund(tenant, &taken).await;
                return Err(e.into());
            }
        };
        if out.replayed || !out.granted {
            self.refund(tenant, &taken).await;
        }
        if out.replayed {
            return Ok(Recorded {
                decision: replay_decision(&out.context, &out.usage, "event_id", metric, amount)?,
                recorded: true,
                replayed: true,
            });
        }
        let added = if out.granted { amount } else { 0 };
        self.share_usage(tenant, &plan, &route, &mut out.usage, added);
        let d = taken.mark(quota::decide(&plan, &out.usage, out.granted));
        let d = if out.granted {
            d
        } else {
            self.with_hint(
                &ctx,
                d,
                metric,
                amount,
                &usage_totals(&plan, &out.usage),
                now,
            )
        };
        Ok(Recorded {
            decision: d,
            recorded: out.granted,
            replayed: false,
        })
    }

    /// The instant a record counts at: now, or the client's event time when it is within
    /// the lateness limit (and not ahead of the node's clock by more than the allowed
    /// skew). Returns it and whether it is late.
    fn event_time(
        &self,
        event_time: Option<DateTime<Utc>>,
    ) -> Result<(DateTime<Utc>, bool), EngineError> {
        let now = self.now();
        let Some(at) = event_time else {
            return Ok((now, false));
        };
        if at > now + CLOCK_SKEW {
            return Err(EngineError::invalid(
                "event_time",
                format!(
                    "{} is ahead of this node's clock ({}) by more than {}",
                    at.to_rfc3339(),
                    now.to_rfc3339(),
                    humantime::format_duration(CLOCK_SKEW.to_std().expect("positive"))
                ),
            ));
        }
        let lateness = self.max_lateness();
        if now - at > lateness {
            return Err(EngineError::invalid(
                "event_time",
                format!(
                    "{} is more than {} ago: events later than that are refused (--max-lateness)",
                    at.to_rfc3339(),
                    humantime::format_duration(lateness.to_std().unwrap_or_default())
                ),
            ));
        }
        // Within the skew either way, the event is now: cached entitlements serve it.
        if (now - at).abs() <= CLOCK_SKEW {
            return Ok((now, false));
        }
        Ok((at, true))
    }

    /// Every window of a tenant's metric. `None` when the metric is not granted.
    pub async fn usage(
        &self,
        tenant: &str,
        metric: &str,
    ) -> Result<Option<Vec<WindowReport>>, EngineError> {
        check_metric_code(metric)?;
        let now = self.now();
        let ctx = self.context(tenant, now).await?;
        if !ctx.catalog.metrics.contains_key(metric) {
            return Err(EngineError::not_found(
                "metric",
                format!("unknown metric {metric:?}"),
            ));
        }
        let Some(limits) = ctx.entitlements.limits.get(metric) else {
            return Ok(None);
        };
        let ent = &ctx.entitlements;
        let periods: Vec<_> = limits
            .iter()
            .map(|l| period_at(l.window, now, ent.time_zone, ent.billing_anchor))
            .collect();
        let keys: Vec<String> = limits
            .iter()
            .zip(&periods)
            .map(|(l, p)| format!("{metric}|{}|{}", l.window, p.start.timestamp()))
            .collect();
        let soft_only = limits
            .iter()
            .all(|l| l.window.is_rate() || l.enforcement == meter::catalog::Enforcement::Soft);
        let mut usage = match self.guarded(self.usage.usage(tenant, &keys)).await {
            Ok(u) => u,
            // Soft-only metrics are counted on the nodes: report them without Redis.
            Err(e) if e.is_transient() && soft_only && self.local.is_some() => {
                vec![SlotUsage::default(); keys.len()]
            }
            Err(e) => return Err(e.into()),
        };
        // Soft windows: what this node's stores hold plus what peers counted. With Redis,
        // a soft window may be counted in both places (requests with a hard window go to
        // Redis whole), and the two count different requests.
        for ((l, k), u) in limits.iter().zip(&keys).zip(usage.iter_mut()) {
            if l.enforcement != meter::catalog::Enforcement::Soft || l.window.is_rate() {
                continue;
            }
            if let Some(local) = &self.local {
                let mine = local.usage(tenant, std::slice::from_ref(k)).await?;
                if let Some(m) = mine.first() {
                    u.used = u.used.saturating_add(m.used);
                    u.reserved = u.reserved.saturating_add(m.reserved);
                }
            }
            let id = meter::soft::SlotId {
                tenant: tenant.to_string(),
                key: k.clone(),
            };
            u.used = u.used.saturating_add(self.soft.others(&id));
        }
        Ok(Some(
            limits
                .iter()
                .zip(periods)
                .zip(usage)
                .map(|((l, p), u)| WindowReport {
                    limit: l.clone(),
                    usage: if l.window.is_rate() {
                        SlotUsage::default()
                    } else {
                        u
                    },
                    period_start: p.start,
                    resets_at: p.end,
                })
                .collect(),
        ))
    }

    /// A store call under the deadline and circuit breaker of a shared store; without
    /// one (embedded store) the call as it is.
    async fn guarded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let Some(d) = &self.degraded else {
            return call.await;
        };
        if !d.breaker.allow() {
            return Err(StoreError::Unavailable(
                "shared store unreachable (circuit open)".into(),
            ));
        }
        match tokio::time::timeout(d.deadline, call).await {
            Ok(Ok(v)) => {
                d.breaker.success();
                Ok(v)
            }
            Ok(Err(e)) if e.is_transient() => {
                d.breaker.failure();
                Err(e)
            }
            Ok(Err(e)) => {
                d.breaker.success();
                Err(e)
            }
            Err(_) => {
                d.breaker.failure();
                Err(StoreError::Indeterminate(format!(
                    "shared store did not answer within {}",
                    humantime::format_duration(d.deadline)
                )))
            }
        }
    }

    /// [`Engine::guarded`] for a write named by a request key (idempotency key or event
    /// id), remembering whether the store may have applied it without answering.
    async fn guarded_write<T>(
        &self,
        tenant: &str,
        key: &str,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let out = self.guarded(call).await;
        if let Some(d) = &self.degraded {
            match &out {
                Err(StoreError::Indeterminate(_)) => d.in_doubt.add(tenant, key),
                // Refused before it reached the store: says nothing about earlier attempts.
                Err(StoreError::Unavailable(_)) => {}
                _ => d.in_doubt.clear(tenant, key),
            }
        }
        out
    }

    /// A fail-closed refusal while degraded, unless an earlier attempt with the same key
    /// may have been applied: then "not counted" could be false, and the client is told to
    /// retry until the store can answer.
    fn refuse_degraded(&self, tenant: &str, key: &str) -> Result<(), EngineError> {
        let d = self.degraded.as_ref().expect("checked by the caller");
        if d.in_doubt.contains(tenant, key) {
            return Err(StoreError::Indeterminate(
                "an earlier attempt with this key got no answer from the shared store, which is still unreachable".into(),
            )
            .into());
        }
        Ok(())
    }

    /// Reserve while the shared store is down: each limit's policy decides; what is
    /// admitted is journaled locally before the answer.
    fn reserve_degraded(&self, plan: &RequestPlan, op: ReserveOp) -> Result<Reserved, EngineError> {
        let journal = &self
            .degraded
            .as_ref()
            .expect("checked by the caller")
            .journal;
        if let Some(first) = journal.reservation_for_key(&op.tenant, &op.idempotency_key)? {
            if first.metric != op.metric || first.amount != op.amount as i64 {
                return Err(EngineError::invalid(
                    "idempotency_key",
                    format!(
                        "already used for {} {}; a retry must repeat the same request",
                        first.amount, first.metric
                    ),
                ));
            }
            let mut d = quota::degraded(plan);
            d.message = "replayed: first granted while the shared store was unreachable".into();
            let expires_at = match first.state {
                EntryState::Held { expires_at } => Some(expires_at),
                _ => None,
            };
            return Ok(Reserved {
                decision: d,
                reservation_id: Some(first.id),
                expires_at,
                replayed: true,
            });
        }
        let d = quota::degraded(plan);
        if !d.outcome.allowed() {
            self.refuse_degraded(&op.tenant, &op.idempotency_key)?;
            return Ok(denied(d));
        }
        let id = format!("{DEGRADED_PREFIX}{}", op.reservation_id);
        let entry = Entry {
            tenant: op.tenant.clone(),
            id: id.clone(),
            metric: op.metric.clone(),
            amount: op.amount as i64,
            slots: op.slots.clone(),
            state: EntryState::Held {
                expires_at: op.expires_at,
            },
            key: Some(op.idempotency_key.clone()),
            context: degraded_context(&op.context),
            reconciled_at: None,
            at: Some(op.at),
        };
        journal.reserve(&entry)?;
        // Per request at debug: an outage at full load would flood the log; the breaker and
        // the reconciler report the episode.
        tracing::debug!(tenant = %op.tenant, metric = %op.metric, amount = op.amount, "reserved while degraded (fail open)");
        Ok(Reserved {
            decision: d,
            reservation_id: Some(id),
            expires_at: Some(op.expires_at),
            replayed: false,
        })
    }

    /// Record while the shared store is down.
    fn record_degraded(&self, plan: &RequestPlan, op: &RecordOp) -> Result<Recorded, EngineError> {
        let journal = &self
            .degraded
            .as_ref()
            .expect("checked by the caller")
            .journal;
        let d = quota::degraded(plan);
        if !d.outcome.allowed() {
            self.refuse_degraded(&op.tenant, &op.event_id)?;
            return Ok(Recorded {
                decision: d,
                recorded: false,
                replayed: false,
            });
        }
        let entry = Entry {
            tenant: op.tenant.clone(),
            id: op.event_id.clone(),
            metric: op.metric.clone(),
            amount: op.amount,
            slots: op.slots.clone(),
            state: EntryState::Recorded,
            key: None,
            context: degraded_context(&op.context),
            reconciled_at: None,
            at: Some(op.at),
        };
        let fresh = journal.record(&entry)?;
        if fresh {
            tracing::debug!(tenant = %op.tenant, metric = %op.metric, amount = op.amount, "recorded while degraded (fail open)");
        }
        Ok(Recorded {
            decision: d,
            recorded: true,
            replayed: !fresh,
        })
    }

    /// Commit or release of a reservation made while degraded (its id says so).
    fn settle_degraded(
        &self,
        tenant: &str,
        id: &str,
        actual: Option<u64>,
    ) -> Result<Option<SettleOutcome>, EngineError> {
        let (Some(d), true) = (&self.degraded, id.starts_with(DEGRADED_PREFIX)) else {
            return Ok(None);
        };
        let (reserved, replayed) = d.journal.settle(tenant, id, actual, self.now())?;
        Ok(Some(SettleOutcome {
            reserved,
            settlement: actual.map_or(Settlement::Released, Settlement::Committed),
            replayed,
            metric: String::new(),
        }))
    }

    /// Plans the demand and passes its token buckets (taking from them unless `peek`):
    /// the node's own first, then the shared store's, so that a request the node refuses
    /// costs the shared store nothing. A denial at any step comes back with its upgrade
    /// hints, and gives back what earlier steps took.
    async fn admit(
        &self,
        ctx: &TenantContext,
        demand: &Demand<'_>,
        now: DateTime<Utc>,
        peek: bool,
    ) -> Result<Admission, EngineError> {
        let hinted = |d| self.with_hint(ctx, d, demand.metric, demand.amount, &[], now);
        let plan = match quota::plan_request(&ctx.catalog, &ctx.entitlements, demand, now)? {
            Planned::Decided(d) => return Ok(Admission::Denied(hinted(d))),
            Planned::Plan(p) => p,
        };
        let n = demand.amount.max(0) as u64;
        let tenant = &ctx.entitlements.tenant;
        let nodes = self.live_nodes();
        let mut taken = Taken {
            mono: self.clock.monotonic_ns(),
            n,
            ..Taken::default()
        };
        if n == 0 || plan.rates.is_empty() {
            return Ok(Admission::Proceed { plan, taken });
        }

        // Each bucket the node runs, with the number of nodes its limit is divided by.
        let mut local: Vec<(&RateSlot, usize)> = Vec::new();
        let mut shared: Vec<&RateSlot> = Vec::new();
        for slot in &plan.rates {
            match (slot.scope, &self.global_rates) {
                (Scope::Node, _) => local.push((slot, nodes)),
                (Scope::Global, Some(_)) => shared.push(slot),
                // No shared store: this node is the only one, and runs the whole limit.
                (Scope::Global, None) => local.push((slot, 1)),
            }
        }
        if let Some(d) = self.take_local(tenant, &local, &mut taken, peek) {
            return Ok(Admission::Denied(hinted(d)));
        }

        if let (false, Some(store)) = (shared.is_empty(), &self.global_rates) {
            let owned: Vec<RateSlot> = shared.iter().map(|s| (*s).clone()).collect();
            match self.guarded(store.take_rate(tenant, &owned, n, peek)).await {
                Ok(RateOutcome::Allowed) => {
                    if !peek {
                        taken.shared = owned;
                    }
                }
                Ok(RateOutcome::Denied { index, retry_after }) => {
                    self.refund(tenant, &taken).await;
                    let slot = owned.get(index).unwrap_or(&owned[0]);
                    return Ok(Admission::Denied(hinted(quota::rate_limited(
                        slot,
                        1,
                        retry_after,
                        n,
                    ))));
                }
                Err(e) if e.is_transient() => {
                    // The limits' policies decide: a closed one refuses, open ones run
                    // on this node's share meanwhile.
                    if let Some(closed) = shared.iter().find(|s| !s.fail_open) {
                        self.refund(tenant, &taken).await;
                        return Ok(Admission::Denied(quota::rate_unavailable(
                            closed,
                            demand.metric,
                        )));
                    }
                    tracing::debug!(tenant = %tenant, error = %e, "global rate limits on this node's share (fail open)");
                    let fallback: Vec<(&RateSlot, usize)> =
                        shared.iter().map(|s| (*s, nodes)).collect();
                    if let Some(d) = self.take_local(tenant, &fallback, &mut taken, peek) {
                        self.refund(tenant, &taken).await;
                        return Ok(Admission::Denied(hinted(d)));
                    }
                    taken.degraded = true;
                }
                Err(e) => {
                    self.refund(tenant, &taken).await;
                    return Err(e.into());
                }
            }
        }
        Ok(Admission::Proceed { plan, taken })
    }

    /// Takes from the node's buckets, each run as its limit divided among `nodes`, all or
    /// none, and records them in `taken` unless `peek`; returns the refusal, if any.
    fn take_local(
        &self,
        tenant: &str,
        buckets: &[(&RateSlot, usize)],
        taken: &mut Taken,
        peek: bool,
    ) -> Option<Decision> {
        if buckets.is_empty() {
            return None;
        }
        let run: Vec<RateSlot> = buckets
            .iter()
            .map(|(slot, nodes)| RateSlot {
                gcra: slot.gcra.per_node(*nodes),
                ..(*slot).clone()
            })
            .collect();
        if let Err(r) = self.buckets.take(tenant, &run, taken.mono, taken.n, peek) {
            let (slot, nodes) = buckets[r.index];
            return Some(quota::rate_limited(slot, nodes, r.retry_after, taken.n));
        }
        if !peek {
            taken.local.extend(run);
        }
        None
    }

    /// Gives back what a request took from the buckets. A refund the shared store misses
    /// (unreachable) only leaves its buckets a little emptier for a while, so it is not
    /// retried.
    async fn refund(&self, tenant: &str, taken: &Taken) {
        if taken.n == 0 {
            return;
        }
        self.buckets
            .refund(tenant, &taken.local, taken.mono, taken.n);
        if let (false, Some(store)) = (taken.shared.is_empty(), &self.global_rates) {
            if let Err(e) = self
                .guarded(store.refund_rate(tenant, &taken.shared, taken.n))
                .await
            {
                tracing::debug!(tenant, error = %e, "global rate refund lost");
            }
        }
    }

    /// A denial decided before the store was asked, unless the key was granted before:
    /// then the retry gets the first answer, as the API promises.
    async fn reserve_denied(
        &self,
        ctx: &TenantContext,
        demand: &Demand<'_>,
        key: &str,
        denial_id: String,
        d: Decision,
        at: DateTime<Utc>,
    ) -> Result<Reserved, EngineError> {
        let (tenant, metric, amount) = (
            ctx.entitlements.tenant.as_str(),
            demand.metric,
            demand.amount,
        );
        if d.reason == Reason::BackendUnavailable && self.degraded.is_some() {
            self.refuse_degraded(tenant, key)?;
        }
        let first = self
            .find_earlier(|s| async move { s.find_reserve(tenant, key).await })
            .await;
        match first {
            Some(first) => Ok(Reserved {
                decision: replay_decision(
                    &first.context,
                    &first.usage,
                    "idempotency_key",
                    metric,
                    amount,
                )?,
                reservation_id: Some(first.reservation_id),
                expires_at: Some(first.expires_at),
                replayed: true,
            }),
            None => {
                self.log_denial(ctx, demand, denial_id, &d, at).await?;
                Ok(denied(d))
            }
        }
    }

    /// Writes the usage event of a request refused before any counter was asked, before
    /// the answer, where this node's events go (with Redis: its local store, shipped to
    /// the streams).
    async fn log_denial(
        &self,
        ctx: &TenantContext,
        demand: &Demand<'_>,
        id: String,
        d: &Decision,
        at: DateTime<Utc>,
    ) -> Result<(), EngineError> {
        let p = Pending::decided(
            &ctx.entitlements,
            demand.metric,
            demand.amount,
            demand.dimensions,
            self.node_id(),
            d,
        );
        let e = meter::event::Spooled {
            kind: meter::event::EventKind::Denial,
            id,
            amount: demand.amount,
            at_ms: at.timestamp_millis(),
            context: p.to_json(),
            usage: Vec::new(),
            granted: false,
        };
        let store = self.local.as_ref().unwrap_or(&self.usage);
        Ok(store
            .append_events(&ctx.entitlements.tenant, vec![e])
            .await?)
    }

    /// An earlier answer for a request key: the node's local store first (soft-only
    /// requests with Redis), then the store every node shares. A store that cannot answer
    /// counts as not having it: the request is then decided afresh.
    async fn find_earlier<T, Fut>(
        &self,
        find: impl Fn(std::sync::Arc<dyn meter::store::UsageStore>) -> Fut,
    ) -> Option<T>
    where
        Fut: std::future::Future<Output = Result<Option<T>, StoreError>>,
    {
        if let Some(local) = &self.local {
            if let Ok(Some(first)) = find(local.clone()).await {
                return Some(first);
            }
        }
        self.guarded(find(self.usage.clone())).await.unwrap_or(None)
    }

    /// Same as [`Engine::reserve_denied`] for records.
    async fn record_denied(
        &self,
        ctx: &TenantContext,
        demand: &Demand<'_>,
        event_id: &str,
        denial_id: String,
        d: Decision,
        at: DateTime<Utc>,
    ) -> Result<Recorded, EngineError> {
        let (tenant, metric, amount) = (
            ctx.entitlements.tenant.as_str(),
            demand.metric,
            demand.amount,
        );
        if d.reason == Reason::BackendUnavailable && self.degraded.is_some() {
            self.refuse_degraded(tenant, event_id)?;
        }
        let first = self
            .find_earlier(|s| async move { s.find_record(tenant, event_id).await })
            .await;
        match first {
            Some(first) => Ok(Recorded {
                decision: replay_decision(
                    &first.context,
                    &first.usage,
                    "event_id",
                    metric,
                    amount,
                )?,
                recorded: true,
                replayed: true,
            }),
            None => {
                self.log_denial(ctx, demand, denial_id, &d, at).await?;
                Ok(Recorded {
                    decision: d,
                    recorded: false,
                    replayed: false,
                })
            }
        }
    }

    /// Adds upgrade options to a denial that an upgrade could fix.
    fn with_hint(
        &self,
        ctx: &TenantContext,
        mut d: Decision,
        metric: &str,
        amount: i64,
        totals: &[(Window, u64)],
        now: DateTime<Utc>,
    ) -> Decision {
        let fixable = matches!(
            d.reason,
            Reason::FeatureNotInPlan
                | Reason::LimitExceeded
                | Reason::AboveLimitAfterDowngrade
                | Reason::ExceedsBurst
                | Reason::PerRequestMaxExceeded
        );
        if d.outcome.allowed() || !fixable {
            return d;
        }
        let need = Need::Units {
            metric,
            amount: amount.max(0) as u64,
            totals,
        };
        d.upgrade = upgrade_options(&ctx.catalog, &ctx.subscription, &ctx.overrides, now, &need);
        d
    }
}

fn denied(decision: Decision) -> Reserved {
    Reserved {
        decision,
        reservation_id: None,
        expires_at: None,
        replayed: false,
    }
}

/// For each quota window, the total the request needed (held + amount).
fn usage_totals(plan: &RequestPlan, usage: &[SlotUsage]) -> Vec<(Window, u64)> {
    let n = plan.amount.max(0) as u64;
    plan.slots
        .iter()
        .zip(usage)
        .map(|(s, u)| {
            (
                s.window,
                u.used.saturating_add(u.reserved).saturating_add(n),
            )
        })
        .collect()
}

/// Whether a settlement means the units were counted.
pub fn committed_amount(s: Settlement) -> u64 {
    match s {
        Settlement::Committed(a) => a,
        _ => 0,
    }
}
