//! Responses as tables for people (the default output).
//!
//! Key/value tables for single answers, grids for lists. Rows that would only say "nothing
//! here" are left out, so a feature check does not show window counters it never had.

use allot_proto::v1::{
    ApplyCatalogResponse, CheckResponse, CommitResponse, Decision, FeatureEntitlement,
    GetTenantResponse, GetUsageResponse, LimitEntitlement, Outcome, Override, Provenance,
    RecordResponse, ReleaseResponse, ReserveResponse, Subscription, Value, WindowUsage,
};
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{ContentArrangement, Table};
use prost_types::Timestamp;

use super::{convert, json};

/// A table with the house style; with headers it is a grid, without a key/value list.
pub(super) fn table(headers: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic);
    if !headers.is_empty() {
        t.set_header(headers.to_vec());
    }
    t
}

fn pair(t: &mut Table, key: &str, value: impl Into<String>) {
    t.add_row(vec![key.to_string(), value.into()]);
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn when(ts: Option<&Timestamp>) -> String {
    convert::rfc3339_or_empty(ts)
}

/// `x since t`, or just `x` when the since is unknown.
fn since(what: &str, ts: Option<&Timestamp>) -> String {
    match ts {
        Some(t) => format!("{what} since {}", convert::rfc3339(t)),
        None => what.to_string(),
    }
}

/// A feature value in the JSON form `--value` takes, so `"123"` and `123` stay distinct.
fn value_text(v: Option<&Value>) -> String {
    match json::value(v) {
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn outcome_text(d: &Decision) -> String {
    match d.outcome() {
        Outcome::Allow => "ALLOW".into(),
        Outcome::AllowWithWarning => "ALLOW_WITH_WARNING".into(),
        Outcome::Deny => "DENY".into(),
        Outcome::Unspecified => format!("unknown ({})", d.outcome),
    }
}

/// The rows of a decision, added to a key/value table.
fn decision_rows(t: &mut Table, d: Option<&Decision>) {
    let Some(d) = d else {
        pair(t, "outcome", "(no decision)");
        return;
    };
    pair(t, "outcome", outcome_text(d));
    pair(t, "reason", &d.reason);
    if !d.message.is_empty() {
        pair(t, "message", &d.message);
    }
    if !d.window.is_empty() {
        pair(t, "window", &d.window);
        let unlimited = || "unlimited".to_string();
        pair(
            t,
            "limit",
            d.limit.map_or_else(unlimited, |n| n.to_string()),
        );
        pair(t, "used", d.used.to_string());
        pair(t, "reserved", d.reserved.to_string());
        pair(
            t,
            "remaining",
            d.remaining.map_or_else(unlimited, |n| n.to_string()),
        );
    }
    if let Some(r) = &d.retry_after {
        pair(t, "retry after", convert::human(r));
    }
    if let Some(r) = &d.resets_at {
        pair(t, "resets at", convert::rfc3339(r));
    }
    if let Some(p) = d.warning_percent {
        pair(t, "warning", format!("{p}% of the limit passed"));
    }
    if d.overage {
        pair(t, "overage", "yes (past a soft limit)");
    }
    if !d.upgrade.is_empty() {
        let options: Vec<String> = d
            .upgrade
            .iter()
            .map(|u| match (u.kind.as_str(), u.version) {
                ("plan", v) if v > 0 => format!("plan {}@{v}", u.code),
                (kind, _) => format!("{kind} {}", u.code),
            })
            .collect();
        pair(t, "upgrade options", options.join("\n"));
    }
}

/// Check's answer.
pub fn check(r: &CheckResponse) -> String {
    let mut t = table(&[]);
    decision_rows(&mut t, r.decision.as_ref());
    if r.value.is_some() {
        pair(&mut t, "value", value_text(r.value.as_ref()));
    }
    pair(
        &mut t,
        "entitlements version",
        r.entitlements_version.to_string(),
    );
    t.to_string()
}

/// Reserve's answer, with the idempotency key to retry with.
pub fn reserve(r: &ReserveResponse, idempotency_key: &str) -> String {
    let mut t = table(&[]);
    if !r.reservation_id.is_empty() {
        pair(&mut t, "reservation", &r.reservation_id);
    }
    pair(&mut t, "idempotency key", idempotency_key);
    decision_rows(&mut t, r.decision.as_ref());
    if let Some(e) = &r.expires_at {
        pair(&mut t, "expires at", convert::rfc3339(e));
    }
    if r.replayed {
        pair(
            &mut t,
            "replayed",
            "yes (answer to an earlier request with this key)",
        );
    }
    t.to_string()
}

/// Commit's answer.
pub fn commit(r: &CommitResponse) -> String {
    let mut t = table(&[]);
    pair(&mut t, "reserved", r.reserved.to_string());
    pair(&mut t, "committed", r.committed.to_string());
    pair(&mut t, "refunded", r.refunded.to_string());
    pair(&mut t, "replayed", yes_no(r.replayed));
    t.to_string()
}

/// Release's answer.
pub fn release(r: &ReleaseResponse) -> String {
    let mut t = table(&[]);
    pair(&mut t, "released", r.released.to_string());
    pair(&mut t, "replayed", yes_no(r.replayed));
    t.to_string()
}

/// Record's answer, with the event id to retry with.
pub fn record(r: &RecordResponse, event_id: &str) -> String {
    let mut t = table(&[]);
    pair(&mut t, "event id", event_id);
    pair(&mut t, "recorded", yes_no(r.recorded));
    decision_rows(&mut t, r.decision.as_ref());
    if r.replayed {
        pair(
            &mut t,
            "replayed",
            "yes (answer to an earlier event with this id)",
        );
    }
    t.to_string()
}

/// A blank cell instead of 0 for settings that only rate windows have.
fn nonzero(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        n.to_string()
    }
}

fn usage_row(w: &WindowUsage) -> Vec<String> {
    vec![
        w.window.clone(),
        w.limit.to_string(),
        w.used.to_string(),
        w.reserved.to_string(),
        w.remaining.to_string(),
        w.enforcement.clone(),
        nonzero(w.burst),
        w.per.clone(),
        when(w.period_start.as_ref()),
        when(w.resets_at.as_ref()),
    ]
}

/// GetUsage's answer.
pub fn usage(r: &GetUsageResponse) -> String {
    if !r.granted {
        return "metric not granted to this tenant".into();
    }
    if r.windows.is_empty() {
        return "granted without limits".into();
    }
    let mut t = table(&[
        "window",
        "limit",
        "used",
        "reserved",
        "remaining",
        "enforcement",
        "burst",
        "per",
        "period start",
        "resets at",
    ]);
    for w in &r.windows {
        t.add_row(usage_row(w));
    }
    t.to_string()
}

/// ApplyCatalog's answer.
pub fn apply_catalog(r: &ApplyCatalogResponse) -> String {
    let mut t = table(&[]);
    let applied = if r.applied {
        "yes"
    } else {
        "no (dry run: valid, nothing changed)"
    };
    pair(&mut t, "applied", applied);
    pair(
        &mut t,
        "differs from the catalog in force",
        yes_no(r.changed),
    );
    pair(&mut t, "plans", r.plans.join("\n"));
    t.to_string()
}

fn addons_text(s: &Subscription) -> String {
    s.addons
        .iter()
        .map(|a| format!("{} x{}", a.code, a.quantity.max(1)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The rows of a stored subscription that say more than the defaults.
fn subscription_rows(t: &mut Table, s: &Subscription) {
    if !s.addons.is_empty() {
        pair(t, "add-ons", addons_text(s));
    }
    if !s.time_zone.is_empty() {
        pair(t, "time zone", &s.time_zone);
    }
    if let Some(a) = &s.billing_anchor {
        pair(t, "billing anchor", convert::rfc3339(a));
    }
    if let Some(e) = &s.trial_ends_at {
        pair(t, "trial ends", convert::rfc3339(e));
    }
    if !s.post_trial_plan.is_empty() {
        pair(t, "after the trial", &s.post_trial_plan);
    }
    if !s.scheduled_plan.is_empty() {
        let at = s.scheduled_at.as_ref().map(convert::rfc3339);
        let text = match at {
            Some(at) => format!("{} at {at}", s.scheduled_plan),
            None => s.scheduled_plan.clone(),
        };
        pair(t, "scheduled plan", text);
    }
    if let Some(c) = &s.cancel_at {
        pair(t, "cancels at", convert::rfc3339(c));
    }
}

/// A subscription as stored (the answer to subscribe, change and cancel).
pub fn subscription(s: Option<&Subscription>) -> String {
    let Some(s) = s else {
        return "(no subscription in the answer)".into();
    };
    let mut t = table(&[]);
    pair(&mut t, "tenant", &s.tenant);
    pair(&mut t, "plan", since(&s.plan, s.plan_since.as_ref()));
    pair(&mut t, "status", since(&s.status, s.status_since.as_ref()));
    subscription_rows(&mut t, s);
    t.to_string()
}

/// One override, as a key/value table (the answer to grant).
pub fn override_(o: Option<&Override>) -> String {
    let Some(o) = o else {
        return "(no override in the answer)".into();
    };
    let mut t = table(&[]);
    pair(&mut t, "id", &o.id);
    pair(&mut t, "tenant", &o.tenant);
    pair(&mut t, "change", &o.change_json);
    pair(&mut t, "from", when(o.valid_from.as_ref()));
    pair(&mut t, "to", until(o.valid_to.as_ref()));
    pair(&mut t, "active now", yes_no(o.active));
    pair(&mut t, "actor", &o.actor);
    pair(&mut t, "reason", &o.reason);
    pair(&mut t, "granted at", when(o.created_at.as_ref()));
    t.to_string()
}

fn until(ts: Option<&Timestamp>) -> String {
    ts.map_or_else(|| "until revoked".into(), convert::rfc3339)
}

fn sources_text(sources: &[Provenance]) -> String {
    sources
        .iter()
        .map(|p| format!("{} {}", p.kind, p.r#ref))
        .collect::<Vec<_>>()
        .join("\n")
}

fn feature_row(f: &FeatureEntitlement) -> Vec<String> {
    vec![
        f.feature.clone(),
        f.kind.clone(),
        yes_no(f.enabled).into(),
        value_text(f.value.as_ref()),
        sources_text(&f.sources),
        when(f.since.as_ref()),
    ]
}

/// Units per window, written as a rate for the rate windows.
fn limit_amount(l: &LimitEntitlement) -> String {
    match l.window.as_str() {
        "unlimited" => "unlimited".into(),
        "second" => format!("{}/s", l.amount),
        "minute" => format!("{}/min", l.amount),
        _ => l.amount.to_string(),
    }
}

/// Enforcement with the settings that change how it bites, one per line.
fn enforcement_text(l: &LimitEntitlement) -> String {
    let mut lines = vec![match l.overage {
        Some(n) => format!("{} (+{n} overage)", l.enforcement),
        None => l.enforcement.clone(),
    }];
    if !l.warn_at.is_empty() {
        let at: Vec<String> = l.warn_at.iter().map(|p| format!("{p}%")).collect();
        lines.push(format!("warn at {}", at.join(", ")));
    }
    if let Some(max) = l.max_per_request {
        lines.push(format!("max {max}/request"));
    }
    // Node shares are the default; only a shared bucket is worth a line.
    if l.scope == "global" {
        lines.push("global".into());
    }
    // Failing closed is what people expect; only the exception is worth a line.
    if l.on_backend_failure == "fail_open" {
        lines.push("fail_open".into());
    }
    lines.join("\n")
}

fn limit_row(l: &LimitEntitlement) -> Vec<String> {
    vec![
        l.metric.clone(),
        l.window.clone(),
        limit_amount(l),
        nonzero(l.burst),
        enforcement_text(l),
        l.per.clone(),
        match &l.closed_by {
            // Why the metric cannot be consumed, next to what grants it.
            Some(c) => format!(
                "{}\nclosed by {} {}",
                sources_text(&l.sources),
                c.kind,
                c.r#ref
            ),
            None => sources_text(&l.sources),
        },
        when(l.since.as_ref()),
    ]
}

fn override_row(o: &Override) -> Vec<String> {
    vec![
        o.id.clone(),
        o.change_json.clone(),
        when(o.valid_from.as_ref()),
        until(o.valid_to.as_ref()),
        yes_no(o.active).into(),
        o.actor.clone(),
        o.reason.clone(),
    ]
}

/// The support view of a tenant: header, features, limits, overrides, and current usage
/// when it was fetched (`None`: not asked for).
pub fn tenant(
    tenant: &str,
    r: &GetTenantResponse,
    usage_by_metric: Option<&[(String, Result<GetUsageResponse, String>)]>,
) -> String {
    let mut sections = Vec::new();

    let mut head = table(&[]);
    pair(&mut head, "tenant", tenant);
    pair(&mut head, "at", when(r.at.as_ref()));
    pair(&mut head, "plan", since(&r.plan, r.plan_since.as_ref()));
    pair(
        &mut head,
        "status",
        since(&r.status, r.status_since.as_ref()),
    );
    pair(&mut head, "access", &r.access);
    if let Some(s) = &r.subscription {
        subscription_rows(&mut head, s);
    }
    pair(
        &mut head,
        "valid until",
        r.valid_until
            .as_ref()
            .map_or_else(|| "no change planned".into(), convert::rfc3339),
    );
    pair(&mut head, "entitlements version", r.version.to_string());
    sections.push(head.to_string());

    if r.features.is_empty() {
        sections.push("Features: none".into());
    } else {
        let mut t = table(&["feature", "kind", "enabled", "value", "sources", "since"]);
        for f in &r.features {
            t.add_row(feature_row(f));
        }
        sections.push(format!("Features\n{t}"));
    }

    if r.limits.is_empty() {
        sections.push("Limits: none".into());
    } else {
        let mut t = table(&[
            "metric",
            "window",
            "amount",
            "burst",
            "enforcement",
            "per",
            "sources",
            "since",
        ]);
        for l in &r.limits {
            t.add_row(limit_row(l));
        }
        sections.push(format!("Limits\n{t}"));
    }

    if r.overrides.is_empty() {
        sections.push("Overrides: none".into());
    } else {
        let mut t = table(&["id", "change", "from", "to", "active", "actor", "reason"]);
        for o in &r.overrides {
            t.add_row(override_row(o));
        }
        sections.push(format!("Overrides\n{t}"));
    }

    if !r.recent_denials.is_empty() {
        let mut t = table(&["at", "request", "metric", "amount", "reason", "why"]);
        for d in &r.recent_denials {
            t.add_row(vec![
                when(d.at.as_ref()),
                d.request.clone(),
                d.metric.clone(),
                d.amount.to_string(),
                d.reason.clone(),
                d.message.clone(),
            ]);
        }
        sections.push(format!("Last denials on this node\n{t}"));
    }

    if let Some(all) = usage_by_metric {
        sections.push(usage_section(all));
    }
    sections.join("\n\n")
}

/// Current usage of each limited metric, with failed look-ups listed under the table.
fn usage_section(all: &[(String, Result<GetUsageResponse, String>)]) -> String {
    let mut t = table(&[
        "metric",
        "window",
        "used",
        "reserved",
        "remaining",
        "limit",
        "resets at",
    ]);
    let mut notes = Vec::new();
    for (metric, answer) in all {
        match answer {
            Ok(u) => {
                for w in &u.windows {
                    t.add_row(vec![
                        metric.clone(),
                        w.window.clone(),
                        w.used.to_string(),
                        w.reserved.to_string(),
                        w.remaining.to_string(),
                        w.limit.to_string(),
                        when(w.resets_at.as_ref()),
                    ]);
                }
            }
            Err(e) => notes.push(format!("usage of {metric} unavailable: {e}")),
        }
    }
    let mut text = if t.row_count() == 0 {
        "Usage now: none".to_string()
    } else {
        format!("Usage now\n{t}")
    };
    for note in notes {
        text.push('\n');
        text.push_str(&note);
    }
    text
}

/// `allot peers`: this node, then one row per peer.
pub fn peers(p: &allot_proto::v1::GetPeersResponse) -> String {
    let mut t = table(&["peer", "address", "source", "live", "last merge", "error"]);
    for peer in &p.peers {
        let age = peer
            .last_merge_age
            .as_ref()
            .map_or("never".to_string(), |d| {
                let d = std::time::Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32);
                format!(
                    "{} ago",
                    humantime::format_duration(std::time::Duration::from_millis(
                        d.as_millis() as u64
                    ))
                )
            });
        t.add_row(vec![
            if peer.node.is_empty() {
                "?".to_string()
            } else {
                peer.node.clone()
            },
            peer.address.clone(),
            peer.source.clone(),
            yes_no(peer.live).to_string(),
            age,
            peer.error.clone(),
        ]);
    }
    format!(
        "node {} holds {} soft-limit counters; {} of {} peers live ({} nodes share `scope: node` rate limits)\n{t}",
        p.node,
        p.slots,
        p.peers.iter().filter(|x| x.live).count(),
        p.peers.len(),
        p.live_nodes
    )
}

/// `allot tenant history`: one row per entry; with `diff`, the states under it.
pub fn history(tenant: &str, entries: &[allot_proto::v1::LedgerEntry], diff: bool) -> String {
    if entries.is_empty() {
        return format!("no recorded changes for {tenant}");
    }
    let mut t = table(&["at", "action", "source", "actor", "reason", "correlation"]);
    for e in entries {
        let action = if e.applied {
            e.action.clone()
        } else {
            format!("{} (refused)", e.action)
        };
        t.add_row(vec![
            when(e.at.as_ref()),
            action,
            e.source.clone(),
            e.actor.clone(),
            e.reason.clone(),
            e.correlation_id.clone(),
        ]);
        if diff {
            let show = |s: &str| {
                if s.is_empty() {
                    "-".to_string()
                } else {
                    s.to_string()
                }
            };
            t.add_row(vec![String::new(), format!("before: {}", show(&e.before))]);
            t.add_row(vec![String::new(), format!("after: {}", show(&e.after))]);
        }
    }
    t.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use allot_proto::v1::{value::Kind, UpgradeOption};

    #[test]
    fn feature_decisions_leave_out_window_counters() {
        let r = CheckResponse {
            decision: Some(Decision {
                outcome: Outcome::Allow as i32,
                reason: "ok".into(),
                ..Default::default()
            }),
            value: Some(Value {
                kind: Some(Kind::StringValue("gold".into())),
            }),
            entitlements_version: 7,
        };
        let text = check(&r);
        assert!(text.contains("ALLOW"));
        assert!(text.contains("\"gold\""));
        assert!(!text.contains("remaining"));
    }

    #[test]
    fn denials_show_limits_and_upgrades() {
        let r = CheckResponse {
            decision: Some(Decision {
                outcome: Outcome::Deny as i32,
                reason: "limit_exceeded".into(),
                window: "month".into(),
                limit: Some(1000),
                used: 1000,
                remaining: Some(0),
                upgrade: vec![
                    UpgradeOption {
                        kind: "plan".into(),
                        code: "pro".into(),
                        version: 3,
                    },
                    UpgradeOption {
                        kind: "addon".into(),
                        code: "extra_calls".into(),
                        version: 0,
                    },
                ],
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = check(&r);
        for needle in [
            "DENY",
            "limit_exceeded",
            "1000",
            "plan pro@3",
            "addon extra_calls",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }

    #[test]
    fn rate_limits_read_as_rates() {
        let l = LimitEntitlement {
            metric: "api_calls".into(),
            window: "second".into(),
            amount: 10,
            enforcement: "soft".into(),
            overage: Some(5),
            warn_at: vec![80, 90],
            ..Default::default()
        };
        assert_eq!(limit_amount(&l), "10/s");
        assert_eq!(enforcement_text(&l), "soft (+5 overage)\nwarn at 80%, 90%");
        let global = LimitEntitlement {
            scope: "global".into(),
            on_backend_failure: "fail_open".into(),
            ..l
        };
        assert_eq!(
            enforcement_text(&global),
            "soft (+5 overage)\nwarn at 80%, 90%\nglobal\nfail_open"
        );
    }

    #[test]
    fn a_limit_the_status_closes_says_so_next_to_its_sources() {
        let grant = |kind: &str, r: &str| Provenance {
            kind: kind.into(),
            r#ref: r.into(),
            since: None,
        };
        let open = LimitEntitlement {
            metric: "api_calls".into(),
            window: "month".into(),
            amount: 100,
            sources: vec![grant("plan", "pro@1")],
            ..Default::default()
        };
        assert_eq!(limit_row(&open)[6], "plan pro@1");
        let closed = LimitEntitlement {
            closed_by: Some(grant("status", "grace")),
            ..open
        };
        assert_eq!(limit_row(&closed)[6], "plan pro@1\nclosed by status grace");
    }
}
