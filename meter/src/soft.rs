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
use crdts::{CmRDT, CvRDT, GCounter, PNCounter};
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SoftCounter {
    /// Usage: only grows within its period.
    Usage(GCounter<Actor>),
    /// A gauge: moves both ways.
    Gauge(PNCounter<Actor>),
}

impl SoftCounter {
    fn value(&self) -> i128 {
        match self {
            SoftCounter::Usage(g) => u64::try_from(&g.read()).map_or(i128::MAX, i128::from),
            SoftCounter::Gauge(p) => i64::try_from(&p.read()).map_or(i128::MAX, i128::from),
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

/// A slot as exchanged between nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotState {
    /// Which slot.
    pub slot: SlotId,
    /// Its counter.
    pub counter: SoftCounter,
    /// When its period ends (for garbage collection); `None` for gauges.
    pub ends_at: Option<DateTime<Utc>>,
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
        let entry = self.slots.entry(slot.clone()).or_insert_with(|| Entry {
            counter: if gauge {
                SoftCounter::Gauge(PNCounter::new())
            } else {
                SoftCounter::Usage(GCounter::new())
            },
            ends_at,
        });
        let steps = amount.unsigned_abs();
        match &mut entry.counter {
            SoftCounter::Usage(g) => g.apply(g.inc_many(self.node.clone(), steps)),
            SoftCounter::Gauge(p) if amount >= 0 => p.apply(p.inc_many(self.node.clone(), steps)),
            SoftCounter::Gauge(p) => p.apply(p.dec_many(self.node.clone(), steps)),
        }
        self.dirty.insert(slot.clone());
        Ok(())
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

    fn state(&self, slot: &SlotId) -> Option<SlotState> {
        self.slots.get(slot).map(|e| SlotState {
            slot: slot.clone(),
            counter: e.counter.clone(),
            ends_at: e.ends_at,
        })
    }

    /// Merges what a peer sent. Idempotent, and the order of deltas does not matter.
    /// A slot that arrives with the other kind is skipped and reported.
    pub fn merge(&mut self, delta: &Delta) -> Result<(), SoftError> {
        let mut result = Ok(());
        for s in &delta.slots {
            match self.slots.get_mut(&s.slot) {
                Some(e) => {
                    let before = e.counter.clone();
                    if let Err(err) = e.counter.merge(s.counter.clone()) {
                        result = Err(err);
                        continue;
                    }
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
                            counter: s.counter.clone(),
                            ends_at: s.ends_at,
                        },
                    );
                    self.dirty.insert(s.slot.clone());
                }
            }
        }
        result
    }

    /// Forgets slots whose period ended before `now - grace`; gauges are kept.
    pub fn forget_ended(&mut self, now: DateTime<Utc>, grace: chrono::Duration) {
        let horizon = now - grace;
        self.slots
            .retain(|_, e| e.ends_at.is_none_or(|end| end > horizon));
        let slots = &self.slots;
        self.dirty.retain(|s| slots.contains_key(s));
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
