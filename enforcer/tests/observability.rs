//! What a node tells its operators over `--http-listen`: Prometheus metrics that count
//! what it did, liveness, and readiness that follows its backends.

mod harness;

use harness::redis::RedisServer;
use harness::{free_port, http, record, subscribe, Node};

const CATALOG: &str = "version: 1
metrics:
  calls: { unit: call }
plans:
  tiny:
    versions:
      1:
        limits:
          calls: [{ window: day, amount: 3, on_backend_failure: fail_closed }]
";

/// The value of one series (`name{labels}`), summed over the series whose labels include
/// every pair given.
fn value(scrape: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| v.parse::<f64>().ok())?
        })
        .sum()
}

async fn node_with_http(extra: &[&str]) -> (Node, String) {
    let port = free_port();
    let mut b = Node::builder()
        .catalog(CATALOG)
        .arg("--http-listen")
        .arg(&format!("127.0.0.1:{port}"));
    for a in extra {
        b = b.arg(a);
    }
    (b.start().await, format!("http://127.0.0.1:{port}"))
}

#[tokio::test]
async fn metrics_count_decisions_calls_and_cache_lookups() {
    let (node, base) = node_with_http(&[]).await;
    subscribe(&mut node.admin().await, "acme", "tiny").await;
    let mut e = node.enforcer().await;
    for i in 0..5 {
        e.record(record("acme", "calls", 1, &format!("ev{i}")))
            .await
            .unwrap();
    }
    // A refused call: an unknown tenant.
    e.record(record("nobody", "calls", 1, "ev-x"))
        .await
        .unwrap_err();

    let (status, scrape) = http("GET", &format!("{base}/metrics"), &[], b"").await;
    assert_eq!(status, 200);
    let decisions = |outcome| {
        value(
            &scrape,
            "allot_decisions_total",
            &[("op", "record"), ("outcome", outcome)],
        )
    };
    assert_eq!(
        decisions("allow") + decisions("allow_with_warning"),
        3.0,
        "{scrape}"
    );
    assert_eq!(decisions("deny"), 2.0);
    assert_eq!(
        value(
            &scrape,
            "allot_decisions_total",
            &[("outcome", "deny"), ("reason", "limit_exceeded")]
        ),
        2.0
    );
    let record_calls = |code| {
        value(
            &scrape,
            "allot_rpc_duration_seconds_count",
            &[("method", "/allot.v1.Enforcer/Record"), ("code", code)],
        )
    };
    assert_eq!(record_calls("0"), 5.0, "{scrape}");
    assert_eq!(record_calls("5"), 1.0, "NOT_FOUND for the unknown tenant");
    let cache = |r| value(&scrape, "allot_entitlement_cache_total", &[("result", r)]);
    assert!(cache("hit") >= 4.0 && cache("miss") >= 1.0, "{scrape}");
    assert!(scrape.contains("# HELP allot_decisions_total"));
    assert_eq!(value(&scrape, "allot_reservations_outstanding", &[]), 0.0);

    assert_eq!(
        http("GET", &format!("{base}/healthz"), &[], b"").await.0,
        200
    );
    let (status, body) = http("GET", &format!("{base}/readyz"), &[], b"").await;
    assert_eq!(status, 200, "{body}");
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["checks"]["catalog"], true);
    assert_eq!(r["checks"]["disk"], true);
    assert!(
        r["checks"].get("redis").is_none(),
        "embedded: no Redis check"
    );
}

#[tokio::test]
async fn readiness_follows_redis_and_scripts_are_timed() {
    let mut redis = RedisServer::start().await;
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let (node, base) = node_with_http(&["--redis", &url]).await;
    subscribe(&mut node.admin().await, "acme", "tiny").await;
    let mut e = node.enforcer().await;
    e.record(record("acme", "calls", 1, "ev1")).await.unwrap();
    let ready = || async { http("GET", &format!("{base}/readyz"), &[], b"").await };
    assert_eq!(ready().await.0, 200);
    let (_, scrape) = http("GET", &format!("{base}/metrics"), &[], b"").await;
    assert!(
        value(
            &scrape,
            "allot_redis_script_duration_seconds_count",
            &[("script", "record")]
        ) >= 1.0,
        "{scrape}"
    );
    assert_eq!(value(&scrape, "allot_backend_up", &[]), 1.0);
    assert_eq!(value(&scrape, "allot_redis_script_errors_total", &[]), 0.0);

    // Redis hangs: the write gets no answer within the backend deadline, is in doubt, and
    // counts as a script error (the call was given up, it never returned one).
    redis.freeze().await;
    let s = e
        .record(record("acme", "calls", 1, "ev-hung"))
        .await
        .unwrap_err();
    assert!(harness::in_doubt(&s), "{s}");
    let (_, scrape) = http("GET", &format!("{base}/metrics"), &[], b"").await;
    assert_eq!(
        value(
            &scrape,
            "allot_redis_script_errors_total",
            &[("script", "record")]
        ),
        1.0,
        "{scrape}"
    );
    redis.thaw().await;

    // Redis goes away: the next request is in doubt (a write that got no answer) or
    // fails closed, and the node says it is not ready.
    redis.kill9().await;
    match e.record(record("acme", "calls", 1, "ev2")).await {
        Ok(d) => assert_eq!(
            harness::outcome(&d.into_inner().decision),
            allot_proto::v1::Outcome::Deny
        ),
        Err(s) => assert!(harness::in_doubt(&s), "{s}"),
    }
    let (status, body) = ready().await;
    assert_eq!(status, 503, "{body}");
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["failing"], serde_json::json!(["redis"]));
    let (_, scrape) = http("GET", &format!("{base}/metrics"), &[], b"").await;
    assert_eq!(value(&scrape, "allot_backend_up", &[]), 0.0);
    assert!(value(&scrape, "allot_redis_script_errors_total", &[]) >= 1.0);

    // Back: ready again once a request gets through.
    redis.restart().await;
    let mut back = false;
    for i in 0..100 {
        let _ = e
            .record(record("acme", "calls", 1, &format!("ev-back{i}")))
            .await;
        if ready().await.0 == 200 {
            back = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(back, "the node never became ready again");
}
