//! The ingest scenario's bookkeeping of end-to-end lag: which acknowledged events a read
//! of the rollup shows, and since when they waited. Pure: no I/O, times are given.
//!
//! It rests on two facts. A tenant has at most one Record in flight (the bench sees to
//! it), so its events enter its partition's stream in the order they are acknowledged;
//! and the aggregator inserts a partition's events in stream order, each insert one part
//! (and one part of each rollup). So when the rollup counts `k` events of a tenant, they
//! are its first `k` acknowledged ones, and each of them that was not shown by an earlier
//! read became visible by this read: its lag is the read's time minus its
//! acknowledgement's. A read is only known to have happened between the sending of the
//! query and the arrival of its answer: with the arrival as the read's time, each lag is
//! an upper bound, too long by at most one poll interval plus one query.
//!
//! The rollup may count events whose acknowledgement has not reached the bench yet (the
//! aggregator was quicker than the answer); those are taken when the acknowledgement
//! arrives and shown by the next read.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Per tenant, the acknowledged events the rollup has not shown yet.
#[derive(Debug)]
pub struct LagBook {
    tenants: Vec<TenantBook>,
}

#[derive(Debug, Default, Clone)]
struct TenantBook {
    /// The rollup's count before the bench recorded anything.
    base: u64,
    /// Events acknowledged.
    acked: u64,
    /// Events the rollup has shown (at most `acked`).
    seen: u64,
    /// Counted by the rollup beyond `acked`, at the last read.
    ahead: u64,
    /// Acknowledged and not shown yet, oldest first: when, and the cell it counts for.
    waiting: VecDeque<(Instant, Option<u32>)>,
}

/// A read of the rollup that cannot be right: a count below what an earlier read showed
/// (the rollup lost events) or below the count before the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WentBack {
    /// The tenant's index.
    pub tenant: usize,
    /// What the rollup counts now.
    pub count: u64,
    /// What it counted already.
    pub before: u64,
}

impl std::fmt::Display for WentBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tenant {}: the rollup counts {} events after counting {}",
            self.tenant, self.count, self.before
        )
    }
}

impl std::error::Error for WentBack {}

impl LagBook {
    /// A book for tenants `0 … n-1`, whose rollup counts are `base` (0 for those not in
    /// it) before anything is recorded.
    pub fn new(n: usize, base: impl IntoIterator<Item = (usize, u64)>) -> LagBook {
        let mut tenants = vec![TenantBook::default(); n];
        for (t, count) in base {
            if let Some(book) = tenants.get_mut(t) {
                book.base = count;
            }
        }
        LagBook { tenants }
    }

    /// Tenant `t`'s next event was acknowledged at `at`; its lag goes to `cell` (`None`:
    /// not measured, e.g. during warmup).
    pub fn acked(&mut self, t: usize, at: Instant, cell: Option<u32>) {
        let book = &mut self.tenants[t];
        book.acked += 1;
        book.waiting.push_back((at, cell));
    }

    /// A read answered at `at` counts `count` events of tenant `t`: calls `lag` with the
    /// cell and lag of each acknowledged event it shows for the first time.
    pub fn visible(
        &mut self,
        t: usize,
        count: u64,
        at: Instant,
        mut lag: impl FnMut(Option<u32>, Duration),
    ) -> Result<(), WentBack> {
        let book = &mut self.tenants[t];
        let before = book.base + book.seen + book.ahead;
        let Some(shown) = count.checked_sub(book.base) else {
            return Err(WentBack {
                tenant: t,
                count,
                before,
            });
        };
        if shown < book.seen {
            return Err(WentBack {
                tenant: t,
                count,
                before,
            });
        }
        let now_seen = shown.min(book.acked);
        book.ahead = shown - now_seen;
        for _ in book.seen..now_seen {
            let (acked_at, cell) = book
                .waiting
                .pop_front()
                .expect("one waiting entry per acknowledged, unseen event");
            lag(cell, at.saturating_duration_since(acked_at));
        }
        book.seen = now_seen;
        Ok(())
    }

    /// Acknowledged events not shown yet, all tenants.
    pub fn waiting(&self) -> u64 {
        self.tenants.iter().map(|b| b.acked - b.seen).sum()
    }

    /// Acknowledged events of `cell` not shown yet.
    pub fn waiting_in(&self, cell: u32) -> u64 {
        self.tenants
            .iter()
            .flat_map(|b| b.waiting.iter())
            .filter(|(_, c)| *c == Some(cell))
            .count() as u64
    }

    /// Events the rollup counted, at the last reads, beyond those acknowledged to the
    /// bench (waiting for their answer; after a drain, events counted twice, or a failed
    /// Record that was written after all).
    pub fn ahead(&self) -> u64 {
        self.tenants.iter().map(|b| b.ahead).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Lags reported by one read, in milliseconds, with their cells.
    fn read(book: &mut LagBook, t: usize, count: u64, at: Instant) -> Vec<(Option<u32>, u64)> {
        let mut out = Vec::new();
        book.visible(t, count, at, |c, d| out.push((c, d.as_millis() as u64)))
            .unwrap();
        out
    }

    #[test]
    fn each_event_is_timed_once_by_the_read_that_first_shows_it() {
        let t0 = Instant::now();
        let mut book = LagBook::new(2, []);
        book.acked(0, t0, Some(1));
        book.acked(0, t0 + ms(10), Some(1));
        book.acked(0, t0 + ms(20), Some(1));
        book.acked(1, t0 + ms(5), Some(1));
        assert_eq!(book.waiting(), 4);
        // The first read shows two of tenant 0's three.
        assert_eq!(
            read(&mut book, 0, 2, t0 + ms(100)),
            vec![(Some(1), 100), (Some(1), 90)]
        );
        // The same count again times nothing.
        assert_eq!(read(&mut book, 0, 2, t0 + ms(150)), vec![]);
        assert_eq!(read(&mut book, 0, 3, t0 + ms(200)), vec![(Some(1), 180)]);
        assert_eq!(read(&mut book, 1, 1, t0 + ms(200)), vec![(Some(1), 195)]);
        assert_eq!((book.waiting(), book.ahead()), (0, 0));
    }

    #[test]
    fn cells_and_unmeasured_events_keep_their_tags() {
        let t0 = Instant::now();
        let mut book = LagBook::new(1, []);
        book.acked(0, t0, None);
        book.acked(0, t0 + ms(1), Some(3));
        book.acked(0, t0 + ms(2), Some(4));
        assert_eq!((book.waiting_in(3), book.waiting_in(4)), (1, 1));
        assert_eq!(
            read(&mut book, 0, 3, t0 + ms(50)),
            vec![(None, 50), (Some(3), 49), (Some(4), 48)]
        );
        assert_eq!((book.waiting_in(3), book.waiting_in(4)), (0, 0));
    }

    #[test]
    fn counts_before_the_run_are_not_events_of_the_run() {
        let t0 = Instant::now();
        let mut book = LagBook::new(3, [(1, 7), (9, 4)]);
        book.acked(1, t0, Some(0));
        assert_eq!(read(&mut book, 1, 7, t0 + ms(10)), vec![]);
        assert_eq!(read(&mut book, 1, 8, t0 + ms(20)), vec![(Some(0), 20)]);
        // A count below the base is a rollup that lost events.
        assert_eq!(
            book.visible(1, 6, t0 + ms(30), |_, _| {}),
            Err(WentBack {
                tenant: 1,
                count: 6,
                before: 8
            })
        );
    }

    #[test]
    fn a_rollup_ahead_of_the_acknowledgements_times_them_at_the_next_read() {
        let t0 = Instant::now();
        let mut book = LagBook::new(1, []);
        book.acked(0, t0, Some(0));
        // Two counted, one acknowledged: the second's answer is still on its way.
        assert_eq!(read(&mut book, 0, 2, t0 + ms(10)), vec![(Some(0), 10)]);
        assert_eq!(book.ahead(), 1);
        book.acked(0, t0 + ms(12), Some(0));
        assert_eq!(book.waiting(), 1);
        assert_eq!(read(&mut book, 0, 2, t0 + ms(30)), vec![(Some(0), 18)]);
        assert_eq!((book.waiting(), book.ahead()), (0, 0));
    }

    #[test]
    fn a_count_going_down_is_an_error_and_changes_nothing() {
        let t0 = Instant::now();
        let mut book = LagBook::new(1, []);
        for i in 0..3 {
            book.acked(0, t0 + ms(i), Some(0));
        }
        assert_eq!(read(&mut book, 0, 2, t0 + ms(10)).len(), 2);
        let err = book.visible(0, 1, t0 + ms(20), |_, _| {}).unwrap_err();
        assert_eq!(err.before, 2);
        assert!(err.to_string().contains("counts 1 events after counting 2"));
        assert_eq!(book.waiting(), 1);
        assert_eq!(read(&mut book, 0, 3, t0 + ms(30)), vec![(Some(0), 28)]);
    }

    #[test]
    fn an_ack_before_the_read_is_never_negative() {
        let t0 = Instant::now() + ms(100);
        let mut book = LagBook::new(1, []);
        // The answer arrived "after" the read's time: a lag of zero, not a panic.
        book.acked(0, t0, Some(0));
        assert_eq!(read(&mut book, 0, 1, t0 - ms(5)), vec![(Some(0), 0)]);
    }
}
