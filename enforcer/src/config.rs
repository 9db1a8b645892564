//! `allot serve`'s configuration: flags beat environment variables, which beat the
//! config file, which beats the defaults listed here (the one place they are set).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7411";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "allot-data";
/// Catalog loaded at start when none is given and the file exists.
pub const DEFAULT_CATALOG: &str = "examples/catalog.yaml";
/// Default domain of Envoy rate limit service requests this node answers.
pub const DEFAULT_RLS_DOMAIN: &str = "allot";

/// Flags (and their environment variables) of `allot serve`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML config file with the same keys as the flags (listen, data_dir, catalog,
    /// cache_ttl, sweep_interval, retention, log_format, redis, redis_wait_replicas,
    /// redis_wait_timeout, backend_deadline, node_id, advertise, peers (a list),
    /// sync_interval, peer_timeout, soft_grace, rls_domain, max_lateness, clickhouse,
    /// clickhouse_database, clickhouse_user, clickhouse_password, tokens,
    /// insecure_no_auth, peer_token). Unknown keys are refused.
    #[arg(long, env = "ALLOT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to serve gRPC on; port 0 picks a free one. [default: 127.0.0.1:7411]
    #[arg(long, env = "ALLOT_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory of the embedded store (created if missing); with --redis it holds the
    /// journal of usage admitted while Redis was unreachable and the node's local store
    /// for soft-only requests. Soft-limit counters (soft.redb) live here in both modes.
    /// [default: allot-data]
    #[arg(long, env = "ALLOT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Catalog file (YAML) to apply at start. A catalog that changes a published plan
    /// version is refused and the node does not start. [default: examples/catalog.yaml
    /// when that file exists, else the catalog stored by an earlier run]
    #[arg(long, env = "ALLOT_CATALOG")]
    pub catalog: Option<PathBuf>,
    /// Longest time a tenant's cached entitlements are used without a fresh read. Changes
    /// made through this node apply at once regardless, and with --redis so do changes
    /// announced by other nodes; this is the backstop for a lost announcement. [default: 30s]
    #[arg(long, env = "ALLOT_CACHE_TTL", value_parser = humantime::parse_duration)]
    pub cache_ttl: Option<Duration>,
    /// How often reservations past their TTL are released. [default: 1s]
    #[arg(long, env = "ALLOT_SWEEP_INTERVAL", value_parser = humantime::parse_duration)]
    pub sweep_interval: Option<Duration>,
    /// How long dedup keys (idempotency keys, event ids), settled reservations and
    /// counters of ended periods are kept. [default: 7days]
    #[arg(long, env = "ALLOT_RETENTION", value_parser = humantime::parse_duration)]
    pub retention: Option<Duration>,
    /// Log format on stderr: text or json. Levels come from RUST_LOG. [default: text]
    #[arg(long, env = "ALLOT_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Keep counters, reservations, catalog, subscriptions and overrides in Redis, shared
    /// by every node: redis://host:port for one server, redis-cluster://host:port (one
    /// seed node) for a Redis Cluster. Without it the embedded store in --data-dir is used.
    #[arg(long, env = "ALLOT_REDIS")]
    pub redis: Option<String>,
    /// With --redis: wait until this many replicas acknowledge each hard-cap write (Redis
    /// WAIT), so that a failover loses fewer acknowledged writes. [default: 0, do not wait]
    #[arg(long, env = "ALLOT_REDIS_WAIT_REPLICAS")]
    pub redis_wait_replicas: Option<u32>,
    /// With --redis: the longest wait for Redis on a request before each limit's
    /// on_backend_failure policy decides (fail_open: allowed, journaled in --data-dir and
    /// counted in Redis once it is back; fail_closed: denied). [default: 250ms]
    #[arg(long, env = "ALLOT_BACKEND_DEADLINE", value_parser = humantime::parse_duration)]
    pub backend_deadline: Option<Duration>,
    /// With --redis-wait-replicas: the longest wait for them. [default: 50ms]
    #[arg(long, env = "ALLOT_REDIS_WAIT_TIMEOUT", value_parser = humantime::parse_duration)]
    pub redis_wait_timeout: Option<Duration>,
    /// This node's name in soft-limit counters and membership; keep it across restarts.
    /// Letters, digits and `.:_-`. [default: the advertised address]
    #[arg(long, env = "ALLOT_NODE_ID")]
    pub node_id: Option<String>,
    /// host:port at which peers reach this node. [default: the listen address]
    #[arg(long, env = "ALLOT_ADVERTISE")]
    pub advertise: Option<String>,
    /// Peers (host:port, comma-separated) to exchange soft-limit counters with. With
    /// --redis, nodes also find each other through a membership list in Redis.
    #[arg(long, env = "ALLOT_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// How often changed soft-limit counters are sent to peers. [default: 100ms]
    #[arg(long, env = "ALLOT_SYNC_INTERVAL", value_parser = humantime::parse_duration)]
    pub sync_interval: Option<Duration>,
    /// A peer not heard from for this long is not live: it no longer takes a share of
    /// `scope: node` rate limits, and a peer found through Redis is forgotten (its counts
    /// stay). [default: 3s]
    #[arg(long, env = "ALLOT_PEER_TIMEOUT", value_parser = humantime::parse_duration)]
    pub peer_timeout: Option<Duration>,
    /// How long soft-limit counters of an ended window are kept. [default: 10m]
    #[arg(long, env = "ALLOT_SOFT_GRACE", value_parser = humantime::parse_duration)]
    pub soft_grace: Option<Duration>,
    /// Recorded events with an event time older than this are refused; younger late
    /// events count in the windows of their time. [default: 35days]
    #[arg(long, env = "ALLOT_MAX_LATENESS", value_parser = humantime::parse_duration)]
    pub max_lateness: Option<Duration>,
    /// The domain of Envoy rate limit service requests (envoy.service.ratelimit.v3) this
    /// node answers; requests for another domain are refused. See docs/envoy.md.
    /// [default: allot]
    #[arg(long, env = "ALLOT_RLS_DOMAIN")]
    pub rls_domain: Option<String>,
    /// ClickHouse (http://host:8123) holding the usage events that `allot aggregate`
    /// inserts: enables the Billing service (`allot billing`). Not needed to enforce.
    #[arg(long, env = "ALLOT_CLICKHOUSE")]
    pub clickhouse: Option<String>,
    /// With --clickhouse: the database `allot aggregate` writes to. [default: allot]
    #[arg(long, env = "ALLOT_CLICKHOUSE_DATABASE")]
    pub clickhouse_database: Option<String>,
    /// With --clickhouse: the user to connect as. [default: the server's default]
    #[arg(long, env = "ALLOT_CLICKHOUSE_USER")]
    pub clickhouse_user: Option<String>,
    /// With --clickhouse: its password (prefer the environment variable).
    #[arg(long, env = "ALLOT_CLICKHOUSE_PASSWORD", hide_env_values = true)]
    pub clickhouse_password: Option<String>,
    /// API tokens (TOML, stored hashed; see `allot token create`). Every call needs one
    /// with the method's scope. When the file has none, the node creates an admin token
    /// at start and prints it once. [default: <data-dir>/tokens.toml]
    #[arg(long, env = "ALLOT_TOKENS")]
    pub tokens: Option<PathBuf>,
    /// Serve every call without a token (development only: anyone who can connect may
    /// change plans).
    #[arg(long, env = "ALLOT_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// The token this node presents to its peers (scope `peer`).
    #[arg(long, env = "ALLOT_PEER_TOKEN", hide_env_values = true)]
    pub peer_token: Option<String>,
    /// Serve HTTP here (billing-provider webhooks at `/webhooks/<provider>`); off unless
    /// set.
    #[arg(long, env = "ALLOT_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// The Stripe webhook configuration (TOML: signing secret, tolerance, price → plan
    /// mapping; see docs/webhooks.md); enables `POST /webhooks/stripe` on --http-listen.
    #[arg(long, env = "ALLOT_STRIPE_CONFIG")]
    pub stripe_config: Option<PathBuf>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    catalog: Option<PathBuf>,
    #[serde(default, with = "humantime_serde_opt")]
    cache_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    sweep_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    retention: Option<Duration>,
    log_format: Option<LogFormat>,
    redis: Option<String>,
    redis_wait_replicas: Option<u32>,
    #[serde(default, with = "humantime_serde_opt")]
    redis_wait_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    backend_deadline: Option<Duration>,
    node_id: Option<String>,
    advertise: Option<String>,
    #[serde(default)]
    peers: Vec<String>,
    #[serde(default, with = "humantime_serde_opt")]
    sync_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    peer_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    soft_grace: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    max_lateness: Option<Duration>,
    rls_domain: Option<String>,
    clickhouse: Option<String>,
    clickhouse_database: Option<String>,
    clickhouse_user: Option<String>,
    clickhouse_password: Option<String>,
    tokens: Option<PathBuf>,
    #[serde(default)]
    insecure_no_auth: bool,
    peer_token: Option<String>,
    http_listen: Option<SocketAddr>,
    stripe_config: Option<PathBuf>,
}

mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// gRPC address.
    pub listen: SocketAddr,
    /// Store directory.
    pub data_dir: PathBuf,
    /// Catalog to apply at start, and whether it was asked for explicitly.
    pub catalog: Option<(PathBuf, bool)>,
    /// Entitlement cache TTL.
    pub cache_ttl: Duration,
    /// Reservation sweep interval.
    pub sweep_interval: Duration,
    /// Retention of dedup keys and ended counters.
    pub retention: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// The shared Redis store, when configured.
    pub redis: Option<crate::redis::RedisOptions>,
    /// Longest wait for the shared store before failure policies decide.
    pub backend_deadline: Duration,
    /// The domain of Envoy rate limit service requests this node answers.
    pub rls_domain: String,
    /// Soft-limit counter exchange.
    pub peering: Peering,
    /// Oldest event time a Record may carry.
    pub max_lateness: Duration,
    /// The ClickHouse database of usage events, for billing.
    pub clickhouse: Option<aggregator::sink::ClickHouseConfig>,
    /// The API token file; `None`: calls need no token.
    pub tokens: Option<PathBuf>,
    /// The token presented to peers.
    pub peer_token: Option<String>,
    /// Where HTTP (webhooks) is served, if anywhere.
    pub http_listen: Option<SocketAddr>,
    /// The Stripe webhook configuration file.
    pub stripe_config: Option<PathBuf>,
}

/// How a node exchanges soft-limit counters.
#[derive(Debug, Clone)]
pub struct Peering {
    /// Node id; `None`: the advertised address.
    pub node_id: Option<String>,
    /// Advertised address; `None`: the bound listen address.
    pub advertise: Option<String>,
    /// Static peers.
    pub peers: Vec<String>,
    /// Send interval.
    pub interval: Duration,
    /// Liveness timeout.
    pub timeout: Duration,
    /// How long ended windows are kept.
    pub grace: Duration,
}

/// Why the configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The config file is malformed.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the key.
        message: String,
    },
    /// A value is out of range.
    #[error("{field}: {reason}")]
    Invalid {
        /// The option.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

impl ServeArgs {
    /// Merges flags/environment over the config file over the defaults.
    pub fn resolve(&self) -> Result<ServeConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let catalog = match self.catalog.clone().or(file.catalog) {
            Some(p) => Some((p, true)),
            None => Path::new(DEFAULT_CATALOG)
                .exists()
                .then(|| (PathBuf::from(DEFAULT_CATALOG), false)),
        };
        let cfg = ServeConfig {
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default")),
            data_dir: self
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            catalog,
            cache_ttl: self
                .cache_ttl
                .or(file.cache_ttl)
                .unwrap_or(Duration::from_secs(30)),
            sweep_interval: self
                .sweep_interval
                .or(file.sweep_interval)
                .unwrap_or(Duration::from_secs(1)),
            retention: self
                .retention
                .or(file.retention)
                .unwrap_or(Duration::from_secs(7 * 24 * 3600)),
            log_format: self.log_format.or(file.log_format).unwrap_or_default(),
            redis: None,
            peering: Peering {
                node_id: self.node_id.clone().or(file.node_id),
                advertise: self.advertise.clone().or(file.advertise),
                peers: if self.peers.is_empty() {
                    file.peers
                } else {
                    self.peers.clone()
                },
                interval: self
                    .sync_interval
                    .or(file.sync_interval)
                    .unwrap_or(Duration::from_millis(100)),
                timeout: self
                    .peer_timeout
                    .or(file.peer_timeout)
                    .unwrap_or(Duration::from_secs(3)),
                grace: self
                    .soft_grace
                    .or(file.soft_grace)
                    .unwrap_or(Duration::from_secs(600)),
            },
            max_lateness: self
                .max_lateness
                .or(file.max_lateness)
                .unwrap_or(Duration::from_secs(35 * 86_400)),
            backend_deadline: self
                .backend_deadline
                .or(file.backend_deadline)
                .unwrap_or(Duration::from_millis(250)),
            rls_domain: self
                .rls_domain
                .clone()
                .or(file.rls_domain)
                .unwrap_or_else(|| DEFAULT_RLS_DOMAIN.into()),
            tokens: None,
            peer_token: self.peer_token.clone().or(file.peer_token),
            http_listen: self.http_listen.or(file.http_listen),
            stripe_config: self.stripe_config.clone().or(file.stripe_config),
            clickhouse: self.clickhouse.clone().or(file.clickhouse).map(|url| {
                aggregator::sink::ClickHouseConfig {
                    url,
                    database: self
                        .clickhouse_database
                        .clone()
                        .or(file.clickhouse_database)
                        .unwrap_or_else(|| aggregator::options::DEFAULT_DATABASE.into()),
                    user: self.clickhouse_user.clone().or(file.clickhouse_user),
                    password: self
                        .clickhouse_password
                        .clone()
                        .or(file.clickhouse_password),
                    timeout: Duration::from_secs(30),
                }
            }),
        };
        let wait = self
            .redis_wait_replicas
            .or(file.redis_wait_replicas)
            .filter(|n| *n > 0);
        let wait_timeout = self
            .redis_wait_timeout
            .or(file.redis_wait_timeout)
            .unwrap_or(Duration::from_millis(50));
        let redis = self
            .redis
            .clone()
            .or(file.redis)
            .map(|url| crate::redis::RedisOptions {
                url,
                retention: cfg.retention,
                wait_replicas: wait.map(|n| (n, wait_timeout)),
                command_timeout: cfg.backend_deadline
                    + wait.map_or(Duration::ZERO, |_| wait_timeout),
            });
        if let Some(r) = &redis {
            if !(r.url.starts_with("redis://") || r.url.starts_with("redis-cluster://")) {
                return Err(ConfigError::Invalid {
                    field: "redis",
                    reason: format!(
                        "{:?} is not redis://host:port or redis-cluster://host:port",
                        r.url
                    ),
                });
            }
        }
        let tokens = (!(self.insecure_no_auth || file.insecure_no_auth)).then(|| {
            self.tokens
                .clone()
                .or(file.tokens)
                .unwrap_or_else(|| crate::auth::default_path(&cfg.data_dir))
        });
        let cfg = ServeConfig {
            redis,
            tokens,
            ..cfg
        };
        if cfg.stripe_config.is_some() && cfg.http_listen.is_none() {
            return Err(ConfigError::Invalid {
                field: "stripe_config",
                reason: "Stripe delivers over HTTP: set --http-listen too".into(),
            });
        }
        if cfg.sweep_interval.is_zero() {
            return Err(ConfigError::Invalid {
                field: "sweep_interval",
                reason: "must be more than 0".into(),
            });
        }
        let p = &cfg.peering;
        if let Some(id) = &p.node_id {
            check_node_id(id)?;
        }
        if p.interval.is_zero() {
            return Err(ConfigError::Invalid {
                field: "sync_interval",
                reason: "must be more than 0".into(),
            });
        }
        if p.timeout <= p.interval {
            return Err(ConfigError::Invalid {
                field: "peer_timeout",
                reason: format!(
                    "must be longer than sync_interval ({})",
                    humantime::format_duration(p.interval)
                ),
            });
        }
        for (i, peer) in p.peers.iter().chain(&p.advertise).enumerate() {
            if peer
                .rsplit_once(':')
                .is_none_or(|(h, port)| h.is_empty() || port.parse::<u16>().is_err())
            {
                return Err(ConfigError::Invalid {
                    field: if p.advertise.as_ref() == Some(peer) {
                        "advertise"
                    } else {
                        "peers"
                    },
                    reason: format!("{peer:?} (entry {}) is not host:port", i + 1),
                });
            }
        }
        if cfg.rls_domain.is_empty() {
            // Envoy always sends a domain, so an empty one could never match.
            return Err(ConfigError::Invalid {
                field: "rls_domain",
                reason: "must not be empty".into(),
            });
        }
        if let Some(ch) = &cfg.clickhouse {
            if !(ch.url.starts_with("http://") || ch.url.starts_with("https://")) {
                return Err(ConfigError::Invalid {
                    field: "clickhouse",
                    reason: format!("{:?} is not http://host:port", ch.url),
                });
            }
            if ch.database.is_empty() {
                return Err(ConfigError::Invalid {
                    field: "clickhouse_database",
                    reason: "must not be empty".into(),
                });
            }
        }
        if cfg.retention < Duration::from_secs(24 * 3600) {
            return Err(ConfigError::Invalid {
                field: "retention",
                reason: "must be at least 1 day (reservation TTLs reach 24 h)".into(),
            });
        }
        Ok(cfg)
    }
}

/// Node ids name CRDT actors and appear in reservation ids, so they are short and plain.
pub fn check_node_id(id: &str) -> Result<(), ConfigError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".:_-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            field: "node_id",
            reason: format!("{id:?} must be 1 to 128 letters, digits or .:_-"),
        })
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.into(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_file_and_file_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allot.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\ndata_dir = \"/tmp/x\"\ncache_ttl = \"5s\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            data_dir: Some("/tmp/y".into()),
            ..Default::default()
        };
        let cfg = args.resolve().unwrap();
        assert_eq!(cfg.listen.port(), 9000);
        assert_eq!(cfg.data_dir, PathBuf::from("/tmp/y"));
        assert_eq!(cfg.cache_ttl, Duration::from_secs(5));
        assert_eq!(cfg.sweep_interval, Duration::from_secs(1));
    }

    #[test]
    fn rls_domain_is_layered_and_defaults_to_allot() {
        assert_eq!(
            ServeArgs::default().resolve().unwrap().rls_domain,
            DEFAULT_RLS_DOMAIN
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allot.toml");
        std::fs::write(&path, "rls_domain = \"from-file\"\n").unwrap();
        let from_file = ServeArgs {
            config: Some(path.clone()),
            ..Default::default()
        };
        assert_eq!(from_file.resolve().unwrap().rls_domain, "from-file");
        let flag = ServeArgs {
            config: Some(path),
            rls_domain: Some("edge".into()),
            ..Default::default()
        };
        assert_eq!(flag.resolve().unwrap().rls_domain, "edge");
        let err = ServeArgs {
            rls_domain: Some(String::new()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().starts_with("rls_domain:"), "{err}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allot.toml");
        std::fs::write(&path, "listn = \"127.0.0.1:9000\"\n").unwrap();
        let err = ServeArgs {
            config: Some(path.clone()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `listn`"), "{err}");
        std::fs::write(&path, "cache_ttl = \"soon\"\n").unwrap();
        let err = ServeArgs {
            config: Some(path),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("cache_ttl"), "{err}");
        let err = ServeArgs {
            sweep_interval: Some(Duration::ZERO),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().starts_with("sweep_interval:"), "{err}");
        for (args, field) in [
            (
                ServeArgs {
                    peers: vec!["localhost".into()],
                    ..Default::default()
                },
                "peers:",
            ),
            (
                ServeArgs {
                    node_id: Some("a@b".into()),
                    ..Default::default()
                },
                "node_id:",
            ),
            (
                ServeArgs {
                    peer_timeout: Some(Duration::from_millis(50)),
                    ..Default::default()
                },
                "peer_timeout:",
            ),
        ] {
            let err = args.resolve().unwrap_err();
            assert!(err.to_string().starts_with(field), "{err}");
        }
    }
}
