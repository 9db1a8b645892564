//! The embedded store: the default backend, a single node durable on local disk.
//!
//! The live state is in memory ([`state::State`]) behind one mutex, which makes every
//! operation atomic; every change is written to a redb database by a group-commit thread
//! ([`writer`]) before the caller gets its answer. On start the state is rebuilt from the
//! database, so whatever was acknowledged survives a crash (SIGKILL included).
//!
//! Trade-off: a request may see another request's change a moment before that change is
//! durable. If the node dies in that moment the change is lost, but it was never
//! acknowledged either; the only effect is that the other request was decided against a
//! slightly fuller counter, which errs on the safe side.

mod state;
mod writer;

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use meter::catalog::Catalog;
use meter::grant::Override;
use meter::ledger::LedgerEntry;
use meter::lifecycle::Subscription;
use meter::store::{
    ControlStore, ProviderRecord, RecordOp, RecordOutcome, Reservation, ReserveOp, ReserveOutcome,
    SettleOutcome, Settlement, SlotUsage, StoreError, UsageStore,
};
use redb::{Database, ReadableTable};
use tokio::sync::oneshot;

use state::{row_key, Applied, State, Table, Write};

/// How long dedup keys, settled reservations and ended counters are kept.
pub const DEFAULT_RETENTION: chrono::Duration = chrono::Duration::days(7);

/// A spooled usage event: its sequence number and its fields (see `meter::event::Spooled`).
pub type SpoolEntry = (u64, Vec<(String, String)>);

/// The embedded store. Cheap to clone; the database closes when the last clone drops.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// For reads of the spool, which is kept on disk only.
    db: Arc<Database>,
    /// Set by the writer when a commit failed: memory is then ahead of the disk.
    failed: Arc<std::sync::atomic::AtomicBool>,
    queue: Mutex<Option<writer::Queue>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the writer after it has written what was queued; joining
        // it releases the database file, so the directory can be opened again at once.
        drop(self.queue.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(handle) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = handle.join();
        }
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`, rebuilding the state from disk.
    pub fn open(dir: &Path) -> Result<EmbeddedStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create data directory {}: {e}",
                dir.display()
            ))
        })?;
        let path = dir.join("allot.redb");
        let db = Database::create(&path)
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        let mut state = State::default();
        load(&db, &mut state)?;
        let db = Arc::new(db);
        let (queue, jobs) = std::sync::mpsc::channel();
        let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = std::thread::Builder::new()
            .name("allot-store-writer".into())
            .spawn({
                let failed = failed.clone();
                let db = db.clone();
                move || writer::run(db, jobs, failed)
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start writer thread: {e}")))?;
        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                db,
                failed,
                queue: Mutex::new(Some(queue)),
                writer: Mutex::new(Some(writer)),
            }),
        })
    }

    /// Up to `max` spooled usage events after sequence number `after`, oldest first, as
    /// (sequence, fields). Only what is durable is seen, in the order it was written.
    pub fn spool_read(&self, after: u64, max: usize) -> Result<Vec<SpoolEntry>, StoreError> {
        let corrupt = |e: &dyn std::fmt::Display| StoreError::Corrupt(format!("spool: {e}"));
        let txn = self.inner.db.begin_read().map_err(|e| corrupt(&e))?;
        let table = match txn.open_table(writer::definition(Table::Spool)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(corrupt(&e)),
        };
        let from = state::spool_key(after.saturating_add(1));
        let mut out = Vec::new();
        for row in table
            .range(from.as_str()..)
            .map_err(|e| corrupt(&e))?
            .take(max)
        {
            let (k, v) = row.map_err(|e| corrupt(&e))?;
            let seq: u64 = k.value().parse().map_err(|e| corrupt(&e))?;
            let fields: Vec<(String, String)> =
                serde_json::from_slice(v.value()).map_err(|e| corrupt(&e))?;
            out.push((seq, fields));
        }
        Ok(out)
    }

    /// Forgets spooled events up to sequence number `upto`, once an aggregator has them.
    pub async fn spool_ack(&self, upto: u64) -> Result<(), StoreError> {
        self.apply(|_| {
            writes_only(vec![Write::DeleteUpTo(
                Table::Spool,
                state::spool_key(upto),
            )])
        })
        .await
    }

    /// Reservations neither settled nor expired.
    pub fn open_reservations(&self) -> usize {
        self.lock().expiry.len()
    }

    /// Usage events in the spool (written, not yet acknowledged by an aggregator or
    /// shipped to Redis).
    pub fn spool_len(&self) -> Result<u64, StoreError> {
        use redb::ReadableTableMetadata;
        let corrupt = |e: &dyn std::fmt::Display| StoreError::Corrupt(format!("spool: {e}"));
        let txn = self.inner.db.begin_read().map_err(|e| corrupt(&e))?;
        match txn.open_table(writer::definition(Table::Spool)) {
            Ok(t) => t.len().map_err(|e| corrupt(&e)),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(corrupt(&e)),
        }
    }

    /// False once a disk write failed; the node then refuses writes until restarted.
    pub fn healthy(&self) -> bool {
        !self.inner.failed.load(std::sync::atomic::Ordering::Acquire)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would leave half an operation in memory; the
        // operations check before they change, so the state is still consistent.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues rows while the state lock is still held (so disk order is state order) and
    /// returns a receiver that resolves once they are durable.
    fn queue(&self, writes: Vec<Write>) -> oneshot::Receiver<Result<(), String>> {
        let (done, rx) = oneshot::channel();
        let job = writer::Job { writes, done };
        let queue = self.inner.queue.lock().unwrap_or_else(|p| p.into_inner());
        match queue.as_ref() {
            Some(q) => {
                if let Err(e) = q.send(job) {
                    let _ = e.0.done.send(Err("the writer thread stopped".into()));
                }
            }
            None => {
                let _ = job.done.send(Err("the store is closed".into()));
            }
        }
        rx
    }

    async fn durable(rx: oneshot::Receiver<Result<(), String>>) -> Result<(), StoreError> {
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Unavailable(e)),
            Err(_) => Err(StoreError::Unavailable("the writer thread stopped".into())),
        }
    }

    /// Applies an operation and waits until its effects (or, for a read-only answer such
    /// as a replay, everything queued before it) are on disk.
    async fn apply<T>(
        &self,
        op: impl FnOnce(&mut State) -> Result<Applied<T>, StoreError>,
    ) -> Result<T, StoreError> {
        let (answer, rx) = {
            let mut state = self.lock();
            let applied = op(&mut state)?;
            (applied.answer, self.queue(applied.writes))
        };
        Self::durable(rx).await?;
        Ok(answer)
    }

    /// Forgets what no request can need any more (see [`State::compact`]).
    pub async fn compact(
        &self,
        now: DateTime<Utc>,
        retention: chrono::Duration,
    ) -> Result<(), StoreError> {
        self.apply(|s| {
            Ok(Applied {
                answer: (),
                writes: s.compact(now, retention),
            })
        })
        .await
    }

    async fn settle(
        &self,
        tenant: &str,
        id: &str,
        how: Settlement,
        now: DateTime<Utc>,
    ) -> Result<SettleOutcome, StoreError> {
        let out = self.apply(|s| s.settle(tenant, id, how, now)).await?;
        let lapsed = out.settlement == Settlement::Expired && !out.replayed;
        match how {
            Settlement::Committed(_) if lapsed => Err(StoreError::Conflict(format!(
                "reservation {id} expired at its TTL before this commit; its units were released"
            ))),
            Settlement::Released if lapsed => Ok(SettleOutcome {
                replayed: true,
                ..out
            }),
            _ => Ok(out),
        }
    }
}

fn load(db: &Database, state: &mut State) -> Result<(), StoreError> {
    let corrupt = |e: &dyn std::fmt::Display| StoreError::Corrupt(e.to_string());
    let txn = db.begin_read().map_err(|e| corrupt(&e))?;
    for t in Table::ALL {
        let table = match txn.open_table(writer::definition(t)) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => continue,
            Err(e) => return Err(corrupt(&e)),
        };
        for row in table.iter().map_err(|e| corrupt(&e))? {
            let (k, v) = row.map_err(|e| corrupt(&e))?;
            state.load_row(t, k.value(), v.value())?;
        }
    }
    Ok(())
}

fn writes_only(writes: Vec<Write>) -> Result<Applied<()>, StoreError> {
    Ok(Applied { answer: (), writes })
}

#[async_trait::async_trait]
impl UsageStore for EmbeddedStore {
    async fn reserve(&self, op: ReserveOp) -> Result<ReserveOutcome, StoreError> {
        self.apply(|s| Ok(s.reserve(op))).await
    }

    async fn commit(
        &self,
        tenant: &str,
        reservation_id: &str,
        actual: u64,
        now: DateTime<Utc>,
    ) -> Result<SettleOutcome, StoreError> {
        self.settle(tenant, reservation_id, Settlement::Committed(actual), now)
            .await
    }

    async fn release(
        &self,
        tenant: &str,
        reservation_id: &str,
        now: DateTime<Utc>,
    ) -> Result<SettleOutcome, StoreError> {
        self.settle(tenant, reservation_id, Settlement::Released, now)
            .await
    }

    async fn record(&self, op: RecordOp) -> Result<RecordOutcome, StoreError> {
        self.apply(|s| s.record(op)).await
    }

    async fn find_reserve(
        &self,
        tenant: &str,
        idempotency_key: &str,
    ) -> Result<Option<ReserveOutcome>, StoreError> {
        // Waits like any replay: the first grant may still be on its way to disk.
        self.apply(|s| {
            Ok(Applied {
                answer: s.find_reserve(tenant, idempotency_key),
                writes: vec![],
            })
        })
        .await
    }

    async fn find_record(
        &self,
        tenant: &str,
        event_id: &str,
    ) -> Result<Option<RecordOutcome>, StoreError> {
        self.apply(|s| {
            Ok(Applied {
                answer: s.find_record(tenant, event_id),
                writes: vec![],
            })
        })
        .await
    }

    async fn usage(&self, tenant: &str, keys: &[String]) -> Result<Vec<SlotUsage>, StoreError> {
        let state = self.lock();
        Ok(keys
            .iter()
            .map(|k| {
                state
                    .counters
                    .get(&row_key(tenant, k))
                    .map(|c| c.usage)
                    .unwrap_or_default()
            })
            .collect())
    }

    async fn reservation(
        &self,
        tenant: &str,
        reservation_id: &str,
    ) -> Result<Option<Reservation>, StoreError> {
        let state = self.lock();
        Ok(state
            .reservations
            .get(&row_key(tenant, reservation_id))
            .map(|r| r.reservation.clone()))
    }

    async fn expire_due(
        &self,
        now: DateTime<Utc>,
        max: usize,
    ) -> Result<Vec<Reservation>, StoreError> {
        self.apply(|s| Ok(s.expire_due(now, max))).await
    }

    async fn append_events(
        &self,
        _tenant: &str,
        events: Vec<meter::event::Spooled>,
    ) -> Result<(), StoreError> {
        self.apply(|s| writes_only(s.append(events))).await
    }
}

#[async_trait::async_trait]
impl ControlStore for EmbeddedStore {
    async fn catalog(&self) -> Result<Option<Catalog>, StoreError> {
        Ok(self.lock().catalog.clone())
    }

    async fn save_catalog(&self, catalog: &Catalog, entry: &LedgerEntry) -> Result<(), StoreError> {
        self.apply(|s| writes_only(s.save_catalog(catalog, entry)))
            .await
    }

    async fn subscription(&self, tenant: &str) -> Result<Option<Subscription>, StoreError> {
        Ok(self.lock().subscriptions.get(tenant).cloned())
    }

    async fn save_subscription(
        &self,
        sub: &Subscription,
        entry: &LedgerEntry,
    ) -> Result<(), StoreError> {
        self.apply(|s| writes_only(s.save_subscription(sub, entry)))
            .await
    }

    async fn tenants(&self) -> Result<Vec<String>, StoreError> {
        let mut t: Vec<String> = self.lock().subscriptions.keys().cloned().collect();
        t.sort();
        Ok(t)
    }

    async fn overrides(&self, tenant: &str) -> Result<Vec<Override>, StoreError> {
        let prefix = row_key(tenant, "");
        let mut out: Vec<Override> = self
            .lock()
            .overrides
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, o)| o.clone())
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn add_override(&self, o: &Override, entry: &LedgerEntry) -> Result<(), StoreError> {
        self.apply(|s| writes_only(s.add_override(o, entry)?)).await
    }

    async fn remove_override(
        &self,
        tenant: &str,
        id: &str,
        entry: &LedgerEntry,
    ) -> Result<bool, StoreError> {
        self.apply(|s| {
            Ok(match s.remove_override(tenant, id, entry) {
                Some(writes) => Applied {
                    answer: true,
                    writes,
                },
                None => Applied {
                    answer: false,
                    writes: Vec::new(),
                },
            })
        })
        .await
    }

    async fn record_entry(&self, entry: &LedgerEntry) -> Result<bool, StoreError> {
        self.apply(|s| {
            let writes: Vec<_> = s.record_entry(entry).into_iter().collect();
            Ok(Applied {
                answer: !writes.is_empty(),
                writes,
            })
        })
        .await
    }

    async fn ledger(&self, tenant: &str, limit: usize) -> Result<Vec<LedgerEntry>, StoreError> {
        Ok(self.lock().ledger_of(tenant, limit))
    }

    async fn provider_record(
        &self,
        provider: &str,
        object_id: &str,
    ) -> Result<Option<ProviderRecord>, StoreError> {
        Ok(self
            .lock()
            .providers
            .get(&row_key(provider, object_id))
            .map(|r| ProviderRecord {
                revision: r.revision,
                text: r.text.clone(),
            }))
    }

    async fn put_provider_record(
        &self,
        provider: &str,
        object_id: &str,
        expected: u64,
        text: &str,
    ) -> Result<bool, StoreError> {
        self.apply(|s| {
            let writes: Vec<_> = s
                .put_provider_record(provider, object_id, expected, text)
                .into_iter()
                .collect();
            Ok(Applied {
                answer: !writes.is_empty(),
                writes,
            })
        })
        .await
    }

    async fn provider_objects(&self, provider: &str) -> Result<Vec<String>, StoreError> {
        let prefix = row_key(provider, "");
        Ok(self
            .lock()
            .providers
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k[prefix.len()..].to_string())
            .collect())
    }

    async fn link_payment(
        &self,
        provider: &str,
        payment_id: &str,
        object_id: &str,
    ) -> Result<(), StoreError> {
        self.apply(|s| {
            writes_only(
                s.link_payment(provider, payment_id, object_id)
                    .into_iter()
                    .collect(),
            )
        })
        .await
    }

    async fn payment_link(
        &self,
        provider: &str,
        payment_id: &str,
    ) -> Result<Option<String>, StoreError> {
        Ok(self
            .lock()
            .payment_links
            .get(&row_key(provider, payment_id))
            .cloned())
    }
}
