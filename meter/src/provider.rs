//! Billing-provider sync: provider events in a normalized form, and the fold that turns
//! the events of one provider subscription into an Allot [`Subscription`], whatever
//! order they arrive in.
//!
//! Adapters (Stripe's is `enforcer::webhook::stripe`) verify and parse a provider's
//! webhooks into [`ProviderEvent`]s; [`SyncState::apply`] records each one and says what
//! it did ([`Outcome`]). Nothing here does I/O or reads a clock.
//!
//! # Order
//!
//! Providers deliver at least once and in any order. Each event carries a `version`
//! that orders the events of one object (Stripe: the event's `created` second; a provider
//! with real object versions uses those); events of one version are ordered by kind
//! (creation, then snapshots, then failed and successful payments, then the end, then
//! refunds and disputes: the order in which they happen within one second) and finally by
//! event id, so [`EventKey`] is a total order.
//!
//! # What the state holds, and why it converges
//!
//! Subscription events (`created`, `updated`, `trial_will_end`, `deleted`) carry a full
//! snapshot of the provider's subscription; payment events (paid, payment failed,
//! refunded, disputed) carry only a fact. Last-writer-wins on the newest snapshot would
//! be enough for snapshots alone, but not once facts and refusals are in play: a refund
//! that arrives after a newer "active" snapshot must still end the subscription (in order,
//! the snapshot would have been refused as `refunded → active`), and a snapshot refused
//! in order (`canceled → active`) would be accepted if it arrived first.
//!
//! So the state is the set of distinct events seen (by id), kept sorted by [`EventKey`],
//! and the subscription is the left fold of that list, recomputed when an event arrives.
//! A set does not remember the order it was built in, and the fold is a function of the
//! list, so **any arrival order, with any duplicates, ends in the same state as applying
//! the events in order** (property-tested in `meter/tests/provider_props.rs`). An older
//! event never overwrites newer state: it is folded in its place, before the newer ones,
//! which then apply over it. When that leaves the subscription as it was, the outcome says
//! [`Verdict::Stale`]; when it does not (a late refund, or a late event that shows a newer
//! one took an illegal step), the outcome says what changed and which verdicts of other
//! events it [revised](Outcome::revised), for the audit trail.
//!
//! The history grows by a few events per subscription a month; [`SyncState::forget_before`]
//! folds events older than a horizon (beyond the provider's redelivery window: Stripe
//! retries for three days) into a base, after which events older than the horizon are
//! refused as [`Verdict::BeforeHorizon`].
//!
//! # What each event does, in its place
//!
//! - A snapshot creates the subscription (in whatever status it reports: the beginning
//!   may have been missed), or moves it to the reported status if [`reaches`] allows (a
//!   snapshot says where the provider is now, not how it got there), and replaces plan,
//!   add-ons, trial end, billing anchor and `cancel_at` (dates already past count from
//!   the event's instant). Steps our own clock already took stand: a provider still
//!   saying `unpaid` (grace) after our grace ran out leaves the subscription suspended,
//!   and one still saying `trialing` after the trial end leaves it active. A snapshot
//!   naming another tenant is refused.
//! - Paid: `pending`, `past_due`, `grace`, `suspended` → `active`; otherwise no effect
//!   (a trial's zero invoice, a renewal, a final invoice after the end).
//! - Payment failed: `trialing`, `active` → `past_due`; otherwise no effect (the provider
//!   is still collecting, or it is over).
//! - Refunded → `refunded`, disputed → `chargeback`, through
//!   [`StatusMachine::transition`] (refused from `pending`, and backwards).
//! - Before any snapshot, a fact has nothing to apply to: [`Verdict::Waiting`], and it
//!   is folded again when a snapshot arrives.
//!
//! Each event is judged at its own instant (`occurred_at`, never earlier than the last
//! step before it): the steps that were due by then (trial end, grace end…) are taken
//! first.
//! The grace period comes from the [`StatusMachine`] passed in; use the same one for a
//! given state, since changing it changes what the history folds to.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::lifecycle::{AddonRef, PlanRef, Status, Subscription};
use crate::status_machine::{
    enter, is_ended, reaches, Cause, IllegalTransition, StatusMachine, Step, Why,
};

/// One provider event, after mapping prices to plans and add-ons.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderEvent {
    /// The provider's event id (`evt_…`): redeliveries carry the same one.
    pub id: String,
    /// The provider's subscription id (`sub_…`) the event is about.
    pub object_id: String,
    /// Orders the events of one object (Stripe: the event's `created`, Unix seconds).
    pub version: u64,
    /// When it happened at the provider; the instant its effect is dated.
    pub occurred_at: DateTime<Utc>,
    /// What happened.
    pub change: Change,
}

/// What an event says happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// The subscription as the provider has it now.
    Snapshot {
        /// Which event carried it.
        reason: SnapshotReason,
        /// The subscription.
        snapshot: Snapshot,
    },
    /// A payment failed (Stripe `invoice.payment_failed`).
    PaymentFailed,
    /// A payment succeeded (Stripe `invoice.paid`).
    Paid,
    /// A payment was refunded in full (Stripe `charge.refunded`).
    Refunded,
    /// A payment was disputed (Stripe `charge.dispute.created`).
    Disputed,
}

/// Which subscription event carried a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotReason {
    /// The subscription was created.
    Created,
    /// It changed (status, plan, items, dates…).
    Updated,
    /// Its trial ends soon (Stripe: three days before).
    TrialWillEnd,
    /// It ended.
    Deleted,
}

/// A provider subscription, mapped to Allot's catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The Allot tenant it belongs to.
    pub tenant: String,
    /// The provider's status, mapped.
    pub status: Status,
    /// The plan its items map to.
    pub plan: PlanRef,
    /// Add-ons its items map to, sorted by code, each once.
    pub addons: Vec<AddonQuantity>,
    /// End of the trial, when trialing.
    pub trial_ends_at: Option<DateTime<Utc>>,
    /// Billing periods are anchored here.
    pub billing_anchor: DateTime<Utc>,
    /// When it will end (or ended), if cancellation was requested.
    pub cancel_at: Option<DateTime<Utc>>,
}

/// An add-on code and how many of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AddonQuantity {
    /// Add-on code.
    pub code: String,
    /// How many (at least 1).
    pub quantity: u32,
}

/// The total order of one object's events: version, then kind, then id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EventKey {
    /// The event's version.
    pub version: u64,
    /// Order of kinds within one version (see the module docs).
    pub rank: u8,
    /// The event id.
    pub id: String,
}

impl ProviderEvent {
    /// Where the event sits in its object's order.
    pub fn key(&self) -> EventKey {
        let rank = match &self.change {
            Change::Snapshot { reason, .. } => match reason {
                SnapshotReason::Created => 0,
                SnapshotReason::Updated | SnapshotReason::TrialWillEnd => 1,
                SnapshotReason::Deleted => 4,
            },
            Change::PaymentFailed => 2,
            Change::Paid => 3,
            Change::Refunded => 5,
            Change::Disputed => 6,
        };
        EventKey {
            version: self.version,
            rank,
            id: self.id.clone(),
        }
    }
}

/// What an event did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// It changed the subscription: the steps that were due by its instant, then its own
    /// (none for a snapshot that only changed plan, add-ons or dates).
    Applied {
        /// Status steps taken, in order.
        steps: Vec<Step>,
    },
    /// Recorded; nothing to change.
    NoEffect {
        /// Why.
        why: NoEffect,
    },
    /// Recorded; refused, and the subscription left as it was.
    Rejected {
        /// Why.
        why: Rejection,
    },
    /// Recorded; no snapshot of the subscription yet, so nothing to apply it to. It is
    /// folded again when one arrives.
    Waiting,
    /// Outcome only: recorded, but older than an event already applied, and folding it in
    /// its place left the subscription as it was.
    Stale {
        /// The newest event recorded before it.
        newest: EventKey,
    },
    /// Outcome only: the event id was seen before; nothing recorded, nothing changed.
    Duplicate {
        /// Whether the redelivery differs from what was recorded (a provider bug; the
        /// first one stays).
        differs: bool,
    },
    /// Outcome only: older than the history forgotten by
    /// [`SyncState::forget_before`]; not recorded.
    BeforeHorizon {
        /// The newest forgotten event.
        horizon: EventKey,
    },
}

impl Verdict {
    /// A short name for logs, answers and ledger actions (`applied`, `no_effect`…).
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Applied { .. } => "applied",
            Verdict::NoEffect { .. } => "no_effect",
            Verdict::Rejected { .. } => "rejected",
            Verdict::Waiting => "waiting",
            Verdict::Stale { .. } => "stale",
            Verdict::Duplicate { .. } => "duplicate",
            Verdict::BeforeHorizon { .. } => "before_horizon",
        }
    }

    /// What happened, for people (the reason of a ledger entry).
    pub fn explain(&self) -> String {
        match self {
            Verdict::Applied { steps } if steps.is_empty() => {
                "applied: plan, add-ons or dates changed".into()
            }
            Verdict::Applied { steps } => {
                let steps: Vec<String> = steps
                    .iter()
                    .map(|s| {
                        format!(
                            "{} -> {} ({}, {})",
                            s.from.as_str(),
                            s.to.as_str(),
                            s.cause.as_str(),
                            s.at.to_rfc3339()
                        )
                    })
                    .collect();
                format!("applied: {}", steps.join(", "))
            }
            Verdict::NoEffect { why } => format!("no effect: {}", why.explain()),
            Verdict::Rejected { why } => format!("rejected, nothing changed: {why}"),
            Verdict::Waiting => {
                "waiting: no snapshot of the subscription yet; applied once one arrives".into()
            }
            Verdict::Stale { newest } => format!(
                "stale: older than event {} already applied; in its place it changes nothing",
                newest.id
            ),
            Verdict::Duplicate { differs: false } => {
                "duplicate delivery of an event already recorded; nothing changed".into()
            }
            Verdict::Duplicate { differs: true } => "duplicate delivery of an event already \
                 recorded, with a different payload (the first one stays); nothing changed"
                .into(),
            Verdict::BeforeHorizon { horizon } => format!(
                "older than the forgotten history (up to event {}); not recorded",
                horizon.id
            ),
        }
    }
}

impl NoEffect {
    /// Why, for people.
    pub fn explain(self) -> &'static str {
        match self {
            NoEffect::Unchanged => "the snapshot matches the subscription",
            NoEffect::InGoodStanding => "a payment while trialing or active: nothing to restore",
            NoEffect::AlreadyCollecting => {
                "a failed payment while the provider is already collecting"
            }
            NoEffect::NotStarted => "a failed payment before the subscription started",
            NoEffect::Ended => "a payment after the end does not reopen the subscription",
            NoEffect::AlreadyThere => "already refunded or in chargeback",
        }
    }
}

/// Why an event changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoEffect {
    /// The snapshot matches the subscription.
    Unchanged,
    /// A payment while trialing or active: nothing to restore.
    InGoodStanding,
    /// A failed payment while the provider is already collecting.
    AlreadyCollecting,
    /// A failed payment before the subscription started.
    NotStarted,
    /// A payment or failed payment after the end: it does not reopen anything.
    Ended,
    /// Already refunded, or already in chargeback.
    AlreadyThere,
}

/// Why an event was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Rejection {
    /// The state machine refused the step.
    #[error("{0}")]
    Illegal(IllegalTransition),
    /// The snapshot names another tenant than the subscription's.
    #[error("tenant: the subscription belongs to {from:?}; the provider now says {to:?}, and a subscription never moves between tenants")]
    TenantChanged {
        /// The subscription's tenant.
        from: String,
        /// The tenant the snapshot names.
        to: String,
    },
}

/// A recorded event and what it did in its place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    /// The event.
    pub event: ProviderEvent,
    /// What it did when the history was last folded.
    pub verdict: Verdict,
}

/// An earlier event whose verdict changed because a late one was folded before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision {
    /// The earlier event's id.
    pub event_id: String,
    /// Its verdict before.
    pub was: Verdict,
    /// Its verdict now.
    pub now: Verdict,
}

/// What [`SyncState::apply`] did with one event: what to audit, and what to store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// The event id.
    pub event_id: String,
    /// What the event did.
    pub verdict: Verdict,
    /// Whether an event later in the order had been recorded before it arrived.
    pub late: bool,
    /// The subscription before.
    pub before: Option<Subscription>,
    /// The subscription after (equal to `before` unless the event changed something).
    pub after: Option<Subscription>,
    /// Other events whose verdicts this one changed.
    pub revised: Vec<Revision>,
}

impl Outcome {
    /// Whether the subscription changed (and needs storing).
    pub fn changed(&self) -> bool {
        self.before != self.after
    }
}

/// A caller's mistake (not the provider's): nothing was recorded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SyncError {
    /// The event is about another object than this state.
    #[error("object_id: the event is about {got:?}, this state holds {expected:?}")]
    WrongObject {
        /// This state's object.
        expected: String,
        /// The event's object.
        got: String,
    },
}

/// Everything known about one provider subscription: its events and what they fold to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    object_id: String,
    /// The newest forgotten event, if any.
    horizon: Option<EventKey>,
    /// What the forgotten events folded to.
    base: Option<Subscription>,
    /// Recorded events, sorted by key, ids distinct.
    events: Vec<Recorded>,
    /// What `base` and `events` fold to.
    subscription: Option<Subscription>,
}

impl SyncState {
    /// An empty state for the provider object `object_id`.
    pub fn new(object_id: impl Into<String>) -> Self {
        SyncState {
            object_id: object_id.into(),
            horizon: None,
            base: None,
            events: Vec::new(),
            subscription: None,
        }
    }

    /// The provider object this state is about.
    pub fn object_id(&self) -> &str {
        &self.object_id
    }

    /// The subscription the events fold to (as of the newest event: use
    /// [`StatusMachine::state_at`] for what is in force now). `None` before any snapshot.
    pub fn subscription(&self) -> Option<&Subscription> {
        self.subscription.as_ref()
    }

    /// The recorded events in order, each with its verdict.
    pub fn history(&self) -> &[Recorded] {
        &self.events
    }

    /// The newest forgotten event, if [`forget_before`](Self::forget_before) forgot any.
    pub fn horizon(&self) -> Option<&EventKey> {
        self.horizon.as_ref()
    }

    /// Records `event` and folds the history again. See the module docs for what each
    /// event does; the outcome says what this one did and what to audit.
    pub fn apply(
        &mut self,
        machine: &StatusMachine,
        event: ProviderEvent,
    ) -> Result<Outcome, SyncError> {
        if event.object_id != self.object_id {
            return Err(SyncError::WrongObject {
                expected: self.object_id.clone(),
                got: event.object_id,
            });
        }
        let before = self.subscription.clone();
        let unchanged = |verdict| Outcome {
            event_id: event.id.clone(),
            verdict,
            late: false,
            before: before.clone(),
            after: before.clone(),
            revised: Vec::new(),
        };
        if let Some(r) = self.events.iter().find(|r| r.event.id == event.id) {
            return Ok(unchanged(Verdict::Duplicate {
                differs: r.event != event,
            }));
        }
        let key = event.key();
        if let Some(h) = self.horizon.as_ref().filter(|h| key <= **h) {
            return Ok(unchanged(Verdict::BeforeHorizon { horizon: h.clone() }));
        }
        let newest = self.events.last().map(|r| r.event.key());
        let late = newest.as_ref().is_some_and(|n| *n > key);
        let at = self.events.partition_point(|r| r.event.key() < key);
        self.events.insert(
            at,
            Recorded {
                event: event.clone(),
                verdict: Verdict::Waiting,
            },
        );
        let previous: Vec<Verdict> = self.events.iter().map(|r| r.verdict.clone()).collect();
        self.refold(machine);
        let revised = self
            .events
            .iter()
            .zip(previous)
            .enumerate()
            .filter(|(i, (r, was))| *i != at && r.verdict != *was)
            .map(|(_, (r, was))| Revision {
                event_id: r.event.id.clone(),
                was,
                now: r.verdict.clone(),
            })
            .collect();
        let mut verdict = self.events[at].verdict.clone();
        if late && before == self.subscription && matches!(verdict, Verdict::Applied { .. }) {
            verdict = Verdict::Stale {
                newest: newest.expect("late implies a newer event"),
            };
        }
        Ok(Outcome {
            event_id: event.id,
            verdict,
            late,
            before,
            after: self.subscription.clone(),
            revised,
        })
    }

    /// Folds the events that happened before `before` into a base and drops them, keeping
    /// the state small. Only events contiguous from the oldest are forgotten, so the fold
    /// of what is left, from the base, is unchanged. Afterwards an event ordered at or
    /// before the newest forgotten one is refused ([`Verdict::BeforeHorizon`]): choose
    /// `before` well past the provider's redelivery window.
    pub fn forget_before(&mut self, machine: &StatusMachine, before: DateTime<Utc>) {
        let n = self
            .events
            .iter()
            .take_while(|r| r.event.occurred_at < before)
            .count();
        if n == 0 {
            return;
        }
        let forgotten: Vec<Recorded> = self.events.drain(..n).collect();
        let mut base = self.base.take();
        for r in &forgotten {
            fold_one(machine, &mut base, &r.event);
        }
        self.base = base;
        self.horizon = forgotten.last().map(|r| r.event.key());
    }

    fn refold(&mut self, machine: &StatusMachine) {
        let mut sub = self.base.clone();
        for r in &mut self.events {
            r.verdict = fold_one(machine, &mut sub, &r.event);
        }
        self.subscription = sub;
    }
}

/// Applies one event, in its place, to the subscription folded so far.
fn fold_one(
    machine: &StatusMachine,
    sub: &mut Option<Subscription>,
    event: &ProviderEvent,
) -> Verdict {
    let Some(current) = sub.as_mut() else {
        return match &event.change {
            Change::Snapshot { snapshot, .. } => {
                *sub = Some(create(snapshot, event.occurred_at));
                Verdict::Applied { steps: Vec::new() }
            }
            _ => Verdict::Waiting,
        };
    };
    // Time never runs backwards within one subscription, even if a provider's versions
    // and clocks disagree.
    // (The last step the fold took is dated by status_since or plan_since.)
    let at = event
        .occurred_at
        .max(current.status_since)
        .max(current.plan_since);
    if let Change::Snapshot { snapshot, .. } = &event.change {
        return apply_snapshot(machine, current, snapshot, at);
    }
    let in_force = machine.state_at(current, at).status;
    let target = match &event.change {
        Change::Snapshot { .. } => unreachable!("handled above"),
        Change::Paid => match in_force {
            Status::Pending | Status::PastDue | Status::Grace | Status::Suspended => Status::Active,
            Status::Trialing | Status::Active => return no(NoEffect::InGoodStanding),
            Status::Canceled | Status::Refunded | Status::Chargeback => return no(NoEffect::Ended),
        },
        Change::PaymentFailed => match in_force {
            Status::Trialing | Status::Active => Status::PastDue,
            Status::PastDue | Status::Grace | Status::Suspended => {
                return no(NoEffect::AlreadyCollecting)
            }
            Status::Pending => return no(NoEffect::NotStarted),
            Status::Canceled | Status::Refunded | Status::Chargeback => return no(NoEffect::Ended),
        },
        Change::Refunded => Status::Refunded,
        Change::Disputed => Status::Chargeback,
    };
    if in_force == target {
        return no(NoEffect::AlreadyThere);
    }
    match machine.transition(current, target, at) {
        Ok(steps) => Verdict::Applied { steps },
        Err(e) => Verdict::Rejected {
            why: Rejection::Illegal(e),
        },
    }
}

fn no(why: NoEffect) -> Verdict {
    Verdict::NoEffect { why }
}

/// The subscription a first snapshot describes.
fn create(snap: &Snapshot, at: DateTime<Utc>) -> Subscription {
    let trialing = snap.status == Status::Trialing;
    Subscription {
        tenant: snap.tenant.clone(),
        plan: snap.plan.clone(),
        plan_since: at,
        addons: addons(snap, &[], at),
        status: snap.status,
        status_since: at,
        billing_anchor: snap.billing_anchor,
        // Providers know no time zone; the node keeps the tenant's own when it stores
        // the result.
        time_zone: "UTC".into(),
        trial_ends_at: trial_end(snap, at).filter(|_| trialing),
        // The provider keeps billing the same items after the trial.
        post_trial_plan: trialing.then(|| snap.plan.clone()),
        scheduled_change: None,
        cancel_at: if is_ended(snap.status) {
            snap.cancel_at
        } else {
            cancel_at(snap, at)
        },
    }
}

/// The snapshot's trial end, never before `at`: a trial reported as running but already
/// past its end ends at once, not back in time.
fn trial_end(snap: &Snapshot, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
    snap.trial_ends_at.map(|t| t.max(at))
}

/// The snapshot's cancellation date for a live subscription, never before `at`, for the
/// same reason.
fn cancel_at(snap: &Snapshot, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
    snap.cancel_at.map(|t| t.max(at))
}

fn addons(snap: &Snapshot, old: &[AddonRef], at: DateTime<Utc>) -> Vec<AddonRef> {
    let mut out: Vec<AddonRef> = snap
        .addons
        .iter()
        .map(|a| AddonRef {
            code: a.code.clone(),
            quantity: a.quantity,
            since: old
                .iter()
                .find(|o| o.code == a.code)
                .map_or(at, |o| o.since),
        })
        .collect();
    out.sort_by(|a, b| a.code.cmp(&b.code));
    out
}

fn apply_snapshot(
    machine: &StatusMachine,
    current: &mut Subscription,
    snap: &Snapshot,
    at: DateTime<Utc>,
) -> Verdict {
    if snap.tenant != current.tenant {
        return Verdict::Rejected {
            why: Rejection::TenantChanged {
                from: current.tenant.clone(),
                to: snap.tenant.clone(),
            },
        };
    }
    let mut s = current.clone();
    let mut steps = machine.advance(&mut s, at);
    let from = s.status;
    let to = match (from, snap.status) {
        // Our grace ran out before the provider gave up: it still says unpaid.
        (Status::Suspended, Status::Grace) => Status::Suspended,
        // Our trial end came first; a trial that is over does not start again.
        (Status::Active, Status::Trialing) if snap.trial_ends_at.is_none_or(|t| t <= at) => {
            Status::Active
        }
        (_, reported) => reported,
    };
    if !reaches(from, to) {
        return Verdict::Rejected {
            why: Rejection::Illegal(IllegalTransition {
                from,
                to,
                at,
                why: Why::Unreachable,
            }),
        };
    }
    let plan_before = s.plan.clone();
    let mut own = (from != to).then(|| enter(&mut s, to, at, Cause::Requested));
    if s.plan != snap.plan {
        s.plan = snap.plan.clone();
        s.plan_since = at;
    }
    s.addons = addons(snap, &s.addons, at);
    let trialing = s.status == Status::Trialing;
    s.trial_ends_at = trial_end(snap, at).filter(|_| trialing);
    s.post_trial_plan = trialing.then(|| snap.plan.clone());
    s.billing_anchor = snap.billing_anchor;
    match s.status {
        // Entering refunded or chargeback dropped it; nothing is left to cancel.
        Status::Refunded | Status::Chargeback => {}
        // The provider's date of the end, else the one `enter` recorded.
        Status::Canceled => s.cancel_at = snap.cancel_at.or(s.cancel_at),
        _ => s.cancel_at = cancel_at(snap, at),
    }
    let new_plan = (s.plan != plan_before).then(|| s.plan.clone());
    match &mut own {
        Some(step) => step.plan = new_plan,
        None if new_plan.is_some() => {
            own = Some(Step {
                at,
                cause: Cause::Requested,
                from: s.status,
                to: s.status,
                plan: new_plan,
            })
        }
        None => {}
    }
    if s == *current {
        return no(NoEffect::Unchanged);
    }
    steps.extend(own);
    *current = s;
    Verdict::Applied { steps }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn t(day: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, day, 12, 0, 0).unwrap()
    }

    fn plan(code: &str) -> PlanRef {
        PlanRef {
            code: code.into(),
            version: 1,
        }
    }

    fn snap(status: Status, plan_code: &str) -> Snapshot {
        Snapshot {
            tenant: "acme".into(),
            status,
            plan: plan(plan_code),
            addons: vec![],
            trial_ends_at: None,
            billing_anchor: t(1),
            cancel_at: None,
        }
    }

    fn ev(id: &str, day: u32, change: Change) -> ProviderEvent {
        ProviderEvent {
            id: id.into(),
            object_id: "sub_1".into(),
            version: t(day).timestamp() as u64,
            occurred_at: t(day),
            change,
        }
    }

    fn snapshot(id: &str, day: u32, reason: SnapshotReason, s: Snapshot) -> ProviderEvent {
        ev(
            id,
            day,
            Change::Snapshot {
                reason,
                snapshot: s,
            },
        )
    }

    fn status(st: &SyncState) -> Status {
        st.subscription().unwrap().status
    }

    #[test]
    fn updated_before_created_ends_as_the_update_says() {
        let m = StatusMachine::default();
        let mut st = SyncState::new("sub_1");
        let created = snapshot(
            "evt_1",
            1,
            SnapshotReason::Created,
            snap(Status::Pending, "pro"),
        );
        let updated = snapshot(
            "evt_2",
            2,
            SnapshotReason::Updated,
            snap(Status::Active, "pro"),
        );
        let o = st.apply(&m, updated).unwrap();
        assert!(matches!(o.verdict, Verdict::Applied { .. }), "{o:?}");
        let o = st.apply(&m, created).unwrap();
        // The late creation is folded first; the update then moves pending → active at
        // day 2, where the subscription already was. What changes is the history: the
        // plan has been in force since day 1, and the update now reads as a step.
        assert!(o.late);
        assert!(matches!(o.verdict, Verdict::Applied { .. }), "{o:?}");
        let sub = st.subscription().unwrap();
        assert_eq!(
            (sub.status, sub.status_since, sub.plan_since),
            (Status::Active, t(2), t(1))
        );
        assert_eq!(o.revised.len(), 1);
        match &o.revised[0].now {
            Verdict::Applied { steps } => {
                assert_eq!(
                    (steps[0].from, steps[0].to),
                    (Status::Pending, Status::Active)
                )
            }
            v => panic!("{v:?}"),
        }
        assert_eq!(st.history().len(), 2);
    }

    #[test]
    fn a_stale_snapshot_is_reported_and_changes_nothing() {
        let m = StatusMachine::default();
        let mut st = SyncState::new("sub_1");
        st.apply(
            &m,
            snapshot(
                "evt_1",
                1,
                SnapshotReason::Created,
                snap(Status::Active, "pro"),
            ),
        )
        .unwrap();
        st.apply(
            &m,
            snapshot(
                "evt_3",
                3,
                SnapshotReason::Updated,
                snap(Status::Active, "enterprise"),
            ),
        )
        .unwrap();
        let o = st
            .apply(
                &m,
                snapshot(
                    "evt_2",
                    2,
                    SnapshotReason::Updated,
                    snap(Status::Active, "free"),
                ),
            )
            .unwrap();
        assert!(
            matches!(o.verdict, Verdict::Stale { ref newest } if newest.id == "evt_3"),
            "{o:?}"
        );
        assert!(!o.changed());
        assert_eq!(st.subscription().unwrap().plan, plan("enterprise"));
    }

    #[test]
    fn canceled_before_paid_stays_canceled() {
        let m = StatusMachine::default();
        let mut st = SyncState::new("sub_1");
        st.apply(
            &m,
            snapshot(
                "evt_1",
                1,
                SnapshotReason::Created,
                snap(Status::PastDue, "pro"),
            ),
        )
        .unwrap();
        let deleted = snapshot(
            "evt_3",
            3,
            SnapshotReason::Deleted,
            snap(Status::Canceled, "pro"),
        );
        let paid = ev("evt_2", 2, Change::Paid);
        st.apply(&m, deleted).unwrap();
        assert_eq!(status(&st), Status::Canceled);
        let o = st.apply(&m, paid).unwrap();
        // In its place the payment did restore access (past_due → active on day 2); the
        // cancellation on day 3 still ends it.
        assert!(o.late);
        assert_eq!(status(&st), Status::Canceled);
        assert_eq!(st.subscription().unwrap().status_since, t(3));
        let steps = match &st.history()[1].verdict {
            Verdict::Applied { steps } => steps.clone(),
            v => panic!("{v:?}"),
        };
        assert_eq!(
            (steps[0].from, steps[0].to),
            (Status::PastDue, Status::Active)
        );
    }

    #[test]
    fn a_late_refund_ends_the_subscription_and_revises_the_newer_snapshot() {
        let m = StatusMachine::default();
        let mut st = SyncState::new("sub_1");
        st.apply(
            &m,
            snapshot(
                "evt_1",
                1,
                SnapshotReason::Created,
                snap(Status::Active, "pro"),
            ),
        )
        .unwrap();
        st.apply(
            &m,
            snapshot(
                "evt_3",
                3,
                SnapshotReason::Updated,
                snap(Status::Active, "enterprise"),
            ),
        )
        .unwrap();
        let o = st.apply(&m, ev("evt_2", 2, Change::Refunded)).unwrap();
        assert!(o.late && o.changed());
        assert!(matches!(o.verdict, Verdict::Applied { .. }));
        assert_eq!(status(&st), Status::Refunded);
        assert_eq!(o.revised.len(), 1);
        assert_eq!(o.revised[0].event_id, "evt_3");
        match &o.revised[0].now {
            Verdict::Rejected {
                why: Rejection::Illegal(e),
            } => {
                assert_eq!(
                    (e.from, e.to, e.why.clone()),
                    (Status::Refunded, Status::Active, Why::Unreachable)
                );
            }
            v => panic!("{v:?}"),
        }
        assert_eq!(
            st.subscription().unwrap().plan,
            plan("pro"),
            "the refused snapshot changed nothing"
        );
    }

    #[test]
    fn duplicates_and_wrong_objects_record_nothing() {
        let m = StatusMachine::default();
        let mut st = SyncState::new("sub_1");
        let e = snapshot(
            "evt_1",
            1,
            SnapshotReason::Created,
            snap(Status::Active, "pro"),
        );
        st.apply(&m, e.clone()).unwrap();
        let o = st.apply(&m, e.clone()).unwrap();
        assert_eq!(o.verdict, Verdict::Duplicate { differs: false });
        let mut changed = e.clone();
        changed.version += 1;
        assert_eq!(
            st.apply(&m, changed).unwrap().verdict,
            Verdict::Duplicate { differs: true }
        );
        assert_eq!(st.history().len(), 1);
        let mut other = e;
        other.object_id = "sub_2".into();
        other.id = "evt_9".into();
        let err = st.apply(&m, other).unwrap_err();
        assert!(err.to_string().starts_with("object_id: "), "{err}");
        assert_eq!(st.history().len(), 1);
    }

    #[test]
    fn facts_wait_for_a_snapshot() {
        let m = StatusMachine::default();
        let mut st = SyncState::new("sub_1");
        let o = st.apply(&m, ev("evt_2", 2, Change::Paid)).unwrap();
        assert_eq!(o.verdict, Verdict::Waiting);
        assert!(st.subscription().is_none());
        let o = st
            .apply(
                &m,
                snapshot(
                    "evt_1",
                    1,
                    SnapshotReason::Created,
                    snap(Status::Pending, "pro"),
                ),
            )
            .unwrap();
        assert_eq!(
            status(&st),
            Status::Active,
            "the waiting payment was applied after it"
        );
        assert_eq!(o.revised.len(), 1);
    }

    #[test]
    fn a_provider_still_saying_unpaid_does_not_restart_grace() {
        let m = StatusMachine::new(3);
        let mut st = SyncState::new("sub_1");
        st.apply(
            &m,
            snapshot(
                "evt_1",
                1,
                SnapshotReason::Created,
                snap(Status::Grace, "pro"),
            ),
        )
        .unwrap();
        let mut s = snap(Status::Grace, "pro");
        s.addons = vec![AddonQuantity {
            code: "sso".into(),
            quantity: 1,
        }];
        let o = st
            .apply(&m, snapshot("evt_2", 10, SnapshotReason::Updated, s))
            .unwrap();
        let sub = st.subscription().unwrap();
        assert_eq!((sub.status, sub.status_since), (Status::Suspended, t(4)));
        match o.verdict {
            Verdict::Applied { steps } => {
                assert_eq!(steps.len(), 1);
                assert_eq!((steps[0].cause, steps[0].at), (Cause::GraceEnd, t(4)));
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn another_tenant_is_refused() {
        let m = StatusMachine::default();
        let mut st = SyncState::new("sub_1");
        st.apply(
            &m,
            snapshot(
                "evt_1",
                1,
                SnapshotReason::Created,
                snap(Status::Active, "pro"),
            ),
        )
        .unwrap();
        let mut s = snap(Status::Active, "pro");
        s.tenant = "globex".into();
        let o = st
            .apply(&m, snapshot("evt_2", 2, SnapshotReason::Updated, s))
            .unwrap();
        assert!(matches!(
            &o.verdict,
            Verdict::Rejected {
                why: Rejection::TenantChanged { .. }
            }
        ));
        assert!(!o.changed());
        assert_eq!(st.subscription().unwrap().tenant, "acme");
    }

    #[test]
    fn forgetting_keeps_the_result_and_refuses_older_events() {
        let m = StatusMachine::default();
        let mut st = SyncState::new("sub_1");
        st.apply(
            &m,
            snapshot(
                "evt_1",
                1,
                SnapshotReason::Created,
                snap(Status::Active, "pro"),
            ),
        )
        .unwrap();
        st.apply(&m, ev("evt_2", 2, Change::PaymentFailed)).unwrap();
        st.apply(&m, ev("evt_4", 4, Change::Paid)).unwrap();
        let before = st.subscription().cloned();
        st.forget_before(&m, t(3));
        assert_eq!(st.history().len(), 1);
        assert_eq!(st.horizon().unwrap().id, "evt_2");
        assert_eq!(st.subscription().cloned(), before);
        let o = st.apply(&m, ev("evt_0", 1, Change::Refunded)).unwrap();
        assert!(matches!(o.verdict, Verdict::BeforeHorizon { .. }));
        // A later event still folds from the base.
        st.apply(&m, ev("evt_5", 5, Change::PaymentFailed)).unwrap();
        assert_eq!(status(&st), Status::PastDue);
        assert_eq!(st.subscription().unwrap().status_since, t(5));
    }
}
