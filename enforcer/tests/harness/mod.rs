//! The shared test harness: real `allot serve` processes on free loopback ports, in
//! temporary data directories, stopped when dropped.
//!
//! ```ignore
//! let node = Node::builder().catalog(TEST_CATALOG).start().await;
//! let mut enforcer = node.enforcer().await;
//! ```
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use allot_proto::v1 as pb;
use pb::admin_client::AdminClient;
use pb::enforcer_client::EnforcerClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

pub mod proxy;
pub mod topology;
pub mod warehouse;
// The servers themselves live in redis.rs, which names nothing of this harness, so that
// other crates' tests can include it too (`#[path]`); `redis` adds the nodes on them.
#[path = "redis.rs"]
mod redis_servers;

/// Throwaway Redis servers and clusters (see `redis.rs`), and nodes running on them.
#[allow(unused_imports)] // each test crate uses some of them
pub mod redis {
    pub use super::nodes_on;
    pub use super::redis_servers::*;
}

/// The repository's example catalog.
pub fn example_catalog() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/catalog.yaml"))
        .unwrap()
}

/// SplitMix64: a well-mixed `u64` from any seed (workloads and port picks from one seed).
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A free loopback port (bound, then released for a process to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 request; returns the status and the body. Retries while the listener is
/// not up yet (it starts a moment after gRPC).
pub async fn http(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let mut last = None;
    for _ in 0..300 {
        let mut req = hyper::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(hyper::body::Bytes::from(body.to_vec())))
            .unwrap();
        match client.request(req).await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let bytes = resp.into_body().collect().await.unwrap().to_bytes();
                return (status, String::from_utf8_lossy(&bytes).into_owned());
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{method} {url} unreachable: {last:?}");
}

/// Builds a node.
pub struct NodeBuilder {
    catalog: Option<String>,
    data_dir: Option<PathBuf>,
    args: Vec<String>,
    auth: bool,
    tls: Option<ClientTlsConfig>,
}

impl NodeBuilder {
    /// Catalog text to start with (default: the example catalog).
    pub fn catalog(mut self, yaml: &str) -> Self {
        self.catalog = Some(yaml.to_string());
        self
    }

    /// Require API tokens (the token file in the data directory). Other nodes run with
    /// --insecure-no-auth, so that tests of other things need no tokens.
    pub fn with_auth(mut self) -> Self {
        self.auth = true;
        self
    }

    /// Reuse a data directory (to restart a node on the same state).
    pub fn data_dir(mut self, dir: &Path) -> Self {
        self.data_dir = Some(dir.to_path_buf());
        self
    }

    /// The node serves TLS (give it its `--tls-*` options with [`NodeBuilder::arg`]): its
    /// endpoint is `https://`, and the harness's own clients dial it with `tls`.
    pub fn client_tls(mut self, tls: ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Extra `allot serve` arguments.
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_string());
        self
    }

    /// Starts the process and waits until it serves.
    pub async fn start(self) -> Node {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = self.data_dir.unwrap_or_else(|| tmp.path().join("data"));
        let catalog_path = tmp.path().join("catalog.yaml");
        std::fs::write(&catalog_path, self.catalog.unwrap_or_else(example_catalog)).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_allot"))
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--catalog")
            .arg(&catalog_path)
            .args((!self.auth).then_some("--insecure-no-auth"))
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("allot binary starts");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(a) = line.strip_prefix("listening on ") {
                    return a.to_string();
                }
            }
            panic!("allot serve exited before listening");
        })
        .await
        .expect("allot serve listens within 30 s");
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let node = Node {
            child,
            endpoint: format!("{scheme}://{addr}"),
            addr,
            data_dir,
            tls: self.tls,
            _tmp: tmp,
        };
        node.wait_ready().await;
        node
    }
}

/// A running node.
pub struct Node {
    child: Child,
    /// `http://127.0.0.1:PORT` (`https://` for a node serving TLS).
    pub endpoint: String,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    tls: Option<ClientTlsConfig>,
    _tmp: tempfile::TempDir,
}

impl Node {
    /// A builder with the example catalog.
    pub fn builder() -> NodeBuilder {
        NodeBuilder {
            catalog: None,
            data_dir: None,
            args: Vec::new(),
            auth: false,
            tls: None,
        }
    }

    /// A builder for a node on `catalog` over the Redis at `url`, with an hour's cache TTL
    /// (only change announcements, or an outage, explain a quick change of answer).
    pub fn on_redis(catalog: &str, url: &str) -> NodeBuilder {
        Node::builder()
            .catalog(catalog)
            .arg("--redis")
            .arg(url)
            .arg("--cache-ttl")
            .arg("1h")
    }

    fn target(&self) -> Endpoint {
        let e = Endpoint::from_shared(self.endpoint.clone()).unwrap();
        match &self.tls {
            Some(tls) => e.tls_config(tls.clone()).unwrap(),
            None => e,
        }
    }

    async fn channel(&self) -> Channel {
        self.target().connect().await.expect("node reachable")
    }

    async fn wait_ready(&self) {
        // The gRPC server starts a moment after the line is printed. A TLS handshake is
        // part of the connection, so a node serving TLS is ready once it completes.
        for _ in 0..600 {
            if self.target().connect().await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("node at {} never accepted connections", self.endpoint);
    }

    /// An Enforcer client.
    pub async fn enforcer(&self) -> EnforcerClient<Channel> {
        EnforcerClient::new(self.channel().await)
    }

    /// An Admin client.
    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel().await)
    }

    /// A Spool client (embedded nodes).
    pub async fn spool(&self) -> pb::spool_client::SpoolClient<Channel> {
        pb::spool_client::SpoolClient::new(self.channel().await)
    }

    /// Kills the process with SIGKILL and waits for it: no shutdown code runs.
    pub async fn kill9(&mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }

    /// Sends SIGTERM and waits for the exit (a hang fails the test after a minute);
    /// returns the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running");
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .unwrap();
        assert!(sent.success(), "SIGTERM sent");
        tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("the node exits after SIGTERM")
            .unwrap()
    }

    /// Runs the `allot` CLI against this node; returns (exit code, stdout, stderr).
    pub async fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_allot"))
            .args(args)
            .env("ALLOT_ENDPOINT", &self.endpoint)
            .output()
            .await
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// Subscribes `tenant` to `plan` (newest version) through the Admin API.
pub async fn subscribe(admin: &mut AdminClient<Channel>, tenant: &str, plan: &str) {
    admin
        .put_subscription(pb::PutSubscriptionRequest {
            tenant: tenant.into(),
            plan: plan.into(),
            actor: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("subscribe {tenant} to {plan}: {e}"));
}

/// A Reserve request.
pub fn reserve(tenant: &str, metric: &str, amount: i64, key: &str) -> pb::ReserveRequest {
    pb::ReserveRequest {
        tenant: tenant.into(),
        metric: metric.into(),
        amount,
        idempotency_key: key.into(),
        ttl: None,
        dimensions: Default::default(),
    }
}

/// A Record request.
pub fn record(tenant: &str, metric: &str, amount: i64, event_id: &str) -> pb::RecordRequest {
    pb::RecordRequest {
        tenant: tenant.into(),
        metric: metric.into(),
        amount,
        event_id: event_id.into(),
        dimensions: Default::default(),
        event_time: None,
    }
}

/// The usage of one window of a metric: (used, reserved).
pub async fn window_usage(
    e: &mut EnforcerClient<Channel>,
    tenant: &str,
    metric: &str,
    window: &str,
) -> (u64, u64) {
    let u = e
        .get_usage(pb::GetUsageRequest {
            tenant: tenant.into(),
            metric: metric.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let w = u
        .windows
        .iter()
        .find(|w| w.window == window)
        .unwrap_or_else(|| panic!("no {window} window in {u:?}"));
    (w.used, w.reserved)
}

/// Whether an error says that the request may have been applied (the shared store did
/// not answer in time): a careful client retries it with the same idempotency key or
/// event id until the answer is definite, and counts nothing meanwhile.
pub fn in_doubt(s: &tonic::Status) -> bool {
    s.message().contains("may have been applied")
}

/// The outcome of a decision.
pub fn outcome(d: &Option<pb::Decision>) -> pb::Outcome {
    pb::Outcome::try_from(d.as_ref().expect("decision").outcome).unwrap()
}

/// `count` nodes over the Redis at `url`, all on `catalog` ([`Node::on_redis`]). Their
/// backend deadline is 5 s
/// rather than 250 ms: these tests count exact grants under many concurrent calls, and on a
/// busy machine a slow answer would turn into "may have been applied" (tests of outages
/// start their nodes with the default).
pub async fn nodes_on(url: &str, catalog: &str, count: usize) -> Vec<Node> {
    let mut out = Vec::new();
    for _ in 0..count {
        out.push(
            Node::on_redis(catalog, url)
                .arg("--backend-deadline")
                .arg("5s")
                .start()
                .await,
        );
    }
    out
}
