//! Background jobs: WatchEntitled lists the tenants that have a feature (or headroom on a
//! metric), then reports each change: an Admin change, a trial that ends at its instant,
//! a quota used up.

mod harness;

use std::time::Duration;

use allot_proto::v1 as pb;
use harness::{record, subscribe, Node};
use tonic::Streaming;

/// The next (tenant, entitled, reason) of a watch, or snapshot_done as ("", true, "done").
async fn next(s: &mut Streaming<pb::EntitlementChange>) -> (String, bool, String) {
    let m = tokio::time::timeout(Duration::from_secs(30), s.message())
        .await
        .expect("a report within 30 s")
        .unwrap()
        .expect("the stream stays open");
    if m.snapshot_done {
        return (String::new(), true, "done".into());
    }
    (m.tenant, m.entitled, m.reason)
}

fn t(tenant: &str, entitled: bool, reason: &str) -> (String, bool, String) {
    (tenant.into(), entitled, reason.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_list_entitled_tenants_then_every_change() {
    let node = Node::builder().start().await;
    let mut admin = node.admin().await;
    subscribe(&mut admin, "acme", "pro").await;
    subscribe(&mut admin, "globex", "free").await;
    let mut e = node.enforcer().await;
    let mut s = e
        .watch_entitled(pb::WatchEntitledRequest {
            feature: "advanced_analytics".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut s).await, t("acme", true, "ok"));
    assert_eq!(next(&mut s).await, t("", true, "done"));

    // Upgraded: entitled. Canceled: not, at once.
    admin
        .change_subscription(pb::ChangeSubscriptionRequest {
            tenant: "globex".into(),
            plan: "pro".into(),
            timing: pb::ChangeTiming::Immediately as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(next(&mut s).await, t("globex", true, "ok"));
    admin
        .cancel_subscription(pb::CancelSubscriptionRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        next(&mut s).await,
        t("acme", false, "subscription_inactive")
    );

    // A trial that ends by itself: entitled until its instant, then not, without anyone
    // calling in. Far enough ahead that the watch sees the trial before it ends, even on a
    // busy machine.
    let ends = chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp() + 6, 0).unwrap();
    admin
        .put_subscription(pb::PutSubscriptionRequest {
            tenant: "initech".into(),
            plan: "pro".into(),
            trial_ends_at: Some(prost_types::Timestamp {
                seconds: ends.timestamp(),
                nanos: 0,
            }),
            post_trial_plan: "free".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(next(&mut s).await, t("initech", true, "ok"));
    let (tenant, entitled, reason) = next(&mut s).await;
    assert_eq!(
        (tenant.as_str(), entitled, reason.as_str()),
        ("initech", false, "feature_not_in_plan")
    );
    assert!(
        chrono::Utc::now() >= ends,
        "reported before the trial ended"
    );

    // Headroom on a metric: used up, then not entitled.
    subscribe(&mut admin, "agency", "travel_starter").await;
    let mut q = e
        .watch_entitled(pb::WatchEntitledRequest {
            metric: "quotations".into(),
            amount: 1,
            recheck: Some(prost_types::Duration {
                seconds: 0,
                nanos: 100_000_000,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut q).await, t("agency", true, "ok"));
    assert_eq!(next(&mut q).await, t("", true, "done"));
    assert!(
        e.record(record("agency", "quotations", 200, "q1"))
            .await
            .unwrap()
            .into_inner()
            .recorded
    );
    assert_eq!(next(&mut q).await, t("agency", false, "limit_exceeded"));

    // Bad requests fail at once.
    let bad = e
        .watch_entitled(pb::WatchEntitledRequest {
            feature: "teleport".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::NotFound);
    let bad = e
        .watch_entitled(pb::WatchEntitledRequest::default())
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
}
