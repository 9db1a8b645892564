//! The subscription state machine: only edges of the table are ever taken, refusals
//! change nothing, and steps that happen by themselves happen exactly at their instants.

mod common;

use chrono::{DateTime, Duration, Utc};
use common::t0;
use meter::catalog::parse;
use meter::ledger;
use meter::lifecycle::{PlanRef, ScheduledChange, Status, Subscription};
use meter::resolve::resolve;
use meter::status_machine::{allows, is_ended, Cause, StatusMachine, Step, Why};
use proptest::prelude::*;

fn plan(code: &str) -> PlanRef {
    PlanRef {
        code: code.into(),
        version: 1,
    }
}

fn status() -> impl Strategy<Value = Status> {
    prop::sample::select(Status::ALL.to_vec())
}

fn hours() -> impl Strategy<Value = Option<i64>> {
    prop::option::of(0i64..24 * 40)
}

/// A subscription in any status, with any mix of trial end, post-trial plan, scheduled
/// change and cancellation date, all within 40 days of `t0`.
fn subscription() -> impl Strategy<Value = Subscription> {
    (
        status(),
        hours(),
        any::<bool>(),
        hours(),
        hours(),
        0i64..24 * 5,
    )
        .prop_map(|(status, trial, post, change, cancel, since)| {
            let at = |h: i64| t0() + Duration::hours(h);
            let since = t0() - Duration::hours(since);
            Subscription {
                tenant: "acme".into(),
                plan: plan("trial"),
                plan_since: since,
                addons: vec![],
                status,
                status_since: since,
                billing_anchor: since,
                time_zone: "UTC".into(),
                trial_ends_at: trial.map(at),
                post_trial_plan: post.then(|| plan("pro")),
                scheduled_change: change.map(|h| ScheduledChange {
                    at: at(h),
                    plan: plan("free"),
                }),
                // A machine never leaves a cancellation date on refunded or chargeback.
                cancel_at: cancel
                    .map(at)
                    .filter(|_| !matches!(status, Status::Refunded | Status::Chargeback)),
            }
        })
}

#[derive(Debug, Clone)]
enum Op {
    /// Ask for a status after this many minutes.
    Transition(Status, i64),
    /// Let this many minutes pass and take what is due.
    Advance(i64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (status(), 0i64..60 * 24 * 6).prop_map(|(s, m)| Op::Transition(s, m)),
        (0i64..60 * 24 * 6).prop_map(Op::Advance),
    ]
}

/// Steps follow each other from `start`, each an allowed edge (or a plan change that
/// keeps the status), in time order, none later than `now`.
fn check_chain(start: Status, steps: &[Step], now: DateTime<Utc>) -> Result<Status, TestCaseError> {
    let mut status = start;
    let mut last: Option<DateTime<Utc>> = None;
    for s in steps {
        prop_assert_eq!(s.from, status, "steps chain: {:?}", steps);
        if s.from == s.to {
            prop_assert!(
                s.plan.is_some(),
                "a step that keeps the status changes the plan: {:?}",
                s
            );
        } else {
            prop_assert!(allows(s.from, s.to), "illegal edge taken: {:?}", s);
        }
        prop_assert!(s.at <= now, "a step after its call: {:?}", s);
        prop_assert!(
            last.is_none_or(|l| l <= s.at),
            "steps out of time order: {:?}",
            steps
        );
        last = Some(s.at);
        status = s.to;
    }
    Ok(status)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever is asked, in whatever order: every step taken is an edge of the table,
    /// a refused step changes nothing and says truthfully why, and an accepted one ends
    /// in the status asked for.
    #[test]
    fn no_sequence_takes_an_illegal_edge(
        start in subscription(),
        ops in prop::collection::vec(op(), 1..25),
        grace_days in 0u32..10,
    ) {
        let m = StatusMachine::new(grace_days);
        let mut sub = start;
        let mut now = sub.status_since;
        for op in ops {
            let before = sub.clone();
            match op {
                Op::Advance(min) => {
                    now += Duration::minutes(min);
                    let steps = m.advance(&mut sub, now);
                    let end = check_chain(before.status, &steps, now)?;
                    prop_assert_eq!(end, sub.status);
                    prop_assert!(steps.iter().all(|s| s.cause != Cause::Requested));
                    prop_assert!(m.next_due(&sub).is_none_or(|d| d.at > now), "something due is left");
                }
                Op::Transition(to, min) => {
                    now += Duration::minutes(min);
                    match m.transition(&mut sub, to, now) {
                        Ok(steps) => {
                            let end = check_chain(before.status, &steps, now)?;
                            prop_assert_eq!(end, to);
                            prop_assert_eq!(sub.status, to);
                            prop_assert!(steps.iter().filter(|s| s.cause == Cause::Requested).count() <= 1);
                            if is_ended(to) && to != Status::Canceled {
                                prop_assert_eq!(sub.cancel_at, None);
                            }
                        }
                        Err(e) => {
                            prop_assert_eq!(&sub, &before, "a refusal changed the subscription");
                            prop_assert_eq!(e.to, to);
                            prop_assert_eq!(e.from, m.state_at(&before, now).status);
                            match e.why {
                                Why::NoEdge => prop_assert!(!allows(e.from, to)),
                                Why::NoTrialEnd => prop_assert_eq!(to, Status::Trialing),
                                Why::Backdated { .. } | Why::Unreachable => {
                                    return Err(TestCaseError::fail(format!("not produced by transition: {e}")))
                                }
                            }
                            let names = format!("{} → {}", e.from.as_str(), to.as_str());
                            prop_assert!(e.to_string().starts_with(&names), "{e}");
                        }
                    }
                }
            }
        }
    }

    /// The next due step happens exactly at its instant: not a nanosecond before, and at
    /// the instant itself, both through `state_at` and `advance`.
    #[test]
    fn time_driven_steps_happen_exactly_at_their_instants(
        sub in subscription(),
        grace_days in 0u32..10,
    ) {
        let m = StatusMachine::new(grace_days);
        let mut sub = sub;
        // Start from a settled subscription, as a node would hold it.
        let since = sub.status_since;
        m.advance(&mut sub, since);
        let Some(due) = m.next_due(&sub) else { return Ok(()) };
        let just_before = due.at - Duration::nanoseconds(1);

        let early = m.state_at(&sub, just_before);
        prop_assert_eq!(early.next_change, Some(due.at));
        prop_assert_eq!((early.status, &early.plan), (sub.status, &sub.plan));
        let on_time = m.state_at(&sub, due.at);
        prop_assert!(
            (on_time.status, &on_time.plan) != (early.status, &early.plan)
                || on_time.plan_since == due.at,
            "nothing changed at {}: {:?}", due.at, due.cause
        );

        let mut a = sub.clone();
        prop_assert!(m.advance(&mut a, just_before).is_empty());
        prop_assert_eq!(&a, &sub);
        let steps = m.advance(&mut a, due.at);
        prop_assert!(!steps.is_empty());
        prop_assert!(steps.iter().all(|s| s.at == due.at));
        prop_assert_eq!(steps[0].cause, due.cause);
        if due.cause == Cause::GraceEnd {
            prop_assert_eq!(due.at, sub.status_since + Duration::days(i64::from(grace_days)));
            prop_assert_eq!(steps[0].to, Status::Suspended);
        }
    }

    /// The machine is the one rule of time: resolution (through the catalog's
    /// `grace_days`) and the ledger's time-driven entries say what it says, for every
    /// subscription, grace and a trial canceled before its end included.
    #[test]
    fn resolution_and_ledger_follow_the_machine(
        sub in subscription(),
        at_h in 0i64..24 * 45,
        grace_days in 1u32..10,
    ) {
        let catalog = parse(&format!(
            "version: 1\ngrace_days: {grace_days}\nmetrics:\n  calls: {{ unit: call }}\nplans:\n  free:\n    versions:\n      1:\n        limits:\n          calls: [{{ window: month, amount: 5 }}]\n"
        ), "props").unwrap();
        let m = catalog.status_machine();
        prop_assert_eq!(m, StatusMachine::new(grace_days));
        let at = t0() + Duration::hours(at_h);
        let ours = m.state_at(&sub, at);
        let e = resolve(&catalog, &sub, &[], at);
        prop_assert_eq!(
            (&e.plan, e.plan_since, e.status, e.status_since, e.valid_until),
            (&ours.plan, ours.plan_since, ours.status, ours.status_since, ours.next_change)
        );

        // The ledger, from before anything was due up to `at`: its last entry holds what
        // is in force at `at`.
        let entries = ledger::due(&m, &sub, &[], t0() - Duration::days(10), at);
        if let Some(last) = entries.last() {
            prop_assert_eq!(&last.after, &ledger::snapshot(&ours));
        }

        // The old bug: a trial canceled before its end came back as active on the
        // post-trial plan at the trial end.
        if let (Status::Trialing, Some(c), Some(t)) = (sub.status, sub.cancel_at, sub.trial_ends_at) {
            if c < t && at >= c {
                prop_assert_eq!(e.status, Status::Canceled);
                prop_assert!(entries.iter().all(|x| x.action != "trial.ended"), "{:?}", entries);
            }
        }
    }
}
