//! A throwaway `clickhouse-server` (Debian's 18.16) on free loopback ports in a temporary
//! directory, killed when dropped.
//!
//! ```ignore
//! let mut ch = ClickHouseServer::start().await; // ch.url: "http://127.0.0.1:PORT"
//! ch.stop().await;    // SIGTERM (about 3 s)
//! ch.start_again().await; // same ports, same data
//! ```
//!
//! Runs in the foreground as a child of the test (`kill_on_drop`, and `setpriv --pdeathsig
//! KILL` so it dies with the test's thread even without unwinding). Its log is
//! `server.log` in its directory, quoted when it fails to start. Needs `clickhouse-server`
//! on `PATH` (`scripts/test.sh` installs it).
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
const SETPRIV: &str = "/usr/bin/setpriv";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A running (or stopped) throwaway ClickHouse server.
pub struct ClickHouseServer {
    /// HTTP port.
    pub http_port: u16,
    /// Native protocol port.
    pub tcp_port: u16,
    /// `http://127.0.0.1:HTTP_PORT`.
    pub url: String,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl ClickHouseServer {
    /// Starts a server and waits until `/ping` answers.
    pub async fn start() -> ClickHouseServer {
        let dir = tempfile::Builder::new()
            .prefix("clickhouse-")
            .tempdir()
            .expect("temp dir");
        let mut server = ClickHouseServer {
            http_port: 0,
            tcp_port: 0,
            url: String::new(),
            child: None,
            dir,
        };
        for attempt in 1..=3 {
            server.http_port = free_port();
            server.tcp_port = free_port();
            server.url = format!("http://127.0.0.1:{}", server.http_port);
            server.write_config();
            match server.spawn_and_wait().await {
                Ok(()) => return server,
                Err(e) if attempt < 3 && e.contains("Address already in use") => continue,
                Err(e) => panic!("clickhouse-server did not start: {e}"),
            }
        }
        unreachable!()
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.xml")
    }

    fn write_config(&self) {
        let d = self.dir.path().display();
        let config = format!(
            r#"<yandex>
    <logger>
        <level>information</level>
        <log>{d}/server.log</log>
        <errorlog>{d}/server.err.log</errorlog>
    </logger>
    <http_port>{http}</http_port>
    <tcp_port>{tcp}</tcp_port>
    <listen_host>127.0.0.1</listen_host>
    <path>{d}/data/</path>
    <tmp_path>{d}/tmp/</tmp_path>
    <users_config>/etc/clickhouse-server/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>268435456</mark_cache_size>
    <max_concurrent_queries>100</max_concurrent_queries>
</yandex>
"#,
            http = self.http_port,
            tcp = self.tcp_port
        );
        std::fs::write(self.config_path(), config).expect("write config.xml");
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let mut cmd = if Path::new(SETPRIV).exists() {
            let mut c = Command::new(SETPRIV);
            c.args(["--pdeathsig", "KILL", "--", "clickhouse-server"]);
            c
        } else {
            Command::new("clickhouse-server")
        };
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("stdout.log"))
            .expect("stdout.log");
        cmd.arg(format!("--config-file={}", self.config_path().display()))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone a file handle"))
            .stderr(out)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            format!("cannot spawn clickhouse-server (is it installed? scripts/test.sh installs it): {e}")
        })?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("exited with {status}\n{}", self.log_tail()));
            }
            if http_get(self.http_port, "/ping").await.as_deref() == Ok("Ok.\n") {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.start_kill();
                return Err(format!(
                    "no /ping within {READY_TIMEOUT:?}\n{}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The tail of the server's logs.
    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        for f in ["stdout.log", "server.err.log"] {
            if let Ok(text) = std::fs::read_to_string(self.dir.path().join(f)) {
                let lines: Vec<&str> = text.lines().collect();
                let from = lines.len().saturating_sub(30);
                out.push_str(&format!("--- {f} ---\n{}\n", lines[from..].join("\n")));
            }
        }
        out
    }

    /// Stops the server with SIGTERM and waits for it (about 3 s).
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        if tokio::time::timeout(STOP_TIMEOUT, child.wait())
            .await
            .is_err()
        {
            let _ = child.start_kill();
            let _ = child.wait().await;
            panic!("clickhouse-server ignored SIGTERM for {STOP_TIMEOUT:?}");
        }
    }

    /// Kills the server with SIGKILL.
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Starts the stopped server again on the same ports and data.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        if let Err(e) = self.spawn_and_wait().await {
            panic!("clickhouse-server did not restart: {e}");
        }
    }

    /// The rows of a query on `database`, as JSON objects (`JSONEachRow`).
    pub async fn json_rows(&self, database: &str, sql: &str) -> Vec<serde_json::Value> {
        let mut cursor = self
            .client(database)
            .query(sql)
            .fetch_bytes("JSONEachRow")
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let mut out = Vec::new();
        while let Some(chunk) = cursor.next().await.unwrap_or_else(|e| panic!("{sql}: {e}")) {
            out.extend_from_slice(&chunk);
        }
        String::from_utf8(out)
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// A client of `database` (validation off: 18.16 needs it).
    pub fn client(&self, database: &str) -> clickhouse::Client {
        clickhouse::Client::default()
            .with_url(&self.url)
            .with_database(database)
            .with_validation(false)
    }
}

impl Drop for ClickHouseServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                match child.try_wait() {
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                    _ => break,
                }
            }
        }
    }
}

/// GET `path` on 127.0.0.1:port; the body.
async fn http_get(port: u16, path: &str) -> Result<String, String> {
    let run = async {
        let mut s = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok::<_, String>(body)
    };
    tokio::time::timeout(Duration::from_secs(2), run)
        .await
        .map_err(|_| "timed out".to_string())?
}
