//! The subscription state machine: which status may follow which, and the steps a
//! subscription takes by itself as time passes (a trial ends, a grace period runs out, a
//! cancellation date arrives, a scheduled downgrade begins).
//!
//! [`Subscription`] stores intentions; this module owns the rules for moving between
//! statuses. Every change of status goes through [`StatusMachine::transition`] (a step
//! someone asked for) or [`StatusMachine::advance`] (steps that were due), and both only
//! ever take an edge of the table below. A refused step returns an [`IllegalTransition`]
//! naming from, to and why, and leaves the subscription exactly as it was, so the caller
//! can audit the refusal.
//!
//! # The edges
//!
//! | from | may go to | why these |
//! |---|---|---|
//! | `pending` | `trialing`, `active`, `canceled` | a trial starts, the first payment succeeds, or the checkout is abandoned |
//! | `trialing` | `active`, `past_due`, `suspended`, `canceled`, `refunded`, `chargeback` | the trial converts, its first invoice fails, it ends without a way to pay (Stripe's `paused`), or it is canceled; money taken during a trial can be returned or disputed |
//! | `active` | `trialing`, `past_due`, `canceled`, `refunded`, `chargeback` | a provider may grant a new free period to a paying subscription (both have full access); a payment fails; the end; money returned or disputed |
//! | `past_due` | `active`, `grace`, `canceled`, `refunded`, `chargeback` | paid after all; collection gave up (Stripe's `unpaid`) |
//! | `grace` | `active`, `suspended`, `canceled`, `refunded`, `chargeback` | paid during grace; the grace period ran out |
//! | `suspended` | `active`, `canceled`, `refunded`, `chargeback` | paid at last (access comes back); the end |
//! | `canceled` | `refunded`, `chargeback` | money questions outlive the subscription |
//! | `refunded` | `chargeback` | a refunded charge can still be disputed |
//! | `chargeback` | — | final |
//!
//! Two rules shape it. Nothing goes back to `pending`, and nothing leaves the ended
//! statuses (`canceled`, `refunded`, `chargeback`) except toward a more serious one
//! (canceled < refunded < chargeback): a provider's canceled subscription never comes
//! back (a new one is a new subscription), and money that was returned or disputed stops
//! service until a person decides otherwise. Past-due keeps full access while the
//! provider retries; grace is where access degrades (read-only by default, see
//! [`crate::catalog::default_access`]).
//!
//! # Time
//!
//! Nothing here reads a clock. The steps that happen by themselves are, in order at one
//! instant: the trial end (to `active` on the post-trial plan, or `canceled` without
//! one), the grace end (`grace` lasts [`StatusMachine::grace`], [`DEFAULT_GRACE_DAYS`]
//! days unless configured, counted from `status_since`, then `suspended`), a scheduled
//! plan change, and `cancel_at` (to `canceled`). [`StatusMachine::next_due`] names the
//! next of them, so a node can schedule a wake-up, and [`StatusMachine::state_at`] says
//! what is in force at any instant without anyone having called in.
//!
//! This is the only reading of time in the crate: resolution ([`crate::resolve`]), the
//! ledger's time-driven entries ([`crate::ledger::due`]), [`Subscription`]'s plan changes
//! and cancellations, and the Admin API's status changes all go through one machine,
//! built from the catalog ([`crate::catalog::Catalog::status_machine`]) so that its grace
//! period is the catalog's `grace_days`. A past `cancel_at` never turns `refunded` or
//! `chargeback` into `canceled` (that would leave the more serious status), `cancel_at` is
//! cleared on entering either, and a trial canceled before its end stays canceled: its
//! trial end is not a step any more.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::lifecycle::{InForce, PlanRef, Status, Subscription};

/// How long `grace` lasts before `suspended` when nothing else is configured: a week,
/// long enough for a customer to notice the read-only mode and pay, short enough that
/// unpaid service does not run for a whole further period.
pub const DEFAULT_GRACE_DAYS: u32 = 7;

/// The allowed next statuses of each status (see the table in the module docs).
const EDGES: [(Status, &[Status]); 9] = {
    use Status::*;
    [
        (Pending, &[Trialing, Active, Canceled]),
        (
            Trialing,
            &[Active, PastDue, Suspended, Canceled, Refunded, Chargeback],
        ),
        (Active, &[Trialing, PastDue, Canceled, Refunded, Chargeback]),
        (PastDue, &[Active, Grace, Canceled, Refunded, Chargeback]),
        (Grace, &[Active, Suspended, Canceled, Refunded, Chargeback]),
        (Suspended, &[Active, Canceled, Refunded, Chargeback]),
        (Canceled, &[Refunded, Chargeback]),
        (Refunded, &[Chargeback]),
        (Chargeback, &[]),
    ]
};

/// The statuses `from` may move to in one step.
pub fn next_statuses(from: Status) -> &'static [Status] {
    EDGES
        .iter()
        .find(|(s, _)| *s == from)
        .map_or(&[], |(_, next)| next)
}

/// Whether `from → to` is an edge of the table (a status never "moves" to itself).
pub fn allows(from: Status, to: Status) -> bool {
    next_statuses(from).contains(&to)
}

/// Whether some sequence of allowed steps leads from `from` to `to` (true when equal).
///
/// Provider snapshots are judged by this rather than by [`allows`]: a snapshot says where
/// the provider is now, not how it got there, and the events in between may be late or
/// lost.
pub fn reaches(from: Status, to: Status) -> bool {
    let mut seen = vec![from];
    let mut i = 0;
    while i < seen.len() {
        for next in next_statuses(seen[i]) {
            if !seen.contains(next) {
                seen.push(*next);
            }
        }
        i += 1;
    }
    seen.contains(&to)
}

/// Whether the subscription has ended (`canceled`, `refunded`, `chargeback`): it only
/// moves toward a more serious ended status from there.
pub fn is_ended(status: Status) -> bool {
    matches!(
        status,
        Status::Canceled | Status::Refunded | Status::Chargeback
    )
}

/// What made a step happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// `trial_ends_at` arrived.
    TrialEnd,
    /// The grace period ran out.
    GraceEnd,
    /// A scheduled plan change began.
    ScheduledChange,
    /// `cancel_at` arrived.
    CancelAt,
    /// Someone asked for it ([`StatusMachine::transition`]).
    Requested,
}

impl Cause {
    /// The name used in logs and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::TrialEnd => "trial_end",
            Cause::GraceEnd => "grace_end",
            Cause::ScheduledChange => "scheduled_change",
            Cause::CancelAt => "cancel_at",
            Cause::Requested => "requested",
        }
    }
}

/// A step that will happen by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Due {
    /// When.
    pub at: DateTime<Utc>,
    /// What.
    pub cause: Cause,
}

/// A change the machine made: one entry of the entitlement ledger to be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// When it took effect.
    pub at: DateTime<Utc>,
    /// Why.
    pub cause: Cause,
    /// Status before.
    pub from: Status,
    /// Status after (equal to `from` for a plan change alone).
    pub to: Status,
    /// The plan from then on, when the step changed it.
    pub plan: Option<PlanRef>,
}

/// A refused change: the subscription was left as it was.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
pub struct IllegalTransition {
    /// The status in force at `at` (after the steps that were due).
    pub from: Status,
    /// The status asked for.
    pub to: Status,
    /// When it was asked for.
    pub at: DateTime<Utc>,
    /// Why it was refused.
    pub why: Why,
}

impl std::fmt::Display for IllegalTransition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} → {} at {}: {}",
            self.from.as_str(),
            self.to.as_str(),
            self.at,
            self.why.explain(self.from, self.to)
        )
    }
}

/// Why a change was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Why {
    /// Not an edge of the table.
    NoEdge,
    /// No sequence of edges leads there (provider snapshots).
    Unreachable,
    /// The instant is before the current status began: time does not run backwards.
    Backdated {
        /// Since when the current status holds.
        since: DateTime<Utc>,
    },
    /// `trialing` needs a `trial_ends_at` after the instant of the change.
    NoTrialEnd,
}

impl Why {
    /// A sentence for people: what was wrong and what is allowed instead.
    pub fn explain(&self, from: Status, to: Status) -> String {
        let allowed = || {
            let next = next_statuses(from);
            if next.is_empty() {
                format!("{} is final", from.as_str())
            } else {
                let names: Vec<_> = next.iter().map(|s| s.as_str()).collect();
                format!(
                    "from {} the next status can be {}",
                    from.as_str(),
                    names.join(", ")
                )
            }
        };
        match self {
            Why::NoEdge => format!("not an allowed step; {}", allowed()),
            Why::Unreachable if is_ended(from) => format!(
                "an ended subscription does not come back or become less serious; {}",
                allowed()
            ),
            Why::Unreachable if to == Status::Pending => {
                "nothing goes back to pending once it has started".to_string()
            }
            Why::Unreachable => format!("no sequence of allowed steps leads there; {}", allowed()),
            Why::Backdated { since } => format!(
                "the subscription has been {} since {since}, which is later",
                from.as_str()
            ),
            Why::NoTrialEnd => "trialing needs a trial_ends_at after the change".to_string(),
        }
    }
}

/// The state machine, with its one setting: how long grace lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusMachine {
    grace: Duration,
}

impl Default for StatusMachine {
    fn default() -> Self {
        StatusMachine::new(DEFAULT_GRACE_DAYS)
    }
}

impl StatusMachine {
    /// A machine whose grace period lasts `grace_days` days (0: suspended at once).
    pub fn new(grace_days: u32) -> Self {
        StatusMachine {
            grace: Duration::days(i64::from(grace_days)),
        }
    }

    /// How long grace lasts.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// When `sub`'s grace period ends, if it is in grace.
    pub fn grace_ends_at(&self, sub: &Subscription) -> Option<DateTime<Utc>> {
        (sub.status == Status::Grace)
            .then(|| sub.status_since.checked_add_signed(self.grace))
            .flatten()
    }

    /// The next step `sub` will take by itself, even if its instant has passed (then the
    /// caller should [`advance`](Self::advance) now). `None`: nothing is scheduled.
    pub fn next_due(&self, sub: &Subscription) -> Option<Due> {
        let mut due: Vec<(DateTime<Utc>, Cause)> = Vec::new();
        if sub.status == Status::Trialing {
            if let Some(t) = sub.trial_ends_at {
                due.push((t, Cause::TrialEnd));
            }
        }
        if let Some(t) = self.grace_ends_at(sub) {
            due.push((t, Cause::GraceEnd));
        }
        if let Some(c) = &sub.scheduled_change {
            due.push((c.at, Cause::ScheduledChange));
        }
        if let Some(t) = sub.cancel_at {
            if !is_ended(sub.status) {
                due.push((t, Cause::CancelAt));
            }
        }
        // Same instant: in the order of `Cause` (trial end, grace end, plan change,
        // cancellation), so a downgrade due with the cancellation is in the final record.
        due.into_iter().min().map(|(at, cause)| Due { at, cause })
    }

    /// Takes every step that is due by `now`, in time order, and returns them.
    pub fn advance(&self, sub: &mut Subscription, now: DateTime<Utc>) -> Vec<Step> {
        let mut steps = Vec::new();
        while let Some(due) = self.next_due(sub) {
            if due.at > now {
                break;
            }
            steps.push(take_due(sub, due));
        }
        steps
    }

    /// What is in force at `at`, with the instant it next changes by itself (a trial end,
    /// a grace end, a scheduled change, a cancellation date).
    pub fn state_at(&self, sub: &Subscription, at: DateTime<Utc>) -> InForce {
        let mut s = sub.clone();
        self.advance(&mut s, at);
        InForce {
            next_change: self.next_due(&s).map(|d| d.at),
            plan: s.plan,
            plan_since: s.plan_since,
            status: s.status,
            status_since: s.status_since,
        }
    }

    /// Moves `sub` to `to` at `at`, after taking the steps that were due by then.
    ///
    /// Returns every step taken, the requested one last (none of its own when `sub` is
    /// already in `to`). On refusal `sub` is left exactly as it was, due steps included.
    /// Leaving a trial for a live status puts the post-trial plan in force, as its
    /// natural end would;
    /// entering `refunded` or `chargeback` drops `cancel_at`; entering `canceled` sets it
    /// to `at`. Moving to `trialing` needs `trial_ends_at` set, after `at`.
    pub fn transition(
        &self,
        sub: &mut Subscription,
        to: Status,
        at: DateTime<Utc>,
    ) -> Result<Vec<Step>, IllegalTransition> {
        let refuse = |from, why| IllegalTransition { from, to, at, why };
        if at < sub.status_since {
            return Err(refuse(
                sub.status,
                Why::Backdated {
                    since: sub.status_since,
                },
            ));
        }
        let mut s = sub.clone();
        let mut steps = self.advance(&mut s, at);
        let from = s.status;
        if from != to {
            if !allows(from, to) {
                return Err(refuse(from, Why::NoEdge));
            }
            if to == Status::Trialing && s.trial_ends_at.is_none_or(|t| t <= at) {
                return Err(refuse(from, Why::NoTrialEnd));
            }
            steps.push(enter(&mut s, to, at, Cause::Requested));
        }
        *sub = s;
        Ok(steps)
    }
}

/// Sets `sub`'s status to `to` at `at` with the side effects every entry has (see
/// [`StatusMachine::transition`]); the caller checked the edge.
pub(crate) fn enter(sub: &mut Subscription, to: Status, at: DateTime<Utc>, cause: Cause) -> Step {
    let from = sub.status;
    let mut plan = None;
    if from == Status::Trialing && to != Status::Trialing {
        // A trial that converts (to any live status) moves to the plan it converts to; one
        // that ends keeps its plan: a canceled trial is not a paid plan.
        if let Some(p) = sub.post_trial_plan.take().filter(|_| !is_ended(to)) {
            if p != sub.plan {
                plan = Some(p.clone());
            }
            sub.plan = p;
            sub.plan_since = at;
        }
        sub.trial_ends_at = None;
    }
    match to {
        Status::Refunded | Status::Chargeback => sub.cancel_at = None,
        Status::Canceled => sub.cancel_at = Some(at),
        _ => {}
    }
    sub.status = to;
    sub.status_since = at;
    Step {
        at,
        cause,
        from,
        to,
        plan,
    }
}

/// Takes one due step (as named by `next_due`, which guarantees it applies).
fn take_due(sub: &mut Subscription, due: Due) -> Step {
    let from = sub.status;
    // Steps that happen by themselves keep `cancel_at` as it was: it is the record of when
    // the subscription ends.
    let cancel_at = sub.cancel_at;
    let to = match due.cause {
        Cause::TrialEnd if sub.post_trial_plan.is_some() => Status::Active,
        Cause::TrialEnd | Cause::CancelAt => Status::Canceled,
        Cause::GraceEnd => Status::Suspended,
        // `next_due` never names `Requested`.
        Cause::ScheduledChange | Cause::Requested => from,
    };
    if to != from {
        let step = enter(sub, to, due.at, due.cause);
        sub.cancel_at = cancel_at;
        return step;
    }
    let plan = sub.scheduled_change.take().map(|c| c.plan);
    if let Some(p) = &plan {
        sub.plan = p.clone();
        sub.plan_since = due.at;
    }
    Step {
        at: due.at,
        cause: Cause::ScheduledChange,
        from,
        to: from,
        plan,
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::lifecycle::ScheduledChange;

    fn t(day: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, day, 12, 0, 0).unwrap()
    }

    fn plan(code: &str) -> PlanRef {
        PlanRef {
            code: code.into(),
            version: 1,
        }
    }

    fn sub(status: Status, since: DateTime<Utc>) -> Subscription {
        Subscription {
            tenant: "acme".into(),
            plan: plan("pro"),
            plan_since: since,
            addons: vec![],
            status,
            status_since: since,
            billing_anchor: since,
            time_zone: "UTC".into(),
            trial_ends_at: None,
            post_trial_plan: None,
            scheduled_change: None,
            cancel_at: None,
        }
    }

    #[test]
    fn the_lifecycle_path_is_allowed_and_ended_is_one_way() {
        use Status::*;
        for (a, b) in [
            (Pending, Trialing),
            (Trialing, Active),
            (Active, PastDue),
            (PastDue, Grace),
            (Grace, Suspended),
            (Suspended, Canceled),
            (PastDue, Active),
            (Grace, Active),
            (Canceled, Refunded),
            (Refunded, Chargeback),
        ] {
            assert!(allows(a, b), "{a:?} → {b:?}");
        }
        for (a, b) in [
            (Active, Pending),
            (Canceled, Active),
            (Refunded, Canceled),
            (Chargeback, Refunded),
            (Active, Grace),
            (Pending, Refunded),
        ] {
            assert!(!allows(a, b), "{a:?} → {b:?}");
        }
        assert!(reaches(Active, Grace), "through past_due");
        assert!(reaches(Suspended, Trialing), "through active");
        assert!(!reaches(Canceled, Active));
        assert!(!reaches(Trialing, Pending));
        assert!(next_statuses(Chargeback).is_empty());
    }

    #[test]
    fn an_illegal_transition_names_from_to_and_why_and_changes_nothing() {
        let m = StatusMachine::default();
        let mut s = sub(Status::Canceled, t(1));
        let before = s.clone();
        let e = m.transition(&mut s, Status::Active, t(2)).unwrap_err();
        assert_eq!(
            (e.from, e.to, e.why.clone()),
            (Status::Canceled, Status::Active, Why::NoEdge)
        );
        assert!(
            e.to_string().starts_with("canceled → active at 2026-03-02 12:00:00 UTC: not an allowed step; from canceled the next status can be refunded, chargeback"),
            "{e}"
        );
        assert_eq!(s, before);
    }

    #[test]
    fn a_refusal_leaves_due_steps_untaken_too() {
        let m = StatusMachine::new(3);
        let mut s = sub(Status::Grace, t(1));
        let before = s.clone();
        // At day 5 the grace period (3 days) is over: the subscription is suspended, and
        // suspended cannot go to past_due.
        let e = m.transition(&mut s, Status::PastDue, t(5)).unwrap_err();
        assert_eq!(e.from, Status::Suspended);
        assert_eq!(s, before);
    }

    #[test]
    fn backdated_and_trial_without_end_are_refused() {
        let m = StatusMachine::default();
        let mut s = sub(Status::Active, t(5));
        let e = m.transition(&mut s, Status::PastDue, t(4)).unwrap_err();
        assert_eq!(e.why, Why::Backdated { since: t(5) });
        let e = m.transition(&mut s, Status::Trialing, t(6)).unwrap_err();
        assert_eq!(e.why, Why::NoTrialEnd);
        assert!(e.to_string().contains("trial_ends_at"), "{e}");
        s.trial_ends_at = Some(t(20));
        let steps = m.transition(&mut s, Status::Trialing, t(6)).unwrap();
        assert_eq!(steps.len(), 1);
        assert_eq!(s.status, Status::Trialing);
    }

    #[test]
    fn grace_ends_exactly_after_the_configured_days() {
        let m = StatusMachine::new(7);
        let mut s = sub(Status::PastDue, t(1));
        m.transition(&mut s, Status::Grace, t(2)).unwrap();
        let end = t(9);
        assert_eq!(
            m.next_due(&s),
            Some(Due {
                at: end,
                cause: Cause::GraceEnd
            })
        );
        let just_before = end - Duration::nanoseconds(1);
        assert_eq!(m.state_at(&s, just_before).status, Status::Grace);
        assert_eq!(m.state_at(&s, just_before).next_change, Some(end));
        let at_end = m.state_at(&s, end);
        assert_eq!(
            (at_end.status, at_end.status_since),
            (Status::Suspended, end)
        );
        assert!(m.advance(&mut s, just_before).is_empty());
        let steps = m.advance(&mut s, t(20));
        assert_eq!(
            steps,
            vec![Step {
                at: end,
                cause: Cause::GraceEnd,
                from: Status::Grace,
                to: Status::Suspended,
                plan: None
            }]
        );
        assert_eq!(m.next_due(&s), None);
    }

    #[test]
    fn payment_during_grace_restores_access_and_cancels_the_timer() {
        let m = StatusMachine::new(7);
        let mut s = sub(Status::Grace, t(1));
        m.transition(&mut s, Status::Active, t(3)).unwrap();
        assert_eq!(m.next_due(&s), None);
        assert_eq!(m.state_at(&s, t(30)).status, Status::Active);
    }

    #[test]
    fn trial_end_converts_or_cancels() {
        let m = StatusMachine::default();
        let mut s = sub(Status::Trialing, t(1));
        s.plan = plan("pro_trial");
        s.trial_ends_at = Some(t(15));
        s.post_trial_plan = Some(plan("pro"));
        let mut no_plan = s.clone();
        no_plan.post_trial_plan = None;

        let steps = m.advance(&mut s, t(15));
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].plan, Some(plan("pro")));
        assert_eq!(
            (s.status, s.status_since, s.plan.clone()),
            (Status::Active, t(15), plan("pro"))
        );
        assert_eq!((s.trial_ends_at, s.post_trial_plan.clone()), (None, None));

        m.advance(&mut no_plan, t(16));
        assert_eq!(
            (no_plan.status, no_plan.status_since),
            (Status::Canceled, t(15))
        );
    }

    #[test]
    fn cancel_at_and_scheduled_change_happen_in_order() {
        let m = StatusMachine::default();
        let mut s = sub(Status::Active, t(1));
        s.scheduled_change = Some(ScheduledChange {
            at: t(10),
            plan: plan("free"),
        });
        s.cancel_at = Some(t(10));
        let steps = m.advance(&mut s, t(10));
        let causes: Vec<_> = steps.iter().map(|s| s.cause).collect();
        assert_eq!(causes, vec![Cause::ScheduledChange, Cause::CancelAt]);
        assert_eq!((s.status, s.plan.code.as_str()), (Status::Canceled, "free"));
        assert_eq!(
            s.cancel_at,
            Some(t(10)),
            "kept as the record of when it ended"
        );
        assert_eq!(m.next_due(&s), None);
    }

    #[test]
    fn refunded_drops_a_pending_cancellation() {
        let m = StatusMachine::default();
        let mut s = sub(Status::Active, t(1));
        s.cancel_at = Some(t(20));
        m.transition(&mut s, Status::Refunded, t(2)).unwrap();
        assert_eq!(s.cancel_at, None);
        assert_eq!(m.state_at(&s, t(25)).status, Status::Refunded);
    }

    #[test]
    fn leaving_a_trial_early_puts_the_post_trial_plan_in_force() {
        let m = StatusMachine::default();
        let mut s = sub(Status::Trialing, t(1));
        s.plan = plan("trial");
        s.trial_ends_at = Some(t(20));
        s.post_trial_plan = Some(plan("pro"));
        let steps = m.transition(&mut s, Status::Active, t(5)).unwrap();
        assert_eq!(steps[0].plan, Some(plan("pro")));
        assert_eq!(
            (s.plan.clone(), s.plan_since, s.trial_ends_at),
            (plan("pro"), t(5), None)
        );
        assert_eq!(m.next_due(&s), None);
    }
}
