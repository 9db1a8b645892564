//! Overage: how many of a period's units went past what was included, and what they cost.
//!
//! The rule, for a tenant × metric × period: **the entitlement in force at each event**.
//! Usage events are taken in time order (ties by their order key), each against the included
//! amount it was decided under (its event's `included`: the tenant's resolved
//! billing-period or month limit at that instant, add-ons and overrides in). An event
//! is overage for the part of it that takes the period's running total past its own
//! included amount. So an upgrade mid-period raises the allowance from then on, and a
//! downgrade lowers it from then on, without anything being billed twice or re-billed
//! backwards; with no plan change it is simply `max(0, used − included)`. Proration by
//! days is not used: it would bill usage against allowances that were not in force
//! when it happened.
//!
//! Each overage unit is priced at the unit price of the plan version its event was
//! decided under ([`crate::catalog::LimitDef::unit_price`]), so a price change (a new
//! plan version) also acts from then on.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Decimal places a price may have: amounts are kept in millionths of the currency.
pub const PRICE_DECIMALS: u32 = 6;
const MICROS: u64 = 10u64.pow(PRICE_DECIMALS);
/// The largest unit price, in whole currency units (so that prices stay exact in `u64`
/// millionths with room to multiply).
pub const MAX_PRICE_UNITS: u64 = 1_000_000;

/// A price per unit, exact: millionths of the catalog's currency. Written in files as a
/// decimal string (`"0.002"`), never a float, so no price is ever rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Price(u64);

impl Price {
    /// The price from millionths of the currency.
    pub fn from_micros(micros: u64) -> Price {
        Price(micros)
    }

    /// Millionths of the currency.
    pub fn micros(self) -> u64 {
        self.0
    }
}

/// Why a price does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PriceError(String);

impl FromStr for Price {
    type Err = PriceError;

    fn from_str(s: &str) -> Result<Price, PriceError> {
        let bad = |why: &str| PriceError(format!("{s:?} is not a price: {why}"));
        let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
        let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(whole) || (s.contains('.') && !digits(frac)) {
            return Err(bad("write a non-negative decimal such as 0.002"));
        }
        if frac.len() > PRICE_DECIMALS as usize {
            return Err(bad(&format!("at most {PRICE_DECIMALS} decimal places")));
        }
        let units: u64 = whole
            .parse()
            .ok()
            .filter(|u| *u <= MAX_PRICE_UNITS)
            .ok_or_else(|| bad(&format!("at most {MAX_PRICE_UNITS} per unit")))?;
        let scale = 10u64.pow(PRICE_DECIMALS - frac.len() as u32);
        let frac: u64 = if frac.is_empty() {
            0
        } else {
            frac.parse().unwrap_or(0)
        };
        Ok(Price(units * MICROS + frac * scale))
    }
}

impl fmt::Display for Price {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&decimal(u128::from(self.0)))
    }
}

impl Serialize for Price {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Price {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Price, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Millionths of a currency as a decimal, with at least two decimal places and no
/// trailing zeros past them (`12.5` → `"12.50"`, `0.000125` → `"0.000125"`).
pub fn decimal(micros: u128) -> String {
    let m = u128::from(MICROS);
    let frac = format!("{:06}", micros % m);
    let frac = frac.trim_end_matches('0');
    format!("{}.{frac:0<2}", micros / m)
}

/// One usage event as billing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Billable {
    /// When it happened.
    pub at: DateTime<Utc>,
    /// Orders events of the same instant (the aggregator gives their position in their
    /// partition, the order their store decided them in).
    pub id: String,
    /// Units used (positive).
    pub amount: u64,
    /// The included amount in force for it; `None`: unlimited.
    pub included: Option<u64>,
    /// The price of each of its overage units; `None`: the plan sets none.
    pub unit_price: Option<Price>,
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
    /// What the priced overage units cost, in millionths of the currency.
    pub amount_micros: u128,
    /// Overage units whose plan sets no price (not in `amount_micros`).
    pub unpriced: u64,
}

/// The period's line from its usage events, in any order.
pub fn line(mut events: Vec<Billable>) -> Line {
    events.sort_by(|a, b| a.at.cmp(&b.at).then_with(|| a.id.cmp(&b.id)));
    let mut out = Line::default();
    for e in &events {
        if let Some(i) = e.included {
            let room = i.saturating_sub(out.used);
            let over = e.amount.saturating_sub(room);
            out.overage = out.overage.saturating_add(over);
            match e.unit_price {
                Some(p) => out.amount_micros += u128::from(over) * u128::from(p.micros()),
                None => out.unpriced = out.unpriced.saturating_add(over),
            }
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
            unit_price: None,
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
                overage: 0,
                ..Line::default()
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

    #[test]
    fn overage_is_priced_by_the_plan_of_each_event() {
        let p = |s: &str| Some(s.parse::<Price>().unwrap());
        let mut a = ev(1, 900, Some(1000));
        a.unit_price = p("0.01");
        let mut b = ev(2, 300, Some(1000));
        b.unit_price = p("0.01");
        let mut c = ev(3, 100, Some(1000));
        c.unit_price = p("0.002");
        let l = line(vec![c.clone(), b, a]);
        assert_eq!(l.overage, 300);
        // 200 × 0.01 + 100 × 0.002 = 2.20
        assert_eq!(l.amount_micros, 2_200_000);
        assert_eq!(decimal(l.amount_micros), "2.20");
        c.unit_price = None;
        let l = line(vec![ev(1, 1000, Some(1000)), c]);
        assert_eq!((l.overage, l.unpriced, l.amount_micros), (100, 100, 0));
    }

    #[test]
    fn prices_are_exact_decimals() {
        assert_eq!("0.002".parse::<Price>().unwrap().micros(), 2_000);
        assert_eq!("12".parse::<Price>().unwrap().micros(), 12_000_000);
        assert_eq!("1.000001".parse::<Price>().unwrap().micros(), 1_000_001);
        assert_eq!(
            "1000000".parse::<Price>().unwrap().to_string(),
            "1000000.00"
        );
        assert_eq!(Price::from_micros(125).to_string(), "0.000125");
        for bad in [
            "",
            "-1",
            "1.",
            ".5",
            "0.0000001",
            "1e3",
            "1,5",
            " 1",
            "1000001",
            "99999999999999999999",
        ] {
            assert!(bad.parse::<Price>().is_err(), "{bad:?} parsed");
        }
        let err = "0.0000001".parse::<Price>().unwrap_err().to_string();
        assert!(err.contains("6 decimal places"), "{err}");
    }
}
