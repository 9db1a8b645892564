//! Resolution: the effective entitlements of a tenant at an instant, as a pure function of
//! catalog + subscription + overrides.
//!
//! Grants are gathered from the plan version in force, every add-on and every active
//! override, sorted into a canonical order first, then merged per feature (union, sum,
//! max, min, precedence), so the answer never depends on the order in which add-ons or
//! overrides were stored. Every value carries its provenance and the instant since which
//! it holds; the result carries `valid_until`, the next instant it changes by itself, so
//! caches know when to drop it.
//!
//! What is in force at the instant (plan, status) comes from the catalog's
//! [`StatusMachine`](crate::status_machine::StatusMachine), so a trial end, a grace end or
//! a scheduled downgrade takes effect exactly at its instant. The status's access rule
//! ([`AccessRule`]) applies last: it may turn features off and close metrics for
//! consumption, and says so in the provenance ([`Source::Status`]), so support can read
//! why a feature is off or a metric refused.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::Serialize;

use crate::catalog::{
    AccessLevel, AccessRule, Catalog, Enforcement, FailurePolicy, FeatureKind, FeatureValue,
    LimitDef, MergeRule, Scope, MAX_AMOUNT,
};
use crate::grant::{Change, Override};
use crate::lifecycle::{PlanRef, Status, Subscription};
use crate::window::Window;

/// Where a value comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// The plan version in force.
    Plan {
        /// `code@version`.
        plan: String,
    },
    /// An add-on.
    Addon {
        /// Add-on code.
        code: String,
        /// Quantity on the subscription.
        quantity: u32,
    },
    /// An override.
    Override {
        /// Override id.
        id: String,
    },
    /// The catalog's access rule for the subscription's status (`access.grace`): it
    /// turned a feature off or closes a metric.
    Status {
        /// The status whose rule it is.
        status: Status,
    },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Plan { plan } => write!(f, "plan {plan}"),
            Source::Addon { code, quantity: 1 } => write!(f, "add-on {code}"),
            Source::Addon { code, quantity } => write!(f, "add-on {code} x{quantity}"),
            Source::Override { id } => write!(f, "override {id}"),
            Source::Status { status } => write!(f, "status {} (access.{0})", status.as_str()),
        }
    }
}

/// A source and the instant from which it contributes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Provenance {
    /// The source.
    pub source: Source,
    /// Since when it contributes.
    pub since: DateTime<Utc>,
}

/// A feature's effective value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct FeatureGrant {
    /// `Bool` for boolean and metered features, the merged value for config features.
    pub value: FeatureValue,
    /// The grants that made it.
    pub sources: Vec<Provenance>,
    /// Since when it holds.
    pub since: DateTime<Utc>,
}

impl FeatureGrant {
    /// Whether the feature is on (config features are on when they have a value).
    pub fn enabled(&self) -> bool {
        !matches!(self.value, FeatureValue::Bool(false))
    }

    /// The status whose access rule turned the feature off, if that is why it is off.
    pub fn off_by_status(&self) -> Option<Status> {
        if self.enabled() {
            return None;
        }
        self.sources.iter().find_map(|p| match p.source {
            Source::Status { status } => Some(status),
            _ => None,
        })
    }
}

/// Why a granted metric cannot be consumed now: the status rule that closes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Closed {
    /// The rule ([`Source::Status`]) and since when it applies.
    pub rule: Provenance,
    /// The metered feature of the metric that the rule's `features_off` turns off; `None`
    /// when the level closes it (`read_only` without it in `consumable`, or `none`).
    pub feature: Option<String>,
}

/// An effective limit on a metric.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ResolvedLimit {
    /// The window.
    pub window: Window,
    /// Units per window; for rate windows, the rate per second or minute.
    pub amount: u64,
    /// Rate windows: units that may be taken at once.
    pub burst: Option<u64>,
    /// Rate windows: a dimension that gets its own bucket.
    pub per: Option<String>,
    /// Rate windows: a share of the limit per node, or one bucket shared by every node.
    /// `node` for other windows.
    pub scope: Scope,
    /// Hard or soft.
    pub enforcement: Enforcement,
    /// Warning thresholds in percent, ascending.
    pub warn_at: Vec<u8>,
    /// Soft limits: units allowed past the amount (`None`: unbounded).
    pub overage: Option<u64>,
    /// Largest amount in one request.
    pub max_per_request: Option<u64>,
    /// Decision when the backend is down.
    pub on_backend_failure: FailurePolicy,
    /// The grants that made it.
    pub sources: Vec<Provenance>,
    /// Since when it holds.
    pub since: DateTime<Utc>,
}

impl ResolvedLimit {
    /// The amount past which a request is refused: the amount for hard limits, amount plus
    /// overage allowance for soft ones, `None` when overage is unbounded.
    pub fn cap(&self) -> Option<u64> {
        match self.enforcement {
            Enforcement::Hard => Some(self.amount),
            Enforcement::Soft => self.overage.map(|o| self.amount.saturating_add(o)),
        }
    }
}

/// Everything a tenant may do at one instant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entitlements {
    /// The tenant.
    pub tenant: String,
    /// The instant resolved for.
    pub at: DateTime<Utc>,
    /// The plan in force.
    pub plan: PlanRef,
    /// Since when.
    pub plan_since: DateTime<Utc>,
    /// The status in force.
    pub status: Status,
    /// Since when.
    pub status_since: DateTime<Utc>,
    /// What the status allows (the level of the catalog's rule for it).
    pub access: AccessLevel,
    /// Every feature of the catalog with its value (off ones included, with no sources;
    /// one the status rule turns off has that rule as its only source).
    pub features: BTreeMap<String, FeatureGrant>,
    /// Limits by metric, as the plan, add-ons and overrides grant them; a metric without
    /// an entry here is not granted at all, one with an empty list is granted without
    /// limits. Whether the status lets them be consumed is [`Entitlements::closed`].
    pub limits: BTreeMap<String, Vec<ResolvedLimit>>,
    /// Granted metrics the status does not let be consumed (reserve, positive record),
    /// with the rule that closes each: every one under level `none`, every one but the
    /// rule's `consumable` under `read_only`, and those of the rule's `features_off`.
    /// Checking a feature, reading usage and releasing (negative gauge records) stay
    /// open.
    pub closed: BTreeMap<String, Closed>,
    /// Calendar windows follow this zone.
    #[serde(serialize_with = "tz_name")]
    pub time_zone: Tz,
    /// Billing periods are anchored here.
    pub billing_anchor: DateTime<Utc>,
    /// The next instant the result changes by itself (trial end, override expiry…).
    pub valid_until: Option<DateTime<Utc>>,
    /// A digest of the result, for caches and for comparing answers between nodes.
    pub version: u64,
}

fn tz_name<S: serde::Serializer>(tz: &Tz, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(tz.name())
}

impl Entitlements {
    /// The limit of `metric` on `window`, if any (first one when several `per` buckets).
    pub fn limit(&self, metric: &str, window: Window) -> Option<&ResolvedLimit> {
        self.limits.get(metric)?.iter().find(|l| l.window == window)
    }
}

/// One grant of one source, before merging.
struct Contribution<'a> {
    prov: Provenance,
    /// Add-on priority for config precedence (plan: `i64::MIN`).
    priority: i64,
    /// Quotas multiply by this (add-on quantity).
    times: u64,
    features: &'a BTreeMap<String, FeatureValue>,
    limits: &'a BTreeMap<String, Vec<LimitDef>>,
}

/// Resolves `sub` (with its `overrides`) against `catalog` at `at`.
///
/// References that the catalog no longer has (an add-on removed since) contribute nothing;
/// the caller validated them when the subscription was written.
pub fn resolve(
    catalog: &Catalog,
    sub: &Subscription,
    overrides: &[Override],
    at: DateTime<Utc>,
) -> Entitlements {
    let state = catalog.status_machine().state_at(sub, at);
    let rule = catalog.access_rule(state.status);
    let access = rule.level;

    let mut contributions = Vec::new();
    if let Some(bundle) = catalog
        .plans
        .get(&state.plan.code)
        .and_then(|p| p.versions.get(&state.plan.version))
    {
        contributions.push(Contribution {
            prov: Provenance {
                source: Source::Plan {
                    plan: state.plan.to_string(),
                },
                since: state.plan_since,
            },
            priority: i64::MIN,
            times: 1,
            features: &bundle.features,
            limits: &bundle.limits,
        });
    }
    let mut addons: Vec<_> = sub.addons.iter().collect();
    addons.sort_by(|a, b| a.code.cmp(&b.code));
    for a in addons {
        // An add-on sold only on some plans stops applying when the plan in force (after a
        // scheduled change or a trial end) is not one of them.
        let sold_here = |d: &&crate::catalog::AddonDef| {
            d.plans.is_empty() || d.plans.contains(&state.plan.code)
        };
        if let Some(def) = catalog.addons.get(&a.code).filter(sold_here) {
            contributions.push(Contribution {
                prov: Provenance {
                    source: Source::Addon {
                        code: a.code.clone(),
                        quantity: a.quantity,
                    },
                    since: a.since,
                },
                priority: i64::from(def.priority),
                times: u64::from(a.quantity.max(1)),
                features: &def.features,
                limits: &def.limits,
            });
        }
    }

    let mut active: Vec<&Override> = overrides
        .iter()
        .filter(|o| o.tenant == sub.tenant && o.active_at(at))
        .collect();
    // Later overrides win ties; the id breaks ties between equal instants.
    active.sort_by(|a, b| (a.valid_from, &a.id).cmp(&(b.valid_from, &b.id)));

    let mut features = merge_features(catalog, &contributions, &active);
    let limits = merge_limits(catalog, &contributions, &active, &features);
    // The status rule applies last, over overrides too: an override that enables a
    // feature is a commercial gesture, not a payment, and does not lift grace.
    let by_rule = Provenance {
        source: Source::Status {
            status: state.status,
        },
        since: state.status_since,
    };
    let closed = apply_rule(catalog, &rule, &by_rule, &mut features, &limits);

    let mut valid_until = state.next_change;
    for o in overrides.iter().filter(|o| o.tenant == sub.tenant) {
        for t in [Some(o.valid_from), o.valid_to].into_iter().flatten() {
            if t > at {
                valid_until = Some(valid_until.map_or(t, |v| v.min(t)));
            }
        }
    }

    let mut e = Entitlements {
        tenant: sub.tenant.clone(),
        at,
        plan: state.plan,
        plan_since: state.plan_since,
        status: state.status,
        status_since: state.status_since,
        access,
        features,
        limits,
        closed,
        time_zone: sub.tz(),
        billing_anchor: sub.billing_anchor,
        valid_until,
        version: 0,
    };
    e.version = digest(&e);
    e
}

fn digest(e: &Entitlements) -> u64 {
    // DefaultHasher::new() uses fixed keys, so equal inputs digest equally across nodes
    // running the same build.
    let mut h = std::hash::DefaultHasher::new();
    e.plan.hash(&mut h);
    e.status.hash(&mut h);
    e.access.hash(&mut h);
    e.features.hash(&mut h);
    e.limits.hash(&mut h);
    e.closed.hash(&mut h);
    e.time_zone.name().hash(&mut h);
    e.billing_anchor.hash(&mut h);
    h.finish()
}

/// Turns off the features `rule` names, and returns the granted metrics it closes.
fn apply_rule(
    catalog: &Catalog,
    rule: &AccessRule,
    by_rule: &Provenance,
    features: &mut BTreeMap<String, FeatureGrant>,
    limits: &BTreeMap<String, Vec<ResolvedLimit>>,
) -> BTreeMap<String, Closed> {
    let mut closed = BTreeMap::new();
    for code in &rule.features_off {
        let Some(g) = features.get_mut(code) else {
            continue;
        };
        *g = FeatureGrant {
            value: FeatureValue::Bool(false),
            sources: vec![by_rule.clone()],
            since: by_rule.since,
        };
        let metric = catalog
            .features
            .get(code)
            .filter(|f| f.kind == FeatureKind::Metered)
            .and_then(|f| f.metric.as_ref());
        if let Some(m) = metric.filter(|m| limits.contains_key(*m)) {
            closed.insert(
                m.clone(),
                Closed {
                    rule: by_rule.clone(),
                    feature: Some(code.clone()),
                },
            );
        }
    }
    for metric in limits.keys() {
        let open = match rule.level {
            AccessLevel::Full => true,
            AccessLevel::ReadOnly => rule.consumable.contains(metric),
            AccessLevel::None => false,
        };
        if !open && !closed.contains_key(metric) {
            closed.insert(
                metric.clone(),
                Closed {
                    rule: by_rule.clone(),
                    feature: None,
                },
            );
        }
    }
    closed
}

fn merge_features(
    catalog: &Catalog,
    contributions: &[Contribution<'_>],
    overrides: &[&Override],
) -> BTreeMap<String, FeatureGrant> {
    let mut out = BTreeMap::new();
    for (code, def) in &catalog.features {
        let grants: Vec<(&Contribution<'_>, &FeatureValue)> = contributions
            .iter()
            .filter_map(|c| c.features.get(code).map(|v| (c, v)))
            .collect();
        let mut grant = match def.kind {
            FeatureKind::Boolean | FeatureKind::Metered => {
                let on: Vec<Provenance> = grants
                    .iter()
                    .filter(|(_, v)| **v == FeatureValue::Bool(true))
                    .map(|(c, _)| c.prov.clone())
                    .collect();
                let metered_on = def.kind == FeatureKind::Metered
                    && def.metric.as_ref().is_some_and(|m| {
                        contributions
                            .iter()
                            .any(|c| c.limits.get(m).is_some_and(|l| !l.is_empty()))
                    });
                let mut sources = on;
                if metered_on {
                    let m = def.metric.as_ref().expect("checked above");
                    for c in contributions.iter().filter(|c| c.limits.contains_key(m)) {
                        if !sources.contains(&c.prov) {
                            sources.push(c.prov.clone());
                        }
                    }
                }
                FeatureGrant {
                    value: FeatureValue::Bool(!sources.is_empty()),
                    since: since_first(&sources),
                    sources,
                }
            }
            FeatureKind::Config => {
                merge_config(def.merge.unwrap_or(MergeRule::Precedence), &grants)
            }
        };
        for o in overrides {
            match &o.change {
                Change::EnableFeature { feature } if feature == code => {
                    if !grant.enabled() {
                        grant.value = FeatureValue::Bool(true);
                        grant.since = o.valid_from;
                    }
                    grant.sources.push(prov_of(o));
                }
                Change::SetConfig { feature, value } if feature == code => {
                    grant.value = value.clone();
                    grant.sources = vec![prov_of(o)];
                    grant.since = o.valid_from;
                }
                _ => {}
            }
        }
        // Disabling wins over every grant, enabling overrides included: it is the safer
        // reading of two contradicting overrides.
        if let Some(o) = overrides
            .iter()
            .rev()
            .find(|o| matches!(&o.change, Change::DisableFeature { feature } if feature == code))
        {
            grant = FeatureGrant {
                value: FeatureValue::Bool(false),
                sources: vec![prov_of(o)],
                since: o.valid_from,
            };
        }
        out.insert(code.clone(), grant);
    }
    out
}

fn merge_config(rule: MergeRule, grants: &[(&Contribution<'_>, &FeatureValue)]) -> FeatureGrant {
    let none = FeatureGrant {
        value: FeatureValue::Bool(false),
        sources: vec![],
        since: DateTime::<Utc>::UNIX_EPOCH,
    };
    if grants.is_empty() {
        return none;
    }
    let all_sources = || {
        grants
            .iter()
            .map(|(c, _)| c.prov.clone())
            .collect::<Vec<_>>()
    };
    match rule {
        MergeRule::Max | MergeRule::Min => {
            let ints = grants.iter().filter_map(|(c, v)| match v {
                FeatureValue::Int(i) => Some((*i, c)),
                _ => None,
            });
            let best = if rule == MergeRule::Max {
                ints.max_by_key(|(i, c)| (*i, std::cmp::Reverse(c.prov.clone())))
            } else {
                ints.min_by_key(|(i, c)| (*i, c.prov.clone()))
            };
            match best {
                Some((i, c)) => FeatureGrant {
                    value: FeatureValue::Int(i),
                    sources: vec![c.prov.clone()],
                    since: c.prov.since,
                },
                None => none,
            }
        }
        MergeRule::Union => {
            let mut items: Vec<String> = grants
                .iter()
                .flat_map(|(_, v)| match v {
                    FeatureValue::List(l) => l.clone(),
                    other => vec![other.to_string()],
                })
                .collect();
            items.sort();
            items.dedup();
            let sources = all_sources();
            FeatureGrant {
                value: FeatureValue::List(items),
                since: since_last(&sources),
                sources,
            }
        }
        MergeRule::Precedence | MergeRule::Sum => {
            // Highest priority wins; among equal priorities the smallest source sorts first
            // and wins, so the choice is stable whatever order add-ons were added in.
            let (c, v) = grants
                .iter()
                .max_by(|(a, _), (b, _)| {
                    a.priority
                        .cmp(&b.priority)
                        .then_with(|| b.prov.source.cmp(&a.prov.source))
                })
                .expect("not empty");
            FeatureGrant {
                value: (*v).clone(),
                sources: vec![c.prov.clone()],
                since: c.prov.since,
            }
        }
    }
}

fn merge_limits(
    catalog: &Catalog,
    contributions: &[Contribution<'_>],
    overrides: &[&Override],
    features: &BTreeMap<String, FeatureGrant>,
) -> BTreeMap<String, Vec<ResolvedLimit>> {
    let mut out: BTreeMap<String, Vec<ResolvedLimit>> = BTreeMap::new();
    for metric in catalog.metrics.keys() {
        let feature = catalog
            .features
            .iter()
            .find(|(_, f)| f.kind == FeatureKind::Metered && f.metric.as_deref() == Some(metric));
        let quota_rule = feature.and_then(|(_, f)| f.merge).unwrap_or(MergeRule::Sum);
        let mut by_slot: BTreeMap<(Window, Option<String>), ResolvedLimit> = BTreeMap::new();
        let mut granted = false;
        for c in contributions {
            let Some(list) = c.limits.get(metric) else {
                continue;
            };
            granted = true;
            for l in list {
                let amount = if l.window.is_rate() {
                    l.rate.unwrap_or(0)
                } else {
                    l.amount
                        .unwrap_or(0)
                        .saturating_mul(c.times)
                        .min(MAX_AMOUNT)
                };
                let burst = l.window.is_rate().then(|| l.burst.or(l.rate).unwrap_or(0));
                let key = (l.window, l.per.clone());
                match by_slot.get_mut(&key) {
                    None => {
                        by_slot.insert(
                            key,
                            ResolvedLimit {
                                window: l.window,
                                amount,
                                burst,
                                per: l.per.clone(),
                                scope: l.scope(),
                                enforcement: l.enforcement,
                                warn_at: sorted(l.warn_at()),
                                overage: l.overage,
                                max_per_request: l.max_per_request,
                                on_backend_failure: l.on_backend_failure,
                                sources: vec![c.prov.clone()],
                                since: c.prov.since,
                            },
                        );
                    }
                    Some(r) => {
                        let rule = if l.window.is_rate() {
                            MergeRule::Max
                        } else {
                            quota_rule
                        };
                        r.amount = combine(rule, r.amount, amount);
                        r.burst = match (r.burst, burst) {
                            (Some(a), Some(b)) => Some(a.max(b)),
                            (a, b) => a.or(b),
                        };
                        // The strictest setting wins where grants disagree on policy.
                        r.enforcement = r.enforcement.min(l.enforcement);
                        r.on_backend_failure = r.on_backend_failure.min(l.on_backend_failure);
                        r.scope = r.scope.max(l.scope());
                        r.warn_at = sorted(r.warn_at.iter().copied().chain(l.warn_at()).collect());
                        r.overage = match (r.overage, l.overage) {
                            (Some(a), Some(b)) => Some(a.max(b)),
                            _ => None,
                        };
                        r.max_per_request = match (r.max_per_request, l.max_per_request) {
                            (Some(a), Some(b)) => Some(a.max(b)),
                            _ => None,
                        };
                        r.sources.push(c.prov.clone());
                        r.since = r.since.max(c.prov.since);
                    }
                }
            }
        }
        if let Some((code, _)) = feature {
            granted |= features.get(code).is_some_and(|g| g.enabled());
        }
        for o in overrides {
            match &o.change {
                Change::SetLimit {
                    metric: m,
                    window,
                    amount,
                } if m == metric => {
                    let mut hit = false;
                    for r in by_slot.values_mut().filter(|r| r.window == *window) {
                        r.amount = *amount;
                        r.burst = r.burst.map(|b| b.max(*amount));
                        touch(r, o);
                        hit = true;
                    }
                    if !hit {
                        by_slot.insert((*window, None), new_limit(*window, *amount, o));
                    }
                    granted = true;
                }
                Change::RaiseLimit {
                    metric: m,
                    window,
                    by,
                } if m == metric => {
                    for r in by_slot.values_mut().filter(|r| r.window == *window) {
                        r.amount = r.amount.saturating_add(*by).min(MAX_AMOUNT);
                        r.burst = r.burst.map(|b| b.max(r.amount));
                        touch(r, o);
                    }
                }
                Change::ExtraUnits { metric: m, amount } if m == metric => {
                    for r in by_slot.values_mut().filter(|r| !r.window.is_rate()) {
                        r.amount = r.amount.saturating_add(*amount).min(MAX_AMOUNT);
                        touch(r, o);
                    }
                }
                _ => {}
            }
        }
        if let Some((code, _)) = feature {
            if features
                .get(code)
                .is_some_and(|g| !g.enabled() && g.sources.iter().any(is_override))
            {
                // Disabled by an override: the metric is not granted at all.
                granted = false;
            }
        }
        if granted {
            out.insert(metric.clone(), by_slot.into_values().collect());
        }
    }
    out
}

fn is_override(p: &Provenance) -> bool {
    matches!(p.source, Source::Override { .. })
}

fn combine(rule: MergeRule, a: u64, b: u64) -> u64 {
    match rule {
        MergeRule::Max => a.max(b),
        MergeRule::Min => a.min(b),
        _ => a.saturating_add(b).min(MAX_AMOUNT),
    }
}

fn touch(r: &mut ResolvedLimit, o: &Override) {
    r.sources.push(prov_of(o));
    r.since = r.since.max(o.valid_from);
}

fn new_limit(window: Window, amount: u64, o: &Override) -> ResolvedLimit {
    ResolvedLimit {
        window,
        amount,
        burst: window.is_rate().then_some(amount),
        per: None,
        scope: Scope::Node,
        enforcement: Enforcement::Hard,
        warn_at: if window.is_rate() { vec![] } else { vec![80] },
        overage: None,
        max_per_request: None,
        on_backend_failure: FailurePolicy::FailClosed,
        sources: vec![prov_of(o)],
        since: o.valid_from,
    }
}

fn prov_of(o: &Override) -> Provenance {
    Provenance {
        source: Source::Override { id: o.id.clone() },
        since: o.valid_from,
    }
}

fn sorted(mut v: Vec<u8>) -> Vec<u8> {
    v.sort_unstable();
    v.dedup();
    v
}

fn since_first(sources: &[Provenance]) -> DateTime<Utc> {
    sources
        .iter()
        .map(|p| p.since)
        .min()
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

fn since_last(sources: &[Provenance]) -> DateTime<Utc> {
    sources
        .iter()
        .map(|p| p.since)
        .max()
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}
