//! Soft-limit counters that every node keeps for itself and gossips to its peers.
//!
//! Each counter slot (a tenant's metric in one window period, as in
//! [`crate::store::SlotSpec`]) is a CRDT from the `crdts` crate with one actor per node: a
//! G-Counter for usage, a PN-Counter for gauges (exposure goes down as well as up). A node
//! decides from its own merged view without any network call; peers exchange per-slot
//! state, and merging is commutative, associative and idempotent, so lost, repeated or
//! reordered messages are harmless and a later message carries everything an earlier
//! one did. Over-admission is therefore bounded by what peers admitted and had not yet
//! told each other: peers × rate × (sync interval + latency).
//!
//! Pure: instants are arguments, the transport belongs to the node.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use crdts::{CmRDT, CvRDT, Dot, GCounter, PNCounter};
use serde::{Deserialize, Serialize};

/// A node, as a CRDT actor.
pub type Actor = String;

/// One counter: a tenant's slot key (`metric|window|period start`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SlotId {
    /// Tenant.
    pub tenant: String,
    /// Slot key within the tenant.
    pub key: String,
}

/// The replicated value of one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SoftCounter {
    /// Usage: only grows within its period.
    Usage(GCounter<Actor>),
    /// A gauge: moves both ways.
    Gauge(PNCounter<Actor>),
}

impl SoftCounter {
    fn new(gauge: bool) -> Self {
        if gauge {
            SoftCounter::Gauge(PNCounter::new())
        } else {
            SoftCounter::Usage(GCounter::new())
        }
    }

    fn value(&self) -> i128 {
        match self {
            SoftCounter::Usage(g) => u64::try_from(&g.read()).map_or(i128::MAX, i128::from),
            SoftCounter::Gauge(p) => i64::try_from(&p.read()).map_or(i128::MAX, i128::from),
        }
    }

    /// What `actor` contributed: (increments, decrements). The crdts types keep their
    /// per-actor counts private; a zero-step op carries the actor's current count.
    fn actor_counts(&self, actor: &Actor) -> (u64, u64) {
        match self {
            SoftCounter::Usage(g) => (g.inc_many(actor.clone(), 0).counter, 0),
            SoftCounter::Gauge(p) => (
                p.inc_many(actor.clone(), 0).dot.counter,
                p.dec_many(actor.clone(), 0).dot.counter,
            ),
        }
    }

    fn merge(&mut self, other: SoftCounter) -> Result<(), SoftError> {
        match (self, other) {
            (SoftCounter::Usage(a), SoftCounter::Usage(b)) => a.merge(b),
            (SoftCounter::Gauge(a), SoftCounter::Gauge(b)) => a.merge(b),
            _ => return Err(SoftError::KindMismatch),
        }
        Ok(())
    }
}

/// A slot as exchanged between nodes and kept on disk: every actor's counts, so that the
/// wire and disk formats do not depend on the crdts crate's internals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotState {
    /// Which slot.
    pub slot: SlotId,
    /// A gauge (PN-Counter) rather than usage (G-Counter).
    pub gauge: bool,
    /// Increments by actor.
    pub inc: BTreeMap<Actor, u64>,
    /// Decrements by actor (gauges only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dec: BTreeMap<Actor, u64>,
    /// When its period ends (for garbage collection); `None` for gauges.
    pub ends_at: Option<DateTime<Utc>>,
}

impl SlotState {
    fn counter(&self) -> Result<SoftCounter, SoftError> {
        match self.gauge {
            false if !self.dec.is_empty() => Err(SoftError::NegativeUsage),
            false => {
                let mut g = GCounter::new();
                for (a, c) in &self.inc {
                    g.apply(Dot::new(a.clone(), *c));
                }
                Ok(SoftCounter::Usage(g))
            }
            true => {
                let mut p = PNCounter::new();
                for (a, c) in &self.inc {
                    p.apply(p.inc_many(a.clone(), *c));
                }
                for (a, c) in &self.dec {
                    p.apply(p.dec_many(a.clone(), *c));
                }
                Ok(SoftCounter::Gauge(p))
            }
        }
    }

    /// The merged value it carries.
    pub fn value(&self) -> i128 {
        let sum = |m: &BTreeMap<Actor, u64>| m.values().map(|v| i128::from(*v)).sum::<i128>();
        sum(&self.inc) - sum(&self.dec)
    }
}

/// What one node sends its peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// The sender.
    pub from: Actor,
    /// The slots it changed (or all of them, for a full exchange).
    pub slots: Vec<SlotState>,
}

/// Why a soft-counter operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SoftError {
    /// A usage counter only grows.
    #[error("amount: a usage counter only takes positive amounts")]
    NegativeUsage,
    /// The same slot arrived as usage from one node and as a gauge from another.
    #[error("a slot is a usage counter on one node and a gauge on another")]
    KindMismatch,
}

#[derive(Debug, Clone)]
struct Entry {
    counter: SoftCounter,
    /// Every actor that counted here, to list their counts.
    actors: BTreeSet<Actor>,
    ends_at: Option<DateTime<Utc>>,
}

/// A node's soft counters: its own counts and what it merged from peers.
#[derive(Debug, Clone)]
pub struct SoftCounters {
    node: Actor,
    slots: BTreeMap<SlotId, Entry>,
    dirty: BTreeSet<SlotId>,
}

impl SoftCounters {
    /// Counters of node `node` (its actor in every CRDT).
    pub fn new(node: impl Into<Actor>) -> Self {
        SoftCounters {
            node: node.into(),
            slots: BTreeMap::new(),
            dirty: BTreeSet::new(),
        }
    }

    /// This node's actor.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Counts `amount` here: positive for usage, signed for gauges.
    pub fn add(
        &mut self,
        slot: &SlotId,
        amount: i64,
        gauge: bool,
        ends_at: Option<DateTime<Utc>>,
    ) -> Result<(), SoftError> {
        if !gauge && amount < 0 {
            return Err(SoftError::NegativeUsage);
        }
        let node = self.node.clone();
        let entry = self.entry(slot, gauge, ends_at)?;
        let steps = amount.unsigned_abs();
        match &mut entry.counter {
            SoftCounter::Usage(g) => g.apply(g.inc_many(node, steps)),
            SoftCounter::Gauge(p) if amount >= 0 => p.apply(p.inc_many(node, steps)),
            SoftCounter::Gauge(p) => p.apply(p.dec_many(node, steps)),
        }
        self.dirty.insert(slot.clone());
        Ok(())
    }

    fn entry(
        &mut self,
        slot: &SlotId,
        gauge: bool,
        ends_at: Option<DateTime<Utc>>,
    ) -> Result<&mut Entry, SoftError> {
        let node = self.node.clone();
        let entry = self.slots.entry(slot.clone()).or_insert_with(|| Entry {
            counter: SoftCounter::new(gauge),
            actors: BTreeSet::new(),
            ends_at,
        });
        if matches!(entry.counter, SoftCounter::Gauge(_)) != gauge {
            return Err(SoftError::KindMismatch);
        }
        entry.actors.insert(node);
        Ok(entry)
    }

    /// Sets this node's own contribution to a slot to `value`, the count its durable
    /// store holds: the store is the truth for what this node admitted, the counter only
    /// spreads it. A usage counter never goes back (a lower value is ignored).
    pub fn set_own(
        &mut self,
        slot: &SlotId,
        value: i64,
        gauge: bool,
        ends_at: Option<DateTime<Utc>>,
    ) -> Result<(), SoftError> {
        if !gauge && value < 0 {
            return Err(SoftError::NegativeUsage);
        }
        let node = self.node.clone();
        let entry = self.entry(slot, gauge, ends_at)?;
        let (inc, dec) = entry.counter.actor_counts(&node);
        let own = i128::from(inc) - i128::from(dec);
        let diff = i128::from(value) - own;
        let steps = u64::try_from(diff.unsigned_abs()).unwrap_or(u64::MAX);
        match &mut entry.counter {
            SoftCounter::Usage(_) if diff <= 0 => return Ok(()),
            SoftCounter::Gauge(_) if diff == 0 => return Ok(()),
            SoftCounter::Usage(g) => g.apply(g.inc_many(node, steps)),
            SoftCounter::Gauge(p) if diff > 0 => p.apply(p.inc_many(node, steps)),
            SoftCounter::Gauge(p) => p.apply(p.dec_many(node, steps)),
        }
        self.dirty.insert(slot.clone());
        Ok(())
    }

    /// Whether a slot is held, and if so whether it is a gauge.
    pub fn is_gauge(&self, slot: &SlotId) -> Option<bool> {
        self.slots
            .get(slot)
            .map(|e| matches!(e.counter, SoftCounter::Gauge(_)))
    }

    /// This node's own contribution to a slot (0 when unknown).
    pub fn own(&self, slot: &SlotId) -> i128 {
        self.slots.get(slot).map_or(0, |e| {
            let (inc, dec) = e.counter.actor_counts(&self.node);
            i128::from(inc) - i128::from(dec)
        })
    }

    /// What the other nodes contributed to a slot, as far as this node knows.
    pub fn others(&self, slot: &SlotId) -> i128 {
        self.value(slot) - self.own(slot)
    }

    /// The merged value of a slot as this node knows it (0 when unknown).
    pub fn value(&self, slot: &SlotId) -> i128 {
        self.slots.get(slot).map_or(0, |e| e.counter.value())
    }

    /// The slots changed here or merged in since the last call, as full slot states.
    pub fn take_delta(&mut self) -> Delta {
        let dirty = std::mem::take(&mut self.dirty);
        Delta {
            from: self.node.clone(),
            slots: dirty.iter().filter_map(|s| self.state(s)).collect(),
        }
    }

    /// Every slot, for a full exchange (after a partition, or a peer that just joined).
    pub fn full_state(&self) -> Delta {
        Delta {
            from: self.node.clone(),
            slots: self.slots.keys().filter_map(|s| self.state(s)).collect(),
        }
    }

    /// One slot as exchanged, if held.
    pub fn state(&self, slot: &SlotId) -> Option<SlotState> {
        self.slots.get(slot).map(|e| {
            let mut inc = BTreeMap::new();
            let mut dec = BTreeMap::new();
            for a in &e.actors {
                let (i, d) = e.counter.actor_counts(a);
                if i > 0 {
                    inc.insert(a.clone(), i);
                }
                if d > 0 {
                    dec.insert(a.clone(), d);
                }
            }
            SlotState {
                slot: slot.clone(),
                gauge: matches!(e.counter, SoftCounter::Gauge(_)),
                inc,
                dec,
                ends_at: e.ends_at,
            }
        })
    }

    /// Merges what a peer sent. Idempotent, and the order of deltas does not matter.
    /// A slot that arrives with the other kind is skipped and reported.
    pub fn merge(&mut self, delta: &Delta) -> Result<(), SoftError> {
        let mut result = Ok(());
        for s in &delta.slots {
            let incoming = match s.counter() {
                Ok(c) => c,
                Err(err) => {
                    result = Err(err);
                    continue;
                }
            };
            let actors = s.inc.keys().chain(s.dec.keys()).cloned();
            match self.slots.get_mut(&s.slot) {
                Some(e) => {
                    let before = e.counter.clone();
                    if let Err(err) = e.counter.merge(incoming) {
                        result = Err(err);
                        continue;
                    }
                    e.actors.extend(actors);
                    if e.counter != before {
                        // Merged news travels on: peers that missed the sender learn it here.
                        self.dirty.insert(s.slot.clone());
                    }
                    e.ends_at = e.ends_at.max(s.ends_at);
                }
                None => {
                    self.slots.insert(
                        s.slot.clone(),
                        Entry {
                            counter: incoming,
                            actors: actors.collect(),
                            ends_at: s.ends_at,
                        },
                    );
                    self.dirty.insert(s.slot.clone());
                }
            }
        }
        result
    }

    /// Forgets slots whose period ended before `now - grace`; gauges are kept. Returns
    /// the slots forgotten.
    pub fn forget_ended(&mut self, now: DateTime<Utc>, grace: chrono::Duration) -> Vec<SlotId> {
        let horizon = now - grace;
        let mut gone = Vec::new();
        self.slots.retain(|s, e| {
            let keep = e.ends_at.is_none_or(|end| end > horizon);
            if !keep {
                gone.push(s.clone());
            }
            keep
        });
        let slots = &self.slots;
        self.dirty.retain(|s| slots.contains_key(s));
        gone
    }

    /// Number of slots held.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no slot is held.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}
