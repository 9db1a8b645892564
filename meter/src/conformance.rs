//! The conformance suite every storage backend must pass (feature `conformance`).
//!
//! Each case takes a fresh, empty store from the caller's factory and asserts one rule of
//! the [`crate::store`] contract. A backend's test file runs them all:
//!
//! ```ignore
//! #[tokio::test]
//! async fn embedded_store_conforms() {
//!     meter::conformance::run_all(|| async { MyStore::open_temp() }).await;
//! }
//! ```
//!
//! The suite is async but executor-agnostic: it never spawns, so `meter` stays free of
//! any runtime.

use std::future::Future;

use chrono::{DateTime, Duration, TimeZone, Utc};

use crate::catalog::parse;
use crate::grant::{Change, Override};
use crate::ledger::{LedgerEntry, Source};
use crate::lifecycle::{PlanRef, Status, Subscription};
use crate::store::{
    ControlStore, RecordOp, ReserveOp, Settlement, SlotSpec, SlotUsage, StoreError, UsageStore,
};

/// A store under test.
pub trait Backend: UsageStore + ControlStore {}
impl<T: UsageStore + ControlStore> Backend for T {}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
}

fn slot(key: &str, cap: Option<u64>) -> SlotSpec {
    SlotSpec {
        key: key.into(),
        cap,
        ends_at: Some(t0() + Duration::days(30)),
    }
}

fn reserve_op(id: &str, key: &str, amount: u64, slots: Vec<SlotSpec>) -> ReserveOp {
    ReserveOp {
        tenant: "acme".into(),
        metric: "api_calls".into(),
        amount,
        reservation_id: id.into(),
        idempotency_key: key.into(),
        slots,
        expires_at: t0() + Duration::seconds(60),
        at: t0(),
        context: id.to_string(),
    }
}

fn record_op(event: &str, amount: i64, slots: Vec<SlotSpec>) -> RecordOp {
    RecordOp {
        tenant: "acme".into(),
        metric: "seats".into(),
        amount,
        event_id: event.into(),
        slots,
        at: t0(),
        context: event.to_string(),
    }
}

async fn usage_of<S: Backend>(s: &S, key: &str) -> SlotUsage {
    s.usage("acme", &[key.to_string()]).await.unwrap()[0]
}

/// Runs every case, each on a fresh store from `make`.
pub async fn run_all<S, F, Fut>(make: F)
where
    S: Backend,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    reserve_within_cap_holds_units(&make().await).await;
    reserve_is_all_or_nothing(&make().await).await;
    reserve_replays_by_idempotency_key(&make().await).await;
    commit_settles_and_refunds(&make().await).await;
    commit_is_at_most_once(&make().await).await;
    commit_refuses_more_than_reserved(&make().await).await;
    release_returns_units(&make().await).await;
    expiry_releases_once(&make().await).await;
    settling_after_expiry_is_refused(&make().await).await;
    unknown_reservation_is_not_found(&make().await).await;
    record_dedups_by_event_id(&make().await).await;
    record_respects_caps(&make().await).await;
    gauge_goes_down_but_not_below_zero(&make().await).await;
    tenants_are_isolated(&make().await).await;
    control_state_round_trips(&make().await).await;
    changes_are_recorded_with_their_entries(&make().await).await;
    provider_records_are_compared_and_set(&make().await).await;
}

/// Units are held and visible as reserved.
pub async fn reserve_within_cap_holds_units<S: Backend>(s: &S) {
    let out = s
        .reserve(reserve_op("r1", "k1", 3, vec![slot("m", Some(10))]))
        .await
        .unwrap();
    assert!(out.granted && !out.replayed);
    assert_eq!(out.reservation_id, "r1");
    assert_eq!(out.usage, vec![SlotUsage::default()]);
    assert_eq!(
        usage_of(s, "m").await,
        SlotUsage {
            used: 0,
            reserved: 3
        }
    );
}

/// One full slot refuses the whole request and changes no slot.
pub async fn reserve_is_all_or_nothing<S: Backend>(s: &S) {
    s.reserve(reserve_op("r1", "k1", 5, vec![slot("day", Some(5))]))
        .await
        .unwrap();
    let out = s
        .reserve(reserve_op(
            "r2",
            "k2",
            1,
            vec![slot("month", Some(100)), slot("day", Some(5))],
        ))
        .await
        .unwrap();
    assert!(!out.granted);
    assert_eq!(
        out.usage[1],
        SlotUsage {
            used: 0,
            reserved: 5
        }
    );
    assert_eq!(usage_of(s, "month").await, SlotUsage::default());
    assert_eq!(s.reservation("acme", "r2").await.unwrap(), None);
}

/// A second reserve with the same key returns the first grant and holds nothing more.
pub async fn reserve_replays_by_idempotency_key<S: Backend>(s: &S) {
    let first = s
        .reserve(reserve_op("r1", "k1", 2, vec![slot("m", Some(10))]))
        .await
        .unwrap();
    let again = s
        .reserve(reserve_op("r2", "k1", 2, vec![slot("m", Some(10))]))
        .await
        .unwrap();
    assert!(again.granted && again.replayed);
    assert_eq!(
        s.find_reserve("acme", "k1").await.unwrap(),
        Some(again.clone())
    );
    assert_eq!(s.find_reserve("acme", "k2").await.unwrap(), None);
    assert_eq!(s.find_reserve("globex", "k1").await.unwrap(), None);
    assert_eq!(again.reservation_id, first.reservation_id);
    assert_eq!(again.context, "r1");
    assert_eq!(again.usage, first.usage);
    assert_eq!(usage_of(s, "m").await.reserved, 2);
}

/// Commit moves the actual amount to used and returns the rest.
pub async fn commit_settles_and_refunds<S: Backend>(s: &S) {
    s.reserve(reserve_op(
        "r1",
        "k1",
        5,
        vec![slot("a", Some(10)), slot("b", None)],
    ))
    .await
    .unwrap();
    let out = s.commit("acme", "r1", 3, t0()).await.unwrap();
    assert_eq!(
        (out.reserved, out.settlement, out.replayed),
        (5, Settlement::Committed(3), false)
    );
    for key in ["a", "b"] {
        assert_eq!(
            usage_of(s, key).await,
            SlotUsage {
                used: 3,
                reserved: 0
            }
        );
    }
}

/// The same commit again replays; a different one conflicts; nothing counts twice.
pub async fn commit_is_at_most_once<S: Backend>(s: &S) {
    s.reserve(reserve_op("r1", "k1", 5, vec![slot("a", Some(10))]))
        .await
        .unwrap();
    s.commit("acme", "r1", 4, t0()).await.unwrap();
    let again = s.commit("acme", "r1", 4, t0()).await.unwrap();
    assert!(again.replayed);
    let other = s.commit("acme", "r1", 5, t0()).await.unwrap_err();
    assert!(matches!(other, StoreError::Conflict(_)), "{other:?}");
    let release = s.release("acme", "r1", t0()).await.unwrap_err();
    assert!(matches!(release, StoreError::Conflict(_)), "{release:?}");
    assert_eq!(
        usage_of(s, "a").await,
        SlotUsage {
            used: 4,
            reserved: 0
        }
    );
}

/// Committing more than was held is invalid and changes nothing.
pub async fn commit_refuses_more_than_reserved<S: Backend>(s: &S) {
    s.reserve(reserve_op("r1", "k1", 5, vec![slot("a", Some(10))]))
        .await
        .unwrap();
    let e = s.commit("acme", "r1", 6, t0()).await.unwrap_err();
    assert!(
        matches!(&e, StoreError::Invalid { field, .. } if field == "actual_amount"),
        "{e:?}"
    );
    assert_eq!(
        usage_of(s, "a").await,
        SlotUsage {
            used: 0,
            reserved: 5
        }
    );
}

/// Release returns the held units; a second release replays.
pub async fn release_returns_units<S: Backend>(s: &S) {
    s.reserve(reserve_op("r1", "k1", 5, vec![slot("a", Some(10))]))
        .await
        .unwrap();
    let out = s.release("acme", "r1", t0()).await.unwrap();
    assert_eq!(out.settlement, Settlement::Released);
    assert!(s.release("acme", "r1", t0()).await.unwrap().replayed);
    assert_eq!(usage_of(s, "a").await, SlotUsage::default());
}

/// Reservations past their TTL are released by `expire_due`, once.
pub async fn expiry_releases_once<S: Backend>(s: &S) {
    s.reserve(reserve_op("r1", "k1", 5, vec![slot("a", Some(10))]))
        .await
        .unwrap();
    assert!(s
        .expire_due(t0() + Duration::seconds(59), 100)
        .await
        .unwrap()
        .is_empty());
    let expired = s
        .expire_due(t0() + Duration::seconds(60), 100)
        .await
        .unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].settlement, Some(Settlement::Expired));
    assert!(s
        .expire_due(t0() + Duration::seconds(120), 100)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(usage_of(s, "a").await, SlotUsage::default());
}

/// A commit after the TTL is refused and the units are released, not counted; a release
/// after the TTL is what already happened, so it answers as a replay.
pub async fn settling_after_expiry_is_refused<S: Backend>(s: &S) {
    s.reserve(reserve_op("r0", "k0", 5, vec![slot("a", Some(10))]))
        .await
        .unwrap();
    let late = s
        .release("acme", "r0", t0() + Duration::seconds(61))
        .await
        .unwrap();
    assert!(
        late.replayed && late.settlement == Settlement::Expired,
        "{late:?}"
    );
    assert_eq!(usage_of(s, "a").await, SlotUsage::default());
    s.reserve(reserve_op("r1", "k1", 5, vec![slot("a", Some(10))]))
        .await
        .unwrap();
    let e = s
        .commit("acme", "r1", 5, t0() + Duration::seconds(61))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)), "{e:?}");
    assert_eq!(usage_of(s, "a").await, SlotUsage::default());
}

/// Unknown reservations are NotFound, naming the field.
pub async fn unknown_reservation_is_not_found<S: Backend>(s: &S) {
    let e = s.commit("acme", "nope", 1, t0()).await.unwrap_err();
    assert!(
        matches!(&e, StoreError::NotFound { field, .. } if field == "reservation_id"),
        "{e:?}"
    );
}

/// A second record with the same event id counts nothing.
pub async fn record_dedups_by_event_id<S: Backend>(s: &S) {
    let first = s
        .record(record_op("e1", 2, vec![slot("g", Some(10))]))
        .await
        .unwrap();
    assert!(first.granted && !first.replayed);
    let again = s
        .record(record_op("e1", 2, vec![slot("g", Some(10))]))
        .await
        .unwrap();
    assert!(again.granted && again.replayed);
    assert_eq!(
        s.find_record("acme", "e1").await.unwrap(),
        Some(again.clone())
    );
    assert_eq!(s.find_record("acme", "e2").await.unwrap(), None);
    assert_eq!(again.context, "e1");
    assert_eq!(usage_of(s, "g").await.used, 2);
}

/// A record that would pass a cap counts nothing.
pub async fn record_respects_caps<S: Backend>(s: &S) {
    s.record(record_op("e1", 9, vec![slot("g", Some(10))]))
        .await
        .unwrap();
    let out = s
        .record(record_op("e2", 2, vec![slot("g", Some(10))]))
        .await
        .unwrap();
    assert!(!out.granted);
    assert_eq!(out.usage[0].used, 9);
    assert_eq!(usage_of(s, "g").await.used, 9);
    // A refused event id is not remembered: the same id may be counted later.
    let ok = s
        .record(record_op("e2", 1, vec![slot("g", Some(10))]))
        .await
        .unwrap();
    assert!(ok.granted && !ok.replayed);
}

/// Gauges take negative amounts but never go below zero.
pub async fn gauge_goes_down_but_not_below_zero<S: Backend>(s: &S) {
    s.record(record_op("e1", 3, vec![slot("g", Some(5))]))
        .await
        .unwrap();
    s.record(record_op("e2", -2, vec![slot("g", Some(5))]))
        .await
        .unwrap();
    assert_eq!(usage_of(s, "g").await.used, 1);
    let e = s
        .record(record_op("e3", -2, vec![slot("g", Some(5))]))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Invalid { field, .. } if field == "amount"),
        "{e:?}"
    );
    assert_eq!(usage_of(s, "g").await.used, 1);
}

/// Counters and keys of one tenant are invisible to another.
pub async fn tenants_are_isolated<S: Backend>(s: &S) {
    s.reserve(reserve_op("r1", "k1", 5, vec![slot("a", Some(10))]))
        .await
        .unwrap();
    assert_eq!(
        s.usage("globex", &["a".into()]).await.unwrap()[0],
        SlotUsage::default()
    );
    let e = s.release("globex", "r1", t0()).await.unwrap_err();
    assert!(matches!(e, StoreError::NotFound { .. }));
}

/// Catalog, subscriptions and overrides come back as saved.
pub async fn control_state_round_trips<S: Backend>(s: &S) {
    assert_eq!(s.catalog().await.unwrap(), None);
    let c = parse(
        "version: 1\nmetrics: {api_calls: {unit: call}}\nplans: {free: {versions: {1: {limits: {api_calls: [{window: month, amount: 10}]}}}}}\n",
        "test",
    )
    .unwrap();
    s.save_catalog(&c, &entry("c1", "")).await.unwrap();
    assert_eq!(s.catalog().await.unwrap(), Some(c));

    let sub = Subscription {
        tenant: "acme".into(),
        plan: PlanRef {
            code: "free".into(),
            version: 1,
        },
        plan_since: t0(),
        addons: vec![],
        status: Status::Active,
        status_since: t0(),
        billing_anchor: t0(),
        time_zone: "Europe/Paris".into(),
        trial_ends_at: None,
        post_trial_plan: None,
        scheduled_change: None,
        cancel_at: None,
    };
    s.save_subscription(&sub, &entry("e1", "acme"))
        .await
        .unwrap();
    assert_eq!(s.subscription("acme").await.unwrap(), Some(sub.clone()));
    // The same entry again (a change retried after a crash): the change was made, and
    // what came after it stays.
    let mut retried = sub.clone();
    retried.status = Status::Canceled;
    s.save_subscription(&retried, &entry("e1", "acme"))
        .await
        .unwrap();
    assert_eq!(s.subscription("acme").await.unwrap(), Some(sub));
    assert_eq!(s.ledger("acme", 10).await.unwrap().len(), 1);
    assert_eq!(s.subscription("globex").await.unwrap(), None);
    assert_eq!(s.tenants().await.unwrap(), vec!["acme".to_string()]);

    let o = Override {
        id: "o1".into(),
        tenant: "acme".into(),
        change: Change::ExtraUnits {
            metric: "api_calls".into(),
            amount: 5,
        },
        valid_from: t0(),
        valid_to: Some(t0() + Duration::hours(48)),
        actor: "support@example.com".into(),
        reason: "goodwill".into(),
        created_at: t0(),
    };
    s.add_override(&o, &entry("e2", "acme")).await.unwrap();
    assert!(matches!(
        s.add_override(&o, &entry("e3", "acme")).await.unwrap_err(),
        StoreError::Conflict(_)
    ));
    assert_eq!(s.overrides("acme").await.unwrap(), vec![o]);
    assert!(s.overrides("globex").await.unwrap().is_empty());
    assert!(s
        .remove_override("acme", "o1", &entry("e4", "acme"))
        .await
        .unwrap());
    assert!(!s
        .remove_override("acme", "o1", &entry("e5", "acme"))
        .await
        .unwrap());
}

fn entry(id: &str, tenant: &str) -> LedgerEntry {
    let n: i64 = id
        .trim_start_matches(|c: char| c.is_alphabetic())
        .parse()
        .unwrap_or(0);
    LedgerEntry {
        id: id.into(),
        at: t0() + Duration::seconds(n),
        tenant: tenant.into(),
        source: Source::Admin,
        action: "test".into(),
        actor: "support@example.com".into(),
        reason: "conformance".into(),
        correlation_id: format!("req-{id}"),
        before: String::new(),
        after: "{}".into(),
        applied: true,
    }
}

/// A change and its ledger entry land together: refused changes record nothing, entries
/// come back oldest first per tenant, and an id recorded twice is kept once.
pub async fn changes_are_recorded_with_their_entries<S: Backend>(s: &S) {
    let ids = |v: Vec<LedgerEntry>| v.into_iter().map(|e| e.id).collect::<Vec<_>>();
    let o = Override {
        id: "o1".into(),
        tenant: "acme".into(),
        change: Change::EnableFeature {
            feature: "sso".into(),
        },
        valid_from: t0(),
        valid_to: None,
        actor: "support@example.com".into(),
        reason: "trial of sso".into(),
        created_at: t0(),
    };
    s.add_override(&o, &entry("e1", "acme")).await.unwrap();
    // Refused: already there, or nothing to remove. Neither is recorded.
    s.add_override(&o, &entry("e2", "acme")).await.unwrap_err();
    assert!(!s
        .remove_override("acme", "nope", &entry("e3", "acme"))
        .await
        .unwrap());
    assert!(s
        .remove_override("acme", "o1", &entry("e4", "acme"))
        .await
        .unwrap());
    // Recorded out of time order: read back in time order.
    assert!(s.record_entry(&entry("e9", "acme")).await.unwrap());
    assert!(s.record_entry(&entry("e5", "acme")).await.unwrap());
    // The same id again (another node recording the same scheduled change): kept once.
    assert!(!s.record_entry(&entry("e5", "acme")).await.unwrap());
    assert!(s.record_entry(&entry("e6", "globex")).await.unwrap());
    let all = s.ledger("acme", 100).await.unwrap();
    assert_eq!(ids(all.clone()), ["e1", "e4", "e5", "e9"]);
    assert_eq!(all[0], entry("e1", "acme"));
    assert_eq!(ids(s.ledger("acme", 2).await.unwrap()), ["e5", "e9"]);
    assert_eq!(ids(s.ledger("globex", 100).await.unwrap()), ["e6"]);
    assert!(s.ledger("initech", 100).await.unwrap().is_empty());
}

/// Provider records change only from the revision the writer read; payment links keep
/// their first object.
pub async fn provider_records_are_compared_and_set<S: Backend>(s: &S) {
    assert_eq!(s.provider_record("stripe", "sub_1").await.unwrap(), None);
    assert!(s.provider_objects("stripe").await.unwrap().is_empty());
    // Only "absent" (0) creates.
    assert!(!s
        .put_provider_record("stripe", "sub_1", 1, "a")
        .await
        .unwrap());
    assert!(s
        .put_provider_record("stripe", "sub_1", 0, "a")
        .await
        .unwrap());
    // Two writers read revision 1: the first wins, the second writes nothing.
    assert!(s
        .put_provider_record("stripe", "sub_1", 1, "b")
        .await
        .unwrap());
    assert!(!s
        .put_provider_record("stripe", "sub_1", 1, "c")
        .await
        .unwrap());
    assert!(!s
        .put_provider_record("stripe", "sub_1", 0, "d")
        .await
        .unwrap());
    let got = s.provider_record("stripe", "sub_1").await.unwrap().unwrap();
    assert_eq!((got.revision, got.text.as_str()), (2, "b"));
    // Objects are per provider.
    assert!(s
        .put_provider_record("stripe", "sub_0", 0, "x")
        .await
        .unwrap());
    assert!(s
        .put_provider_record("paddle", "sub_1", 0, "y")
        .await
        .unwrap());
    assert_eq!(
        s.provider_objects("stripe").await.unwrap(),
        ["sub_0", "sub_1"]
    );
    assert_eq!(
        s.provider_record("paddle", "sub_1")
            .await
            .unwrap()
            .unwrap()
            .text,
        "y"
    );

    assert_eq!(s.payment_link("stripe", "ch_1").await.unwrap(), None);
    s.link_payment("stripe", "ch_1", "sub_1").await.unwrap();
    s.link_payment("stripe", "ch_1", "sub_2").await.unwrap();
    assert_eq!(
        s.payment_link("stripe", "ch_1").await.unwrap().as_deref(),
        Some("sub_1")
    );
    assert_eq!(s.payment_link("paddle", "ch_1").await.unwrap(), None);
}
