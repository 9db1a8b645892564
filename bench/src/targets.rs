//! The targets of the per-concurrency cells, started (or reached) before measuring:
//! the node over the embedded store, the no-op ceiling server, and the bench's Redis with
//! the node that uses it (hard-reserve and soft-reserve share that node; soft-reserve's
//! pairs stay in its local store, under its own temporary `--data-dir`). Dropping
//! [`Targets`] kills every child.

use std::sync::Arc;

use anyhow::Context as _;
use prost::Message as _;
use tonic::transport::Channel;

use crate::cli::{RunArgs, Scenario};
use crate::node::{self, ServerProcess};
use crate::redis::{self, ScriptTarget};
use crate::scenario::Target;
use crate::setup;

/// The node on Redis (hard-reserve, soft-reserve), the Redis, and the redis-script client.
struct RedisSide {
    /// The node, declared before the server so that it is killed first.
    node: ServerProcess,
    server: ServerProcess,
    channels: Vec<Channel>,
    script: Arc<ScriptTarget>,
}

/// Everything the cells run against.
#[derive(Default)]
pub struct Targets {
    node: Option<ServerProcess>,
    node_channels: Vec<Channel>,
    noop: Option<ServerProcess>,
    noop_channels: Vec<Channel>,
    redis: Option<RedisSide>,
}

impl Targets {
    /// Starts or reaches what `scenarios` need, and prepares the nodes.
    pub async fn start(
        args: &RunArgs,
        scenarios: &[Scenario],
        run_id: &str,
    ) -> anyhow::Result<Targets> {
        let mut t = Targets::default();
        let mut ceiling_response = crate::noop::typical_check_response().encode_to_vec();
        if scenarios.iter().any(|s| s.needs_node()) {
            let url = match &args.endpoint {
                Some(url) => {
                    setup::ensure_loopback(url)?;
                    url.clone()
                }
                None => {
                    let bin = node::allot_bin(args.allot_bin.as_deref())?;
                    let started = node::start_allot(&bin, "allot node", &args.node_args).await?;
                    eprintln!("node: started {} on {}", bin.display(), started.addr());
                    let url = started.url();
                    t.node = Some(started);
                    url
                }
            };
            t.node_channels = setup::connect(&url, args.channels).await?;
            setup::prepare(
                t.node_channels[0].clone(),
                args.tenants,
                args.endpoint.is_none(),
                None,
            )
            .await
            .context("preparing the node")?;
            eprintln!(
                "node: catalog applied, {} tenants subscribed to plan `{}`",
                args.tenants,
                setup::PLAN
            );
            ceiling_response = setup::probe(t.node_channels[0].clone(), None)
                .await?
                .encode_to_vec();
        }

        if scenarios.contains(&Scenario::Ceiling) {
            let started = node::start_noop(&ceiling_response).await?;
            eprintln!(
                "ceiling: no-op server on {} (request {} bytes, response {} bytes, as Check's)",
                started.addr(),
                setup::check_request(0).encoded_len(),
                ceiling_response.len()
            );
            t.noop_channels = setup::connect(&started.url(), args.channels).await?;
            t.noop = Some(started);
        }

        if scenarios.iter().any(|s| s.needs_redis_node()) {
            let soft = scenarios.contains(&Scenario::SoftReserve);
            t.redis = Some(start_redis_side(args, run_id, soft).await?);
        }
        Ok(t)
    }

    /// Where `scenario`'s workers go.
    pub fn target(&self, scenario: Scenario) -> anyhow::Result<Target<'_>> {
        Ok(match scenario {
            Scenario::Ceiling => Target::Grpc(&self.noop_channels),
            Scenario::HardReserve | Scenario::SoftReserve => {
                Target::Grpc(&self.redis_side()?.channels)
            }
            Scenario::RedisScript => Target::Script(&self.redis_side()?.script),
            _ => Target::Grpc(&self.node_channels),
        })
    }

    fn redis_side(&self) -> anyhow::Result<&RedisSide> {
        self.redis
            .as_ref()
            .context("the bench's Redis was not started")
    }

    /// Fails, with the end of its log, if any child has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        let redis = self
            .redis
            .as_mut()
            .map(|r| [&mut r.node, &mut r.server])
            .into_iter()
            .flatten();
        for child in [self.node.as_mut(), self.noop.as_mut()]
            .into_iter()
            .flatten()
            .chain(redis)
        {
            child.ensure_running()?;
        }
        Ok(())
    }

    /// Kills every child and waits for them (nodes before the Redis they use).
    pub async fn stop(self) {
        if let Some(r) = self.redis {
            r.node.stop().await;
            r.server.stop().await;
        }
        for child in [self.node, self.noop].into_iter().flatten() {
            child.stop().await;
        }
    }
}

/// Starts the bench's Redis and a node on it, prepares the node like the embedded one,
/// proves Reserve/Commit work (and, with `soft`, that a soft-only Reserve stays in the
/// node's local store), and connects the redis-script client using the slots of the
/// hard probe's grant.
async fn start_redis_side(args: &RunArgs, run_id: &str, soft: bool) -> anyhow::Result<RedisSide> {
    let server = redis::start_server(&args.redis_server).await?;
    let url = redis::url(&server);
    eprintln!(
        "redis: started {} on {}",
        args.redis_server.display(),
        server.addr()
    );
    let bin = node::allot_bin(args.allot_bin.as_deref())?;
    let mut node_args = vec!["--redis".to_owned(), url.clone()];
    node_args.extend(args.node_args.iter().cloned());
    let node = node::start_allot(&bin, "allot node on Redis", &node_args).await?;
    eprintln!(
        "node: started {} --redis {url} on {}, --data-dir {}",
        bin.display(),
        node.addr(),
        node.data_dir()
            .map_or_else(|| "?".to_owned(), |d| d.display().to_string())
    );
    let channels = setup::connect(&node.url(), args.channels).await?;
    setup::prepare(channels[0].clone(), args.tenants, true, None)
        .await
        .context("preparing the node on Redis")?;
    setup::probe(channels[0].clone(), None).await?;
    let probe_key = format!("bench-{run_id}-probe");
    let id = setup::probe_reserve(channels[0].clone(), setup::METRIC, &probe_key, None).await?;
    anyhow::ensure!(
        !setup::is_local_reservation(&id),
        "the probe Reserve of {} (hard limits) was kept in the node's local store \
         (reservation {id}), not sent to Redis",
        setup::METRIC
    );
    if soft {
        let soft_key = format!("bench-{run_id}-soft-probe");
        let id =
            setup::probe_reserve(channels[0].clone(), setup::SOFT_METRIC, &soft_key, None).await?;
        anyhow::ensure!(
            setup::is_local_reservation(&id),
            "the probe Reserve of {} (soft limits only) went to Redis (reservation {id}), \
             not to the node's local store: does this node decide soft limits at the edge?",
            setup::SOFT_METRIC
        );
        eprintln!(
            "soft-reserve: probe Reserve of {} kept in the node's local store ({id})",
            setup::SOFT_METRIC
        );
    }
    let script = ScriptTarget::connect(&url, &setup::tenant(0), &probe_key).await?;
    eprintln!(
        "redis-script: reserve.lua + settle.lua over one fred client, {}",
        script.describe()
    );
    Ok(RedisSide {
        node,
        server,
        channels,
        script: Arc::new(script),
    })
}
