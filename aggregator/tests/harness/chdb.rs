//! Current ClickHouse, in-process in Python (the PyPI package `chdb-core`), driven over
//! stdin/stdout one JSON line per statement, so that the aggregator's own migration code
//! (`aggregator::schema::migrate`) and rollup queries run against it unchanged.
//!
//! The virtualenv is `<target>/tmp/venv-chdb` (or `ALLOT_CHDB_PYTHON`, a Python that can
//! `import chdb`). `scripts/test.sh` creates it; if it is missing this creates it, and
//! any failure to do so fails the test.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;

use aggregator::schema::Sql;
use aggregator::SinkError;
use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::Mutex;

const REPL: &str = r#"
import json, sys
import chdb.session as cs
s = cs.Session(sys.argv[1])
s.query("CREATE DATABASE IF NOT EXISTS allot")
s.query("USE allot")
version = str(s.query("SELECT version()", "CSV")).strip().strip('"')
print(json.dumps({"ready": version}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    try:
        r = s.query(req["sql"], "JSONEachRow")
        out = r.bytes().decode() if hasattr(r, "bytes") else str(r)
        print(json.dumps({"ok": out}), flush=True)
    except Exception as e:
        print(json.dumps({"error": str(e)}), flush=True)
"#;

fn run(cmd: &mut std::process::Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Python that imports chdb: `ALLOT_CHDB_PYTHON`, or the venv under the target
/// directory, created (with `chdb-core` installed from PyPI) if missing.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("ALLOT_CHDB_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = super::target_tmp().join("venv-chdb");
    let py = venv.join("bin/python");
    let imports = |py: &Path| {
        std::process::Command::new(py)
            .args(["-c", "import chdb"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !imports(&py) {
        eprintln!("chdb: creating {} (pip install chdb-core)", venv.display());
        run(
            std::process::Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv),
            "python3 -m venv (apt-get install python3-venv if it is missing)",
        );
        run(
            std::process::Command::new(venv.join("bin/pip")).args(["install", "-q", "chdb-core"]),
            "pip install chdb-core",
        );
        assert!(
            imports(&py),
            "{} cannot import chdb after installing it",
            py.display()
        );
    }
    py
}

struct Io {
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

/// A current ClickHouse in a Python child process, database `allot`.
pub struct Chdb {
    io: Mutex<Io>,
    /// The server version it reports (26.x).
    pub version: String,
    _child: Child,
    _dir: tempfile::TempDir,
}

impl Chdb {
    /// Starts Python with a fresh data directory.
    pub async fn start() -> Chdb {
        let dir = tempfile::Builder::new().prefix("chdb-").tempdir().unwrap();
        let script = dir.path().join("repl.py");
        std::fs::write(&script, REPL).unwrap();
        let data = dir.path().join("data");
        // chdb reads a config.xml in its working directory: run it where there is none.
        let mut child = Command::new(python())
            .arg(&script)
            .arg(&data)
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("python starts");
        let stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines
            .next_line()
            .await
            .unwrap()
            .expect("chdb prints its version");
        let v: serde_json::Value = serde_json::from_str(&first).unwrap();
        let version = v["ready"].as_str().expect("ready line").to_string();
        Chdb {
            io: Mutex::new(Io { stdin, lines }),
            version,
            _child: child,
            _dir: dir,
        }
    }

    /// Runs one statement; its `JSONEachRow` output, or the error text.
    pub async fn query(&self, sql: &str) -> Result<String, String> {
        let mut io = self.io.lock().await;
        let line = serde_json::json!({ "sql": sql }).to_string() + "\n";
        io.stdin.write_all(line.as_bytes()).await.unwrap();
        io.stdin.flush().await.unwrap();
        let answer = io.lines.next_line().await.unwrap().expect("chdb answers");
        let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
        match (v["ok"].as_str(), v["error"].as_str()) {
            (Some(ok), _) => Ok(ok.to_string()),
            (_, Some(e)) => Err(e.to_string()),
            _ => Err(format!("unexpected answer {answer}")),
        }
    }

    /// Runs a query; its rows as JSON objects.
    pub async fn rows(&self, sql: &str) -> Vec<serde_json::Value> {
        self.query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

#[async_trait]
impl Sql for Chdb {
    async fn execute(&self, sql: &str) -> Result<(), SinkError> {
        self.query(sql)
            .await
            .map(drop)
            .map_err(|message| SinkError::Rejected {
                code: aggregator::sink::exception_code(&message).unwrap_or(0),
                message,
            })
    }

    async fn fetch_u32(&self, sql: &str) -> Result<Vec<u32>, SinkError> {
        let out = self
            .query(sql)
            .await
            .map_err(|message| SinkError::Rejected {
                code: aggregator::sink::exception_code(&message).unwrap_or(0),
                message,
            })?;
        Ok(out
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let obj = v.as_object().expect("a row");
                let first = obj.values().next().expect("one column");
                first
                    .as_u64()
                    .or_else(|| first.as_str().and_then(|s| s.parse().ok()))
                    .expect("a UInt32") as u32
            })
            .collect())
    }
}
