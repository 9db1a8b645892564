//! Self-test of the Redis test harness (`harness::redis`): a standalone server survives
//! SIGKILL through its AOF, and a cluster fails a killed master over to its replica.

mod harness;

use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::CustomCommand;
use harness::redis::{key_slot, RedisCluster, RedisServer};

/// A connected fred client that keeps reconnecting (100 ms apart) and fails fast on a
/// dead connection.
async fn client(config: Config) -> Client {
    let client = Builder::from_config(config)
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(1);
            c.internal_command_timeout = Duration::from_secs(2);
            c.max_command_attempts = 10;
        })
        .set_policy(ReconnectPolicy::new_constant(0, 100))
        .build()
        .unwrap();
    client.init().await.expect("fred connects");
    client
}

/// Retries `f` for up to 10 s; returns the value and how many attempts it took.
async fn retry<T, F, Fut>(what: &str, mut f: F) -> (T, u32)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut attempts = 0;
    loop {
        attempts += 1;
        match tokio::time::timeout(Duration::from_secs(3), f()).await {
            Ok(Ok(v)) => return (v, attempts),
            Ok(Err(e)) if Instant::now() < deadline => eprintln!("{what}: attempt {attempts}: {e}"),
            Err(_) if Instant::now() < deadline => {
                eprintln!("{what}: attempt {attempts}: timed out")
            }
            Ok(Err(e)) => panic!("{what}: still failing after {attempts} attempts: {e}"),
            Err(_) => panic!("{what}: still timing out after {attempts} attempts"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn key_slot_matches_redis() {
    // Values from the Redis Cluster specification / CLUSTER KEYSLOT.
    assert_eq!(key_slot("123456789"), 0x31C3);
    assert_eq!(key_slot("foo"), 12182);
    assert_eq!(key_slot("{user1000}.following"), key_slot("user1000"));
    assert_eq!(key_slot("q:{tenant}:a"), key_slot("tenant"));
    assert_eq!(key_slot("foo{}{bar}"), key_slot("foo{}{bar}")); // empty tag: whole key
    assert_ne!(key_slot("foo{}{bar}"), key_slot("bar"));
    assert_eq!(key_slot("foo{{bar}}zap"), key_slot("{bar"));
    for k in ["", "a", "q:{t1}:x", "{}", "x{y", "é{ü}"] {
        assert_eq!(
            key_slot(k),
            fred::util::redis_keyslot(k.as_bytes()),
            "key {k:?}"
        );
    }
}

#[tokio::test]
#[should_panic(expected = "Bad directive or wrong number of arguments")]
async fn a_server_that_cannot_start_panics_with_its_output() {
    RedisServer::start_with(&["--no-such-option", "x"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_survives_kill9_through_the_aof() {
    let t = Instant::now();
    let mut redis = RedisServer::start_with(&["--appendfsync", "always"]).await;
    eprintln!("standalone ready in {:?} at {}", t.elapsed(), redis.url);
    assert_eq!(redis.url, format!("redis://127.0.0.1:{}", redis.port));

    let c = client(Config::from_url(&redis.url).unwrap()).await;
    let _: () = c.set("k", "v1", None, None, false).await.unwrap();
    let n: i64 = c.incr("n").await.unwrap();
    assert_eq!(n, 1);
    let v: Option<String> = c.get("k").await.unwrap();
    assert_eq!(v.as_deref(), Some("v1"));

    redis.kill9().await;
    let t = Instant::now();
    redis.restart().await;
    eprintln!("standalone restarted in {:?}", t.elapsed());

    // The same client reconnects to the restarted server.
    let (v, attempts) = retry("get after restart", || c.get::<Option<String>, _>("k")).await;
    eprintln!("get after restart: {attempts} attempt(s)");
    assert_eq!(v.as_deref(), Some("v1"));
    let n: i64 = c.get("n").await.unwrap();
    assert_eq!(n, 1);

    // A clean stop and another restart keep it too.
    let _: () = c.set("k", "v2", None, None, false).await.unwrap();
    redis.stop().await;
    redis.restart().await;
    let fresh = client(Config::from_url(&redis.url).unwrap()).await;
    let v: Option<String> = fresh.get("k").await.unwrap();
    assert_eq!(v.as_deref(), Some("v2"));
    // No QUIT on `c`: fred 10's QUIT can hang on a client whose server went away.

    // Dropping kills the server and removes its directory.
    let (port, dir) = (redis.port, redis.dir().to_path_buf());
    drop(redis);
    assert!(!dir.exists(), "{} removed", dir.display());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "{port} closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_fails_a_killed_master_over() {
    let t = Instant::now();
    let mut cluster = RedisCluster::start().await;
    eprintln!("cluster ready in {:?}: {:?}", t.elapsed(), cluster.ports);
    assert_eq!(cluster.ports.len(), 6);
    assert_eq!(cluster.seeds.len(), 6);
    assert_eq!(cluster.url, format!("redis-cluster://{}", cluster.seeds[0]));

    // Every seed, so the client can resync whichever node dies.
    let hosts: Vec<(String, u16)> = cluster
        .ports
        .iter()
        .map(|&p| ("127.0.0.1".into(), p))
        .collect();
    let config = Config {
        server: ServerConfig::new_clustered(hosts),
        ..Config::default()
    };
    let c = client(config).await;
    // The one-seed URL works too.
    let by_url = client(Config::from_url(&cluster.url).unwrap()).await;

    let keys = ["q:{tenant-a}:1", "q:{tenant-a}:2", "q:{tenant-a}:3"];
    let slot = key_slot(keys[0]);
    for k in &keys {
        assert_eq!(key_slot(k), slot);
        let _: () = c.set(*k, "before", None, None, false).await.unwrap();
    }
    let n: i64 = by_url.incr(keys[0].replace(":1", ":n")).await.unwrap();
    assert_eq!(n, 1);
    // Make sure the replica has the writes before the master dies.
    let acked: i64 = c
        .custom(
            CustomCommand::new_static("WAIT", Some(slot), false),
            vec![1, 5000],
        )
        .await
        .unwrap();
    assert_eq!(acked, 1, "the replica acknowledged the writes");

    let old = cluster.master_for_slot(slot).await;
    assert!(cluster.ports.contains(&old));
    cluster.kill9_port(old).await;
    let t = Instant::now();
    let new = cluster.wait_failover(slot, old).await;
    eprintln!(
        "failover of slot {slot}: {old} -> {new} in {:?}",
        t.elapsed()
    );
    assert_ne!(new, old);
    assert_eq!(cluster.master_for_slot(slot).await, new);

    let t = Instant::now();
    for k in &keys {
        let (v, attempts) = retry("get after failover", || c.get::<Option<String>, _>(*k)).await;
        eprintln!("get {k} after failover: {attempts} attempt(s)");
        assert_eq!(v.as_deref(), Some("before"), "{k} survived the failover");
    }
    let (_, attempts) = retry("set after failover", || {
        c.set::<(), _, _>(keys[0], "after", None, None, false)
    })
    .await;
    eprintln!(
        "set after failover: {attempts} attempt(s); client caught up in {:?}",
        t.elapsed()
    );
    let v: Option<String> = c.get(keys[0]).await.unwrap();
    assert_eq!(v.as_deref(), Some("after"));
    let (n, _) = retry("incr by the url client", || {
        by_url.incr::<i64, _>(keys[0].replace(":1", ":n"))
    })
    .await;
    assert_eq!(n, 2);

    // Dropping kills every node and removes the directory.
    let (ports, dir) = (cluster.ports.clone(), cluster.dir().to_path_buf());
    drop(cluster);
    assert!(!dir.exists(), "{} removed", dir.display());
    for port in ports {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "{port} closed"
        );
    }
}
