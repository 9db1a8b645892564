//! What an aggregator is told: [`AggregateOptions`] (the library's, with every default in
//! [`AggregateOptions::new`]) and [`AggregateArgs`] (the command line of `allot
//! aggregate`, flags and `ALLOT_*` variables), which resolves into them.

use std::time::Duration;

use crate::error::AggregateError;
use crate::sink::ClickHouseConfig;

/// Default rows per insert.
pub const DEFAULT_BATCH_SIZE: usize = 10_000;
/// Largest batch: below ClickHouse's `max_insert_block_size` (1,048,576 rows on 18.16,
/// 1,048,449 now), so that one insert is one block, one part.
pub const MAX_BATCH_SIZE: usize = 1_000_000;
/// Default longest wait before a partial batch is inserted.
pub const DEFAULT_BATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Default lease term (renewed every third of it).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
/// Default wait before reading an empty partition again.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Default first retry delay (doubled up to the cap).
pub const DEFAULT_RETRY_MIN: Duration = Duration::from_millis(100);
/// Default retry delay cap.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(5);

/// How an aggregator runs.
#[derive(Debug, Clone)]
pub struct AggregateOptions {
    /// ClickHouse HTTP endpoint, `http://host:port`.
    pub clickhouse_url: String,
    /// ClickHouse database (created if missing).
    pub database: String,
    /// ClickHouse user (default: the server's default user).
    pub user: Option<String>,
    /// Its password.
    pub password: Option<String>,
    /// Redis: `redis://host:port` or `redis-cluster://host:port`; empty when the events
    /// come from embedded nodes' spools instead.
    pub redis_url: String,
    /// Embedded nodes whose spools to read (`http://host:port`, one partition each);
    /// empty when the events come from Redis. Exactly one of the two is given.
    pub spool: Vec<String>,
    /// The API token presented to the nodes' Spool service (scope `spool`).
    pub spool_token: Option<String>,
    /// TLS towards `https://` spool nodes: the CA to trust and any client certificate.
    /// `None`: an https node's certificate is checked against the system's roots.
    pub spool_tls: Option<SpoolTls>,
    /// This aggregator's name in leases (unique among running aggregators).
    pub aggregator_id: String,
    /// Rows per insert at most.
    pub batch_size: usize,
    /// Longest wait between the first entry of a batch and its insert.
    pub batch_interval: Duration,
    /// How long a partition stays ours without renewal. An insert must finish well within
    /// it (each gets half of it at most). With spools, at most the node's lease
    /// ([`crate::source::spool::NODE_LEASE`]).
    pub lease_ttl: Duration,
    /// Wait before reading an empty partition again.
    pub poll_interval: Duration,
    /// First retry delay while ClickHouse or Redis fails.
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Keep acknowledged entries in the source (for other readers) instead of trimming
    /// them after each batch.
    pub keep_acknowledged: bool,
    /// Test failpoint: abort the process right after this many successful inserts, before
    /// their entries are acknowledged.
    #[doc(hidden)]
    pub exit_after_inserts: Option<u64>,
    /// Serve `/metrics`, `/healthz` and `/readyz` here.
    pub http_listen: Option<std::net::SocketAddr>,
}

/// The ClickHouse database events go to unless told otherwise.
pub const DEFAULT_DATABASE: &str = "allot";

impl AggregateOptions {
    /// Options with every default, reading Redis: database `allot`, this host's name and
    /// pid as id, batches of 10,000 rows or 1 s, 30 s leases, 100 ms polls, retries from
    /// 100 ms to 5 s.
    pub fn new(clickhouse_url: &str, redis_url: &str) -> AggregateOptions {
        AggregateOptions {
            clickhouse_url: clickhouse_url.to_string(),
            database: DEFAULT_DATABASE.into(),
            user: None,
            password: None,
            redis_url: redis_url.to_string(),
            spool: Vec::new(),
            spool_token: None,
            spool_tls: None,
            aggregator_id: default_id(),
            batch_size: DEFAULT_BATCH_SIZE,
            batch_interval: DEFAULT_BATCH_INTERVAL,
            lease_ttl: DEFAULT_LEASE_TTL,
            poll_interval: DEFAULT_POLL_INTERVAL,
            retry_min: DEFAULT_RETRY_MIN,
            retry_max: DEFAULT_RETRY_MAX,
            keep_acknowledged: false,
            exit_after_inserts: None,
            http_listen: None,
        }
    }

    /// Options with every default, reading the spools of the embedded nodes at `nodes`
    /// (`http://host:port`): as [`AggregateOptions::new`], but leases of the node's term
    /// ([`crate::source::spool::NODE_LEASE`], 10 s).
    pub fn spool(clickhouse_url: &str, nodes: &[String]) -> AggregateOptions {
        let mut o = AggregateOptions::new(clickhouse_url, "");
        o.spool = nodes.to_vec();
        o.lease_ttl = crate::source::spool::NODE_LEASE;
        o
    }

    /// Checks every option; the first bad one is named.
    pub fn validate(&self) -> Result<(), AggregateError> {
        let bad = |field, reason: &str| {
            Err(AggregateError::Invalid {
                field,
                reason: reason.to_string(),
            })
        };
        if !self.clickhouse_url.starts_with("http://")
            && !self.clickhouse_url.starts_with("https://")
        {
            return bad("clickhouse", "expected http://host:port");
        }
        if self.database.is_empty() {
            return bad("database", "must not be empty");
        }
        match (self.redis_url.is_empty(), self.spool.is_empty()) {
            (true, true) => {
                return bad(
                    "redis",
                    "give either --redis (nodes writing to Redis) or --spool (embedded nodes)",
                )
            }
            (false, false) => return bad(
                "spool",
                "give either --redis or --spool, not both: one aggregator reads one kind of source",
            ),
            (false, true) => {
                if !self.redis_url.starts_with("redis://")
                    && !self.redis_url.starts_with("redis-cluster://")
                {
                    return bad(
                        "redis",
                        "expected redis://host:port or redis-cluster://host:port",
                    );
                }
            }
            (true, false) => {
                for node in &self.spool {
                    if !node.starts_with("http://") && !node.starts_with("https://") {
                        return bad("spool", "expected http://host:port for each node");
                    }
                }
                if self.spool.len() > usize::from(u16::MAX) {
                    return bad("spool", "too many nodes");
                }
                if self.lease_ttl > crate::source::spool::NODE_LEASE {
                    return bad(
                        "lease_ttl",
                        "must be at most 10s with --spool (the node's spool lease)",
                    );
                }
            }
        }
        if self.aggregator_id.is_empty() {
            return bad("id", "must not be empty");
        }
        if self.batch_size == 0 || self.batch_size > MAX_BATCH_SIZE {
            return bad("batch_size", "must be between 1 and 1,000,000");
        }
        if self.batch_interval.is_zero() {
            return bad("batch_interval", "must be positive");
        }
        if self.lease_ttl < Duration::from_millis(300) {
            return bad("lease_ttl", "must be at least 300ms");
        }
        if self.poll_interval.is_zero() {
            return bad("poll_interval", "must be positive");
        }
        if self.retry_min.is_zero() || self.retry_max < self.retry_min {
            return bad("retry_min", "must be positive and at most retry_max");
        }
        Ok(())
    }

    /// The ClickHouse connection: each request gets half a lease term at most.
    pub fn clickhouse(&self) -> ClickHouseConfig {
        ClickHouseConfig {
            url: self.clickhouse_url.clone(),
            database: self.database.clone(),
            user: self.user.clone(),
            password: self.password.clone(),
            timeout: self.lease_ttl / 2,
        }
    }
}

/// `hostname-pid`.
pub fn default_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "aggregator".into());
    format!("{host}-{}", std::process::id())
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `allot aggregate`: move usage events from Redis, or from embedded nodes' spools, into
/// ClickHouse, exactly once.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).multiple(false).args(["redis", "spool"])))]
pub struct AggregateArgs {
    /// ClickHouse HTTP endpoint.
    #[arg(
        long,
        env = "ALLOT_CLICKHOUSE",
        default_value = "http://127.0.0.1:8123"
    )]
    pub clickhouse: String,
    /// ClickHouse database (created, and migrated, at start).
    #[arg(long, env = "ALLOT_CLICKHOUSE_DATABASE", default_value = DEFAULT_DATABASE)]
    pub database: String,
    /// ClickHouse user.
    #[arg(long, env = "ALLOT_CLICKHOUSE_USER")]
    pub clickhouse_user: Option<String>,
    /// ClickHouse password.
    #[arg(long, env = "ALLOT_CLICKHOUSE_PASSWORD", hide_env_values = true)]
    pub clickhouse_password: Option<String>,
    /// Redis the nodes write events to: redis://host:port or redis-cluster://host:port.
    /// Exactly one of --redis and --spool.
    #[arg(long, env = "ALLOT_REDIS")]
    pub redis: Option<String>,
    /// An embedded node (allot serve without --redis) whose spool to read, as its gRPC
    /// endpoint http://host:port (https:// for a node serving TLS: see the global --tls-ca,
    /// --tls-client-cert, --tls-client-key); repeat for each node (one partition each; ALLOT_SPOOL
    /// takes a comma-separated list). Give each node the same endpoint every time: it names
    /// the node's rows in ClickHouse (src spool:host:port). Exactly one of --redis and
    /// --spool.
    #[arg(long, env = "ALLOT_SPOOL", value_delimiter = ',', value_name = "URL")]
    pub spool: Vec<String>,
    /// This aggregator's name in partition leases [default: hostname-pid].
    #[arg(long, env = "ALLOT_AGGREGATOR_ID")]
    pub id: Option<String>,
    /// Rows per insert at most.
    #[arg(long, default_value_t = DEFAULT_BATCH_SIZE)]
    pub batch_size: usize,
    /// Longest wait before a partial batch is inserted.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub batch_interval: Duration,
    /// Partition lease term (renewed every third of it) [default: 30s with --redis, 10s
    /// with --spool, which allows 10s at most: the node's spool lease].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub lease_ttl: Option<Duration>,
    /// Wait before reading an empty partition again.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,
    /// First retry delay while ClickHouse or Redis fails (doubles up to --retry-max).
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub retry_min: Duration,
    /// Longest retry delay.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub retry_max: Duration,
    /// Keep acknowledged events in the Redis streams (when other consumer groups read
    /// them) instead of trimming them after each batch.
    #[arg(long, env = "ALLOT_KEEP_ACKNOWLEDGED")]
    pub keep_acknowledged: bool,
    /// Log format on stderr (levels from RUST_LOG).
    #[arg(long, env = "ALLOT_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Test failpoint: abort right after N inserts, before acknowledging them.
    #[arg(long, hide = true)]
    pub exit_after_insert: Option<u64>,
    /// Serve Prometheus metrics (`/metrics`), liveness (`/healthz`) and readiness
    /// (`/readyz`: ClickHouse and the source answer) over HTTP here; off unless set.
    #[arg(long, env = "ALLOT_AGGREGATOR_HTTP_LISTEN")]
    pub http_listen: Option<std::net::SocketAddr>,
    /// The API token for the nodes' Spool service (scope `spool`): the `allot` binary's
    /// global `--token` / ALLOT_TOKEN.
    #[arg(skip)]
    pub token: Option<String>,
    /// TLS towards https:// spool nodes: the `allot` binary's global --tls-ca,
    /// --tls-client-cert and --tls-client-key, already read and checked.
    #[arg(skip)]
    pub tls: Option<SpoolTls>,
}

/// TLS settings for dialing spool nodes. A wrapper only so that printing the options
/// cannot print a private key, as tonic's `Identity` would.
#[derive(Clone)]
pub struct SpoolTls(pub tonic::transport::ClientTlsConfig);

impl std::fmt::Debug for SpoolTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpoolTls(..)")
    }
}

impl AggregateArgs {
    /// The options these arguments say.
    pub fn options(&self) -> AggregateOptions {
        let mut o = match &self.redis {
            Some(redis) => AggregateOptions::new(&self.clickhouse, redis),
            None => AggregateOptions::spool(&self.clickhouse, &self.spool),
        };
        if self.redis.is_some() {
            o.spool = self.spool.clone();
        }
        o.database = self.database.clone();
        o.spool_token = self.token.clone();
        o.spool_tls = self.tls.clone();
        o.user = self.clickhouse_user.clone();
        o.password = self.clickhouse_password.clone();
        if let Some(id) = &self.id {
            o.aggregator_id = id.clone();
        }
        o.batch_size = self.batch_size;
        o.batch_interval = self.batch_interval;
        if let Some(ttl) = self.lease_ttl {
            o.lease_ttl = ttl;
        }
        o.poll_interval = self.poll_interval;
        o.retry_min = self.retry_min;
        o.retry_max = self.retry_max;
        o.keep_acknowledged = self.keep_acknowledged;
        o.exit_after_inserts = self.exit_after_insert;
        o.http_listen = self.http_listen;
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_options_are_named() {
        let o = AggregateOptions::new("http://127.0.0.1:8123", "redis://127.0.0.1:6379");
        o.validate().unwrap();
        let mut b = o.clone();
        b.batch_size = 0;
        assert!(b
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("option batch_size:"));
        let mut b = o.clone();
        b.redis_url = "tcp://x".into();
        assert!(b
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("option redis:"));
        let mut b = o.clone();
        b.spool = vec!["http://127.0.0.1:7411".into()];
        assert!(b
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("option spool:"));
        let s = AggregateOptions::spool("http://127.0.0.1:8123", &["http://n:7411".into()]);
        s.validate().unwrap();
        let mut b = s.clone();
        b.lease_ttl = Duration::from_secs(30);
        assert!(b
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("option lease_ttl:"));
        let mut b = s.clone();
        b.spool = Vec::new();
        assert!(b
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("option redis:"));
    }
}
