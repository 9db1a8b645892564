//! Semantic rules of a catalog that the file format alone cannot express.

use super::load::Problem;
use super::model::*;
use crate::gcra::GLOBAL_EXACT_MAX;
use crate::keys::check_code;
use crate::window::Window;

/// The largest amount anywhere in a catalog: amounts are added up and compared with signed
/// gauge adjustments, so they stay within `i64`.
pub const MAX_AMOUNT: u64 = i64::MAX as u64;

/// The longest grace period a catalog may declare: a year. Longer is almost certainly a
/// unit mistake (hours or seconds written as days), and unpaid service for longer than a
/// year is better written as a status that keeps access.
pub const MAX_GRACE_DAYS: u32 = 365;

/// Checks every rule; returns all problems found, not just the first.
pub fn validate(c: &Catalog) -> Result<(), Vec<Problem>> {
    let mut v = Checker::default();
    if c.version != 1 {
        v.push(
            "version",
            format!("unsupported catalog version {}; only 1 exists", c.version),
        );
    }
    if c.metrics.is_empty() {
        v.push("metrics", "at least one metric is required".into());
    }
    for (code, m) in &c.metrics {
        v.code(&format!("metrics.{code}"), code);
        if m.unit.trim().is_empty() {
            v.push(&format!("metrics.{code}.unit"), "must not be empty".into());
        }
    }
    for (code, f) in &c.features {
        let path = format!("features.{code}");
        v.code(&path, code);
        match (f.kind, &f.metric) {
            (FeatureKind::Metered, None) => v.push(
                &format!("{path}.metric"),
                "a metered feature names its metric".into(),
            ),
            (FeatureKind::Metered, Some(m)) if !c.metrics.contains_key(m) => {
                v.push(&format!("{path}.metric"), format!("unknown metric {m:?}"))
            }
            (FeatureKind::Boolean | FeatureKind::Config, Some(_)) => v.push(
                &format!("{path}.metric"),
                "only metered features name a metric".into(),
            ),
            _ => {}
        }
        if let Some(rule) = f.merge {
            let ok = match f.kind {
                FeatureKind::Boolean => matches!(rule, MergeRule::Union),
                FeatureKind::Config => !matches!(rule, MergeRule::Sum),
                FeatureKind::Metered => {
                    matches!(rule, MergeRule::Sum | MergeRule::Max | MergeRule::Min)
                }
            };
            if !ok {
                v.push(
                    &format!("{path}.merge"),
                    format!(
                        "merge rule {} does not apply to {:?} features",
                        rule.as_str(),
                        f.kind
                    ),
                );
            }
        }
    }
    match c.grace_days {
        Some(0) => v.push(
            "grace_days",
            "must be at least 1: a subscription in grace is suspended this many days after it entered grace (leave it out for the default 7)".into(),
        ),
        Some(d) if d > MAX_GRACE_DAYS => v.push(
            "grace_days",
            format!("{d} days is more than {MAX_GRACE_DAYS}; grace is counted in days, not hours or seconds"),
        ),
        _ => {}
    }
    v.access(c);
    if c.plans.is_empty() {
        v.push("plans", "at least one plan is required".into());
    }
    for (code, p) in &c.plans {
        let path = format!("plans.{code}");
        v.code(&path, code);
        if p.versions.is_empty() {
            v.push(
                &format!("{path}.versions"),
                "a plan needs at least one version".into(),
            );
        }
        for (ver, b) in &p.versions {
            let vpath = format!("{path}.versions.{ver}");
            if *ver == 0 {
                v.push(&vpath, "versions are numbered from 1".into());
            }
            v.grants(c, &vpath, &b.features, &b.limits);
        }
    }
    for (code, a) in &c.addons {
        let path = format!("addons.{code}");
        v.code(&path, code);
        for (i, plan) in a.plans.iter().enumerate() {
            if !c.plans.contains_key(plan) {
                v.push(
                    &format!("{path}.plans[{i}]"),
                    format!("unknown plan {plan:?}"),
                );
            }
        }
        v.grants(c, &path, &a.features, &a.limits);
        for (metric, list) in &a.limits {
            for (i, l) in list.iter().enumerate() {
                if l.unit_price.is_some() {
                    v.push(
                        &format!("{path}.limits.{metric}[{i}].unit_price"),
                        "only plans set prices (an add-on raises the allowance)".into(),
                    );
                }
            }
        }
    }
    let priced = c
        .plans
        .values()
        .flat_map(|p| p.versions.values())
        .flat_map(|b| b.limits.values().flatten())
        .any(|l| l.unit_price.is_some());
    match &c.currency {
        None if priced => v.push(
            "currency",
            "a plan sets a unit_price, so the catalog needs its currency (e.g. USD)".into(),
        ),
        Some(cur) if cur.len() != 3 || !cur.bytes().all(|b| b.is_ascii_uppercase()) => v.push(
            "currency",
            format!("{cur:?} is not an ISO 4217 code (three capital letters, e.g. USD)"),
        ),
        _ => {}
    }
    v.finish()
}

/// Checks that `new` keeps every version `old` published, unchanged.
pub fn validate_successor(old: &Catalog, new: &Catalog) -> Result<(), Vec<Problem>> {
    let mut v = Checker::default();
    for (code, p) in &old.plans {
        for (ver, b) in p.versions.iter().filter(|(_, b)| b.published) {
            let path = format!("plans.{code}.versions.{ver}");
            match new.plans.get(code).and_then(|np| np.versions.get(ver)) {
                None => v.push(
                    &path,
                    "a published plan version cannot be removed (tenants may be on it)".into(),
                ),
                Some(nb) if nb != b => v.push(
                    &path,
                    "a published plan version is immutable; publish a new version instead".into(),
                ),
                Some(_) => {}
            }
        }
    }
    v.finish()
}

#[derive(Default)]
struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn push(&mut self, path: &str, reason: String) {
        self.problems.push(Problem {
            path: path.to_string(),
            reason,
        });
    }

    fn code(&mut self, path: &str, code: &str) {
        if let Err(reason) = check_code(code) {
            self.push(path, reason);
        }
    }

    /// Access rules name features and metrics that exist, once each, where the level
    /// gives them a meaning.
    fn access(&mut self, c: &Catalog) {
        for (status, rule) in &c.access {
            let path = format!("access.{}", status.as_str());
            if rule.level == AccessLevel::None && !rule.features_off.is_empty() {
                self.push(
                    &format!("{path}.features_off"),
                    "with level none every request is refused already; name no features".into(),
                );
            }
            if rule.level != AccessLevel::ReadOnly && !rule.consumable.is_empty() {
                self.push(
                    &format!("{path}.consumable"),
                    format!(
                        "only level read_only keeps metrics consumable (with {} {})",
                        rule.level.as_str(),
                        if rule.level == AccessLevel::Full {
                            "every granted metric is"
                        } else {
                            "none is"
                        }
                    ),
                );
            }
            for (i, f) in rule.features_off.iter().enumerate() {
                let fpath = format!("{path}.features_off[{i}]");
                if !c.features.contains_key(f) {
                    self.push(&fpath, format!("unknown feature {f:?}"));
                } else if rule.features_off[..i].contains(f) {
                    self.push(&fpath, format!("{f} is listed twice"));
                }
            }
            for (i, m) in rule.consumable.iter().enumerate() {
                let mpath = format!("{path}.consumable[{i}]");
                if !c.metrics.contains_key(m) {
                    self.push(&mpath, format!("unknown metric {m:?}"));
                    continue;
                }
                if rule.consumable[..i].contains(m) {
                    self.push(&mpath, format!("{m} is listed twice"));
                }
                let closed_by = c.features.iter().find(|(code, f)| {
                    f.kind == FeatureKind::Metered
                        && f.metric.as_deref() == Some(m)
                        && rule.features_off.contains(code)
                });
                if let Some((code, _)) = closed_by {
                    self.push(
                        &mpath,
                        format!("{m} is the metric of {code}, which features_off turns off"),
                    );
                }
            }
        }
    }

    fn finish(self) -> Result<(), Vec<Problem>> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(self.problems)
        }
    }

    fn grants(
        &mut self,
        c: &Catalog,
        path: &str,
        features: &std::collections::BTreeMap<String, FeatureValue>,
        limits: &std::collections::BTreeMap<String, Vec<LimitDef>>,
    ) {
        for (code, value) in features {
            let fpath = format!("{path}.features.{code}");
            let Some(def) = c.features.get(code) else {
                self.push(&fpath, format!("unknown feature {code:?}"));
                continue;
            };
            let ok = match (def.kind, value) {
                (FeatureKind::Boolean, FeatureValue::Bool(_)) => true,
                (FeatureKind::Metered, FeatureValue::Bool(true)) => true,
                (FeatureKind::Config, FeatureValue::Int(_)) => {
                    !matches!(def.merge, Some(MergeRule::Union))
                }
                (FeatureKind::Config, FeatureValue::Str(_)) => {
                    matches!(def.merge, None | Some(MergeRule::Precedence))
                }
                (FeatureKind::Config, FeatureValue::List(_)) => {
                    matches!(
                        def.merge,
                        None | Some(MergeRule::Precedence | MergeRule::Union)
                    )
                }
                _ => false,
            };
            if !ok {
                let expected = match def.kind {
                    FeatureKind::Boolean => "true or false",
                    FeatureKind::Metered => "true (unlimited) or limits under `limits`",
                    FeatureKind::Config => match def.merge {
                        Some(MergeRule::Max | MergeRule::Min) => "a number (merge max/min)",
                        Some(MergeRule::Union) => "a list (merge union)",
                        _ => "a number, a string or a list of strings",
                    },
                };
                self.push(
                    &fpath,
                    format!("value {value} does not fit; expected {expected}"),
                );
            }
        }
        for (metric, list) in limits {
            let mpath = format!("{path}.limits.{metric}");
            let Some(mdef) = c.metrics.get(metric) else {
                self.push(&mpath, format!("unknown metric {metric:?}"));
                continue;
            };
            let mut seen = Vec::new();
            for (i, l) in list.iter().enumerate() {
                let lpath = format!("{mpath}[{i}]");
                let slot = (l.window, l.per.clone());
                if seen.contains(&slot) {
                    self.push(
                        &lpath,
                        format!("a second {} limit on {metric}; one per window", l.window),
                    );
                }
                seen.push(slot);
                self.limit(&lpath, mdef.kind, l);
            }
        }
    }

    /// A global bucket lives in Redis, whose Lua numbers are exact only so far.
    fn global_range(&mut self, path: &str, l: &LimitDef) {
        let (Some(rate), Some(period)) = (l.rate, l.window.rate_period()) else {
            return;
        };
        let exact = GLOBAL_EXACT_MAX;
        if u128::from(rate) > exact {
            self.push(
                &format!("{path}.rate"),
                format!("is too large for scope global (at most {exact}: the shared bucket computes in Lua numbers)"),
            );
        }
        let burst = l.burst.unwrap_or(rate);
        let most = exact / period.as_micros();
        if u128::from(burst) > most {
            let field = if l.burst.is_some() { "burst" } else { "rate" };
            self.push(
                &format!("{path}.{field}"),
                format!(
                    "a burst of {burst} per {} is too large for scope global (at most {most}: the shared bucket computes in Lua numbers, exact to 2^53)",
                    l.window
                ),
            );
        }
    }

    fn limit(&mut self, path: &str, metric_kind: MetricKind, l: &LimitDef) {
        let w = l.window;
        let mut bad =
            |field: &str, reason: &str| self.push(&format!("{path}.{field}"), reason.into());
        if w.is_rate() {
            match l.rate {
                None => bad("rate", "a second or minute window needs a rate"),
                Some(0) => bad("rate", "must be at least 1"),
                Some(r) if r > MAX_AMOUNT => bad("rate", "is too large"),
                _ => {}
            }
            if l.burst == Some(0) {
                bad("burst", "must be at least 1");
            }
            if l.burst.is_some_and(|b| b > MAX_AMOUNT) {
                bad("burst", "is too large");
            }
            if l.amount.is_some() {
                bad("amount", "rate windows take rate and burst, not amount");
            }
            if l.enforcement == Enforcement::Soft {
                bad("enforcement", "rate limits are always hard");
            }
            if metric_kind == MetricKind::Gauge {
                bad(
                    "window",
                    "a gauge metric takes window none, not a rate window",
                );
            }
        } else {
            match l.amount {
                None => bad("amount", &format!("window {w} needs an amount")),
                Some(a) if a > MAX_AMOUNT => bad("amount", "is too large (at most 2^63-1)"),
                _ => {}
            }
            if l.rate.is_some() || l.burst.is_some() {
                bad(
                    "rate",
                    &format!("rate and burst belong to second or minute windows, not {w}"),
                );
            }
            if l.per.is_some() {
                bad("per", "only rate limits have per-dimension buckets");
            }
            if l.scope.is_some() {
                bad(
                    "scope",
                    &format!("only rate limits (second, minute) have a scope; a {w} limit is counted by the store, shared by every node"),
                );
            }
            match (metric_kind, w == Window::None) {
                (MetricKind::Gauge, false) => bad("window", "a gauge metric takes window none"),
                (MetricKind::Counter, true) => bad(
                    "window",
                    "window none is for gauge metrics (seats, exposure)",
                ),
                _ => {}
            }
        }
        if l.overage.is_some() && l.enforcement == Enforcement::Hard {
            bad("overage", "only soft limits allow overage");
        }
        if l.overage.is_some_and(|o| o > MAX_AMOUNT) {
            bad("overage", "is too large");
        }
        if l.unit_price.is_some() && !matches!(w, Window::BillingPeriod | Window::Month) {
            bad(
                "unit_price",
                &format!("billing prices the allowance of a billing_period or month limit, not of a {w} limit"),
            );
        }
        if l.max_per_request == Some(0) {
            bad("max_per_request", "must be at least 1");
        }
        if w.is_rate() && l.warn_at.is_some() {
            self.push(
                &format!("{path}.warn_at"),
                "rate limits have no warning thresholds".into(),
            );
        }
        for (i, p) in l.warn_at.iter().flatten().enumerate() {
            if *p == 0 || *p > 100 {
                self.push(
                    &format!("{path}.warn_at[{i}]"),
                    format!("{p} is not a percentage from 1 to 100"),
                );
            }
        }
        if let Some(per) = &l.per {
            if let Err(reason) = check_code(per) {
                self.push(&format!("{path}.per"), reason);
            }
        }
        if w.is_rate() && l.scope == Some(Scope::Global) {
            self.global_range(path, l);
        }
    }
}
