//! How a request for units of a metric is decided, minus the storage.
//!
//! [`plan_request`] validates the request against the entitlements and turns every
//! applicable limit into a counter slot (quota and gauge windows, kept by a store) or a
//! token bucket (rate windows, kept at the edge). The store then reserves in all slots or
//! in none, and [`decide`] turns what it saw into a [`Decision`]. The same plan serves
//! Check (nothing is consumed), Reserve and Record.
//!
//! A token bucket is a node's share of the limit (`scope: node`, see
//! [`Gcra::per_node`]) or one bucket in the shared store (`scope: global`); the caller
//! runs it, and [`rate_limited`], [`rate_unavailable`] and [`rate_degraded`] say what
//! came of it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::catalog::AccessLevel;
use crate::catalog::{Catalog, MetricKind, Scope};
use crate::decision::{Decision, Outcome, Reason};
use crate::gcra::Gcra;
use crate::resolve::{Entitlements, ResolvedLimit};
use crate::store::{SlotSpec, SlotUsage};
use crate::window::{period_at, Period, Window};

/// The largest amount one request may carry: 10^15 units (a billion USD in micros) keeps
/// every counter exact, far from the edge of 64 bits, however many requests add up.
pub const MAX_REQUEST_AMOUNT: u64 = 1_000_000_000_000_000;

/// A request for units of a metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand<'a> {
    /// Metric code.
    pub metric: &'a str,
    /// Units asked for; negative only for gauge releases through Record.
    pub amount: i64,
    /// Request dimensions (`api_key`…), used by per-dimension rate limits.
    pub dimensions: &'a BTreeMap<String, String>,
    /// What the request does with the units.
    pub intent: Intent,
}

/// What a request does with the units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// Only asks whether they would fit (amount may be 0: "is the metric granted?").
    Check,
    /// Holds them (positive amounts only).
    Reserve,
    /// Counts them at once (signed for gauges).
    Record,
}

/// A bad request, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The field's value is not acceptable.
    #[error("{field}: {reason}")]
    Invalid {
        /// The request field.
        field: String,
        /// Why.
        reason: String,
    },
    /// The field names something that does not exist.
    #[error("{field}: {reason}")]
    NotFound {
        /// The request field.
        field: String,
        /// What is missing.
        reason: String,
    },
}

/// Refuses an amount no request may carry, whatever the entitlements: callers can check
/// it before asking any store.
pub fn check_amount_size(amount: i64) -> Result<(), RequestError> {
    if amount.unsigned_abs() > MAX_REQUEST_AMOUNT {
        return Err(invalid(
            "amount",
            format!("is too large (at most {MAX_REQUEST_AMOUNT} per request)"),
        ));
    }
    Ok(())
}

fn invalid(field: &str, reason: impl Into<String>) -> RequestError {
    RequestError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A counter slot together with the limit it enforces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaSlot {
    /// The window.
    pub window: Window,
    /// The limit amount (for warnings and `remaining`).
    pub limit: u64,
    /// Soft limit: past `limit` is overage.
    pub soft: bool,
    /// Warning thresholds in percent.
    pub warn_at: Vec<u8>,
    /// The period the slot counts.
    pub resets_at: Option<DateTime<Utc>>,
    /// What the store needs.
    pub spec: SlotSpec,
    /// The limit allows requests when its backend cannot be reached.
    #[serde(default)]
    pub fail_open: bool,
    /// Month and billing-period windows: the billing period the slot counts, named by
    /// the local year and month it starts in (`2026-11`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<String>,
}

/// A token bucket the request must pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateSlot {
    /// `second` or `minute`.
    pub window: Window,
    /// Bucket key within the tenant: metric, window and dimension value.
    pub bucket: String,
    /// The limit as granted, for the whole fleet: a node runs
    /// [`Gcra::per_node`] of it under `scope: node`.
    pub gcra: Gcra,
    /// A share per node, or one bucket in the shared store.
    pub scope: Scope,
    /// A global bucket falls back to the node's share when the shared store cannot be
    /// reached, instead of refusing.
    pub fail_open: bool,
}

/// What a request needs from storage and buckets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPlan {
    /// Metric code.
    pub metric: String,
    /// Units asked for.
    pub amount: i64,
    /// Whether the metric is a gauge.
    pub gauge: bool,
    /// Counter slots, all of which must have room.
    pub slots: Vec<QuotaSlot>,
    /// Token buckets, all of which must have room.
    pub rates: Vec<RateSlot>,
}

/// The outcome of planning: either decided already (no access, not in plan…), or a plan
/// for the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Planned {
    /// Decided without storage.
    Decided(Decision),
    /// Needs the store's answer.
    Plan(RequestPlan),
}

/// Plans `demand` against `ent` at `at`. Returns an error for bad input, which changes
/// nothing.
pub fn plan_request(
    catalog: &Catalog,
    ent: &Entitlements,
    demand: &Demand<'_>,
    at: DateTime<Utc>,
) -> Result<Planned, RequestError> {
    let metric = demand.metric;
    let def = catalog
        .metrics
        .get(metric)
        .ok_or_else(|| RequestError::NotFound {
            field: "metric".into(),
            reason: format!("unknown metric {metric:?}"),
        })?;
    let gauge = def.kind == MetricKind::Gauge;
    let amount = demand.amount;
    match demand.intent {
        Intent::Check if amount < 0 => return Err(invalid("amount", "must not be negative")),
        Intent::Reserve if amount <= 0 => {
            return Err(invalid("amount", "must be positive (at least 1)"))
        }
        Intent::Record if amount == 0 => return Err(invalid("amount", "must not be zero")),
        Intent::Record if amount < 0 && !gauge => {
            return Err(invalid(
                "amount",
                format!(
                "must be positive: {metric} is a counter; only gauges take negative adjustments"
            ),
            ))
        }
        _ => {}
    }
    check_amount_size(amount)?;

    // A Check for a positive amount asks whether a Reserve would pass, so it follows the
    // same access rule.
    let consumes = amount > 0;
    if ent.access == AccessLevel::None {
        return Ok(Planned::Decided(Decision::deny(
            Reason::SubscriptionInactive,
            format!("subscription is {}", ent.status.as_str()),
        )));
    }
    if let Some(closed) = ent.closed.get(metric).filter(|_| consumes) {
        let status = ent.status.as_str();
        let d = match &closed.feature {
            Some(feature) => Decision::deny(
                Reason::SubscriptionRestricted,
                format!(
                    "subscription is {status}: {feature} is off in this status (catalog access.{status}.features_off), so {metric} cannot be consumed"
                ),
            ),
            None => Decision::deny(
                Reason::SubscriptionReadOnly,
                format!(
                    "subscription is {status}: read-only access, and {metric} is not among the metrics it keeps consumable (catalog access.{status})"
                ),
            ),
        };
        return Ok(Planned::Decided(d));
    }
    let Some(limits) = ent.limits.get(metric) else {
        return Ok(Planned::Decided(Decision::deny(
            Reason::FeatureNotInPlan,
            format!("{metric} is not included in plan {}", ent.plan),
        )));
    };

    let mut slots = Vec::new();
    let mut rates = Vec::new();
    for l in limits {
        if amount > 0 {
            if let Some(max) = l.max_per_request {
                if amount as u64 > max {
                    let mut d = Decision::deny(
                        Reason::PerRequestMaxExceeded,
                        format!("{amount} {metric} in one request is more than the maximum {max}"),
                    );
                    d.limit = Some(max);
                    d.window = Some(l.window);
                    return Ok(Planned::Decided(d));
                }
            }
        }
        if l.window.is_rate() {
            rates.push(rate_slot(metric, l, demand.dimensions)?);
        } else {
            slots.push(quota_slot(metric, l, ent, at));
        }
    }
    Ok(Planned::Plan(RequestPlan {
        metric: metric.to_string(),
        amount,
        gauge,
        slots,
        rates,
    }))
}

fn quota_slot(metric: &str, l: &ResolvedLimit, ent: &Entitlements, at: DateTime<Utc>) -> QuotaSlot {
    let period: Period = period_at(l.window, at, ent.time_zone, ent.billing_anchor);
    QuotaSlot {
        window: l.window,
        limit: l.amount,
        soft: l.enforcement == crate::catalog::Enforcement::Soft,
        warn_at: l.warn_at.clone(),
        resets_at: period.end,
        spec: SlotSpec {
            key: format!("{metric}|{}|{}", l.window, period.start.timestamp()),
            cap: l.cap(),
            ends_at: period.end,
        },
        fail_open: l.on_backend_failure == crate::catalog::FailurePolicy::FailOpen,
        period: matches!(l.window, Window::Month | Window::BillingPeriod).then(|| {
            period
                .start
                .with_timezone(&ent.time_zone)
                .format("%Y-%m")
                .to_string()
        }),
    }
}

fn rate_slot(
    metric: &str,
    l: &ResolvedLimit,
    dimensions: &BTreeMap<String, String>,
) -> Result<RateSlot, RequestError> {
    let period = l.window.rate_period().expect("rate window");
    let gcra = Gcra::new(l.amount, period, l.burst.unwrap_or(l.amount))
        .map_err(|e| invalid("metric", format!("rate limit of {metric} is unusable: {e}")))?;
    let bucket = match &l.per {
        None => format!("{metric}|{}", l.window),
        Some(dim) => {
            let field = format!("dimensions.{dim}");
            let value = dimensions.get(dim).ok_or_else(|| {
                invalid(
                    &field,
                    format!("required: {metric} has a per-{dim} rate limit"),
                )
            })?;
            crate::keys::check_key(value).map_err(|r| invalid(&field, r))?;
            format!("{metric}|{}|{dim}={value}", l.window)
        }
    };
    Ok(RateSlot {
        window: l.window,
        bucket,
        gcra,
        scope: l.scope,
        fail_open: l.on_backend_failure == crate::catalog::FailurePolicy::FailOpen,
    })
}

/// Builds the decision for `plan` from the usage the store saw (one entry per slot, in
/// order, before this request) and whether the store admitted it.
pub fn decide(plan: &RequestPlan, usage: &[SlotUsage], admitted: bool) -> Decision {
    let amount = plan.amount.max(0) as u64;
    const ZERO: SlotUsage = SlotUsage {
        used: 0,
        reserved: 0,
    };
    let rows = plan
        .slots
        .iter()
        .zip(usage.iter().chain(std::iter::repeat(&ZERO)));
    if !admitted {
        for (slot, u) in rows {
            let Some(cap) = slot.spec.cap else { continue };
            let held = u.used.saturating_add(u.reserved);
            if held.saturating_add(amount) <= cap {
                continue;
            }
            let above = plan.gauge && u.used > slot.limit;
            let (reason, message) = if above {
                (
                    Reason::AboveLimitAfterDowngrade,
                    format!(
                        "{} {} in use is already above the limit {}; existing ones stay, new ones are refused",
                        u.used, plan.metric, slot.limit
                    ),
                )
            } else {
                (
                    Reason::LimitExceeded,
                    format!(
                        "{amount} more {} would pass the {} limit of {} ({} used, {} reserved)",
                        plan.metric, slot.window, slot.limit, u.used, u.reserved
                    ),
                )
            };
            let mut d = Decision::deny(reason, message);
            fill(&mut d, slot, u, cap.saturating_sub(held));
            return d;
        }
        // The store refused without a slot over its cap (a gauge going below zero is an
        // error, not a refusal), so this is the store's own word.
        return Decision::deny(Reason::LimitExceeded, "refused by the store");
    }

    // Allowed: report the tightest window, and warn past thresholds or soft limits.
    // The tightest window: overage first, then the highest fill.
    let mut best: Option<((bool, u128), Decision)> = None;
    for (slot, u) in rows {
        let after = if plan.amount < 0 {
            u.used
                .saturating_add(u.reserved)
                .saturating_sub(plan.amount.unsigned_abs())
        } else {
            u.used.saturating_add(u.reserved).saturating_add(amount)
        };
        let mut d = Decision::allow();
        fill(
            &mut d,
            slot,
            u,
            slot.spec.cap.map_or(u64::MAX, |c| c.saturating_sub(after)),
        );
        if slot.spec.cap.is_none() || slot.soft {
            d.remaining = Some(slot.limit.saturating_sub(after));
        }
        let percent = if slot.limit == 0 {
            if after > 0 {
                u128::MAX
            } else {
                0
            }
        } else {
            u128::from(after) * 100 / u128::from(slot.limit)
        };
        if slot.soft && after > slot.limit && amount > 0 {
            d.outcome = Outcome::AllowWithWarning;
            d.reason = Reason::Overage;
            d.overage = true;
            d.message = format!(
                "allowed as overage: {after} of {} {} this {}",
                slot.limit, plan.metric, slot.window
            );
        }
        if let Some(t) = slot
            .warn_at
            .iter()
            .rev()
            .find(|t| u128::from(**t) <= percent)
        {
            d.warning_percent = Some(*t);
            if d.outcome == Outcome::Allow {
                d.outcome = Outcome::AllowWithWarning;
                d.reason = Reason::NearLimit;
                d.message = format!(
                    "{}% of the {} limit of {} {} reached",
                    percent.min(999),
                    slot.window,
                    slot.limit,
                    plan.metric
                );
            }
        }
        let rank = (d.overage, percent);
        if best.as_ref().is_none_or(|(r, _)| rank > *r) {
            best = Some((rank, d));
        }
    }
    best.map_or_else(Decision::allow, |(_, d)| d)
}

fn fill(d: &mut Decision, slot: &QuotaSlot, u: &SlotUsage, remaining: u64) {
    d.window = Some(slot.window);
    d.limit = Some(slot.limit);
    d.used = u.used;
    d.reserved = u.reserved;
    d.remaining = Some(remaining);
    d.resets_at = slot.resets_at;
}

/// The decision for a request stopped by a token bucket: `retry_after` is the wait the
/// bucket named, `None` when `amount` never fits its burst. `nodes` is how many nodes
/// share the limit (1 for a global bucket or a single node), so that a request larger
/// than a node's share of the burst, though within the burst, says why.
pub fn rate_limited(
    slot: &RateSlot,
    nodes: usize,
    retry_after: Option<std::time::Duration>,
    amount: u64,
) -> Decision {
    let (reason, message) = match retry_after {
        Some(_) => (
            Reason::RateLimited,
            format!(
                "rate limit of {} per {} reached",
                slot.gcra.rate(),
                slot.window
            ),
        ),
        None if nodes > 1 && amount <= slot.gcra.burst() => (
            Reason::ExceedsBurst,
            format!(
                "{amount} at once is more than this node's share of the burst ({} of {} over {nodes} nodes)",
                slot.gcra.per_node(nodes).burst(),
                slot.gcra.burst()
            ),
        ),
        None => (
            Reason::ExceedsBurst,
            format!(
                "{amount} at once is more than the burst of {}",
                slot.gcra.burst()
            ),
        ),
    };
    let mut d = Decision::deny(reason, message);
    d.window = Some(slot.window);
    d.limit = Some(slot.gcra.rate());
    d.retry_after = retry_after;
    d
}

/// The decision when a global bucket's store cannot be reached and its limit fails
/// closed.
pub fn rate_unavailable(slot: &RateSlot, metric: &str) -> Decision {
    let mut d = Decision::deny(
        Reason::BackendUnavailable,
        format!(
            "the shared store is unreachable and the global {} rate limit of {metric} fails closed",
            slot.window
        ),
    );
    d.window = Some(slot.window);
    d.limit = Some(slot.gcra.rate());
    d
}

/// `d` for a request whose global buckets were passed on the node's own share because
/// the shared store could not be reached (their limits fail open): an allowance says
/// so, a denial stands as it is.
pub fn rate_degraded(mut d: Decision) -> Decision {
    if d.outcome.allowed() && d.reason != Reason::DegradedFailOpen {
        d.outcome = Outcome::AllowWithWarning;
        d.reason = Reason::DegradedFailOpen;
        d.message = "the shared store is unreachable; allowed on this node's share of the global rate limits, which fail open".into();
    }
    d
}

/// The decision when the store holding the counters cannot be reached: allowed (and
/// saying so) only if every limit of the request fails open; denied otherwise, naming the
/// first limit that fails closed.
pub fn degraded(plan: &RequestPlan) -> Decision {
    match plan.slots.iter().find(|s| !s.fail_open) {
        None => {
            let mut d = Decision::simple(
                Outcome::AllowWithWarning,
                Reason::DegradedFailOpen,
                "the shared store is unreachable; allowed because the limits fail open, counted locally and reconciled later",
            );
            d.window = plan.slots.first().map(|s| s.window);
            d
        }
        Some(slot) => {
            let mut d = Decision::deny(
                Reason::BackendUnavailable,
                format!(
                    "the shared store is unreachable and the {} limit of {} fails closed",
                    slot.window, plan.metric
                ),
            );
            d.window = Some(slot.window);
            d.limit = Some(slot.limit);
            d.resets_at = slot.resets_at;
            d
        }
    }
}
