//! Responses as JSON, for `--json`.
//!
//! prost types do not implement `Serialize`, so each response gets a small conversion.
//! Field names follow the proto; instants are RFC 3339 strings, durations are whole
//! milliseconds in fields ending in `_ms`, enums are their proto names (`DENY`), and an
//! absent optional field is `null` rather than missing, so `jq` filters need no guards.

use allot_proto::v1::{
    value::Kind, ApplyCatalogResponse, CheckResponse, CommitResponse, Decision, FeatureEntitlement,
    GetTenantResponse, GetUsageResponse, LimitEntitlement, Override, Provenance, RecordResponse,
    ReleaseResponse, ReserveResponse, Subscription, UpgradeOption, Value, WindowUsage,
};
use prost_types::Timestamp;
use serde_json::{json, Value as Json};

use super::convert;

/// An instant as an RFC 3339 string, or null.
fn instant(ts: Option<&Timestamp>) -> Json {
    ts.map_or(Json::Null, |t| Json::String(convert::rfc3339(t)))
}

/// A string that the proto leaves empty when unset, as null.
fn text(s: &str) -> Json {
    if s.is_empty() {
        Json::Null
    } else {
        Json::String(s.to_string())
    }
}

/// A feature value as the JSON it was written in: `true`, `123`, `"gold"`, `["a","b"]`.
pub fn value(v: Option<&Value>) -> Json {
    match v.and_then(|v| v.kind.as_ref()) {
        None => Json::Null,
        Some(Kind::BoolValue(b)) => json!(b),
        Some(Kind::IntValue(i)) => json!(i),
        Some(Kind::StringValue(s)) => json!(s),
        Some(Kind::ListValue(list)) => json!(list.items),
    }
}

fn upgrade(u: &UpgradeOption) -> Json {
    json!({
        "kind": u.kind,
        "code": u.code,
        "version": if u.version == 0 { Json::Null } else { json!(u.version) },
    })
}

/// A decision; `limit` and `remaining` are null when unlimited.
pub fn decision(d: Option<&Decision>) -> Json {
    let Some(d) = d else { return Json::Null };
    json!({
        "outcome": d.outcome().as_str_name(),
        "reason": d.reason,
        "message": d.message,
        "window": text(&d.window),
        "limit": d.limit,
        "used": d.used,
        "reserved": d.reserved,
        "remaining": d.remaining,
        "retry_after_ms": d.retry_after.as_ref().map(convert::millis),
        "resets_at": instant(d.resets_at.as_ref()),
        "warning_percent": d.warning_percent,
        "overage": d.overage,
        "upgrade": d.upgrade.iter().map(upgrade).collect::<Vec<_>>(),
    })
}

/// Check's answer.
pub fn check(r: &CheckResponse) -> Json {
    json!({
        "decision": decision(r.decision.as_ref()),
        "value": value(r.value.as_ref()),
        "entitlements_version": r.entitlements_version,
    })
}

/// Reserve's answer, with the idempotency key that was sent (it may have been generated).
pub fn reserve(r: &ReserveResponse, idempotency_key: &str) -> Json {
    json!({
        "reservation_id": text(&r.reservation_id),
        "idempotency_key": idempotency_key,
        "decision": decision(r.decision.as_ref()),
        "expires_at": instant(r.expires_at.as_ref()),
        "replayed": r.replayed,
    })
}

/// Commit's answer.
pub fn commit(r: &CommitResponse) -> Json {
    json!({
        "reserved": r.reserved,
        "committed": r.committed,
        "refunded": r.refunded,
        "replayed": r.replayed,
    })
}

/// Release's answer.
pub fn release(r: &ReleaseResponse) -> Json {
    json!({ "released": r.released, "replayed": r.replayed })
}

/// Record's answer, with the event id that was sent (it may have been generated).
pub fn record(r: &RecordResponse, event_id: &str) -> Json {
    json!({
        "event_id": event_id,
        "decision": decision(r.decision.as_ref()),
        "recorded": r.recorded,
        "replayed": r.replayed,
    })
}

fn window_usage(w: &WindowUsage) -> Json {
    json!({
        "window": w.window,
        "limit": w.limit,
        "used": w.used,
        "reserved": w.reserved,
        "remaining": w.remaining,
        "period_start": instant(w.period_start.as_ref()),
        "resets_at": instant(w.resets_at.as_ref()),
        "enforcement": text(&w.enforcement),
        "burst": w.burst,
        "per": text(&w.per),
        "scope": text(&w.scope),
    })
}

/// GetUsage's answer.
pub fn usage(r: &GetUsageResponse) -> Json {
    json!({
        "granted": r.granted,
        "windows": r.windows.iter().map(window_usage).collect::<Vec<_>>(),
    })
}

/// ApplyCatalog's answer.
pub fn apply_catalog(r: &ApplyCatalogResponse) -> Json {
    json!({ "applied": r.applied, "changed": r.changed, "plans": r.plans })
}

/// A subscription as stored.
pub fn subscription(s: Option<&Subscription>) -> Json {
    let Some(s) = s else { return Json::Null };
    json!({
        "tenant": s.tenant,
        "plan": s.plan,
        "plan_since": instant(s.plan_since.as_ref()),
        "addons": s.addons.iter().map(|a| json!({
            "code": a.code,
            // 0 means 1 on the wire; say what it means.
            "quantity": a.quantity.max(1),
        })).collect::<Vec<_>>(),
        "status": s.status,
        "status_since": instant(s.status_since.as_ref()),
        "time_zone": text(&s.time_zone),
        "billing_anchor": instant(s.billing_anchor.as_ref()),
        "trial_ends_at": instant(s.trial_ends_at.as_ref()),
        "post_trial_plan": text(&s.post_trial_plan),
        "scheduled_plan": text(&s.scheduled_plan),
        "scheduled_at": instant(s.scheduled_at.as_ref()),
        "cancel_at": instant(s.cancel_at.as_ref()),
    })
}

/// An override as stored; its change is embedded as JSON rather than as a string of JSON.
pub fn override_(o: Option<&Override>) -> Json {
    let Some(o) = o else { return Json::Null };
    let change = serde_json::from_str::<Json>(&o.change_json)
        .unwrap_or_else(|_| Json::String(o.change_json.clone()));
    json!({
        "id": o.id,
        "tenant": o.tenant,
        "change": change,
        "valid_from": instant(o.valid_from.as_ref()),
        "valid_to": instant(o.valid_to.as_ref()),
        "active": o.active,
        "actor": o.actor,
        "reason": o.reason,
        "created_at": instant(o.created_at.as_ref()),
    })
}

fn provenance(p: &Provenance) -> Json {
    json!({ "kind": p.kind, "ref": p.r#ref, "since": instant(p.since.as_ref()) })
}

fn feature(f: &FeatureEntitlement) -> Json {
    json!({
        "feature": f.feature,
        "kind": f.kind,
        "enabled": f.enabled,
        "value": value(f.value.as_ref()),
        "sources": f.sources.iter().map(provenance).collect::<Vec<_>>(),
        "since": instant(f.since.as_ref()),
    })
}

fn limit(l: &LimitEntitlement) -> Json {
    json!({
        "metric": l.metric,
        "window": l.window,
        "amount": l.amount,
        "burst": l.burst,
        "per": text(&l.per),
        "scope": text(&l.scope),
        "enforcement": text(&l.enforcement),
        "warn_at": l.warn_at,
        "overage": l.overage,
        "max_per_request": l.max_per_request,
        "on_backend_failure": text(&l.on_backend_failure),
        "sources": l.sources.iter().map(provenance).collect::<Vec<_>>(),
        "since": instant(l.since.as_ref()),
        "closed_by": l.closed_by.as_ref().map(provenance),
    })
}

/// GetTenant's answer. `usage` is per metric: GetUsage's answer, or `{"error": ...}` when
/// that call failed; `None` when usage was not asked for.
pub fn tenant(
    tenant: &str,
    r: &GetTenantResponse,
    usage_by_metric: Option<&[(String, Result<GetUsageResponse, String>)]>,
) -> Json {
    let usage_by_metric = usage_by_metric.map(|all| {
        all.iter()
            .map(|(metric, answer)| {
                let answer = match answer {
                    Ok(u) => usage(u),
                    Err(e) => json!({ "error": e }),
                };
                (metric.clone(), answer)
            })
            .collect::<serde_json::Map<_, _>>()
    });
    json!({
        "tenant": tenant,
        "at": instant(r.at.as_ref()),
        "plan": text(&r.plan),
        "plan_since": instant(r.plan_since.as_ref()),
        "status": text(&r.status),
        "status_since": instant(r.status_since.as_ref()),
        "access": text(&r.access),
        "valid_until": instant(r.valid_until.as_ref()),
        "version": r.version,
        "subscription": subscription(r.subscription.as_ref()),
        "features": r.features.iter().map(feature).collect::<Vec<_>>(),
        "limits": r.limits.iter().map(limit).collect::<Vec<_>>(),
        "overrides": r.overrides.iter().map(|o| override_(Some(o))).collect::<Vec<_>>(),
        "usage": usage_by_metric,
        "recent_denials": r.recent_denials.iter().map(|d| json!({
            "at": instant(d.at.as_ref()),
            "request": d.request,
            "metric": d.metric,
            "amount": d.amount,
            "reason": d.reason,
            "message": d.message,
        })).collect::<Vec<_>>(),
    })
}

/// `allot tenant history`.
pub fn history(entries: &[allot_proto::v1::LedgerEntry]) -> Json {
    Json::Array(
        entries
            .iter()
            .map(|e| {
                let state = |s: &str| serde_json::from_str::<Json>(s).unwrap_or(Json::Null);
                json!({
                    "id": e.id,
                    "at": instant(e.at.as_ref()),
                    "source": e.source,
                    "action": e.action,
                    "actor": e.actor,
                    "reason": e.reason,
                    "correlation_id": e.correlation_id,
                    "applied": e.applied,
                    "before": state(&e.before),
                    "after": state(&e.after),
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use allot_proto::v1::{Outcome, StringList};
    use prost_types::Duration as PbDuration;

    #[test]
    fn values_are_plain_json() {
        let v = |kind| Value { kind: Some(kind) };
        assert_eq!(value(Some(&v(Kind::BoolValue(true)))), json!(true));
        assert_eq!(value(Some(&v(Kind::IntValue(5)))), json!(5));
        assert_eq!(value(Some(&v(Kind::StringValue("x".into())))), json!("x"));
        let list = StringList {
            items: vec!["a".into(), "b".into()],
        };
        assert_eq!(value(Some(&v(Kind::ListValue(list)))), json!(["a", "b"]));
        assert_eq!(value(None), Json::Null);
        assert_eq!(value(Some(&Value { kind: None })), Json::Null);
    }

    #[test]
    fn decisions_name_outcomes_and_spell_out_units() {
        let d = Decision {
            outcome: Outcome::Deny as i32,
            reason: "rate_limited".into(),
            window: "second".into(),
            limit: Some(10),
            used: 10,
            retry_after: Some(PbDuration {
                seconds: 1,
                nanos: 250_000_000,
            }),
            resets_at: Some(Timestamp {
                seconds: 1_740_830_400,
                nanos: 0,
            }),
            upgrade: vec![UpgradeOption {
                kind: "plan".into(),
                code: "pro".into(),
                version: 2,
            }],
            ..Default::default()
        };
        let j = decision(Some(&d));
        assert_eq!(j["outcome"], "DENY");
        assert_eq!(j["limit"], 10);
        assert_eq!(j["remaining"], Json::Null);
        assert_eq!(j["retry_after_ms"], 1250);
        assert_eq!(j["resets_at"], "2025-03-01T12:00:00Z");
        assert_eq!(j["warning_percent"], Json::Null);
        assert_eq!(j["upgrade"][0]["code"], "pro");
        assert_eq!(j["upgrade"][0]["version"], 2);
    }

    #[test]
    fn override_change_is_embedded() {
        let o = Override {
            id: "ov1".into(),
            change_json: r#"{"kind":"extra_units","metric":"api_calls","amount":10}"#.into(),
            ..Default::default()
        };
        let j = override_(Some(&o));
        assert_eq!(j["change"]["amount"], 10);
        assert_eq!(j["valid_to"], Json::Null);

        let broken = Override {
            change_json: "not json".into(),
            ..Default::default()
        };
        assert_eq!(override_(Some(&broken))["change"], "not json");
    }
}
