//! The node's soft-limit counters: the CRDTs of `meter::soft`, shared by the request path
//! and the peer exchange, and kept on local disk.
//!
//! This node's own contribution to a slot is always set from its durable store (the count
//! the store acknowledged), never added to separately, so a crash, a replayed request or a
//! restart can neither lose nor double it: after a restart the next touch of a slot sets it
//! again from the store. What peers contributed comes from their messages and is also
//! written to `soft.redb`, so that a node that restarts while a peer is gone still knows
//! that peer's counts (a node that leaves is forgotten; its counts stay).

use std::path::Path;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use meter::soft::{Delta, SlotId, SlotState, SoftCounters};
use meter::store::StoreError;
use redb::{Database, ReadableTable, TableDefinition};

const SLOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("soft_slots");

/// The soft counters of one node.
pub struct SoftState {
    counters: Mutex<SoftCounters>,
    db: Option<Database>,
    /// Serializes disk writes of merged state, so that a later write never carries an
    /// older merge than an earlier one.
    writing: Mutex<()>,
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("soft counters: {e}"))
}

fn row_key(s: &SlotId) -> String {
    format!("{}\n{}", s.tenant, s.key)
}

impl SoftState {
    /// Counters in memory only (engines built for tests).
    pub fn in_memory(node: &str) -> Self {
        SoftState {
            counters: Mutex::new(SoftCounters::new(node)),
            db: None,
            writing: Mutex::new(()),
        }
    }

    /// The counters of node `node`, loaded from `dir/soft.redb`.
    pub fn open(node: &str, dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(io)?;
        let db = Database::create(dir.join("soft.redb")).map_err(io)?;
        let mut counters = SoftCounters::new(node);
        let tx = db.begin_read().map_err(io)?;
        match tx.open_table(SLOTS) {
            Ok(t) => {
                let mut slots = Vec::new();
                for row in t.iter().map_err(io)? {
                    let (_, v) = row.map_err(io)?;
                    let s: SlotState = serde_json::from_slice(v.value())
                        .map_err(|e| StoreError::Corrupt(format!("soft.redb: {e}")))?;
                    slots.push(s);
                }
                counters
                    .merge(&Delta {
                        from: node.to_string(),
                        slots,
                    })
                    .map_err(|e| StoreError::Corrupt(format!("soft.redb: {e}")))?;
                // What was loaded is not news to peers: they get it in the full exchange.
                counters.take_delta();
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(io(e)),
        }
        Ok(SoftState {
            counters: Mutex::new(counters),
            db: Some(db),
            writing: Mutex::new(()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SoftCounters> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This node's actor.
    pub fn node(&self) -> String {
        self.lock().node().to_string()
    }

    /// What other nodes contributed to a slot (never below 0).
    pub fn others(&self, slot: &SlotId) -> u64 {
        clamp(self.lock().others(slot))
    }

    /// Sets this node's contribution to what its store holds; see the module docs.
    pub fn set_own(&self, slot: &SlotId, used: u64, gauge: bool, ends_at: Option<DateTime<Utc>>) {
        let used = i64::try_from(used).unwrap_or(i64::MAX);
        if let Err(e) = self.lock().set_own(slot, used, gauge, ends_at) {
            // Only a slot that changed kind (a metric redefined as a gauge mid-period) gets
            // here; its old counts keep deciding until the period ends.
            tracing::warn!(tenant = %slot.tenant, slot = %slot.key, error = %e, "soft counter not updated");
        }
    }

    /// Whether a slot is held, and if so whether it is a gauge.
    pub fn is_gauge(&self, slot: &SlotId) -> Option<bool> {
        self.lock().is_gauge(slot)
    }

    /// Slots changed since the last call.
    pub fn take_delta(&self) -> Delta {
        self.lock().take_delta()
    }

    /// Every slot.
    pub fn full_state(&self) -> Delta {
        self.lock().full_state()
    }

    /// Merges what a peer sent, writing the merged slots to disk first: once the node
    /// answers with a peer's counts, they survive its restart even if that peer is gone.
    /// Blocking (a synced write).
    pub fn merge(&self, delta: &Delta) -> Result<(), StoreError> {
        let _w = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        if self.db.is_some() && !delta.slots.is_empty() {
            let merged = {
                let c = self.lock();
                let mut next = SoftCounters::new(c.node());
                let current: Vec<SlotState> = delta
                    .slots
                    .iter()
                    .filter_map(|s| c.state(&s.slot))
                    .collect();
                drop(c);
                let _ = next.merge(&Delta {
                    from: delta.from.clone(),
                    slots: current,
                });
                let _ = next.merge(delta);
                next.full_state()
            };
            self.write(&merged)?;
        }
        if let Err(e) = self.lock().merge(delta) {
            tracing::warn!(from = %delta.from, error = %e, "peer state partly refused");
        }
        Ok(())
    }

    /// Number of slots held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no slot is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every slot held (to set this node's contributions from its store after a start).
    pub fn slots(&self) -> Vec<(SlotId, bool)> {
        self.lock()
            .full_state()
            .slots
            .into_iter()
            .map(|s| (s.slot, s.gauge))
            .collect()
    }

    /// Writes changed slots to disk, synced (redb's lighter durability levels keep the
    /// write in memory until a later synced commit, so a killed process would lose it).
    /// Called once per sync interval with what changed meanwhile.
    pub fn persist(&self, delta: &Delta) -> Result<(), StoreError> {
        let _w = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        // What changed may have changed again: write the slots as they are now.
        let now: Vec<SlotState> = {
            let c = self.lock();
            delta
                .slots
                .iter()
                .filter_map(|s| c.state(&s.slot))
                .collect()
        };
        self.write(&Delta {
            from: delta.from.clone(),
            slots: now,
        })
    }

    fn write(&self, delta: &Delta) -> Result<(), StoreError> {
        let Some(db) = &self.db else { return Ok(()) };
        if delta.slots.is_empty() {
            return Ok(());
        }
        let tx = db.begin_write().map_err(io)?;
        {
            let mut t = tx.open_table(SLOTS).map_err(io)?;
            for s in &delta.slots {
                let v = serde_json::to_vec(s).map_err(io)?;
                t.insert(row_key(&s.slot).as_str(), v.as_slice())
                    .map_err(io)?;
            }
        }
        tx.commit().map_err(io)
    }

    /// Forgets slots whose period ended more than `grace` ago, in memory and on disk.
    pub fn forget_ended(
        &self,
        now: DateTime<Utc>,
        grace: chrono::Duration,
    ) -> Result<(), StoreError> {
        let gone = self.lock().forget_ended(now, grace);
        let Some(db) = &self.db else { return Ok(()) };
        if gone.is_empty() {
            return Ok(());
        }
        let tx = db.begin_write().map_err(io)?;
        {
            let mut t = tx.open_table(SLOTS).map_err(io)?;
            for s in &gone {
                t.remove(row_key(s).as_str()).map_err(io)?;
            }
        }
        tx.commit().map_err(io)
    }
}

fn clamp(v: i128) -> u64 {
    u64::try_from(v.max(0)).unwrap_or(u64::MAX)
}
