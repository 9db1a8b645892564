//! Resolution: merge rules, order independence, provenance, lifecycle instants.

mod common;

use chrono::Duration;
use common::{example, sub, t0};
use meter::catalog::{parse, AccessLevel, Catalog, FeatureValue};
use meter::decision::UpgradeOption;
use meter::grant::{Change, Override};
use meter::hint::{upgrade_options, Need};
use meter::lifecycle::{AddonRef, ChangeTiming, PlanRef, Status};
use meter::resolve::{resolve, Source};
use meter::window::Window;
use proptest::prelude::*;

fn stacking_catalog(amounts: &[u64], rates: &[u64], priorities: &[i32]) -> Catalog {
    let mut y = String::from(
        "version: 1\nmetrics: {calls: {unit: call}, seats: {unit: seat, kind: gauge}}\nfeatures:\n  a: {kind: boolean}\n  b: {kind: boolean}\n  tier_name: {kind: config}\n  formats: {kind: config, merge: union}\n  retention: {kind: config, merge: max}\nplans:\n  base:\n    versions:\n      1:\n        features: {a: true, tier_name: base, formats: [csv], retention: 7}\n        limits:\n          calls: [{window: month, amount: 100}, {window: second, rate: 10}]\n          seats: [{window: none, amount: 3}]\naddons:\n",
    );
    for (i, ((a, r), p)) in amounts.iter().zip(rates).zip(priorities).enumerate() {
        y.push_str(&format!(
            "  ad{i}:\n    priority: {p}\n    features: {{b: {}, tier_name: name{i}, formats: [f{i}], retention: {}}}\n    limits:\n      calls: [{{window: month, amount: {a}}}, {{window: second, rate: {r}}}]\n      seats: [{{window: none, amount: {}}}]\n",
            i % 2 == 0, a % 400, i + 1
        ));
    }
    parse(&y, "stack").unwrap_or_else(|e| panic!("{e}"))
}

fn grant(id: &str, change: Change, from_h: i64, to_h: Option<i64>) -> Override {
    Override {
        id: id.into(),
        tenant: "acme".into(),
        change,
        valid_from: t0() + Duration::hours(from_h),
        valid_to: to_h.map(|h| t0() + Duration::hours(h)),
        actor: "ops".into(),
        reason: "test".into(),
        created_at: t0(),
    }
}

proptest! {
    /// The result does not depend on the order add-ons and overrides were stored in.
    #[test]
    fn merge_is_order_independent(
        amounts in proptest::collection::vec(0u64..1_000_000, 4),
        rates in proptest::collection::vec(1u64..1000, 4),
        priorities in proptest::collection::vec(-3i32..3, 4),
        quantities in proptest::collection::vec(1u32..5, 4),
        order in Just((0..4usize).collect::<Vec<_>>()).prop_shuffle(),
        grant_order in Just((0..5usize).collect::<Vec<_>>()).prop_shuffle(),
    ) {
        let c = stacking_catalog(&amounts, &rates, &priorities);
        let overrides = vec![
            grant("o1", Change::ExtraUnits { metric: "calls".into(), amount: 5 }, -1, Some(5)),
            grant("o2", Change::RaiseLimit { metric: "calls".into(), window: Window::Month, by: 7 }, -2, None),
            grant("o3", Change::SetConfig { feature: "tier_name".into(), value: FeatureValue::Str("vip".into()) }, -1, None),
            grant("o4", Change::SetConfig { feature: "tier_name".into(), value: FeatureValue::Str("vvip".into()) }, -1, None),
            grant("o5", Change::EnableFeature { feature: "b".into() }, -3, Some(1)),
        ];
        let mut s1 = sub("acme", "base");
        s1.addons = (0..4).map(|i| AddonRef { code: format!("ad{i}"), quantity: quantities[i], since: t0() }).collect();
        let mut s2 = s1.clone();
        s2.addons = order.iter().map(|i| s1.addons[*i].clone()).collect();
        let shuffled: Vec<Override> = grant_order.iter().map(|i| overrides[*i].clone()).collect();
        let a = resolve(&c, &s1, &overrides, t0());
        let b = resolve(&c, &s2, &shuffled, t0());
        prop_assert_eq!(&a.features, &b.features);
        prop_assert_eq!(&a.limits, &b.limits);
        prop_assert_eq!(a.version, b.version);
        prop_assert_eq!(a.valid_until, b.valid_until);

        // Quotas sum (times quantity), plus overrides; rate limits take the max.
        let month = a.limit("calls", Window::Month).unwrap();
        let expect: u64 = 100 + amounts.iter().zip(&quantities).map(|(x, q)| x * u64::from(*q)).sum::<u64>() + 5 + 7;
        prop_assert_eq!(month.amount, expect);
        let second = a.limit("calls", Window::Second).unwrap();
        prop_assert_eq!(second.amount, *rates.iter().max().unwrap().max(&10));
        // Booleans union; union lists; max numbers; a later override wins a config.
        prop_assert_eq!(&a.features["b"].value, &FeatureValue::Bool(true));
        prop_assert_eq!(&a.features["tier_name"].value, &FeatureValue::Str("vvip".into()));
        let FeatureValue::List(formats) = &a.features["formats"].value else { panic!() };
        prop_assert_eq!(formats.len(), 5);
        let retention = amounts.iter().map(|x| (x % 400) as i64).max().unwrap().max(7);
        prop_assert_eq!(&a.features["retention"].value, &FeatureValue::Int(retention));
        // The next change by itself is the earliest future override boundary.
        prop_assert_eq!(a.valid_until, Some(t0() + Duration::hours(1)));
    }
}

#[test]
fn config_precedence_prefers_override_then_priority_then_plan() {
    let c = stacking_catalog(&[1, 2], &[1, 2], &[5, 1]);
    let mut s = sub("acme", "base");
    assert_eq!(
        resolve(&c, &s, &[], t0()).features["tier_name"].value,
        FeatureValue::Str("base".into())
    );
    s.addons = vec![
        AddonRef {
            code: "ad1".into(),
            quantity: 1,
            since: t0(),
        },
        AddonRef {
            code: "ad0".into(),
            quantity: 1,
            since: t0(),
        },
    ];
    let e = resolve(&c, &s, &[], t0());
    assert_eq!(
        e.features["tier_name"].value,
        FeatureValue::Str("name0".into())
    );
    assert_eq!(
        e.features["tier_name"].sources[0].source,
        Source::Addon {
            code: "ad0".into(),
            quantity: 1
        }
    );
}

#[test]
fn provenance_and_since_are_reported() {
    let c = example();
    let mut s = sub("acme", "pro");
    s.addons = vec![AddonRef {
        code: "extra_seats_10".into(),
        quantity: 2,
        since: t0() + Duration::days(3),
    }];
    let o = grant(
        "g1",
        Change::ExtraUnits {
            metric: "api_calls".into(),
            amount: 10_000,
        },
        24,
        Some(72),
    );
    let e = resolve(&c, &s, std::slice::from_ref(&o), t0() + Duration::days(2));
    let seats = e.limit("seats", Window::None).unwrap();
    assert_eq!(seats.amount, 25 + 20);
    assert_eq!(seats.since, t0() + Duration::days(3));
    assert_eq!(seats.sources.len(), 2);
    let month = e.limit("api_calls", Window::Month).unwrap();
    assert_eq!(month.amount, 1_010_000);
    assert_eq!(
        month.sources.last().unwrap().source,
        Source::Override { id: "g1".into() }
    );
    assert_eq!(e.valid_until, Some(t0() + Duration::hours(72)));
    // After the grant expires, the limit is back by itself.
    let later = resolve(&c, &s, &[o], t0() + Duration::hours(72));
    assert_eq!(
        later.limit("api_calls", Window::Month).unwrap().amount,
        1_000_000
    );
    assert_eq!(
        later.features["advanced_analytics"].sources[0].source,
        Source::Plan {
            plan: "pro@1".into()
        }
    );
}

#[test]
fn trial_end_switches_to_post_trial_plan_or_cancels() {
    let c = example();
    let end = t0() + Duration::days(14);
    let mut s = sub("acme", "enterprise");
    s.status = Status::Trialing;
    s.trial_ends_at = Some(end);
    s.post_trial_plan = Some(PlanRef {
        code: "free".into(),
        version: 1,
    });
    let before = resolve(&c, &s, &[], end - Duration::seconds(1));
    assert_eq!(
        (before.plan.code.as_str(), before.status),
        ("enterprise", Status::Trialing)
    );
    assert_eq!(before.valid_until, Some(end));
    assert_eq!(before.features["sso"].value, FeatureValue::Bool(true));
    let after = resolve(&c, &s, &[], end);
    assert_eq!(
        (after.plan.code.as_str(), after.status),
        ("free", Status::Active)
    );
    assert_eq!((after.plan_since, after.status_since), (end, end));
    assert_eq!(after.features["sso"].value, FeatureValue::Bool(false));
    s.post_trial_plan = None;
    let lapsed = resolve(&c, &s, &[], end);
    assert_eq!(
        (lapsed.status, lapsed.access),
        (Status::Canceled, AccessLevel::None)
    );
}

#[test]
fn downgrade_waits_for_period_end_and_upgrade_is_immediate() {
    let c = example();
    let mut s = sub("acme", "pro");
    let now = t0() + Duration::days(10);
    s.change_plan(
        &c.status_machine(),
        PlanRef {
            code: "free".into(),
            version: 1,
        },
        ChangeTiming::PeriodEnd,
        now,
    );
    let end = t0() + Duration::days(31); // anchored 2026-03-01 → next period 2026-04-01
    assert_eq!(s.scheduled_change.as_ref().unwrap().at, end);
    assert_eq!(
        resolve(&c, &s, &[], end - Duration::seconds(1)).plan.code,
        "pro"
    );
    assert_eq!(
        resolve(&c, &s, &[], end - Duration::seconds(1)).valid_until,
        Some(end)
    );
    let after = resolve(&c, &s, &[], end);
    assert_eq!((after.plan.code.as_str(), after.plan_since), ("free", end));
    // An upgrade now replaces the pending downgrade.
    s.change_plan(
        &c.status_machine(),
        PlanRef {
            code: "enterprise".into(),
            version: 1,
        },
        ChangeTiming::Immediately,
        now,
    );
    assert!(s.scheduled_change.is_none());
    assert_eq!(
        resolve(&c, &s, &[], end + Duration::days(1)).plan.code,
        "enterprise"
    );
}

#[test]
fn cancel_at_period_end_keeps_access_until_then() {
    let c = example();
    let mut s = sub("acme", "pro");
    s.cancel(
        &c.status_machine(),
        ChangeTiming::PeriodEnd,
        t0() + Duration::days(1),
    )
    .unwrap();
    let end = t0() + Duration::days(31);
    assert_eq!(
        resolve(&c, &s, &[], end - Duration::seconds(1)).access,
        AccessLevel::Full
    );
    let after = resolve(&c, &s, &[], end);
    assert_eq!(
        (after.status, after.access),
        (Status::Canceled, AccessLevel::None)
    );
}

#[test]
fn disable_override_removes_a_metered_feature() {
    let c = example();
    let s = sub("acme", "pro");
    let o = grant(
        "off",
        Change::DisableFeature {
            feature: "api".into(),
        },
        -1,
        None,
    );
    let e = resolve(&c, &s, &[o], t0());
    assert!(!e.features["api"].enabled());
    assert!(!e.limits.contains_key("api_calls"));
}

#[test]
fn upgrade_hints_name_plans_and_addons_that_would_allow() {
    let c = example();
    let s = sub("acme", "free");
    let opts = upgrade_options(&c, &s, &[], t0(), &Need::Feature("advanced_analytics"));
    assert_eq!(
        opts,
        vec![
            UpgradeOption::Plan {
                code: "pro".into(),
                version: 1
            },
            UpgradeOption::Plan {
                code: "enterprise".into(),
                version: 1
            }
        ]
    );
    let totals = [(Window::None, 8)];
    let opts = upgrade_options(
        &c,
        &s,
        &[],
        t0(),
        &Need::Units {
            metric: "seats",
            amount: 1,
            totals: &totals,
        },
    );
    assert!(
        opts.contains(&UpgradeOption::Addon {
            code: "extra_seats_10".into()
        }),
        "{opts:?}"
    );
    assert!(
        opts.contains(&UpgradeOption::Plan {
            code: "pro".into(),
            version: 1
        }),
        "{opts:?}"
    );
    assert!(
        !opts
            .iter()
            .any(|o| matches!(o, UpgradeOption::Plan { code, .. } if code.starts_with("travel"))),
        "{opts:?}"
    );
    let pro = sub("acme", "pro");
    let sso = upgrade_options(&c, &pro, &[], t0(), &Need::Feature("sso"));
    assert_eq!(
        sso,
        vec![
            UpgradeOption::Plan {
                code: "enterprise".into(),
                version: 1
            },
            UpgradeOption::Addon { code: "sso".into() }
        ]
    );
}

proptest! {
    /// Around a trial end and a scheduled downgrade, the plan in force switches exactly at
    /// the instant, never before, and `valid_until` points at it.
    #[test]
    fn lifecycle_switches_exactly_at_its_instants(
        trial_days in 1i64..60,
        offset_s in -86_400i64..86_400,
        change_after_days in 0i64..200,
    ) {
        let c = example();
        let end = t0() + Duration::days(trial_days);
        let mut s = sub("acme", "enterprise");
        s.status = Status::Trialing;
        s.trial_ends_at = Some(end);
        s.post_trial_plan = Some(PlanRef { code: "pro".into(), version: 1 });
        let at = end + Duration::seconds(offset_s);
        let e = resolve(&c, &s, &[], at);
        if at < end {
            prop_assert_eq!((e.plan.code.as_str(), e.status), ("enterprise", Status::Trialing));
            prop_assert_eq!(e.valid_until, Some(end));
        } else {
            prop_assert_eq!((e.plan.code.as_str(), e.status), ("pro", Status::Active));
            prop_assert_eq!(e.plan_since, end);
        }

        // A downgrade requested at any later instant applies at that period's end.
        let mut s = sub("acme", "pro");
        let asked = t0() + Duration::days(change_after_days) + Duration::seconds(offset_s.abs());
        s.change_plan(&c.status_machine(), PlanRef { code: "free".into(), version: 1 }, ChangeTiming::PeriodEnd, asked);
        let at_change = s.scheduled_change.as_ref().unwrap().at;
        prop_assert!(at_change > asked);
        prop_assert!(at_change - asked <= Duration::days(31));
        prop_assert_eq!(meter::window::period_at(Window::BillingPeriod, asked, s.tz(), s.billing_anchor).end, Some(at_change));
        prop_assert_eq!(resolve(&c, &s, &[], at_change - Duration::nanoseconds(1)).plan.code, "pro");
        prop_assert_eq!(resolve(&c, &s, &[], at_change).plan.code, "free");
    }
}

#[test]
fn addons_stop_applying_on_a_plan_they_are_not_sold_on() {
    let c = example();
    let mut s = sub("acme", "pro");
    s.addons = vec![AddonRef {
        code: "sso".into(),
        quantity: 1,
        since: t0(),
    }];
    assert_eq!(
        resolve(&c, &s, &[], t0()).features["sso"].value,
        FeatureValue::Bool(true)
    );
    s.change_plan(
        &c.status_machine(),
        PlanRef {
            code: "free".into(),
            version: 1,
        },
        ChangeTiming::PeriodEnd,
        t0(),
    );
    let end = s.scheduled_change.as_ref().unwrap().at;
    assert_eq!(
        resolve(&c, &s, &[], end).features["sso"].value,
        FeatureValue::Bool(false)
    );
}
