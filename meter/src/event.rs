//! Usage events: what happened to a tenant's metric, one record per commit, record,
//! release, expiry and denial, for billing and analytics.
//!
//! A store writes the event of a change in the same atomic step as the change itself (the
//! embedded store's spool, a Redis stream per partition), so a counter never moves without
//! its event and an acknowledged answer always has its event on disk. What it writes is a
//! [`Spooled`] entry: the request's context ([`Pending`], the same JSON the store keeps for
//! replays) and the usage it saw; [`Spooled::finish`] derives the complete [`UsageEvent`]
//! with the decision the request got, with the same code the node decides with.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::decision::{Decision, Outcome};
use crate::quota::{QuotaSlot, RequestPlan};
use crate::resolve::Entitlements;
use crate::store::SlotUsage;
use crate::window::Window;

/// What an event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A reservation was committed: `amount` units were used.
    Commit,
    /// Units counted at once (signed for gauges).
    Record,
    /// A reservation was returned unused (amount: what was held).
    Release,
    /// A reservation lapsed at its TTL (amount: what was held).
    Expire,
    /// A request was refused (amount: what was asked).
    Denial,
}

impl EventKind {
    /// The wire code.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Commit => "commit",
            EventKind::Record => "record",
            EventKind::Release => "release",
            EventKind::Expire => "expire",
            EventKind::Denial => "denial",
        }
    }

    /// Whether the event's amount counts as usage (billing sums these).
    pub fn is_usage(self) -> bool {
        matches!(self, EventKind::Commit | EventKind::Record)
    }
}

/// One usage event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageEvent {
    /// Unique per event: the client's event id for records; `<reservation id>/commit`,
    /// `/release` or `/expire` for settlements; a fresh id for denials.
    pub id: String,
    /// When it happened (the event time a client gave to Record, else the node's clock).
    pub at: DateTime<Utc>,
    /// What happened.
    pub kind: EventKind,
    /// Tenant.
    pub tenant: String,
    /// Metric code.
    pub metric: String,
    /// Units (see [`EventKind`]).
    pub amount: i64,
    /// The deciding window, if any (`day`, `month`…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// Plan code in force.
    pub plan: String,
    /// Its version.
    pub plan_version: u32,
    /// `allow`, `allow_with_warning` or `deny`.
    pub outcome: String,
    /// The decision's reason code.
    pub reason: String,
    /// Counted past a soft limit.
    #[serde(default)]
    pub overage: bool,
    /// Decided while the shared store was unreachable (fail open), reconciled later.
    #[serde(default)]
    pub degraded: bool,
    /// Request dimensions (`api_key`, `endpoint_class`…).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dimensions: BTreeMap<String, String>,
    /// The node that decided.
    pub node: String,
    /// The billing allowance in force for it: the tenant's billing-period limit of the
    /// metric (or its month limit, without one) when it was decided, add-ons and
    /// overrides in; `None`: no such limit. Billing counts overage against it
    /// ([`crate::billing`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub included: Option<u64>,
    /// The billing period `included` belongs to, by the local year and month it starts
    /// in (`2026-11`); `None` with no such limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billing_period: Option<String>,
}

/// Streams (with Redis) or spool partitions events are spread over, by tenant. Fixed: a
/// tenant's keys and its partition's stream share one hash tag, so changing this moves
/// every tenant.
pub const PARTITIONS: u16 = 64;

/// The Redis stream of a partition. Its hash tag is the one of every key of the
/// partition's tenants ([`hash_tag`]), so a script can count and append in one step, in one
/// Cluster slot.
pub fn stream_key(partition: u16) -> String {
    format!("al:{{p{partition:02}}}:ev")
}

/// The Redis key of a tenant's `kind` (`al:{pNN}:tenant:kind`): every key of a tenant
/// carries its partition's hash tag, the tag of the partition's stream too, so one script
/// can count and append the event in one Cluster slot.
pub fn tenant_key(tenant: &str, kind: &str) -> String {
    format!("al:{{{}}}:{tenant}:{kind}", hash_tag(tenant))
}

/// The Redis key of one item of a tenant's `kind` (`al:{pNN}:tenant:kind:rest`).
pub fn item_key(tenant: &str, kind: &str, rest: &str) -> String {
    format!("{}:{rest}", tenant_key(tenant, kind))
}

/// The stream of a tenant's partition.
pub fn tenant_stream(tenant: &str) -> String {
    stream_key(partition(tenant))
}

/// The hash tag of a tenant's keys: its partition.
pub fn hash_tag(tenant: &str) -> String {
    format!("p{:02}", partition(tenant))
}

/// The partition of a tenant (FNV-1a of its id, stable across versions and platforms).
pub fn partition(tenant: &str) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in tenant.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % u32::from(PARTITIONS)) as u16
}

/// What a store keeps with a grant and writes beside each event: enough to decide the
/// request again from the usage the store saw (a replay answers as the first time; an
/// event gets its decision fields), plus who asked and under which plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// Tenant.
    pub tenant: String,
    /// Metric code.
    pub metric: String,
    /// Units asked for.
    pub amount: i64,
    /// Whether the metric is a gauge.
    pub gauge: bool,
    /// The counter slots of the request, in the order the store saw them.
    pub slots: Vec<QuotaSlot>,
    /// Plan code in force.
    pub plan: String,
    /// Its version.
    pub plan_version: u32,
    /// Request dimensions.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dimensions: BTreeMap<String, String>,
    /// The node that decided.
    pub node: String,
    /// Decided while the shared store was unreachable.
    #[serde(default)]
    pub degraded: bool,
    /// Decided before any store was asked (a denial by a rate limit, the plan, the
    /// subscription's status…): the decision as it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided: Option<Decision>,
}

impl Pending {
    /// The context of `plan` for `ent`'s tenant.
    pub fn of(
        plan: &RequestPlan,
        ent: &Entitlements,
        dimensions: &BTreeMap<String, String>,
        node: &str,
    ) -> Pending {
        Pending {
            tenant: ent.tenant.clone(),
            metric: plan.metric.clone(),
            amount: plan.amount,
            gauge: plan.gauge,
            slots: plan.slots.clone(),
            plan: ent.plan.code.clone(),
            plan_version: ent.plan.version,
            dimensions: dimensions.clone(),
            node: node.to_string(),
            degraded: false,
            decided: None,
        }
    }

    /// The context of a request refused before any store was asked: its event carries
    /// the decision as it was.
    pub fn decided(
        ent: &Entitlements,
        metric: &str,
        amount: i64,
        dimensions: &BTreeMap<String, String>,
        node: &str,
        decision: &Decision,
    ) -> Pending {
        Pending {
            tenant: ent.tenant.clone(),
            metric: metric.to_string(),
            amount,
            gauge: false,
            slots: Vec::new(),
            plan: ent.plan.code.clone(),
            plan_version: ent.plan.version,
            dimensions: dimensions.clone(),
            node: node.to_string(),
            degraded: false,
            decided: Some(decision.clone()),
        }
    }

    /// The JSON kept by stores.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("contexts serialize")
    }

    /// Reads the JSON kept by stores.
    pub fn from_json(s: &str) -> Result<Pending, serde_json::Error> {
        serde_json::from_str(s)
    }

    /// The decision the request got, given the usage the store saw before it (one entry
    /// per slot) and whether the store admitted it.
    pub fn decide(&self, usage: &[SlotUsage], admitted: bool) -> Decision {
        if let Some(d) = &self.decided {
            return d.clone();
        }
        let plan = RequestPlan {
            metric: self.metric.clone(),
            amount: self.amount,
            gauge: self.gauge,
            slots: self.slots.clone(),
            rates: vec![],
        };
        if self.degraded {
            return crate::quota::degraded(&plan);
        }
        crate::quota::decide(&plan, usage, admitted)
    }
}

/// An event as a store writes it, in the same atomic step as the change it records: the
/// request's context and the usage the store saw, from which [`Spooled::finish`] derives
/// the decision fields. Streams and spools keep it as string fields (see
/// [`Spooled::to_fields`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spooled {
    /// What happened.
    pub kind: EventKind,
    /// Event id.
    pub id: String,
    /// Units.
    pub amount: i64,
    /// When, in unix milliseconds.
    pub at_ms: i64,
    /// The request's context ([`Pending`] JSON).
    pub context: String,
    /// Usage per slot before the request, as the store saw it.
    pub usage: Vec<SlotUsage>,
    /// Whether the store admitted it.
    pub granted: bool,
}

/// Why a spooled event could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spooled event field {field}: {reason}")]
pub struct SpoolError {
    /// The field.
    pub field: &'static str,
    /// Why.
    pub reason: String,
}

fn spool_error(field: &'static str, reason: impl ToString) -> SpoolError {
    SpoolError {
        field,
        reason: reason.to_string(),
    }
}

impl Spooled {
    /// The fields a stream entry or spool row holds: k (kind), i (id), a (amount), t (unix
    /// ms), c (context JSON), u (usage: used,reserved per slot, comma-separated), g (1
    /// granted, 0 refused).
    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("k", self.kind.as_str().to_string()),
            ("i", self.id.clone()),
            ("a", self.amount.to_string()),
            ("t", self.at_ms.to_string()),
            ("c", self.context.clone()),
            ("u", usage_csv(&self.usage)),
            ("g", if self.granted { "1" } else { "0" }.to_string()),
        ]
    }

    /// Reads the fields back.
    pub fn from_fields<'a>(
        fields: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Spooled, SpoolError> {
        let mut m: BTreeMap<&str, &str> = BTreeMap::new();
        for (k, v) in fields {
            m.insert(k, v);
        }
        let get = |f: &'static str| m.get(f).copied().ok_or_else(|| spool_error(f, "missing"));
        let kind = match get("k")? {
            "commit" => EventKind::Commit,
            "record" => EventKind::Record,
            "release" => EventKind::Release,
            "expire" => EventKind::Expire,
            "denial" => EventKind::Denial,
            other => return Err(spool_error("k", format!("unknown kind {other:?}"))),
        };
        Ok(Spooled {
            kind,
            id: get("i")?.to_string(),
            amount: get("a")?.parse().map_err(|e| spool_error("a", e))?,
            at_ms: get("t")?.parse().map_err(|e| spool_error("t", e))?,
            context: get("c")?.to_string(),
            usage: parse_usage(m.get("u").copied().unwrap_or(""))?,
            granted: get("g")? == "1",
        })
    }

    /// The complete event, with the decision the request got.
    pub fn finish(&self) -> Result<UsageEvent, SpoolError> {
        let p = Pending::from_json(&self.context).map_err(|e| spool_error("c", e))?;
        let at = DateTime::<Utc>::from_timestamp_millis(self.at_ms)
            .ok_or_else(|| spool_error("t", "out of range"))?;
        let d = p.decide(&self.usage, self.granted);
        let billing = [Window::BillingPeriod, Window::Month]
            .iter()
            .find_map(|w| p.slots.iter().find(|s| s.window == *w));
        Ok(UsageEvent {
            id: self.id.clone(),
            at,
            kind: self.kind,
            tenant: p.tenant,
            metric: p.metric,
            amount: self.amount,
            window: d.window.map(|w| w.as_str().to_string()),
            plan: p.plan,
            plan_version: p.plan_version,
            outcome: outcome_code(d.outcome).to_string(),
            reason: d.reason.as_str().to_string(),
            overage: d.overage,
            degraded: p.degraded,
            dimensions: p.dimensions,
            node: p.node,
            included: billing.map(|s| s.limit),
            billing_period: billing.and_then(|s| s.period.clone()),
        })
    }
}

/// The wire code of an outcome.
pub fn outcome_code(o: Outcome) -> &'static str {
    match o {
        Outcome::Allow => "allow",
        Outcome::AllowWithWarning => "allow_with_warning",
        Outcome::Deny => "deny",
    }
}

impl UsageEvent {
    /// The JSON form (for people and tools; ClickHouse gets columns).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("events serialize")
    }

    /// Reads the JSON form.
    pub fn from_json(s: &str) -> Result<UsageEvent, serde_json::Error> {
        serde_json::from_str(s)
    }
}

fn usage_csv(usage: &[SlotUsage]) -> String {
    let mut out = String::new();
    for (i, u) in usage.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!("{},{}", u.used, u.reserved));
    }
    out
}

fn parse_usage(s: &str) -> Result<Vec<SlotUsage>, SpoolError> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    let nums: Vec<u64> = s
        .split(',')
        .map(|n| n.parse().map_err(|e| spool_error("u", e)))
        .collect::<Result<_, _>>()?;
    if !nums.len().is_multiple_of(2) {
        return Err(spool_error("u", "odd number of values"));
    }
    Ok(nums
        .chunks(2)
        .map(|c| SlotUsage {
            used: c[0],
            reserved: c[1],
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SlotSpec;
    use crate::window::Window;

    fn pending() -> Pending {
        Pending {
            tenant: "acme".into(),
            metric: "api_calls".into(),
            amount: 5,
            gauge: false,
            slots: vec![QuotaSlot {
                window: Window::Day,
                limit: 100,
                soft: true,
                warn_at: vec![80],
                resets_at: None,
                spec: SlotSpec {
                    key: "api_calls|day|0".into(),
                    cap: None,
                    ends_at: None,
                },
                fail_open: false,
                period: None,
            }],
            plan: "pro".into(),
            plan_version: 2,
            dimensions: [("api_key".to_string(), "k1".to_string())].into(),
            node: "n1".into(),
            degraded: false,
            decided: None,
        }
    }

    #[test]
    fn spooled_fields_round_trip_and_finish_with_the_decision() {
        let s = Spooled {
            kind: EventKind::Record,
            id: "ev-1".into(),
            amount: 5,
            at_ms: 1_700_000_000_000,
            context: pending().to_json(),
            usage: vec![SlotUsage {
                used: 98,
                reserved: 0,
            }],
            granted: true,
        };
        let fields = s.to_fields();
        let back = Spooled::from_fields(fields.iter().map(|(k, v)| (*k, v.as_str()))).unwrap();
        assert_eq!(back, s);
        let e = back.finish().unwrap();
        // 98 + 5 past the soft limit of 100: overage, and it says so.
        assert_eq!(
            e.to_json(),
            r#"{"id":"ev-1","at":"2023-11-14T22:13:20Z","kind":"record","tenant":"acme","metric":"api_calls","amount":5,"window":"day","plan":"pro","plan_version":2,"outcome":"allow_with_warning","reason":"overage","overage":true,"degraded":false,"dimensions":{"api_key":"k1"},"node":"n1"}"#
        );
        assert_eq!(UsageEvent::from_json(&e.to_json()).unwrap(), e);
        assert!(e.kind.is_usage() && !EventKind::Denial.is_usage());
    }

    #[test]
    fn the_billing_allowance_is_the_billing_period_or_month_limit_in_force() {
        let mut p = pending();
        let spooled = |p: &Pending| Spooled {
            kind: EventKind::Record,
            id: "e".into(),
            amount: 1,
            at_ms: 0,
            context: p.to_json(),
            usage: vec![SlotUsage::default(); p.slots.len()],
            granted: true,
        };
        assert_eq!(spooled(&p).finish().unwrap().included, None);
        let mut month = p.slots[0].clone();
        month.window = Window::Month;
        month.limit = 700;
        p.slots.push(month.clone());
        assert_eq!(spooled(&p).finish().unwrap().included, Some(700));
        month.window = Window::BillingPeriod;
        month.limit = 900;
        month.period = Some("2026-10".into());
        p.slots.push(month);
        let e = spooled(&p).finish().unwrap();
        assert_eq!(e.included, Some(900));
        assert_eq!(e.billing_period.as_deref(), Some("2026-10"));
    }

    #[test]
    fn malformed_fields_name_the_field() {
        let err = Spooled::from_fields([("k", "record"), ("i", "x")]).unwrap_err();
        assert_eq!(err.field, "a");
        let err = Spooled::from_fields([
            ("k", "spend"),
            ("i", "x"),
            ("a", "1"),
            ("t", "0"),
            ("c", "{}"),
            ("g", "1"),
        ])
        .unwrap_err();
        assert_eq!(err.field, "k");
        let err = Spooled::from_fields([
            ("k", "record"),
            ("i", "x"),
            ("a", "1"),
            ("t", "0"),
            ("c", "{}"),
            ("u", "1,2,3"),
            ("g", "1"),
        ])
        .unwrap_err();
        assert_eq!(err.field, "u");
    }

    #[test]
    fn partitions_are_stable_and_spread() {
        assert_eq!(partition("acme"), partition("acme"));
        let used: std::collections::BTreeSet<u16> =
            (0..1000).map(|i| partition(&format!("t{i}"))).collect();
        assert_eq!(used.len(), PARTITIONS as usize);
        assert!(used.iter().all(|p| *p < PARTITIONS));
    }
}
