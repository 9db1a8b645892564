//! In-process cost of deciding: resolving entitlements, and checking a request against
//! entitlements already resolved (the node's hot path, whose entitlements are cached).
//!
//! `cargo bench -p meter --bench resolve_check`
#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::hint::black_box;

use chrono::{TimeZone, Utc};
use criterion::{criterion_group, criterion_main, Criterion};
use meter::catalog::parse;
use meter::gcra::{Gcra, GcraState};
use meter::lifecycle::{AddonRef, PlanRef, Status, Subscription};
use meter::quota::{decide, plan_request, Demand, Intent, Planned};
use meter::resolve::resolve;
use meter::store::SlotUsage;

fn bench(c: &mut Criterion) {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/catalog.yaml"
    ))
    .unwrap();
    let catalog = parse(&text, "examples/catalog.yaml").unwrap();
    let t0 = Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap();
    let sub = Subscription {
        tenant: "acme".into(),
        plan: PlanRef {
            code: "pro".into(),
            version: 1,
        },
        plan_since: t0,
        addons: vec![AddonRef {
            code: "extra_seats_10".into(),
            quantity: 1,
            since: t0,
        }],
        status: Status::Active,
        status_since: t0,
        billing_anchor: t0,
        time_zone: "Europe/Paris".into(),
        trial_ends_at: None,
        post_trial_plan: None,
        scheduled_change: None,
        cancel_at: None,
    };
    let at = t0 + chrono::Duration::days(3);
    let dims = BTreeMap::new();
    let ent = resolve(&catalog, &sub, &[], at);

    c.bench_function("resolve", |b| {
        b.iter(|| resolve(black_box(&catalog), black_box(&sub), &[], at))
    });

    c.bench_function("check_feature_cached", |b| {
        b.iter(|| {
            black_box(&ent)
                .features
                .get(black_box("advanced_analytics"))
                .map(|g| g.enabled())
        })
    });

    // Plan and decide a 1-unit headroom check, as the node does for Check on a metric.
    let check = |ent: &meter::resolve::Entitlements| {
        let demand = Demand {
            metric: "api_calls",
            amount: 1,
            dimensions: &dims,
            intent: Intent::Check,
        };
        match plan_request(&catalog, ent, &demand, at).unwrap() {
            Planned::Plan(p) => decide(
                &p,
                &[SlotUsage {
                    used: 10,
                    reserved: 2,
                }],
                true,
            ),
            Planned::Decided(d) => d,
        }
    };

    c.bench_function("check_metric_cached", |b| b.iter(|| check(black_box(&ent))));

    c.bench_function("resolve_and_check_metric", |b| {
        b.iter(|| {
            let ent = resolve(&catalog, black_box(&sub), &[], at);
            check(&ent)
        })
    });

    let gcra = Gcra::new(100, std::time::Duration::from_secs(1), 200).unwrap();
    let mut state = GcraState::default();
    let mut now = 1_000_000_000u64;
    c.bench_function("gcra_take", |b| {
        b.iter(|| {
            now += 10_000_000;
            gcra.take(&mut state, now, 1)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
