//! The Redis store passes the same conformance suite as the embedded store, against a
//! real redis-server and a real 6-node Redis Cluster.

mod harness;

use std::time::Duration;

use fred::prelude::*;

use enforcer::redis::{RedisOptions, RedisStore};
use harness::redis::{RedisCluster, RedisServer};

fn options(url: &str) -> RedisOptions {
    // The suite runs at fixed instants in 2026; a long retention keeps Redis from expiring
    // its keys the moment they are written.
    RedisOptions {
        url: url.to_string(),
        retention: Duration::from_secs(3650 * 86_400),
        wait_replicas: None,
        command_timeout: Duration::from_secs(2),
    }
}

async fn fresh(url: &str) -> RedisStore {
    let store = RedisStore::connect(options(url))
        .await
        .expect("redis reachable");
    store.client().flushall_cluster().await.unwrap();
    store
}

#[tokio::test]
async fn redis_store_conforms() {
    let server = RedisServer::start().await;
    meter::conformance::run_all(|| fresh(&server.url)).await;
}

#[tokio::test]
async fn redis_cluster_store_conforms() {
    let cluster = RedisCluster::start().await;
    meter::conformance::run_all(|| fresh(&cluster.url)).await;
}
