//! The entitlement ledger: every change of what a tenant is entitled to, as an explicit,
//! timestamped record with its source, actor, reason and correlation id, and the state
//! before and after.
//!
//! Stores write an entry in the same atomic step as the change it records (see
//! [`crate::store::ControlStore`]), so a change never happens without its entry. Changes
//! that happen by themselves at an instant (a trial ends, a scheduled downgrade takes
//! effect, an override expires) are found by [`due`] and recorded with ids derived from
//! what happened and when, so that every node may record them and each is kept once.
//! Requests that were refused (an illegal transition, a caller without the scope) are
//! recorded too, with `applied: false`: the trail says why nothing changed.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::grant::Override;
use crate::lifecycle::Subscription;

/// Where a change came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The Admin API (people, scripts).
    Admin,
    /// A billing provider's webhook.
    Webhook,
    /// Time: something scheduled took effect.
    Schedule,
    /// The node itself (reconciliation, repair).
    System,
}

impl Source {
    /// The name used on the wire and in files.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Admin => "admin",
            Source::Webhook => "webhook",
            Source::Schedule => "schedule",
            Source::System => "system",
        }
    }
}

/// One ledger record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Unique; derived from the change for time-driven entries (so recording twice keeps
    /// one).
    pub id: String,
    /// When the change took (or would have taken) effect.
    pub at: DateTime<Utc>,
    /// The tenant; empty for catalog-wide changes.
    pub tenant: String,
    /// Where it came from.
    pub source: Source,
    /// What happened (`subscription.put`, `override.grant`, `trial.ended`…).
    pub action: String,
    /// Who: a token's principal, a provider, `allot` for time.
    pub actor: String,
    /// Why, as given.
    #[serde(default)]
    pub reason: String,
    /// Ties entries to a request or provider event (a webhook's event id).
    #[serde(default)]
    pub correlation_id: String,
    /// The state before (JSON), empty when there was none.
    #[serde(default)]
    pub before: String,
    /// The state after (JSON), empty when it was removed.
    #[serde(default)]
    pub after: String,
    /// False when the request was refused and nothing changed (the reason says why).
    pub applied: bool,
}

impl LedgerEntry {
    /// An entry for a change made by a request now.
    #[allow(clippy::too_many_arguments)]
    pub fn change(
        id: String,
        at: DateTime<Utc>,
        tenant: &str,
        source: Source,
        action: &str,
        actor: &str,
        reason: &str,
        before: Option<String>,
        after: Option<String>,
    ) -> LedgerEntry {
        LedgerEntry {
            id,
            at,
            tenant: tenant.to_string(),
            source,
            action: action.to_string(),
            actor: actor.to_string(),
            reason: reason.to_string(),
            correlation_id: String::new(),
            before: before.unwrap_or_default(),
            after: after.unwrap_or_default(),
            applied: true,
        }
    }
}

/// The JSON form of a state, for `before` and `after`.
pub fn snapshot<T: Serialize>(state: &T) -> String {
    serde_json::to_string(state).unwrap_or_default()
}

/// The actor of time-driven entries.
pub const SCHEDULE_ACTOR: &str = "allot";

/// The changes of `sub` and `overrides` that took effect by themselves in `(after, upto]`:
/// trial end, scheduled plan change, cancellation, overrides starting late or expiring.
/// Ids depend only on the tenant, the change and its instant.
pub fn due(
    sub: &Subscription,
    overrides: &[Override],
    after: DateTime<Utc>,
    upto: DateTime<Utc>,
) -> Vec<LedgerEntry> {
    let within = |t: DateTime<Utc>| after < t && t <= upto;
    let entry =
        |action: &str, at: DateTime<Utc>, key: &str, reason: String, after: String| LedgerEntry {
            id: format!("{action}:{}:{key}:{}", sub.tenant, at.timestamp_millis()),
            at,
            tenant: sub.tenant.clone(),
            source: Source::Schedule,
            action: action.to_string(),
            actor: SCHEDULE_ACTOR.to_string(),
            reason,
            correlation_id: String::new(),
            before: String::new(),
            after,
            applied: true,
        };
    let mut out = Vec::new();
    if let Some(t) = sub.trial_ends_at.filter(|t| within(*t)) {
        let next = sub
            .post_trial_plan
            .as_ref()
            .map_or_else(|| sub.plan.to_string(), |p| p.to_string());
        let state = sub.state_at(t);
        out.push(entry(
            "trial.ended",
            t,
            "",
            format!("trial ended; now {next}, {}", state.status.as_str()),
            snapshot(&state),
        ));
    }
    if let Some(c) = sub.scheduled_change.as_ref().filter(|c| within(c.at)) {
        out.push(entry(
            "plan.scheduled_change",
            c.at,
            "",
            format!("scheduled change to {} took effect", c.plan),
            snapshot(&sub.state_at(c.at)),
        ));
    }
    if let Some(t) = sub.cancel_at.filter(|t| within(*t)) {
        out.push(entry(
            "subscription.canceled",
            t,
            "",
            "scheduled cancellation took effect".into(),
            snapshot(&sub.state_at(t)),
        ));
    }
    for o in overrides {
        if within(o.valid_from) && o.valid_from > o.created_at {
            out.push(entry(
                "override.started",
                o.valid_from,
                &o.id,
                format!("override {} took effect", o.id),
                snapshot(o),
            ));
        }
        if let Some(t) = o.valid_to.filter(|t| within(*t)) {
            out.push(entry(
                "override.expired",
                t,
                &o.id,
                format!("override {} expired", o.id),
                snapshot(o),
            ));
        }
    }
    out.sort_by(|a, b| a.at.cmp(&b.at).then_with(|| a.id.cmp(&b.id)));
    out
}

/// The next instant after `after` at which [`due`] finds something, if any.
pub fn next_due(
    sub: &Subscription,
    overrides: &[Override],
    after: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let scheduled = sub.scheduled_change.as_ref().map(|c| c.at);
    let starts = overrides
        .iter()
        .filter(|o| o.valid_from > o.created_at)
        .map(|o| o.valid_from);
    [sub.trial_ends_at, scheduled, sub.cancel_at]
        .into_iter()
        .flatten()
        .chain(starts)
        .chain(overrides.iter().filter_map(|o| o.valid_to))
        .filter(|t| *t > after)
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grant::Change;
    use crate::lifecycle::{PlanRef, ScheduledChange, Status};
    use chrono::{Duration, TimeZone};

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
    }

    fn sub() -> Subscription {
        Subscription {
            tenant: "acme".into(),
            plan: PlanRef {
                code: "pro".into(),
                version: 1,
            },
            plan_since: t0(),
            addons: vec![],
            status: Status::Trialing,
            status_since: t0(),
            billing_anchor: t0(),
            time_zone: "UTC".into(),
            trial_ends_at: Some(t0() + Duration::days(14)),
            post_trial_plan: Some(PlanRef {
                code: "free".into(),
                version: 1,
            }),
            scheduled_change: None,
            cancel_at: Some(t0() + Duration::days(40)),
        }
    }

    fn grant(id: &str, from: i64, to: i64) -> Override {
        Override {
            id: id.into(),
            tenant: "acme".into(),
            change: Change::ExtraUnits {
                metric: "api_calls".into(),
                amount: 5,
            },
            valid_from: t0() + Duration::days(from),
            valid_to: Some(t0() + Duration::days(to)),
            actor: "support".into(),
            reason: "goodwill".into(),
            created_at: t0(),
        }
    }

    #[test]
    fn time_driven_changes_are_found_once_at_their_instants() {
        let mut s = sub();
        s.scheduled_change = Some(ScheduledChange {
            at: t0() + Duration::days(31),
            plan: PlanRef {
                code: "basic".into(),
                version: 2,
            },
        });
        let o = [grant("o1", 0, 2), grant("o2", 5, 6)];
        let all = due(&s, &o, t0(), t0() + Duration::days(100));
        let actions: Vec<(&str, i64)> = all
            .iter()
            .map(|e| (e.action.as_str(), (e.at - t0()).num_days()))
            .collect();
        assert_eq!(
            actions,
            vec![
                ("override.expired", 2),
                ("override.started", 5),
                ("override.expired", 6),
                ("trial.ended", 14),
                ("plan.scheduled_change", 31),
                ("subscription.canceled", 40),
            ]
        );
        assert!(all[3].reason.contains("now free@1"), "{}", all[3].reason);
        // Split into any two spans, the same entries with the same ids.
        for cut in [1, 2, 5, 14, 39, 40, 99] {
            let mid = t0() + Duration::days(cut);
            let mut two = due(&s, &o, t0(), mid);
            two.extend(due(&s, &o, mid, t0() + Duration::days(100)));
            assert_eq!(two, all, "cut at day {cut}");
        }
        // The next instant is the first one found, each time.
        let mut at = t0();
        let mut seen = vec![];
        while let Some(next) = next_due(&s, &o, at) {
            seen.extend(due(&s, &o, at, next));
            at = next;
        }
        assert_eq!(seen, all);
        assert!(due(
            &s,
            &o,
            t0() + Duration::days(40),
            t0() + Duration::days(400)
        )
        .is_empty());
    }
}
