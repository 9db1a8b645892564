//! Overage: how many of a period's units went past what was included.
//!
//! The rule, for a tenant × metric × period: **the entitlement in force at each event**.
//! Usage events are taken in time order (ties by event id), each against the included
//! amount it was decided under (its event's `included`: the tenant's resolved
//! billing-period or month limit at that instant, add-ons and overrides in). An event
//! is overage for the part of it that takes the period's running total past its own
//! included amount. So an upgrade mid-period raises the allowance from then on, and a
//! downgrade lowers it from then on, without anything being billed twice or re-billed
//! backwards; with no plan change it is simply `max(0, used − included)`. Proration by
//! days is not used: it would bill usage against allowances that were not in force
//! when it happened.

use chrono::{DateTime, Utc};

/// One usage event as billing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Billable {
    /// When it happened.
    pub at: DateTime<Utc>,
    /// Its id (orders events of the same instant).
    pub id: String,
    /// Units used (positive).
    pub amount: u64,
    /// The included amount in force for it; `None`: unlimited.
    pub included: Option<u64>,
}

/// A period's line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Line {
    /// Units used.
    pub used: u64,
    /// The included amount in force at the last event (`None`: unlimited).
    pub included: Option<u64>,
    /// Units past what was included, event by event.
    pub overage: u64,
}

/// The period's line from its usage events, in any order.
pub fn line(mut events: Vec<Billable>) -> Line {
    events.sort_by(|a, b| a.at.cmp(&b.at).then_with(|| a.id.cmp(&b.id)));
    let mut out = Line::default();
    for e in &events {
        if let Some(i) = e.included {
            let room = i.saturating_sub(out.used);
            out.overage = out.overage.saturating_add(e.amount.saturating_sub(room));
        }
        out.used = out.used.saturating_add(e.amount);
        out.included = e.included;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(sec: i64, amount: u64, included: Option<u64>) -> Billable {
        Billable {
            at: DateTime::from_timestamp(sec, 0).unwrap(),
            id: format!("e{sec}"),
            amount,
            included,
        }
    }

    #[test]
    fn plan_changes_move_the_allowance_from_then_on() {
        // 800 on a plan with 1,000, then an upgrade to 5,000 and 3,000 more: none over.
        let l = line(vec![ev(2, 3000, Some(5000)), ev(1, 800, Some(1000))]);
        assert_eq!(
            l,
            Line {
                used: 3800,
                included: Some(5000),
                overage: 0
            }
        );
        // 3,000 on 5,000, then a downgrade to 1,000: everything after is over.
        let l = line(vec![ev(1, 3000, Some(5000)), ev(2, 400, Some(1000))]);
        assert_eq!(l.overage, 400);
        // An event that crosses its allowance is over for the part past it.
        let l = line(vec![ev(1, 900, Some(1000)), ev(2, 300, Some(1000))]);
        assert_eq!(l.overage, 200);
        // Unlimited events are never over, but they use the allowance of later ones.
        let l = line(vec![ev(1, 900, None), ev(2, 300, Some(1000))]);
        assert_eq!(l.overage, 200);
        assert_eq!(line(vec![]), Line::default());
    }
}
