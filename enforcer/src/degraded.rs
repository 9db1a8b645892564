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

/// What was admitted while the shared store was unreachable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Tenant.
    pub tenant: String,
    /// `dg-…` reservation id, or the client's event id for records.
    pub id: String,
    /// Metric.
    pub metric: String,
    /// The counters it belongs in (caps are not checked when replayed).
    pub slots: Vec<SlotSpec>,
    /// Where it stands.
    pub state: EntryState,
}

/// Where a journal entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryState {
    /// A degraded reservation still held (until `expires_at`).
    Held {
        /// Units held.
        amount: u64,
        /// When it lapses.
        expires_at: DateTime<Utc>,
    },
    /// A degraded reservation committed with this many units.
    Committed(u64),
    /// A degraded reservation released (or lapsed): nothing to count.
    Released,
    /// A record of this signed amount.
    Recorded(i64),
}

const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");
const KEYS: TableDefinition<&str, &str> = TableDefinition::new("idempotency");

/// The journal: a redb database beside the node's data, synced on every write.
pub struct Journal {
    db: Database,
}

fn row(tenant: &str, id: &str) -> String {
    format!("{tenant}\u{1f}{id}")
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("degraded journal: {e}"))
}

impl Journal {
    /// Opens or creates `journal.redb` in `dir`.
    pub fn open(dir: &Path) -> Result<Journal, StoreError> {
        std::fs::create_dir_all(dir).map_err(io)?;
        let db = Database::create(dir.join("journal.redb")).map_err(io)?;
        Ok(Journal { db })
    }

    fn get(&self, tenant: &str, id: &str) -> Result<Option<Entry>, StoreError> {
        let txn = self.db.begin_read().map_err(io)?;
        let table = match txn.open_table(ENTRIES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let found = table.get(row(tenant, id).as_str()).map_err(io)?;
        found
            .map(|v| {
                serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt(e.to_string()))
            })
            .transpose()
    }

    fn put(&self, e: &Entry, key: Option<&str>) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(io)?;
        {
            let mut t = txn.open_table(ENTRIES).map_err(io)?;
            let v = serde_json::to_vec(e).expect("entries serialize");
            t.insert(row(&e.tenant, &e.id).as_str(), v.as_slice())
                .map_err(io)?;
            if let Some(k) = key {
                let mut keys = txn.open_table(KEYS).map_err(io)?;
                keys.insert(row(&e.tenant, k).as_str(), e.id.as_str())
                    .map_err(io)?;
            }
        }
        txn.commit().map_err(io)
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
        drop(txn);
        match id {
            Some(id) => self.get(tenant, &id),
            None => Ok(None),
        }
    }

    /// Holds units locally; durable before it returns.
    pub fn reserve(&self, e: &Entry, key: &str) -> Result<(), StoreError> {
        self.put(e, Some(key))
    }

    /// Counts a record locally; returns false if the event id was already journaled.
    pub fn record(&self, e: &Entry) -> Result<bool, StoreError> {
        if self.get(&e.tenant, &e.id)?.is_some() {
            return Ok(false);
        }
        self.put(e, None)?;
        Ok(true)
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
        let mut e = self.get(tenant, id)?.ok_or_else(|| StoreError::NotFound {
            field: "reservation_id".into(),
            reason: format!("no reservation {id:?} for tenant {tenant:?}"),
        })?;
        let EntryState::Held { amount, expires_at } = e.state else {
            return match (e.state, actual) {
                (EntryState::Committed(a), Some(b)) if a == b => Ok((a, true)),
                (EntryState::Released, None) => Ok((0, true)),
                _ => Err(StoreError::Conflict(format!(
                    "reservation {id} was already settled"
                ))),
            };
        };
        if now >= expires_at && actual.is_some() {
            e.state = EntryState::Released;
            self.put(&e, None)?;
            return Err(StoreError::Conflict(format!(
                "reservation {id} expired at its TTL before this commit; its units were released"
            )));
        }
        if let Some(a) = actual {
            if a > amount {
                return Err(StoreError::Invalid {
                    field: "actual_amount".into(),
                    reason: format!(
                        "{a} is more than the {amount} reserved; record the excess separately"
                    ),
                });
            }
        }
        e.state = actual.map_or(EntryState::Released, EntryState::Committed);
        self.put(&e, None)?;
        Ok((amount, false))
    }

    /// Entries ready to be counted in the shared store (records, commits) or dropped
    /// (releases, lapsed holds), at most `max`.
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
            let mut e: Entry = serde_json::from_slice(v.value())
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            match e.state {
                EntryState::Held { expires_at, .. } if expires_at <= now => {
                    e.state = EntryState::Released
                }
                EntryState::Held { .. } => continue,
                _ => {}
            }
            out.push(e);
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    /// Forgets an entry once the shared store has it.
    pub fn remove(&self, tenant: &str, id: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(io)?;
        {
            let mut t = txn.open_table(ENTRIES).map_err(io)?;
            t.remove(row(tenant, id).as_str()).map_err(io)?;
        }
        txn.commit().map_err(io)
    }

    /// Number of entries (for tests and logs).
    pub fn len(&self) -> Result<usize, StoreError> {
        Ok(self.settled(DateTime::<Utc>::MAX_UTC, usize::MAX)?.len())
    }

    /// Whether the journal holds nothing.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }
}
