//! Upgrade hints: which plans or add-ons of the catalog would have allowed a request.
//!
//! Each candidate is resolved as if the tenant had it, with the same overrides, so a hint
//! never promises what the candidate would not actually grant.

use chrono::{DateTime, Utc};

use crate::catalog::Catalog;
use crate::decision::UpgradeOption;
use crate::grant::Override;
use crate::lifecycle::{AddonRef, PlanRef, Subscription};
use crate::resolve::{resolve, Entitlements};
use crate::window::Window;

/// What the request needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need<'a> {
    /// A feature turned on.
    Feature(&'a str),
    /// Room for units: the metric granted, and for each listed window a cap of at least
    /// the given total (usage + the request); rate windows need a burst of `amount`.
    Units {
        /// Metric code.
        metric: &'a str,
        /// Units in one request.
        amount: u64,
        /// (window, total needed).
        totals: &'a [(Window, u64)],
    },
}

/// Plans (newest published version, lowest tier first) and then add-ons that would meet
/// `need`; the tenant's current plan and add-ons are not suggested.
pub fn upgrade_options(
    catalog: &Catalog,
    sub: &Subscription,
    overrides: &[Override],
    at: DateTime<Utc>,
    need: &Need<'_>,
) -> Vec<UpgradeOption> {
    let current = catalog.status_machine().state_at(sub, at).plan;
    let mut out = Vec::new();
    let mut plans: Vec<_> = catalog.plans.iter().collect();
    plans.sort_by_key(|(code, p)| (p.tier, code.as_str()));
    for (code, p) in plans {
        let Some((version, _)) = p.latest_published() else {
            continue;
        };
        if *code == current.code {
            continue;
        }
        let mut candidate = sub.clone();
        candidate.plan = PlanRef {
            code: code.clone(),
            version,
        };
        candidate.scheduled_change = None;
        candidate.trial_ends_at = None;
        candidate.addons.retain(|a| {
            catalog
                .addons
                .get(&a.code)
                .is_some_and(|d| d.plans.is_empty() || d.plans.contains(code))
        });
        if meets(&resolve(catalog, &candidate, overrides, at), need) {
            out.push(UpgradeOption::Plan {
                code: code.clone(),
                version,
            });
        }
    }
    for (code, a) in &catalog.addons {
        if sub.addons.iter().any(|x| &x.code == code)
            || !(a.plans.is_empty() || a.plans.contains(&current.code))
        {
            continue;
        }
        let mut candidate = sub.clone();
        candidate.addons.push(AddonRef {
            code: code.clone(),
            quantity: 1,
            since: at,
        });
        if meets(&resolve(catalog, &candidate, overrides, at), need) {
            out.push(UpgradeOption::Addon { code: code.clone() });
        }
    }
    out
}

fn meets(e: &Entitlements, need: &Need<'_>) -> bool {
    if e.access == crate::catalog::AccessLevel::None {
        return false;
    }
    // A metric the status closes stays closed on any plan: paying, not upgrading, opens
    // it.
    if let Need::Units { metric, .. } = need {
        if e.closed.contains_key(*metric) {
            return false;
        }
    }
    match need {
        Need::Feature(f) => e.features.get(*f).is_some_and(|g| g.enabled()),
        Need::Units {
            metric,
            amount,
            totals,
        } => {
            let Some(limits) = e.limits.get(*metric) else {
                return false;
            };
            limits.iter().all(|l| {
                if l.window.is_rate() {
                    l.burst.unwrap_or(l.amount) >= *amount
                } else {
                    let need = totals
                        .iter()
                        .find(|(w, _)| *w == l.window)
                        .map_or(*amount, |(_, t)| *t);
                    l.cap().is_none_or(|c| c >= need)
                        && l.max_per_request.is_none_or(|m| m >= *amount)
                }
            })
        }
    }
}
