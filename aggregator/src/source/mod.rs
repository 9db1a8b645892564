//! Where events come from: a [`Source`] of partitions, each consumed by one aggregator at
//! a time through a [`Claim`].
//!
//! The exactly-once design needs three things of a source, which every implementation
//! must give:
//!
//! - **one owner per partition**: [`Source::acquire`] hands a partition to at most one
//!   aggregator, and [`Claim::read`] and [`Claim::confirm`] fail with
//!   [`SourceError::LeaseLost`] once it is someone else's, atomically with the check, so
//!   that nobody reads a partition it does not own;
//! - **entries in offset order, unacknowledged ones first**: after a partition is taken,
//!   [`Claim::read`] returns first every entry read before but not acknowledged (by
//!   whoever held the partition), then new ones, all in increasing [`Entry::offset`];
//! - **acknowledgement**: [`Claim::ack`] drops entries for good; [`Claim::dead_letter`]
//!   keeps a bad one aside with its error and acknowledges it.
//!
//! [`redis::RedisSource`] reads the 64 Redis streams of nodes running with `--redis`;
//! [`spool::SpoolSource`] reads embedded nodes' spools over gRPC (`allot.v1.Spool`), one
//! partition per node, the node's sequence numbers as offsets.

pub mod redis;
pub mod spool;

use async_trait::async_trait;

use crate::error::SourceError;

/// One entry of a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The entry's position, increasing within the partition (stored as `src_offset`).
    pub offset: u64,
    /// The source's own id for it (a Redis stream id).
    pub id: String,
    /// Its fields (see `meter::event::Spooled::to_fields`); `None` when the entry was
    /// deleted from the source after it was first read but before it was acknowledged.
    pub fields: Option<Vec<(String, String)>>,
}

/// A source of partitioned events.
#[async_trait]
pub trait Source: Send + Sync + 'static {
    /// The partitions there are (their numbers).
    fn partitions(&self) -> Vec<u16>;

    /// Says this aggregator is alive; returns how many are (itself included), so that each
    /// takes about its share of the partitions.
    async fn heartbeat(&self) -> Result<usize, SourceError>;

    /// Takes `partition` if nobody holds it: `None` if someone does.
    async fn acquire(&self, partition: u16) -> Result<Option<Box<dyn Claim>>, SourceError>;

    /// Says this aggregator is leaving (its share goes to the others sooner).
    async fn leave(&self);
}

/// A partition held by this aggregator.
#[async_trait]
pub trait Claim: Send {
    /// The partition's name, stored as `src` (`p07`).
    fn name(&self) -> &str;

    /// Up to `max` entries: first those read before but never acknowledged, then new ones,
    /// in offset order; empty when there is nothing now (never blocks for long). Renews the
    /// claim.
    async fn read(&mut self, max: usize) -> Result<Vec<Entry>, SourceError>;

    /// Checks that the partition is still ours and renews the claim for its full term
    /// (called right before each insert).
    async fn confirm(&mut self) -> Result<(), SourceError>;

    /// Renews the claim if a good part of its term has passed (call it often while
    /// waiting).
    async fn keep(&mut self) -> Result<(), SourceError>;

    /// Acknowledges entries: they are done and never read again.
    async fn ack(&mut self, entries: &[&Entry]) -> Result<(), SourceError>;

    /// Drops acknowledged entries from the source, where it keeps them (called after a
    /// batch, when every entry handed out is acknowledged). Nothing else depends on it.
    async fn trim(&mut self) -> Result<(), SourceError>;

    /// Entries the source holds for this partition (after a trim: those not yet
    /// acknowledged), when it can tell cheaply; for the backlog metric.
    async fn backlog(&mut self) -> Option<u64> {
        None
    }

    /// Moves an entry aside with `error` (its fields kept) and acknowledges it, in one
    /// step.
    async fn dead_letter(&mut self, entry: &Entry, error: &str) -> Result<(), SourceError>;

    /// Gives the partition up (another aggregator may take it at once).
    async fn release(self: Box<Self>);
}
