//! Applying verified provider events to tenants: the provider's sync state per object,
//! the tenant's subscription, and the ledger entry that says what each delivery did.
//!
//! One delivery goes through three writes, each safe to repeat:
//!
//! 1. The object's record (its [`SyncState`] and the write it still owes the tenant) is
//!    replaced by compare-and-set on its revision: two nodes receiving deliveries of one
//!    object at once never lose one; the loser reads again and folds its event into what
//!    the winner wrote (and finds a redelivery a duplicate).
//! 2. The owed write: the tenant's subscription with its ledger entry, whose id is derived
//!    from the provider's event id (`stripe:evt_…`). A store writes a change whose entry
//!    id was recorded before as nothing, so repeating it after a crash never undoes a
//!    later change.
//! 3. The record again, without the owed write.
//!
//! A crash between 1 and 3 leaves the owed write in the record; whoever touches the
//! object next (a redelivery, the next event, reconciliation) makes it first. Stripe
//! redelivers anything that was not answered 2xx, so a delivery is applied once.
//!
//! The provider changes only what its events changed: the fields that differ between
//! the fold's subscription before and after the event are copied onto the stored one, so
//! a support person's change of another field stays. The time zone is never the
//! provider's (it knows none).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use meter::ledger::{snapshot, LedgerEntry, Source};
use meter::lifecycle::Subscription;
use meter::provider::{
    Change, Outcome, ProviderEvent, Snapshot, SnapshotReason, SyncState, Verdict,
};
use meter::status_machine::StatusMachine;
use meter::store::{ControlStore, StoreError};
use serde::{Deserialize, Serialize};

use crate::engine::admin::Who;
use crate::engine::{Engine, EngineError};

/// How often a delivery re-reads after losing a compare-and-set before giving up (the
/// provider then redelivers).
const MAX_ATTEMPTS: usize = 16;

/// What is stored per provider object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ObjectRecord {
    /// The events and what they fold to.
    pub state: SyncState,
    /// A write to the tenant decided but maybe not made yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owed: Option<Owed>,
}

/// A tenant write and its ledger entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Owed {
    /// The subscription to store, when the event changed it.
    pub subscription: Option<Subscription>,
    /// The entry that records the delivery.
    pub entry: LedgerEntry,
}

/// What one delivery did, as answered to the provider and shown in logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The provider's event id.
    pub event_id: String,
    /// The provider object.
    pub object_id: String,
    /// The tenant, once a snapshot named it.
    pub tenant: Option<String>,
    /// What the event did ([`Verdict::name`]).
    pub verdict: &'static str,
    /// Why, for people.
    pub reason: String,
    /// Whether the tenant's subscription changed.
    pub changed: bool,
}

/// Applies one provider's events through the engine's control store.
pub struct ProviderSync {
    engine: Arc<Engine>,
    provider: String,
    /// Deliveries of this node one at a time: they are rare, and it keeps the
    /// compare-and-set loop for other nodes.
    serial: tokio::sync::Mutex<()>,
}

impl ProviderSync {
    /// Sync for `provider` (`stripe`). Events are judged by the state machine of the
    /// catalog in force (its grace period), as resolution is.
    pub fn new(engine: Arc<Engine>, provider: &str) -> Self {
        ProviderSync {
            engine,
            provider: provider.to_string(),
            serial: tokio::sync::Mutex::new(()),
        }
    }

    /// The provider's name.
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// The engine it writes through.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The catalog's state machine, read per delivery so a new `grace_days` applies at once.
    fn machine(&self) -> Result<StatusMachine, EngineError> {
        Ok(self.engine.catalog()?.1.status_machine())
    }

    fn store(&self) -> &Arc<dyn ControlStore> {
        self.engine.control_store()
    }

    /// Remembers payment ids (invoices, charges) of `object_id`, for later refunds and
    /// disputes that name only their payment.
    pub async fn link(&self, object_id: &str, payments: &[String]) -> Result<(), EngineError> {
        for p in payments {
            self.store()
                .link_payment(&self.provider, p, object_id)
                .await?;
        }
        Ok(())
    }

    /// The object the first known payment of `payments` belongs to.
    pub async fn linked(&self, payments: &[String]) -> Result<Option<String>, EngineError> {
        for p in payments {
            if let Some(o) = self.store().payment_link(&self.provider, p).await? {
                return Ok(Some(o));
            }
        }
        Ok(None)
    }

    /// The stored record of an object and its revision (0 when there is none).
    pub async fn record(&self, object_id: &str) -> Result<(u64, ObjectRecord), EngineError> {
        match self
            .store()
            .provider_record(&self.provider, object_id)
            .await?
        {
            None => Ok((
                0,
                ObjectRecord {
                    state: SyncState::new(object_id),
                    owed: None,
                },
            )),
            Some(r) => {
                let record = serde_json::from_str(&r.text).map_err(|e| {
                    StoreError::Corrupt(format!("{} record of {object_id}: {e}", self.provider))
                })?;
                Ok((r.revision, record))
            }
        }
    }

    async fn put(
        &self,
        object_id: &str,
        expected: u64,
        record: &ObjectRecord,
    ) -> Result<bool, EngineError> {
        let text = serde_json::to_string(record)
            .map_err(|e| EngineError::Internal(format!("sync record does not serialize: {e}")))?;
        Ok(self
            .store()
            .put_provider_record(&self.provider, object_id, expected, &text)
            .await?)
    }

    /// Makes an owed write (a repeat writes nothing).
    async fn settle(&self, owed: &Owed) -> Result<(), EngineError> {
        match &owed.subscription {
            Some(sub) => {
                self.store().save_subscription(sub, &owed.entry).await?;
                self.engine.changed(&sub.tenant);
            }
            None => {
                self.store().record_entry(&owed.entry).await?;
            }
        }
        Ok(())
    }

    /// Makes the write an object still owes, if any (after a crash).
    async fn settle_owed(
        &self,
        object_id: &str,
        revision: u64,
        record: &mut ObjectRecord,
    ) -> Result<Option<u64>, EngineError> {
        let Some(owed) = record.owed.take() else {
            return Ok(Some(revision));
        };
        self.settle(&owed).await?;
        Ok(self
            .put(object_id, revision, record)
            .await?
            .then_some(revision + 1))
    }

    /// Applies one verified event and records what it did.
    pub async fn apply(&self, event: ProviderEvent) -> Result<Report, EngineError> {
        let _serial = self.serial.lock().await;
        let machine = self.machine()?;
        let object_id = event.object_id.clone();
        for _ in 0..MAX_ATTEMPTS {
            let (revision, mut record) = self.record(&object_id).await?;
            let Some(revision) = self.settle_owed(&object_id, revision, &mut record).await? else {
                continue;
            };
            let now = self.engine.now();
            let outcome = record
                .state
                .apply(&machine, event.clone())
                .map_err(|e| EngineError::Internal(e.to_string()))?;
            let tenant = outcome
                .after
                .as_ref()
                .or(outcome.before.as_ref())
                .map(|s| s.tenant.clone());
            let mut report = Report {
                event_id: event.id.clone(),
                object_id: object_id.clone(),
                tenant: tenant.clone(),
                verdict: outcome.verdict.name(),
                reason: explain(&outcome),
                changed: false,
            };
            if matches!(
                outcome.verdict,
                Verdict::Duplicate { .. } | Verdict::BeforeHorizon { .. }
            ) {
                // Nothing recorded in the state; each redelivery gets its own entry.
                let entry = self.entry(
                    &event,
                    format!("{}:{}:{}", self.provider, event.id, uuid()),
                    tenant.as_deref().unwrap_or_default(),
                    &outcome,
                    now,
                    None,
                );
                self.store().record_entry(&entry).await?;
                return Ok(report);
            }
            let subscription = match (outcome.changed(), tenant.as_deref()) {
                (true, Some(t)) => {
                    let stored = self.store().subscription(t).await?;
                    Some((
                        stored.clone(),
                        merge(stored, outcome.before.as_ref(), outcome.after.as_ref()),
                    ))
                }
                _ => None,
            };
            let entry = self.entry(
                &event,
                format!("{}:{}", self.provider, event.id),
                tenant.as_deref().unwrap_or_default(),
                &outcome,
                now,
                subscription.as_ref(),
            );
            report.changed = subscription.is_some();
            record.owed = Some(Owed {
                subscription: subscription.and_then(|(_, after)| after),
                entry,
            });
            if !self.put(&object_id, revision, &record).await? {
                continue;
            }
            let owed = record.owed.take().expect("set above");
            self.settle(&owed).await?;
            // Losing this race is fine: whoever wrote since made the owed write first.
            self.put(&object_id, revision + 1, &record).await?;
            return Ok(report);
        }
        Err(EngineError::Unavailable(format!(
            "{} object {object_id}: other deliveries kept changing it; try again",
            self.provider
        )))
    }

    /// Records a delivery that changed nothing for a reason outside the fold (ignored
    /// types, refused signatures) in `tenant`'s ledger (`""`: provider-wide).
    pub async fn record_refusal(
        &self,
        id: String,
        tenant: &str,
        action: &str,
        reason: String,
        correlation_id: &str,
    ) -> Result<bool, EngineError> {
        let entry = LedgerEntry {
            id,
            at: self.engine.now(),
            tenant: tenant.to_string(),
            source: Source::Webhook,
            action: action.to_string(),
            actor: self.provider.clone(),
            reason,
            correlation_id: correlation_id.to_string(),
            before: String::new(),
            after: String::new(),
            applied: false,
        };
        Ok(self.store().record_entry(&entry).await?)
    }

    fn entry(
        &self,
        event: &ProviderEvent,
        id: String,
        tenant: &str,
        outcome: &Outcome,
        now: DateTime<Utc>,
        subscription: Option<&(Option<Subscription>, Option<Subscription>)>,
    ) -> LedgerEntry {
        let (before, after) = match subscription {
            Some((b, a)) => (
                b.as_ref().map(snapshot).unwrap_or_default(),
                a.as_ref().map(snapshot).unwrap_or_default(),
            ),
            None => (String::new(), String::new()),
        };
        LedgerEntry {
            id,
            at: now,
            tenant: tenant.to_string(),
            source: Source::Webhook,
            action: format!("{}.{}", self.provider, outcome.verdict.name()),
            actor: self.provider.clone(),
            reason: format!(
                "{} (event {} of {}, {})",
                explain(outcome),
                event.id,
                event.object_id,
                event.occurred_at.to_rfc3339()
            ),
            correlation_id: event.id.clone(),
            before,
            after,
            applied: subscription.is_some(),
        }
    }
}

/// One field on which Allot and the provider disagree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// `status`, `plan`, `addons`, `trial_ends_at`, `cancel_at`, or `subscription` when
    /// Allot has none.
    pub field: &'static str,
    /// Allot's value, in force now.
    pub allot: String,
    /// The provider's, as Allot's state machine takes it.
    pub provider: String,
}

/// The drift of one provider subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drift {
    /// The provider's subscription id.
    pub object_id: String,
    /// The tenant.
    pub tenant: String,
    /// Where they differ.
    pub differences: Vec<Difference>,
    /// Whether Allot was made to match.
    pub repaired: bool,
    /// Why it could not be, or what to know.
    pub note: String,
}

/// What a reconciliation found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Reconciliation {
    /// Provider subscriptions compared.
    pub checked: usize,
    /// Those that differ.
    pub drift: Vec<Drift>,
    /// Objects Allot has a sync state for that the provider's list lacks.
    pub not_in_provider: Vec<String>,
}

impl ProviderSync {
    /// Compares the provider's subscriptions as they are now with the tenants'
    /// subscriptions in Allot and, with `repair`, makes Allot match where the state
    /// machine allows. Each repair is recorded (`reconcile.repair`, by `who`); the
    /// snapshot joins the object's sync state as an event at this instant, so later
    /// webhooks fold over it.
    pub async fn reconcile(
        &self,
        current: Vec<(String, Snapshot)>,
        repair: bool,
        who: &Who,
    ) -> Result<Reconciliation, EngineError> {
        let _serial = self.serial.lock().await;
        let now = self.engine.now();
        let mut out = Reconciliation {
            checked: current.len(),
            ..Default::default()
        };
        let listed: std::collections::BTreeSet<&str> =
            current.iter().map(|(id, _)| id.as_str()).collect();
        out.not_in_provider = self
            .store()
            .provider_objects(&self.provider)
            .await?
            .into_iter()
            .filter(|o| !listed.contains(o.as_str()))
            .collect();
        for (object_id, snapshot) in &current {
            if let Some(d) = self
                .reconcile_one(object_id, snapshot, now, repair, who)
                .await?
            {
                out.drift.push(d);
            }
        }
        Ok(out)
    }

    async fn reconcile_one(
        &self,
        object_id: &str,
        snapshot: &Snapshot,
        now: DateTime<Utc>,
        repair: bool,
        who: &Who,
    ) -> Result<Option<Drift>, EngineError> {
        let event = ProviderEvent {
            id: format!("reconcile:{}", uuid()),
            object_id: object_id.to_string(),
            version: u64::try_from(now.timestamp()).unwrap_or_default(),
            occurred_at: now,
            change: Change::Snapshot {
                reason: SnapshotReason::Updated,
                snapshot: snapshot.clone(),
            },
        };
        let machine = self.machine()?;
        for _ in 0..MAX_ATTEMPTS {
            let (revision, mut record) = self.record(object_id).await?;
            let Some(revision) = self.settle_owed(object_id, revision, &mut record).await? else {
                continue;
            };
            let outcome = record
                .state
                .apply(&machine, event.clone())
                .map_err(|e| EngineError::Internal(e.to_string()))?;
            let mut note = match &outcome.verdict {
                Verdict::Rejected { why } => {
                    format!("the provider's state cannot be applied: {why}")
                }
                _ => String::new(),
            };
            let stored = self.store().subscription(&snapshot.tenant).await?;
            let Some(mut expected) = outcome.after.clone() else {
                return Ok(None);
            };
            machine.advance(&mut expected, now);
            if let Verdict::Rejected { .. } = outcome.verdict {
                // The fold kept Allot's status: show what the provider says instead.
                expected.status = snapshot.status;
            }
            let differences = differences(stored.as_ref(), &expected, &machine, now);
            if differences.is_empty() {
                return Ok(None);
            }
            let mut drift = Drift {
                object_id: object_id.to_string(),
                tenant: snapshot.tenant.clone(),
                differences,
                repaired: false,
                note: String::new(),
            };
            if !repair || !note.is_empty() {
                if !note.is_empty() {
                    note.push_str("; change it by hand if the provider is right");
                }
                drift.note = note;
                return Ok(Some(drift));
            }
            if !self.put(object_id, revision, &record).await? {
                continue;
            }
            let repaired = repaired(stored.clone(), &expected, &drift.differences);
            let list: Vec<String> = drift
                .differences
                .iter()
                .map(|d| format!("{} {} -> {}", d.field, d.allot, d.provider))
                .collect();
            let entry = LedgerEntry {
                id: format!("reconcile:{}", uuid()),
                at: now,
                tenant: snapshot.tenant.clone(),
                source: who.source,
                action: "reconcile.repair".into(),
                actor: who.actor.clone(),
                reason: format!(
                    "{}: Allot differed from {} subscription {object_id}: {}",
                    if who.reason.is_empty() {
                        "reconciliation"
                    } else {
                        &who.reason
                    },
                    self.provider,
                    list.join("; ")
                ),
                correlation_id: who.correlation_id.clone(),
                before: stored
                    .as_ref()
                    .map(meter::ledger::snapshot)
                    .unwrap_or_default(),
                after: meter::ledger::snapshot(&repaired),
                applied: true,
            };
            self.store().save_subscription(&repaired, &entry).await?;
            self.engine.changed(&repaired.tenant);
            drift.repaired = true;
            return Ok(Some(drift));
        }
        Err(EngineError::Unavailable(format!(
            "{} object {object_id}: deliveries kept changing it during reconciliation; try again",
            self.provider
        )))
    }
}

fn show<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// Where the stored subscription, in force at `now`, differs from the provider's.
fn differences(
    stored: Option<&Subscription>,
    expected: &Subscription,
    machine: &StatusMachine,
    now: DateTime<Utc>,
) -> Vec<Difference> {
    let Some(stored) = stored else {
        return vec![Difference {
            field: "subscription",
            allot: "none".into(),
            provider: format!("{} {}", expected.plan, expected.status.as_str()),
        }];
    };
    let mut s = stored.clone();
    machine.advance(&mut s, now);
    let addons = |x: &Subscription| {
        x.addons
            .iter()
            .map(|a| format!("{}:{}", a.code, a.quantity))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut out = Vec::new();
    let mut differ = |field, allot: String, provider: String| {
        if allot != provider {
            out.push(Difference {
                field,
                allot,
                provider,
            });
        }
    };
    differ(
        "status",
        s.status.as_str().into(),
        expected.status.as_str().into(),
    );
    differ("plan", s.plan.to_string(), expected.plan.to_string());
    differ("addons", addons(&s), addons(expected));
    differ(
        "trial_ends_at",
        show(&s.trial_ends_at),
        show(&expected.trial_ends_at),
    );
    differ("cancel_at", show(&s.cancel_at), show(&expected.cancel_at));
    out
}

/// The stored subscription with the provider's value of each field that differs.
fn repaired(
    stored: Option<Subscription>,
    expected: &Subscription,
    differences: &[Difference],
) -> Subscription {
    let Some(mut sub) = stored else {
        return expected.clone();
    };
    for d in differences {
        match d.field {
            "status" => {
                sub.status = expected.status;
                sub.status_since = expected.status_since;
            }
            "plan" => {
                sub.plan = expected.plan.clone();
                sub.plan_since = expected.plan_since;
                sub.scheduled_change = expected.scheduled_change.clone();
            }
            "addons" => sub.addons = expected.addons.clone(),
            "trial_ends_at" => {
                sub.trial_ends_at = expected.trial_ends_at;
                sub.post_trial_plan = expected.post_trial_plan.clone();
            }
            "cancel_at" => sub.cancel_at = expected.cancel_at,
            _ => return expected.clone(),
        }
    }
    sub
}

/// The verdict, and what a late event revised.
fn explain(outcome: &Outcome) -> String {
    let mut text = outcome.verdict.explain();
    if outcome.late && !matches!(outcome.verdict, Verdict::Stale { .. }) {
        text.push_str("; delivered after newer events, folded in its place");
    }
    for r in &outcome.revised {
        text.push_str(&format!(
            "; event {} now reads {} (was {})",
            r.event_id,
            r.now.explain(),
            r.was.explain()
        ));
    }
    text
}

/// The stored subscription with the fields the event changed, or the fold's subscription
/// when none is stored. `None` when there is nothing to store.
pub fn merge(
    stored: Option<Subscription>,
    before: Option<&Subscription>,
    after: Option<&Subscription>,
) -> Option<Subscription> {
    let after = after?;
    let (Some(mut sub), Some(before)) = (stored.clone(), before) else {
        let mut new = after.clone();
        if let Some(s) = stored {
            new.time_zone = s.time_zone;
        }
        return Some(new);
    };
    macro_rules! take {
        ($($f:ident),*) => {$(
            if before.$f != after.$f {
                sub.$f = after.$f.clone();
            }
        )*};
    }
    take!(
        plan,
        plan_since,
        addons,
        status,
        status_since,
        billing_anchor,
        trial_ends_at,
        post_trial_plan,
        scheduled_change,
        cancel_at
    );
    Some(sub)
}

fn uuid() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use meter::lifecycle::{PlanRef, Status};

    fn sub(plan: &str, status: Status) -> Subscription {
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        Subscription {
            tenant: "acme".into(),
            plan: PlanRef {
                code: plan.into(),
                version: 1,
            },
            plan_since: t,
            addons: vec![],
            status,
            status_since: t,
            billing_anchor: t,
            time_zone: "UTC".into(),
            trial_ends_at: None,
            post_trial_plan: None,
            scheduled_change: None,
            cancel_at: None,
        }
    }

    #[test]
    fn merge_copies_only_what_the_event_changed() {
        // Support moved acme to enterprise in Paris time; the provider then marks it past due.
        let mut stored = sub("enterprise", Status::Active);
        stored.time_zone = "Europe/Paris".into();
        let before = sub("pro", Status::Active);
        let after = sub("pro", Status::PastDue);
        let merged = merge(Some(stored), Some(&before), Some(&after)).unwrap();
        assert_eq!(merged.plan.code, "enterprise");
        assert_eq!(merged.status, Status::PastDue);
        assert_eq!(merged.time_zone, "Europe/Paris");
    }

    #[test]
    fn merge_takes_the_fold_for_a_first_snapshot_but_keeps_the_time_zone() {
        let mut stored = sub("free", Status::Active);
        stored.time_zone = "Asia/Tokyo".into();
        let after = sub("pro", Status::Trialing);
        let merged = merge(Some(stored), None, Some(&after)).unwrap();
        assert_eq!(
            (merged.plan.code.as_str(), merged.status),
            ("pro", Status::Trialing)
        );
        assert_eq!(merged.time_zone, "Asia/Tokyo");
        assert_eq!(merge(None, None, Some(&after)), Some(after));
        assert_eq!(merge(None, None, None), None);
    }
}
