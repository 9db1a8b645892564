//! The last denials of each tenant on this node, for the support view (`allot tenant
//! show`). In memory and per node: every node's denials, for good, are usage events in
//! ClickHouse (`denials`); this answers "why was acme refused just now?" without it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use chrono::{DateTime, Utc};

/// Denials kept per tenant.
pub const PER_TENANT: usize = 20;
/// Tenants kept; past it, the tenant denied longest ago is forgotten.
pub const TENANTS: usize = 10_000;

/// One refused request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// When.
    pub at: DateTime<Utc>,
    /// `reserve` or `record`.
    pub request: &'static str,
    /// The metric asked for.
    pub metric: String,
    /// Units asked for.
    pub amount: i64,
    /// The reason code.
    pub reason: String,
    /// The decision's message.
    pub message: String,
}

/// Recent denials by tenant.
#[derive(Default)]
pub struct RecentDenials {
    by_tenant: Mutex<HashMap<String, VecDeque<Denial>>>,
}

impl RecentDenials {
    /// Keeps `d` as `tenant`'s newest denial.
    pub fn note(&self, tenant: &str, d: Denial) {
        let mut map = self.by_tenant.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(tenant) && map.len() >= TENANTS {
            let oldest = map
                .iter()
                .min_by_key(|(_, q)| q.back().map(|d| d.at))
                .map(|(t, _)| t.clone());
            if let Some(t) = oldest {
                map.remove(&t);
            }
        }
        let q = map.entry(tenant.to_string()).or_default();
        if q.len() == PER_TENANT {
            q.pop_front();
        }
        q.push_back(d);
    }

    /// `tenant`'s recent denials, newest first.
    pub fn of(&self, tenant: &str) -> Vec<Denial> {
        let map = self.by_tenant.lock().unwrap_or_else(|p| p.into_inner());
        map.get(tenant)
            .map(|q| q.iter().rev().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denial(sec: i64) -> Denial {
        Denial {
            at: DateTime::from_timestamp(sec, 0).unwrap(),
            request: "record",
            metric: "calls".into(),
            amount: 1,
            reason: "limit_exceeded".into(),
            message: String::new(),
        }
    }

    #[test]
    fn keeps_the_newest_per_tenant_newest_first() {
        let r = RecentDenials::default();
        for s in 0..(PER_TENANT as i64 + 5) {
            r.note("acme", denial(s));
        }
        let got = r.of("acme");
        assert_eq!(got.len(), PER_TENANT);
        assert_eq!(got[0].at.timestamp(), PER_TENANT as i64 + 4);
        assert_eq!(got[PER_TENANT - 1].at.timestamp(), 5);
        assert!(r.of("globex").is_empty());
    }
}
