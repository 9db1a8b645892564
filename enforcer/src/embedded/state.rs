//! The embedded store's live state, in memory, and the rules that change it.
//!
//! Every operation checks first and changes after, so a refused or invalid request leaves
//! the state untouched; each change returns the [`Write`]s that make it durable. The caller
//! holds the state lock while it applies an operation and queues its writes, so writes
//! reach the disk in the order the state changed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use meter::catalog::Catalog;
use meter::event::{EventKind, Spooled};
use meter::grant::Override;
use meter::ledger::LedgerEntry;
use meter::lifecycle::Subscription;
use meter::store::{
    RecordOp, RecordOutcome, Reservation, ReserveOp, ReserveOutcome, SettleOutcome, Settlement,
    SlotUsage, StoreError,
};
use serde::{Deserialize, Serialize};

/// A table of the on-disk database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// Counters by tenant and slot key.
    Counters,
    /// Reservations by tenant and id.
    Reservations,
    /// Reservation ids by tenant and idempotency key.
    Idempotency,
    /// Record answers by tenant and event id.
    Events,
    /// The catalog (one row).
    Control,
    /// Subscriptions by tenant.
    Subscriptions,
    /// Overrides by tenant and id.
    Overrides,
    /// Usage events by sequence number, until an aggregator acknowledges them.
    Spool,
    /// Ledger entries by tenant, time and id.
    Ledger,
    /// Billing-provider sync records by provider and object id.
    Providers,
    /// Provider object ids by provider and payment id.
    PaymentLinks,
}

impl Table {
    /// Every table.
    pub const ALL: [Table; 11] = [
        Table::Counters,
        Table::Reservations,
        Table::Idempotency,
        Table::Events,
        Table::Control,
        Table::Subscriptions,
        Table::Overrides,
        Table::Spool,
        Table::Ledger,
        Table::Providers,
        Table::PaymentLinks,
    ];

    /// Its name on disk.
    pub fn name(self) -> &'static str {
        match self {
            Table::Counters => "counters",
            Table::Reservations => "reservations",
            Table::Idempotency => "idempotency",
            Table::Events => "events",
            Table::Control => "control",
            Table::Subscriptions => "subscriptions",
            Table::Overrides => "overrides",
            Table::Spool => "spool",
            Table::Ledger => "ledger",
            Table::Providers => "providers",
            Table::PaymentLinks => "payment_links",
        }
    }
}

/// One row to put or delete.
#[derive(Debug, Clone)]
pub enum Write {
    /// Insert or replace.
    Put(Table, String, Vec<u8>),
    /// Remove.
    Delete(Table, String),
    /// Remove every row whose key sorts at or before this one.
    DeleteUpTo(Table, String),
}

/// Row key of a spool entry: zero-padded, so that keys sort as the numbers do.
pub fn spool_key(seq: u64) -> String {
    format!("{seq:020}")
}

/// A counter and when its period ends.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Counter {
    /// Used and reserved.
    pub usage: SlotUsage,
    /// End of the period (for garbage collection).
    pub ends_at: Option<DateTime<Utc>>,
}

/// A reservation with what is needed to replay its grant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReservationRow {
    /// The reservation.
    pub reservation: Reservation,
    /// The idempotency key it was made with.
    pub idempotency_key: String,
    /// Slot usage seen when it was granted.
    pub usage_at_grant: Vec<SlotUsage>,
    /// The caller's context.
    pub context: String,
}

/// A counted record, for replays.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventRow {
    /// When it happened.
    pub at: DateTime<Utc>,
    /// Slot usage seen before it was counted.
    pub usage: Vec<SlotUsage>,
    /// The caller's context.
    pub context: String,
}

/// Everything the store knows.
#[derive(Default)]
pub struct State {
    pub(crate) counters: HashMap<String, Counter>,
    pub(crate) reservations: HashMap<String, ReservationRow>,
    pub(crate) idempotency: HashMap<String, String>,
    pub(crate) events: HashMap<String, EventRow>,
    pub(crate) expiry: BTreeSet<(DateTime<Utc>, String)>,
    pub(crate) catalog: Option<Catalog>,
    pub(crate) subscriptions: HashMap<String, Subscription>,
    pub(crate) overrides: HashMap<String, Override>,
    /// The next spool sequence number.
    pub(crate) spool_next: u64,
    /// Ledger entries by [`ledger_key`], and the (tenant, id) of each.
    pub(crate) ledger: BTreeMap<String, LedgerEntry>,
    pub(crate) ledger_ids: HashSet<String>,
    /// Provider sync records by [`row_key`] (provider, object id).
    pub(crate) providers: BTreeMap<String, ProviderRow>,
    /// Provider object ids by [`row_key`] (provider, payment id).
    pub(crate) payment_links: HashMap<String, String>,
}

/// A provider sync record and its revision.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProviderRow {
    /// Compare-and-set token.
    pub revision: u64,
    /// The record (opaque here).
    pub text: String,
}

/// Row key of a ledger entry: by tenant, then time (zero-padded milliseconds), then id.
pub fn ledger_key(e: &LedgerEntry) -> String {
    row_key(
        &e.tenant,
        &format!("{:020}\u{1f}{}", e.at.timestamp_millis().max(0), e.id),
    )
}

/// Row key of a tenant-scoped item. The separator cannot occur in tenant ids.
pub fn row_key(tenant: &str, item: &str) -> String {
    format!("{tenant}\u{1f}{item}")
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("store rows serialize")
}

/// What an operation answered, and what must be written before the answer is given.
pub struct Applied<T> {
    /// The answer.
    pub answer: T,
    /// The rows to write; empty when nothing changed.
    pub writes: Vec<Write>,
}

impl<T> Applied<T> {
    fn read_only(answer: T) -> Self {
        Applied {
            answer,
            writes: Vec::new(),
        }
    }
}

impl State {
    fn usage_of(&self, tenant: &str, key: &str) -> SlotUsage {
        self.counters
            .get(&row_key(tenant, key))
            .map(|c| c.usage)
            .unwrap_or_default()
    }

    fn put_counter(&mut self, writes: &mut Vec<Write>, key: String, counter: Counter) {
        writes.push(Write::Put(Table::Counters, key.clone(), json(&counter)));
        self.counters.insert(key, counter);
    }

    /// Appends usage events that no change carries.
    pub fn append(&mut self, events: Vec<Spooled>) -> Vec<Write> {
        let mut writes = Vec::new();
        for e in events {
            self.spool(&mut writes, e);
        }
        writes
    }

    /// Appends a usage event to the spool, in the same batch as the change it records.
    fn spool(&mut self, writes: &mut Vec<Write>, e: Spooled) {
        // Numbering starts at 1: readers ask for what comes after 0.
        let seq = self.spool_next.max(1);
        self.spool_next = seq + 1;
        writes.push(Write::Put(
            Table::Spool,
            spool_key(seq),
            json(&e.to_fields()),
        ));
    }

    fn put_reservation(&mut self, writes: &mut Vec<Write>, row: ReservationRow) {
        let key = row_key(&row.reservation.tenant, &row.reservation.id);
        writes.push(Write::Put(Table::Reservations, key.clone(), json(&row)));
        self.reservations.insert(key, row);
    }

    /// The first grant for an idempotency key.
    pub fn find_reserve(&self, tenant: &str, idempotency_key: &str) -> Option<ReserveOutcome> {
        let row = self
            .idempotency
            .get(&row_key(tenant, idempotency_key))
            .and_then(|id| self.reservations.get(&row_key(tenant, id)))?;
        Some(ReserveOutcome {
            granted: true,
            usage: row.usage_at_grant.clone(),
            reservation_id: row.reservation.id.clone(),
            expires_at: row.reservation.expires_at,
            replayed: true,
            context: row.context.clone(),
        })
    }

    /// The first answer for an event id.
    pub fn find_record(&self, tenant: &str, event_id: &str) -> Option<RecordOutcome> {
        let row = self.events.get(&row_key(tenant, event_id))?;
        Some(RecordOutcome {
            granted: true,
            usage: row.usage.clone(),
            replayed: true,
            context: row.context.clone(),
        })
    }

    /// Reserve in every slot or none.
    pub fn reserve(&mut self, op: ReserveOp) -> Applied<ReserveOutcome> {
        if let Some(first) = self.find_reserve(&op.tenant, &op.idempotency_key) {
            return Applied::read_only(first);
        }
        let idem_key = row_key(&op.tenant, &op.idempotency_key);
        let usage: Vec<SlotUsage> = op
            .slots
            .iter()
            .map(|s| self.usage_of(&op.tenant, &s.key))
            .collect();
        let fits = op.slots.iter().zip(&usage).all(|(s, u)| {
            s.cap.is_none_or(|cap| {
                u.used.saturating_add(u.reserved).saturating_add(op.amount) <= cap
            })
        });
        let mut outcome = ReserveOutcome {
            granted: fits,
            usage: usage.clone(),
            reservation_id: String::new(),
            expires_at: op.expires_at,
            replayed: false,
            context: String::new(),
        };
        if !fits {
            let mut writes = Vec::new();
            self.spool(
                &mut writes,
                Spooled {
                    kind: EventKind::Denial,
                    id: format!("{}/denied", op.reservation_id),
                    amount: op.amount as i64,
                    at_ms: op.at.timestamp_millis(),
                    context: op.context,
                    usage,
                    granted: false,
                },
            );
            return Applied {
                answer: outcome,
                writes,
            };
        }
        let mut writes = Vec::new();
        for (s, u) in op.slots.iter().zip(&usage) {
            let counter = Counter {
                usage: SlotUsage {
                    used: u.used,
                    reserved: u.reserved.saturating_add(op.amount),
                },
                ends_at: s.ends_at,
            };
            self.put_counter(&mut writes, row_key(&op.tenant, &s.key), counter);
        }
        writes.push(Write::Put(
            Table::Idempotency,
            idem_key.clone(),
            op.reservation_id.clone().into_bytes(),
        ));
        self.idempotency.insert(idem_key, op.reservation_id.clone());
        self.expiry
            .insert((op.expires_at, row_key(&op.tenant, &op.reservation_id)));
        outcome.reservation_id = op.reservation_id.clone();
        outcome.context = op.context.clone();
        self.put_reservation(
            &mut writes,
            ReservationRow {
                reservation: Reservation {
                    id: op.reservation_id,
                    tenant: op.tenant,
                    metric: op.metric,
                    amount: op.amount,
                    slots: op.slots.into_iter().map(|s| s.key).collect(),
                    expires_at: op.expires_at,
                    settlement: None,
                },
                idempotency_key: op.idempotency_key,
                usage_at_grant: usage,
                context: op.context,
            },
        );
        Applied {
            answer: outcome,
            writes,
        }
    }

    /// Commit, release, or expire a reservation.
    pub fn settle(
        &mut self,
        tenant: &str,
        id: &str,
        how: Settlement,
        now: DateTime<Utc>,
    ) -> Result<Applied<SettleOutcome>, StoreError> {
        let key = row_key(tenant, id);
        let row = self
            .reservations
            .get(&key)
            .ok_or_else(|| StoreError::NotFound {
                field: "reservation_id".into(),
                reason: format!("no reservation {id:?} for tenant {tenant:?}"),
            })?;
        let r = &row.reservation;
        let answer = |settlement, replayed| SettleOutcome {
            reserved: r.amount,
            settlement,
            replayed,
            metric: r.metric.clone(),
        };
        if let Some(done) = r.settlement {
            return match (done, how) {
                (a, b) if a == b => Ok(Applied::read_only(answer(done, true))),
                // The units went back at the TTL already: what a release asks for is done.
                (Settlement::Expired, Settlement::Released) => {
                    Ok(Applied::read_only(answer(done, true)))
                }
                (Settlement::Committed(a), Settlement::Committed(b)) => Err(StoreError::Conflict(
                    format!("reservation {id} was already committed with {a}, not {b}"),
                )),
                (done, _) => Err(StoreError::Conflict(format!(
                    "reservation {id} was already {}",
                    describe(done)
                ))),
            };
        }
        if let Settlement::Committed(actual) = how {
            if actual > r.amount {
                return Err(StoreError::Invalid {
                    field: "actual_amount".into(),
                    reason: format!(
                        "{actual} is more than the {} reserved; record the excess separately",
                        r.amount
                    ),
                });
            }
        }
        let expired = how != Settlement::Expired && now >= r.expires_at;
        let effective = if expired { Settlement::Expired } else { how };
        let used_add = match effective {
            Settlement::Committed(a) => a,
            _ => 0,
        };
        let amount = r.amount;
        let expires_at = r.expires_at;
        let slots = r.slots.clone();
        let mut writes = Vec::new();
        for slot in &slots {
            let ckey = row_key(tenant, slot);
            let mut c = self.counters.get(&ckey).copied().unwrap_or_default();
            c.usage.reserved = c.usage.reserved.saturating_sub(amount);
            c.usage.used = c.usage.used.saturating_add(used_add);
            self.put_counter(&mut writes, ckey, c);
        }
        let mut row = self
            .reservations
            .get(&key)
            .cloned()
            .expect("looked up above");
        row.reservation.settlement = Some(effective);
        self.expiry.remove(&(expires_at, key));
        let outcome = SettleOutcome {
            reserved: amount,
            settlement: effective,
            replayed: false,
            metric: row.reservation.metric.clone(),
        };
        let (kind, event_amount) = match effective {
            Settlement::Committed(a) => (EventKind::Commit, a),
            Settlement::Released => (EventKind::Release, amount),
            Settlement::Expired => (EventKind::Expire, amount),
        };
        self.spool(
            &mut writes,
            Spooled {
                kind,
                id: format!("{id}/{}", kind.as_str()),
                amount: event_amount as i64,
                at_ms: now.timestamp_millis(),
                context: row.context.clone(),
                usage: row.usage_at_grant.clone(),
                granted: true,
            },
        );
        self.put_reservation(&mut writes, row);
        Ok(Applied {
            answer: outcome,
            writes,
        })
    }

    /// Count units at once.
    pub fn record(&mut self, op: RecordOp) -> Result<Applied<RecordOutcome>, StoreError> {
        if let Some(first) = self.find_record(&op.tenant, &op.event_id) {
            return Ok(Applied::read_only(first));
        }
        let ekey = row_key(&op.tenant, &op.event_id);
        let usage: Vec<SlotUsage> = op
            .slots
            .iter()
            .map(|s| self.usage_of(&op.tenant, &s.key))
            .collect();
        let delta = op.amount.unsigned_abs();
        if op.amount < 0 {
            if let Some(u) = usage.iter().find(|u| u.used < delta) {
                return Err(StoreError::Invalid {
                    field: "amount".into(),
                    reason: format!(
                        "{} would take {} below zero ({} in use)",
                        op.amount, op.metric, u.used
                    ),
                });
            }
        } else {
            let fits = op.slots.iter().zip(&usage).all(|(s, u)| {
                s.cap.is_none_or(|cap| {
                    u.used.saturating_add(u.reserved).saturating_add(delta) <= cap
                })
            });
            if !fits {
                let mut writes = Vec::new();
                self.spool(
                    &mut writes,
                    Spooled {
                        kind: EventKind::Denial,
                        id: format!("{}/denied", op.event_id),
                        amount: op.amount,
                        at_ms: op.at.timestamp_millis(),
                        context: op.context,
                        usage: usage.clone(),
                        granted: false,
                    },
                );
                return Ok(Applied {
                    answer: RecordOutcome {
                        granted: false,
                        usage,
                        replayed: false,
                        context: String::new(),
                    },
                    writes,
                });
            }
        }
        let mut writes = Vec::new();
        for (s, u) in op.slots.iter().zip(&usage) {
            let used = if op.amount < 0 {
                u.used - delta
            } else {
                u.used.saturating_add(delta)
            };
            let counter = Counter {
                usage: SlotUsage {
                    used,
                    reserved: u.reserved,
                },
                ends_at: s.ends_at,
            };
            self.put_counter(&mut writes, row_key(&op.tenant, &s.key), counter);
        }
        let row = EventRow {
            at: op.at,
            usage: usage.clone(),
            context: op.context.clone(),
        };
        writes.push(Write::Put(Table::Events, ekey.clone(), json(&row)));
        self.events.insert(ekey, row);
        self.spool(
            &mut writes,
            Spooled {
                kind: EventKind::Record,
                id: op.event_id.clone(),
                amount: op.amount,
                at_ms: op.at.timestamp_millis(),
                context: op.context.clone(),
                usage: usage.clone(),
                granted: true,
            },
        );
        Ok(Applied {
            answer: RecordOutcome {
                granted: true,
                usage,
                replayed: false,
                context: op.context,
            },
            writes,
        })
    }

    /// Expire up to `max` reservations due by `now`.
    pub fn expire_due(&mut self, now: DateTime<Utc>, max: usize) -> Applied<Vec<Reservation>> {
        let due: Vec<String> = self
            .expiry
            .iter()
            .take_while(|(at, _)| *at <= now)
            .take(max)
            .map(|(_, key)| key.clone())
            .collect();
        let mut all = Applied::read_only(Vec::new());
        for key in due {
            let Some((tenant, id)) = key.split_once('\u{1f}') else {
                continue;
            };
            let (tenant, id) = (tenant.to_string(), id.to_string());
            if let Ok(applied) = self.settle(&tenant, &id, Settlement::Expired, now) {
                all.writes.extend(applied.writes);
                if let Some(row) = self.reservations.get(&key) {
                    all.answer.push(row.reservation.clone());
                }
            }
        }
        all
    }

    /// Forgets what no request can need any more: counters of periods that ended more
    /// than `retention` ago, dedup keys older than it, and reservations settled and past
    /// their TTL by more than it.
    pub fn compact(&mut self, now: DateTime<Utc>, retention: chrono::Duration) -> Vec<Write> {
        let horizon = now - retention;
        let mut writes = Vec::new();
        self.counters.retain(|k, c| {
            let keep = c.ends_at.is_none_or(|end| end > horizon) || c.usage.reserved > 0;
            if !keep {
                writes.push(Write::Delete(Table::Counters, k.clone()));
            }
            keep
        });
        self.events.retain(|k, e| {
            let keep = e.at > horizon;
            if !keep {
                writes.push(Write::Delete(Table::Events, k.clone()));
            }
            keep
        });
        let mut gone = Vec::new();
        self.reservations.retain(|k, r| {
            let keep = r.reservation.settlement.is_none() || r.reservation.expires_at > horizon;
            if !keep {
                writes.push(Write::Delete(Table::Reservations, k.clone()));
                gone.push(row_key(&r.reservation.tenant, &r.idempotency_key));
            }
            keep
        });
        for k in gone {
            self.idempotency.remove(&k);
            writes.push(Write::Delete(Table::Idempotency, k));
        }
        writes
    }

    /// Records a ledger entry; `None` when its id was recorded before.
    pub fn record_entry(&mut self, e: &LedgerEntry) -> Option<Write> {
        if !self.ledger_ids.insert(row_key(&e.tenant, &e.id)) {
            return None;
        }
        let key = ledger_key(e);
        self.ledger.insert(key.clone(), e.clone());
        Some(Write::Put(Table::Ledger, key, json(e)))
    }

    /// The last `limit` ledger entries of `tenant`, oldest first.
    pub fn ledger_of(&self, tenant: &str, limit: usize) -> Vec<LedgerEntry> {
        let prefix = row_key(tenant, "");
        let mut out: Vec<LedgerEntry> = self
            .ledger
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(_, e)| e.clone())
            .collect();
        out.drain(..out.len().saturating_sub(limit));
        out
    }

    /// Replaces the catalog.
    pub fn save_catalog(&mut self, c: &Catalog, e: &LedgerEntry) -> Vec<Write> {
        self.catalog = Some(c.clone());
        let mut w = vec![Write::Put(Table::Control, "catalog".into(), json(c))];
        w.extend(self.record_entry(e));
        w
    }

    /// Creates or replaces a subscription.
    /// Nothing is written when the entry was recorded before (the change was made then).
    pub fn save_subscription(&mut self, s: &Subscription, e: &LedgerEntry) -> Vec<Write> {
        let Some(entry) = self.record_entry(e) else {
            return Vec::new();
        };
        self.subscriptions.insert(s.tenant.clone(), s.clone());
        vec![
            Write::Put(Table::Subscriptions, s.tenant.clone(), json(s)),
            entry,
        ]
    }

    /// Replaces a provider record if its revision is still `expected`.
    pub fn put_provider_record(
        &mut self,
        provider: &str,
        object_id: &str,
        expected: u64,
        text: &str,
    ) -> Option<Write> {
        let key = row_key(provider, object_id);
        let current = self.providers.get(&key).map_or(0, |r| r.revision);
        if current != expected {
            return None;
        }
        let row = ProviderRow {
            revision: expected + 1,
            text: text.to_string(),
        };
        let write = Write::Put(Table::Providers, key.clone(), json(&row));
        self.providers.insert(key, row);
        Some(write)
    }

    /// Links a payment to a provider object, unless it is linked already.
    pub fn link_payment(
        &mut self,
        provider: &str,
        payment_id: &str,
        object_id: &str,
    ) -> Option<Write> {
        let key = row_key(provider, payment_id);
        if self.payment_links.contains_key(&key) {
            return None;
        }
        self.payment_links
            .insert(key.clone(), object_id.to_string());
        Some(Write::Put(
            Table::PaymentLinks,
            key,
            object_id.as_bytes().to_vec(),
        ))
    }

    /// Adds an override.
    pub fn add_override(
        &mut self,
        o: &Override,
        e: &LedgerEntry,
    ) -> Result<Vec<Write>, StoreError> {
        let key = row_key(&o.tenant, &o.id);
        if self.overrides.contains_key(&key) {
            return Err(StoreError::Conflict(format!(
                "override {} already exists",
                o.id
            )));
        }
        self.overrides.insert(key.clone(), o.clone());
        let mut w = vec![Write::Put(Table::Overrides, key, json(o))];
        w.extend(self.record_entry(e));
        Ok(w)
    }

    /// Removes an override.
    pub fn remove_override(
        &mut self,
        tenant: &str,
        id: &str,
        e: &LedgerEntry,
    ) -> Option<Vec<Write>> {
        let key = row_key(tenant, id);
        self.overrides.remove(&key)?;
        let mut w = vec![Write::Delete(Table::Overrides, key)];
        w.extend(self.record_entry(e));
        Some(w)
    }

    /// Rebuilds the state from the rows of one table.
    pub fn load_row(&mut self, table: Table, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let bad = |e: serde_json::Error| {
            StoreError::Corrupt(format!("{} row {key:?}: {e}", table.name()))
        };
        match table {
            Table::Counters => {
                self.counters
                    .insert(key.into(), serde_json::from_slice(value).map_err(bad)?);
            }
            Table::Reservations => {
                let row: ReservationRow = serde_json::from_slice(value).map_err(bad)?;
                if row.reservation.settlement.is_none() {
                    self.expiry
                        .insert((row.reservation.expires_at, key.to_string()));
                }
                self.reservations.insert(key.into(), row);
            }
            Table::Idempotency => {
                let id = String::from_utf8(value.to_vec())
                    .map_err(|e| StoreError::Corrupt(format!("idempotency row {key:?}: {e}")))?;
                self.idempotency.insert(key.into(), id);
            }
            Table::Events => {
                self.events
                    .insert(key.into(), serde_json::from_slice(value).map_err(bad)?);
            }
            Table::Control => {
                if key == "catalog" {
                    self.catalog = Some(serde_json::from_slice(value).map_err(bad)?);
                }
            }
            Table::Subscriptions => {
                self.subscriptions
                    .insert(key.into(), serde_json::from_slice(value).map_err(bad)?);
            }
            Table::Overrides => {
                self.overrides
                    .insert(key.into(), serde_json::from_slice(value).map_err(bad)?);
            }
            Table::Ledger => {
                let e: LedgerEntry = serde_json::from_slice(value).map_err(bad)?;
                self.ledger_ids.insert(row_key(&e.tenant, &e.id));
                self.ledger.insert(key.into(), e);
            }
            Table::Providers => {
                self.providers
                    .insert(key.into(), serde_json::from_slice(value).map_err(bad)?);
            }
            Table::PaymentLinks => {
                let id = String::from_utf8(value.to_vec())
                    .map_err(|e| StoreError::Corrupt(format!("payment link {key:?}: {e}")))?;
                self.payment_links.insert(key.into(), id);
            }
            Table::Spool => {
                // Only the sequence is kept in memory; entries are read from disk.
                let seq: u64 = key
                    .parse()
                    .map_err(|e| StoreError::Corrupt(format!("spool row {key:?}: {e}")))?;
                self.spool_next = self.spool_next.max(seq + 1);
            }
        }
        Ok(())
    }
}

fn describe(s: Settlement) -> String {
    match s {
        Settlement::Committed(a) => format!("committed with {a}"),
        Settlement::Released => "released".into(),
        Settlement::Expired => "expired (released at its TTL)".into(),
    }
}
