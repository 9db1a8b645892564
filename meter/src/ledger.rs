//! The entitlement ledger: every change of what a tenant is entitled to, as an explicit,
//! timestamped record with its source, actor, reason and correlation id, and the state
//! before and after.
//!
//! Stores write an entry in the same atomic step as the change it records (see
//! [`crate::store::ControlStore`]), so a change never happens without its entry. Changes
//! that happen by themselves at an instant (a trial ends, a scheduled downgrade takes
//! effect, a grace period runs out, an override expires) are found by [`due`], which asks
//! the catalog's [`StatusMachine`] what time did, and recorded with ids derived from what
//! happened and when, so that every node may record them and each is kept once.
//! Requests that were refused (an illegal transition, a caller without the scope) are
//! recorded too, with `applied: false`: the trail says why nothing changed.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::grant::Override;
use crate::lifecycle::Subscription;
use crate::status_machine::{Cause, StatusMachine, Step};

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

/// The ledger entries of steps the machine took by itself (trial end, grace end,
/// scheduled plan change, cancellation date), each at its instant, with an id that
/// depends only on the tenant, the step and its instant. `start` is the subscription
/// before the steps, as `machine` advanced it; the entry's `after` is what was in force
/// from the step's instant on.
///
/// Steps someone asked for ([`Cause::Requested`]) have no entry here: the request's own
/// entry records them.
pub fn step_entries(
    machine: &StatusMachine,
    start: &Subscription,
    steps: &[Step],
) -> Vec<LedgerEntry> {
    steps
        .iter()
        .filter_map(|step| {
            let state = machine.state_at(start, step.at);
            let (action, reason) = match step.cause {
                Cause::TrialEnd => (
                    "trial.ended",
                    format!(
                        "trial ended; now {}, {}",
                        step.plan.as_ref().unwrap_or(&state.plan),
                        step.to.as_str()
                    ),
                ),
                Cause::GraceEnd => (
                    "grace.ended",
                    format!(
                        "grace of {} days ended; now {}",
                        machine.grace().num_days(),
                        step.to.as_str()
                    ),
                ),
                Cause::ScheduledChange => (
                    "plan.scheduled_change",
                    format!(
                        "scheduled change to {} took effect",
                        step.plan.as_ref().unwrap_or(&state.plan)
                    ),
                ),
                Cause::CancelAt => (
                    "subscription.canceled",
                    "scheduled cancellation took effect".to_string(),
                ),
                Cause::Requested => return None,
            };
            Some(scheduled(
                &start.tenant,
                action,
                step.at,
                "",
                reason,
                snapshot(&state),
            ))
        })
        .collect()
}

/// An entry of a change time made; its id names the change and its instant only.
fn scheduled(
    tenant: &str,
    action: &str,
    at: DateTime<Utc>,
    key: &str,
    reason: String,
    after: String,
) -> LedgerEntry {
    LedgerEntry {
        id: format!("{action}:{tenant}:{key}:{}", at.timestamp_millis()),
        at,
        tenant: tenant.to_string(),
        source: Source::Schedule,
        action: action.to_string(),
        actor: SCHEDULE_ACTOR.to_string(),
        reason,
        correlation_id: String::new(),
        before: String::new(),
        after,
        applied: true,
    }
}

/// The changes of `sub` and `overrides` that took effect by themselves in `(after, upto]`,
/// as `machine` (the catalog's, see [`crate::catalog::Catalog::status_machine`]) takes
/// them: trial end, grace end, scheduled plan change, cancellation, and overrides
/// starting late or expiring. Ids depend only on the tenant, the change and its instant.
pub fn due(
    machine: &StatusMachine,
    sub: &Subscription,
    overrides: &[Override],
    after: DateTime<Utc>,
    upto: DateTime<Utc>,
) -> Vec<LedgerEntry> {
    let within = |t: DateTime<Utc>| after < t && t <= upto;
    let mut out = Vec::new();
    if after < upto {
        // What was due by `after` was found by an earlier call; the machine's steps in
        // the span follow from there.
        let mut start = sub.clone();
        machine.advance(&mut start, after);
        let mut s = start.clone();
        let steps = machine.advance(&mut s, upto);
        out = step_entries(machine, &start, &steps);
    }
    for o in overrides {
        if within(o.valid_from) && o.valid_from > o.created_at {
            out.push(scheduled(
                &sub.tenant,
                "override.started",
                o.valid_from,
                &o.id,
                format!("override {} took effect", o.id),
                snapshot(o),
            ));
        }
        if let Some(t) = o.valid_to.filter(|t| within(*t)) {
            out.push(scheduled(
                &sub.tenant,
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
    machine: &StatusMachine,
    sub: &Subscription,
    overrides: &[Override],
    after: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let mut s = sub.clone();
    machine.advance(&mut s, after);
    let starts = overrides
        .iter()
        .filter(|o| o.valid_from > o.created_at)
        .map(|o| o.valid_from);
    machine
        .next_due(&s)
        .map(|d| d.at)
        .into_iter()
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
        let m = StatusMachine::default();
        let all = due(&m, &s, &o, t0(), t0() + Duration::days(100));
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
            let mut two = due(&m, &s, &o, t0(), mid);
            two.extend(due(&m, &s, &o, mid, t0() + Duration::days(100)));
            assert_eq!(two, all, "cut at day {cut}");
        }
        // The next instant is the first one found, each time.
        let mut at = t0();
        let mut seen = vec![];
        while let Some(next) = next_due(&m, &s, &o, at) {
            seen.extend(due(&m, &s, &o, at, next));
            at = next;
        }
        assert_eq!(seen, all);
        assert!(due(
            &m,
            &s,
            &o,
            t0() + Duration::days(40),
            t0() + Duration::days(400)
        )
        .is_empty());
    }

    #[test]
    fn grace_end_is_recorded_at_its_instant_and_a_canceled_trial_never_converts() {
        let m = StatusMachine::new(3);
        let mut s = sub();
        s.status = Status::Grace;
        s.trial_ends_at = None;
        s.post_trial_plan = None;
        s.cancel_at = None;
        let all = due(&m, &s, &[], t0(), t0() + Duration::days(30));
        assert_eq!(all.len(), 1, "{all:?}");
        assert_eq!(
            (all[0].action.as_str(), all[0].at),
            ("grace.ended", t0() + Duration::days(3))
        );
        assert!(
            all[0].after.contains("\"status\":\"suspended\""),
            "{}",
            all[0].after
        );
        assert_eq!(next_due(&m, &s, &[], t0()), Some(t0() + Duration::days(3)));
        assert_eq!(next_due(&m, &s, &[], t0() + Duration::days(3)), None);

        // Canceled on day 2, its trial would have ended on day 14: only the cancellation.
        let mut s = sub();
        s.cancel_at = Some(t0() + Duration::days(2));
        let all = due(&m, &s, &[], t0(), t0() + Duration::days(100));
        let actions: Vec<&str> = all.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(actions, vec!["subscription.canceled"]);
    }
}
