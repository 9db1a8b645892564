//! Conversions between `meter`/engine types and `allot.v1` messages.

use std::collections::BTreeMap;

use allot_proto::v1 as pb;
use chrono::{DateTime, Utc};
use meter::catalog::FeatureValue;
use meter::decision::{Decision, Outcome, UpgradeOption};
use meter::grant::Override;
use meter::lifecycle::Subscription;
use meter::resolve::{Provenance, ResolvedLimit, Source};
use tonic::Status;

use super::status::invalid;

/// A timestamp for the wire.
pub fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// An optional timestamp from the wire, naming the field when it is out of range.
pub fn from_ts(
    field: &str,
    t: Option<prost_types::Timestamp>,
) -> Result<Option<DateTime<Utc>>, Status> {
    t.map(|t| {
        if !(0..1_000_000_000).contains(&t.nanos) {
            return Err(invalid(field, "nanos must be within 0..1e9"));
        }
        DateTime::from_timestamp(t.seconds, t.nanos as u32)
            .ok_or_else(|| invalid(field, "out of range"))
    })
    .transpose()
}

/// An optional duration from the wire.
pub fn from_duration(
    field: &str,
    d: Option<prost_types::Duration>,
) -> Result<Option<std::time::Duration>, Status> {
    d.map(|d| {
        if d.seconds < 0 || d.nanos < 0 {
            return Err(invalid(field, "must not be negative"));
        }
        Ok(std::time::Duration::new(d.seconds as u64, d.nanos as u32))
    })
    .transpose()
}

/// A duration for the wire.
pub fn duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// A decision for the wire.
pub fn decision(d: &Decision) -> pb::Decision {
    pb::Decision {
        outcome: match d.outcome {
            Outcome::Allow => pb::Outcome::Allow,
            Outcome::AllowWithWarning => pb::Outcome::AllowWithWarning,
            Outcome::Deny => pb::Outcome::Deny,
        } as i32,
        reason: d.reason.as_str().to_string(),
        message: d.message.clone(),
        window: d.window.map(|w| w.as_str().to_string()).unwrap_or_default(),
        limit: d.limit,
        used: d.used,
        reserved: d.reserved,
        remaining: d.remaining,
        retry_after: d.retry_after.map(duration),
        resets_at: d.resets_at.map(ts),
        warning_percent: d.warning_percent.map(u32::from),
        overage: d.overage,
        upgrade: d
            .upgrade
            .iter()
            .map(|u| match u {
                UpgradeOption::Plan { code, version } => pb::UpgradeOption {
                    kind: "plan".into(),
                    code: code.clone(),
                    version: *version,
                },
                UpgradeOption::Addon { code } => pb::UpgradeOption {
                    kind: "addon".into(),
                    code: code.clone(),
                    version: 0,
                },
            })
            .collect(),
    }
}

/// A feature value for the wire.
pub fn value(v: &FeatureValue) -> pb::Value {
    use pb::value::Kind;
    let kind = match v {
        FeatureValue::Bool(b) => Kind::BoolValue(*b),
        FeatureValue::Int(i) => Kind::IntValue(*i),
        FeatureValue::Str(s) => Kind::StringValue(s.clone()),
        FeatureValue::List(l) => Kind::ListValue(pb::StringList { items: l.clone() }),
    };
    pb::Value { kind: Some(kind) }
}

/// A feature value from the wire.
pub fn from_value(field: &str, v: Option<pb::Value>) -> Result<FeatureValue, Status> {
    use pb::value::Kind;
    match v.and_then(|v| v.kind) {
        None => Err(invalid(field, "required")),
        Some(Kind::BoolValue(b)) => Ok(FeatureValue::Bool(b)),
        Some(Kind::IntValue(i)) => Ok(FeatureValue::Int(i)),
        Some(Kind::StringValue(s)) => Ok(FeatureValue::Str(s)),
        Some(Kind::ListValue(l)) => Ok(FeatureValue::List(l.items)),
    }
}

/// Dimensions from the wire, sorted.
pub fn dimensions(d: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    d.into_iter().collect()
}

/// Provenance for the wire.
pub fn provenance(p: &Provenance) -> pb::Provenance {
    let (kind, r) = match &p.source {
        Source::Plan { plan } => ("plan", plan.clone()),
        Source::Addon { code, .. } => ("addon", code.clone()),
        Source::Override { id } => ("override", id.clone()),
        Source::Status { status } => ("status", status.as_str().to_string()),
    };
    pb::Provenance {
        kind: kind.into(),
        r#ref: r,
        since: Some(ts(p.since)),
    }
}

/// A limit for the wire.
pub fn limit(metric: &str, l: &ResolvedLimit) -> pb::LimitEntitlement {
    pb::LimitEntitlement {
        metric: metric.into(),
        window: l.window.as_str().into(),
        amount: l.amount,
        burst: l.burst.unwrap_or(0),
        per: l.per.clone().unwrap_or_default(),
        enforcement: enum_name(&l.enforcement),
        warn_at: l.warn_at.iter().map(|p| u32::from(*p)).collect(),
        overage: l
            .overage
            .filter(|_| l.enforcement == meter::catalog::Enforcement::Soft),
        max_per_request: l.max_per_request,
        on_backend_failure: enum_name(&l.on_backend_failure),
        sources: l.sources.iter().map(provenance).collect(),
        since: Some(ts(l.since)),
        scope: scope(l),
        // Set by the caller, which knows the status (see `Entitlements::closed`).
        closed_by: None,
    }
}

/// A rate limit's scope for the wire; empty for other windows, which have none.
pub fn scope(l: &ResolvedLimit) -> String {
    if l.window.is_rate() {
        l.scope.as_str().into()
    } else {
        String::new()
    }
}

/// The serde name of a unit enum variant.
pub fn enum_name<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// A subscription for the wire.
pub fn subscription(s: &Subscription) -> pb::Subscription {
    pb::Subscription {
        tenant: s.tenant.clone(),
        plan: s.plan.to_string(),
        plan_since: Some(ts(s.plan_since)),
        addons: s
            .addons
            .iter()
            .map(|a| pb::AddonItem {
                code: a.code.clone(),
                quantity: a.quantity,
            })
            .collect(),
        status: s.status.as_str().into(),
        status_since: Some(ts(s.status_since)),
        time_zone: s.time_zone.clone(),
        billing_anchor: Some(ts(s.billing_anchor)),
        trial_ends_at: s.trial_ends_at.map(ts),
        post_trial_plan: s
            .post_trial_plan
            .as_ref()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        scheduled_plan: s
            .scheduled_change
            .as_ref()
            .map(|c| c.plan.to_string())
            .unwrap_or_default(),
        scheduled_at: s.scheduled_change.as_ref().map(|c| ts(c.at)),
        cancel_at: s.cancel_at.map(ts),
    }
}

/// An override for the wire.
pub fn override_(o: &Override, now: DateTime<Utc>) -> pb::Override {
    pb::Override {
        id: o.id.clone(),
        tenant: o.tenant.clone(),
        change_json: serde_json::to_string(&o.change).unwrap_or_default(),
        valid_from: Some(ts(o.valid_from)),
        valid_to: o.valid_to.map(ts),
        actor: o.actor.clone(),
        reason: o.reason.clone(),
        created_at: Some(ts(o.created_at)),
        active: o.active_at(now),
    }
}

/// A ledger entry on the wire.
pub fn ledger_entry(e: meter::ledger::LedgerEntry) -> pb::LedgerEntry {
    pb::LedgerEntry {
        at: Some(ts(e.at)),
        source: e.source.as_str().to_string(),
        id: e.id,
        tenant: e.tenant,
        action: e.action,
        actor: e.actor,
        reason: e.reason,
        correlation_id: e.correlation_id,
        before: e.before,
        after: e.after,
        applied: e.applied,
    }
}
