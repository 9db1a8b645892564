//! Planning and deciding requests: reasons, warnings, overage, gauges, bad input.

mod common;

use std::collections::BTreeMap;

use chrono::Duration;
use common::{example, sub, t0};
use meter::catalog::Catalog;
use meter::decision::{Outcome, Reason};
use meter::lifecycle::{ChangeTiming, PlanRef, Status};
use meter::quota::{decide, plan_request, Demand, Intent, Planned, RequestError, RequestPlan};
use meter::resolve::{resolve, Entitlements};
use meter::store::SlotUsage;
use meter::window::Window;

fn plan(
    c: &Catalog,
    e: &Entitlements,
    metric: &str,
    amount: i64,
    intent: Intent,
) -> Result<Planned, RequestError> {
    let dims = BTreeMap::new();
    plan_request(
        c,
        e,
        &Demand {
            metric,
            amount,
            dimensions: &dims,
            intent,
        },
        e.at,
    )
}

fn must_plan(
    c: &Catalog,
    e: &Entitlements,
    metric: &str,
    amount: i64,
    intent: Intent,
) -> RequestPlan {
    match plan(c, e, metric, amount, intent).unwrap() {
        Planned::Plan(p) => p,
        Planned::Decided(d) => panic!("decided early: {d:?}"),
    }
}

fn used(n: u64) -> SlotUsage {
    SlotUsage {
        used: n,
        reserved: 0,
    }
}

fn admitted(p: &RequestPlan, usage: &[SlotUsage]) -> bool {
    let n = p.amount.max(0) as u64;
    p.slots
        .iter()
        .zip(usage)
        .all(|(s, u)| s.spec.cap.is_none_or(|c| u.used + u.reserved + n <= c))
}

#[test]
fn bad_amounts_name_the_field() {
    let c = example();
    let e = resolve(&c, &sub("acme", "pro"), &[], t0());
    for (amount, intent) in [
        (0, Intent::Reserve),
        (-1, Intent::Reserve),
        (0, Intent::Record),
        (-3, Intent::Record),
        (-1, Intent::Check),
    ] {
        let err = plan(&c, &e, "api_calls", amount, intent).unwrap_err();
        assert!(
            matches!(&err, RequestError::Invalid { field, .. } if field == "amount"),
            "{amount} {intent:?}: {err}"
        );
    }
    let err = plan(&c, &e, "api_calls", i64::MIN, Intent::Record).unwrap_err();
    assert!(err.to_string().starts_with("amount:"), "{err}");
    let err = plan(&c, &e, "nope", 1, Intent::Reserve).unwrap_err();
    assert!(
        matches!(&err, RequestError::NotFound { field, .. } if field == "metric"),
        "{err}"
    );
    // Gauges take negative records.
    assert!(plan(&c, &e, "seats", -1, Intent::Record).is_ok());
}

#[test]
fn hard_limit_denies_at_the_cap_with_numbers() {
    let c = example();
    let e = resolve(&c, &sub("acme", "free"), &[], t0());
    let p = must_plan(&c, &e, "api_calls", 5, Intent::Reserve);
    assert_eq!(p.slots.len(), 1);
    assert_eq!(p.rates.len(), 1);
    let u = [SlotUsage {
        used: 9_990,
        reserved: 6,
    }];
    assert!(!admitted(&p, &u));
    let d = decide(&p, &u, false);
    assert_eq!(
        (d.outcome, d.reason),
        (Outcome::Deny, Reason::LimitExceeded)
    );
    assert_eq!(
        (d.limit, d.used, d.reserved, d.remaining),
        (Some(10_000), 9_990, 6, Some(4))
    );
    assert_eq!(d.window, Some(Window::Month));
    assert_eq!(
        d.resets_at,
        Some(t0().date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc() + Duration::days(31))
    );
}

#[test]
fn warnings_past_thresholds_and_overage_on_soft_limits() {
    let c = example();
    let e = resolve(&c, &sub("acme", "free"), &[], t0());
    let p = must_plan(&c, &e, "api_calls", 1, Intent::Reserve);
    let d = decide(&p, &[used(7_000)], true);
    assert_eq!((d.outcome, d.reason), (Outcome::Allow, Reason::Ok));
    assert_eq!(d.remaining, Some(2_999));
    let d = decide(&p, &[used(7_999)], true);
    assert_eq!(
        (d.outcome, d.reason, d.warning_percent),
        (Outcome::AllowWithWarning, Reason::NearLimit, Some(80))
    );
    let d = decide(&p, &[used(9_999)], true);
    assert_eq!(d.warning_percent, Some(100));

    let e = resolve(&c, &sub("acme", "enterprise"), &[], t0());
    let p = must_plan(&c, &e, "api_calls", 10, Intent::Reserve);
    assert_eq!(p.slots[0].spec.cap, Some(25_000_000));
    let u = [used(20_000_000)];
    assert!(admitted(&p, &u));
    let d = decide(&p, &u, true);
    assert_eq!(
        (d.outcome, d.reason, d.overage),
        (Outcome::AllowWithWarning, Reason::Overage, true)
    );
    let u = [used(24_999_995)];
    assert!(!admitted(&p, &u));
    assert_eq!(decide(&p, &u, false).reason, Reason::LimitExceeded);
}

#[test]
fn gauge_above_limit_after_downgrade_keeps_seats_but_refuses_new_ones() {
    let c = example();
    let mut s = sub("acme", "pro");
    s.change_plan(
        PlanRef {
            code: "free".into(),
            version: 1,
        },
        ChangeTiming::Immediately,
        t0(),
    );
    let e = resolve(&c, &s, &[], t0());
    // 5 seats in use, new limit 3.
    let add = must_plan(&c, &e, "seats", 1, Intent::Record);
    let u = [used(5)];
    assert!(!admitted(&add, &u));
    let d = decide(&add, &u, false);
    assert_eq!(
        (d.outcome, d.reason),
        (Outcome::Deny, Reason::AboveLimitAfterDowngrade)
    );
    assert!(d.message.contains("existing ones stay"), "{}", d.message);
    // Removing one is fine: no cap applies to a decrease.
    let remove = must_plan(&c, &e, "seats", -1, Intent::Record);
    let d = decide(&remove, &u, true);
    assert!(d.outcome.allowed());
    assert_eq!((d.used, d.remaining), (5, Some(0)));
    assert_eq!(decide(&remove, &[used(3)], true).remaining, Some(1));
}

#[test]
fn per_request_maximum_on_credit_exposure() {
    let c = example();
    let e = resolve(&c, &sub("agency", "travel_pro"), &[], t0());
    let Planned::Decided(d) =
        plan(&c, &e, "credit_usd_micros", 3_000_000_001, Intent::Reserve).unwrap()
    else {
        panic!()
    };
    assert_eq!(
        (d.outcome, d.reason, d.limit),
        (
            Outcome::Deny,
            Reason::PerRequestMaxExceeded,
            Some(3_000_000_000)
        )
    );
    assert!(matches!(
        plan(&c, &e, "credit_usd_micros", 3_000_000_000, Intent::Reserve).unwrap(),
        Planned::Plan(_)
    ));
}

#[test]
fn per_key_rate_limit_needs_the_dimension() {
    let c = example();
    let e = resolve(&c, &sub("agency", "travel_pro"), &[], t0());
    let err = plan(&c, &e, "quotations", 1, Intent::Reserve).unwrap_err();
    assert_eq!(
        err.to_string(),
        "dimensions.api_key: required: quotations has a per-api_key rate limit"
    );
    let mut dims = BTreeMap::new();
    dims.insert("api_key".to_string(), "k1".to_string());
    let p = plan_request(
        &c,
        &e,
        &Demand {
            metric: "quotations",
            amount: 1,
            dimensions: &dims,
            intent: Intent::Reserve,
        },
        t0(),
    )
    .unwrap();
    let Planned::Plan(p) = p else { panic!() };
    assert_eq!(p.rates[0].bucket, "quotations|second|api_key=k1");
    assert_eq!(p.slots.len(), 2);
}

#[test]
fn status_access_levels_gate_requests() {
    let c = example();
    let mut s = sub("acme", "pro");
    s.status = Status::Grace;
    let e = resolve(&c, &s, &[], t0());
    let Planned::Decided(d) = plan(&c, &e, "api_calls", 1, Intent::Reserve).unwrap() else {
        panic!()
    };
    assert_eq!(d.reason, Reason::SubscriptionReadOnly);
    // Check of an amount answers as Reserve would; a bare "is it granted?" (0) passes.
    assert!(matches!(
        plan(&c, &e, "api_calls", 1, Intent::Check).unwrap(),
        Planned::Decided(ref d) if d.reason == Reason::SubscriptionReadOnly
    ));
    assert!(matches!(
        plan(&c, &e, "api_calls", 0, Intent::Check).unwrap(),
        Planned::Plan(_)
    ));
    s.status = Status::Suspended;
    let e = resolve(&c, &s, &[], t0());
    let Planned::Decided(d) = plan(&c, &e, "api_calls", 1, Intent::Check).unwrap() else {
        panic!()
    };
    assert_eq!(d.reason, Reason::SubscriptionInactive);
}

#[test]
fn metric_not_in_plan_is_denied() {
    let c = example();
    let e = resolve(&c, &sub("acme", "pro"), &[], t0());
    let Planned::Decided(d) = plan(&c, &e, "quotations", 1, Intent::Reserve).unwrap() else {
        panic!()
    };
    assert_eq!(
        (d.outcome, d.reason),
        (Outcome::Deny, Reason::FeatureNotInPlan)
    );
}
