//! Gossip of soft-limit counters between nodes (`allot.v1.Peer`), and who the peers are.
//!
//! Push model: every node opens one long-lived `Sync` stream to each peer and sends on it
//! its full state first, then, every sync interval, the slots that changed (an empty
//! message when none did, which doubles as a heartbeat). The receiving side only merges;
//! it pushes its own changes over its own stream the other way. Merging is idempotent and
//! order-free, so a reconnect simply starts over with a full exchange, and a node cut off
//! from its peers keeps deciding on what it knows until the streams come back.
//!
//! Peers come from `--peers`, from the membership list in Redis (heartbeats; a member
//! silent past the timeout is forgotten, its counts stay), and from whoever pushes to
//! this node. A peer is live while its messages keep arriving; the live count sizes each
//! node's share of `scope: node` rate limits.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use allot_proto::v1 as pb;
use chrono::{DateTime, Utc};
use meter::soft::{Delta, SlotId, SlotState};
use tokio::sync::broadcast;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::soft::SoftState;

/// Most slots in one message: a full exchange of many tenants is sent in parts, well
/// below gRPC's default 4 MB message limit.
const SLOTS_PER_MESSAGE: usize = 2_000;

/// Where a peer's address came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `--peers`.
    Static,
    /// The membership list in Redis.
    Redis,
    /// It pushed to this node first.
    Inbound,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Static => "static",
            Source::Redis => "redis",
            Source::Inbound => "inbound",
        }
    }
}

#[derive(Debug, Clone)]
struct PeerEntry {
    node: String,
    source: Source,
    /// Last message merged from it.
    last_merge: Option<Instant>,
    /// Last time its source confirmed it (membership heartbeat, or its own message).
    confirmed: Instant,
    error: Option<String>,
}

/// The peers of this node, by address.
pub struct Peers {
    node: String,
    address: String,
    timeout: Duration,
    table: Mutex<BTreeMap<String, PeerEntry>>,
    /// `authorization` value presented to peers (their `peer` scope), if any.
    bearer: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    /// TLS towards peers (`https://`), when this node serves TLS.
    tls: Option<tonic::transport::ClientTlsConfig>,
}

/// A peer as reported by [`Peers::status`].
#[derive(Debug, Clone)]
pub struct PeerReport {
    /// Node id, empty until known.
    pub node: String,
    /// Address.
    pub address: String,
    /// Heard from within the timeout.
    pub live: bool,
    /// Age of the last merge of its state.
    pub last_merge_age: Option<Duration>,
    /// Where the address came from.
    pub source: &'static str,
    /// Last error pushing to it.
    pub error: Option<String>,
}

impl Peers {
    /// Presents `token` (scope `peer`) to every peer.
    pub fn with_token(mut self, token: &str) -> Result<Self, String> {
        self.bearer = Some(
            format!("Bearer {token}")
                .parse()
                .map_err(|_| "peer_token: not a valid header value".to_string())?,
        );
        Ok(self)
    }

    /// Dials every peer over TLS with `tls` (their CA, and this node's certificate as its
    /// client certificate).
    pub fn with_tls(mut self, tls: tonic::transport::ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The peers of node `node` reachable at `address`; `statics` from `--peers`.
    pub fn new(node: &str, address: &str, timeout: Duration, statics: &[String]) -> Self {
        let now = Instant::now();
        let table = statics
            .iter()
            .filter(|a| *a != address)
            .map(|a| {
                (
                    a.clone(),
                    PeerEntry {
                        node: String::new(),
                        source: Source::Static,
                        last_merge: None,
                        confirmed: now,
                        error: None,
                    },
                )
            })
            .collect();
        Peers {
            node: node.to_string(),
            address: address.to_string(),
            timeout,
            table: Mutex::new(table),
            bearer: None,
            tls: None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PeerEntry>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// A message from `node` at `address` was merged.
    fn heard(&self, node: &str, address: &str) {
        if node == self.node || address == self.address {
            return;
        }
        let now = Instant::now();
        let mut t = self.lock();
        let e = t.entry(address.to_string()).or_insert_with(|| PeerEntry {
            node: node.to_string(),
            source: Source::Inbound,
            last_merge: None,
            confirmed: now,
            error: None,
        });
        e.node = node.to_string();
        e.last_merge = Some(now);
        e.confirmed = now;
    }

    /// The members Redis listed (node, address); others found there before and no longer
    /// listed are forgotten.
    pub fn set_members(&self, members: &[(String, String)]) {
        let now = Instant::now();
        let mut t = self.lock();
        for (node, address) in members {
            if *node == self.node || *address == self.address {
                continue;
            }
            let e = t.entry(address.clone()).or_insert_with(|| PeerEntry {
                node: node.clone(),
                source: Source::Redis,
                last_merge: None,
                confirmed: now,
                error: None,
            });
            e.node = node.clone();
            e.confirmed = now;
        }
        t.retain(|a, e| e.source != Source::Redis || members.iter().any(|(_, m)| m == a));
    }

    /// Forgets peers that neither `--peers` names nor anyone confirmed within the timeout.
    fn expire(&self) {
        let timeout = self.timeout;
        self.lock()
            .retain(|_, e| e.source == Source::Static || e.confirmed.elapsed() <= timeout);
    }

    fn set_error(&self, address: &str, error: Option<String>) {
        if let Some(e) = self.lock().get_mut(address) {
            e.error = error;
        }
    }

    /// Addresses to push to.
    fn addresses(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Nodes live now, this one included (distinct node ids).
    pub fn live_count(&self) -> usize {
        let t = self.lock();
        let mut live: Vec<&str> = t
            .values()
            .filter(|e| e.last_merge.is_some_and(|m| m.elapsed() <= self.timeout))
            .map(|e| e.node.as_str())
            .collect();
        live.sort_unstable();
        live.dedup();
        1 + live.len()
    }

    /// Every known peer.
    pub fn status(&self) -> Vec<PeerReport> {
        self.lock()
            .iter()
            .map(|(address, e)| PeerReport {
                node: e.node.clone(),
                address: address.clone(),
                live: e.last_merge.is_some_and(|m| m.elapsed() <= self.timeout),
                last_merge_age: e.last_merge.map(|m| m.elapsed()),
                source: e.source.as_str(),
                error: e.error.clone(),
            })
            .collect()
    }
}

/// Converts counters to their wire form.
pub fn to_wire(node: &str, address: &str, slots: &[SlotState]) -> pb::SyncMessage {
    pb::SyncMessage {
        node: node.to_string(),
        address: address.to_string(),
        slots: slots
            .iter()
            .map(|s| pb::SoftSlot {
                tenant: s.slot.tenant.clone(),
                key: s.slot.key.clone(),
                gauge: s.gauge,
                inc: s.inc.clone().into_iter().collect(),
                dec: s.dec.clone().into_iter().collect(),
                ends_at: s.ends_at.map(|t| prost_types::Timestamp {
                    seconds: t.timestamp(),
                    nanos: 0,
                }),
            })
            .collect(),
    }
}

/// Reads a peer's message; slots that do not parse are dropped (and said so), the rest
/// are merged: one bad slot must not stop the exchange.
pub fn from_wire(m: pb::SyncMessage) -> Delta {
    let mut slots = Vec::with_capacity(m.slots.len());
    for s in m.slots {
        let ok = meter::keys::check_key(&s.tenant).is_ok() && !s.key.is_empty();
        let ends_at = match s.ends_at {
            None => Some(None),
            Some(t) => DateTime::<Utc>::from_timestamp(t.seconds, 0).map(Some),
        };
        match (ok, ends_at) {
            (true, Some(ends_at)) => slots.push(SlotState {
                slot: SlotId {
                    tenant: s.tenant,
                    key: s.key,
                },
                gauge: s.gauge,
                inc: s.inc.into_iter().collect(),
                dec: s.dec.into_iter().collect(),
                ends_at,
            }),
            _ => tracing::warn!(from = %m.node, tenant = %s.tenant, "malformed soft slot dropped"),
        }
    }
    Delta {
        from: m.node,
        slots,
    }
}

fn messages(node: &str, address: &str, delta: &Delta) -> Vec<pb::SyncMessage> {
    if delta.slots.is_empty() {
        return vec![to_wire(node, address, &[])];
    }
    delta
        .slots
        .chunks(SLOTS_PER_MESSAGE)
        .map(|c| to_wire(node, address, c))
        .collect()
}

/// The `allot.v1.Peer` service: merges what peers push.
pub struct PeerService {
    soft: Arc<SoftState>,
    peers: Arc<Peers>,
}

impl PeerService {
    /// A service merging into `soft`.
    pub fn new(soft: Arc<SoftState>, peers: Arc<Peers>) -> Self {
        PeerService { soft, peers }
    }
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<pb::SyncMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    type SyncStream = SyncStream;

    async fn sync(
        &self,
        req: Request<Streaming<pb::SyncMessage>>,
    ) -> Result<Response<SyncStream>, Status> {
        let mut inbound = req.into_inner();
        let (soft, peers) = (self.soft.clone(), self.peers.clone());
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                if m.node == peers.node() {
                    if m.address != peers.address {
                        // Two nodes sharing an id would take each other's counts for
                        // their own: refuse, loudly.
                        tracing::error!(address = %m.address, node = %m.node, "a peer uses this node's id; its messages are ignored: give every node its own --node-id");
                    }
                    continue;
                }
                let (node, address) = (m.node.clone(), m.address.clone());
                let delta = from_wire(m);
                if !delta.slots.is_empty() {
                    let s = soft.clone();
                    match tokio::task::spawn_blocking(move || s.merge(&delta)).await {
                        Ok(Ok(())) => {}
                        // Not merged: the peer sends it again in its next full exchange.
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "peer state not written to disk");
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "peer state not merged");
                            return;
                        }
                    }
                }
                peers.heard(&node, &address);
            }
        });
        // This side sends nothing back: its own stream to the peer carries its changes.
        Ok(Response::new(Box::pin(tokio_stream::pending())))
    }
}

/// Runs the exchange: every `interval`, takes the changed slots, writes them to disk and
/// pushes them to every peer; keeps one pushing task per peer address, and tells
/// `on_live` how many nodes are live (this one included).
pub async fn run(
    soft: Arc<SoftState>,
    peers: Arc<Peers>,
    interval: Duration,
    on_live: impl Fn(usize) + Send + 'static,
) {
    let (tx, _) = broadcast::channel::<Arc<Vec<pb::SyncMessage>>>(64);
    let mut pushers: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        peers.expire();
        on_live(peers.live_count());
        let addresses = peers.addresses();
        pushers.retain(|a, h| {
            let keep = addresses.contains(a) && !h.is_finished();
            if !keep {
                h.abort();
            }
            keep
        });
        for a in addresses {
            pushers.entry(a.clone()).or_insert_with(|| {
                tokio::spawn(push(
                    a,
                    soft.clone(),
                    peers.clone(),
                    tx.subscribe(),
                    interval,
                ))
            });
        }
        let delta = soft.take_delta();
        let _ = tx.send(Arc::new(messages(&peers.node, &peers.address, &delta)));
        // Off the runtime threads: a synced write takes milliseconds.
        let s = soft.clone();
        match tokio::task::spawn_blocking(move || s.persist(&delta)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "soft counters not written to disk"),
            Err(e) => tracing::warn!(error = %e, "soft counters not written to disk"),
        }
    }
}

/// An error with its causes, `a: b: c`.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !parts.last().is_some_and(|last| last.contains(&text)) {
            parts.push(text);
        }
        cause = c.source();
    }
    parts.join(": ")
}

/// A status's message and, for a transport failure (a refused TLS handshake shows up on
/// the first call), its causes.
fn status_text(s: &Status) -> String {
    match std::error::Error::source(s) {
        // tonic's message repeats the first cause's ("transport error").
        Some(cause) if cause.to_string() == s.message() => error_chain(cause),
        Some(cause) => format!("{}: {}", s.message(), error_chain(cause)),
        None => s.message().to_string(),
    }
}

/// Pushes to one peer for as long as the node runs, reconnecting after failures.
async fn push(
    address: String,
    soft: Arc<SoftState>,
    peers: Arc<Peers>,
    mut rx: broadcast::Receiver<Arc<Vec<pb::SyncMessage>>>,
    interval: Duration,
) {
    let backoff = (interval * 5).clamp(Duration::from_millis(100), Duration::from_secs(1));
    loop {
        let result = push_once(&address, &soft, &peers, &mut rx).await;
        peers.set_error(&address, Some(result));
        tokio::time::sleep(backoff).await;
        // What was broadcast meanwhile is covered by the next full exchange.
        rx = rx.resubscribe();
    }
}

/// One stream to a peer; returns why it ended.
async fn push_once(
    address: &str,
    soft: &SoftState,
    peers: &Peers,
    rx: &mut broadcast::Receiver<Arc<Vec<pb::SyncMessage>>>,
) -> String {
    let scheme = if peers.tls.is_some() { "https" } else { "http" };
    let endpoint = match tonic::transport::Endpoint::from_shared(format!("{scheme}://{address}")) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(1))
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true),
        Err(e) => return format!("bad address: {e}"),
    };
    let endpoint = match &peers.tls {
        Some(tls) => match endpoint.tls_config(tls.clone()) {
            Ok(e) => e,
            Err(e) => return format!("tls: {}", error_chain(&e)),
        },
        None => endpoint,
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        // The causes say why (refused, unknown issuer, certificate required…); tonic's own
        // message is only "transport error".
        Err(e) => return format!("connect: {}", error_chain(&e)),
    };
    let (out, out_rx) = tokio::sync::mpsc::channel::<pb::SyncMessage>(16);
    let full = messages(&peers.node, &peers.address, &soft.full_state());
    let mut client = pb::peer_client::PeerClient::new(channel);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(out_rx));
    if let Some(b) = &peers.bearer {
        request.metadata_mut().insert("authorization", b.clone());
    }
    let call = client.sync(request);
    let feed = async {
        for m in full {
            if out.send(m).await.is_err() {
                return "stream closed".to_string();
            }
        }
        peers.set_error(address, None);
        loop {
            let batch = match rx.recv().await {
                Ok(b) => b,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Missed changes: send everything again.
                    Arc::new(messages(&peers.node, &peers.address, &soft.full_state()))
                }
                Err(broadcast::error::RecvError::Closed) => return "node stopping".into(),
            };
            for m in batch.iter() {
                if out.send(m.clone()).await.is_err() {
                    return "stream closed".to_string();
                }
            }
        }
    };
    let watch = async {
        match call.await {
            Ok(resp) => {
                let mut inbound = resp.into_inner();
                loop {
                    match inbound.message().await {
                        Ok(Some(_)) => {}
                        Ok(None) => return "peer ended the stream".to_string(),
                        Err(e) => return format!("stream: {}", status_text(&e)),
                    }
                }
            }
            Err(e) => format!("sync: {}", status_text(&e)),
        }
    };
    tokio::select! {
        why = feed => why,
        why = watch => why,
    }
}

/// Keeps this node in the Redis membership list and the peer table in step with it.
pub async fn follow_membership(
    redis: crate::redis::RedisStore,
    peers: Arc<Peers>,
    every: Duration,
    timeout: Duration,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let now = Utc::now().timestamp_millis();
        let forget = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        match redis
            .heartbeat(&peers.node, &peers.address, now, forget)
            .await
        {
            Ok(members) => {
                let members: Vec<(String, String)> =
                    members.into_iter().map(|(n, a, _)| (n, a)).collect();
                peers.set_members(&members);
            }
            Err(e) => tracing::debug!(error = %e, "membership heartbeat failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meter::soft::SoftCounters;

    #[test]
    fn wire_form_round_trips_and_drops_malformed_slots() {
        let mut a = SoftCounters::new("a");
        let end = Utc::now();
        let slot = |k: &str| SlotId {
            tenant: "acme".into(),
            key: k.into(),
        };
        a.set_own(&slot("calls|day|0"), 7, false, Some(end))
            .unwrap();
        a.set_own(&slot("seats|none|0"), 3, true, None).unwrap();
        a.set_own(&slot("seats|none|0"), 1, true, None).unwrap();
        let full = a.full_state();
        let mut m = to_wire("a", "127.0.0.1:1", &full.slots);
        let back = from_wire(m.clone());
        assert_eq!(back.from, "a");
        // Timestamps travel in whole seconds.
        let mut want = full.slots.clone();
        want[0].ends_at = DateTime::from_timestamp(end.timestamp(), 0);
        assert_eq!(back.slots, want);
        m.slots[0].tenant = String::new();
        assert_eq!(from_wire(m).slots.len(), 1);
    }

    #[test]
    fn full_exchanges_are_split_into_bounded_messages() {
        let mut a = SoftCounters::new("a");
        for i in 0..(SLOTS_PER_MESSAGE + 1) {
            let s = SlotId {
                tenant: "t".into(),
                key: format!("k{i}"),
            };
            a.set_own(&s, 1, false, None).unwrap();
        }
        let msgs = messages("a", "x:1", &a.full_state());
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].slots.len(), SLOTS_PER_MESSAGE);
        // Nothing changed: still one (empty) message, the heartbeat.
        assert_eq!(messages("a", "x:1", &a.take_delta()).len(), 2);
        assert_eq!(messages("a", "x:1", &a.take_delta()).len(), 1);
    }

    #[test]
    fn liveness_counts_distinct_nodes_heard_within_the_timeout() {
        let p = Peers::new("me", "me:1", Duration::from_secs(60), &["b:1".into()]);
        assert_eq!(p.live_count(), 1);
        p.heard("b", "b:1");
        p.heard("c", "c:1");
        p.heard("c", "c:2");
        p.heard("me", "elsewhere:1");
        // c at two addresses is one node; a message with this node's id is no peer.
        assert_eq!(p.live_count(), 3);
        let s = p.status();
        assert_eq!(s.len(), 3, "{s:?}");
        assert!(s.iter().all(|r| r.live));
        // Members found through Redis and no longer listed are forgotten.
        p.set_members(&[("d".into(), "d:1".into())]);
        assert!(p
            .status()
            .iter()
            .any(|r| r.address == "d:1" && r.source == "redis"));
        p.set_members(&[]);
        assert!(!p.status().iter().any(|r| r.address == "d:1"));
    }
}
