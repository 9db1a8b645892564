//! Fixtures shared by meter's integration tests.
#![allow(dead_code)]

use chrono::{DateTime, TimeZone, Utc};
use meter::catalog::{parse, Catalog};
use meter::lifecycle::{PlanRef, Status, Subscription};

/// 2026-03-01 12:00 UTC.
pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
}

/// The shipped example catalog.
pub fn example() -> Catalog {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/catalog.yaml"
    ))
    .unwrap();
    parse(&text, "examples/catalog.yaml").unwrap_or_else(|e| panic!("{e}"))
}

/// An active subscription of `tenant` on `plan@1` since `t0`, anchored at `t0`.
pub fn sub(tenant: &str, plan: &str) -> Subscription {
    Subscription {
        tenant: tenant.into(),
        plan: PlanRef {
            code: plan.into(),
            version: 1,
        },
        plan_since: t0(),
        addons: vec![],
        status: Status::Active,
        status_since: t0(),
        billing_anchor: t0(),
        time_zone: "UTC".into(),
        trial_ends_at: None,
        post_trial_plan: None,
        scheduled_change: None,
        cancel_at: None,
    }
}
