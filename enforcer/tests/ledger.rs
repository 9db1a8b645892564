//! The entitlement ledger, with time under the test's control: every Admin change is
//! recorded with who, why and before → after; changes time makes (an override expiring,
//! a trial ending, a grace period running out, a scheduled downgrade) take effect at their
//! exact instants in the gRPC answers and are recorded at those instants, once, even when
//! looked for twice or across overlapping spans.

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

// ---------------------------------------------------------------------------------------
// Time-driven changes through the gRPC API, on a controlled clock: the answers change
// exactly at each instant (one second before: the old answer; at it: the new one), and
// the ledger records each change at that instant.

mod harness;

use allot_proto::v1 as pb;
use harness::{outcome, record, reserve};
use pb::admin_client::AdminClient;
use pb::enforcer_client::EnforcerClient;
use tonic::transport::Channel;

/// Grace lasts 3 days here. In grace (read-only) the `reports` feature stays on, the
/// metered `bulk_export` feature turns off, and `seats` stays consumable.
const LIFECYCLE: &str = "version: 1
grace_days: 3
access:
  grace:
    level: read_only
    features_off: [bulk_export]
    consumable: [seats]
metrics:
  calls: { unit: call }
  seats: { unit: seat, kind: gauge }
  exports: { unit: export }
features:
  reports: { kind: boolean }
  bulk_export: { kind: metered, metric: exports }
plans:
  free:
    tier: 0
    versions:
      1:
        features: { reports: true }
        limits:
          calls: [{ window: month, amount: 100 }]
          seats: [{ window: none, amount: 3 }]
  pro:
    tier: 1
    versions:
      1:
        features: { reports: true }
        limits:
          calls: [{ window: month, amount: 10000 }]
          seats: [{ window: none, amount: 10 }]
          exports: [{ window: month, amount: 50 }]
";

/// The real Enforcer and Admin services over an engine on a manual clock, in this
/// process, on a loopback port.
struct Controlled {
    engine: Arc<Engine>,
    clock: Arc<Manual>,
    enforcer: EnforcerClient<Channel>,
    admin: AdminClient<Channel>,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for Controlled {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Controlled {
    async fn start(catalog: &str, now: DateTime<Utc>) -> Controlled {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let clock = Arc::new(Manual(AtomicI64::new(now.timestamp_millis())));
        let engine = Arc::new(
            Engine::new(
                store.clone(),
                store,
                clock.clone(),
                std::time::Duration::from_secs(3600),
            )
            .await
            .unwrap(),
        );
        engine
            .apply_catalog(catalog, "catalog.yaml", false, &Who::admin("t", "setup"))
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .add_service(pb::enforcer_server::EnforcerServer::new(
                enforcer::grpc::enforcer::EnforcerService::new(engine.clone()),
            ))
            .add_service(pb::admin_server::AdminServer::new(
                enforcer::grpc::admin::AdminService::new(engine.clone()),
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let server = tokio::spawn(async move { server.await.unwrap() });
        let endpoint = format!("http://{addr}");
        Controlled {
            engine,
            clock,
            enforcer: EnforcerClient::connect(endpoint.clone()).await.unwrap(),
            admin: AdminClient::connect(endpoint).await.unwrap(),
            server,
            _dir: dir,
        }
    }

    async fn status(&mut self, tenant: &str, status: &str) {
        self.admin
            .change_subscription(pb::ChangeSubscriptionRequest {
                tenant: tenant.into(),
                status: status.into(),
                actor: "billing@example.com".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// Check's decision for a feature.
    async fn feature(&mut self, tenant: &str, feature: &str) -> pb::Decision {
        self.check(pb::CheckRequest {
            tenant: tenant.into(),
            feature: feature.into(),
            ..Default::default()
        })
        .await
    }

    /// Check's decision for `amount` units of a metric.
    async fn units(&mut self, tenant: &str, metric: &str, amount: i64) -> pb::Decision {
        self.check(pb::CheckRequest {
            tenant: tenant.into(),
            metric: metric.into(),
            amount,
            ..Default::default()
        })
        .await
    }

    async fn check(&mut self, r: pb::CheckRequest) -> pb::Decision {
        self.enforcer
            .check(r)
            .await
            .unwrap()
            .into_inner()
            .decision
            .unwrap()
    }

    async fn tenant(&mut self, tenant: &str) -> pb::GetTenantResponse {
        self.admin
            .get_tenant(pb::GetTenantRequest {
                tenant: tenant.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Records what time did since `after`, and returns the ledger's time-driven entries
    /// as (action, instant).
    async fn scheduled(&self, tenant: &str, after: DateTime<Utc>) -> Vec<(String, DateTime<Utc>)> {
        self.engine
            .record_due(after, self.engine.now())
            .await
            .unwrap();
        self.engine
            .history(tenant, 100)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.source == Source::Schedule)
            .map(|e| (e.action, e.at))
            .collect()
    }
}

fn second() -> Duration {
    Duration::seconds(1)
}

fn reason(d: &pb::Decision) -> (&str, pb::Outcome) {
    (d.reason.as_str(), d.outcome())
}

#[tokio::test]
async fn a_trial_ends_at_its_instant() {
    let mut n = Controlled::start(LIFECYCLE, t0()).await;
    let end = t0() + Duration::days(14);
    n.engine
        .put_subscription(
            NewSubscription {
                tenant: "acme".into(),
                plan: "pro".into(),
                trial_ends_at: Some(end),
                post_trial_plan: Some(("free".into(), None)),
                ..Default::default()
            },
            &Who::admin("t", "trial"),
        )
        .await
        .unwrap();

    n.clock.set(end - second());
    assert_eq!(
        reason(&n.units("acme", "exports", 1).await),
        ("ok", pb::Outcome::Allow)
    );
    let t = n.tenant("acme").await;
    assert_eq!((t.plan.as_str(), t.status.as_str()), ("pro@1", "trialing"));
    assert_eq!(t.valid_until.unwrap().seconds, end.timestamp());

    n.clock.set(end);
    assert_eq!(
        reason(&n.units("acme", "exports", 1).await),
        ("feature_not_in_plan", pb::Outcome::Deny)
    );
    let t = n.tenant("acme").await;
    assert_eq!((t.plan.as_str(), t.status.as_str()), ("free@1", "active"));
    assert_eq!(t.status_since.unwrap().seconds, end.timestamp());

    assert_eq!(
        n.scheduled("acme", t0()).await,
        vec![("trial.ended".to_string(), end)]
    );
}

#[tokio::test]
async fn grace_ends_after_the_catalogs_days_at_its_instant() {
    let mut n = Controlled::start(LIFECYCLE, t0()).await;
    harness::subscribe(&mut n.admin, "acme", "pro").await;
    // A payment fails an hour in; collection gives up an hour later.
    n.clock.set(t0() + Duration::hours(1));
    n.status("acme", "past_due").await;
    let entered = t0() + Duration::hours(2);
    n.clock.set(entered);
    n.status("acme", "grace").await;
    let end = entered + Duration::days(3);

    n.clock.set(end - second());
    assert_eq!(
        reason(&n.feature("acme", "reports").await),
        ("ok", pb::Outcome::Allow)
    );
    let t = n.tenant("acme").await;
    assert_eq!(t.status, "grace");
    assert_eq!(t.valid_until.unwrap().seconds, end.timestamp());

    n.clock.set(end);
    assert_eq!(
        reason(&n.feature("acme", "reports").await),
        ("subscription_inactive", pb::Outcome::Deny)
    );
    let t = n.tenant("acme").await;
    assert_eq!(
        (t.status.as_str(), t.access.as_str()),
        ("suspended", "none")
    );
    assert_eq!(t.status_since.unwrap().seconds, end.timestamp());
    assert_eq!(
        n.scheduled("acme", t0()).await,
        vec![("grace.ended".to_string(), end)]
    );

    // Paying after suspension brings access back (suspended → active).
    n.status("acme", "active").await;
    assert_eq!(
        reason(&n.units("acme", "calls", 1).await),
        ("ok", pb::Outcome::Allow)
    );
}

#[tokio::test]
async fn a_downgrade_at_period_end_takes_effect_at_its_instant() {
    let mut n = Controlled::start(LIFECYCLE, t0()).await;
    harness::subscribe(&mut n.admin, "acme", "pro").await;
    n.clock.set(t0() + Duration::days(15));
    let s = n
        .admin
        .change_subscription(pb::ChangeSubscriptionRequest {
            tenant: "acme".into(),
            plan: "free".into(),
            actor: "t".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .subscription
        .unwrap();
    // A lower tier waits for the end of the billing period, anchored at t0: April 10.
    let end = Utc.with_ymd_and_hms(2026, 4, 10, 9, 0, 0).unwrap();
    assert_eq!(s.scheduled_at.unwrap().seconds, end.timestamp());

    n.clock.set(end - second());
    assert_eq!(
        reason(&n.units("acme", "exports", 1).await),
        ("ok", pb::Outcome::Allow)
    );
    assert_eq!(
        reason(&n.units("acme", "calls", 500).await),
        ("ok", pb::Outcome::Allow)
    );
    n.clock.set(end);
    assert_eq!(
        reason(&n.units("acme", "exports", 1).await),
        ("feature_not_in_plan", pb::Outcome::Deny)
    );
    assert_eq!(
        reason(&n.units("acme", "calls", 500).await),
        ("limit_exceeded", pb::Outcome::Deny)
    );
    assert_eq!(n.tenant("acme").await.plan, "free@1");
    assert_eq!(
        n.scheduled("acme", t0()).await,
        vec![("plan.scheduled_change".to_string(), end)]
    );
}

#[tokio::test]
async fn grace_degrades_feature_by_feature_as_the_catalog_declares() {
    let mut n = Controlled::start(LIFECYCLE, t0()).await;
    harness::subscribe(&mut n.admin, "acme", "pro").await;
    n.status("acme", "past_due").await;
    n.status("acme", "grace").await;

    // A kept read feature: still on.
    assert_eq!(
        reason(&n.feature("acme", "reports").await),
        ("ok", pb::Outcome::Allow)
    );
    // A metered write: refused, saying why.
    let r = n
        .enforcer
        .reserve(reserve("acme", "calls", 1, "k1"))
        .await
        .unwrap()
        .into_inner()
        .decision
        .unwrap();
    assert_eq!(reason(&r), ("subscription_read_only", pb::Outcome::Deny));
    assert!(
        r.message.contains("grace") && r.message.contains("calls"),
        "{}",
        r.message
    );
    // Whether calls are granted at all (amount 0) is still answered.
    assert_eq!(
        reason(&n.units("acme", "calls", 0).await),
        ("ok", pb::Outcome::Allow)
    );
    // The feature grace turns off, and its metric.
    let d = n.feature("acme", "bulk_export").await;
    assert_eq!(reason(&d), ("subscription_restricted", pb::Outcome::Deny));
    assert!(d.message.contains("features_off"), "{}", d.message);
    assert_eq!(
        reason(&n.units("acme", "exports", 1).await),
        ("subscription_restricted", pb::Outcome::Deny)
    );
    // A kept metric: still consumable.
    let r = n
        .enforcer
        .record(record("acme", "seats", 2, "e1"))
        .await
        .unwrap()
        .into_inner()
        .decision
        .unwrap();
    assert!(outcome(&Some(r.clone())) != pb::Outcome::Deny, "{r:?}");

    // The tenant view says why, with the status rule as provenance.
    let t = n.tenant("acme").await;
    assert_eq!(
        (t.status.as_str(), t.access.as_str()),
        ("grace", "read_only")
    );
    let export = t
        .features
        .iter()
        .find(|f| f.feature == "bulk_export")
        .unwrap();
    assert!(!export.enabled);
    assert_eq!(
        export
            .sources
            .iter()
            .map(|p| (p.kind.as_str(), p.r#ref.as_str()))
            .collect::<Vec<_>>(),
        vec![("status", "grace")]
    );
    let closed = |metric: &str| {
        t.limits
            .iter()
            .find(|l| l.metric == metric)
            .unwrap()
            .closed_by
            .as_ref()
            .map(|p| format!("{} {}", p.kind, p.r#ref))
    };
    assert_eq!(closed("calls").as_deref(), Some("status grace"));
    assert_eq!(closed("exports").as_deref(), Some("status grace"));
    assert_eq!(closed("seats"), None);

    // Paid: everything back.
    n.status("acme", "active").await;
    assert_eq!(
        reason(&n.feature("acme", "bulk_export").await),
        ("ok", pb::Outcome::Allow)
    );
    assert_eq!(
        reason(&n.units("acme", "calls", 1).await),
        ("ok", pb::Outcome::Allow)
    );
}
