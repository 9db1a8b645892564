//! Access control: every Admin RPC tried without a token, with a wrong token and with a
//! token lacking the scope is refused, changes nothing, and the refusal is in the ledger;
//! an allowed change records the token's principal as its actor; a node with no tokens
//! creates an admin token instead of running open.

mod harness;

use allot_proto::v1 as pb;
use enforcer::auth::TokenFile;
use harness::Node;
use pb::admin_client::AdminClient;
use tonic::transport::Channel;
use tonic::{Code, Request};

fn with<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

/// Calls every Admin RPC with `token`; the status codes, in order.
async fn every_admin_rpc(a: &mut AdminClient<Channel>, token: Option<&str>) -> Vec<Code> {
    let code = |r: Result<(), tonic::Status>| r.map_or_else(|s| s.code(), |_| Code::Ok);
    let put = pb::PutSubscriptionRequest {
        tenant: "acme".into(),
        plan: "pro".into(),
        actor: "mallory".into(),
        ..Default::default()
    };
    let grant = pb::GrantOverrideRequest {
        tenant: "acme".into(),
        kind: "enable_feature".into(),
        feature: "sso".into(),
        actor: "mallory".into(),
        reason: "free stuff".into(),
        ..Default::default()
    };
    vec![
        code(
            a.apply_catalog(with(
                pb::ApplyCatalogRequest {
                    yaml: "version: 1".into(),
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        ),
        code(
            a.get_catalog(with(pb::GetCatalogRequest {}, token))
                .await
                .map(drop),
        ),
        code(a.put_subscription(with(put, token)).await.map(drop)),
        code(
            a.change_subscription(with(
                pb::ChangeSubscriptionRequest {
                    tenant: "acme".into(),
                    plan: "free".into(),
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        ),
        code(
            a.cancel_subscription(with(
                pb::CancelSubscriptionRequest {
                    tenant: "acme".into(),
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        ),
        code(a.grant_override(with(grant, token)).await.map(drop)),
        code(
            a.revoke_override(with(
                pb::RevokeOverrideRequest {
                    tenant: "acme".into(),
                    id: "o1".into(),
                    actor: "mallory".into(),
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        ),
        code(
            a.get_tenant(with(
                pb::GetTenantRequest {
                    tenant: "acme".into(),
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        ),
        code(
            a.get_peers(with(pb::GetPeersRequest {}, token))
                .await
                .map(drop),
        ),
        code(
            a.get_tenant_history(with(
                pb::GetTenantHistoryRequest {
                    tenant: "acme".into(),
                    limit: 0,
                },
                token,
            ))
            .await
            .map(drop),
        ),
        // Refused before the node looks at it (it has no Stripe configuration either).
        code(
            a.reconcile_provider(with(
                pb::ReconcileProviderRequest {
                    provider: "stripe".into(),
                    state: b"[]".to_vec(),
                    repair: true,
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        ),
    ]
}

#[tokio::test]
async fn admin_rpcs_need_a_token_with_the_scope() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let tokens = data.join("tokens.toml");
    let ada = TokenFile::add(&tokens, "ada@example.com", &["admin".into()]).unwrap();
    let sam = TokenFile::add(&tokens, "sam@example.com", &["support:read".into()]).unwrap();
    let eve = TokenFile::add(&tokens, "edge-service", &["enforce".into()]).unwrap();
    let node = Node::builder().with_auth().data_dir(&data).start().await;
    let mut admin = node.admin().await;

    // The admin subscribes acme; the actor is the token's principal, not what the
    // request claims.
    admin
        .put_subscription(with(
            pb::PutSubscriptionRequest {
                tenant: "acme".into(),
                plan: "free".into(),
                actor: "mallory".into(),
                reason: "signup".into(),
                ..Default::default()
            },
            Some(&ada),
        ))
        .await
        .unwrap();
    let state = |a: &mut AdminClient<Channel>| {
        let mut a = a.clone();
        let ada = ada.clone();
        async move {
            let t = a
                .get_tenant(with(
                    pb::GetTenantRequest {
                        tenant: "acme".into(),
                        ..Default::default()
                    },
                    Some(&ada),
                ))
                .await
                .unwrap()
                .into_inner();
            let c = a
                .get_catalog(with(pb::GetCatalogRequest {}, Some(&ada)))
                .await
                .unwrap()
                .into_inner();
            (format!("{:?}", t.subscription), t.overrides.len(), c.yaml)
        }
    };
    let before = state(&mut admin).await;

    use Code::{PermissionDenied as Denied, Unauthenticated as Unauth};
    assert_eq!(every_admin_rpc(&mut admin, None).await, vec![Unauth; 11]);
    assert_eq!(
        every_admin_rpc(&mut admin, Some("al_not_a_token")).await,
        vec![Unauth; 11]
    );
    assert_eq!(
        every_admin_rpc(&mut admin, Some(&eve)).await,
        vec![Denied; 11]
    );
    // Support reads, and only reads.
    let support = every_admin_rpc(&mut admin, Some(&sam)).await;
    assert_eq!(
        support,
        vec![
            Denied,
            Code::Ok,
            Denied,
            Denied,
            Denied,
            Denied,
            Denied,
            Code::Ok,
            Code::Ok,
            Code::Ok,
            Denied
        ]
    );
    assert_eq!(
        state(&mut admin).await,
        before,
        "a refused call changed something"
    );

    // Every refusal is audited: 11 + 11 + 11 + 7, with who and what was called.
    let mut audit = Vec::new();
    for _ in 0..600 {
        audit = admin
            .get_tenant_history(with(
                pb::GetTenantHistoryRequest {
                    tenant: String::new(),
                    limit: 1000,
                },
                Some(&sam),
            ))
            .await
            .unwrap()
            .into_inner()
            .entries
            .into_iter()
            .filter(|e| e.action == "access.denied")
            .collect::<Vec<_>>();
        if audit.len() >= 40 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(audit.len(), 40);
    assert!(audit.iter().all(|e| !e.applied));
    let by = |who: &str| audit.iter().filter(|e| e.actor == who).count();
    assert_eq!(
        (by("anonymous"), by("edge-service"), by("sam@example.com")),
        (22, 11, 7)
    );
    assert!(audit
        .iter()
        .any(|e| e.correlation_id == "/allot.v1.Admin/PutSubscription"
            && e.reason.contains("needs scope admin")));

    let h = admin
        .get_tenant_history(with(
            pb::GetTenantHistoryRequest {
                tenant: "acme".into(),
                limit: 10,
            },
            Some(&ada),
        ))
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(h.len(), 1, "only the admin's change: {h:?}");
    assert_eq!(h[0].actor, "ada@example.com (for mallory)");

    // Enforcement needs `enforce`; health needs nothing.
    let mut e = node.enforcer().await;
    let check = || pb::CheckRequest {
        tenant: "acme".into(),
        feature: "sso".into(),
        ..Default::default()
    };
    assert_eq!(
        e.check(with(check(), Some(&sam))).await.unwrap_err().code(),
        Denied
    );
    assert_eq!(
        e.check(with(check(), None)).await.unwrap_err().code(),
        Unauth
    );
    e.check(with(check(), Some(&eve))).await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        Channel::from_shared(node.endpoint.clone())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();

    // As a user: the CLI with --token, and without.
    let (code, _, err) = node.cli(&["tenant", "show", "acme", "--no-usage"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("unauthenticated: no token"), "{err}");
    let (code, out, err) = node
        .cli(&["tenant", "show", "acme", "--no-usage", "--token", &sam])
        .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("free"), "{out}");
}

#[tokio::test]
async fn a_node_without_tokens_makes_an_admin_token_instead_of_running_open() {
    let node = Node::builder().with_auth().start().await;
    let r = node
        .admin()
        .await
        .get_catalog(pb::GetCatalogRequest {})
        .await
        .unwrap_err();
    assert_eq!(r.code(), Code::Unauthenticated);
    // (Answered: the node is serving, so it has made its token file.)
    let file = TokenFile::read(&node.data_dir.join("tokens.toml")).unwrap();
    assert_eq!(file.token.len(), 1);
    assert_eq!(file.token[0].scopes, ["admin"]);
    // A token made later with the CLI works without a restart.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_allot"))
        .args([
            "token",
            "create",
            "--principal",
            "ops",
            "--scope",
            "support:read",
            "--data-dir",
        ])
        .arg(&node.data_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mut ok = false;
    for _ in 0..600 {
        let r = node
            .admin()
            .await
            .get_catalog(with(pb::GetCatalogRequest {}, Some(&token)))
            .await;
        if r.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ok, "the new token was never accepted");
}
