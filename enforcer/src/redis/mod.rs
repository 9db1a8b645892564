//! The Redis store: the shared truth when several nodes enforce the same hard caps.
//!
//! Every change is one server-side Lua script (`lua/*.lua`), so a reserve checks every
//! window and holds units in all or none, with its idempotency record, in one atomic step.
//! All keys of a tenant carry the tenant as hash tag (`al:{acme}:…`), so in a Redis
//! Cluster a tenant's scripts run within one slot. Scripts go by EVALSHA and are loaded
//! again on NOSCRIPT (a promoted replica may not have them cached).
//!
//! Key layout, for tenant `t`:
//! - `al:{t}:c:<slot key>` counter hash (`u` used, `r` reserved), expiring a retention
//!   time after its period ends;
//! - `al:{t}:r:<id>` reservation hash; `al:{t}:i:<key>` idempotency record;
//!   `al:{t}:x` expiry index (sorted set of reservation ids by TTL);
//! - `al:{t}:e:<event id>` record dedup; `al:{t}:sub` subscription; `al:{t}:ovr` overrides;
//! - `al:{t}:b:<bucket>` token bucket of a `scope: global` rate limit (`lua/gcra.lua`, on
//!   the server's clock), gone once it is full again;
//! - `al:catalog`, `al:tenants` (every subscribed tenant), `al:pending` (tenants with
//!   open reservations, the sweeper's fast path), channel `al:changes`.
//!
//! Numbers in scripts are Lua doubles: counts are exact up to 2^53 (9·10^15) units per
//! counter, far above any request (at most 10^15).

use std::time::Duration;

use chrono::{DateTime, Utc};
use fred::prelude::*;
use fred::types::scripts::Script;
use meter::catalog::Catalog;
use meter::grant::Override;
use meter::ledger::LedgerEntry;
use meter::lifecycle::Subscription;
use meter::quota::RateSlot;
use meter::store::{
    ControlStore, ProviderRecord, RateOutcome, RateStore, RecordOp, RecordOutcome, Reservation,
    ReserveOp, ReserveOutcome, SettleOutcome, Settlement, SlotSpec, SlotUsage, StoreError,
    UsageStore,
};

/// The channel on which changes of control state are announced.
pub const CHANGES: &str = "al:changes";
/// Message on [`CHANGES`] for a new catalog; other messages are tenant ids.
pub const CATALOG_CHANGED: &str = "*catalog";
/// Delivered by [`subscribe_changes`] when announcements may have been missed.
pub const EVERYTHING_CHANGED: &str = "*all";

const PENDING: &str = "al:pending";
const TENANTS: &str = "al:tenants";
const CATALOG: &str = "al:catalog";
/// Membership: node id → "address\theartbeat unix ms".
const MEMBERS: &str = "al:members";

/// A provider object's sync record; the hash tag keeps each object in its own slot.
fn provider_key(provider: &str, object_id: &str) -> String {
    format!("al:prov:{{{provider}:{object_id}}}")
}

/// The objects of a provider that have a record.
fn provider_objects_key(provider: &str) -> String {
    format!("al:prov-objects:{provider}")
}

/// The object a payment belongs to.
fn payment_link_key(provider: &str, payment_id: &str) -> String {
    format!("al:plink:{{{provider}:{payment_id}}}")
}

/// Times one script call, and counts it as an error unless Redis answered: a call the
/// engine dropped at its deadline is the failure operators most need to see, and it never
/// returns to say so.
struct ScriptTiming {
    name: &'static str,
    started: std::time::Instant,
    answered: bool,
}

impl Drop for ScriptTiming {
    fn drop(&mut self) {
        metrics::histogram!(crate::metrics::REDIS_SECONDS, "script" => self.name)
            .record(self.started.elapsed().as_secs_f64());
        if !self.answered {
            metrics::counter!(crate::metrics::REDIS_ERRORS, "script" => self.name).increment(1);
        }
    }
}

/// An event of a node's local spool to ship: its sequence number, tenant and fields.
pub type Shipment<'a> = (u64, &'a str, &'a [(String, String)]);

/// How a [`RedisStore`] connects and what it waits for.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://host:port` for one server, `redis-cluster://host:port` for a Cluster seed.
    pub url: String,
    /// How long dedup records, settled reservations and ended counters are kept.
    pub retention: Duration,
    /// Wait for this many replicas to acknowledge each hard-cap write (`WAIT`), with this
    /// timeout; `None` answers as soon as the master has it.
    pub wait_replicas: Option<(u32, Duration)>,
    /// Longest life of one command in the client: past it the command is abandoned rather
    /// than retried later, when its answer no longer matters.
    pub command_timeout: Duration,
}

/// The Redis store. Cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    client: Client,
    opts: RedisOptions,
    reserve: Script,
    settle: Script,
    record: Script,
    usage: Script,
    gcra: Script,
    ship: Script,
    ledger: Script,
    provider: Script,
}

fn unavailable(e: Error) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

/// A failed write script. The client may have sent it and retried it on another node
/// (failover), so whatever the error, nobody knows whether it ran; saying "not applied"
/// could deny (or journal again) something already counted. The caller retries with the
/// same key instead; only a call never sent (circuit open) is known not to have run.
fn write_error(e: Error) -> StoreError {
    StoreError::Indeterminate(format!("redis: {e}"))
}

use meter::event::{item_key as key, tenant_key, tenant_stream as stream};

fn ms(t: DateTime<Utc>) -> String {
    t.timestamp_millis().to_string()
}

/// The script's reply as strings (integers and bulk strings alike).
fn strings(v: Value) -> Result<Vec<String>, StoreError> {
    let bad = |what: &str| StoreError::Corrupt(format!("unexpected script reply: {what}"));
    match v {
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::Integer(i) => Ok(i.to_string()),
                Value::String(s) => Ok(s.to_string()),
                Value::Bytes(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
                Value::Double(d) => Ok(format!("{d:.0}")),
                Value::Null => Ok(String::new()),
                other => Err(bad(&format!("{other:?}"))),
            })
            .collect(),
        other => Err(bad(&format!("{other:?}"))),
    }
}

fn num(s: &str) -> Result<u64, StoreError> {
    s.parse::<u64>()
        .or_else(|_| s.parse::<i64>().map(|i| i.max(0) as u64))
        .map_err(|_| StoreError::Corrupt(format!("not a count: {s:?}")))
}

fn pairs(items: &[String]) -> Result<Vec<SlotUsage>, StoreError> {
    items
        .chunks(2)
        .map(|c| {
            Ok(SlotUsage {
                used: num(&c[0])?,
                reserved: num(c.get(1).map_or("0", |s| s.as_str()))?,
            })
        })
        .collect()
}

/// Usage as a script stored it: `u1,r1,u2,r2…`.
fn stored_usage(text: Option<&str>) -> Result<Vec<SlotUsage>, StoreError> {
    let items: Vec<String> = text
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    pairs(&items)
}

/// An instant stored as Unix milliseconds.
fn instant(ms: &str) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms.parse().unwrap_or(0)).unwrap_or_default()
}

fn slot_args(slots: &[SlotSpec]) -> Vec<String> {
    slots
        .iter()
        .flat_map(|s| {
            [
                s.cap.map(|c| c.to_string()).unwrap_or_default(),
                s.ends_at.map(ms).unwrap_or_default(),
            ]
        })
        .collect()
}

impl RedisStore {
    /// Connects and loads the scripts.
    pub async fn connect(opts: RedisOptions) -> Result<RedisStore, StoreError> {
        let config = Config::from_url(&opts.url).map_err(|e| StoreError::Invalid {
            field: "redis".into(),
            reason: format!("{}: {e}", opts.url),
        })?;
        let command_timeout = opts.command_timeout;
        let client = Builder::from_config(config)
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(2);
                c.internal_command_timeout = Duration::from_secs(2);
                // One attempt: a command re-sent by the client after a failover, long after
                // the request gave up on it, could count something the caller was told
                // was refused.
                c.max_command_attempts = 1;
                c.tcp = TcpConfig {
                    nodelay: Some(true),
                    ..Default::default()
                };
            })
            .with_performance_config(|p| {
                p.default_command_timeout = command_timeout;
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
            .build()
            .map_err(unavailable)?;
        client.init().await.map_err(unavailable)?;
        let store = RedisStore {
            client,
            opts,
            reserve: Script::from_lua(include_str!("lua/reserve.lua")),
            settle: Script::from_lua(include_str!("lua/settle.lua")),
            record: Script::from_lua(include_str!("lua/record.lua")),
            usage: Script::from_lua(include_str!("lua/usage.lua")),
            gcra: Script::from_lua(include_str!("lua/gcra.lua")),
            ship: Script::from_lua(include_str!("lua/ship.lua")),
            ledger: Script::from_lua(include_str!("lua/ledger.lua")),
            provider: Script::from_lua(include_str!("lua/provider.lua")),
        };
        for s in [
            &store.reserve,
            &store.settle,
            &store.record,
            &store.usage,
            &store.gcra,
            &store.ship,
            &store.ledger,
            &store.provider,
        ] {
            s.load(&store.client).await.map_err(unavailable)?;
        }
        Ok(store)
    }

    /// The client, for tests.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// How it was connected.
    pub fn options(&self) -> &RedisOptions {
        &self.opts
    }

    fn keep_ms(&self) -> String {
        self.opts.retention.as_millis().to_string()
    }

    /// Whether Redis answers a PING within the command timeout (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let wait = self.opts.command_timeout;
        match tokio::time::timeout(wait, self.client.ping::<String>(None)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(StoreError::Unavailable(format!(
                "redis: no answer to PING within {wait:?}"
            ))),
        }
    }

    /// A script's name in metrics.
    fn script_name(&self, s: &Script) -> &'static str {
        let named = [
            (&self.reserve, "reserve"),
            (&self.settle, "settle"),
            (&self.record, "record"),
            (&self.usage, "usage"),
            (&self.gcra, "gcra"),
            (&self.ship, "ship"),
        ];
        named
            .iter()
            .find(|(script, _)| std::ptr::eq(*script, s))
            .map_or("other", |(_, n)| n)
    }

    /// Runs a script; `on_error` says what a failure means (a write's outcome is unknown,
    /// a read simply failed).
    async fn eval(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<String>,
        on_error: fn(Error) -> StoreError,
    ) -> Result<Vec<String>, StoreError> {
        let mut timing = ScriptTiming {
            name: self.script_name(script),
            started: std::time::Instant::now(),
            answered: false,
        };
        let v: Value = script
            .evalsha_with_reload(&self.client, keys, args)
            .await
            .map_err(on_error)?;
        timing.answered = true;
        strings(v)
    }

    /// Waits for replicas when configured, on the node that holds `key` (WAIT covers the
    /// writes made before it on that node's connection). The write itself already stands
    /// on the master, so a failed or short WAIT is logged, not turned into an error: the
    /// answer is true either way, only its survival of a failover is less certain.
    async fn replicate(&self, key: &str) -> Result<(), StoreError> {
        let Some((n, timeout)) = self.opts.wait_replicas else {
            return Ok(());
        };
        let timeout = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        let slot = fred::util::redis_keyslot(key.as_bytes());
        let node = self
            .client
            .cached_cluster_state()
            .and_then(|s| s.get_server(slot).cloned());
        let wait = async {
            match node {
                Some(server) => {
                    self.client
                        .with_cluster_node(server)
                        .wait::<i64>(i64::from(n), timeout)
                        .await
                }
                None => self.client.wait::<i64>(i64::from(n), timeout).await,
            }
        };
        // WAIT to a node that just died would hang until the command timeout; the request
        // must not, so the wait is bounded by its own timeout plus a margin.
        let bound = Duration::from_millis(timeout.unsigned_abs().saturating_add(50));
        let acked = match tokio::time::timeout(bound, wait).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(ErrorKind::Timeout, "WAIT did not return")),
        };
        match acked {
            Ok(acked) if acked < i64::from(n) => {
                tracing::debug!(
                    acked,
                    wanted = n,
                    "fewer replicas acknowledged a write than asked for"
                )
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "WAIT failed; refreshing the cluster map");
                if self.client.is_clustered() {
                    let client = self.client.clone();
                    tokio::spawn(async move {
                        let _ = client.sync_cluster().await;
                    });
                }
            }
        }
        Ok(())
    }

    async fn announce(&self, what: &str) {
        // Caches also expire on their TTL, so a lost announcement only delays the change.
        if let Err(e) = self.client.publish::<(), _, _>(CHANGES, what).await {
            tracing::warn!(error = %e, "change not announced");
        }
    }

    async fn reservation_row(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Option<(Reservation, Vec<String>)>, StoreError> {
        let fields: Vec<Option<String>> = self
            .client
            .hmget(
                key(tenant, "r", id),
                vec!["amount", "metric", "exp", "state", "slots"],
            )
            .await
            .map_err(unavailable)?;
        let [Some(amount), Some(metric), Some(exp), Some(state), slots] = fields.as_slice() else {
            return Ok(None);
        };
        let slot_keys: Vec<String> = slots
            .as_deref()
            .unwrap_or("")
            .split('\n')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        let prefix = tenant_key(tenant, "c:");
        let expires_at = instant(exp);
        Ok(Some((
            Reservation {
                id: id.to_string(),
                tenant: tenant.to_string(),
                metric: metric.clone(),
                amount: num(amount)?,
                slots: slot_keys
                    .iter()
                    .map(|k| k.strip_prefix(&prefix).unwrap_or(k).to_string())
                    .collect(),
                expires_at,
                settlement: settlement(state),
            },
            slot_keys,
        )))
    }

    /// Puts back into the sweeper's index every tenant that has open reservations but fell
    /// out of it (a node died between a grant and the index update). Returns how many.
    pub async fn reindex_pending(&self) -> Result<usize, StoreError> {
        let tenants: Vec<String> = self.client.smembers(TENANTS).await.map_err(unavailable)?;
        let mut restored = 0;
        for tenant in tenants {
            let open: i64 = self
                .client
                .zcard(tenant_key(&tenant, "x"))
                .await
                .map_err(unavailable)?;
            if open > 0 {
                let added: i64 = self
                    .client
                    .sadd(PENDING, tenant.as_str())
                    .await
                    .map_err(unavailable)?;
                restored += added as usize;
            }
        }
        Ok(restored)
    }

    /// Says that `node` is alive at `address`, and returns every member with the address
    /// and time (unix ms) of its last heartbeat. Members silent for `forget_after` are
    /// removed on the way.
    pub async fn heartbeat(
        &self,
        node: &str,
        address: &str,
        now_ms: i64,
        forget_after_ms: i64,
    ) -> Result<Vec<(String, String, i64)>, StoreError> {
        self.client
            .hset::<(), _, _>(MEMBERS, (node, format!("{address}\t{now_ms}")))
            .await
            .map_err(unavailable)?;
        let all: std::collections::HashMap<String, String> =
            self.client.hgetall(MEMBERS).await.map_err(unavailable)?;
        let mut members = Vec::new();
        for (id, v) in all {
            let Some((addr, ms)) = v.split_once('\t') else {
                continue;
            };
            let ms: i64 = ms.parse().unwrap_or(0);
            if now_ms - ms > forget_after_ms {
                self.client
                    .hdel::<(), _, _>(MEMBERS, id.as_str())
                    .await
                    .map_err(unavailable)?;
                continue;
            }
            members.push((id, addr.to_string(), ms));
        }
        Ok(members)
    }

    /// Appends an event from `node`'s local spool (sequence `seq`) to the stream of
    /// `tenant`'s partition, unless it was shipped before. Returns whether it was new.
    pub async fn ship(
        &self,
        node: &str,
        seq: u64,
        tenant: &str,
        fields: &[(String, String)],
    ) -> Result<bool, StoreError> {
        let n = self
            .ship_many(
                node,
                meter::event::partition(tenant),
                &[(seq, tenant, fields)],
            )
            .await?;
        Ok(n == 1)
    }

    /// Appends events from `node`'s local spool, all of tenants of `partition` and in
    /// increasing sequence, to the partition's stream in one atomic step (one round trip),
    /// each unless it was shipped before. A granted record is also skipped when its event
    /// id was counted before, by Redis or shipped by any node. Returns how many were new.
    pub async fn ship_many(
        &self,
        node: &str,
        partition: u16,
        events: &[Shipment<'_>],
    ) -> Result<usize, StoreError> {
        let mut keys = vec![
            meter::event::stream_key(partition),
            format!("al:{{p{partition:02}}}:shipped"),
        ];
        let mut args = vec![node.to_string(), self.keep_ms()];
        for (seq, tenant, fields) in events {
            let field = |name: &str| {
                fields
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.as_str())
            };
            let record = Some(meter::event::EventKind::Record.as_str());
            let once = match (field("k"), field("g"), field("i")) {
                (k, Some("1"), Some(id)) if k == record => {
                    keys.push(key(tenant, "e", id));
                    keys.len()
                }
                _ => 0,
            };
            args.push(seq.to_string());
            args.push(once.to_string());
            args.push((fields.len() * 2).to_string());
            for (k, v) in *fields {
                args.push(k.clone());
                args.push(v.clone());
            }
        }
        let out = self.eval(&self.ship, keys, args, write_error).await?;
        num(out.first().map_or("0", String::as_str)).map(|n| n as usize)
    }

    /// Counts usage that was admitted while this store was unreachable: no cap is
    /// checked (it already happened), and `event_id` makes a repeated replay count once.
    /// Returns false when the event id was counted before.
    pub async fn record_forced(
        &self,
        tenant: &str,
        amount: i64,
        event_id: &str,
        slots: &[SlotSpec],
        context: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let mut keys = vec![key(tenant, "e", event_id)];
        keys.extend(slots.iter().map(|s| key(tenant, "c", &s.key)));
        keys.push(stream(tenant));
        let mut args = vec![
            amount.to_string(),
            context.to_string(),
            self.keep_ms(),
            "1".into(),
        ];
        args.extend(slot_args(slots));
        args.push(event_id.to_string());
        args.push(ms(at));
        let out = self.eval(&self.record, keys, args, write_error).await?;
        match out.first().map(String::as_str) {
            Some("2") => Ok(true),
            Some("1") => Ok(false),
            // A gauge decrease that no longer fits (the gauge moved meanwhile): counting it
            // would go below zero, so it is dropped and said so.
            Some("-1") => {
                tracing::warn!(
                    tenant,
                    event_id,
                    amount,
                    "degraded gauge decrease dropped: it would go below zero"
                );
                Ok(false)
            }
            other => Err(StoreError::Corrupt(format!(
                "record script answered {other:?}"
            ))),
        }
    }

    async fn settle_as(
        &self,
        tenant: &str,
        id: &str,
        how: Settlement,
        now: DateTime<Utc>,
    ) -> Result<SettleOutcome, StoreError> {
        let not_found = || StoreError::NotFound {
            field: "reservation_id".into(),
            reason: format!("no reservation {id:?} for tenant {tenant:?}"),
        };
        let (_, slot_keys) = self
            .reservation_row(tenant, id)
            .await?
            .ok_or_else(not_found)?;
        let (code, actual) = match how {
            Settlement::Committed(a) => ("c", a),
            Settlement::Released => ("r", 0),
            Settlement::Expired => ("x", 0),
        };
        let mut keys = vec![key(tenant, "r", id), tenant_key(tenant, "x")];
        keys.extend(slot_keys);
        keys.push(stream(tenant));
        let out = self
            .eval(
                &self.settle,
                keys,
                vec![
                    code.into(),
                    actual.to_string(),
                    now.timestamp_millis().to_string(),
                    id.into(),
                ],
                write_error,
            )
            .await?;
        let reserved = num(out.get(1).map_or("0", |s| s.as_str()))?;
        let state = out.get(2).cloned().unwrap_or_default();
        let metric = out.get(3).cloned().unwrap_or_default();
        let result = |settlement, replayed| SettleOutcome {
            reserved,
            settlement,
            replayed,
            metric: metric.clone(),
        };
        match out.first().map(String::as_str) {
            Some("1") => {
                self.replicate(&key(tenant, "r", id)).await?;
                Ok(result(how, false))
            }
            Some("2") => Ok(result(how, true)),
            Some("3") if how == Settlement::Released => Ok(result(Settlement::Expired, true)),
            Some("3") => Err(StoreError::Conflict(format!(
                "reservation {id} expired at its TTL before this commit; its units were released"
            ))),
            Some("-2") => Err(StoreError::Invalid {
                field: "actual_amount".into(),
                reason: format!(
                    "{actual} is more than the {reserved} reserved; record the excess separately"
                ),
            }),
            Some("-3") => Err(not_found()),
            Some("-1") => match settlement(&state) {
                Some(Settlement::Committed(a)) if matches!(how, Settlement::Committed(_)) => {
                    Err(StoreError::Conflict(format!(
                        "reservation {id} was already committed with {a}, not {actual}"
                    )))
                }
                _ => Err(StoreError::Conflict(format!(
                    "reservation {id} was already {}",
                    state.replace(':', " with ")
                ))),
            },
            other => Err(StoreError::Corrupt(format!(
                "settle script answered {other:?}"
            ))),
        }
    }
}

/// Keys and arguments of `lua/gcra.lua` for `buckets`. Limits past what Lua numbers keep
/// exact are lowered into that range (stricter, never looser); validation keeps catalogs
/// within it, but merges and overrides could pass it.
fn gcra_call(tenant: &str, buckets: &[RateSlot], mode: &str, n: u64) -> (Vec<String>, Vec<String>) {
    let keys = buckets
        .iter()
        .map(|b| key(tenant, "b", &b.bucket))
        .collect();
    let mut args = vec![mode.to_string(), n.to_string()];
    for b in buckets {
        let g = b.gcra.clamped_for_global();
        args.extend([
            g.rate().to_string(),
            g.period().as_micros().to_string(),
            g.burst().to_string(),
        ]);
    }
    (keys, args)
}

#[async_trait::async_trait]
impl RateStore for RedisStore {
    async fn take_rate(
        &self,
        tenant: &str,
        buckets: &[RateSlot],
        n: u64,
        peek: bool,
    ) -> Result<RateOutcome, StoreError> {
        if buckets.is_empty() || n == 0 {
            return Ok(RateOutcome::Allowed);
        }
        let (keys, args) = gcra_call(tenant, buckets, if peek { "p" } else { "t" }, n);
        let on_error = if peek { unavailable } else { write_error };
        let out = self.eval(&self.gcra, keys, args, on_error).await?;
        let bucket = |i: Option<&String>| {
            i.and_then(|i| i.parse::<usize>().ok())
                .and_then(|i| i.checked_sub(1))
                .filter(|i| *i < buckets.len())
                .ok_or_else(|| StoreError::Corrupt(format!("gcra script answered {out:?}")))
        };
        match out.first().map(String::as_str) {
            Some("1") => Ok(RateOutcome::Allowed),
            Some("0") => Ok(RateOutcome::Denied {
                index: bucket(out.get(1))?,
                retry_after: Some(Duration::from_micros(num(out
                    .get(2)
                    .map_or("", |s| s.as_str()))?)),
            }),
            Some("-1") => Ok(RateOutcome::Denied {
                index: bucket(out.get(1))?,
                retry_after: None,
            }),
            other => Err(StoreError::Corrupt(format!(
                "gcra script answered {other:?}"
            ))),
        }
    }

    async fn refund_rate(
        &self,
        tenant: &str,
        buckets: &[RateSlot],
        n: u64,
    ) -> Result<(), StoreError> {
        if buckets.is_empty() || n == 0 {
            return Ok(());
        }
        let (keys, args) = gcra_call(tenant, buckets, "f", n);
        self.eval(&self.gcra, keys, args, write_error).await?;
        Ok(())
    }
}

fn settlement(state: &str) -> Option<Settlement> {
    match state {
        "released" => Some(Settlement::Released),
        "expired" => Some(Settlement::Expired),
        s => s
            .strip_prefix("committed:")
            .and_then(|a| a.parse().ok())
            .map(Settlement::Committed),
    }
}

#[async_trait::async_trait]
impl UsageStore for RedisStore {
    async fn reserve(&self, op: ReserveOp) -> Result<ReserveOutcome, StoreError> {
        let mut keys = vec![
            key(&op.tenant, "i", &op.idempotency_key),
            key(&op.tenant, "r", &op.reservation_id),
            tenant_key(&op.tenant, "x"),
        ];
        keys.extend(op.slots.iter().map(|s| key(&op.tenant, "c", &s.key)));
        keys.push(stream(&op.tenant));
        let mut args = vec![
            op.amount.to_string(),
            op.reservation_id.clone(),
            ms(op.expires_at),
            op.context.clone(),
            op.metric.clone(),
            self.keep_ms(),
        ];
        args.extend(slot_args(&op.slots));
        args.push(ms(op.at));
        // The sweeper's index is updated in the same round trip as the script (the client
        // pipelines both). Indexing a tenant whose reserve is then refused is harmless;
        // an index update lost with a node is restored by the periodic full check.
        let index = self.client.sadd::<(), _, _>(PENDING, op.tenant.as_str());
        let (out, indexed) = tokio::join!(self.eval(&self.reserve, keys, args, write_error), index);
        if let Err(e) = indexed {
            tracing::warn!(error = %e, tenant = %op.tenant, "pending index not updated");
        }
        let out = out?;
        match out.first().map(String::as_str) {
            Some("1") => Ok(ReserveOutcome {
                granted: true,
                reservation_id: out[1].clone(),
                expires_at: instant(&out[2]),
                context: out[3].clone(),
                usage: pairs(&out[4..])?,
                replayed: true,
            }),
            Some(code @ ("0" | "2")) => {
                let granted = code == "2";
                if granted {
                    self.replicate(&key(&op.tenant, "r", &op.reservation_id))
                        .await?;
                }
                Ok(ReserveOutcome {
                    granted,
                    usage: pairs(&out[1..])?,
                    reservation_id: if granted {
                        op.reservation_id
                    } else {
                        String::new()
                    },
                    expires_at: op.expires_at,
                    replayed: false,
                    context: if granted { op.context } else { String::new() },
                })
            }
            other => Err(StoreError::Corrupt(format!(
                "reserve script answered {other:?}"
            ))),
        }
    }

    async fn commit(
        &self,
        tenant: &str,
        reservation_id: &str,
        actual: u64,
        now: DateTime<Utc>,
    ) -> Result<SettleOutcome, StoreError> {
        self.settle_as(tenant, reservation_id, Settlement::Committed(actual), now)
            .await
    }

    async fn release(
        &self,
        tenant: &str,
        reservation_id: &str,
        now: DateTime<Utc>,
    ) -> Result<SettleOutcome, StoreError> {
        self.settle_as(tenant, reservation_id, Settlement::Released, now)
            .await
    }

    async fn record(&self, op: RecordOp) -> Result<RecordOutcome, StoreError> {
        let mut keys = vec![key(&op.tenant, "e", &op.event_id)];
        keys.extend(op.slots.iter().map(|s| key(&op.tenant, "c", &s.key)));
        keys.push(stream(&op.tenant));
        let mut args = vec![
            op.amount.to_string(),
            op.context.clone(),
            self.keep_ms(),
            "0".into(),
        ];
        args.extend(slot_args(&op.slots));
        args.push(op.event_id.clone());
        args.push(ms(op.at));
        let out = self.eval(&self.record, keys, args, write_error).await?;
        match out.first().map(String::as_str) {
            Some("1") => Ok(RecordOutcome {
                granted: true,
                context: out[1].clone(),
                usage: pairs(&out[2..])?,
                replayed: true,
            }),
            Some("0") => Ok(RecordOutcome {
                granted: false,
                usage: pairs(&out[1..])?,
                replayed: false,
                context: String::new(),
            }),
            Some("2") => {
                self.replicate(&key(&op.tenant, "e", &op.event_id)).await?;
                Ok(RecordOutcome {
                    granted: true,
                    usage: pairs(&out[1..])?,
                    replayed: false,
                    context: op.context,
                })
            }
            Some("-1") => Err(StoreError::Invalid {
                field: "amount".into(),
                reason: format!(
                    "{} would take {} below zero ({} in use)",
                    op.amount,
                    op.metric,
                    out.get(2).map_or("0", |s| s.as_str())
                ),
            }),
            other => Err(StoreError::Corrupt(format!(
                "record script answered {other:?}"
            ))),
        }
    }

    async fn find_reserve(
        &self,
        tenant: &str,
        idempotency_key: &str,
    ) -> Result<Option<ReserveOutcome>, StoreError> {
        let f: Vec<Option<String>> = self
            .client
            .hmget(
                key(tenant, "i", idempotency_key),
                vec!["id", "exp", "ctx", "usage"],
            )
            .await
            .map_err(unavailable)?;
        let [Some(id), Some(exp), Some(ctx), usage] = f.as_slice() else {
            return Ok(None);
        };
        Ok(Some(ReserveOutcome {
            granted: true,
            reservation_id: id.clone(),
            expires_at: instant(exp),
            context: ctx.clone(),
            usage: stored_usage(usage.as_deref())?,
            replayed: true,
        }))
    }

    async fn find_record(
        &self,
        tenant: &str,
        event_id: &str,
    ) -> Result<Option<RecordOutcome>, StoreError> {
        let f: Vec<Option<String>> = self
            .client
            .hmget(key(tenant, "e", event_id), vec!["ctx", "usage"])
            .await
            .map_err(unavailable)?;
        let [Some(ctx), usage] = f.as_slice() else {
            return Ok(None);
        };
        Ok(Some(RecordOutcome {
            granted: true,
            context: ctx.clone(),
            usage: stored_usage(usage.as_deref())?,
            replayed: true,
        }))
    }

    async fn usage(&self, tenant: &str, keys: &[String]) -> Result<Vec<SlotUsage>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let keys = keys.iter().map(|k| key(tenant, "c", k)).collect();
        let out = self
            .eval(&self.usage, keys, Vec::new(), unavailable)
            .await?;
        pairs(&out)
    }

    async fn reservation(
        &self,
        tenant: &str,
        reservation_id: &str,
    ) -> Result<Option<Reservation>, StoreError> {
        Ok(self
            .reservation_row(tenant, reservation_id)
            .await?
            .map(|(r, _)| r))
    }

    async fn expire_due(
        &self,
        now: DateTime<Utc>,
        max: usize,
    ) -> Result<Vec<Reservation>, StoreError> {
        let tenants: Vec<String> = self.client.smembers(PENDING).await.map_err(unavailable)?;
        let mut out = Vec::new();
        for tenant in tenants {
            let index = tenant_key(&tenant, "x");
            let due: Vec<String> = self
                .client
                .zrangebyscore(
                    &index,
                    "-inf",
                    now.timestamp_millis() as f64,
                    false,
                    Some((0, max as i64)),
                )
                .await
                .map_err(unavailable)?;
            for id in due {
                // Another node may expire it first: that answer is a replay, not an error.
                match self.settle_as(&tenant, &id, Settlement::Expired, now).await {
                    Ok(s) if !s.replayed => {
                        if let Some(r) = self.reservation(&tenant, &id).await? {
                            out.push(r);
                        }
                    }
                    Ok(_) | Err(StoreError::NotFound { .. }) | Err(StoreError::Conflict(_)) => {
                        let _: Result<(), _> = self.client.zrem(&index, id.as_str()).await;
                    }
                    Err(e) => return Err(e),
                }
            }
            let left: i64 = self.client.zcard(&index).await.map_err(unavailable)?;
            if left == 0 {
                let _: Result<(), _> = self.client.srem(PENDING, tenant.as_str()).await;
                // A reserve may have landed between the count and the removal.
                let again: i64 = self.client.zcard(&index).await.map_err(unavailable)?;
                if again > 0 {
                    let _: Result<(), _> = self.client.sadd(PENDING, tenant.as_str()).await;
                }
            }
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    async fn append_events(
        &self,
        tenant: &str,
        events: Vec<meter::event::Spooled>,
    ) -> Result<(), StoreError> {
        let key = stream(tenant);
        for e in events {
            self.client
                .xadd::<(), _, _, _, _>(&key, false, None, "*", e.to_fields())
                .await
                .map_err(write_error)?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl ControlStore for RedisStore {
    async fn catalog(&self) -> Result<Option<Catalog>, StoreError> {
        let text: Option<String> = self.client.get(CATALOG).await.map_err(unavailable)?;
        text.map(|t| {
            serde_json::from_str(&t).map_err(|e| StoreError::Corrupt(format!("catalog: {e}")))
        })
        .transpose()
    }

    async fn save_catalog(&self, catalog: &Catalog, entry: &LedgerEntry) -> Result<(), StoreError> {
        let text = serde_json::to_string(catalog).expect("catalog serializes");
        self.client
            .set::<(), _, _>(CATALOG, text, None, None, false)
            .await
            .map_err(unavailable)?;
        // The catalog key is shared by every tenant, so it is in another Cluster slot
        // than the ledger: written just before its entry, not with it.
        self.ledger_op(entry, LedgerOp::None).await?;
        self.announce(CATALOG_CHANGED).await;
        Ok(())
    }

    async fn subscription(&self, tenant: &str) -> Result<Option<Subscription>, StoreError> {
        let text: Option<String> = self
            .client
            .get(tenant_key(tenant, "sub"))
            .await
            .map_err(unavailable)?;
        text.map(|t| {
            serde_json::from_str(&t)
                .map_err(|e| StoreError::Corrupt(format!("subscription of {tenant}: {e}")))
        })
        .transpose()
    }

    async fn save_subscription(
        &self,
        sub: &Subscription,
        entry: &LedgerEntry,
    ) -> Result<(), StoreError> {
        let text = serde_json::to_string(sub).expect("subscription serializes");
        self.ledger_op(entry, LedgerOp::Set(tenant_key(&sub.tenant, "sub"), text))
            .await?;
        self.client
            .sadd::<(), _, _>(TENANTS, sub.tenant.as_str())
            .await
            .map_err(unavailable)?;
        self.announce(&sub.tenant).await;
        Ok(())
    }

    async fn tenants(&self) -> Result<Vec<String>, StoreError> {
        let mut t: Vec<String> = self.client.smembers(TENANTS).await.map_err(unavailable)?;
        t.sort();
        Ok(t)
    }

    async fn overrides(&self, tenant: &str) -> Result<Vec<Override>, StoreError> {
        let rows: std::collections::HashMap<String, String> = self
            .client
            .hgetall(tenant_key(tenant, "ovr"))
            .await
            .map_err(unavailable)?;
        let mut out = rows
            .values()
            .map(|t| {
                serde_json::from_str(t)
                    .map_err(|e| StoreError::Corrupt(format!("override of {tenant}: {e}")))
            })
            .collect::<Result<Vec<Override>, _>>()?;
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn add_override(&self, o: &Override, entry: &LedgerEntry) -> Result<(), StoreError> {
        let text = serde_json::to_string(o).expect("override serializes");
        let added = self
            .ledger_op(
                entry,
                LedgerOp::AddField(tenant_key(&o.tenant, "ovr"), o.id.clone(), text),
            )
            .await?;
        if !added {
            return Err(StoreError::Conflict(format!(
                "override {} already exists",
                o.id
            )));
        }
        self.announce(&o.tenant).await;
        Ok(())
    }

    async fn remove_override(
        &self,
        tenant: &str,
        id: &str,
        entry: &LedgerEntry,
    ) -> Result<bool, StoreError> {
        let removed = self
            .ledger_op(
                entry,
                LedgerOp::RemoveField(tenant_key(tenant, "ovr"), id.to_string()),
            )
            .await?;
        if removed {
            self.announce(tenant).await;
        }
        Ok(removed)
    }

    async fn record_entry(&self, entry: &LedgerEntry) -> Result<bool, StoreError> {
        self.ledger_op(entry, LedgerOp::None).await
    }

    async fn ledger(&self, tenant: &str, limit: usize) -> Result<Vec<LedgerEntry>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let from = -i64::try_from(limit).unwrap_or(i64::MAX);
        let ids: Vec<String> = self
            .client
            .zrange(
                tenant_key(tenant, "ledger"),
                from,
                -1,
                None,
                false,
                None,
                false,
            )
            .await
            .map_err(unavailable)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let texts: Vec<Option<String>> = self
            .client
            .hmget(tenant_key(tenant, "ledger-e"), ids)
            .await
            .map_err(unavailable)?;
        texts
            .into_iter()
            .flatten()
            .map(|t| {
                serde_json::from_str(&t)
                    .map_err(|e| StoreError::Corrupt(format!("ledger of {tenant}: {e}")))
            })
            .collect()
    }

    async fn provider_record(
        &self,
        provider: &str,
        object_id: &str,
    ) -> Result<Option<ProviderRecord>, StoreError> {
        let (rev, text): (Option<String>, Option<String>) = self
            .client
            .hmget(provider_key(provider, object_id), vec!["rev", "text"])
            .await
            .map_err(unavailable)?;
        let (Some(rev), Some(text)) = (rev, text) else {
            return Ok(None);
        };
        let revision = rev
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("revision of {provider} {object_id}: {e}")))?;
        Ok(Some(ProviderRecord { revision, text }))
    }

    async fn put_provider_record(
        &self,
        provider: &str,
        object_id: &str,
        expected: u64,
        text: &str,
    ) -> Result<bool, StoreError> {
        // Listed first, in its own slot: a listed object without a record yet is harmless
        // (reconciliation reads nothing for it), a record nobody can list is not.
        self.client
            .sadd::<(), _, _>(provider_objects_key(provider), object_id)
            .await
            .map_err(unavailable)?;
        let v: Value = self
            .provider
            .evalsha_with_reload(
                &self.client,
                vec![provider_key(provider, object_id)],
                vec![expected.to_string(), text.to_string()],
            )
            .await
            .map_err(write_error)?;
        Ok(v.as_i64() == Some(1))
    }

    async fn provider_objects(&self, provider: &str) -> Result<Vec<String>, StoreError> {
        let mut ids: Vec<String> = self
            .client
            .smembers(provider_objects_key(provider))
            .await
            .map_err(unavailable)?;
        ids.sort();
        Ok(ids)
    }

    async fn link_payment(
        &self,
        provider: &str,
        payment_id: &str,
        object_id: &str,
    ) -> Result<(), StoreError> {
        self.client
            .set::<(), _, _>(
                payment_link_key(provider, payment_id),
                object_id,
                None,
                Some(SetOptions::NX),
                false,
            )
            .await
            .map_err(write_error)
    }

    async fn payment_link(
        &self,
        provider: &str,
        payment_id: &str,
    ) -> Result<Option<String>, StoreError> {
        self.client
            .get(payment_link_key(provider, payment_id))
            .await
            .map_err(unavailable)
    }
}

/// What [`RedisStore::ledger_op`] changes together with the entry.
enum LedgerOp {
    /// Nothing: the entry alone.
    None,
    /// `SET key value`.
    Set(String, String),
    /// Add a hash field, refused if present.
    AddField(String, String, String),
    /// Remove a hash field; nothing is recorded if it is absent.
    RemoveField(String, String),
}

impl RedisStore {
    /// Runs `op` and records `entry` in one script; whether both happened (false: the op
    /// refused, or the entry id was recorded before).
    async fn ledger_op(&self, entry: &LedgerEntry, op: LedgerOp) -> Result<bool, StoreError> {
        let (name, target, field, value) = match op {
            LedgerOp::None => ("none", String::new(), String::new(), String::new()),
            LedgerOp::Set(k, v) => ("set", k, String::new(), v),
            LedgerOp::AddField(k, f, v) => ("hsetnx", k, f, v),
            LedgerOp::RemoveField(k, f) => ("hdel", k, f, String::new()),
        };
        let index = tenant_key(&entry.tenant, "ledger");
        // 'none' names the index again: every key of the script is in the tenant's slot.
        let target = if target.is_empty() {
            index.clone()
        } else {
            target
        };
        let keys = vec![index, tenant_key(&entry.tenant, "ledger-e"), target];
        let args = vec![
            entry.id.clone(),
            serde_json::to_string(entry).expect("ledger entries serialize"),
            entry.at.timestamp_millis().to_string(),
            name.to_string(),
            field,
            value,
        ];
        let v: Value = self
            .ledger
            .evalsha_with_reload(&self.client, keys, args)
            .await
            .map_err(write_error)?;
        Ok(v.as_i64() == Some(1))
    }
}

/// Follows the announcements on [`CHANGES`]: tenant ids, [`CATALOG_CHANGED`], and
/// [`EVERYTHING_CHANGED`] when messages were dropped. The subscription is restored after a
/// reconnection; the channel closes only if the subscriber task stops.
pub async fn subscribe_changes(
    opts: &RedisOptions,
) -> Result<tokio::sync::mpsc::Receiver<String>, StoreError> {
    let config = Config::from_url(&opts.url).map_err(|e| StoreError::Invalid {
        field: "redis".into(),
        reason: format!("{}: {e}", opts.url),
    })?;
    let subscriber = Builder::from_config(config)
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
        .build_subscriber_client()
        .map_err(unavailable)?;
    subscriber.init().await.map_err(unavailable)?;
    let _resubscriber = subscriber.manage_subscriptions();
    subscriber.subscribe(CHANGES).await.map_err(unavailable)?;
    let mut messages = subscriber.message_rx();
    let mut reconnects = subscriber.reconnect_rx();
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        let _subscriber = subscriber;
        loop {
            let change = tokio::select! {
                m = messages.recv() => match m {
                    Ok(m) => m.value.as_string().unwrap_or_default(),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => EVERYTHING_CHANGED.to_string(),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
                r = reconnects.recv() => match r {
                    // Announcements made while disconnected are lost.
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => EVERYTHING_CHANGED.to_string(),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
            };
            if tx.send(change).await.is_err() {
                break;
            }
        }
    });
    Ok(rx)
}
