//! Child processes under test: the `allot serve` node and the no-op ceiling server (the
//! bench's `redis-server` is in [`crate::redis`]).
//!
//! Both follow one contract: started with `--listen 127.0.0.1:0`, they print a line
//! `listening on 127.0.0.1:PORT` on stdout once they accept connections (other lines are
//! ignored). Children are killed when the bench ends, errs, panics or is interrupted
//! (`kill_on_drop`); the no-op server also exits when its stdin closes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncBufReadExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// How long a child may take to print its `listening on` line.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The bench catalog, applied to the node before measuring.
pub const CATALOG_YAML: &str = include_str!("../catalog.yaml");

/// A server running as a child process of the bench.
#[derive(Debug)]
pub struct ServerProcess {
    name: String,
    /// Declared before `dir` so that the child is killed before its data is removed.
    child: Child,
    addr: SocketAddr,
    log: Option<PathBuf>,
    dir: Option<tempfile::TempDir>,
}

impl ServerProcess {
    /// Wraps a child that already listens on `addr`; it is killed when this is dropped
    /// (the child must have been spawned with `kill_on_drop`), then `dir` is removed.
    pub fn new(
        name: String,
        child: Child,
        addr: SocketAddr,
        log: Option<PathBuf>,
        dir: Option<tempfile::TempDir>,
    ) -> Self {
        ServerProcess {
            name,
            child,
            addr,
            log,
            dir,
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The `--data-dir` of a node started by [`start_allot`] (`data` in its temporary
    /// directory).
    pub fn data_dir(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.path().join("data"))
    }

    /// Its gRPC URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Fails, with the end of its log, if the process has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited during the run ({status}){}",
                self.name,
                log_tail(self.log.as_deref())
            );
        }
        Ok(())
    }

    /// Kills the process and waits for it.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Starts `allot serve` on a fresh data directory with the bench catalog; `label` names it
/// in messages (e.g. `allot node 2`).
pub async fn start_allot(
    bin: &Path,
    label: &str,
    extra_args: &[String],
) -> anyhow::Result<ServerProcess> {
    if !bin.is_file() {
        bail!(
            "the allot binary was not found at {}: build it first with \
             `cargo build --release --bin allot`, or pass --allot-bin PATH, or use \
             --endpoint URL for a running node",
            bin.display()
        );
    }
    let dir = tempfile::Builder::new()
        .prefix("allot-bench-")
        .tempdir()
        .context("creating a temporary directory for the node")?;
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data)?;
    let catalog = dir.path().join("catalog.yaml");
    std::fs::write(&catalog, CATALOG_YAML)?;
    let log = dir.path().join("node.log");
    let log_file = std::fs::File::create(&log)?;

    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(&data)
        .arg("--catalog")
        .arg(&catalog)
        // Loopback only, throwaway data: no API tokens.
        .arg("--insecure-no-auth")
        .args(extra_args)
        // The log is a file: no colour codes in it.
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stderr(log_file);
    let what = format!("{label} ({} serve)", bin.display());
    spawn(what, cmd, Some(log), Some(dir)).await
}

/// Starts the no-op ceiling server: this executable's hidden `noop-server` subcommand,
/// answering every call with `response` (an encoded CheckResponse).
pub async fn start_noop(response: &[u8]) -> anyhow::Result<ServerProcess> {
    let exe = std::env::current_exe().context("locating the bench executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("noop-server")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--response-hex")
        .arg(crate::noop::to_hex(response))
        // Kept open for the server's lifetime: it exits when the bench is gone.
        .stdin(Stdio::piped())
        .stderr(Stdio::inherit());
    spawn("no-op server".to_owned(), cmd, None, None).await
}

/// The node binary: `--allot-bin`, else `allot` next to the bench executable.
pub fn allot_bin(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    match given {
        Some(bin) => Ok(bin.to_owned()),
        None => default_allot_bin(),
    }
}

/// `allot` next to the bench executable (both land in `target/release`).
fn default_allot_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the bench executable")?;
    let dir = exe
        .parent()
        .context("the bench executable has no parent directory")?;
    Ok(dir.join(format!("allot{}", std::env::consts::EXE_SUFFIX)))
}

async fn spawn(
    name: String,
    mut cmd: Command,
    log: Option<PathBuf>,
    dir: Option<tempfile::TempDir>,
) -> anyhow::Result<ServerProcess> {
    cmd.stdout(Stdio::piped()).kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting the {name}"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();

    let found = tokio::time::timeout(START_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(addr) = parse_listening(&line) {
                return Ok(Some(addr));
            }
        }
        Ok::<_, std::io::Error>(None)
    })
    .await;

    let addr = match found {
        Ok(Ok(Some(addr))) => addr,
        Ok(Ok(None)) => {
            let status = child.wait().await?;
            bail!(
                "the {name} exited ({status}) without printing `listening on 127.0.0.1:PORT` \
                 on stdout{}",
                log_tail(log.as_deref())
            );
        }
        Ok(Err(e)) => return Err(e).with_context(|| format!("reading the {name}'s stdout")),
        Err(_) => {
            let _ = child.kill().await;
            bail!(
                "the {name} did not print `listening on 127.0.0.1:PORT` on stdout within {}s{}",
                START_TIMEOUT.as_secs(),
                log_tail(log.as_deref())
            );
        }
    };
    drain(lines);
    Ok(ServerProcess::new(name, child, addr, log, dir))
}

/// Keeps reading a child's stdout so that it never blocks on a full pipe.
fn drain(mut lines: Lines<BufReader<ChildStdout>>) {
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
}

/// The address in a `listening on ADDR` line (ADDR may carry an `http://` prefix).
fn parse_listening(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line.split_once("listening on ")?;
    let token = rest.split_whitespace().next()?;
    let token = token.strip_prefix("http://").unwrap_or(token);
    token
        .trim_end_matches(|c: char| !c.is_ascii_alphanumeric() && c != ']')
        .parse()
        .ok()
}

/// The last lines of a child's log, for an error message (empty without a log).
pub fn log_tail(log: Option<&Path>) -> String {
    let Some(path) = log else {
        return String::new();
    };
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return "; its stderr was empty".to_owned();
    }
    let tail = &lines[lines.len().saturating_sub(20)..];
    format!(
        "; last lines of its stderr:\n  {}",
        strip_ansi(&tail.join("\n  "))
    )
}

/// `text` without ANSI escape sequences (`ESC [ … letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_lines() {
        let a: SocketAddr = "127.0.0.1:4242".parse().unwrap();
        assert_eq!(parse_listening("listening on 127.0.0.1:4242"), Some(a));
        assert_eq!(
            parse_listening("INFO allot: listening on 127.0.0.1:4242 (grpc)"),
            Some(a)
        );
        assert_eq!(
            parse_listening("listening on http://127.0.0.1:4242."),
            Some(a)
        );
        assert_eq!(
            parse_listening("listening on [::1]:4242"),
            Some("[::1]:4242".parse().unwrap())
        );
        assert_eq!(parse_listening("starting"), None);
        assert_eq!(
            strip_ansi("\u{1b}[2mtime\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x"),
            "time  INFO x"
        );
        assert_eq!(parse_listening("listening on soon"), None);
    }
}
