//! The storage seams: what a backend must do, whatever it is built on.
//!
//! [`UsageStore`] keeps counters, reservations and dedup keys, and must make each call
//! atomic: a reserve takes room in every slot or in none, and is durable before it returns
//! `Ok` (an acknowledged answer survives a crash). [`ControlStore`] keeps the catalog,
//! subscriptions and overrides. [`RateStore`] keeps the token buckets of rate limits with
//! `scope: global`, when there is a shared store to keep them in. The embedded store (enforcer) is the default; every
//! backend passes the same suite, [`crate::conformance`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;
use crate::grant::Override;
use crate::ledger::LedgerEntry;
use crate::lifecycle::Subscription;

/// A counter a request touches: one window period of one metric of one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotSpec {
    /// Key within the tenant (`metric|window|period_start`).
    pub key: String,
    /// Refuse when used + reserved + amount would pass this (`None`: never refuse).
    pub cap: Option<u64>,
    /// When the period ends (the counter may be forgotten some time after).
    pub ends_at: Option<DateTime<Utc>>,
}

/// What a slot held, as a store saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotUsage {
    /// Committed or recorded units.
    pub used: u64,
    /// Units held by open reservations.
    pub reserved: u64,
}

/// Hold units in every slot, or in none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveOp {
    /// Tenant.
    pub tenant: String,
    /// Metric (kept with the reservation).
    pub metric: String,
    /// Units to hold (positive).
    pub amount: u64,
    /// Id for the new reservation (the caller makes it: stores take no randomness).
    pub reservation_id: String,
    /// Client idempotency key: a second reserve with it returns the first grant.
    pub idempotency_key: String,
    /// The slots.
    pub slots: Vec<SlotSpec>,
    /// When the hold lapses if neither committed nor released.
    pub expires_at: DateTime<Utc>,
    /// When the request was decided (the time of its denial event, if refused).
    pub at: DateTime<Utc>,
    /// Opaque text kept with a granted reservation and returned on replay (the caller
    /// keeps what it needs to rebuild its first answer).
    pub context: String,
}

/// The store's answer to a reserve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveOutcome {
    /// Whether every slot had room (and so the units are held).
    pub granted: bool,
    /// Each slot before this request, in the order given.
    pub usage: Vec<SlotUsage>,
    /// The reservation (the first one's, on replay).
    pub reservation_id: String,
    /// When it lapses.
    pub expires_at: DateTime<Utc>,
    /// This answer repeats an earlier grant for the same idempotency key.
    pub replayed: bool,
    /// The context given with the first grant.
    pub context: String,
}

/// Count units at once (Record), deduplicated by event id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordOp {
    /// Tenant.
    pub tenant: String,
    /// Metric.
    pub metric: String,
    /// Signed units; negative only for gauges, which never go below zero.
    pub amount: i64,
    /// Client event id: a second record with it counts nothing and returns the first answer.
    pub event_id: String,
    /// The slots; positive amounts must fit every cap.
    pub slots: Vec<SlotSpec>,
    /// When it happened (dedup keys are kept for a retention time after it).
    pub at: DateTime<Utc>,
    /// Opaque text returned on replay.
    pub context: String,
}

/// The store's answer to a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordOutcome {
    /// Whether it was counted.
    pub granted: bool,
    /// Each slot before this request.
    pub usage: Vec<SlotUsage>,
    /// This answer repeats the first one for the event id.
    pub replayed: bool,
    /// The context given the first time.
    pub context: String,
}

/// How a reservation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Settlement {
    /// Committed with this many units.
    Committed(u64),
    /// Released by the client.
    Released,
    /// Lapsed at its TTL.
    Expired,
}

/// The store's answer to a commit or release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettleOutcome {
    /// Units that were held.
    pub reserved: u64,
    /// How it ended.
    pub settlement: Settlement,
    /// This answer repeats an earlier identical settlement.
    pub replayed: bool,
    /// Metric of the reservation.
    pub metric: String,
}

/// A reservation as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// Id.
    pub id: String,
    /// Tenant.
    pub tenant: String,
    /// Metric.
    pub metric: String,
    /// Units held.
    pub amount: u64,
    /// Slot keys it holds units in.
    pub slots: Vec<String>,
    /// When it lapses.
    pub expires_at: DateTime<Utc>,
    /// How it ended, once it has.
    pub settlement: Option<Settlement>,
}

/// Why a store call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A request field is unacceptable given stored state.
    #[error("{field}: {reason}")]
    Invalid {
        /// The request field.
        field: String,
        /// Why.
        reason: String,
    },
    /// The thing asked for does not exist.
    #[error("{field}: {reason}")]
    NotFound {
        /// The request field.
        field: String,
        /// What is missing.
        reason: String,
    },
    /// The request contradicts what already happened (commit of a released reservation…).
    #[error("{0}")]
    Conflict(String),
    /// The backend cannot be reached or failed, and the request was not applied; a retry
    /// may succeed.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The backend did not answer in time: the request may or may not have been applied.
    /// Retrying with the same idempotency key or event id gives the true answer.
    #[error("storage did not answer in time: {0}")]
    Indeterminate(String),
    /// Stored data could not be read back.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether retrying the same call may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_) | StoreError::Indeterminate(_)
        )
    }
}

/// Counters, reservations and dedup keys.
#[async_trait::async_trait]
pub trait UsageStore: Send + Sync {
    /// Holds `op.amount` in every slot if each has room under its cap, else in none.
    /// Replays the first grant for a known idempotency key.
    async fn reserve(&self, op: ReserveOp) -> Result<ReserveOutcome, StoreError>;

    /// Settles a reservation with `actual` units (≤ what was held; the rest returns).
    /// Committing twice with the same amount replays; anything else is a conflict.
    async fn commit(
        &self,
        tenant: &str,
        reservation_id: &str,
        actual: u64,
        now: DateTime<Utc>,
    ) -> Result<SettleOutcome, StoreError>;

    /// Returns a reservation's units. Releasing twice replays.
    async fn release(
        &self,
        tenant: &str,
        reservation_id: &str,
        now: DateTime<Utc>,
    ) -> Result<SettleOutcome, StoreError>;

    /// Counts units at once, deduplicated by event id.
    async fn record(&self, op: RecordOp) -> Result<RecordOutcome, StoreError>;

    /// The first grant made with this idempotency key, if any (a retry that would be
    /// denied before reaching [`UsageStore::reserve`] must still get the first answer).
    async fn find_reserve(
        &self,
        tenant: &str,
        idempotency_key: &str,
    ) -> Result<Option<ReserveOutcome>, StoreError>;

    /// The first answer to a counted record with this event id, if any.
    async fn find_record(
        &self,
        tenant: &str,
        event_id: &str,
    ) -> Result<Option<RecordOutcome>, StoreError>;

    /// Usage of the given slots of a tenant (zero for unknown ones).
    async fn usage(&self, tenant: &str, keys: &[String]) -> Result<Vec<SlotUsage>, StoreError>;

    /// A reservation by id.
    async fn reservation(
        &self,
        tenant: &str,
        reservation_id: &str,
    ) -> Result<Option<Reservation>, StoreError>;

    /// Releases up to `max` reservations whose TTL passed by `now`; returns them.
    async fn expire_due(
        &self,
        now: DateTime<Utc>,
        max: usize,
    ) -> Result<Vec<Reservation>, StoreError>;

    /// Appends usage events that no counter change carries (requests refused before any
    /// counter was asked), durably before it returns, where the store writes its other
    /// events for `tenant`.
    async fn append_events(
        &self,
        tenant: &str,
        events: Vec<crate::event::Spooled>,
    ) -> Result<(), StoreError>;
}

/// The answer of a [`RateStore`] to a take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateOutcome {
    /// Every bucket had room (for a take: the units are taken from all of them).
    Allowed,
    /// Nothing was taken: bucket `index` (of those given) refuses.
    Denied {
        /// Which bucket, in the order given: the one with the longest wait.
        index: usize,
        /// The shortest wait after which it would have room; `None` when the amount is
        /// more than its burst and never fits.
        retry_after: Option<std::time::Duration>,
    },
}

/// Token buckets shared by every node (`scope: global`), on the store's own clock so
/// that nodes with skewed clocks agree.
#[async_trait::async_trait]
pub trait RateStore: Send + Sync {
    /// Takes `n` units from every bucket, or from none; with `peek`, only says whether
    /// it would, and changes nothing.
    async fn take_rate(
        &self,
        tenant: &str,
        buckets: &[crate::quota::RateSlot],
        n: u64,
        peek: bool,
    ) -> Result<RateOutcome, StoreError>;

    /// Gives back `n` units taken earlier from every bucket (a later step refused the
    /// request); never fills a bucket past its burst.
    async fn refund_rate(
        &self,
        tenant: &str,
        buckets: &[crate::quota::RateSlot],
        n: u64,
    ) -> Result<(), StoreError>;
}

/// Catalog, subscriptions, overrides, and the ledger of their changes.
///
/// Every change is written together with its [`LedgerEntry`], in one atomic step where
/// the backend allows (the catalog, shared by every tenant, may be written just before
/// its entry).
#[async_trait::async_trait]
pub trait ControlStore: Send + Sync {
    /// The current catalog, if one was saved.
    async fn catalog(&self) -> Result<Option<Catalog>, StoreError>;
    /// Replaces the catalog (the caller validated it against the previous one).
    async fn save_catalog(&self, catalog: &Catalog, entry: &LedgerEntry) -> Result<(), StoreError>;
    /// A tenant's subscription.
    async fn subscription(&self, tenant: &str) -> Result<Option<Subscription>, StoreError>;
    /// Creates or replaces a tenant's subscription. When `entry`'s id was recorded
    /// before, the change was made before: nothing is written (so a change retried after a
    /// crash never undoes what came after it).
    async fn save_subscription(
        &self,
        sub: &Subscription,
        entry: &LedgerEntry,
    ) -> Result<(), StoreError>;
    /// Every tenant with a subscription, sorted.
    async fn tenants(&self) -> Result<Vec<String>, StoreError>;
    /// A tenant's overrides, expired ones included, sorted by id.
    async fn overrides(&self, tenant: &str) -> Result<Vec<Override>, StoreError>;
    /// Adds an override; an existing id is a conflict (and nothing is recorded).
    async fn add_override(&self, o: &Override, entry: &LedgerEntry) -> Result<(), StoreError>;
    /// Removes an override; returns whether it existed (the entry is recorded only then).
    async fn remove_override(
        &self,
        tenant: &str,
        id: &str,
        entry: &LedgerEntry,
    ) -> Result<bool, StoreError>;
    /// Records an entry no change of this store carries (a time-driven change, a refused
    /// request); an id recorded before is kept as it was. Returns whether it was new.
    async fn record_entry(&self, entry: &LedgerEntry) -> Result<bool, StoreError>;
    /// The last `limit` entries of a tenant's ledger (`""`: catalog-wide), oldest first.
    async fn ledger(&self, tenant: &str, limit: usize) -> Result<Vec<LedgerEntry>, StoreError>;

    /// The sync record of a billing provider's object (`provider` `stripe`, object
    /// `sub_…`), if one was written.
    async fn provider_record(
        &self,
        provider: &str,
        object_id: &str,
    ) -> Result<Option<ProviderRecord>, StoreError>;
    /// Writes a provider object's record if its revision is still `expected` (0: there is
    /// none yet), as revision `expected + 1`; returns false, writing nothing, when another
    /// writer got there first (compare-and-set: nodes may receive the same object's
    /// deliveries at once).
    async fn put_provider_record(
        &self,
        provider: &str,
        object_id: &str,
        expected: u64,
        text: &str,
    ) -> Result<bool, StoreError>;
    /// Every object of `provider` with a record, sorted.
    async fn provider_objects(&self, provider: &str) -> Result<Vec<String>, StoreError>;
    /// Remembers that a payment (invoice, charge…) belongs to `object_id`; the first link
    /// of a payment stays (a payment never moves between subscriptions).
    async fn link_payment(
        &self,
        provider: &str,
        payment_id: &str,
        object_id: &str,
    ) -> Result<(), StoreError>;
    /// The object a payment was linked to.
    async fn payment_link(
        &self,
        provider: &str,
        payment_id: &str,
    ) -> Result<Option<String>, StoreError>;
}

/// A billing provider object's sync record as stored: text the store does not read, and
/// its revision (1 for the first write, one more per write).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderRecord {
    /// Compare-and-set token: pass it as `expected` to replace this record.
    pub revision: u64,
    /// The record.
    pub text: String,
}
