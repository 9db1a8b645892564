//! From a source entry to a `usage_events` row: reading the spooled fields, finishing the
//! event with `meter`, and the entry's position as one `u64` (`src_offset`).

use chrono::{DateTime, Datelike, Utc};
use meter::event::{EventKind, Spooled, UsageEvent};
use serde::Serialize;

/// One `usage_events` row, in the table's column order (`inserted_at` is left to its
/// default, the server's clock).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, clickhouse::Row)]
pub struct EventRow {
    /// Event id.
    pub event_id: String,
    /// Unix seconds (`DateTime('UTC')`).
    pub event_time: u32,
    /// The `Enum8` code of the kind (see [`kind_code`]).
    pub kind: i8,
    /// Tenant.
    pub tenant: String,
    /// Metric.
    pub metric: String,
    /// Units.
    pub amount: i64,
    /// Deciding window, or empty.
    pub window: String,
    /// Plan code.
    pub plan: String,
    /// Plan version.
    pub plan_version: u32,
    /// Outcome code.
    pub outcome: String,
    /// Reason code.
    pub reason: String,
    /// 1 when counted past a soft limit.
    pub overage: u8,
    /// 1 when decided while the shared store was unreachable.
    pub degraded: u8,
    /// Dimension names, sorted.
    pub dim_keys: Vec<String>,
    /// Their values, in the same order.
    pub dim_values: Vec<String>,
    /// The deciding node.
    pub node: String,
    /// The source partition (`p07`).
    pub src: String,
    /// The entry's position in it (see [`stream_offset`]).
    pub src_offset: u64,
    /// The billing allowance in force for the event (`None`: no billing-period or month
    /// limit).
    pub included: Option<u64>,
    /// The billing period `included` belongs to (`2026-11`), or empty.
    pub billing_period: String,
}

/// The `Enum8` code of a kind in `usage_events.kind`.
pub fn kind_code(kind: EventKind) -> i8 {
    match kind {
        EventKind::Commit => 1,
        EventKind::Record => 2,
        EventKind::Release => 3,
        EventKind::Expire => 4,
        EventKind::Denial => 5,
    }
}

/// Why an entry cannot become a row (it goes to the dead letters with this).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    /// A field is missing or malformed.
    #[error(transparent)]
    Spool(#[from] meter::event::SpoolError),
    /// The event time is outside `DateTime`'s range (1970 to 2106).
    #[error("spooled event field t: {0} is outside 1970-01-01..2106-02-07 (DateTime)")]
    TimeRange(DateTime<Utc>),
    /// The entry was deleted from the source before it was read (trimmed).
    #[error("the entry was deleted from the source before it was read")]
    Deleted,
}

impl EventRow {
    /// The row of a finished event from `src` at `offset`.
    pub fn of(ev: UsageEvent, src: &str, offset: u64) -> Result<EventRow, RowError> {
        let event_time =
            u32::try_from(ev.at.timestamp()).map_err(|_| RowError::TimeRange(ev.at))?;
        let (dim_keys, dim_values) = ev.dimensions.into_iter().unzip();
        Ok(EventRow {
            event_id: ev.id,
            event_time,
            kind: kind_code(ev.kind),
            tenant: ev.tenant,
            metric: ev.metric,
            amount: ev.amount,
            window: ev.window.unwrap_or_default(),
            plan: ev.plan,
            plan_version: ev.plan_version,
            outcome: ev.outcome,
            reason: ev.reason,
            overage: u8::from(ev.overage),
            degraded: u8::from(ev.degraded),
            dim_keys,
            dim_values,
            node: ev.node,
            src: src.to_string(),
            src_offset: offset,
            included: ev.included,
            billing_period: ev.billing_period.unwrap_or_default(),
        })
    }

    /// Reads spooled fields (see `meter::event::Spooled::to_fields`) into a row.
    pub fn from_fields<'a>(
        fields: impl IntoIterator<Item = (&'a str, &'a str)>,
        src: &str,
        offset: u64,
    ) -> Result<EventRow, RowError> {
        let ev = Spooled::from_fields(fields)?.finish()?;
        EventRow::of(ev, src, offset)
    }

    /// The `usage_events` partition the row lands in (`toYYYYMM(event_time)`): one insert
    /// holds rows of one month only, so that it writes one part, atomically.
    pub fn month(&self) -> u32 {
        let at = DateTime::<Utc>::from_timestamp(i64::from(self.event_time), 0)
            .expect("u32 seconds are in range");
        at.year() as u32 * 100 + at.month()
    }
}

/// Sequence numbers per millisecond that [`stream_offset`] can represent.
pub const SEQ_PER_MS: u64 = 1_000_000;

/// A Redis stream id (`<ms>-<seq>`) as one `u64` that keeps its order: `ms × 1,000,000 +
/// seq`. Exact while `seq` < 1,000,000 (a million entries appended to one stream within one
/// millisecond, far beyond what Redis does) and `ms` < 18,446,744,073,709 (the year 2554).
/// An id outside that is refused (its entry goes to the dead letters) rather than mapped
/// out of order.
pub fn stream_offset(id: &str) -> Result<u64, String> {
    let (ms, seq) = id
        .split_once('-')
        .ok_or_else(|| format!("stream id {id:?}: expected <ms>-<seq>"))?;
    let ms: u64 = ms
        .parse()
        .map_err(|e| format!("stream id {id:?}: milliseconds: {e}"))?;
    let seq: u64 = seq
        .parse()
        .map_err(|e| format!("stream id {id:?}: sequence: {e}"))?;
    if seq >= SEQ_PER_MS {
        return Err(format!(
            "stream id {id:?}: sequence {seq} is not below {SEQ_PER_MS}, the bound of src_offset"
        ));
    }
    ms.checked_mul(SEQ_PER_MS)
        .and_then(|o| o.checked_add(seq))
        .ok_or_else(|| format!("stream id {id:?}: milliseconds past the bound of src_offset"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_offsets_keep_order_and_refuse_what_does_not_fit() {
        assert_eq!(stream_offset("0-1").unwrap(), 1);
        assert_eq!(
            stream_offset("1700000000000-5").unwrap(),
            1_700_000_000_000_000_005
        );
        assert!(
            stream_offset("1700000000000-999999").unwrap()
                < stream_offset("1700000000001-0").unwrap()
        );
        assert!(stream_offset("1-1000000").unwrap_err().contains("sequence"));
        assert!(stream_offset("18446744073710-0").is_err());
        assert!(stream_offset("12").is_err());
        assert!(stream_offset("a-1").is_err());
    }

    #[test]
    fn months_are_utc() {
        let row = |t: u32| EventRow {
            event_time: t,
            ..EventRow::default()
        };
        assert_eq!(row(1_706_745_599).month(), 202401); // 2024-01-31 23:59:59
        assert_eq!(row(1_706_745_600).month(), 202402);
    }
}
