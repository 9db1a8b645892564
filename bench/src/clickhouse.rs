//! The bench's own ClickHouse: a throwaway `clickhouse-server` child on free loopback
//! ports with its files in a temporary directory, and plain HTTP queries to it.
//!
//! The config is the least that Debian's 18.16 starts with (the tests' harness,
//! `aggregator/tests/harness/clickhouse.rs`, writes the same one; it is not importable
//! from here), plus one change: outdated parts (merged into bigger ones) are deleted
//! after 1 s instead of 8 minutes. The aggregator's many small inserts leave tens of
//! thousands of files behind within seconds, and deleting them all when the bench exits
//! took minutes on a busy machine; a server in a steady state deletes them at the rate it
//! makes them anyway, so doing it during the run is the more faithful cost. Queries go over HTTP/1.0, one connection each, answered in
//! `TabSeparated`: a poll every few tens of milliseconds does not need a client library,
//! and connecting on loopback costs far less than the query.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::Command;

use crate::node::{log_tail, ServerProcess};

/// How long clickhouse-server may take to answer `/ping` (under a second when idle).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for one query's answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Makes the server die with the bench even when the bench is killed with SIGKILL.
const SETPRIV: &str = "/usr/bin/setpriv";

/// Starts a throwaway `clickhouse-server` and waits until `/ping` answers; its address is
/// the HTTP one.
pub async fn start_server(bin: &Path) -> anyhow::Result<ServerProcess> {
    // The ports are free when picked but could be taken before the server binds them.
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

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

async fn try_start(bin: &Path) -> anyhow::Result<ServerProcess> {
    let (http_port, tcp_port) = (free_port()?, free_port()?);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, http_port));
    let dir = tempfile::Builder::new()
        .prefix("allot-bench-clickhouse-")
        .tempdir()
        .context("creating a temporary directory for clickhouse-server")?;
    let d = dir.path().display();
    let config = dir.path().join("config.xml");
    std::fs::write(
        &config,
        format!(
            r#"<yandex>
    <logger>
        <level>warning</level>
        <log>{d}/server.log</log>
        <errorlog>{d}/server.err.log</errorlog>
    </logger>
    <http_port>{http_port}</http_port>
    <tcp_port>{tcp_port}</tcp_port>
    <listen_host>127.0.0.1</listen_host>
    <path>{d}/data/</path>
    <tmp_path>{d}/tmp/</tmp_path>
    <users_config>/etc/clickhouse-server/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>268435456</mark_cache_size>
    <max_concurrent_queries>100</max_concurrent_queries>
    <merge_tree>
        <old_parts_lifetime>1</old_parts_lifetime>
        <cleanup_delay_period>1</cleanup_delay_period>
    </merge_tree>
</yandex>
"#
        ),
    )?;
    let log = dir.path().join("stdout.log");
    let out = std::fs::File::create(&log)?;
    let mut cmd = if Path::new(SETPRIV).exists() {
        let mut c = Command::new(SETPRIV);
        c.args(["--pdeathsig", "KILL", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    cmd.arg(format!("--config-file={}", config.display()))
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| {
        format!(
            "running {}: install ClickHouse (apt-get install clickhouse-server) or pass \
             --clickhouse-server PATH",
            bin.display()
        )
    })?;

    let begin = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            let err = dir.path().join("server.err.log");
            bail!(
                "clickhouse-server exited ({status}) before answering{}{}",
                log_tail(Some(&log)),
                log_tail(Some(&err))
            );
        }
        if ping(addr).await {
            break;
        }
        if begin.elapsed() > START_TIMEOUT {
            let _ = child.kill().await;
            bail!(
                "clickhouse-server did not answer /ping on {addr} within {}s{}",
                START_TIMEOUT.as_secs(),
                log_tail(Some(&dir.path().join("server.err.log")))
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(ServerProcess::new(
        "clickhouse-server".to_owned(),
        child,
        addr,
        Some(dir.path().join("server.err.log")),
        Some(dir),
    ))
}

/// Whether the server at `addr` answers `/ping` with `Ok.`.
async fn ping(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_millis(500), http(addr, "GET /ping", "")).await,
        Ok(Ok((200, body))) if body == "Ok.\n"
    )
}

/// Runs `sql` on the server at `addr` and returns its answer (append `FORMAT …` to choose
/// one); an error carries the server's message.
pub async fn query(addr: SocketAddr, sql: &str) -> anyhow::Result<String> {
    let (status, body) = tokio::time::timeout(QUERY_TIMEOUT, http(addr, "POST /", sql))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "clickhouse on {addr}: no answer within {}s",
                QUERY_TIMEOUT.as_secs()
            )
        })?
        .with_context(|| format!("clickhouse on {addr}"))?;
    if status != 200 {
        bail!("clickhouse on {addr} answered {status}: {}", body.trim());
    }
    Ok(body)
}

/// One HTTP/1.0 request (`request_line` without the version) with `body`: status and body.
async fn http(addr: SocketAddr, request_line: &str, body: &str) -> anyhow::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let request = format!(
        "{request_line} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    parse_response(&buf)
}

/// Status and body of a whole HTTP response (chunked bodies are joined).
fn parse_response(bytes: &[u8]) -> anyhow::Result<(u16, String)> {
    let split = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("an HTTP answer without a blank line after its headers")?;
    let head = String::from_utf8_lossy(&bytes[..split]);
    let mut body = &bytes[split + 4..];
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("an HTTP answer without a status: {head:?}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Ok((status, String::from_utf8_lossy(body).into_owned()));
    }
    let mut out = Vec::new();
    loop {
        let eol = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("a truncated chunked body")?;
        let line = String::from_utf8_lossy(&body[..eol]);
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("a bad chunk size {line:?}"))?;
        if size == 0 {
            return Ok((status, String::from_utf8_lossy(&out).into_owned()));
        }
        let chunk = body
            .get(eol + 2..eol + 2 + size)
            .context("a truncated chunk")?;
        out.extend_from_slice(chunk);
        body = body
            .get(eol + 2 + size + 2..)
            .context("a chunk without its line end")?;
    }
}

/// The server's version (`SELECT version()`).
pub async fn version(addr: SocketAddr) -> anyhow::Result<String> {
    Ok(query(addr, "SELECT version()").await?.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses() {
        let plain = "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nbench-1\t5\n";
        assert_eq!(
            parse_response(plain.as_bytes()).unwrap(),
            (200, "bench-1\t5\n".to_owned())
        );
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                       8\r\nbench-1\t\r\n3\r\n55\n\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(chunked.as_bytes()).unwrap(),
            (200, "bench-1\t55\n".to_owned())
        );
        let error = "HTTP/1.0 404 Not Found\r\n\r\nCode: 60, e.displayText() = DB::Exception: Table allot.usage_monthly doesn't exist.";
        assert_eq!(parse_response(error.as_bytes()).unwrap().0, 404);
        assert!(parse_response(b"HTTP/1.0 200 OK\r\n").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
        // A chunk cut short is an error, not a short answer.
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\nab")
                .is_err()
        );
    }
}
