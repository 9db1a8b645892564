//! The catalog as written by people: metrics, features, versioned plans and add-ons.
//!
//! These types are the file format (YAML or JSON, see [`super::load`]) and the in-memory
//! form at once; unknown fields are rejected everywhere so a typo never silently does
//! nothing. Semantic rules (references, windows, immutability of published versions) live
//! in [`super::validate`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::unique::unique_map;
use crate::lifecycle::Status;
use crate::status_machine::{StatusMachine, DEFAULT_GRACE_DAYS};
use crate::window::Window;

/// The whole catalog: what can be sold and what each offer grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// Format version of this file; only `1` exists.
    pub version: u32,
    /// The ISO 4217 code prices are in (`USD`, `EUR`); required once a plan sets a
    /// `unit_price`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// How many days a subscription stays in `grace` before it is suspended, counted from
    /// when it entered grace; absent means [`DEFAULT_GRACE_DAYS`]. See
    /// [`Catalog::status_machine`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_days: Option<u32>,
    /// What each subscription status allows: a level, and optionally features it turns
    /// off and metrics that stay consumable (see [`AccessRule`]). Statuses left out keep
    /// their default (see [`default_access`]).
    #[serde(default, deserialize_with = "unique_map")]
    pub access: BTreeMap<Status, AccessRule>,
    /// Counted quantities, by code.
    #[serde(deserialize_with = "unique_map")]
    pub metrics: BTreeMap<String, MetricDef>,
    /// Keys the product gates on, by code.
    #[serde(default, deserialize_with = "unique_map")]
    pub features: BTreeMap<String, FeatureDef>,
    /// Plans, by code.
    #[serde(deserialize_with = "unique_map")]
    pub plans: BTreeMap<String, PlanDef>,
    /// Add-ons, by code.
    #[serde(default, deserialize_with = "unique_map")]
    pub addons: BTreeMap<String, AddonDef>,
}

impl Catalog {
    /// The state machine this catalog configures: the one rule for what time does to a
    /// subscription (trial end, grace end, scheduled changes), used by resolution, the
    /// ledger and every status change.
    pub fn status_machine(&self) -> StatusMachine {
        StatusMachine::new(self.grace_days.unwrap_or(DEFAULT_GRACE_DAYS))
    }

    /// The access rule of `status`: as declared, else the default level alone.
    pub fn access_rule(&self, status: Status) -> AccessRule {
        self.access
            .get(&status)
            .cloned()
            .unwrap_or_else(|| AccessRule::level(default_access(status)))
    }
}

/// What a status allows, as the catalog declares it under `access`.
///
/// Written either as a plain level (`grace: read_only`), or as a map that refines the
/// level feature by feature and metric by metric:
///
/// ```yaml
/// access:
///   grace:
///     level: read_only            # features checkable, nothing consumable…
///     features_off: [bulk_export] # …these features off as well…
///     consumable: [seats]         # …and these metrics still consumable
/// ```
///
/// Both lists name exceptions to the level rather than restating the plan, so a catalog
/// keeps one list per status however many plans it has, and a feature or metric added
/// later falls under the level until someone decides otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AccessRule {
    /// The level: `full`, `read_only` or `none`.
    pub level: AccessLevel,
    /// Features this status turns off, whatever the plan, add-ons and overrides grant
    /// (a metered one closes its metric too). Not with level `none`, where every
    /// request is refused already.
    pub features_off: Vec<String>,
    /// Level `read_only` only: metrics that may still be consumed (reserve, record).
    pub consumable: Vec<String>,
}

impl AccessRule {
    /// A plain level, with no exceptions.
    pub fn level(level: AccessLevel) -> AccessRule {
        AccessRule {
            level,
            features_off: Vec::new(),
            consumable: Vec::new(),
        }
    }
}

/// The map form of [`AccessRule`] in files.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessRuleMap {
    level: AccessLevel,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    features_off: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    consumable: Vec<String>,
}

impl Serialize for AccessRule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // A rule without exceptions is written as its level, as people write it.
        if self.features_off.is_empty() && self.consumable.is_empty() {
            return self.level.serialize(s);
        }
        AccessRuleMap {
            level: self.level,
            features_off: self.features_off.clone(),
            consumable: self.consumable.clone(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for AccessRule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = AccessRule;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "an access level (full, read_only, none) or a map with level, features_off, consumable",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<AccessRule, E> {
                AccessLevel::deserialize(serde::de::value::StrDeserializer::<E>::new(v))
                    .map(AccessRule::level)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, m: A) -> Result<AccessRule, A::Error> {
                let r =
                    AccessRuleMap::deserialize(serde::de::value::MapAccessDeserializer::new(m))?;
                Ok(AccessRule {
                    level: r.level,
                    features_off: r.features_off,
                    consumable: r.consumable,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// What a subscription in some status may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessLevel {
    /// Everything the entitlements allow.
    Full,
    /// Features can be checked, but nothing can be consumed (no reserve, no record).
    ReadOnly,
    /// Every request is denied.
    None,
}

impl AccessLevel {
    /// The name used in files and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            AccessLevel::Full => "full",
            AccessLevel::ReadOnly => "read_only",
            AccessLevel::None => "none",
        }
    }
}

/// The access level of `status` when the catalog does not say: active and trial
/// subscriptions (and past-due ones, which are still being collected) get full access,
/// grace is read-only, everything else none.
pub fn default_access(status: Status) -> AccessLevel {
    match status {
        Status::Trialing | Status::Active | Status::PastDue => AccessLevel::Full,
        Status::Grace => AccessLevel::ReadOnly,
        Status::Pending
        | Status::Suspended
        | Status::Canceled
        | Status::Refunded
        | Status::Chargeback => AccessLevel::None,
    }
}

/// A counted quantity. Amounts are integers in the metric's smallest unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricDef {
    /// The unit one amount counts, for people (`call`, `seat`, `usd_micros`).
    pub unit: String,
    /// Whether usage only grows within a window (`counter`) or goes up and down (`gauge`).
    #[serde(default)]
    pub kind: MetricKind,
    /// Free text for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// How a metric's usage moves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    /// Only positive amounts; resets with its window.
    #[default]
    Counter,
    /// Signed adjustments, never below zero, window `none` (seats, credit exposure).
    Gauge,
}

/// A key the product gates on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureDef {
    /// What sort of value the feature has.
    pub kind: FeatureKind,
    /// For `metered` features: the metric whose limits grant the feature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    /// How grants from the plan, add-ons and overrides combine. Defaults: `union` for
    /// boolean, `precedence` for config, `sum` for metered (quotas; rate limits always
    /// take the `max`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<MergeRule>,
    /// Free text for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// The sort of value a feature has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureKind {
    /// On or off.
    Boolean,
    /// A value: number, string or list of strings.
    Config,
    /// Granted by having limits on a metric.
    Metered,
}

/// How several grants of one feature combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeRule {
    /// Booleans: on if any grant is on. Lists: the union of the items.
    Union,
    /// Quotas: the amounts add up.
    Sum,
    /// Numbers and quotas: the largest wins.
    Max,
    /// Numbers and quotas: the smallest wins.
    Min,
    /// Config: an override beats add-ons (higher `priority` first, then code), which beat
    /// the plan.
    Precedence,
}

impl MergeRule {
    /// The name used in files.
    pub fn as_str(self) -> &'static str {
        match self {
            MergeRule::Union => "union",
            MergeRule::Sum => "sum",
            MergeRule::Max => "max",
            MergeRule::Min => "min",
            MergeRule::Precedence => "precedence",
        }
    }
}

/// A value granted for a feature by a plan or add-on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FeatureValue {
    /// A boolean feature (or a metered one granted without limits, i.e. unlimited).
    Bool(bool),
    /// A numeric config value.
    Int(i64),
    /// A string config value.
    Str(String),
    /// A list config value.
    List(Vec<String>),
}

impl std::fmt::Display for FeatureValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FeatureValue::Bool(b) => write!(f, "{b}"),
            FeatureValue::Int(i) => write!(f, "{i}"),
            FeatureValue::Str(s) => f.write_str(s),
            FeatureValue::List(l) => write!(f, "[{}]", l.join(", ")),
        }
    }
}

/// A plan: a named series of immutable versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanDef {
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Order among plans for upgrade hints: a higher tier is suggested after a lower one.
    #[serde(default)]
    pub tier: u32,
    /// Versions by number. A published version never changes; a change needs a new one.
    #[serde(deserialize_with = "unique_map")]
    pub versions: BTreeMap<u32, Bundle>,
}

impl PlanDef {
    /// The newest published version, the one new subscriptions and upgrade hints use.
    pub fn latest_published(&self) -> Option<(u32, &Bundle)> {
        self.versions
            .iter()
            .rev()
            .find(|(_, b)| b.published)
            .map(|(v, b)| (*v, b))
    }
}

/// What a plan version or an add-on grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    /// Published bundles are immutable (plans only; add-ons ignore it).
    #[serde(default = "yes")]
    pub published: bool,
    /// Feature grants by feature code.
    #[serde(default, deserialize_with = "unique_map")]
    pub features: BTreeMap<String, FeatureValue>,
    /// Limits by metric code.
    #[serde(default, deserialize_with = "unique_map")]
    pub limits: BTreeMap<String, Vec<LimitDef>>,
}

fn yes() -> bool {
    true
}

/// An add-on: a bundle stacked on a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddonDef {
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Precedence for config values: higher wins.
    #[serde(default)]
    pub priority: i32,
    /// Plans this add-on may be added to; empty means every plan.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plans: Vec<String>,
    /// Feature grants by feature code.
    #[serde(default, deserialize_with = "unique_map")]
    pub features: BTreeMap<String, FeatureValue>,
    /// Limits by metric code; quotas multiply by the subscription's quantity.
    #[serde(default, deserialize_with = "unique_map")]
    pub limits: BTreeMap<String, Vec<LimitDef>>,
}

/// A limit on a metric.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitDef {
    /// The period the amount is counted over.
    pub window: Window,
    /// Units per window (hour, day, month, billing_period, none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<u64>,
    /// Units per second or minute (windows `second` and `minute`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u64>,
    /// Units that may be taken at once by a rate limit; defaults to `rate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    /// `hard` (never exceeded) or `soft` (warn, then overage or deny).
    #[serde(default)]
    pub enforcement: Enforcement,
    /// Percentages of the amount past which decisions carry a warning; default `[80]` for
    /// quota and gauge windows. Rate windows have none (they answer with `retry_after`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn_at: Option<Vec<u8>>,
    /// Soft limits only: units allowed past the amount (`0` denies at the amount;
    /// absent means unbounded overage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overage: Option<u64>,
    /// Largest amount one request may take (e.g. no single booking over 3,000 USD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_per_request: Option<u64>,
    /// Rate limits only: a request dimension that gets a bucket of its own (`api_key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per: Option<String>,
    /// Rate limits only: whose bucket it is, `node` (the default: each node runs a share
    /// of it) or `global` (one bucket in the shared store). Absent means `node`; written
    /// out on a quota or gauge window it is an error, so a misplaced one never silently
    /// does nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    /// What to decide when the shared store cannot be reached.
    #[serde(default)]
    pub on_backend_failure: FailurePolicy,
    /// Plans only, on a `billing_period` or `month` limit (the one billing counts
    /// against): the price of each unit past the included amount, a decimal string in
    /// the catalog's `currency` (`"0.002"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_price: Option<crate::billing::Price>,
}

impl LimitDef {
    /// The scope in force: as written, else `node`.
    pub fn scope(&self) -> Scope {
        self.scope.unwrap_or_default()
    }

    /// The warning thresholds in force: as written, else the window's default.
    pub fn warn_at(&self) -> Vec<u8> {
        match &self.warn_at {
            Some(w) => w.clone(),
            None if self.window.is_rate() => Vec::new(),
            None => vec![80],
        }
    }
}

/// Whether a limit may be passed.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    /// Never exceeded: requests that would pass it are denied.
    #[default]
    Hard,
    /// Warned about; past it, overage up to the allowance, then denied.
    Soft,
}

/// Where a rate limit's bucket lives.
///
/// Declared in this order so that `max` picks `global` when grants disagree: one shared
/// bucket is the stricter reading (node shares admit up to `n × ceil(burst / n)` at once,
/// a shared bucket exactly `burst`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Each of the `n` live nodes runs its own bucket with `rate / n` and
    /// `ceil(burst / n)`: no network on the hot path, and a bound on the total, not one
    /// bucket (see [`crate::gcra::Gcra::per_node`]).
    #[default]
    Node,
    /// One bucket in the shared store (Redis) for every node, taken atomically; on a
    /// single node without a shared store, the node's own bucket with the whole limit.
    Global,
}

impl Scope {
    /// The name used in files and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Node => "node",
            Scope::Global => "global",
        }
    }
}

/// What a limit decides when its backend is down.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Deny (the safe default for money-like limits).
    #[default]
    FailClosed,
    /// Allow, say so in the reason, reconcile later.
    FailOpen,
}
