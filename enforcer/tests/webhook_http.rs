//! Recorded Stripe deliveries (tests/fixtures/stripe/) posted over HTTP to real nodes
//! (`allot serve --http-listen … --stripe-config …`): each ends in the documented answer
//! and state, and the ledger says why. `stripe_webhooks.rs` covers the adapter and the fold
//! without HTTP; this covers the endpoint, the stored sync state and the audit trail.

mod harness;

use allot_proto::v1 as pb;
use enforcer::webhook::stripe::sign;
use harness::redis::RedisServer;
use harness::{free_port, Node};

const SECRET: &str = "whsec_test_allot_0123456789";

const CONFIG: &str = r#"
signing_secret = "whsec_test_allot_0123456789"
[prices]
price_1QhProMonthly = { plan = "pro", version = 1 }
price_1QhSeats10 = { addon = "extra_seats_10" }
[products]
prod_QhEnterprise = { plan = "enterprise", version = 1 }
"#;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/stripe/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A node with the webhook endpoint, and where to post.
struct Hooked {
    node: Node,
    url: String,
    _dir: tempfile::TempDir,
}

async fn hooked(extra: &[&str]) -> Hooked {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("stripe.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let port = free_port();
    let mut b = Node::builder()
        .arg("--http-listen")
        .arg(&format!("127.0.0.1:{port}"))
        .arg("--stripe-config")
        .arg(config.to_str().unwrap());
    for a in extra {
        b = b.arg(a);
    }
    Hooked {
        node: b.start().await,
        url: format!("http://127.0.0.1:{port}/webhooks/stripe"),
        _dir: dir,
    }
}

/// Posts a body with a signature header; returns the status and the JSON answer.
async fn post(url: &str, body: &[u8], signature: &str) -> (u16, serde_json::Value) {
    let (status, text) = harness::http(
        "POST",
        url,
        &[
            ("content-type", "application/json"),
            ("stripe-signature", signature),
        ],
        body,
    )
    .await;
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (status, json)
}

/// Delivers a fixture as Stripe does now: signed with the current time.
async fn deliver(url: &str, name: &str) -> (u16, serde_json::Value) {
    let body = fixture(name);
    post(url, &body, &sign(&body, SECRET.as_bytes(), now())).await
}

async fn subscription(node: &Node, tenant: &str) -> pb::Subscription {
    node.admin()
        .await
        .get_tenant(pb::GetTenantRequest {
            tenant: tenant.into(),
            at: None,
        })
        .await
        .unwrap()
        .into_inner()
        .subscription
        .unwrap()
}

async fn tenant_status(node: &Node, tenant: &str) -> String {
    subscription(node, tenant).await.status
}

async fn history(node: &Node, tenant: &str) -> Vec<pb::LedgerEntry> {
    node.admin()
        .await
        .get_tenant_history(pb::GetTenantHistoryRequest {
            tenant: tenant.into(),
            limit: 100,
        })
        .await
        .unwrap()
        .into_inner()
        .entries
}

fn verdict(answer: &serde_json::Value) -> &str {
    answer["verdict"].as_str().unwrap_or("")
}

#[tokio::test]
async fn deliveries_over_http_end_in_the_documented_states_and_the_ledger_says_why() {
    let h = hooked(&[]).await;
    let url = h.url.as_str();

    // Unknown type: acknowledged, ignored, recorded provider-wide.
    let (code, a) = deliver(url, "customer_created").await;
    assert_eq!((code, verdict(&a)), (200, "ignored"), "{a}");

    // A refund whose invoice has not arrived: Stripe must redeliver later.
    let (code, a) = deliver(url, "charge_refunded").await;
    assert_eq!(code, 503, "{a}");
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .contains("no subscription known yet"),
        "{a}"
    );

    // Updated before created: the update creates the tenant's subscription; the creation
    // and the first payment arrive late and are folded in their place (they date the plan
    // and the status from their own instants), leaving it active.
    let (code, a) = deliver(url, "subscription_updated_active").await;
    assert_eq!(
        (code, verdict(&a), &a["changed"]),
        (200, "applied", &true.into()),
        "{a}"
    );
    assert_eq!(a["tenant"], "acme");
    assert_eq!(tenant_status(&h.node, "acme").await, "active");
    for f in ["subscription_created", "invoice_paid"] {
        let (code, a) = deliver(url, f).await;
        assert_eq!(code, 200, "{a}");
        let reason = a["reason"].as_str().unwrap();
        assert!(reason.contains("delivered after newer events"), "{f}: {a}");
        assert_eq!(tenant_status(&h.node, "acme").await, "active");
    }

    // A duplicate: nothing changes, and the redelivery is on the record.
    let (code, a) = deliver(url, "invoice_paid").await;
    assert_eq!((code, verdict(&a)), (200, "duplicate"), "{a}");

    // A bad signature, and a replay outside the tolerance: refused before reading.
    let body = fixture("invoice_payment_failed");
    let (code, a) = post(url, &body, &sign(&body, b"whsec_someone_else", now())).await;
    assert_eq!(code, 400, "{a}");
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .contains("no v1 signature matches"),
        "{a}"
    );
    let (code, a) = post(url, &body, &sign(&body, SECRET.as_bytes(), now() - 600)).await;
    assert_eq!(code, 400, "{a}");
    assert!(
        a["error"].as_str().unwrap().contains("at most 300 s"),
        "{a}"
    );
    let (code, _) = post(url, &body, "").await;
    assert_eq!(code, 400);
    // Over the size limit, even correctly signed: refused unread, with no entry (the
    // provider-wide trail below holds the three refusals above only).
    let mut huge = body.clone();
    huge.resize(enforcer::webhook::http::MAX_BODY + 1, b' ');
    let (code, _) = post(url, &huge, &sign(&huge, SECRET.as_bytes(), now())).await;
    assert_eq!(code, 413);
    assert_eq!(
        tenant_status(&h.node, "acme").await,
        "active",
        "nothing applied"
    );

    // Canceled before paid: the late payment cannot reopen it.
    for f in [
        "invoice_payment_failed",
        "subscription_updated_past_due",
        "subscription_updated_unpaid",
    ] {
        let (code, a) = deliver(url, f).await;
        assert_eq!(code, 200, "{f}: {a}");
    }
    let (_, a) = deliver(url, "subscription_deleted").await;
    assert_eq!(verdict(&a), "applied", "{a}");
    assert_eq!(tenant_status(&h.node, "acme").await, "canceled");
    let (_, a) = deliver(url, "invoice_paid_late").await;
    assert_eq!(verdict(&a), "stale", "{a}");
    assert_eq!(tenant_status(&h.node, "acme").await, "canceled");

    // The refund, redelivered now that its invoice linked the charge: refunded.
    let (code, a) = deliver(url, "charge_refunded").await;
    assert_eq!((code, verdict(&a)), (200, "applied"), "{a}");
    assert_eq!(tenant_status(&h.node, "acme").await, "refunded");

    // The tenant's trail: one entry per delivery about it, in order, with the event id as
    // correlation id, the provider as actor, and why.
    let trail = history(&h.node, "acme").await;
    let seen: Vec<(&str, &str, bool)> = trail
        .iter()
        .map(|e| (e.action.as_str(), e.correlation_id.as_str(), e.applied))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("stripe.applied", "evt_1QhActive000001", true),
            ("stripe.applied", "evt_1QhCreated000001", true),
            ("stripe.applied", "evt_1QhInvPaid000001", true),
            ("stripe.duplicate", "evt_1QhInvPaid000001", false),
            ("stripe.applied", "evt_1QhInvFail000002", true),
            ("stripe.no_effect", "evt_1QhPastDue00002", false),
            ("stripe.applied", "evt_1QhUnpaid000002", true),
            ("stripe.applied", "evt_1QhDeleted00001", true),
            ("stripe.stale", "evt_1QhInvPaid000002", false),
            ("stripe.applied", "evt_1QhRefund000001", true),
        ],
        "{trail:#?}"
    );
    assert!(trail
        .iter()
        .all(|e| e.source == "webhook" && e.actor == "stripe"));
    let dup = &trail[3];
    assert!(dup.reason.contains("duplicate delivery"), "{}", dup.reason);
    let deleted = &trail[7];
    assert!(deleted.reason.contains("-> canceled"), "{}", deleted.reason);
    assert!(deleted.before.contains("\"grace\"") && deleted.after.contains("\"canceled\""));

    // Provider-wide: the ignored type and the three refused deliveries.
    let wide: Vec<(String, bool)> = history(&h.node, "")
        .await
        .into_iter()
        .filter(|e| e.source == "webhook")
        .map(|e| (e.action, e.applied))
        .collect();
    assert_eq!(
        wide,
        vec![
            ("stripe.ignored".to_string(), false),
            ("stripe.refused".to_string(), false),
            ("stripe.refused".to_string(), false),
            ("stripe.refused".to_string(), false),
        ]
    );
}

#[tokio::test]
async fn a_change_made_by_support_stays_when_the_provider_changes_something_else() {
    let h = hooked(&[]).await;
    for f in ["subscription_created", "invoice_paid"] {
        assert_eq!(deliver(&h.url, f).await.0, 200);
    }
    // Support moves acme to enterprise, in Paris time (the provider knows no time zone).
    let (code, _, err) = h
        .node
        .cli(&[
            "subscribe",
            "--tenant",
            "acme",
            "--plan",
            "enterprise",
            "--time-zone",
            "Europe/Paris",
            "--reason",
            "customer is in Paris",
        ])
        .await;
    assert_eq!(code, 0, "{err}");
    let (_, a) = deliver(&h.url, "invoice_payment_failed").await;
    assert_eq!(verdict(&a), "applied", "{a}");
    let sub = subscription(&h.node, "acme").await;
    // The provider changed the status only; support's plan and time zone stay.
    assert_eq!(
        (
            sub.status.as_str(),
            sub.plan.as_str(),
            sub.time_zone.as_str()
        ),
        ("past_due", "enterprise@1", "Europe/Paris")
    );
}

/// Two nodes on one Redis receive every delivery at once (as after a load balancer
/// retry): each event is applied once, and both answer.
#[tokio::test]
async fn two_nodes_receiving_the_same_deliveries_apply_each_once() {
    let redis = RedisServer::start().await;
    let url = format!("redis://127.0.0.1:{}", redis.port);
    // A slow Redis on a busy machine must not turn a delivery into a 503 (see nodes_on).
    let a = hooked(&[
        "--redis",
        &url,
        "--node-id",
        "a",
        "--backend-deadline",
        "5s",
    ])
    .await;
    let b = hooked(&[
        "--redis",
        &url,
        "--node-id",
        "b",
        "--backend-deadline",
        "5s",
    ])
    .await;
    for f in [
        "subscription_created",
        "invoice_paid",
        "invoice_payment_failed",
        "subscription_updated_past_due",
    ] {
        let body = fixture(f);
        let sig = sign(&body, SECRET.as_bytes(), now());
        let (ra, rb) = tokio::join!(post(&a.url, &body, &sig), post(&b.url, &body, &sig));
        assert_eq!((ra.0, rb.0), (200, 200), "{f}: {} / {}", ra.1, rb.1);
        let verdicts = [verdict(&ra.1), verdict(&rb.1)];
        assert!(
            verdicts.contains(&"duplicate")
                && verdicts.iter().filter(|v| **v == "duplicate").count() == 1,
            "{f}: exactly one node applies it: {verdicts:?}"
        );
    }
    assert_eq!(tenant_status(&a.node, "acme").await, "past_due");
    let trail = history(&b.node, "acme").await;
    let firsts = trail
        .iter()
        .filter(|e| e.action != "stripe.duplicate")
        .count();
    assert_eq!(firsts, 4, "{trail:#?}");
}

#[tokio::test]
async fn a_stripe_config_that_does_not_fit_the_catalog_stops_the_node_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("stripe.toml");
    std::fs::write(
        &config,
        CONFIG.replace("plan = \"pro\"", "plan = \"platinum\""),
    )
    .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_allot"))
        .args(["serve", "--listen", "127.0.0.1:0", "--insecure-no-auth"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--catalog")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/catalog.yaml"
        ))
        .arg("--http-listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--stripe-config")
        .arg(&config)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("stripe.toml")
            && err.contains("price_1QhProMonthly")
            && err.contains("platinum"),
        "{err}"
    );

    // And Stripe without an HTTP listener is a configuration error.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_allot"))
        .args(["serve", "--listen", "127.0.0.1:0", "--insecure-no-auth"])
        .arg("--stripe-config")
        .arg(&config)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("stripe_config") && err.contains("--http-listen"),
        "{err}"
    );
}

/// The `data.object` of a fixture: a Stripe subscription as the API lists it.
fn subscription_object(name: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(&fixture(name)).unwrap();
    v["data"]["object"].clone()
}

#[tokio::test]
async fn reconcile_reports_drift_and_repairs_it_on_request() {
    let h = hooked(&[]).await;
    for f in ["subscription_created", "invoice_paid"] {
        assert_eq!(deliver(&h.url, f).await.0, 200);
    }
    // Stripe now says: acme was canceled (the webhook never came), and globex has a
    // subscription Allot never heard of (its trial has ended since).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("subscriptions.json");
    let list = serde_json::json!({
        "object": "list",
        "data": [
            subscription_object("subscription_deleted"),
            subscription_object("subscription_trial_will_end"),
        ],
        "has_more": false,
    });
    std::fs::write(&file, list.to_string()).unwrap();
    let file = file.to_str().unwrap();

    let (code, out, err) = h.node.cli(&["reconcile", "--file", file]).await;
    assert_eq!(code, 1, "drift remains: {out}{err}");
    assert!(
        out.contains("2 provider subscriptions checked, 2 differ, 0 repaired"),
        "{out}"
    );
    let (_, json, _) = h.node.cli(&["--json", "reconcile", "--file", file]).await;
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    let fields = |i: usize| -> Vec<(String, String, String)> {
        report["drift"][i]["differences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["field"].as_str().unwrap().to_string(),
                    d["allot"].as_str().unwrap().to_string(),
                    d["provider"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    assert_eq!(report["drift"][0]["tenant"], "acme");
    assert!(
        fields(0).contains(&("status".into(), "active".into(), "canceled".into())),
        "{report:#}"
    );
    assert_eq!(report["drift"][1]["tenant"], "globex");
    assert_eq!(
        fields(1),
        vec![(
            "subscription".to_string(),
            "none".to_string(),
            "pro@1 active".to_string()
        )],
        "the trial ended in January: our clock makes it active"
    );
    assert_eq!(
        tenant_status(&h.node, "acme").await,
        "active",
        "report only"
    );

    let (code, out, err) = h
        .node
        .cli(&[
            "reconcile",
            "--file",
            file,
            "--repair",
            "--reason",
            "monthly check",
        ])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("2 differ, 2 repaired"), "{out}");
    assert_eq!(tenant_status(&h.node, "acme").await, "canceled");
    assert_eq!(tenant_status(&h.node, "globex").await, "active");
    let repair = history(&h.node, "acme")
        .await
        .into_iter()
        .find(|e| e.action == "reconcile.repair")
        .expect("the repair is on the record");
    assert!(repair.applied && repair.source == "admin");
    assert!(
        repair.reason.starts_with("monthly check")
            && repair.reason.contains("status active -> canceled"),
        "{}",
        repair.reason
    );

    // Matched now; and a file lacking globex names it as unknown to the provider.
    let (code, out, _) = h.node.cli(&["reconcile", "--file", file]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("2 provider subscriptions checked, 0 differ"),
        "{out}"
    );
    // Over gRPC's default 4 MiB (about a thousand real subscriptions): still one comparison.
    let mut padded = subscription_object("subscription_deleted");
    padded["metadata"]["notes"] = serde_json::json!("x".repeat(5 << 20));
    let big = dir.path().join("big.json");
    std::fs::write(
        &big,
        serde_json::json!([padded, subscription_object("subscription_trial_will_end")]).to_string(),
    )
    .unwrap();
    let (code, out, err) = h
        .node
        .cli(&["reconcile", "--file", big.to_str().unwrap()])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("2 provider subscriptions checked, 0 differ"),
        "{out}"
    );
    // Over what one message takes: refused before sending, naming the file and the limit.
    let huge = dir.path().join("huge.json");
    std::fs::write(&huge, vec![b' '; 65 << 20]).unwrap();
    let (code, _, err) = h
        .node
        .cli(&["reconcile", "--file", huge.to_str().unwrap()])
        .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("huge.json") && err.contains("64 MiB"), "{err}");
    let only_acme = dir.path().join("acme.json");
    std::fs::write(
        &only_acme,
        serde_json::json!([subscription_object("subscription_deleted")]).to_string(),
    )
    .unwrap();
    let (code, out, _) = h
        .node
        .cli(&["reconcile", "--file", only_acme.to_str().unwrap()])
        .await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("known to Allot but not in the file: sub_1QhGlobexTrial1"),
        "{out}"
    );

    // A file that does not map names the subscription and the field; nothing changes.
    let mut bad = subscription_object("subscription_deleted");
    bad["items"]["data"][0]["price"]["id"] = "price_unknown".into();
    bad["items"]["data"][0]["price"]["product"] = "prod_unknown".into();
    std::fs::write(&only_acme, serde_json::json!([bad]).to_string()).unwrap();
    let (code, _, err) = h
        .node
        .cli(&[
            "reconcile",
            "--repair",
            "--file",
            only_acme.to_str().unwrap(),
        ])
        .await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("state: data[0] (sub_1QhAcmePro0001)") && err.contains("price_unknown"),
        "{err}"
    );
}
