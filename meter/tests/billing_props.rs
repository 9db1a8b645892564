//! Billing's overage rule: with one allowance it is max(0, used − included), it never
//! exceeds what was used, a larger allowance never bills more, and how usage is split
//! into events does not matter; priced overage costs its units times their prices.

use chrono::DateTime;
use meter::billing::{line, Billable, Price};
use proptest::prelude::*;

fn events(spec: &[(u16, Option<u16>)]) -> Vec<Billable> {
    spec.iter()
        .enumerate()
        .map(|(i, (amount, included))| Billable {
            at: DateTime::from_timestamp(i as i64, 0).unwrap(),
            id: format!("e{i:05}"),
            amount: u64::from(*amount),
            included: included.map(u64::from),
            unit_price: None,
        })
        .collect()
}

proptest! {
    #[test]
    fn one_allowance_bills_what_passes_it(amounts in proptest::collection::vec(0u16..500, 0..40), included in 0u16..5000) {
        let spec: Vec<_> = amounts.iter().map(|a| (*a, Some(included))).collect();
        let l = line(events(&spec));
        let used: u64 = amounts.iter().map(|a| u64::from(*a)).sum();
        prop_assert_eq!(l.used, used);
        prop_assert_eq!(l.overage, used.saturating_sub(u64::from(included)));
    }

    #[test]
    fn overage_is_bounded_and_monotone_in_the_allowance(
        spec in proptest::collection::vec((0u16..500, proptest::option::of(0u16..3000)), 0..40),
        raise in 0usize..40,
        by in 0u16..1000,
    ) {
        let l = line(events(&spec));
        prop_assert!(l.overage <= l.used);
        let mut more = spec.clone();
        if let Some(e) = more.get_mut(raise) {
            e.1 = e.1.map(|i| i.saturating_add(by));
        }
        prop_assert!(line(events(&more)).overage <= l.overage);
    }

    #[test]
    fn splitting_an_event_changes_nothing(
        spec in proptest::collection::vec((1u16..500, proptest::option::of(0u16..3000)), 1..30),
        at in 0usize..30,
        cut in 0u16..500,
    ) {
        let at = at % spec.len();
        let (amount, included) = spec[at];
        let cut = cut % (amount + 1);
        let mut split = spec.clone();
        split[at] = (cut, included);
        split.insert(at + 1, (amount - cut, included));
        prop_assert_eq!(line(events(&spec)).overage, line(events(&split)).overage);
    }

    #[test]
    fn the_amount_is_each_overage_unit_at_its_events_price(
        spec in proptest::collection::vec((0u16..500, proptest::option::of(0u16..3000), proptest::option::of(0u64..2_000_000)), 0..40),
    ) {
        let mut evs = events(&spec.iter().map(|(a, i, _)| (*a, *i)).collect::<Vec<_>>());
        for (e, (_, _, p)) in evs.iter_mut().zip(&spec) {
            e.unit_price = p.map(Price::from_micros);
        }
        let l = line(evs.clone());
        // Event by event, each one alone against the running total before it.
        let (mut used, mut amount, mut unpriced) = (0u64, 0u128, 0u64);
        for e in &evs {
            let before = line(evs.iter().take_while(|x| x.id != e.id).cloned().collect()).overage;
            let upto = line(evs.iter().take_while(|x| x.id <= e.id).cloned().collect()).overage;
            let over = upto - before;
            match e.unit_price {
                Some(p) => amount += u128::from(over) * u128::from(p.micros()),
                None => unpriced += over,
            }
            used += e.amount;
        }
        prop_assert_eq!(l.used, used);
        prop_assert_eq!(l.amount_micros, amount);
        prop_assert_eq!(l.unpriced, unpriced);
        prop_assert!(l.unpriced <= l.overage);
        let everything_priced = evs.iter().all(|e| e.unit_price.is_some());
        prop_assert!(!everything_priced || l.unpriced == 0);
    }
}
