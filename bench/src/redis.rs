//! The bench's own Redis: a throwaway `redis-server` child, and the `redis-script` ceiling,
//! which sends the node's own reserve and settle scripts straight to it.
//!
//! The server listens on a free loopback port, keeps its files in a temporary directory,
//! never saves (`--save "" --appendonly no`), and is killed with the bench like the other
//! children. The ceiling builds keys and arguments the way `enforcer/src/redis/mod.rs`
//! does; the slots (counter keys, caps, period ends) and the replay context come from a
//! reservation the node made, so they are the node's own.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use fred::prelude::*;
use fred::types::scripts::Script;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::Command;

use crate::node::{log_tail, ServerProcess};
use crate::scenario::Failure;

/// The node's reserve script.
const RESERVE_LUA: &str = include_str!("../../enforcer/src/redis/lua/reserve.lua");
/// The node's settle script.
const SETTLE_LUA: &str = include_str!("../../enforcer/src/redis/lua/settle.lua");
/// The node's default `--retention` (7 days), the scripts' `keep_ms`.
const KEEP_MS: u64 = 7 * 24 * 3600 * 1000;
/// The node's default reservation TTL (60 s).
const RESERVATION_TTL_MS: u64 = 60_000;
/// How long redis-server may take to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The `redis://` URL of a server started by [`start_server`].
pub fn url(server: &ServerProcess) -> String {
    format!("redis://{}", server.addr())
}

/// The version `redis-server --version` reports (`7.0.15`), or its whole first line.
pub fn version(bin: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .with_context(|| not_found(bin))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or_default();
    Ok(line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("v="))
        .unwrap_or(line)
        .to_owned())
}

fn not_found(bin: &Path) -> String {
    format!(
        "running {}: install Redis 7 (apt-get install redis-server) or pass --redis-server PATH",
        bin.display()
    )
}

/// Starts a throwaway `redis-server` on a free loopback port and waits until it answers.
pub async fn start_server(bin: &Path) -> anyhow::Result<ServerProcess> {
    // The port is free when picked but could be taken before redis-server binds it.
    let mut last = None;
    for _ in 0..3 {
        match try_start(bin).await {
            Ok(server) => return Ok(server),
            Err(e) if format!("{e:#}").contains("Address already in use") => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("three attempts made"))
}

async fn try_start(bin: &Path) -> anyhow::Result<ServerProcess> {
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let dir = tempfile::Builder::new()
        .prefix("allot-bench-redis-")
        .tempdir()
        .context("creating a temporary directory for redis-server")?;
    let log = dir.path().join("redis.log");
    let mut cmd = Command::new(bin);
    cmd.arg("--port")
        .arg(port.to_string())
        .arg("--bind")
        .arg("127.0.0.1")
        .arg("--save")
        .arg("")
        .arg("--appendonly")
        .arg("no")
        .arg("--daemonize")
        .arg("no")
        .arg("--dir")
        .arg(dir.path())
        .arg("--logfile")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| not_found(bin))?;

    let begin = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "redis-server exited ({status}) before answering{}",
                log_tail(Some(&log))
            );
        }
        if ping(addr).await {
            break;
        }
        if begin.elapsed() > START_TIMEOUT {
            let _ = child.kill().await;
            bail!(
                "redis-server did not answer PING on {addr} within {}s{}",
                START_TIMEOUT.as_secs(),
                log_tail(Some(&log))
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(ServerProcess::new(
        "redis-server".to_owned(),
        child,
        addr,
        Some(log),
        Some(dir),
    ))
}

/// Whether a Redis at `addr` answers PING with PONG.
async fn ping(addr: SocketAddr) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"PING\r\n").await?;
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(&buf == b"+PONG\r\n")
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), attempt).await,
        Ok(Ok(true))
    )
}

/// A connected client with both scripts loaded, and what every pair sends.
pub struct ScriptTarget {
    client: Client,
    reserve: Script,
    settle: Script,
    /// The replay context the node stores with a grant (it names no tenant).
    context: String,
    /// The metric.
    metric: String,
    /// The counters, in the node's order.
    slots: Vec<Slot>,
}

/// One counter as the scripts get it, in the node's words.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    /// Key within the tenant (`api_calls|day|<period start>`).
    key: String,
    /// Cap (`''` for none).
    cap: String,
    /// End of the period, Unix ms (`''` for none).
    end_ms: String,
}

impl ScriptTarget {
    /// Connects one client to `url`, loads the scripts, and takes the slots and context
    /// from the grant the node recorded for `tenant`'s `idempotency_key`.
    pub async fn connect(url: &str, tenant: &str, idempotency_key: &str) -> anyhow::Result<Self> {
        let config = Config::from_url(url)?;
        let client = Builder::from_config(config)
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(2);
                c.max_command_attempts = 1;
                c.tcp = TcpConfig {
                    nodelay: Some(true),
                    ..Default::default()
                };
            })
            .with_performance_config(|p| p.default_command_timeout = Duration::from_secs(5))
            .build()?;
        client
            .init()
            .await
            .context("connecting fred to the Redis")?;
        let reserve = Script::from_lua(RESERVE_LUA);
        let settle = Script::from_lua(SETTLE_LUA);
        reserve.load(&client).await?;
        settle.load(&client).await?;

        let record = key(tenant, "i", idempotency_key);
        let context: Option<String> = client.hget(&record, "ctx").await?;
        let context = context.with_context(|| {
            format!("the node's grant {record} is not in Redis: is it using this Redis?")
        })?;
        let (metric, slots) = parse_context(&context)?;
        Ok(ScriptTarget {
            client,
            reserve,
            settle,
            context,
            metric,
            slots,
        })
    }

    /// The counter keys, for the first line of the report on stderr.
    pub fn describe(&self) -> String {
        let keys: Vec<&str> = self.slots.iter().map(|s| s.key.as_str()).collect();
        format!("counters {}", keys.join(", "))
    }
}

/// Metric and slots of the node's replay context.
fn parse_context(text: &str) -> anyhow::Result<(String, Vec<Slot>)> {
    let v: serde_json::Value =
        serde_json::from_str(text).context("the node's replay context is not JSON")?;
    let metric = v["metric"].as_str().unwrap_or_default().to_owned();
    let slots = v["slots"]
        .as_array()
        .context("the node's replay context has no slots")?
        .iter()
        .map(|s| {
            let spec = &s["spec"];
            let key = spec["key"]
                .as_str()
                .context("a slot without key")?
                .to_owned();
            let cap = spec["cap"]
                .as_u64()
                .map(|c| c.to_string())
                .unwrap_or_default();
            let end = match spec["ends_at"].as_str() {
                Some(t) => chrono::DateTime::parse_from_rfc3339(t)
                    .with_context(|| format!("slot end {t:?}"))?
                    .timestamp_millis()
                    .to_string(),
                None => String::new(),
            };
            Ok(Slot {
                key,
                cap,
                end_ms: end,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!slots.is_empty(), "the node's replay context has no slots");
    Ok((metric, slots))
}

use meter::event::{item_key as key, tenant_key, tenant_stream as stream};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One worker of `redis-script`: reserve.lua then settle.lua (commit 1), as the node
/// sends them for Reserve and Commit.
pub struct ScriptPair {
    target: Arc<ScriptTarget>,
    tenant: String,
    key_prefix: String,
    seq: u64,
    counters: Vec<String>,
}

impl ScriptPair {
    /// A worker for `tenant`, whose idempotency keys start with `key_prefix`.
    pub fn new(target: Arc<ScriptTarget>, tenant: String, key_prefix: String) -> Self {
        let counters = target
            .slots
            .iter()
            .map(|s| key(&tenant, "c", &s.key))
            .collect();
        ScriptPair {
            target,
            tenant,
            key_prefix,
            seq: 0,
            counters,
        }
    }

    /// One pair; an answer other than "granted" / "applied" is a failure.
    pub async fn once(&mut self) -> Result<(), Failure> {
        self.seq += 1;
        let t = &self.tenant;
        let id = uuid::Uuid::now_v7().to_string();
        let idempotency_key = format!("{}-{}", self.key_prefix, self.seq);
        let expires = (now_ms() + RESERVATION_TTL_MS).to_string();

        let mut keys = vec![
            key(t, "i", &idempotency_key),
            key(t, "r", &id),
            tenant_key(t, "x"),
        ];
        keys.extend(self.counters.iter().cloned());
        keys.push(stream(t));
        let mut args = vec![
            "1".to_owned(),
            id.clone(),
            expires,
            self.target.context.clone(),
            self.target.metric.clone(),
            KEEP_MS.to_string(),
        ];
        for slot in &self.target.slots {
            args.push(slot.cap.clone());
            args.push(slot.end_ms.clone());
        }
        args.push(now_ms().to_string());
        let v: Value = self
            .target
            .reserve
            .evalsha_with_reload(&self.target.client, keys, args)
            .await
            .map_err(redis_failure)?;
        expect_code("reserve", &v, 2)?;

        let mut keys = vec![key(t, "r", &id), tenant_key(t, "x")];
        keys.extend(self.counters.iter().cloned());
        keys.push(stream(t));
        let args = vec!["c".to_owned(), "1".to_owned(), now_ms().to_string(), id];
        let v: Value = self
            .target
            .settle
            .evalsha_with_reload(&self.target.client, keys, args)
            .await
            .map_err(redis_failure)?;
        expect_code("settle", &v, 1)
    }
}

fn redis_failure(e: Error) -> Failure {
    Failure {
        kind: format!("redis:{:?}", e.kind()),
        detail: e.to_string(),
    }
}

fn expect_code(script: &str, v: &Value, want: i64) -> Result<(), Failure> {
    let code = match v {
        Value::Array(items) => items.first().and_then(Value::as_i64),
        _ => None,
    };
    if code == Some(want) {
        return Ok(());
    }
    Err(Failure {
        kind: format!(
            "{script}:{}",
            code.map_or("?".to_owned(), |c| c.to_string())
        ),
        detail: format!("{script}.lua answered {v:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_of_the_node() {
        let ctx = r#"{"metric":"api_calls","amount":1,"gauge":false,"slots":[{"window":"day","limit":9000000000000,"soft":false,"warn_at":[80],"resets_at":"2026-11-23T00:00:00Z","spec":{"key":"api_calls|day|1795305600","cap":9000000000000,"ends_at":"2026-11-23T00:00:00Z"},"fail_open":false},{"window":"month","spec":{"key":"api_calls|month|1793491200","cap":null,"ends_at":"2026-12-01T00:00:00Z"}}]}"#;
        let (metric, slots) = parse_context(ctx).unwrap();
        assert_eq!(metric, "api_calls");
        assert_eq!(
            slots,
            vec![
                Slot {
                    key: "api_calls|day|1795305600".to_owned(),
                    cap: "9000000000000".to_owned(),
                    end_ms: "1795392000000".to_owned()
                },
                Slot {
                    key: "api_calls|month|1793491200".to_owned(),
                    cap: String::new(),
                    end_ms: "1796083200000".to_owned()
                },
            ]
        );
        assert!(parse_context(r#"{"slots":[]}"#).is_err());
        let tag = meter::event::hash_tag("bench-3");
        assert_eq!(
            key("bench-3", "i", "k"),
            format!("al:{{{tag}}}:bench-3:i:k")
        );
    }

    #[test]
    fn scripts_are_the_nodes() {
        assert!(RESERVE_LUA.contains("KEYS[3] tenant expiry"));
        assert!(SETTLE_LUA.contains("ARGV: how, actual, now_ms, reservation id"));
    }
}
