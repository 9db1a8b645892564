//! The README's tour, run as a user would: the `allot` CLI against a real node.

mod harness;

use harness::Node;

/// Asserts the command succeeded and parses its JSON output.
fn json(r: (i32, String, String)) -> serde_json::Value {
    assert_eq!(r.0, 0, "stdout: {}\nstderr: {}", r.1, r.2);
    serde_json::from_str(&r.1).unwrap()
}

#[tokio::test]
async fn readme_tour_works() {
    let node = Node::builder().start().await;
    let ok = |r: &(i32, String, String)| assert_eq!(r.0, 0, "stdout: {}\nstderr: {}", r.1, r.2);

    let r = node
        .cli(&[
            "subscribe",
            "--tenant",
            "acme",
            "--plan",
            "free",
            "--time-zone",
            "Europe/Paris",
        ])
        .await;
    ok(&r);
    assert!(r.1.contains("free@1"), "{}", r.1);

    let r = node
        .cli(&[
            "check",
            "--tenant",
            "acme",
            "--feature",
            "advanced_analytics",
        ])
        .await;
    assert_eq!(r.0, 1, "check exits 1 on DENY: {r:?}");
    assert!(
        r.1.contains("feature_not_in_plan") && r.1.contains("pro@1"),
        "{}",
        r.1
    );

    // Twice the same reserve: the second is the first answer again.
    let reserve_req1 = [
        "--json",
        "reserve",
        "--tenant",
        "acme",
        "--metric",
        "api_calls",
        "--amount",
        "5",
        "--key",
        "req-1",
    ];
    let v = json(node.cli(&reserve_req1).await);
    let id = v["reservation_id"].as_str().unwrap().to_string();
    assert_eq!(v["decision"]["outcome"], "ALLOW");

    let r = node
        .cli(&[
            "commit",
            "--tenant",
            "acme",
            "--reservation",
            &id,
            "--amount",
            "3",
        ])
        .await;
    ok(&r);
    let v = json(node.cli(&reserve_req1).await);
    assert_eq!(
        (v["replayed"].as_bool(), v["reservation_id"].as_str()),
        (Some(true), Some(id.as_str()))
    );

    ok(&node
        .cli(&[
            "record", "--tenant", "acme", "--metric", "seats", "--amount", "2",
        ])
        .await);
    ok(&node
        .cli(&[
            "record", "--tenant", "acme", "--metric", "seats", "--amount", "-1",
        ])
        .await);

    let v = json(
        node.cli(&[
            "--json",
            "usage",
            "--tenant",
            "acme",
            "--metric",
            "api_calls",
        ])
        .await,
    );
    let month = v["windows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["window"] == "month")
        .unwrap()
        .clone();
    assert_eq!(
        (month["used"].as_u64(), month["reserved"].as_u64()),
        (Some(3), Some(0))
    );

    let r = node
        .cli(&[
            "grant",
            "--tenant",
            "acme",
            "--kind",
            "extra_units",
            "--metric",
            "api_calls",
            "--amount",
            "10000",
            "--for",
            "48h",
            "--actor",
            "support@example.com",
            "--reason",
            "incident goodwill",
        ])
        .await;
    ok(&r);
    let r = node.cli(&["tenant", "show", "acme"]).await;
    ok(&r);
    assert!(
        r.1.contains("20000") && r.1.contains("incident goodwill"),
        "{}",
        r.1
    );

    ok(&node
        .cli(&[
            "subscription",
            "change",
            "--tenant",
            "acme",
            "--plan",
            "pro",
        ])
        .await);
    let r = node
        .cli(&[
            "check",
            "--tenant",
            "acme",
            "--feature",
            "advanced_analytics",
        ])
        .await;
    ok(&r);
    let r = node.cli(&["catalog", "show"]).await;
    ok(&r);
    assert!(r.1.contains("travel_pro"));

    // The audit trail of everything above, oldest first.
    let h = json(node.cli(&["tenant", "history", "acme", "--json"]).await);
    let actions: Vec<&str> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["subscription.put", "override.grant", "subscription.change"]
    );
    assert_eq!(h[1]["actor"], "support@example.com");
    assert_eq!(h[1]["reason"], "incident goodwill");
    assert_eq!(h[2]["before"]["plan"]["code"], "free");
    assert_eq!(h[2]["after"]["plan"]["code"], "pro");
    let r = node.cli(&["tenant", "history", "acme"]).await;
    ok(&r);

    assert!(
        r.1.contains("override.grant") && r.1.contains("incident goodwill"),
        "{}",
        r.1
    );

    // A refused record shows in the support view, with its reason.
    let r = node
        .cli(&[
            "record", "--tenant", "acme", "--metric", "seats", "--amount", "100",
        ])
        .await;
    ok(&r);
    let v = json(
        node.cli(&["tenant", "show", "acme", "--json", "--no-usage"])
            .await,
    );
    let d = &v["recent_denials"][0];
    assert_eq!(
        (d["request"].as_str(), d["metric"].as_str()),
        (Some("record"), Some("seats"))
    );
    assert_eq!(d["amount"], 100);
    assert!(
        d["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty() && r != "ok"),
        "{d}"
    );

    // Errors: a clear line on stderr and a failing exit code.
    let r = node
        .cli(&[
            "reserve",
            "--tenant",
            "acme",
            "--metric",
            "api_calls",
            "--amount",
            "0",
        ])
        .await;
    assert_ne!(r.0, 0);
    assert!(r.2.contains("amount: must be positive"), "{}", r.2);
    let r = node
        .cli(&["usage", "--tenant", "nobody", "--metric", "api_calls"])
        .await;
    assert_ne!(r.0, 0);
    assert!(r.2.contains("tenant: unknown tenant"), "{}", r.2);
}

#[tokio::test]
async fn unreachable_node_is_named() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_allot"))
        .args([
            "--endpoint",
            "http://127.0.0.1:1",
            "usage",
            "--tenant",
            "a",
            "--metric",
            "b",
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("http://127.0.0.1:1"), "{err}");
}

#[tokio::test]
async fn serve_refuses_a_malformed_catalog_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "version: 1\nmetrics: {a: {unit: x}}\nplans: {p: {versions: {1: {limits: {a: [{window: month, amount: -1}]}}}}}\n").unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_allot"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--catalog")
        .arg(&bad)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("plans.p.versions.1.limits.a[0].amount: must not be negative"),
        "{err}"
    );

    let cfg = dir.path().join("allot.toml");
    std::fs::write(&cfg, "lisen = \"127.0.0.1:0\"\n").unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_allot"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `lisen`"));
}
