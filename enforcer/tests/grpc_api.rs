//! Every RPC of a real node, including bad input: each bad request gets INVALID_ARGUMENT
//! or NOT_FOUND naming the field, and changes nothing.

mod harness;

use allot_proto::v1 as pb;
use harness::{outcome, record, reserve, subscribe, window_usage, Node};

fn feature_check(tenant: &str, feature: &str) -> pb::CheckRequest {
    pb::CheckRequest {
        tenant: tenant.into(),
        feature: feature.into(),
        ..Default::default()
    }
}

fn metric_check(tenant: &str, metric: &str, amount: i64) -> pb::CheckRequest {
    pb::CheckRequest {
        tenant: tenant.into(),
        metric: metric.into(),
        amount,
        ..Default::default()
    }
}

fn status_change(tenant: &str, status: &str) -> pb::ChangeSubscriptionRequest {
    pb::ChangeSubscriptionRequest {
        tenant: tenant.into(),
        status: status.into(),
        ..Default::default()
    }
}
use tonic::Code;

fn assert_status<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, field: &str) {
    let s = r.expect_err("request must fail");
    assert_eq!(s.code(), code, "{s:?}");
    assert!(
        s.message().starts_with(&format!("{field}:")),
        "message {:?} should start with {field}:",
        s.message()
    );
}

#[tokio::test]
async fn enforcer_rpcs_round_trip() {
    let node = Node::builder().start().await;
    let mut admin = node.admin().await;
    let mut e = node.enforcer().await;
    subscribe(&mut admin, "acme", "free").await;
    subscribe(&mut admin, "initech", "pro").await;

    // Check a feature the plan lacks: denied, with upgrade options.
    let r = e
        .check(feature_check("acme", "advanced_analytics"))
        .await
        .unwrap()
        .into_inner();
    let d = r.decision.unwrap();
    assert_eq!(d.reason, "feature_not_in_plan");
    assert_eq!(
        d.upgrade
            .iter()
            .map(|u| u.code.as_str())
            .collect::<Vec<_>>(),
        vec!["pro", "enterprise"]
    );
    // A config value comes back.
    let r = e
        .check(feature_check("acme", "export_formats"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.value.unwrap().kind,
        Some(pb::value::Kind::ListValue(pb::StringList {
            items: vec!["csv".into()]
        }))
    );

    // Reserve → commit with refund.
    let res = e
        .reserve(reserve("initech", "api_calls", 10, "k1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&res.decision), pb::Outcome::Allow);
    assert!(!res.reservation_id.is_empty() && res.expires_at.is_some());
    assert_eq!(
        window_usage(&mut e, "initech", "api_calls", "month").await,
        (0, 10)
    );
    let c = e
        .commit(pb::CommitRequest {
            tenant: "initech".into(),
            reservation_id: res.reservation_id.clone(),
            actual_amount: 7,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (c.reserved, c.committed, c.refunded, c.replayed),
        (10, 7, 3, false)
    );
    assert_eq!(
        window_usage(&mut e, "initech", "api_calls", "month").await,
        (7, 0)
    );
    // Same commit again: replayed; different: refused.
    let again = e
        .commit(pb::CommitRequest {
            tenant: "initech".into(),
            reservation_id: res.reservation_id.clone(),
            actual_amount: 7,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed);
    let other = e
        .commit(pb::CommitRequest {
            tenant: "initech".into(),
            reservation_id: res.reservation_id.clone(),
            actual_amount: 8,
        })
        .await;
    assert_eq!(other.unwrap_err().code(), Code::FailedPrecondition);

    // A retried reserve returns the first answer.
    let again = e
        .reserve(reserve("initech", "api_calls", 10, "k1"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed);
    assert_eq!(again.reservation_id, res.reservation_id);

    // Release.
    let res2 = e
        .reserve(reserve("initech", "api_calls", 5, "k2"))
        .await
        .unwrap()
        .into_inner();
    let rel = e
        .release(pb::ReleaseRequest {
            tenant: "initech".into(),
            reservation_id: res2.reservation_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((rel.released, rel.replayed), (5, false));
    assert_eq!(
        window_usage(&mut e, "initech", "api_calls", "month").await,
        (7, 0)
    );

    // Record, deduplicated by event id; seats are a gauge.
    let r = e
        .record(record("initech", "seats", 2, "ev1"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.recorded && !r.replayed);
    let r = e
        .record(record("initech", "seats", 2, "ev1"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.recorded && r.replayed);
    e.record(record("initech", "seats", -1, "ev2"))
        .await
        .unwrap();
    assert_eq!(
        window_usage(&mut e, "initech", "seats", "none").await,
        (1, 0)
    );

    // Check headroom against the tightest window (travel_starter: 200 a day, no rate limit).
    subscribe(&mut admin, "agency", "travel_starter").await;
    e.record(record("agency", "quotations", 190, "q1"))
        .await
        .unwrap();
    let r = e
        .check(metric_check("agency", "quotations", 11))
        .await
        .unwrap()
        .into_inner();
    let d = r.decision.unwrap();
    assert_eq!(
        (
            d.reason.as_str(),
            d.window.as_str(),
            d.limit,
            d.used,
            d.remaining
        ),
        ("limit_exceeded", "day", Some(200), 190, Some(10))
    );
    assert!(d.resets_at.is_some());
    assert!(
        d.upgrade.iter().any(|u| u.code == "travel_pro"),
        "{:?}",
        d.upgrade
    );
    let r = e
        .check(metric_check("agency", "quotations", 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r.decision), pb::Outcome::AllowWithWarning);
    // Check consumed nothing.
    assert_eq!(
        window_usage(&mut e, "agency", "quotations", "day").await,
        (190, 0)
    );

    // Usage lists every window, rate ones included.
    let u = e
        .get_usage(pb::GetUsageRequest {
            tenant: "initech".into(),
            metric: "api_calls".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let windows: Vec<_> = u.windows.iter().map(|w| w.window.as_str()).collect();
    assert_eq!(windows, vec!["second", "month"]);
    assert_eq!(u.windows[1].remaining, 1_000_000 - 7);
}

#[tokio::test]
async fn rate_limits_and_caps_deny_with_reasons() {
    let node = Node::builder().start().await;
    let mut admin = node.admin().await;
    let mut e = node.enforcer().await;
    subscribe(&mut admin, "acme", "free").await;
    // Free: 5/s with a burst of 10. Eleven in a row pass only if they take over 200 ms
    // (a token comes back every 200 ms), so keep going until the bucket runs dry: calls
    // at least as fast as 5/s cannot go on passing.
    let mut denied = None;
    for i in 0..500 {
        let r = e
            .record(record("acme", "api_calls", 1, &format!("burst-{i}")))
            .await
            .unwrap()
            .into_inner();
        if !r.recorded {
            denied = r.decision;
            break;
        }
    }
    let d = denied.expect("the burst runs out");
    assert_eq!(d.reason, "rate_limited");
    assert!(d.retry_after.is_some());
    // More than the burst in one request can never pass.
    let r = e
        .record(record("acme", "api_calls", 11, "big"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision.unwrap().reason, "exceeds_burst");

    // Downgrade below current seats: existing stay, new ones refused with the reason.
    subscribe(&mut admin, "globex", "pro").await;
    e.record(record("globex", "seats", 5, "s1")).await.unwrap();
    admin
        .change_subscription(pb::ChangeSubscriptionRequest {
            tenant: "globex".into(),
            plan: "free".into(),
            timing: pb::ChangeTiming::Immediately as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    let r = e
        .record(record("globex", "seats", 1, "s2"))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.recorded);
    let d = r.decision.unwrap();
    assert_eq!(d.reason, "above_limit_after_downgrade");
    assert!(
        d.upgrade
            .iter()
            .any(|u| u.code == "extra_seats_10" || u.code == "pro"),
        "{:?}",
        d.upgrade
    );
    assert!(
        e.record(record("globex", "seats", -1, "s3"))
            .await
            .unwrap()
            .into_inner()
            .recorded
    );
    assert_eq!(
        window_usage(&mut e, "globex", "seats", "none").await,
        (4, 0)
    );
}

#[tokio::test]
async fn bad_input_names_the_field_and_changes_nothing() {
    let node = Node::builder().start().await;
    let mut admin = node.admin().await;
    let mut e = node.enforcer().await;
    subscribe(&mut admin, "acme", "pro").await;
    let big_key = "k".repeat(10 * 1024);

    assert_status(
        e.reserve(reserve("acme", "api_calls", -1, "k")).await,
        Code::InvalidArgument,
        "amount",
    );
    assert_status(
        e.reserve(reserve("acme", "api_calls", 0, "k")).await,
        Code::InvalidArgument,
        "amount",
    );
    assert_status(
        e.reserve(reserve("acme", "api_calls", i64::MAX, "k")).await,
        Code::InvalidArgument,
        "amount",
    );
    assert_status(
        e.reserve(reserve("acme", "api_calls", 1, "")).await,
        Code::InvalidArgument,
        "idempotency_key",
    );
    assert_status(
        e.reserve(reserve("acme", "api_calls", 1, &big_key)).await,
        Code::InvalidArgument,
        "idempotency_key",
    );
    assert_status(
        e.reserve(reserve("", "api_calls", 1, "k")).await,
        Code::InvalidArgument,
        "tenant",
    );
    assert_status(
        e.reserve(reserve(&big_key, "api_calls", 1, "k")).await,
        Code::InvalidArgument,
        "tenant",
    );
    assert_status(
        e.reserve(reserve("nobody", "api_calls", 1, "k")).await,
        Code::NotFound,
        "tenant",
    );
    assert_status(
        e.reserve(reserve("acme", "nope", 1, "k")).await,
        Code::NotFound,
        "metric",
    );
    assert_status(
        e.reserve(reserve("acme", "", 1, "k")).await,
        Code::InvalidArgument,
        "metric",
    );
    let mut r = reserve("acme", "api_calls", 1, "k");
    r.ttl = Some(prost_types::Duration {
        seconds: 90_000,
        nanos: 0,
    });
    assert_status(e.reserve(r).await, Code::InvalidArgument, "ttl");
    let mut r = reserve("acme", "api_calls", 1, "k");
    r.dimensions.insert("api_key".into(), "has space".into());
    assert_status(
        e.reserve(r).await,
        Code::InvalidArgument,
        "dimensions.api_key",
    );

    assert_status(
        e.record(record("acme", "api_calls", -5, "ev")).await,
        Code::InvalidArgument,
        "amount",
    );
    assert_status(
        e.record(record("acme", "seats", -1, "ev")).await,
        Code::InvalidArgument,
        "amount",
    );
    assert_status(
        e.record(record("acme", "seats", i64::MIN, "ev")).await,
        Code::InvalidArgument,
        "amount",
    );
    assert_status(
        e.record(record("acme", "api_calls", 1, "")).await,
        Code::InvalidArgument,
        "event_id",
    );
    assert_status(
        e.record(record("acme", "api_calls", 1, &big_key)).await,
        Code::InvalidArgument,
        "event_id",
    );

    assert_status(
        e.commit(pb::CommitRequest {
            tenant: "acme".into(),
            reservation_id: "missing".into(),
            actual_amount: 1,
        })
        .await,
        Code::NotFound,
        "reservation_id",
    );
    assert_status(
        e.commit(pb::CommitRequest {
            tenant: "acme".into(),
            reservation_id: "".into(),
            actual_amount: 1,
        })
        .await,
        Code::InvalidArgument,
        "reservation_id",
    );
    let res = e
        .reserve(reserve("acme", "api_calls", 3, "held"))
        .await
        .unwrap()
        .into_inner();
    assert_status(
        e.commit(pb::CommitRequest {
            tenant: "acme".into(),
            reservation_id: res.reservation_id.clone(),
            actual_amount: -1,
        })
        .await,
        Code::InvalidArgument,
        "actual_amount",
    );
    assert_status(
        e.commit(pb::CommitRequest {
            tenant: "acme".into(),
            reservation_id: res.reservation_id.clone(),
            actual_amount: 4,
        })
        .await,
        Code::InvalidArgument,
        "actual_amount",
    );
    assert_status(
        e.release(pb::ReleaseRequest {
            tenant: "globex".into(),
            reservation_id: res.reservation_id.clone(),
        })
        .await,
        Code::NotFound,
        "reservation_id",
    );

    assert_status(
        e.check(feature_check("acme", "nope")).await,
        Code::NotFound,
        "feature",
    );
    assert_status(
        e.check(pb::CheckRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "feature",
    );
    assert_status(
        e.check(metric_check("acme", "api_calls", -1)).await,
        Code::InvalidArgument,
        "amount",
    );
    assert_status(
        e.get_usage(pb::GetUsageRequest {
            tenant: "acme".into(),
            metric: "nope".into(),
        })
        .await,
        Code::NotFound,
        "metric",
    );

    // Nothing moved: only the one valid reservation is held.
    assert_eq!(
        window_usage(&mut e, "acme", "api_calls", "month").await,
        (0, 3)
    );
    assert_eq!(window_usage(&mut e, "acme", "seats", "none").await, (0, 0));
}

#[tokio::test]
async fn admin_rpcs_and_their_bad_input() {
    let node = Node::builder().start().await;
    let mut admin = node.admin().await;
    let mut e = node.enforcer().await;

    let put = |tenant: &str, plan: &str, tz: &str| pb::PutSubscriptionRequest {
        tenant: tenant.into(),
        plan: plan.into(),
        time_zone: tz.into(),
        actor: "test".into(),
        ..Default::default()
    };
    assert_status(
        admin
            .put_subscription(put("acme", "pro", "Mars/Olympus"))
            .await,
        Code::InvalidArgument,
        "time_zone",
    );
    assert_status(
        admin.put_subscription(put("acme", "gold", "")).await,
        Code::NotFound,
        "plan",
    );
    assert_status(
        admin.put_subscription(put("acme", "", "")).await,
        Code::InvalidArgument,
        "plan",
    );
    assert_status(
        admin.put_subscription(put("a b", "pro", "")).await,
        Code::InvalidArgument,
        "tenant",
    );
    let mut with_bad_addon = put("acme", "free", "");
    with_bad_addon.addons.push(pb::AddonItem {
        code: "sso".into(),
        quantity: 1,
    });
    assert_status(
        admin.put_subscription(with_bad_addon).await,
        Code::InvalidArgument,
        "addons[0]",
    );
    // None of that created the tenant.
    assert_status(
        admin
            .get_tenant(pb::GetTenantRequest {
                tenant: "acme".into(),
                at: None,
            })
            .await,
        Code::NotFound,
        "tenant",
    );

    let sub = admin
        .put_subscription(put("acme", "pro", "Europe/Paris"))
        .await
        .unwrap()
        .into_inner()
        .subscription
        .unwrap();
    assert_eq!(
        (
            sub.plan.as_str(),
            sub.status.as_str(),
            sub.time_zone.as_str()
        ),
        ("pro@1", "active", "Europe/Paris")
    );

    // A grant of extra units applies at once, with provenance.
    let grant = pb::GrantOverrideRequest {
        tenant: "acme".into(),
        kind: "extra_units".into(),
        metric: "api_calls".into(),
        amount: 10_000,
        duration: Some(prost_types::Duration {
            seconds: 48 * 3600,
            nanos: 0,
        }),
        actor: "support@example.com".into(),
        reason: "incident goodwill".into(),
        ..Default::default()
    };
    let o = admin
        .grant_override(grant.clone())
        .await
        .unwrap()
        .into_inner()
        .r#override
        .unwrap();
    assert!(o.active && o.valid_to.is_some());
    let t = admin
        .get_tenant(pb::GetTenantRequest {
            tenant: "acme".into(),
            at: None,
        })
        .await
        .unwrap()
        .into_inner();
    let month = t
        .limits
        .iter()
        .find(|l| l.metric == "api_calls" && l.window == "month")
        .unwrap();
    assert_eq!(month.amount, 1_010_000);
    assert!(month
        .sources
        .iter()
        .any(|s| s.kind == "override" && s.r#ref == o.id));
    assert_eq!(t.access, "full");
    assert_eq!(t.overrides.len(), 1);

    let mut bad = grant.clone();
    bad.actor = String::new();
    assert_status(
        admin.grant_override(bad).await,
        Code::InvalidArgument,
        "actor",
    );
    let mut bad = grant.clone();
    bad.amount = -1;
    assert_status(
        admin.grant_override(bad).await,
        Code::InvalidArgument,
        "amount",
    );
    let mut bad = grant.clone();
    bad.kind = "free_money".into();
    assert_status(
        admin.grant_override(bad).await,
        Code::InvalidArgument,
        "kind",
    );
    let mut bad = grant.clone();
    bad.metric = "nope".into();
    assert_status(admin.grant_override(bad).await, Code::NotFound, "metric");
    let mut bad = grant.clone();
    bad.duration = Some(prost_types::Duration {
        seconds: 1_000_000_000_000_000,
        nanos: 0,
    });
    assert_status(
        admin.grant_override(bad).await,
        Code::InvalidArgument,
        "duration",
    );
    let mut bad = grant.clone();
    (bad.kind, bad.window, bad.amount) = ("set_limit".into(), "second".into(), 0);
    assert_status(
        admin.grant_override(bad).await,
        Code::InvalidArgument,
        "amount",
    );
    let mut dup = grant.clone();
    dup.id = o.id.clone();
    assert_eq!(
        admin.grant_override(dup).await.unwrap_err().code(),
        Code::AlreadyExists
    );

    let revoked = admin
        .revoke_override(pb::RevokeOverrideRequest {
            tenant: "acme".into(),
            id: o.id.clone(),
            actor: "support".into(),
            reason: "done".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoked);
    let t = admin
        .get_tenant(pb::GetTenantRequest {
            tenant: "acme".into(),
            at: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        t.limits
            .iter()
            .find(|l| l.metric == "api_calls" && l.window == "month")
            .unwrap()
            .amount,
        1_000_000
    );

    // Downgrade is scheduled at period end by default; upgrade applies now.
    let s = admin
        .change_subscription(pb::ChangeSubscriptionRequest {
            tenant: "acme".into(),
            plan: "free".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .subscription
        .unwrap();
    assert_eq!(
        (s.plan.as_str(), s.scheduled_plan.as_str()),
        ("pro@1", "free@1")
    );
    let s = admin
        .change_subscription(pb::ChangeSubscriptionRequest {
            tenant: "acme".into(),
            plan: "enterprise".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .subscription
        .unwrap();
    assert_eq!(
        (s.plan.as_str(), s.scheduled_plan.as_str()),
        ("enterprise@1", "")
    );
    assert_status(
        admin
            .change_subscription(status_change("acme", "zombie"))
            .await,
        Code::InvalidArgument,
        "status",
    );

    // Cancel now: access stops.
    admin
        .cancel_subscription(pb::CancelSubscriptionRequest {
            tenant: "acme".into(),
            at_period_end: false,
            actor: "test".into(),
            reason: "customer left".into(),
        })
        .await
        .unwrap();
    let r = e
        .check(feature_check("acme", "sso"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision.unwrap().reason, "subscription_inactive");
}

#[tokio::test]
async fn catalogs_are_validated_and_published_versions_immutable() {
    let node = Node::builder().start().await;
    let mut admin = node.admin().await;
    let apply = |yaml: String| pb::ApplyCatalogRequest {
        yaml,
        source_name: "new.yaml".into(),
        dry_run: false,
        actor: "test".into(),
        reason: String::new(),
    };
    let s = admin
        .apply_catalog(apply("version: 1\nmetrics: [".into()))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().starts_with("yaml: new.yaml:"),
        "{}",
        s.message()
    );
    let s = admin
        .apply_catalog(apply(
            "version: 1\nmetrics: {a: {unit: x}}\nplans: {p: {versions: {1: {limits: {b: []}}}}}\n"
                .into(),
        ))
        .await
        .unwrap_err();
    assert!(
        s.message()
            .contains("plans.p.versions.1.limits.b: unknown metric"),
        "{}",
        s.message()
    );

    let original = harness::example_catalog();
    let changed = original.replace("amount: 10000, warn_at", "amount: 20000, warn_at");
    assert_ne!(original, changed);
    let s = admin.apply_catalog(apply(changed)).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(
        s.message().contains("plans.free.versions.1"),
        "{}",
        s.message()
    );
    // Nothing changed: the catalog in force still says 10000.
    let yaml = admin
        .get_catalog(pb::GetCatalogRequest {})
        .await
        .unwrap()
        .into_inner()
        .yaml;
    assert!(yaml.contains("amount: 10000"));

    let r = admin
        .apply_catalog(apply(original))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.changed && !r.applied);
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let node = Node::builder().start().await;
    let channel = tonic::transport::Channel::from_shared(node.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "allot.v1.Enforcer", "allot.v1.Admin"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service}"
        );
    }
    let unknown = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "nope.v1.X".into(),
        })
        .await;
    assert_eq!(unknown.unwrap_err().code(), Code::NotFound);

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let channel = tonic::transport::Channel::from_shared(node.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([list]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(services)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("reflection did not list services");
    };
    let names: Vec<_> = services.service.iter().map(|s| s.name.as_str()).collect();
    assert!(
        names.contains(&"allot.v1.Enforcer") && names.contains(&"allot.v1.Admin"),
        "{names:?}"
    );
}

#[tokio::test]
async fn lifecycle_corner_cases_through_the_api() {
    let node = Node::builder().start().await;
    let mut admin = node.admin().await;
    let mut e = node.enforcer().await;
    subscribe(&mut admin, "acme", "pro").await;

    // Cancel at period end, then change one's mind: the cancellation is undone.
    // (Before the state machine this test canceled now and reactivated; canceled →
    // active is no edge any more, see below.)
    let s = admin
        .cancel_subscription(pb::CancelSubscriptionRequest {
            tenant: "acme".into(),
            at_period_end: true,
            actor: "t".into(),
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .subscription
        .unwrap();
    assert!(s.cancel_at.is_some());
    let s = admin
        .change_subscription(status_change("acme", "active"))
        .await
        .unwrap()
        .into_inner()
        .subscription
        .unwrap();
    assert!(s.cancel_at.is_none());
    let r = e
        .reserve(reserve("acme", "api_calls", 1, "after-reactivation"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r.decision), pb::Outcome::Allow);
    // Trialing needs a trial end.
    assert_status(
        admin
            .change_subscription(status_change("acme", "trialing"))
            .await,
        Code::InvalidArgument,
        "status",
    );

    // A reused idempotency key for another request is refused, naming the key.
    assert_status(
        e.reserve(reserve("acme", "api_calls", 2, "after-reactivation"))
            .await,
        Code::InvalidArgument,
        "idempotency_key",
    );
    assert_status(
        e.reserve(reserve("acme", "seats", 1, "after-reactivation"))
            .await,
        Code::InvalidArgument,
        "idempotency_key",
    );

    // Read-only (grace, through past_due: active → grace is no edge): Check of an
    // amount answers as Reserve would.
    for status in ["past_due", "grace"] {
        admin
            .change_subscription(status_change("acme", status))
            .await
            .unwrap();
    }
    let r = e
        .check(metric_check("acme", "api_calls", 5))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision.unwrap().reason, "subscription_read_only");
    let r = e
        .check(feature_check("acme", "advanced_analytics"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r.decision), pb::Outcome::Allow);

    // Replacing a subscription keeps its zone and anchor unless given.
    let put = pb::PutSubscriptionRequest {
        tenant: "globex".into(),
        plan: "free".into(),
        time_zone: "Asia/Tokyo".into(),
        ..Default::default()
    };
    let first = admin
        .put_subscription(put)
        .await
        .unwrap()
        .into_inner()
        .subscription
        .unwrap();
    let again = pb::PutSubscriptionRequest {
        tenant: "globex".into(),
        plan: "pro".into(),
        ..Default::default()
    };
    let second = admin
        .put_subscription(again)
        .await
        .unwrap()
        .into_inner()
        .subscription
        .unwrap();
    assert_eq!(
        (second.time_zone.as_str(), second.billing_anchor),
        ("Asia/Tokyo", first.billing_anchor)
    );
}

#[tokio::test]
async fn an_illegal_status_change_is_refused_recorded_and_changes_nothing() {
    let node = Node::builder().start().await;
    let mut admin = node.admin().await;
    subscribe(&mut admin, "acme", "pro").await;
    admin
        .cancel_subscription(pb::CancelSubscriptionRequest {
            tenant: "acme".into(),
            at_period_end: false,
            actor: "t".into(),
            reason: "customer left".into(),
        })
        .await
        .unwrap();
    let get = pb::GetTenantRequest {
        tenant: "acme".into(),
        ..Default::default()
    };
    let before = admin.get_tenant(get.clone()).await.unwrap().into_inner();

    // canceled → active, and anything → pending: refused, naming from, to and the way on.
    let mut ask = status_change("acme", "active");
    ask.actor = "support@example.com".into();
    ask.reason = "customer asked".into();
    let refused = admin.change_subscription(ask).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let m = refused.message();
    assert!(
        m.starts_with("status: canceled → active")
            && m.contains("from canceled the next status can be refunded, chargeback"),
        "{m}"
    );
    let refused = admin
        .change_subscription(status_change("acme", "pending"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().starts_with("status: canceled → pending"),
        "{}",
        refused.message()
    );

    // Nothing changed.
    let after = admin.get_tenant(get).await.unwrap().into_inner();
    assert_eq!(
        (&after.subscription, &after.status, after.version),
        (&before.subscription, &before.status, before.version)
    );

    // Both refusals are in the ledger, not applied, with who asked and why.
    let h = admin
        .get_tenant_history(pb::GetTenantHistoryRequest {
            tenant: "acme".into(),
            limit: 100,
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let refusals: Vec<_> = h.iter().filter(|e| !e.applied).collect();
    assert_eq!(refusals.len(), 2, "{h:?}");
    let first = refusals[0];
    assert_eq!(
        (first.action.as_str(), first.actor.as_str()),
        ("subscription.change", "support@example.com")
    );
    assert!(
        first.reason.contains("canceled → active") && first.reason.contains("customer asked"),
        "{}",
        first.reason
    );
    assert!(first.after.is_empty() && first.before.contains("\"status\":\"canceled\""));
    // The applied entries are the put and the cancellation only.
    assert_eq!(h.iter().filter(|e| e.applied).count(), 2, "{h:?}");
}
