//! Properties of `meter::gcra`: the admission bound, liveness, and
//! robustness at extreme values; the fleet bound of node shares (`scope: node`).

use std::time::Duration;

use meter::gcra::{Gcra, GcraError, GcraOutcome, GcraState, GLOBAL_EXACT_MAX};
use proptest::prelude::*;

const MS: u64 = 1_000_000;

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap()
}

/// The most units a limit may admit from an empty bucket over `elapsed_ns`:
/// `burst + floor(rate × elapsed / period)`. It is floor, not ceil: a unit
/// is admitted only once its whole emission interval has elapsed.
fn bound(g: &Gcra, elapsed_ns: u64) -> u128 {
    let earned = u128::from(g.rate()) * u128::from(elapsed_ns) / g.period().as_nanos();
    u128::from(g.burst()) + earned
}

fn limit() -> impl Strategy<Value = Gcra> {
    (1u64..=1000, MS..=60_000 * MS, 1u64..=1000).prop_map(|(rate, period, burst)| {
        Gcra::new(rate, Duration::from_nanos(period), burst).unwrap()
    })
}

/// A limit with a sequence of (delta_ns, n) steps. Deltas are spread over
/// a fraction of the emission interval up to several periods, and `n` runs
/// slightly past the burst so that `TooLarge` is exercised too.
fn scenario() -> impl Strategy<Value = (Gcra, u64, Vec<(u64, u64)>)> {
    limit().prop_flat_map(|g| {
        let period = nanos(g.period());
        let step = (
            prop_oneof![0..=period / g.rate(), 0..=3 * period],
            0..=g.burst() + 1,
        );
        (Just(g), 0..u64::MAX / 4, prop::collection::vec(step, 1..40))
    })
}

/// The most units `nodes` nodes, each running [`Gcra::per_node`] of `g`, admit
/// together over `elapsed_ns` from the first admission on any of them:
/// `floor(rate × elapsed / period) + nodes × ceil(burst / nodes)`.
fn fleet_bound(g: &Gcra, nodes: u64, elapsed_ns: u64) -> u128 {
    let earned = u128::from(g.rate()) * u128::from(elapsed_ns) / g.period().as_nanos();
    earned + u128::from(nodes) * u128::from(g.burst().div_ceil(nodes))
}

/// A limit, a number of nodes, and a schedule of (delta_ns, node, n) steps that hits
/// the nodes in any order, `n` running past the share's burst.
fn fleet_scenario() -> impl Strategy<Value = (Gcra, usize, u64, Vec<(u64, usize, u64)>)> {
    (limit(), 1usize..=8).prop_flat_map(|(g, nodes)| {
        let share = g.per_node(nodes);
        let period = nanos(share.period());
        // Simultaneous steps and whole-burst takes are weighted up: that is where a
        // share too large would show.
        let step = (
            prop_oneof![
                2 => Just(0),
                2 => 0..=period / share.rate(),
                1 => 0..=3 * period,
            ],
            0..nodes,
            prop_oneof![Just(share.burst()), 0..=share.burst() + 1],
        );
        (
            Just(g),
            Just(nodes),
            0..u64::MAX / 4,
            prop::collection::vec(step, 1..80),
        )
    })
}

proptest! {
    #[test]
    fn node_shares_never_exceed_the_fleet_bound((g, nodes, start, steps) in fleet_scenario()) {
        let share = g.per_node(nodes);
        let mut states = vec![GcraState::default(); nodes];
        let mut now = start;
        let mut admitted: u128 = 0;
        let mut first: Option<u64> = None;
        for (delta, node, n) in steps {
            now += delta;
            if share.take(&mut states[node], now, n).is_allowed() && n > 0 {
                let t0 = *first.get_or_insert(now);
                admitted += u128::from(n);
                let bound = fleet_bound(&g, nodes as u64, now - t0);
                prop_assert!(admitted <= bound, "{:?} on {} nodes admitted {} by {}", g, nodes, admitted, now - t0);
            }
        }
    }

    #[test]
    fn greedy_nodes_reach_their_share_of_the_bound((g, nodes, start, steps) in fleet_scenario()) {
        // Every node taking all it can at every step admits exactly the sum of the
        // single-bucket bounds of its share: rounding loses nothing, and the fleet bound
        // is that sum's upper bound.
        let share = g.per_node(nodes);
        let max_wait = (share.burst() - 1) * nanos(share.period()) / share.rate();
        let mut states = vec![GcraState::default(); nodes];
        let mut now = start;
        let mut admitted: u128 = 0;
        for (i, (delta, _, _)) in steps.into_iter().take(20).enumerate() {
            if i > 0 {
                now += delta.min(max_wait);
            }
            for s in &mut states {
                while share.take(s, now, 1).is_allowed() {
                    admitted += 1;
                }
            }
            let per_node = bound(&share, now - start);
            prop_assert_eq!(admitted, per_node * nodes as u128);
            prop_assert!(admitted <= fleet_bound(&g, nodes as u64, now - start));
        }
    }

    #[test]
    fn admitted_units_never_exceed_bound((g, start, steps) in scenario()) {
        let mut state = GcraState::default();
        let mut now = start;
        let mut admitted: u128 = 0;
        let mut first: Option<u64> = None;
        for (delta, n) in steps {
            now += delta;
            if g.take(&mut state, now, n).is_allowed() && n > 0 {
                let t0 = *first.get_or_insert(now);
                admitted += u128::from(n);
                prop_assert!(admitted <= bound(&g, now - t0), "{:?} admitted {} by {}", g, admitted, now - t0);
            }
        }
    }

    #[test]
    fn greedy_taker_reaches_bound_exactly((g, start, mut steps) in scenario()) {
        // Taking one unit at a time until denied admits exactly the bound,
        // so floor is the true bound and the limiter loses nothing to rounding.
        // It only holds while the taker never lets the bucket refill
        // completely, i.e. it waits at most (burst - 1) emission intervals.
        steps.truncate(usize::try_from(20_000 / g.rate()).unwrap().max(1));
        let max_wait = (g.burst() - 1) * nanos(g.period()) / g.rate();
        let mut state = GcraState::default();
        let mut now = start;
        let mut admitted: u128 = 0;
        for (i, (delta, _)) in steps.into_iter().enumerate() {
            if i > 0 {
                now += delta.min(max_wait);
            }
            while g.take(&mut state, now, 1).is_allowed() {
                admitted += 1;
            }
            prop_assert_eq!(admitted, bound(&g, now - start));
        }
    }

    #[test]
    fn remaining_is_exactly_what_can_be_taken((g, start, steps) in scenario()) {
        let mut state = GcraState::default();
        let mut now = start;
        for (delta, n) in steps {
            now += delta;
            let remaining = match g.take(&mut state, now, n) {
                GcraOutcome::Allowed { remaining, .. } | GcraOutcome::Denied { remaining, .. } => remaining,
                GcraOutcome::TooLarge => continue,
            };
            prop_assert!(remaining <= g.burst());
            prop_assert!(g.peek(&state, now, remaining).is_allowed());
            if remaining < g.burst() {
                let more = g.peek(&state, now, remaining + 1);
                prop_assert!(!more.is_allowed(), "{:?}", more);
            }
        }
    }

    #[test]
    fn peek_answers_like_take_without_mutating((g, start, steps) in scenario()) {
        let mut state = GcraState::default();
        let mut now = start;
        for (delta, n) in steps {
            now += delta;
            let before = state;
            let peeked = g.peek(&state, now, n);
            prop_assert_eq!(state, before);
            let taken = g.take(&mut state, now, n);
            prop_assert_eq!(peeked, taken);
            if !taken.is_allowed() || n == 0 {
                prop_assert_eq!(state, before);
            }
        }
    }

    #[test]
    fn retry_after_is_the_shortest_sufficient_wait((g, start, steps) in scenario()) {
        let mut state = GcraState::default();
        let mut now = start;
        for (delta, n) in steps {
            now += delta;
            if let GcraOutcome::Denied { retry_after, .. } = g.take(&mut state, now, n) {
                let wait = nanos(retry_after);
                prop_assert!(wait > 0);
                prop_assert!(g.peek(&state, now + wait, n).is_allowed());
                let early = g.peek(&state, now + wait - 1, n);
                prop_assert!(!early.is_allowed(), "{:?}", early);
            }
        }
    }

    #[test]
    fn reset_after_refills_the_bucket((g, start, steps) in scenario()) {
        let mut state = GcraState::default();
        let mut now = start;
        for (delta, n) in steps {
            now += delta;
            if let GcraOutcome::Allowed { reset_after, .. } = g.take(&mut state, now, n) {
                let reset = now + nanos(reset_after);
                prop_assert_eq!(remaining_now(&g, &state, reset), g.burst());
                if !reset_after.is_zero() {
                    prop_assert!(remaining_now(&g, &state, reset - 1) < g.burst());
                }
            }
        }
    }

    #[test]
    fn refunds_restore_units_up_to_the_burst(
        (g, start, steps) in scenario(),
        refunds in prop::collection::vec(0u64..1200, 40),
    ) {
        let mut state = GcraState::default();
        let mut now = start;
        let mut net: u128 = 0;
        let mut first: Option<u64> = None;
        for ((delta, n), refund) in steps.into_iter().zip(refunds) {
            now += delta;
            if g.take(&mut state, now, n).is_allowed() && n > 0 {
                let t0 = *first.get_or_insert(now);
                net += u128::from(n);
                prop_assert!(net <= bound(&g, now - t0));
            }
            let refund = refund.min(u64::try_from(net).unwrap());
            let before = remaining_now(&g, &state, now);
            g.refund(&mut state, now, refund);
            net -= u128::from(refund);
            let after = remaining_now(&g, &state, now);
            prop_assert_eq!(after, (before + refund).min(g.burst()));
        }
    }

    #[test]
    fn refund_right_after_take_undoes_it((g, start, steps) in scenario()) {
        let mut state = GcraState::default();
        let mut now = start;
        for (delta, n) in steps {
            now += delta;
            let before = state;
            if g.take(&mut state, now, n).is_allowed() {
                g.refund(&mut state, now, n);
                for probe in [0, 1, g.burst()] {
                    prop_assert_eq!(g.peek(&state, now, probe), g.peek(&before, now, probe));
                }
            }
        }
    }

    #[test]
    fn more_than_burst_is_too_large((g, start, steps) in scenario(), extra in 1u64..=u64::MAX / 2) {
        let mut state = GcraState::default();
        let mut now = start;
        for (delta, n) in steps {
            now += delta;
            g.take(&mut state, now, n);
            let before = state;
            prop_assert_eq!(g.take(&mut state, now, g.burst() + extra), GcraOutcome::TooLarge);
            prop_assert_eq!(g.peek(&state, now, g.burst() + extra), GcraOutcome::TooLarge);
            prop_assert_eq!(state, before);
        }
    }

    #[test]
    fn zero_units_are_always_allowed_and_free((g, start, steps) in scenario()) {
        let mut state = GcraState::default();
        let mut now = start;
        for (delta, n) in steps {
            now += delta;
            g.take(&mut state, now, n);
            let before = state;
            prop_assert!(g.take(&mut state, now, 0).is_allowed());
            prop_assert_eq!(state, before);
        }
    }

    #[test]
    fn extreme_values_do_not_panic(
        rate in prop_oneof![Just(u64::MAX), Just(1u64), any::<u64>().prop_map(|r| r.max(1))],
        period_secs in prop_oneof![Just(u64::MAX), Just(0u64), any::<u64>()],
        period_nanos in 0u32..1_000_000_000,
        burst in prop_oneof![Just(u64::MAX), Just(1u64), any::<u64>().prop_map(|b| b.max(1))],
        ops in prop::collection::vec((prop_oneof![Just(u64::MAX), Just(0u64), any::<u64>()], any::<u64>(), 0u8..3), 1..20),
    ) {
        let period = Duration::new(period_secs, period_nanos);
        prop_assume!(!period.is_zero());
        let g = Gcra::new(rate, period, burst).unwrap();
        let mut state = GcraState::default();
        for (now, n, op) in ops {
            match op {
                0 => { g.take(&mut state, now, n); }
                1 => { g.peek(&state, now, n); }
                _ => g.refund(&mut state, now, n),
            }
        }
    }
}

/// Whole units takeable at `now`, as reported by a zero-unit peek.
fn remaining_now(g: &Gcra, state: &GcraState, now: u64) -> u64 {
    match g.peek(state, now, 0) {
        GcraOutcome::Allowed { remaining, .. } => remaining,
        other => panic!("zero units must be allowed, got {other:?}"),
    }
}

#[test]
fn invalid_limits_are_rejected_naming_the_field() {
    let second = Duration::from_secs(1);
    assert_eq!(Gcra::new(0, second, 1), Err(GcraError::ZeroRate));
    assert_eq!(Gcra::new(1, Duration::ZERO, 1), Err(GcraError::ZeroPeriod));
    assert_eq!(Gcra::new(1, second, 0), Err(GcraError::ZeroBurst));
    assert!(GcraError::ZeroRate.to_string().contains("rate"));
    assert!(GcraError::ZeroPeriod.to_string().contains("period"));
    assert!(GcraError::ZeroBurst.to_string().contains("burst"));
    let g = Gcra::new(10, second, 5).unwrap();
    assert_eq!((g.rate(), g.period(), g.burst()), (10, second, 5));
}

#[test]
fn burst_then_steady_rate() {
    // 10 per second, bursting 5: the emission interval is 100 ms.
    let g = Gcra::new(10, Duration::from_secs(1), 5).unwrap();
    let mut s = GcraState::default();
    let t0 = 1_000 * MS;
    for left in (0..5).rev() {
        let GcraOutcome::Allowed { remaining, .. } = g.take(&mut s, t0, 1) else {
            panic!("burst should be allowed");
        };
        assert_eq!(remaining, left);
    }
    assert_eq!(
        g.take(&mut s, t0, 1),
        GcraOutcome::Denied {
            remaining: 0,
            retry_after: Duration::from_millis(100)
        }
    );
    assert_eq!(
        g.take(&mut s, t0 + 100 * MS, 1),
        GcraOutcome::Allowed {
            remaining: 0,
            reset_after: Duration::from_millis(500)
        }
    );
    assert_eq!(
        g.take(&mut s, t0 + 100 * MS, 3),
        GcraOutcome::Denied {
            remaining: 0,
            retry_after: Duration::from_millis(300)
        }
    );
    assert_eq!(g.take(&mut s, t0 + 100 * MS, 6), GcraOutcome::TooLarge);
}

#[test]
fn fractional_emission_interval_is_exact() {
    // 3 per second: the interval is 333_333_333.3 ns, which no integer
    // nanosecond count represents. Rounding it either way would drift.
    let g = Gcra::new(3, Duration::from_secs(1), 3).unwrap();
    let mut s = GcraState::default();
    assert!(g.take(&mut s, 0, 3).is_allowed());
    // The k-th unit after the burst is due at exactly k/3 s.
    for due in [333_333_334, 666_666_667, 1_000_000_000, 1_333_333_334] {
        assert_eq!(
            g.take(&mut s, due - 1, 1),
            GcraOutcome::Denied {
                remaining: 0,
                retry_after: Duration::from_nanos(1)
            }
        );
        assert!(g.take(&mut s, due, 1).is_allowed());
    }
    // A day of polling every 100 ms admits exactly the bound.
    let day = 86_400_000 * MS;
    let mut s = GcraState::default();
    let mut admitted = 0u64;
    for t in (0..=day).step_by(100 * MS as usize) {
        admitted += u64::from(g.take(&mut s, t, 1).is_allowed());
    }
    assert_eq!(u128::from(admitted), bound(&g, day));
}

#[test]
fn refund_never_overfills() {
    let g = Gcra::new(1, Duration::from_secs(1), 3).unwrap();
    let mut s = GcraState::default();
    assert!(g.take(&mut s, 0, 2).is_allowed());
    g.refund(&mut s, 0, 10);
    assert_eq!(remaining_now(&g, &s, 0), 3);
    assert!(g.take(&mut s, 0, 3).is_allowed());
    assert!(!g.take(&mut s, 0, 1).is_allowed());
    // A refund on a full bucket changes nothing.
    let mut full = GcraState::default();
    g.refund(&mut full, 5_000 * MS, 1);
    assert_eq!(full, GcraState::default());
    // The bucket is full as of the refund, not earlier: a caller whose
    // clock reads a little behind (another replica) gains nothing from it.
    let mut s = GcraState::default();
    assert!(g.take(&mut s, 5_000 * MS, 2).is_allowed());
    g.refund(&mut s, 5_000 * MS, 10);
    assert_eq!(remaining_now(&g, &s, 5_000 * MS), 3);
    assert_eq!(remaining_now(&g, &s, 4_000 * MS), 2);
}

#[test]
fn state_round_trips_through_raw() {
    let g = Gcra::new(7, Duration::from_secs(60), 4).unwrap();
    let mut s = GcraState::default();
    g.take(&mut s, 123 * MS, 3);
    assert_eq!(GcraState::from_raw(s.to_raw()), s);
}

#[test]
fn extreme_values_are_exact_or_fail_closed() {
    let g = Gcra::new(1, Duration::from_nanos(1), 1).unwrap();
    let mut s = GcraState::default();
    assert!(g.take(&mut s, u64::MAX, 1).is_allowed());
    assert_eq!(
        g.take(&mut s, u64::MAX, 1),
        GcraOutcome::Denied {
            remaining: 0,
            retry_after: Duration::from_nanos(1)
        }
    );
    // Nanoseconds × rate is just below 2^128 here, so the clock has no room
    // for a whole burst: that take is denied rather than miscounted.
    let g = Gcra::new(u64::MAX, Duration::from_secs(1), u64::MAX).unwrap();
    let mut s = GcraState::default();
    assert_eq!(
        g.take(&mut s, u64::MAX, u64::MAX),
        GcraOutcome::Denied {
            remaining: u64::MAX,
            retry_after: Duration::MAX
        }
    );
    assert_eq!(s, GcraState::default());
    assert!(g.take(&mut s, u64::MAX, 1_000).is_allowed());
    assert_eq!(remaining_now(&g, &s, u64::MAX), u64::MAX - 1_000);
}

#[test]
fn node_share_keeps_the_rate_and_divides_period_and_burst() {
    let g = Gcra::new(10, Duration::from_secs(1), 5).unwrap();
    assert_eq!(g.per_node(0), g);
    assert_eq!(g.per_node(1), g);
    let two = g.per_node(2);
    assert_eq!(
        (two.rate(), two.period(), two.burst()),
        (10, Duration::from_secs(2), 3)
    );
    // More nodes than burst: each still gets one unit.
    let many = g.per_node(7);
    assert_eq!((many.period(), many.burst()), (Duration::from_secs(7), 1));
    // Three nodes at one instant admit 3 × ceil(5 / 3) = 6, then 10/s between them.
    let three = g.per_node(3);
    let mut states = [GcraState::default(); 3];
    let t0 = 1_000 * MS;
    let mut admitted = 0;
    for s in &mut states {
        while three.take(s, t0, 1).is_allowed() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 6);
    // Each share earns a unit every 300 ms.
    for s in &mut states {
        assert!(!three.take(s, t0 + 300 * MS - 1, 1).is_allowed());
        assert!(three.take(s, t0 + 300 * MS, 1).is_allowed());
    }
    // Periods past Duration::MAX saturate (slower, never faster).
    let huge = Gcra::new(1, Duration::MAX, 1).unwrap().per_node(2);
    assert_eq!(huge.period(), Duration::MAX);
}

#[test]
fn a_share_rescales_when_the_node_count_changes() {
    // A node emptied its whole bucket; a second node joins. Its share is emptied too,
    // and full again at the same instant as before.
    let g = Gcra::new(10, Duration::from_secs(1), 10).unwrap();
    let mut s = GcraState::default();
    let t0 = 5_000 * MS;
    assert!(g.take(&mut s, t0, 10).is_allowed());
    let half = g.per_node(2);
    let moved = s.rescaled(&g, &half);
    assert_eq!(remaining_now(&half, &moved, t0), 0);
    assert_eq!(remaining_now(&half, &moved, t0 + 500 * MS), 2);
    assert_eq!(remaining_now(&half, &moved, t0 + 1_000 * MS), 5);
}

#[test]
fn global_buckets_are_clamped_into_the_exact_range() {
    let minute = Duration::from_secs(60);
    let fine = Gcra::new(1_000, minute, 37_529_996).unwrap();
    assert!(fine.global_exact());
    assert_eq!(fine.clamped_for_global(), fine);
    let big = Gcra::new(u64::MAX, minute, u64::MAX).unwrap();
    assert!(!big.global_exact());
    let c = big.clamped_for_global();
    assert!(c.global_exact());
    assert_eq!(u128::from(c.rate()), GLOBAL_EXACT_MAX);
    assert_eq!(c.burst(), 37_529_996);
    assert!(c.rate() <= big.rate() && c.burst() <= big.burst());
}
