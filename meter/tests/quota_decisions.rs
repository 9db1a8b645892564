//! Planning and deciding requests: reasons, warnings, overage, gauges, bad input.

mod common;

use std::collections::BTreeMap;

use chrono::Duration;
use common::{example, sub, t0};
use meter::catalog::Catalog;
use meter::catalog::{parse, Scope};
use meter::decision::{Outcome, Reason};
use meter::lifecycle::{AddonRef, ChangeTiming, PlanRef, Status};
use meter::quota::{
    decide, plan_request, rate_degraded, rate_limited, rate_unavailable, Demand, Intent, Planned,
    RequestError, RequestPlan,
};
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
        &c.status_machine(),
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

#[test]
fn rate_scope_is_resolved_into_the_bucket() {
    let c = parse(
        "version: 1
metrics: {calls: {unit: call}, pages: {unit: page}}
plans:
  base:
    versions:
      1:
        limits:
          calls: [{window: minute, rate: 60, burst: 10, scope: global, on_backend_failure: fail_open}]
          pages: [{window: second, rate: 5}, {window: day, amount: 100}]
addons:
  boost:
    limits:
      pages: [{window: second, rate: 50, scope: global}]
",
        "cat.yaml",
    )
    .unwrap();
    let e = resolve(&c, &sub("acme", "base"), &[], t0());
    assert_eq!(
        e.limit("calls", Window::Minute).unwrap().scope,
        Scope::Global
    );
    assert_eq!(e.limit("pages", Window::Second).unwrap().scope, Scope::Node);
    assert_eq!(e.limit("pages", Window::Day).unwrap().scope, Scope::Node);
    let p = must_plan(&c, &e, "calls", 1, Intent::Reserve);
    let r = &p.rates[0];
    assert_eq!((r.scope, r.fail_open), (Scope::Global, true));
    assert_eq!((r.gcra.rate(), r.gcra.burst()), (60, 10));
    let p = must_plan(&c, &e, "pages", 1, Intent::Reserve);
    assert_eq!(
        (p.rates[0].scope, p.rates[0].fail_open),
        (Scope::Node, false)
    );

    // A grant of a shared bucket wins over a node share: it is the stricter reading.
    let mut s = sub("acme", "base");
    s.addons = vec![AddonRef {
        code: "boost".into(),
        quantity: 1,
        since: t0(),
    }];
    let e = resolve(&c, &s, &[], t0());
    let l = e.limit("pages", Window::Second).unwrap();
    assert_eq!((l.amount, l.scope), (50, Scope::Global));
}

#[test]
fn rate_decisions_name_the_share_the_outage_and_the_fallback() {
    let c = parse(
        "version: 1
metrics: {calls: {unit: call}}
plans:
  base:
    versions:
      1:
        limits:
          calls: [{window: minute, rate: 60, burst: 10}]
",
        "cat.yaml",
    )
    .unwrap();
    let e = resolve(&c, &sub("acme", "base"), &[], t0());
    let p = must_plan(&c, &e, "calls", 1, Intent::Reserve);
    let slot = &p.rates[0];
    let wait = std::time::Duration::from_secs(2);
    let d = rate_limited(slot, 3, Some(wait), 1);
    assert_eq!(
        (d.reason, d.retry_after, d.limit),
        (Reason::RateLimited, Some(wait), Some(60))
    );
    // 6 fits the burst of 10 but not a third of it.
    let d = rate_limited(slot, 3, None, 6);
    assert_eq!(d.reason, Reason::ExceedsBurst);
    assert!(
        d.message
            .contains("this node's share of the burst (4 of 10 over 3 nodes)"),
        "{}",
        d.message
    );
    let d = rate_limited(slot, 1, None, 11);
    assert!(
        d.message.contains("more than the burst of 10"),
        "{}",
        d.message
    );

    let d = rate_unavailable(slot, "calls");
    assert_eq!(
        (d.outcome, d.reason),
        (Outcome::Deny, Reason::BackendUnavailable)
    );
    assert!(
        d.message
            .contains("global minute rate limit of calls fails closed"),
        "{}",
        d.message
    );

    let allowed = decide(&p, &[], true);
    let d = rate_degraded(allowed);
    assert_eq!(
        (d.outcome, d.reason),
        (Outcome::AllowWithWarning, Reason::DegradedFailOpen)
    );
    let denied = rate_limited(slot, 1, Some(wait), 1);
    assert_eq!(rate_degraded(denied.clone()), denied);
}

#[test]
fn billing_slots_name_their_period_by_its_local_start() {
    use chrono::TimeZone;
    let c = example();
    let mut s = sub("acme", "free");
    s.time_zone = "Europe/Berlin".into();
    // 23:30 UTC on the last day of February is already March in Berlin.
    let at = chrono::Utc
        .with_ymd_and_hms(2026, 2, 28, 23, 30, 0)
        .unwrap();
    let e = resolve(&c, &s, &[], at);
    let p = must_plan(&c, &e, "api_calls", 1, Intent::Record);
    let month = p.slots.iter().find(|s| s.window == Window::Month).unwrap();
    assert_eq!(month.period.as_deref(), Some("2026-03"));
    // Travel quotations have a day and a month limit: only the month names a period.
    let e = resolve(&c, &sub("acme", "travel_starter"), &[], t0());
    let p = must_plan(&c, &e, "quotations", 1, Intent::Record);
    let periods: Vec<_> = p
        .slots
        .iter()
        .map(|s| (s.window, s.period.clone()))
        .collect();
    assert_eq!(
        periods,
        vec![
            (Window::Day, None),
            (Window::Month, Some("2026-03".to_string()))
        ]
    );
}
