//! One partition's consumer: read entries in offset order, skip what ClickHouse already
//! has, batch by size and time, insert each month's run as one part, acknowledge only
//! after ClickHouse has it, and put bad entries aside. This is where exactly once is made;
//! `docs/clickhouse.md` tells the argument.
//!
//! Invariant: the rows of a partition reach `usage_events` in offset order, each insert
//! one atomic part, so `max(src_offset)` of the partition says exactly which entries are
//! in (all those at or below it that were not dead-lettered). It is read when the
//! partition is taken and after any failed insert, and entries at or below it are only
//! acknowledged, never inserted again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::error::{SinkError, SourceError};
use crate::options::AggregateOptions;
use crate::row::{EventRow, RowError};
use crate::sink::ClickHouse;
use crate::source::{Claim, Entry};

/// Counters of one aggregator, for logs and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Rows inserted.
    pub inserted: AtomicU64,
    /// Inserts that succeeded.
    pub inserts: AtomicU64,
    /// Entries acknowledged without insert: ClickHouse had them already.
    pub skipped: AtomicU64,
    /// Entries moved to the dead letters.
    pub dead: AtomicU64,
}

/// What a worker shares with the others.
pub(crate) struct Ctx {
    pub sink: ClickHouse,
    pub opts: AggregateOptions,
    pub stats: Arc<Stats>,
    pub query_seq: AtomicU64,
}

/// Why a worker stopped.
#[derive(Debug)]
pub(crate) enum End {
    /// Told to (shutdown, or its share shrank).
    Stopped,
    /// Another aggregator holds the partition now.
    LeaseLost(String),
}

/// Exponential backoff, capped.
pub(crate) struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            next: min,
            min,
            max,
        }
    }

    /// The delay to wait now (each call doubles the next one, up to the cap).
    pub fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

struct Worker<'a> {
    claim: Box<dyn Claim>,
    ctx: &'a Ctx,
    stop: watch::Receiver<bool>,
    name: String,
    /// Entries at or below this are in ClickHouse.
    floor: u64,
    /// An insert failed and whether it landed is not known yet: it might still be running
    /// in ClickHouse, so the lease must lapse (a full term) rather than be handed over.
    unresolved: bool,
}

fn stopping(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow()
}

/// Consumes a partition until told to stop or the lease is lost; releases the lease on
/// a stop.
pub(crate) async fn consume(
    claim: Box<dyn Claim>,
    ctx: Arc<Ctx>,
    stop: watch::Receiver<bool>,
) -> End {
    let name = claim.name().to_string();
    let mut w = Worker {
        claim,
        ctx: &ctx,
        stop,
        name,
        floor: 0,
        unresolved: false,
    };
    let end = w.run().await;
    match &end {
        End::Stopped if w.unresolved => {
            tracing::warn!(partition = %w.name, "stopped with an insert in doubt: the lease lapses by itself");
        }
        End::Stopped => {
            tracing::info!(partition = %w.name, "partition released");
            w.claim.release().await;
        }
        End::LeaseLost(why) => {
            tracing::warn!(partition = %w.name, reason = %why, "partition lost");
        }
    }
    end
}

impl Worker<'_> {
    async fn run(&mut self) -> End {
        match self.resolve_floor(None).await {
            Ok(f) => self.floor = f,
            Err(end) => return end,
        }
        // The previous holder may have died after an insert whose views did not all run
        // (the server stopped in between) and before repairing them.
        if self.floor > 0 {
            if let Err(end) = self.repair_last_insert().await {
                return end;
            }
        }
        tracing::info!(partition = %self.name, floor = self.floor, "partition taken");
        let size = self.ctx.opts.batch_size;
        let interval = self.ctx.opts.batch_interval;
        let mut entries: Vec<Entry> = Vec::with_capacity(size.min(65_536));
        let mut rows: Vec<EventRow> = Vec::with_capacity(size.min(65_536));
        let mut first_at = Instant::now();
        let mut backoff = Backoff::new(self.ctx.opts.retry_min, self.ctx.opts.retry_max);
        loop {
            if stopping(&self.stop) {
                if !rows.is_empty() {
                    // Best effort: a batch that cannot be inserted now stays pending for the
                    // partition's next holder.
                    if let Err(end) = self.flush(&entries, &rows).await {
                        return end;
                    }
                }
                return End::Stopped;
            }
            let read = match self.claim.read(size - rows.len()).await {
                Ok(r) => {
                    backoff.reset();
                    r
                }
                Err(SourceError::LeaseLost { owner, .. }) => {
                    return End::LeaseLost(format!("held by {owner:?}"))
                }
                Err(e) => {
                    tracing::warn!(partition = %self.name, error = %e, "read failed; retrying");
                    if let Err(end) = self.pause(backoff.step()).await {
                        return end;
                    }
                    continue;
                }
            };
            let got = read.len();
            let mut skipped = Vec::new();
            for e in read {
                if e.offset <= self.floor {
                    skipped.push(e);
                    continue;
                }
                match row_of(&e, &self.name) {
                    Ok(row) => {
                        if rows.is_empty() {
                            first_at = Instant::now();
                        }
                        entries.push(e);
                        rows.push(row);
                    }
                    Err(err) => {
                        if let Err(end) = self.dead_letter(&e, &err.to_string()).await {
                            return end;
                        }
                    }
                }
            }
            if !skipped.is_empty() {
                let refs: Vec<&Entry> = skipped.iter().collect();
                if let Err(end) = self.ack(&refs).await {
                    return end;
                }
                self.ctx
                    .stats
                    .skipped
                    .fetch_add(skipped.len() as u64, Ordering::Relaxed);
                tracing::info!(partition = %self.name, entries = skipped.len(), "acknowledged entries clickhouse already had");
            }
            let due = !rows.is_empty() && first_at.elapsed() >= interval;
            if rows.len() >= size || due {
                if let Err(end) = self.flush(&entries, &rows).await {
                    return end;
                }
                entries.clear();
                rows.clear();
                if let Err(e) = self.claim.trim().await {
                    tracing::warn!(partition = %self.name, error = %e, "trimming acknowledged entries failed");
                }
                if let Some(n) = self.claim.backlog().await {
                    metrics::gauge!(crate::metrics::BACKLOG, "partition" => self.name.clone())
                        .set(n as f64);
                }
                continue;
            }
            if got == 0 {
                let mut wait = self.ctx.opts.poll_interval;
                if !rows.is_empty() {
                    wait = wait.min(interval.saturating_sub(first_at.elapsed()));
                }
                if let Err(end) = self.pause(wait).await {
                    return end;
                }
            }
        }
    }

    /// Waits `d` (or until told to stop), keeping the lease.
    async fn pause(&mut self, d: Duration) -> Result<(), End> {
        let slice = self.ctx.opts.lease_ttl / 3;
        let deadline = Instant::now() + d;
        loop {
            match self.claim.keep().await {
                Ok(()) => {}
                Err(SourceError::LeaseLost { owner, .. }) => {
                    return Err(End::LeaseLost(format!("held by {owner:?}")))
                }
                Err(e) => {
                    tracing::warn!(partition = %self.name, error = %e, "lease renewal failed")
                }
            }
            let now = Instant::now();
            if now >= deadline || stopping(&self.stop) {
                return Ok(());
            }
            let nap = (deadline - now).min(slice);
            tokio::select! {
                _ = tokio::time::sleep(nap) => {}
                _ = self.stop.changed() => {}
            }
        }
    }

    /// Waits before a retry; `Err(Stopped)` when told to stop (the work is left pending).
    async fn retry_pause(&mut self, backoff: &mut Backoff) -> Result<(), End> {
        if stopping(&self.stop) {
            return Err(End::Stopped);
        }
        self.pause(backoff.step()).await?;
        if stopping(&self.stop) {
            return Err(End::Stopped);
        }
        Ok(())
    }

    /// Acknowledges, retrying while Redis fails.
    async fn ack(&mut self, entries: &[&Entry]) -> Result<(), End> {
        let mut backoff = Backoff::new(self.ctx.opts.retry_min, self.ctx.opts.retry_max);
        loop {
            match self.claim.ack(entries).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(partition = %self.name, error = %e, "acknowledgement failed; retrying");
                    self.retry_pause(&mut backoff).await?;
                }
            }
        }
    }

    /// Moves an entry to the dead letters, retrying while Redis fails.
    async fn dead_letter(&mut self, entry: &Entry, error: &str) -> Result<(), End> {
        let mut backoff = Backoff::new(self.ctx.opts.retry_min, self.ctx.opts.retry_max);
        loop {
            match self.claim.dead_letter(entry, error).await {
                Ok(()) => {
                    self.ctx.stats.dead.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(crate::metrics::DEAD_LETTERS).increment(1);
                    tracing::error!(partition = %self.name, entry = %entry.id, error, "entry moved to the dead letters");
                    return Ok(());
                }
                Err(SourceError::LeaseLost { owner, .. }) => {
                    return Err(End::LeaseLost(format!("held by {owner:?}")))
                }
                Err(e) => {
                    tracing::warn!(partition = %self.name, error = %e, "dead-lettering failed; retrying");
                    self.retry_pause(&mut backoff).await?;
                }
            }
        }
    }

    /// `max(src_offset)` of the partition, retrying while ClickHouse fails; with
    /// `fence`, first makes sure that insert is not running any more.
    async fn resolve_floor(&mut self, fence: Option<&str>) -> Result<u64, End> {
        let mut backoff = Backoff::new(self.ctx.opts.retry_min, self.ctx.opts.retry_max);
        loop {
            let r = async {
                if let Some(q) = fence {
                    self.ctx.sink.fence(q).await?;
                }
                self.ctx.sink.max_offset(&self.name).await
            }
            .await;
            match r {
                Ok(m) => return Ok(m),
                Err(e) => {
                    tracing::warn!(partition = %self.name, error = %e, "cannot read how far clickhouse got; retrying");
                    self.retry_pause(&mut backoff).await?;
                }
            }
        }
    }

    /// Makes the rollups agree with the raw events for these keys, retrying while
    /// ClickHouse fails.
    async fn repair(
        &mut self,
        month: u32,
        tenants: &[String],
        metrics: &[String],
    ) -> Result<(), End> {
        let mut backoff = Backoff::new(self.ctx.opts.retry_min, self.ctx.opts.retry_max);
        loop {
            match self.ctx.sink.repair_derived(month, tenants, metrics).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(partition = %self.name, month, error = %e, "cannot check the rollups; retrying");
                    self.retry_pause(&mut backoff).await?;
                }
            }
        }
    }

    /// Repairs the rollups of the partition's last insert (see
    /// [`ClickHouse::last_insert_keys`]).
    async fn repair_last_insert(&mut self) -> Result<(), End> {
        let mut backoff = Backoff::new(self.ctx.opts.retry_min, self.ctx.opts.retry_max);
        let keys = loop {
            match self.ctx.sink.last_insert_keys(&self.name, self.floor).await {
                Ok(k) => break k,
                Err(e) => {
                    tracing::warn!(partition = %self.name, error = %e, "cannot find the last insert; retrying");
                    self.retry_pause(&mut backoff).await?;
                }
            }
        };
        match keys {
            Some((month, tenants, metrics)) => self.repair(month, &tenants, &metrics).await,
            None => Ok(()),
        }
    }

    /// Inserts a batch: one insert per run of one month, in order.
    async fn flush(&mut self, entries: &[Entry], rows: &[EventRow]) -> Result<(), End> {
        let mut start = 0;
        while start < rows.len() {
            let month = rows[start].month();
            let mut end = start + 1;
            while end < rows.len() && rows[end].month() == month {
                end += 1;
            }
            self.insert_run(&entries[start..end], &rows[start..end])
                .await?;
            start = end;
        }
        Ok(())
    }

    /// Inserts rows of one month, then acknowledges them; on failure, learns what landed
    /// and retries the rest (transient errors) or bisects it down to the rejected rows,
    /// which go to the dead letters.
    async fn insert_run(&mut self, entries: &[Entry], rows: &[EventRow]) -> Result<(), End> {
        // Ranges still to insert, the next one last.
        let mut todo: Vec<(usize, usize)> = vec![(0, rows.len())];
        let mut backoff = Backoff::new(self.ctx.opts.retry_min, self.ctx.opts.retry_max);
        while let Some(&(a, b)) = todo.last() {
            // Drop what ClickHouse already has (learnt after a failure).
            let mut a = a;
            while a < b && rows[a].src_offset <= self.floor {
                a += 1;
            }
            if a == b {
                todo.pop();
                continue;
            }
            match self.claim.confirm().await {
                Ok(()) => {}
                Err(SourceError::LeaseLost { owner, .. }) => {
                    return Err(End::LeaseLost(format!("held by {owner:?}")))
                }
                Err(e) => {
                    tracing::warn!(partition = %self.name, error = %e, "cannot confirm the lease before an insert; retrying");
                    self.retry_pause(&mut backoff).await?;
                    continue;
                }
            }
            let query_id = format!(
                "allot-{}-{}-{}-{}",
                self.ctx.opts.aggregator_id,
                self.name,
                rows[a].src_offset,
                self.ctx.query_seq.fetch_add(1, Ordering::Relaxed)
            );
            let result = self.ctx.sink.insert(&rows[a..b], &query_id).await;
            let error = match result {
                Ok(()) => {
                    self.inserted(b - a);
                    let refs: Vec<&Entry> = entries[a..b].iter().collect();
                    self.ack(&refs).await?;
                    self.floor = self.floor.max(rows[b - 1].src_offset);
                    todo.pop();
                    backoff.reset();
                    continue;
                }
                Err(e) => e,
            };
            // The answer is an error, but the part may have landed (a lost answer, a
            // materialized view failing after the part was written): stop the query if it
            // still runs, then ask ClickHouse how far the partition got.
            tracing::warn!(partition = %self.name, rows = b - a, error = %error, "insert failed");
            self.unresolved = true;
            self.floor = self.resolve_floor(Some(&query_id)).await?;
            self.unresolved = false;
            let mut landed = 0;
            while a + landed < b && rows[a + landed].src_offset <= self.floor {
                landed += 1;
            }
            if landed > 0 {
                tracing::info!(partition = %self.name, rows = landed, "the failed insert had landed");
                // Its views may not all have run: make the rollups agree before going on.
                let mut tenants: Vec<String> = rows[a..a + landed]
                    .iter()
                    .map(|r| r.tenant.clone())
                    .collect();
                let mut metrics: Vec<String> = rows[a..a + landed]
                    .iter()
                    .map(|r| r.metric.clone())
                    .collect();
                tenants.sort();
                tenants.dedup();
                metrics.sort();
                metrics.dedup();
                self.repair(rows[a].month(), &tenants, &metrics).await?;
                let refs: Vec<&Entry> = entries[a..a + landed].iter().collect();
                self.ack(&refs).await?;
                continue; // the loop drops them from the range
            }
            match error {
                SinkError::Rejected { .. } if b - a == 1 => {
                    todo.pop();
                    self.dead_letter(&entries[a], &format!("clickhouse: {error}"))
                        .await?;
                }
                SinkError::Rejected { .. } => {
                    let mid = a + (b - a) / 2;
                    todo.pop();
                    todo.push((mid, b));
                    todo.push((a, mid));
                }
                SinkError::Setup { .. } => {
                    tracing::error!(partition = %self.name, error = %error, "clickhouse refuses inserts until its setup is fixed; retrying");
                    self.retry_pause(&mut backoff).await?;
                }
                SinkError::Unreachable(_) | SinkError::Busy { .. } => {
                    self.retry_pause(&mut backoff).await?;
                }
            }
        }
        Ok(())
    }

    fn inserted(&self, n: usize) {
        let stats = &self.ctx.stats;
        stats.inserted.fetch_add(n as u64, Ordering::Relaxed);
        let inserts = stats.inserts.fetch_add(1, Ordering::Relaxed) + 1;
        if self.ctx.opts.exit_after_inserts == Some(inserts) {
            // Test failpoint: die between the insert and its acknowledgement.
            eprintln!("failpoint: aborting after insert {inserts}, before acknowledging it");
            std::process::abort();
        }
    }
}

fn row_of(e: &Entry, src: &str) -> Result<EventRow, RowError> {
    let fields = e.fields.as_ref().ok_or(RowError::Deleted)?;
    EventRow::from_fields(
        fields.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        src,
        e.offset,
    )
}
