//! Group commit: one thread owns the database's write side and makes batches durable.
//!
//! Requests queue their rows; the thread takes everything queued, writes it in one redb
//! transaction, commits (which syncs to disk) and only then answers every request of the
//! batch. Under load many requests share one sync, so throughput grows with concurrency
//! while no answer is ever given before its rows are on disk.

use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::state::{Table, Write};

/// Most requests folded into one transaction; bounds the latency of the first one.
const MAX_BATCH: usize = 4096;

/// A batch of rows and who to tell when they are durable.
pub struct Job {
    /// Rows to write (may be empty: a barrier that waits for everything queued before).
    pub writes: Vec<Write>,
    /// Told `Ok` once durable, or the error.
    pub done: oneshot::Sender<Result<(), String>>,
}

/// redb definition of a table: string keys, byte values.
pub fn definition(table: Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(table.name())
}

/// Runs until every sender is dropped. After a failed commit it fails every later job too:
/// memory is then ahead of the disk, and only a restart (which reloads from disk) is safe.
pub fn run(db: Arc<Database>, jobs: Receiver<Job>, failed: Arc<std::sync::atomic::AtomicBool>) {
    let mut broken: Option<String> = None;
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let result = match &broken {
            Some(e) => Err(e.clone()),
            None => write_batch(&db, &batch).map_err(|e| {
                let msg = format!("disk write failed, restart the node: {e}");
                tracing::error!(error = %e, "embedded store write failed; refusing further writes");
                broken = Some(msg.clone());
                failed.store(true, std::sync::atomic::Ordering::Release);
                msg
            }),
        };
        for job in batch {
            let _ = job.done.send(result.clone());
        }
    }
}

fn write_batch(db: &Database, batch: &[Job]) -> Result<(), Box<redb::Error>> {
    if batch.iter().all(|j| j.writes.is_empty()) {
        return Ok(());
    }
    let txn = db.begin_write().map_err(|e| Box::new(e.into()))?;
    {
        let mut tables = Vec::new();
        for t in Table::ALL {
            tables.push(
                txn.open_table(definition(t))
                    .map_err(|e| Box::new(e.into()))?,
            );
        }
        let index = |t: Table| Table::ALL.iter().position(|x| *x == t).expect("listed");
        for job in batch {
            for w in &job.writes {
                match w {
                    Write::Put(t, k, v) => {
                        tables[index(*t)]
                            .insert(k.as_str(), v.as_slice())
                            .map_err(|e| Box::new(e.into()))?;
                    }
                    Write::Delete(t, k) => {
                        tables[index(*t)]
                            .remove(k.as_str())
                            .map_err(|e| Box::new(e.into()))?;
                    }
                    Write::DeleteUpTo(t, k) => {
                        let table = &mut tables[index(*t)];
                        let keys: Vec<String> = table
                            .range(..=k.as_str())
                            .map_err(|e| Box::new(e.into()))?
                            .map(|r| r.map(|(k, _)| k.value().to_string()))
                            .collect::<Result<_, _>>()
                            .map_err(|e| Box::new(e.into()))?;
                        for key in keys {
                            table.remove(key.as_str()).map_err(|e| Box::new(e.into()))?;
                        }
                    }
                }
            }
        }
    }
    txn.commit().map_err(|e| Box::new(e.into()))?;
    Ok(())
}

/// A handle to queue jobs.
pub type Queue = Sender<Job>;
