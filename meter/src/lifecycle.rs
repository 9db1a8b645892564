//! Subscriptions and how they move through time: trials that end, downgrades and
//! cancellations scheduled for the end of a billing period, upgrades that apply at once.
//!
//! A [`Subscription`] stores intentions (trial end, scheduled change, cancel date);
//! [`StatusMachine::state_at`] says what is in force at an instant, so nothing has to run
//! at the moment a trial ends for the answer to change. The rules of time (what a trial
//! end, a grace end, a scheduled change or a cancellation date does) live only in the
//! machine: this module asks it, so there is one reading of a subscription.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;
use crate::status_machine::{allows, IllegalTransition, StatusMachine, Step, Why};
use crate::window::{period_at, Window};

/// Where a subscription is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Created, not yet paid or started.
    Pending,
    /// In a free trial until `trial_ends_at`.
    Trialing,
    /// Paid and current.
    Active,
    /// A payment failed; being collected.
    PastDue,
    /// Collection failed; access reduced for a while before suspension.
    Grace,
    /// Access stopped, data kept.
    Suspended,
    /// Ended.
    Canceled,
    /// Money returned.
    Refunded,
    /// Payment disputed.
    Chargeback,
}

impl Status {
    /// Every status, in lifecycle order.
    pub const ALL: [Status; 9] = [
        Status::Pending,
        Status::Trialing,
        Status::Active,
        Status::PastDue,
        Status::Grace,
        Status::Suspended,
        Status::Canceled,
        Status::Refunded,
        Status::Chargeback,
    ];

    /// The name used in files and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Trialing => "trialing",
            Status::Active => "active",
            Status::PastDue => "past_due",
            Status::Grace => "grace",
            Status::Suspended => "suspended",
            Status::Canceled => "canceled",
            Status::Refunded => "refunded",
            Status::Chargeback => "chargeback",
        }
    }

    /// Parses a status name.
    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// A plan at a version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PlanRef {
    /// Plan code.
    pub code: String,
    /// Plan version.
    pub version: u32,
}

impl std::fmt::Display for PlanRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.code, self.version)
    }
}

/// An add-on on a subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddonRef {
    /// Add-on code.
    pub code: String,
    /// How many of it (quotas multiply); at least 1.
    pub quantity: u32,
    /// When it was added.
    pub since: DateTime<Utc>,
}

/// A plan change that takes effect later (a downgrade at period end).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledChange {
    /// When it takes effect.
    pub at: DateTime<Utc>,
    /// The plan from then on.
    pub plan: PlanRef,
}

/// A tenant's subscription: plan, add-ons, status and what is scheduled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    /// The tenant it belongs to.
    pub tenant: String,
    /// The plan stored (before any scheduled change or trial end that is due).
    pub plan: PlanRef,
    /// Since when `plan` is in force.
    pub plan_since: DateTime<Utc>,
    /// Add-ons, sorted by code.
    pub addons: Vec<AddonRef>,
    /// Current stored status (before trial end or cancellation is applied).
    pub status: Status,
    /// Since when `status` holds.
    pub status_since: DateTime<Utc>,
    /// Billing periods start at this instant's day-of-month and time, in `time_zone`.
    pub billing_anchor: DateTime<Utc>,
    /// IANA time zone for calendar windows (day, month).
    pub time_zone: String,
    /// End of the trial, when trialing.
    pub trial_ends_at: Option<DateTime<Utc>>,
    /// The plan after the trial; without one, a trial that ends cancels the subscription.
    pub post_trial_plan: Option<PlanRef>,
    /// A plan change waiting for its instant.
    pub scheduled_change: Option<ScheduledChange>,
    /// When the subscription ends, if cancellation was requested.
    pub cancel_at: Option<DateTime<Utc>>,
}

/// What is in force at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InForce {
    /// The plan in force.
    pub plan: PlanRef,
    /// Since when.
    pub plan_since: DateTime<Utc>,
    /// The status in force.
    pub status: Status,
    /// Since when.
    pub status_since: DateTime<Utc>,
    /// The next instant at which this answer changes by itself, if any.
    pub next_change: Option<DateTime<Utc>>,
}

/// When a plan change applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeTiming {
    /// Now (upgrades).
    Immediately,
    /// At the end of the current billing period (downgrades).
    PeriodEnd,
}

impl Subscription {
    /// The time zone, parsed; subscriptions are validated on the way in, so UTC is only a
    /// fallback for a value that was stored by an older version.
    pub fn tz(&self) -> chrono_tz::Tz {
        self.time_zone.parse().unwrap_or(chrono_tz::UTC)
    }

    /// The end of the billing period that contains `at`.
    pub fn period_end(&self, at: DateTime<Utc>) -> DateTime<Utc> {
        period_at(Window::BillingPeriod, at, self.tz(), self.billing_anchor)
            .end
            .expect("billing periods end")
    }

    /// Changes the plan, now or at the end of the billing period. A change now first
    /// takes the steps that were due by `now` (see [`StatusMachine::advance`]), and
    /// replaces any pending scheduled change; choosing a plan during a trial ends the
    /// trial (`trialing → active`). Returns the steps taken, the trial's end last.
    pub fn change_plan(
        &mut self,
        machine: &StatusMachine,
        plan: PlanRef,
        timing: ChangeTiming,
        now: DateTime<Utc>,
    ) -> Vec<Step> {
        let mut steps = machine.advance(self, now);
        match timing {
            ChangeTiming::Immediately => {
                if self.status == Status::Trialing {
                    steps.extend(
                        machine
                            .transition(self, Status::Active, now)
                            .expect("trialing → active is always allowed"),
                    );
                }
                self.plan = plan;
                self.plan_since = now;
                self.scheduled_change = None;
            }
            ChangeTiming::PeriodEnd => {
                let at = self.period_end(now);
                self.scheduled_change = Some(ScheduledChange { at, plan });
            }
        }
        steps
    }

    /// Cancels now (a step to `canceled` through the machine) or at the end of the
    /// billing period (`cancel_at`, which the machine takes at its instant). Refused, with
    /// the subscription unchanged, when the subscription cannot be canceled: it is
    /// `refunded` or `chargeback`, which are more serious than canceled. Canceling a
    /// canceled subscription changes nothing.
    pub fn cancel(
        &mut self,
        machine: &StatusMachine,
        timing: ChangeTiming,
        now: DateTime<Utc>,
    ) -> Result<Vec<Step>, IllegalTransition> {
        match timing {
            ChangeTiming::Immediately => machine.transition(self, Status::Canceled, now),
            ChangeTiming::PeriodEnd => {
                let mut s = self.clone();
                let steps = machine.advance(&mut s, now);
                if s.status != Status::Canceled && !allows(s.status, Status::Canceled) {
                    return Err(IllegalTransition {
                        from: s.status,
                        to: Status::Canceled,
                        at: now,
                        why: Why::NoEdge,
                    });
                }
                if s.status != Status::Canceled {
                    s.cancel_at = Some(s.period_end(now));
                }
                *self = s;
                Ok(steps)
            }
        }
    }

    /// Checks references against the catalog: plans and add-ons exist, versions are
    /// published, add-ons fit the plan. Returns (field, reason) on the first problem.
    pub fn check_against(&self, catalog: &Catalog) -> Result<(), (String, String)> {
        check_plan(catalog, "plan", &self.plan)?;
        if let Some(p) = &self.post_trial_plan {
            check_plan(catalog, "post_trial_plan", p)?;
        }
        if let Some(c) = &self.scheduled_change {
            check_plan(catalog, "scheduled_change.plan", &c.plan)?;
        }
        for (i, a) in self.addons.iter().enumerate() {
            let field = format!("addons[{i}]");
            let def = catalog
                .addons
                .get(&a.code)
                .ok_or_else(|| (field.clone(), format!("unknown add-on {:?}", a.code)))?;
            if a.quantity == 0 {
                return Err((format!("{field}.quantity"), "must be at least 1".into()));
            }
            if !def.plans.is_empty() && !def.plans.contains(&self.plan.code) {
                return Err((
                    field,
                    format!(
                        "add-on {} is not available on plan {}",
                        a.code, self.plan.code
                    ),
                ));
            }
        }
        if self.addons.windows(2).any(|w| w[0].code == w[1].code) {
            return Err(("addons".into(), "an add-on is listed twice".into()));
        }
        if self.time_zone.parse::<chrono_tz::Tz>().is_err() {
            return Err((
                "time_zone".into(),
                format!(
                    "{:?} is not an IANA time zone (like Europe/Paris)",
                    self.time_zone
                ),
            ));
        }
        Ok(())
    }
}

fn check_plan(catalog: &Catalog, field: &str, p: &PlanRef) -> Result<(), (String, String)> {
    let plan = catalog
        .plans
        .get(&p.code)
        .ok_or_else(|| (field.to_string(), format!("unknown plan {:?}", p.code)))?;
    match plan.versions.get(&p.version) {
        None => Err((
            format!("{field}.version"),
            format!("plan {} has no version {}", p.code, p.version),
        )),
        Some(b) if !b.published => Err((
            format!("{field}.version"),
            format!("plan {p} is a draft; only published versions can be subscribed to"),
        )),
        Some(_) => Ok(()),
    }
}
