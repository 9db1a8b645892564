//! The spool source: embedded nodes (`allot serve` without Redis) keep every usage event in
//! their own spool, served over gRPC `allot.v1.Spool`; each node is one partition.
//!
//! How the [`Source`]/[`Claim`] contract maps onto the node's service:
//!
//! - **one owner**: the node lets one consumer at a time read and acknowledge
//!   ([`NODE_LEASE`], renewed by each `Read` and `Ack`; anyone else gets
//!   `FAILED_PRECONDITION` naming the holder). The consumer is `<aggregator id>/<nonce>`, so
//!   that a restarted aggregator waits for its former self's lease to lapse (its last insert
//!   may still be running) just as with Redis. [`Source::acquire`] is a `Read` of one entry,
//!   [`Claim::confirm`] and [`Claim::keep`] are too; `FAILED_PRECONDITION` is
//!   [`SourceError::LeaseLost`]. The aggregator's `--lease-ttl` must not exceed the node's
//!   lease, so that each insert ends within it (checked by the options).
//! - **unacknowledged first, in order**: the spool keeps every entry until acknowledged and
//!   has no per-reader delivery state, so a fresh claim reads from `after = 0`: everything
//!   not acknowledged, oldest first. The worker skips (and acknowledges) entries at or below
//!   `max(src_offset)` in ClickHouse, which covers a crash between insert and
//!   acknowledgement. Offsets are the node's sequence numbers as they are.
//! - **acknowledgement**: `Ack(upto)` drops everything up to a sequence number, so the
//!   claim acknowledges up to the highest entry below which every entry handed out is
//!   acknowledged (the worker may dead-letter an entry before the batch in front of it is
//!   inserted).
//! - **dead letters**: there is no Redis, so they go to ClickHouse's `dead_letters` table
//!   (migration 5: src, offset, fields as JSON, error, time), then the entry is
//!   acknowledged. It is a different table from `usage_events`, so an entry ClickHouse
//!   rejects there still fits. A crash between the two writes the dead letter again on the
//!   next read: the table is a `ReplacingMergeTree` keyed by (src, src_offset), so read it
//!   with `FINAL` (or `GROUP BY`) to see each once.
//!
//! A partition's name (`src`) is `spool:<host:port>` of the node's endpoint: ClickHouse
//! remembers how far each `src` got, so give a node the same endpoint every time.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use allot_proto::v1 as pb;
use async_trait::async_trait;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::{InterceptedService, Interceptor};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::Code;

use super::{Claim, Entry, Source};
use crate::error::SourceError;
use crate::sink::ClickHouse;

/// How long a node's spool stays with a consumer after its last call (the node's
/// `enforcer::grpc::spool::LEASE`).
pub const NODE_LEASE: Duration = Duration::from_secs(10);

/// Most entries one `Read` asks for (the node's limit).
pub const MAX_READ: usize = 10_000;

/// The partition name of a node endpoint: `spool:<host:port>` (scheme and path dropped).
pub fn partition_name(endpoint: &str) -> String {
    let rest = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    format!("spool:{authority}")
}

/// The spools of embedded nodes, one partition each.
pub struct SpoolSource {
    nodes: Vec<(String, Client)>,
    me: String,
    ttl: Duration,
    sink: ClickHouse,
}

impl SpoolSource {
    /// Clients of the nodes at `endpoints` (`http://host:port`, or `https://host:port`
    /// dialed with `tls`, the system's roots when `None`; connected lazily) for aggregator
    /// `id`, renewing the node's lease every third of `ttl`, and keeping dead letters in
    /// `sink`'s `dead_letters` table.
    pub fn new(
        endpoints: &[String],
        id: &str,
        ttl: Duration,
        token: Option<&str>,
        tls: Option<&ClientTlsConfig>,
        sink: ClickHouse,
    ) -> Result<SpoolSource, SourceError> {
        let bearer = match token {
            Some(t) => Some(
                format!("Bearer {}", t.trim())
                    .parse()
                    .map_err(|_| SourceError::Invalid("token: not a valid header value".into()))?,
            ),
            None => None,
        };
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()).rotate_left(32);
        let mut nodes = Vec::with_capacity(endpoints.len());
        for url in endpoints {
            let endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| SourceError::Invalid(format!("spool endpoint {url}: {e}")))?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(5));
            let endpoint = if url.starts_with("https://") {
                let tls = tls
                    .cloned()
                    .unwrap_or_else(|| ClientTlsConfig::new().with_native_roots());
                endpoint
                    .tls_config(tls)
                    .map_err(|e| SourceError::Invalid(format!("spool endpoint {url}: tls: {e}")))?
            } else {
                endpoint
            };
            let name = partition_name(url);
            if nodes.iter().any(|(n, _)| *n == name) {
                return Err(SourceError::Invalid(format!(
                    "spool endpoint {url}: given twice (partition {name})"
                )));
            }
            let client = pb::spool_client::SpoolClient::with_interceptor(
                endpoint.connect_lazy(),
                Bearer(bearer.clone()),
            )
            .max_decoding_message_size(64 << 20);
            nodes.push((name, client));
        }
        Ok(SpoolSource {
            nodes,
            me: format!("{id}/{nonce:x}"),
            ttl: ttl.min(NODE_LEASE),
            sink,
        })
    }
}

/// A node's answer as a [`SourceError`]: `FAILED_PRECONDITION` is someone else's lease.
fn status_error(partition: &str, s: tonic::Status) -> SourceError {
    match s.code() {
        Code::FailedPrecondition => SourceError::LeaseLost {
            partition: partition.to_string(),
            owner: Some(s.message().to_string()),
        },
        Code::InvalidArgument => {
            SourceError::Invalid(format!("partition {partition}: {}", s.message()))
        }
        _ => SourceError::Unavailable(format!(
            "partition {partition}: {:?}: {}",
            s.code(),
            s.message()
        )),
    }
}

#[async_trait]
impl Source for SpoolSource {
    fn partitions(&self) -> Vec<u16> {
        (0..self.nodes.len() as u16).collect()
    }

    async fn heartbeat(&self) -> Result<usize, SourceError> {
        // Each node's lease is what keeps aggregators apart; every one tries every node.
        Ok(1)
    }

    async fn acquire(&self, partition: u16) -> Result<Option<Box<dyn Claim>>, SourceError> {
        let (name, client) = self.nodes.get(partition as usize).ok_or_else(|| {
            SourceError::Invalid(format!("partition {partition}: no such spool node"))
        })?;
        let mut claim = SpoolClaim {
            client: client.clone(),
            sink: self.sink.clone(),
            me: self.me.clone(),
            ttl: self.ttl,
            name: name.clone(),
            after: 0,
            handed: VecDeque::new(),
            ready: 0,
            acked: 0,
            renewed: Instant::now(),
        };
        match claim.confirm().await {
            Ok(()) => Ok(Some(Box::new(claim))),
            Err(SourceError::LeaseLost { owner, .. }) => {
                tracing::debug!(partition = %name, holder = ?owner, "spool held by another consumer");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn leave(&self) {}
}

/// A node's Spool client, sending the API token with every call.
type Client = pb::spool_client::SpoolClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer <token>` when there is a token.
#[derive(Clone)]
struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(b) = &self.0 {
            req.metadata_mut().insert("authorization", b.clone());
        }
        Ok(req)
    }
}

/// One node's spool, held by this aggregator.
struct SpoolClaim {
    client: Client,
    sink: ClickHouse,
    me: String,
    ttl: Duration,
    name: String,
    /// The last sequence number handed out (the next read starts after it).
    after: u64,
    /// Entries handed out and not yet acknowledged to the node, in order: (seq, done).
    handed: VecDeque<(u64, bool)>,
    /// Every entry handed out up to this one is done.
    ready: u64,
    /// What the node was last told to drop (`Ack(upto)`).
    acked: u64,
    renewed: Instant,
}

impl SpoolClaim {
    async fn read_after(&mut self, after: u64, max: usize) -> Result<Vec<Entry>, SourceError> {
        let reply = self
            .client
            .read(pb::ReadSpoolRequest {
                after,
                max: max.clamp(1, MAX_READ) as u32,
                consumer: self.me.clone(),
            })
            .await
            .map_err(|s| status_error(&self.name, s))?
            .into_inner();
        self.renewed = Instant::now();
        let mut last = after;
        let mut out = Vec::with_capacity(reply.entries.len());
        for e in reply.entries {
            if e.seq <= last {
                return Err(SourceError::Invalid(format!(
                    "partition {}: entry seq {} after {last}: not increasing",
                    self.name, e.seq
                )));
            }
            last = e.seq;
            let mut fields: Vec<(String, String)> = e.fields.into_iter().collect();
            fields.sort();
            out.push(Entry {
                offset: e.seq,
                id: e.seq.to_string(),
                fields: Some(fields),
            });
        }
        Ok(out)
    }

    /// Marks `seq` done and tells the node to drop everything up to the last entry with
    /// only done ones before it.
    async fn done(&mut self, seqs: impl Iterator<Item = u64>) -> Result<(), SourceError> {
        for seq in seqs {
            // Handed out in increasing order, so sorted.
            if let Ok(i) = self.handed.binary_search_by_key(&seq, |(s, _)| *s) {
                self.handed[i].1 = true;
            }
        }
        while let Some(&(seq, true)) = self.handed.front() {
            self.ready = seq;
            self.handed.pop_front();
        }
        let upto = self.ready;
        if upto > self.acked {
            self.client
                .ack(pb::AckSpoolRequest {
                    upto,
                    consumer: self.me.clone(),
                })
                .await
                .map_err(|s| status_error(&self.name, s))?;
            self.acked = upto;
            self.renewed = Instant::now();
        }
        Ok(())
    }
}

#[async_trait]
impl Claim for SpoolClaim {
    fn name(&self) -> &str {
        &self.name
    }

    async fn read(&mut self, max: usize) -> Result<Vec<Entry>, SourceError> {
        // Nothing is delivered on the node's side: a failed read is simply read again.
        let entries = self.read_after(self.after, max).await?;
        if let Some(last) = entries.last() {
            self.after = last.offset;
        }
        self.handed
            .extend(entries.iter().map(|e| (e.offset, false)));
        Ok(entries)
    }

    async fn confirm(&mut self) -> Result<(), SourceError> {
        self.read_after(self.after, 1).await.map(drop)
    }

    async fn keep(&mut self) -> Result<(), SourceError> {
        if self.renewed.elapsed() >= self.ttl / 3 {
            self.confirm().await?;
        }
        Ok(())
    }

    async fn ack(&mut self, entries: &[&Entry]) -> Result<(), SourceError> {
        self.done(entries.iter().map(|e| e.offset)).await
    }

    async fn trim(&mut self) -> Result<(), SourceError> {
        // `Ack` already deleted the acknowledged entries on the node.
        Ok(())
    }

    async fn dead_letter(&mut self, entry: &Entry, error: &str) -> Result<(), SourceError> {
        // Still ours? (Otherwise the new holder deals with the entry.)
        self.confirm().await?;
        let fields: serde_json::Map<String, serde_json::Value> = entry
            .fields
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        let fields = serde_json::Value::Object(fields).to_string();
        self.sink
            .dead_letter(&self.name, entry.offset, &fields, error)
            .await
            .map_err(|e| {
                SourceError::Unavailable(format!(
                    "partition {}: dead letter of entry {} into clickhouse: {e}",
                    self.name, entry.offset
                ))
            })?;
        self.done(std::iter::once(entry.offset)).await
    }

    async fn release(self: Box<Self>) {
        // The node has no release call: its lease lapses NODE_LEASE after the last one.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_are_host_and_port() {
        assert_eq!(partition_name("http://node-1:7411"), "spool:node-1:7411");
        assert_eq!(
            partition_name("https://10.0.0.2:7411/"),
            "spool:10.0.0.2:7411"
        );
        assert_eq!(partition_name("node:7411"), "spool:node:7411");
    }
}
