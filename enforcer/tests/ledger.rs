//! The entitlement ledger, with time under the test's control: every Admin change is
//! recorded with who, why and before → after; changes time makes (an override expiring,
//! a trial ending, a scheduled downgrade) are recorded at their exact instants, once, even
//! when looked for twice or across overlapping spans.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use enforcer::embedded::EmbeddedStore;
use enforcer::engine::admin::{NewSubscription, SubscriptionChange, Who};
use enforcer::engine::{Clock, Engine};
use meter::grant::{Change, Override};
use meter::ledger::Source;
use meter::lifecycle::ChangeTiming;

/// A clock that moves only when told.
struct Manual(AtomicI64);

impl Manual {
    fn set(&self, t: DateTime<Utc>) {
        self.0.store(t.timestamp_millis(), Ordering::SeqCst);
    }
}

impl Clock for Manual {
    fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.0.load(Ordering::SeqCst)).unwrap()
    }
    fn monotonic_ns(&self) -> u64 {
        u64::try_from(self.0.load(Ordering::SeqCst)).unwrap() * 1_000_000
    }
}

const CATALOG: &str = "version: 1
metrics:
  calls: { unit: call }
plans:
  free:
    tier: 0
    versions:
      1:
        limits:
          calls: [{ window: month, amount: 100 }]
  pro:
    tier: 1
    versions:
      1:
        limits:
          calls: [{ window: month, amount: 10000 }]
";

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 10, 9, 0, 0).unwrap()
}

#[tokio::test]
async fn every_change_is_recorded_and_time_driven_ones_at_their_instants() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let clock = Arc::new(Manual(AtomicI64::new(t0().timestamp_millis())));
    let engine = Engine::new(
        store.clone(),
        store.clone(),
        clock.clone(),
        std::time::Duration::from_secs(30),
    )
    .await
    .unwrap();
    let alice = Who::admin("alice@example.com", "signup");
    engine
        .apply_catalog(CATALOG, "catalog.yaml", false, &alice)
        .await
        .unwrap();
    let mut with_trial = NewSubscription {
        tenant: "acme".into(),
        plan: "pro".into(),
        trial_ends_at: Some(t0() + Duration::days(14)),
        post_trial_plan: Some(("free".into(), None)),
        ..Default::default()
    };
    engine
        .put_subscription(with_trial.clone(), &alice)
        .await
        .unwrap();
    let mut bob = Who::admin("bob@example.com", "goodwill after an outage");
    bob.correlation_id = "ticket-4711".into();
    let o = Override {
        id: "o1".into(),
        tenant: "acme".into(),
        change: Change::ExtraUnits {
            metric: "calls".into(),
            amount: 500,
        },
        valid_from: t0(),
        valid_to: Some(t0() + Duration::hours(48)),
        actor: bob.actor.clone(),
        reason: bob.reason.clone(),
        created_at: t0(),
    };
    engine.grant(o, &bob).await.unwrap();

    // Refused changes record nothing: an unknown plan.
    with_trial.plan = "platinum".into();
    engine
        .put_subscription(with_trial, &alice)
        .await
        .unwrap_err();

    // Three days on: the override expired at its instant, 48 h after it began.
    clock.set(t0() + Duration::days(3));
    assert_eq!(engine.record_due(t0(), engine.now()).await.unwrap(), 1);
    // Looked for again over an overlapping span (another node, a restart): kept once.
    assert_eq!(
        engine
            .record_due(t0() - Duration::days(7), engine.now())
            .await
            .unwrap(),
        0
    );
    // Fifteen days on: the trial ended on day 14, to free.
    clock.set(t0() + Duration::days(15));
    assert_eq!(
        engine
            .record_due(t0() + Duration::days(3), engine.now())
            .await
            .unwrap(),
        1
    );
    // A downgrade at period end (the period is anchored at t0: it ends on April 10).
    let carol = Who::admin("carol@example.com", "asked to downgrade");
    engine
        .change_subscription(
            "acme",
            SubscriptionChange {
                plan: Some(("free".into(), None)),
                timing: Some(ChangeTiming::PeriodEnd),
                ..Default::default()
            },
            &carol,
        )
        .await
        .unwrap();
    clock.set(t0() + Duration::days(40));
    engine
        .record_due(t0() + Duration::days(15), engine.now())
        .await
        .unwrap();

    let h = engine.history("acme", 100).await.unwrap();
    let got: Vec<(&str, Source, &str, i64)> = h
        .iter()
        .map(|e| {
            (
                e.action.as_str(),
                e.source,
                e.actor.as_str(),
                (e.at - t0()).num_hours(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("subscription.put", Source::Admin, "alice@example.com", 0),
            ("override.grant", Source::Admin, "bob@example.com", 0),
            ("override.expired", Source::Schedule, "allot", 48),
            ("trial.ended", Source::Schedule, "allot", 14 * 24),
            (
                "subscription.change",
                Source::Admin,
                "carol@example.com",
                15 * 24
            ),
            ("plan.scheduled_change", Source::Schedule, "allot", 31 * 24),
        ]
    );
    assert!(h.iter().all(|e| e.applied));
    let grant = &h[1];
    assert_eq!(
        (grant.reason.as_str(), grant.correlation_id.as_str()),
        ("goodwill after an outage", "ticket-4711")
    );
    assert!(grant.before.is_empty() && grant.after.contains("\"id\":\"o1\""));
    // before → after of the change: the scheduled plan appears only after.
    let change = &h[4];
    assert!(
        !change.before.contains("scheduled_change\":{"),
        "{}",
        change.before
    );
    assert!(
        change.after.contains("scheduled_change\":{"),
        "{}",
        change.after
    );
    assert!(h[3].reason.contains("free@1"), "{}", h[3].reason);
    // The catalog's own history.
    let c = engine.history("", 10).await.unwrap();
    assert_eq!(c.len(), 1);
    // The first catalog: nothing before; after, each plan with its versions.
    assert!(c[0].before.is_empty());
    assert_eq!(c[0].after, r#"["free@1","pro@1"]"#);
    assert_eq!(
        (c[0].action.as_str(), c[0].actor.as_str()),
        ("catalog.apply", "alice@example.com")
    );

    // The ledger survives a restart of the store.
    drop(engine);
    drop(store);
    let store = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let engine = Engine::new(
        store.clone(),
        store,
        clock,
        std::time::Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert_eq!(engine.history("acme", 100).await.unwrap(), h);
    let bad = engine.history("no spaces", 10).await.unwrap_err();
    assert!(bad.to_string().starts_with("tenant:"), "{bad}");
}
