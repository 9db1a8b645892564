//! Deciding while the shared store is down: a circuit breaker, and a local journal of
//! what was admitted so that it can be counted in the shared store once it is back.
//!
//! Only nodes with a shared store (`--redis`) use this. When a call fails or passes its
//! deadline, the breaker counts it; after [`Breaker::THRESHOLD`] failures in a row it
//! opens, and requests skip the store for [`Breaker::COOLDOWN`] instead of each waiting
//! for the deadline, then one probe is let through. Meanwhile each limit's policy decides:
//! fail-open requests are admitted and written to the [`Journal`] (durably, before the
//! answer), fail-closed ones are denied. The reconciler replays the journal into the shared
//! store as records with stable event ids, so a replay that is interrupted and repeated
//! still counts each admission once.

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use meter::store::{SlotSpec, StoreError};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// Counts failures of the shared store and short-circuits calls while it is down.
pub struct Breaker {
    state: Mutex<BreakerState>,
}

#[derive(Default)]
struct BreakerState {
    failures: u32,
    open_until: Option<Instant>,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: Mutex::new(BreakerState::default()),
        }
    }
}

impl Breaker {
    /// Failures in a row that open the breaker.
    pub const THRESHOLD: u32 = 3;
    /// How long an open breaker skips the store before letting a probe through.
    pub const COOLDOWN: Duration = Duration::from_millis(500);

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a call may go to the store now. While open, only one probe per cooldown.
    pub fn allow(&self) -> bool {
        let mut s = self.lock();
        match s.open_until {
            Some(until) if Instant::now() < until => false,
            Some(_) => {
                // Half-open: this caller probes; others keep skipping until it answers.
                s.open_until = Some(Instant::now() + Self::COOLDOWN);
                true
            }
            None => true,
        }
    }

    /// The store answered.
    pub fn success(&self) {
        let mut s = self.lock();
        if s.open_until.is_some() {
            tracing::info!("shared store reachable again; circuit closed");
        }
        *s = BreakerState::default();
    }

    /// The store failed or timed out.
    pub fn failure(&self) {
        let mut s = self.lock();
        s.failures += 1;
        if s.failures >= Self::THRESHOLD && s.open_until.is_none() {
            tracing::warn!(failures = s.failures, "shared store failing; circuit open");
        }
        if s.failures >= Self::THRESHOLD {
            s.open_until = Some(Instant::now() + Self::COOLDOWN);
        }
    }

    /// Whether the breaker is closed (the store answers).
    pub fn closed(&self) -> bool {
        self.lock().open_until.is_none()
    }
}

/// Request keys (event ids, idempotency keys) whose last write to the shared store got no
/// answer, so it may have been applied. While the store stays down, a fail-closed refusal
/// of a retry would tell the client "not counted" about something that may have counted;
/// for these keys the node keeps answering "may have been applied" until the store can say.
/// Bounded: the oldest doubts are forgotten first.
#[derive(Default)]
pub struct InDoubt {
    keys: Mutex<Doubts>,
}

/// (tenant, key) pairs, as a set and in the order they were added.
#[derive(Default)]
struct Doubts {
    set: HashSet<(String, String)>,
    order: VecDeque<(String, String)>,
}

impl InDoubt {
    /// Doubts kept at most.
    pub const CAPACITY: usize = 65_536;

    fn lock(&self) -> std::sync::MutexGuard<'_, Doubts> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The write for `key` ended without an answer.
    pub fn add(&self, tenant: &str, key: &str) {
        let k = (tenant.to_string(), key.to_string());
        let mut g = self.lock();
        let Doubts { set, order } = &mut *g;
        if set.insert(k.clone()) {
            order.push_back(k);
        }
        while order.len() > Self::CAPACITY {
            if let Some(old) = order.pop_front() {
                set.remove(&old);
            }
        }
    }

    /// Whether an earlier write for `key` may have been applied.
    pub fn contains(&self, tenant: &str, key: &str) -> bool {
        self.lock()
            .set
            .contains(&(tenant.to_string(), key.to_string()))
    }

    /// The store gave a definite answer for `key`.
    pub fn clear(&self, tenant: &str, key: &str) {
        let mut g = self.lock();
        if g.set.is_empty() {
            return;
        }
        let k = (tenant.to_string(), key.to_string());
        if g.set.remove(&k) {
            g.order.retain(|o| o != &k);
        }
    }
}

/// What was admitted while the shared store was unreachable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Tenant.
    pub tenant: String,
    /// `dg-…` reservation id, or the client's event id for records.
    pub id: String,
    /// Metric.
    pub metric: String,
    /// Units asked for: held by a reservation, or the signed amount of a record.
    pub amount: i64,
    /// The counters it belongs in (caps are not checked when replayed).
    pub slots: Vec<SlotSpec>,
    /// Where it stands.
    pub state: EntryState,
    /// The idempotency key of a reservation.
    #[serde(default)]
    pub key: Option<String>,
    /// The engine's replay context, stored with the record in the shared store so that a
    /// client's retry there gets its first answer.
    #[serde(default)]
    pub context: String,
    /// When the shared store got it; kept until the retention passes so retries replay.
    #[serde(default)]
    pub reconciled_at: Option<DateTime<Utc>>,
    /// When it was admitted: the time of its usage event.
    #[serde(default)]
    pub at: Option<DateTime<Utc>>,
}

/// Where a journal entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryState {
    /// A degraded reservation still held (until `expires_at`).
    Held {
        /// When it lapses.
        expires_at: DateTime<Utc>,
    },
    /// A degraded reservation committed with this many units.
    Committed(u64),
    /// A degraded reservation released, or lapsed at its TTL: nothing to count.
    Released,
    /// A record.
    Recorded,
}

impl Entry {
    /// The state in force at `now`: a hold past its TTL has lapsed.
    pub fn state_at(&self, now: DateTime<Utc>) -> EntryState {
        match self.state {
            EntryState::Held { expires_at } if expires_at <= now => EntryState::Released,
            s => s,
        }
    }
}

const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");
const KEYS: TableDefinition<&str, &str> = TableDefinition::new("idempotency");

/// The journal: a redb database beside the node's data, synced on every write. Each
/// change reads and writes in one write transaction, so a settle and the reconciler never
/// act on a stale copy.
pub struct Journal {
    db: Database,
}

fn row(tenant: &str, id: &str) -> String {
    format!("{tenant}\u{1f}{id}")
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("degraded journal: {e}"))
}

fn decode(bytes: &[u8]) -> Result<Entry, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("degraded journal: {e}")))
}

fn encode(e: &Entry) -> Vec<u8> {
    serde_json::to_vec(e).expect("entries serialize")
}

impl Journal {
    /// Opens or creates `journal.redb` in `dir`.
    pub fn open(dir: &Path) -> Result<Journal, StoreError> {
        std::fs::create_dir_all(dir).map_err(io)?;
        let db = Database::create(dir.join("journal.redb")).map_err(io)?;
        Ok(Journal { db })
    }

    /// Runs `f` on the stored entry (if any) inside one write transaction; `f` returns
    /// the entry to store (or `None` to leave it) and the answer.
    fn update<T>(
        &self,
        tenant: &str,
        id: &str,
        f: impl FnOnce(Option<Entry>) -> Result<(Option<Entry>, T), StoreError>,
    ) -> Result<T, StoreError> {
        let txn = self.db.begin_write().map_err(io)?;
        let answer = {
            let mut t = txn.open_table(ENTRIES).map_err(io)?;
            let key = row(tenant, id);
            let current = t
                .get(key.as_str())
                .map_err(io)?
                .map(|v| decode(v.value()))
                .transpose()?;
            let (new, answer) = f(current)?;
            if let Some(e) = new {
                t.insert(key.as_str(), encode(&e).as_slice()).map_err(io)?;
                if let Some(k) = &e.key {
                    let mut keys = txn.open_table(KEYS).map_err(io)?;
                    keys.insert(row(tenant, k).as_str(), id).map_err(io)?;
                }
            }
            answer
        };
        txn.commit().map_err(io)?;
        Ok(answer)
    }

    /// The degraded reservation made earlier with this idempotency key, if any.
    pub fn reservation_for_key(
        &self,
        tenant: &str,
        key: &str,
    ) -> Result<Option<Entry>, StoreError> {
        let txn = self.db.begin_read().map_err(io)?;
        let id = match txn.open_table(KEYS) {
            Ok(t) => t
                .get(row(tenant, key).as_str())
                .map_err(io)?
                .map(|v| v.value().to_string()),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(io(e)),
        };
        let Some(id) = id else { return Ok(None) };
        let entries = match txn.open_table(ENTRIES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let found = entries.get(row(tenant, &id).as_str()).map_err(io)?;
        found.map(|v| decode(v.value())).transpose()
    }

    /// Holds units locally; durable before it returns.
    pub fn reserve(&self, e: &Entry) -> Result<(), StoreError> {
        self.update(&e.tenant, &e.id, |_| Ok((Some(e.clone()), ())))
    }

    /// Counts a record locally; returns false if the event id was already journaled.
    pub fn record(&self, e: &Entry) -> Result<bool, StoreError> {
        self.update(&e.tenant, &e.id, |current| match current {
            Some(_) => Ok((None, false)),
            None => Ok((Some(e.clone()), true)),
        })
    }

    /// Commits (`Some(actual)`) or releases (`None`) a degraded reservation. Returns the
    /// units held, and whether this repeats an earlier identical settlement.
    pub fn settle(
        &self,
        tenant: &str,
        id: &str,
        actual: Option<u64>,
        now: DateTime<Utc>,
    ) -> Result<(u64, bool), StoreError> {
        self.update(tenant, id, |current| {
            let mut e = current.ok_or_else(|| StoreError::NotFound {
                field: "reservation_id".into(),
                reason: format!(
                    "no reservation {id:?} for tenant {tenant:?} on this node (reservations made \
                     while the shared store was down are settled on the node that made them)"
                ),
            })?;
            let held = e.amount.unsigned_abs();
            match (e.state_at(now), actual) {
                (EntryState::Held { .. }, Some(a)) if a > held => Err(StoreError::Invalid {
                    field: "actual_amount".into(),
                    reason: format!("{a} is more than the {held} reserved; record the excess separately"),
                }),
                (EntryState::Held { .. }, _) => {
                    e.state = actual.map_or(EntryState::Released, EntryState::Committed);
                    Ok((Some(e), (held, false)))
                }
                (EntryState::Committed(a), Some(b)) if a == b => Ok((None, (held, true))),
                (EntryState::Released, None) => Ok((None, (held, true))),
                (EntryState::Released, Some(_)) if matches!(e.state, EntryState::Held { .. }) => {
                    Err(StoreError::Conflict(format!(
                        "reservation {id} expired at its TTL before this commit; its units were released"
                    )))
                }
                _ => Err(StoreError::Conflict(format!("reservation {id} was already settled"))),
            }
        })
    }

    /// Entries ready to be counted in the shared store (records, commits) or closed
    /// (releases, lapsed holds), at most `max`, as stored.
    pub fn settled(&self, now: DateTime<Utc>, max: usize) -> Result<Vec<Entry>, StoreError> {
        let txn = self.db.begin_read().map_err(io)?;
        let table = match txn.open_table(ENTRIES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(io(e)),
        };
        let mut out = Vec::new();
        for item in table.iter().map_err(io)? {
            let (_, v) = item.map_err(io)?;
            let e = decode(v.value())?;
            if e.reconciled_at.is_some() || matches!(e.state_at(now), EntryState::Held { .. }) {
                continue;
            }
            out.push(e);
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    /// Marks an entry as in the shared store, if it is still exactly as `seen` (a settle
    /// that landed since is reconciled on the next pass). Returns whether it was marked.
    pub fn mark_reconciled(&self, seen: &Entry, now: DateTime<Utc>) -> Result<bool, StoreError> {
        self.update(&seen.tenant, &seen.id, |current| match current {
            Some(e) if e == *seen => {
                let mut done = e;
                done.state = done.state_at(now);
                done.reconciled_at = Some(now);
                Ok((Some(done), true))
            }
            _ => Ok((None, false)),
        })
    }

    /// Forgets entries reconciled more than `retention` ago, with their idempotency keys.
    pub fn prune(
        &self,
        now: DateTime<Utc>,
        retention: chrono::Duration,
    ) -> Result<usize, StoreError> {
        let txn = self.db.begin_write().map_err(io)?;
        let mut gone = 0;
        {
            let mut t = txn.open_table(ENTRIES).map_err(io)?;
            let mut keys = txn.open_table(KEYS).map_err(io)?;
            let mut old = Vec::new();
            for item in t.iter().map_err(io)? {
                let (k, v) = item.map_err(io)?;
                let e = decode(v.value())?;
                if e.reconciled_at.is_some_and(|at| at + retention < now) {
                    old.push((k.value().to_string(), e));
                }
            }
            for (k, e) in old {
                t.remove(k.as_str()).map_err(io)?;
                if let Some(key) = &e.key {
                    keys.remove(row(&e.tenant, key).as_str()).map_err(io)?;
                }
                gone += 1;
            }
        }
        txn.commit().map_err(io)?;
        Ok(gone)
    }
}

#[cfg(test)]
mod tests {
    use super::InDoubt;

    #[test]
    fn doubts_are_per_tenant_cleared_by_an_answer_and_bounded() {
        let d = InDoubt::default();
        d.add("acme", "e1");
        assert!(d.contains("acme", "e1"));
        assert!(!d.contains("globex", "e1"));
        d.clear("acme", "e1");
        assert!(!d.contains("acme", "e1"));
        for i in 0..=InDoubt::CAPACITY {
            d.add("acme", &format!("k{i}"));
        }
        assert!(!d.contains("acme", "k0"), "the oldest doubt is forgotten");
        assert!(d.contains("acme", &format!("k{}", InDoubt::CAPACITY)));
    }
}
