//! The whole deployed topology, brought up by the repository's own `deploy/up` (a 6-node
//! Redis Cluster, ClickHouse, three enforcers, two aggregators) with this test's binary
//! and catalog, in a temporary state directory on a free block of ports, and always taken
//! down with `deploy/down --purge` when dropped.
//!
//! ```ignore
//! let topo = Topology::builder().catalog(CATALOG).serve_args("--redis-wait-replicas 1").up().await;
//! let mut e = topo.enforcer(2).await;          // enforcer-2, with the service token
//! topo.kill9("enforcer-2");                     // SIGKILL, by its pid file
//! topo.up_again().await;                        // deploy/up starts what is missing
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use allot_proto::v1 as pb;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Bearer {
    /// For `token`.
    pub fn new(token: &str) -> Bearer {
        Bearer(format!("Bearer {token}").parse().expect("a token is ASCII"))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut r: Request<()>) -> Result<Request<()>, Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

/// A channel whose requests carry a token.
pub type Authed = InterceptedService<Channel, Bearer>;

/// Builds a topology.
pub struct TopologyBuilder {
    catalog: String,
    serve_args: String,
    aggregate_args: String,
}

impl TopologyBuilder {
    /// The catalog the enforcers apply at start (`ALLOT_DEPLOY_CATALOG`).
    pub fn catalog(mut self, yaml: &str) -> Self {
        self.catalog = yaml.to_string();
        self
    }

    /// Extra flags for every enforcer (`ALLOT_SERVE_ARGS`).
    pub fn serve_args(mut self, args: &str) -> Self {
        self.serve_args = args.to_string();
        self
    }

    /// Extra flags for every aggregator (`ALLOT_AGGREGATE_ARGS`).
    pub fn aggregate_args(mut self, args: &str) -> Self {
        self.aggregate_args = args.to_string();
        self
    }

    /// Runs `deploy/up` on a free block of ports (another block if one of its ports was
    /// taken meanwhile) and returns once every component is healthy.
    pub async fn up(self) -> Topology {
        let dir = tempfile::Builder::new()
            .prefix("e2e-topology-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("state directory");
        let catalog = dir.path().join("catalog.yaml");
        std::fs::write(&catalog, &self.catalog).unwrap();
        let mut last = String::new();
        for attempt in 0..3 {
            let topo = Topology {
                state: dir.path().join("state"),
                base: free_block(attempt),
                catalog: catalog.clone(),
                serve_args: self.serve_args.clone(),
                aggregate_args: self.aggregate_args.clone(),
                _dir: None,
            };
            let started = Instant::now();
            let out = topo.deploy("up", &[]).await;
            if out.status.success() {
                println!(
                    "deploy/up: base port {}, healthy in {:.1?}",
                    topo.base,
                    started.elapsed()
                );
                let mut topo = topo;
                topo._dir = Some(dir);
                return topo;
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            let taken = last.contains("is in use");
            // Dropping `topo` runs deploy/down --purge: the next attempt starts clean.
            drop(topo);
            if !taken {
                break;
            }
        }
        panic!("deploy/up failed:\n{last}");
    }
}

/// A running topology (see the module's documentation).
pub struct Topology {
    /// The state directory (`ALLOT_DEPLOY_DIR`).
    pub state: PathBuf,
    /// The first port of the block (`ALLOT_DEPLOY_BASE_PORT`).
    pub base: u16,
    catalog: PathBuf,
    serve_args: String,
    aggregate_args: String,
    _dir: Option<tempfile::TempDir>,
}

/// The repository root (deploy/ lives there).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A base port whose ports B+10..=B+60 and the Redis cluster-bus ports (+10000) are all
/// free, below the ephemeral range (as deploy/smoke picks them), so that outgoing
/// connections do not take them between this check and the servers' bind.
fn free_block(attempt: u64) -> u16 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        ^ (u64::from(std::process::id()) << 20)
        ^ attempt;
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    for i in 0..200u64 {
        let base = 10_000 + (super::mix(seed.wrapping_add(i)) % 120) as u16 * 100;
        if (10..=60).all(|o| free(base + o) && free(base + o + 10_000)) {
            return base;
        }
    }
    panic!("no free block of ports");
}

impl Topology {
    /// A builder: the example catalog, no extra flags.
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder {
            catalog: super::example_catalog(),
            serve_args: String::new(),
            aggregate_args: String::new(),
        }
    }

    async fn deploy(&self, script: &str, args: &[&str]) -> std::process::Output {
        tokio::process::Command::new(repo_root().join("deploy").join(script))
            .args(args)
            .envs(self.env())
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .expect("deploy script runs")
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("ALLOT_DEPLOY_DIR", self.state.display().to_string()),
            ("ALLOT_DEPLOY_BASE_PORT", self.base.to_string()),
            ("ALLOT_BIN", env!("CARGO_BIN_EXE_allot").to_string()),
            ("ALLOT_DEPLOY_CATALOG", self.catalog.display().to_string()),
            ("ALLOT_SERVE_ARGS", self.serve_args.clone()),
            ("ALLOT_AGGREGATE_ARGS", self.aggregate_args.clone()),
            ("RUST_LOG", "info".to_string()),
        ]
    }

    /// `deploy/up` again: starts whatever is not running and waits until all is healthy.
    pub async fn up_again(&self) {
        let out = self.deploy("up", &[]).await;
        assert!(
            out.status.success(),
            "deploy/up again failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `secrets/<name>.token`: admin, service, billing, status, peer.
    pub fn token(&self, name: &str) -> String {
        let path = self.state.join("secrets").join(format!("{name}.token"));
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .to_string()
    }

    /// gRPC endpoint of enforcer-`n` (1-based).
    pub fn grpc(&self, n: u16) -> String {
        format!("http://127.0.0.1:{}", self.base + 10 + n)
    }

    /// The ClickHouse HTTP URL.
    pub fn clickhouse_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.base + 40)
    }

    /// A client of database `allot` (the aggregators' schema).
    pub fn clickhouse(&self) -> clickhouse::Client {
        clickhouse::Client::default()
            .with_url(self.clickhouse_url())
            .with_database("allot")
            .with_validation(false)
    }

    /// Port of Redis node `n` (1-based; 1–3 start as masters).
    pub fn redis_port(&self, n: u16) -> u16 {
        self.base + 50 + n
    }

    /// A channel to enforcer-`n` that connects lazily and reconnects by itself (after the
    /// node is killed and started again).
    pub fn channel(&self, n: u16) -> Channel {
        Endpoint::from_shared(self.grpc(n))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .connect_lazy()
    }

    /// An Enforcer client of enforcer-`n` with the service token (scope enforce).
    pub fn enforcer(&self, n: u16) -> pb::enforcer_client::EnforcerClient<Authed> {
        pb::enforcer_client::EnforcerClient::with_interceptor(
            self.channel(n),
            Bearer::new(&self.token("service")),
        )
    }

    /// An Admin client of enforcer-`n` with the admin token.
    pub fn admin(&self, n: u16) -> pb::admin_client::AdminClient<Authed> {
        pb::admin_client::AdminClient::with_interceptor(
            self.channel(n),
            Bearer::new(&self.token("admin")),
        )
    }

    /// A Billing client of enforcer-`n` with the billing token.
    pub fn billing(&self, n: u16) -> pb::billing_client::BillingClient<Authed> {
        pb::billing_client::BillingClient::with_interceptor(
            self.channel(n),
            Bearer::new(&self.token("billing")),
        )
    }

    /// The pid file of a component: `enforcer-2`, `aggregator-1`, `redis/<port>`,
    /// `clickhouse`.
    pub fn pid(&self, component: &str) -> u32 {
        let path = self.state.join(component).join("pid");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .parse()
            .expect("a pid")
    }

    /// SIGKILLs a component (see [`Topology::pid`]) and waits until it is gone.
    pub async fn kill9(&self, component: &str) {
        let pid = self.pid(component);
        let status = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -KILL {pid} ({component})");
        // Gone, or a zombie waiting for whoever reaps it.
        let stat = format!("/proc/{pid}/stat");
        for _ in 0..200 {
            match std::fs::read_to_string(&stat) {
                Err(_) => return,
                Ok(s)
                    if s.rsplit(')')
                        .next()
                        .is_some_and(|r| r.trim_start().starts_with('Z')) =>
                {
                    return
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        }
        panic!("{component} (pid {pid}) still alive 5 s after SIGKILL");
    }

    /// `redis-cli` against Redis node `n`; its stdout.
    pub fn redis_cli(&self, n: u16, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.redis_port(n).to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The Cluster's masters as seen by node `n`: (node number, first..=last slot ranges),
    /// failed ones left out.
    pub fn masters(&self, n: u16) -> Vec<(u16, Vec<(u16, u16)>)> {
        let mut out = Vec::new();
        for line in self.redis_cli(n, &["cluster", "nodes"]).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let port: u16 = f[1]
                .split(['@', ':'])
                .nth(1)
                .and_then(|p| p.parse().ok())
                .expect("ip:port@bus");
            let ranges = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .map(|s| match s.split_once('-') {
                    Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
                    None => (s.parse().unwrap(), s.parse().unwrap()),
                })
                .collect();
            out.push((port - self.base - 50, ranges));
        }
        out
    }

    /// The last lines of every log of the topology, for a failure message.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for c in [
            "enforcer-1",
            "enforcer-2",
            "enforcer-3",
            "aggregator-1",
            "aggregator-2",
        ] {
            let name = if c.starts_with("enforcer") {
                "enforcer.log"
            } else {
                "aggregator.log"
            };
            let text = std::fs::read_to_string(self.state.join(c).join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(15);
            out += &format!("--- {c} ---\n{}\n", lines[from..].join("\n"));
        }
        out
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Whatever happened: nothing left running, nothing left on disk.
        let started = Instant::now();
        let out = std::process::Command::new(repo_root().join("deploy/down"))
            .arg("--purge")
            .envs(self.env())
            .stdin(std::process::Stdio::null())
            .output();
        match out {
            Ok(out) => println!(
                "deploy/down --purge: {:?} in {:.1?}\n{}",
                out.status.code(),
                started.elapsed(),
                String::from_utf8_lossy(&out.stderr).trim_end()
            ),
            Err(e) => println!("deploy/down --purge did not run: {e}"),
        }
    }
}

/// The Redis Cluster slot of a key with hash tag `tag` (CRC16/XMODEM mod 16384).
pub fn slot(tag: &str) -> u16 {
    let mut crc: u16 = 0;
    for &b in tag.as_bytes() {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}
