//! The Redis source: the 64 partition streams nodes append to (`al:{pNN}:ev`), each
//! consumed by one aggregator at a time under a lease, through the consumer group
//! `aggregators`.
//!
//! Keys of partition `NN` (one hash tag, so one Cluster slot, so one script sees them all):
//!
//! | key | what |
//! |---|---|
//! | `al:{pNN}:ev` | the events (fields of `meter::event::Spooled`) |
//! | `al:{pNN}:lease` | the id of the aggregator holding the partition, with a TTL |
//! | `al:{pNN}:dead` | dead letters: the entry's fields plus `error` and `entry` (its id) |
//!
//! and `al:aggregators`, a sorted set of live aggregators (score: last heartbeat, Redis
//! time), from which each computes its share of the partitions.
//!
//! The partition's entries are read under one consumer name, the partition's own (`p07`),
//! whoever reads them: its pending list belongs to the partition, not to a process, and the
//! next holder re-reads it (from id 0) before anything new. Reading is a script that checks
//! the lease and renews it in the same step as `XREADGROUP`, so a process that lost the
//! lease cannot take entries from under the new holder; dead-lettering is one script too
//! (lease check, `XADD` to the dead letters, `XACK`, skipped if already done).

use std::time::{Duration, Instant};

use async_trait::async_trait;
use fred::prelude::*;
use fred::types::scripts::Script;

use super::{Claim, Entry, Source};
use crate::error::SourceError;
use crate::row::stream_offset;

/// The consumer group every aggregator reads through.
pub const GROUP: &str = "aggregators";

/// The sorted set of live aggregators.
pub const MEMBERS_KEY: &str = "al:aggregators";

/// The lease key of a partition.
pub fn lease_key(partition: u16) -> String {
    format!("al:{{p{partition:02}}}:lease")
}

/// The dead-letter stream of a partition.
pub fn dead_key(partition: u16) -> String {
    format!("al:{{p{partition:02}}}:dead")
}

/// The name of a partition (its `src`, and its consumer name in the group).
pub fn partition_name(partition: u16) -> String {
    format!("p{partition:02}")
}

/// KEYS: lease, stream. ARGV: me, ttl ms, group. Returns {1} when taken (or already ours),
/// {0, owner} when someone else holds it. Creates the group (from the stream's start) if
/// it does not exist.
const ACQUIRE: &str = r#"
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return {0, owner} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local r = redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[3], '0', 'MKSTREAM')
if type(r) == 'table' and r.err and not string.find(r.err, 'BUSYGROUP') then
  return redis.error_reply(r.err)
end
return {1}
"#;

/// KEYS: lease. ARGV: me, ttl ms. {1} renewed, {0, owner} lost.
const RENEW: &str = r#"
local owner = redis.call('GET', KEYS[1])
if owner ~= ARGV[1] then return {0, owner or ''} end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1}
"#;

/// KEYS: lease. ARGV: me. Deletes the lease if it is ours.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"#;

/// KEYS: lease, stream. ARGV: me, ttl ms, group, consumer, count, from id (`>` for new
/// entries, an id for pending ones after it). {1, entries} or {0, owner}.
const READ: &str = r#"
local owner = redis.call('GET', KEYS[1])
if owner ~= ARGV[1] then return {0, owner or ''} end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local function read()
  return redis.pcall('XREADGROUP', 'GROUP', ARGV[3], ARGV[4], 'COUNT', ARGV[5],
                     'STREAMS', KEYS[2], ARGV[6])
end
local r = read()
if type(r) == 'table' and r.err then
  if not string.find(r.err, 'NOGROUP') then return redis.error_reply(r.err) end
  redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[3], '0', 'MKSTREAM')
  r = read()
  if type(r) == 'table' and r.err then return redis.error_reply(r.err) end
end
if not r then return {1, {}} end
return {1, r[1][2]}
"#;

/// KEYS: lease, stream, dead. ARGV: me, ttl ms, group, entry id, error, then the entry's
/// field names and values. {1} done (now or before), {0, owner} lost.
const DEAD_LETTER: &str = r#"
local owner = redis.call('GET', KEYS[1])
if owner ~= ARGV[1] then return {0, owner or ''} end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local pending = redis.call('XPENDING', KEYS[2], ARGV[3], ARGV[4], ARGV[4], 1)
if #pending == 0 then return {1} end
local fields = {'entry', ARGV[4], 'error', ARGV[5]}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[3], '*', unpack(fields))
redis.call('XACK', KEYS[2], ARGV[3], ARGV[4])
return {1}
"#;

/// KEYS: members. ARGV: me, ttl ms. Records a heartbeat (Redis time), forgets members
/// silent for a TTL, returns how many are left.
const HEARTBEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[2])))
return redis.call('ZCARD', KEYS[1])
"#;

/// Acknowledgements per `XACK`.
const ACK_CHUNK: usize = 1000;

struct Scripts {
    acquire: Script,
    renew: Script,
    release: Script,
    read: Script,
    dead_letter: Script,
    heartbeat: Script,
}

/// The 64 partition streams in Redis (standalone or Cluster).
pub struct RedisSource {
    client: Client,
    me: String,
    ttl: Duration,
    trim: bool,
    scripts: std::sync::Arc<Scripts>,
}

fn unavailable(e: fred::error::Error) -> SourceError {
    SourceError::Unavailable(e.to_string())
}

impl RedisSource {
    /// Connects to `url` (`redis://…` or `redis-cluster://…`) as aggregator `id`, holding
    /// leases for `ttl`. Leases and heartbeats name this process `<id>/<nonce>`, so two
    /// processes given the same id by mistake still never share a partition, and a
    /// restarted aggregator waits for its former self's leases to lapse.
    pub async fn connect(url: &str, id: &str, ttl: Duration) -> Result<RedisSource, SourceError> {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()).rotate_left(32);
        let me = format!("{id}/{nonce:x}");
        let config = Config::from_url(url)
            .map_err(|e| SourceError::Invalid(format!("redis url {url}: {e}")))?;
        let client = Builder::from_config(config)
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(2);
                c.internal_command_timeout = Duration::from_secs(2);
                // No silent re-sends: a read whose answer is lost has still moved entries
                // to the pending list, and the claim re-reads them from there instead.
                c.max_command_attempts = 1;
            })
            .with_performance_config(|p| {
                p.default_command_timeout = Duration::from_secs(5);
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
            .build()
            .map_err(unavailable)?;
        client.init().await.map_err(unavailable)?;
        Ok(RedisSource {
            client,
            me,
            ttl,
            trim: true,
            scripts: std::sync::Arc::new(Scripts {
                acquire: Script::from_lua(ACQUIRE),
                renew: Script::from_lua(RENEW),
                release: Script::from_lua(RELEASE),
                read: Script::from_lua(READ),
                dead_letter: Script::from_lua(DEAD_LETTER),
                heartbeat: Script::from_lua(HEARTBEAT),
            }),
        })
    }

    fn ttl_ms(&self) -> String {
        self.ttl.as_millis().max(1).to_string()
    }

    /// Keeps acknowledged entries in the streams (for other consumer groups reading them)
    /// instead of trimming them after each batch.
    pub fn keep_acknowledged(mut self, keep: bool) -> RedisSource {
        self.trim = !keep;
        self
    }
}

#[async_trait]
impl Source for RedisSource {
    fn partitions(&self) -> Vec<u16> {
        (0..meter::event::PARTITIONS).collect()
    }

    async fn heartbeat(&self) -> Result<usize, SourceError> {
        let n: i64 = self
            .scripts
            .heartbeat
            .evalsha_with_reload(
                &self.client,
                vec![MEMBERS_KEY.to_string()],
                vec![self.me.clone(), self.ttl_ms()],
            )
            .await
            .map_err(unavailable)?;
        Ok(n.max(1) as usize)
    }

    async fn acquire(&self, partition: u16) -> Result<Option<Box<dyn Claim>>, SourceError> {
        let lease = lease_key(partition);
        let stream = meter::event::stream_key(partition);
        let reply: Value = self
            .scripts
            .acquire
            .evalsha_with_reload(
                &self.client,
                vec![lease.clone(), stream.clone()],
                vec![self.me.clone(), self.ttl_ms(), GROUP.to_string()],
            )
            .await
            .map_err(unavailable)?;
        if lease_reply(&reply, &partition_name(partition))?.is_some() {
            return Ok(None);
        }
        Ok(Some(Box::new(RedisClaim {
            client: self.client.clone(),
            scripts: self.scripts.clone(),
            me: self.me.clone(),
            ttl: self.ttl,
            name: partition_name(partition),
            lease,
            stream,
            dead: dead_key(partition),
            cursor: Cursor::Pending("0".into()),
            renewed: Instant::now(),
            trim: self.trim,
        })))
    }

    async fn leave(&self) {
        let r: Result<i64, _> = self.client.zrem(MEMBERS_KEY, self.me.clone()).await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "could not leave the aggregator set");
        }
    }
}

/// Where the next read starts.
#[derive(Debug, Clone)]
enum Cursor {
    /// Pending entries after this id (delivered before, not acknowledged).
    Pending(String),
    /// New entries (`>`), after `last` (the last id handed out).
    New { last: String },
}

struct RedisClaim {
    client: Client,
    scripts: std::sync::Arc<Scripts>,
    me: String,
    ttl: Duration,
    name: String,
    lease: String,
    stream: String,
    dead: String,
    cursor: Cursor,
    renewed: Instant,
    trim: bool,
}

/// `None` when a lease script answered {1}; `Some(owner)` for {0, owner}.
fn lease_reply(reply: &Value, partition: &str) -> Result<Option<String>, SourceError> {
    let items = match reply {
        Value::Array(items) => items,
        other => {
            return Err(SourceError::Invalid(format!(
                "partition {partition}: unexpected lease reply {other:?}"
            )))
        }
    };
    match items.first().and_then(Value::as_i64) {
        Some(1) => Ok(None),
        Some(0) => Ok(Some(
            items.get(1).and_then(Value::as_string).unwrap_or_default(),
        )),
        _ => Err(SourceError::Invalid(format!(
            "partition {partition}: unexpected lease reply {reply:?}"
        ))),
    }
}

impl RedisClaim {
    fn ttl_ms(&self) -> String {
        self.ttl.as_millis().max(1).to_string()
    }

    fn lost(&self, owner: String) -> SourceError {
        SourceError::LeaseLost {
            partition: self.name.clone(),
            owner: (!owner.is_empty()).then_some(owner),
        }
    }

    /// Runs a lease-checking script; its data (the second element) when the lease holds.
    async fn leased(
        &mut self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Value, SourceError> {
        let reply: Value = script
            .evalsha_with_reload(&self.client, keys, args)
            .await
            .map_err(unavailable)?;
        if let Some(owner) = lease_reply(&reply, &self.name)? {
            return Err(self.lost(owner));
        }
        self.renewed = Instant::now();
        Ok(match reply {
            Value::Array(mut items) if items.len() > 1 => items.swap_remove(1),
            _ => Value::Null,
        })
    }

    async fn read_from(&mut self, from: &str, max: usize) -> Result<Vec<Entry>, SourceError> {
        let scripts = self.scripts.clone();
        let data = self
            .leased(
                &scripts.read,
                vec![self.lease.clone(), self.stream.clone()],
                vec![
                    self.me.clone(),
                    self.ttl_ms(),
                    GROUP.to_string(),
                    self.name.clone(),
                    max.max(1).to_string(),
                    from.to_string(),
                ],
            )
            .await?;
        parse_entries(data, &self.name)
    }
}

fn parse_entries(data: Value, partition: &str) -> Result<Vec<Entry>, SourceError> {
    let bad = |what: &str| SourceError::Invalid(format!("partition {partition}: {what}"));
    let items = match data {
        Value::Array(items) => items,
        Value::Null => return Ok(Vec::new()),
        other => return Err(bad(&format!("unexpected XREADGROUP reply {other:?}"))),
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(mut parts) = item else {
            return Err(bad("an entry that is not an array"));
        };
        if parts.is_empty() {
            return Err(bad("an empty entry"));
        }
        let fields_value = if parts.len() > 1 {
            parts.swap_remove(1)
        } else {
            Value::Null
        };
        let id = parts[0]
            .as_string()
            .ok_or_else(|| bad("an entry without an id"))?;
        let offset = stream_offset(&id).map_err(|e| bad(&e))?;
        let fields = match fields_value {
            Value::Null => None,
            Value::Array(kv) => {
                let mut fields = Vec::with_capacity(kv.len() / 2);
                for pair in kv.chunks(2) {
                    let k = pair[0].as_string().unwrap_or_default();
                    let v = pair.get(1).and_then(Value::as_string).unwrap_or_default();
                    fields.push((k, v));
                }
                Some(fields)
            }
            other => return Err(bad(&format!("entry {id}: fields {other:?}"))),
        };
        out.push(Entry { offset, id, fields });
    }
    Ok(out)
}

#[async_trait]
impl Claim for RedisClaim {
    fn name(&self) -> &str {
        &self.name
    }

    async fn read(&mut self, max: usize) -> Result<Vec<Entry>, SourceError> {
        loop {
            let cursor = self.cursor.clone();
            let (from, pending) = match &cursor {
                Cursor::Pending(after) => (after.as_str(), true),
                Cursor::New { .. } => (">", false),
            };
            let entries = match self.read_from(from, max).await {
                Ok(e) => e,
                Err(e) => {
                    // The answer may be lost after the entries were delivered (they are
                    // pending now): read the pending list again after what we handed out.
                    if let Cursor::New { last } = cursor {
                        self.cursor = Cursor::Pending(last);
                    }
                    return Err(e);
                }
            };
            match entries.last() {
                Some(last) => {
                    let last = last.id.clone();
                    self.cursor = if pending {
                        Cursor::Pending(last)
                    } else {
                        Cursor::New { last }
                    };
                    return Ok(entries);
                }
                None if pending => {
                    // Pending list done: on to new entries.
                    let last = match cursor {
                        Cursor::Pending(a) => a,
                        Cursor::New { last } => last,
                    };
                    self.cursor = Cursor::New { last };
                }
                None => return Ok(entries),
            }
        }
    }

    async fn confirm(&mut self) -> Result<(), SourceError> {
        let scripts = self.scripts.clone();
        self.leased(
            &scripts.renew,
            vec![self.lease.clone()],
            vec![self.me.clone(), self.ttl_ms()],
        )
        .await
        .map(drop)
    }

    async fn keep(&mut self) -> Result<(), SourceError> {
        if self.renewed.elapsed() >= self.ttl / 3 {
            self.confirm().await?;
        }
        Ok(())
    }

    async fn ack(&mut self, entries: &[&Entry]) -> Result<(), SourceError> {
        for chunk in entries.chunks(ACK_CHUNK) {
            let ids: Vec<String> = chunk.iter().map(|e| e.id.clone()).collect();
            let _: i64 = self
                .client
                .xack(self.stream.clone(), GROUP, ids)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    async fn trim(&mut self) -> Result<(), SourceError> {
        let last = match &self.cursor {
            Cursor::Pending(last) | Cursor::New { last } => last.clone(),
        };
        if !self.trim || last == "0" {
            return Ok(());
        }
        // Entries below the last one handed out: all acknowledged (the caller says so), and
        // never read again. The last one stays (harmless).
        let _: i64 = self
            .client
            .xtrim(self.stream.clone(), ("MINID", "=", last))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn backlog(&mut self) -> Option<u64> {
        // Without trimming the stream holds acknowledged entries too: no cheap answer.
        if !self.trim {
            return None;
        }
        let len: u64 = self.client.xlen(self.stream.clone()).await.ok()?;
        // Trimming keeps the last entry handed out (acknowledged).
        let kept = match &self.cursor {
            Cursor::Pending(last) | Cursor::New { last } => u64::from(last != "0"),
        };
        Some(len.saturating_sub(kept))
    }

    async fn dead_letter(&mut self, entry: &Entry, error: &str) -> Result<(), SourceError> {
        let mut args = vec![
            self.me.clone(),
            self.ttl_ms(),
            GROUP.to_string(),
            entry.id.clone(),
            error.to_string(),
        ];
        for (k, v) in entry.fields.iter().flatten() {
            args.push(k.clone());
            args.push(v.clone());
        }
        let scripts = self.scripts.clone();
        self.leased(
            &scripts.dead_letter,
            vec![self.lease.clone(), self.stream.clone(), self.dead.clone()],
            args,
        )
        .await
        .map(drop)
    }

    async fn release(self: Box<Self>) {
        let r: Result<i64, _> = self
            .scripts
            .release
            .evalsha_with_reload(
                &self.client,
                vec![self.lease.clone()],
                vec![self.me.clone()],
            )
            .await;
        if let Err(e) = r {
            tracing::warn!(partition = %self.name, error = %e, "could not release the lease (it expires by itself)");
        }
    }
}
