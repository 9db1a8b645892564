//! Throwaway Redis servers for integration tests: a standalone `redis-server` and a 6-node
//! Redis Cluster (3 masters, 3 replicas), each on free loopback ports in a temporary
//! directory, killed when dropped.
//!
//! ```ignore
//! let mut redis = RedisServer::start().await; // redis.url: "redis://127.0.0.1:PORT"
//! redis.kill9().await;
//! redis.restart().await; // same port and dir: the AOF is reloaded
//!
//! let mut cluster = RedisCluster::start().await; // url: "redis-cluster://127.0.0.1:P1"
//! let slot = key_slot("q:{tenant}:x");
//! let old = cluster.master_for_slot(slot).await;
//! cluster.kill9_port(old).await;
//! let new = cluster.wait_failover(slot, old).await;
//! ```
//!
//! Servers run in the foreground as children of the test process (`kill_on_drop`), never
//! daemonized, and (through `setpriv --pdeathsig KILL`) die with the thread that started
//! them even if the test process is killed without unwinding: start them from the test
//! itself, not from a short-lived helper thread. Each writes its log to `redis.log` in its
//! directory; every panic here quotes the tail of the relevant log. Needs `redis-server`
//! and `redis-cli` on `PATH`.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// How often readiness and cluster state are polled.
const POLL: Duration = Duration::from_millis(50);
/// How long a server gets to answer PING after it is spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a cluster gets to reach `cluster_state:ok` with all replicas attached.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `wait_failover` waits.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(60);
/// `--cluster-node-timeout` in ms: how long a node must be unreachable before it is failed.
const CLUSTER_NODE_TIMEOUT_MS: u32 = 2000;
/// How many times `start` picks new ports when a server cannot bind (a port race).
const START_ATTEMPTS: usize = 3;
/// Lines of log quoted in panics.
const LOG_TAIL_LINES: usize = 40;

// ---------------------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------------------

/// Ports handed out by this process, never handed out twice (tests run concurrently).
static RESERVED: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A free loopback port not handed out before by this process; with `cluster_bus`, port +
/// 10000 (the cluster bus) is free and unreserved too, and both are reserved.
fn free_port(cluster_bus: bool) -> u16 {
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        let mut guard = RESERVED.lock().unwrap_or_else(|e| e.into_inner());
        let reserved = guard.get_or_insert_with(HashSet::new);
        if reserved.contains(&port) {
            continue;
        }
        if cluster_bus {
            let Some(bus) = port.checked_add(10000) else {
                continue;
            };
            if reserved.contains(&bus) || !port_is_free(bus) {
                continue;
            }
            reserved.insert(bus);
        }
        reserved.insert(port);
        return port;
    }
    panic!("no free loopback port found (cluster bus: {cluster_bus}) in 1000 tries");
}

// ---------------------------------------------------------------------------------------
// Logs and processes
// ---------------------------------------------------------------------------------------

/// The last lines of a file, or why there are none; `None` if it is missing or empty and
/// `optional`.
fn file_tail(path: &Path, optional: bool) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(text) if optional && text.trim().is_empty() => None,
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(LOG_TAIL_LINES);
            Some(format!(
                "--- last {} lines of {} ---\n{}\n---",
                lines.len() - from,
                path.display(),
                lines[from..].join("\n")
            ))
        }
        Err(_) if optional => None,
        Err(e) => Some(format!("--- no log at {}: {e} ---", path.display())),
    }
}

/// The last lines of a server's log (and of its stdout/stderr, where errors before the log
/// is opened, such as a bad argument, go), for panic messages.
fn log_tail(dir: &Path) -> String {
    let mut out = file_tail(&dir.join("redis.log"), false).unwrap_or_default();
    if let Some(t) = file_tail(&dir.join("redis.stderr"), true) {
        out = format!("{t}\n{out}");
    }
    out
}

/// `setpriv(1)`, if installed: used to give servers a parent-death signal.
const SETPRIV: &str = "/usr/bin/setpriv";

/// Spawns `redis-server` in the foreground, logging to `dir/redis.log` (its stdout and
/// stderr to `dir/redis.stderr`).
///
/// Through `setpriv --pdeathsig KILL` when available (it then execs `redis-server`, same
/// pid), so the server is SIGKILLed even if the test process dies without unwinding (killed,
/// aborted). Linux sends that signal when the *thread* that spawned the server exits: start
/// servers from the test itself (or a task of its runtime), not from a short-lived thread.
fn spawn_server(port: u16, dir: &Path, extra: &[String]) -> Child {
    let mut cmd = if Path::new(SETPRIV).exists() {
        let mut c = Command::new(SETPRIV);
        c.args(["--pdeathsig", "KILL", "--", "redis-server"]);
        c
    } else {
        Command::new("redis-server")
    };
    cmd.arg("--bind")
        .arg("127.0.0.1")
        .arg("--port")
        .arg(port.to_string())
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .arg("--save")
        .arg("")
        .arg("--protected-mode")
        .arg("no")
        .args(extra)
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("redis.stderr"))
        .expect("create redis.stderr");
    cmd.stdout(output.try_clone().expect("clone a file handle"));
    cmd.stderr(output);
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot spawn redis-server (is it installed?): {e}"))
}

/// Sends SIGTERM to a child (no `unsafe`: through `kill(1)`).
async fn sigterm(child: &Child) {
    signal(child, "-TERM").await;
}

/// Sends `sig` (`-TERM`, `-STOP`, `-CONT`) to the child.
async fn signal(child: &Child, sig: &str) {
    let Some(pid) = child.id() else {
        return; // already reaped
    };
    let status = Command::new("kill")
        .arg(sig)
        .arg(pid.to_string())
        .status()
        .await
        .expect("run kill(1)");
    // A failure means the process is already gone, which `wait` will report.
    let _ = status;
}

/// SIGKILLs a child and waits for it, synchronously (usable in `Drop`): at most ~2 s.
fn kill_blocking(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let _ = child.start_kill();
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            _ => return,
        }
    }
}

// ---------------------------------------------------------------------------------------
// A minimal RESP client (for polling without spawning redis-cli every 50 ms)
// ---------------------------------------------------------------------------------------

/// A RESP2 reply.
#[derive(Debug, Clone)]
enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<String>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    fn text(&self) -> Option<&str> {
        match self {
            Reply::Status(s) | Reply::Bulk(Some(s)) => Some(s),
            _ => None,
        }
    }
}

fn read_reply<'a>(
    r: &'a mut BufReader<TcpStream>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Reply>> + Send + 'a>> {
    Box::pin(async move {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end_matches(['\r', '\n']);
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, line.to_string());
        let (kind, rest) = line.split_at_checked(1).ok_or_else(bad)?;
        Ok(match kind {
            "+" => Reply::Status(rest.to_string()),
            "-" => Reply::Error(rest.to_string()),
            ":" => Reply::Int(rest.parse().map_err(|_| bad())?),
            "$" => {
                let n: i64 = rest.parse().map_err(|_| bad())?;
                if n < 0 {
                    Reply::Bulk(None)
                } else {
                    let mut buf = vec![0; n as usize + 2];
                    r.read_exact(&mut buf).await?;
                    buf.truncate(n as usize);
                    Reply::Bulk(Some(String::from_utf8_lossy(&buf).into_owned()))
                }
            }
            "*" => {
                let n: i64 = rest.parse().map_err(|_| bad())?;
                if n < 0 {
                    Reply::Array(None)
                } else {
                    let mut items = Vec::with_capacity(n as usize);
                    for _ in 0..n {
                        items.push(read_reply(r).await?);
                    }
                    Reply::Array(Some(items))
                }
            }
            _ => return Err(bad()),
        })
    })
}

/// Runs one command on `127.0.0.1:port` over a fresh connection, with a 2 s timeout.
async fn command(port: u16, args: &[&str]) -> Result<Reply, String> {
    let run = async {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut r = BufReader::new(stream);
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        r.get_mut()
            .write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        read_reply(&mut r).await.map_err(|e| format!("read: {e}"))
    };
    match tokio::time::timeout(Duration::from_secs(2), run).await {
        Ok(r) => r,
        Err(_) => Err("timed out after 2 s".into()),
    }
}

/// A command whose reply is text (status or bulk string); errors become `Err`.
async fn command_text(port: u16, args: &[&str]) -> Result<String, String> {
    match command(port, args).await? {
        Reply::Error(e) => Err(e),
        r => r
            .text()
            .map(str::to_string)
            .ok_or_else(|| format!("unexpected reply {r:?}")),
    }
}

/// `key:value` fields of an INFO-style reply.
fn info_fields(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.trim().split_once(':'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Whether the server answering on `port` is `child` (not another process that won a race
/// for the port while `child` failed to bind it).
async fn answered_by(child: &Child, port: u16) -> Result<(), String> {
    let info = info_fields(&command_text(port, &["INFO", "server"]).await?);
    let pid = info.get("process_id").and_then(|p| p.parse::<u32>().ok());
    match child.id() {
        Some(id) if pid == Some(id) => Ok(()),
        id => Err(format!(
            "port {port} is answered by pid {pid:?}, not ours ({id:?})"
        )),
    }
}

/// Polls PING every 50 ms until our process answers PONG, up to 10 s; panics (with the
/// log) if the process exits or the time runs out. Returns `Err(log)` instead of panicking
/// if the process exited and `allow_exit` is set (so `start` can retry on another port).
async fn wait_ping(
    child: &mut Child,
    port: u16,
    dir: &Path,
    allow_exit: bool,
) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let last = match command(port, &["PING"]).await {
            Ok(Reply::Status(s)) if s == "PONG" => match answered_by(child, port).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            },
            Ok(r) => format!("{r:?}"), // e.g. LOADING while the AOF is read
            Err(e) => e,
        };
        if let Ok(Some(status)) = child.try_wait() {
            let msg = format!(
                "redis-server on port {port} exited before answering PING ({status})\n{}",
                log_tail(dir)
            );
            if allow_exit {
                return Err(msg);
            }
            panic!("{msg}");
        }
        if Instant::now() >= deadline {
            panic!(
                "redis-server on port {port} did not answer PING within {READY_TIMEOUT:?} \
                 (last: {last})\n{}",
                log_tail(dir)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------------------
// Standalone
// ---------------------------------------------------------------------------------------

/// A throwaway standalone `redis-server` on a free loopback port, in a temp dir; killed on
/// drop (and the dir removed).
///
/// Runs with `appendonly yes`, `appendfsync everysec`, no RDB snapshots (`save ""`); extra
/// arguments from [`RedisServer::start_with`] come last and so override these.
pub struct RedisServer {
    /// The port it listens on (127.0.0.1 only).
    pub port: u16,
    /// `redis://127.0.0.1:PORT`.
    pub url: String,
    child: Option<Child>,
    args: Vec<String>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a server with the AOF on (`appendfsync everysec`) and waits until it answers
    /// PING.
    pub async fn start() -> RedisServer {
        Self::start_with(&[]).await
    }

    /// Starts a server with extra `redis-server` arguments (e.g. `&["--appendfsync",
    /// "always"]`), which override the defaults; waits until it answers PING.
    pub async fn start_with(args: &[&str]) -> RedisServer {
        let mut all: Vec<String> = ["--appendonly", "yes", "--appendfsync", "everysec"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        all.extend(args.iter().map(|s| s.to_string()));
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("redis-")
                .tempdir()
                .expect("create a temp dir");
            let port = free_port(false);
            let mut child = spawn_server(port, dir.path(), &all);
            match wait_ping(&mut child, port, dir.path(), true).await {
                Ok(()) => {
                    return RedisServer {
                        port,
                        url: format!("redis://127.0.0.1:{port}"),
                        child: Some(child),
                        args: all,
                        dir,
                    }
                }
                Err(msg) if msg.contains("already in use") => failures.push(msg), // a race
                Err(msg) => panic!("redis-server failed to start (args {all:?}): {msg}"),
            }
        }
        panic!(
            "redis-server failed to start {START_ATTEMPTS} times (args {all:?}):\n{}",
            failures.join("\n")
        );
    }

    /// The server's directory (AOF files under `appendonlydir/`, log in `redis.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The tail of the server's log.
    pub fn log_tail(&self) -> String {
        log_tail(self.dir.path())
    }

    /// Kills the server with SIGKILL and waits for it: nothing is flushed.
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            child.wait().await.expect("wait for redis-server");
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing is answered, as
    /// when a server hangs, until [`Self::thaw`].
    pub async fn freeze(&self) {
        signal(self.child.as_ref().expect("running"), "-STOP").await;
    }

    /// Lets a frozen server run again (SIGCONT); it then answers what it was sent.
    pub async fn thaw(&self) {
        signal(self.child.as_ref().expect("running"), "-CONT").await;
    }

    /// Stops the server with SIGTERM (a clean shutdown, the AOF fsynced) and waits for it;
    /// panics if it is still running after 10 s.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        sigterm(&child).await;
        match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
            Ok(status) => {
                status.expect("wait for redis-server");
            }
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                panic!(
                    "redis-server on port {} ignored SIGTERM for 10 s (SIGKILLed)\n{}",
                    self.port,
                    self.log_tail()
                );
            }
        }
    }

    /// Starts the server again on the same port and directory with the same arguments (it
    /// reloads its AOF) and waits until it answers PING (PING answers LOADING until the AOF
    /// is read). A still-running server is stopped with SIGTERM first.
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut child = spawn_server(self.port, self.dir.path(), &self.args);
        if let Err(msg) = wait_ping(&mut child, self.port, self.dir.path(), true).await {
            panic!("restart failed: {msg}");
        }
        self.child = Some(child);
    }

    /// Whether the process is running (not killed or stopped through this handle).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill_blocking(child);
        }
        // `dir` is dropped (removed) after this, with the process already dead.
    }
}

// ---------------------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------------------

/// One line of CLUSTER NODES.
#[derive(Debug, Clone)]
struct NodeLine {
    id: String,
    port: u16,
    flags: Vec<String>,
    master_id: Option<String>,
    link_connected: bool,
    /// Slot ranges (inclusive) served, for masters.
    slots: Vec<(u16, u16)>,
}

impl NodeLine {
    fn has_flag(&self, f: &str) -> bool {
        self.flags.iter().any(|x| x == f)
    }
    fn is_master(&self) -> bool {
        self.has_flag("master")
    }
    fn is_failing(&self) -> bool {
        self.has_flag("fail") || self.has_flag("fail?") || self.has_flag("noaddr")
    }
    fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
    }
}

/// Parses CLUSTER NODES:
/// `<id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <link> <slot>...`
fn parse_cluster_nodes(text: &str) -> Vec<NodeLine> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let addr = f[1].split(['@', ',']).next()?;
            let port = addr.rsplit_once(':')?.1.parse().ok()?;
            let slots = f[8..]
                .iter()
                .filter(|s| !s.starts_with('[')) // migrating/importing markers
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|a| (a, a)),
                })
                .collect();
            Some(NodeLine {
                id: f[0].to_string(),
                port,
                flags: f[2].split(',').map(str::to_string).collect(),
                master_id: (f[3] != "-").then(|| f[3].to_string()),
                link_connected: f[7] == "connected",
                slots,
            })
        })
        .collect()
}

/// One cluster node's process and directory.
struct ClusterNode {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// A 6-node Redis Cluster (3 masters, 3 replicas) on free loopback ports; killed on drop
/// (and its directory removed).
///
/// Nodes run with `--cluster-node-timeout 2000`, so a killed master is failed over in a few
/// seconds; persistence is as for [`RedisServer`] (AOF, `appendfsync everysec`).
pub struct RedisCluster {
    /// The nodes' ports (their cluster bus ports are these + 10000).
    pub ports: Vec<u16>,
    /// `redis-cluster://127.0.0.1:P1`: one seed, the first node.
    pub url: String,
    /// `"127.0.0.1:P"` for every node.
    pub seeds: Vec<String>,
    nodes: Vec<ClusterNode>,
    dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts 6 nodes, joins them with `redis-cli --cluster create … --cluster-replicas 1`,
    /// and waits until every node reports `cluster_state:ok` and sees 3 masters, each with
    /// one replica whose replication link is up (timeout 30 s).
    pub async fn start() -> RedisCluster {
        let dir = tempfile::Builder::new()
            .prefix("redis-cluster-")
            .tempdir()
            .expect("create a temp dir");
        let node_timeout = CLUSTER_NODE_TIMEOUT_MS.to_string();
        let args: Vec<String> = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            &node_timeout,
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            // Replicas sync at once instead of after the default 5 s wait for more replicas.
            "--repl-diskless-sync-delay",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();

        let mut nodes = Vec::new();
        for i in 0..6 {
            let node_dir = dir.path().join(format!("node{i}"));
            std::fs::create_dir(&node_dir).expect("create a node dir");
            let mut attempt = 0;
            loop {
                attempt += 1;
                let port = free_port(true);
                let mut child = spawn_server(port, &node_dir, &args);
                match wait_ping(&mut child, port, &node_dir, attempt < START_ATTEMPTS).await {
                    Ok(()) => {
                        nodes.push(ClusterNode {
                            port,
                            dir: node_dir,
                            child: Some(child),
                        });
                        break;
                    }
                    Err(msg) if !msg.contains("already in use") => {
                        panic!("cluster node {i} failed to start: {msg}")
                    }
                    Err(_) => {
                        // A port race: start afresh in a clean dir.
                        let _ = std::fs::remove_dir_all(&node_dir);
                        std::fs::create_dir(&node_dir).expect("create a node dir");
                    }
                }
            }
        }

        let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
        let seeds: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut cluster = RedisCluster {
            url: format!("redis-cluster://{}", seeds[0]),
            ports,
            seeds,
            nodes,
            dir,
        };

        let create = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&cluster.seeds)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = match tokio::time::timeout(Duration::from_secs(30), create).await {
            Ok(out) => out.expect("run redis-cli --cluster create"),
            Err(_) => panic!(
                "redis-cli --cluster create did not finish within 30 s\n{}",
                cluster.all_log_tails()
            ),
        };
        if !out.status.success() {
            panic!(
                "redis-cli --cluster create failed ({}):\nstdout:\n{}\nstderr:\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                cluster.all_log_tails()
            );
        }

        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let problem = cluster.health_problem().await;
            let Some(problem) = problem else { break };
            if Instant::now() >= deadline {
                cluster.kill_all();
                panic!(
                    "the cluster was not healthy within {CLUSTER_TIMEOUT:?}: {problem}\n{}",
                    cluster.all_log_tails()
                );
            }
            tokio::time::sleep(POLL).await;
        }
        cluster
    }

    /// `None` when every node reports `cluster_state:ok`, sees 6 nodes, none failing, 3
    /// masters with slots each with one replica, and every replica's link to its master is
    /// up; otherwise what is missing.
    async fn health_problem(&self) -> Option<String> {
        for &port in &self.ports {
            let info = match command_text(port, &["CLUSTER", "INFO"]).await {
                Ok(t) => info_fields(&t),
                Err(e) => return Some(format!("CLUSTER INFO on {port}: {e}")),
            };
            if info.get("cluster_state").map(String::as_str) != Some("ok") {
                return Some(format!(
                    "{port}: cluster_state {:?}",
                    info.get("cluster_state")
                ));
            }
            let nodes = match command_text(port, &["CLUSTER", "NODES"]).await {
                Ok(t) => parse_cluster_nodes(&t),
                Err(e) => return Some(format!("CLUSTER NODES on {port}: {e}")),
            };
            if nodes.len() != 6 {
                return Some(format!("{port} knows {} nodes", nodes.len()));
            }
            if let Some(n) = nodes.iter().find(|n| n.is_failing()) {
                return Some(format!("{port} sees {} as {:?}", n.port, n.flags));
            }
            let masters: Vec<&NodeLine> = nodes
                .iter()
                .filter(|n| n.is_master() && !n.slots.is_empty())
                .collect();
            if masters.len() != 3 {
                return Some(format!("{port} sees {} masters with slots", masters.len()));
            }
            for m in &masters {
                let replicas = nodes
                    .iter()
                    .filter(|n| n.master_id.as_deref() == Some(m.id.as_str()))
                    .count();
                if replicas != 1 {
                    return Some(format!("{port} sees {replicas} replicas of {}", m.port));
                }
            }
            let repl = match command_text(port, &["INFO", "replication"]).await {
                Ok(t) => info_fields(&t),
                Err(e) => return Some(format!("INFO replication on {port}: {e}")),
            };
            match repl.get("role").map(String::as_str) {
                Some("slave") => {
                    if repl.get("master_link_status").map(String::as_str) != Some("up") {
                        return Some(format!("replica {port}: master link not up"));
                    }
                }
                Some("master") => {
                    let online = repl
                        .iter()
                        .any(|(k, v)| k.starts_with("slave") && v.contains("state=online"));
                    if !online {
                        return Some(format!("master {port}: no online replica"));
                    }
                }
                other => return Some(format!("{port}: role {other:?}")),
            }
        }
        None
    }

    fn alive_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    /// The tails of every node's log.
    pub fn all_log_tails(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("node {}:\n{}", n.port, log_tail(&n.dir)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The cluster's directory (one `nodeN/` subdirectory per node).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Who each running node says serves `slot` as master: (asked port, Ok(master port)).
    /// Nodes killed through this handle, or refusing connections (killed otherwise), are
    /// skipped.
    async fn views_of_slot(&self, slot: u16) -> Vec<(u16, Result<u16, String>)> {
        let mut views = Vec::new();
        for port in self.alive_ports() {
            let view = match command_text(port, &["CLUSTER", "NODES"]).await {
                Ok(t) => parse_cluster_nodes(&t)
                    .into_iter()
                    .find(|n| n.is_master() && !n.is_failing() && n.serves(slot))
                    .map(|n| n.port)
                    .ok_or_else(|| format!("no live master for slot {slot}")),
                Err(e) if e.contains("Connection refused") => continue,
                Err(e) => Err(e),
            };
            views.push((port, view));
        }
        views
    }

    /// The port of the master serving `slot` (from CLUSTER NODES), as the running nodes
    /// agree on it (a failing master does not count); panics if they disagree or none
    /// answers.
    pub async fn master_for_slot(&self, slot: u16) -> u16 {
        assert!(slot < 16384, "slot {slot} out of range");
        let views = self.views_of_slot(slot).await;
        let answers: HashSet<u16> = views.iter().filter_map(|(_, v)| v.clone().ok()).collect();
        match (answers.len(), answers.iter().next()) {
            (1, Some(&p)) if views.iter().all(|(_, v)| v.is_ok()) => p,
            _ => panic!(
                "the nodes do not agree on the master of slot {slot}: {views:?}\n{}",
                self.all_log_tails()
            ),
        }
    }

    /// Kills one node with SIGKILL and waits for it.
    pub async fn kill9_port(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("port {port} is not a node of this cluster"));
        if let Some(mut child) = node.child.take() {
            let _ = child.start_kill();
            child.wait().await.expect("wait for redis-server");
        }
    }

    /// Waits until a node other than `old_master` serves `slot` as master, in the view of
    /// every running node (itself included), and every running node reports
    /// `cluster_state:ok`; returns its port. Panics after 60 s with the last thing missing
    /// and the nodes' logs. Nodes that refuse connections (dead) are not asked.
    pub async fn wait_failover(&self, slot: u16, old_master: u16) -> u16 {
        let deadline = Instant::now() + FAILOVER_TIMEOUT;
        loop {
            let last = self.failover_state(slot, old_master).await;
            match last {
                Ok(port) => return port,
                Err(ref why) if Instant::now() >= deadline => panic!(
                    "no failover of slot {slot} away from {old_master} within \
                     {FAILOVER_TIMEOUT:?}: {why}\n{}",
                    self.all_log_tails()
                ),
                Err(_) => tokio::time::sleep(POLL).await,
            }
        }
    }

    async fn failover_state(&self, slot: u16, old_master: u16) -> Result<u16, String> {
        let views = self.views_of_slot(slot).await;
        let mut new = None;
        for (asked, view) in &views {
            let m = view.clone().map_err(|e| format!("{asked}: {e}"))?;
            if m == old_master {
                return Err(format!("{asked} still sees {old_master} as master"));
            }
            if new.is_some_and(|n| n != m) {
                return Err(format!("nodes disagree: {views:?}"));
            }
            new = Some(m);
        }
        let new = new.ok_or("no running node")?;
        for (port, _) in views {
            let info = info_fields(&command_text(port, &["CLUSTER", "INFO"]).await?);
            if info.get("cluster_state").map(String::as_str) != Some("ok") {
                return Err(format!(
                    "{port}: cluster_state {:?}",
                    info.get("cluster_state")
                ));
            }
        }
        Ok(new)
    }

    fn kill_all(&mut self) {
        for n in &mut self.nodes {
            if let Some(child) = n.child.as_mut() {
                kill_blocking(child);
            }
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.kill_all();
        // `dir` is dropped (removed) after this, with the processes already dead.
    }
}

// ---------------------------------------------------------------------------------------
// Hash slots
// ---------------------------------------------------------------------------------------

/// CRC16/XMODEM (polynomial 0x1021, init 0), as Redis Cluster uses.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The Redis Cluster hash slot of a key (0..16384): CRC16 of the key, or of the part
/// between the first `{` and the next `}` when that part is not empty (the hash tag).
pub fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = match bytes.iter().position(|&b| b == b'{') {
        Some(open) => match bytes[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    crc16(hashed) % 16384
}
