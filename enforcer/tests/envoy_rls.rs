//! Envoy's rate limit service on a real node: the generated Envoy client gets OK, then
//! OVER_LIMIT at the plan's limit; per-dimension limits keep a bucket per entry value; bad
//! requests get the documented errors and count nothing (checked through GetUsage).

mod harness;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    rate_limit::Unit, Code as RlsCode, DescriptorStatus,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use harness::{subscribe, window_usage, Node};
use tonic::transport::Channel;
use tonic::Code;

// A token per minute per API key refills far slower than a test runs, so the bucket
// tests do not depend on timing.
const CATALOG: &str = "version: 1
metrics:
  calls: { unit: call }
  reports: { unit: report }
plans:
  daily:
    versions:
      1:
        limits:
          calls:
            - { window: day, amount: 5 }
  keyed:
    versions:
      1:
        limits:
          calls:
            - { window: day, amount: 1000 }
            - { window: minute, rate: 1, burst: 3, per: api_key }
";

async fn rls(node: &Node) -> RateLimitServiceClient<Channel> {
    let channel = Channel::from_shared(node.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    RateLimitServiceClient::new(channel)
}

fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        ..Default::default()
    }
}

fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>, hits: u32) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors,
        hits_addend: hits,
    }
}

/// One descriptor for `tenant`'s calls, with extra entries.
fn calls(tenant: &str, extra: &[(&str, &str)]) -> RateLimitDescriptor {
    let mut entries = vec![("tenant", tenant), ("metric", "calls")];
    entries.extend_from_slice(extra);
    descriptor(&entries)
}

async fn ask(c: &mut RateLimitServiceClient<Channel>, r: RateLimitRequest) -> RateLimitResponse {
    c.should_rate_limit(r).await.unwrap().into_inner()
}

fn code(s: &DescriptorStatus) -> RlsCode {
    RlsCode::try_from(s.code).unwrap()
}

fn limit(s: &DescriptorStatus) -> Option<(u32, Unit)> {
    s.current_limit
        .as_ref()
        .map(|l| (l.requests_per_unit, Unit::try_from(l.unit).unwrap()))
}

fn assert_refused(
    r: Result<tonic::Response<RateLimitResponse>, tonic::Status>,
    c: Code,
    field: &str,
) {
    let s = r.expect_err("request must fail");
    assert_eq!(s.code(), c, "{s:?}");
    assert!(
        s.message().starts_with(&format!("{field}:")),
        "message {:?} should start with {field}:",
        s.message()
    );
}

#[tokio::test]
async fn ok_until_the_daily_quota_then_over_limit() {
    let node = Node::builder().catalog(CATALOG).start().await;
    let mut admin = node.admin().await;
    let mut e = node.enforcer().await;
    let mut c = rls(&node).await;
    for t in ["acme", "initech", "umbrella"] {
        subscribe(&mut admin, t, "daily").await;
    }

    for remaining in (0..5).rev() {
        let r = ask(&mut c, request("allot", vec![calls("acme", &[])], 0)).await;
        assert_eq!(r.overall_code(), RlsCode::Ok);
        let s = &r.statuses[0];
        assert_eq!(code(s), RlsCode::Ok);
        assert_eq!(limit(s), Some((5, Unit::Day)));
        assert_eq!(s.limit_remaining, remaining);
        assert!(s.duration_until_reset.is_some());
    }
    let r = ask(&mut c, request("allot", vec![calls("acme", &[])], 0)).await;
    assert_eq!(r.overall_code(), RlsCode::OverLimit);
    let s = &r.statuses[0];
    assert_eq!(code(s), RlsCode::OverLimit);
    assert_eq!(limit(s), Some((5, Unit::Day)));
    assert_eq!(s.limit_remaining, 0);
    let reset = s.duration_until_reset.unwrap();
    assert!(reset.seconds > 0 || reset.nanos > 0, "{reset:?}");
    assert_eq!(window_usage(&mut e, "acme", "calls", "day").await, (5, 0));

    // hits_addend is the amount: 5 at once takes the whole day, and one more is over.
    let r = ask(&mut c, request("allot", vec![calls("initech", &[])], 5)).await;
    assert_eq!(r.overall_code(), RlsCode::Ok);
    assert_eq!(r.statuses[0].limit_remaining, 0);
    let r = ask(&mut c, request("allot", vec![calls("initech", &[])], 1)).await;
    assert_eq!(r.overall_code(), RlsCode::OverLimit);
    assert_eq!(
        window_usage(&mut e, "initech", "calls", "day").await,
        (5, 0)
    );

    // The descriptor's own hits_addend beats the request's: 6 does not fit, 4 does.
    let mut six = calls("umbrella", &[]);
    six.hits_addend = Some(UInt64Value { value: 6 });
    let r = ask(&mut c, request("allot", vec![six], 1)).await;
    assert_eq!(r.overall_code(), RlsCode::OverLimit);
    assert_eq!(r.statuses[0].limit_remaining, 5);
    assert_eq!(
        window_usage(&mut e, "umbrella", "calls", "day").await,
        (0, 0)
    );
    let mut four = calls("umbrella", &[]);
    four.hits_addend = Some(UInt64Value { value: 4 });
    let r = ask(&mut c, request("allot", vec![four], 1)).await;
    assert_eq!(r.overall_code(), RlsCode::Ok);
    assert_eq!(r.statuses[0].limit_remaining, 1);
    assert_eq!(
        window_usage(&mut e, "umbrella", "calls", "day").await,
        (4, 0)
    );
}

#[tokio::test]
async fn per_dimension_rate_limits_keep_a_bucket_per_entry_value() {
    let node = Node::builder().catalog(CATALOG).start().await;
    let mut admin = node.admin().await;
    let mut e = node.enforcer().await;
    let mut c = rls(&node).await;
    subscribe(&mut admin, "acme", "keyed").await;

    // Burst 3 for key k1, then its bucket is empty.
    for _ in 0..3 {
        let r = ask(
            &mut c,
            request("allot", vec![calls("acme", &[("api_key", "k1")])], 0),
        )
        .await;
        assert_eq!(r.overall_code(), RlsCode::Ok);
    }
    let r = ask(
        &mut c,
        request("allot", vec![calls("acme", &[("api_key", "k1")])], 0),
    )
    .await;
    assert_eq!(r.overall_code(), RlsCode::OverLimit);
    let s = &r.statuses[0];
    assert_eq!(limit(s), Some((1, Unit::Minute)));
    assert_eq!(s.limit_remaining, 0);
    assert!(
        s.duration_until_reset.is_some(),
        "retry_after of the bucket"
    );

    // Key k2 has its own bucket. In one request, descriptors count on their own and in
    // order: k2's hit counts even though k1's is over the limit.
    let r = ask(
        &mut c,
        request(
            "allot",
            vec![
                calls("acme", &[("api_key", "k2")]),
                calls("acme", &[("api_key", "k1")]),
            ],
            0,
        ),
    )
    .await;
    assert_eq!(r.overall_code(), RlsCode::OverLimit);
    assert_eq!(
        r.statuses.iter().map(code).collect::<Vec<_>>(),
        vec![RlsCode::Ok, RlsCode::OverLimit]
    );
    assert_eq!(limit(&r.statuses[0]), Some((1000, Unit::Day)));
    assert_eq!(window_usage(&mut e, "acme", "calls", "day").await, (4, 0));

    // The per-key limit needs the entry.
    assert_refused(
        c.should_rate_limit(request("allot", vec![calls("acme", &[])], 0))
            .await,
        Code::InvalidArgument,
        "descriptors[0].entries.api_key",
    );
    assert_eq!(window_usage(&mut e, "acme", "calls", "day").await, (4, 0));
}

#[tokio::test]
async fn bad_requests_get_the_documented_errors_and_count_nothing() {
    let node = Node::builder()
        .catalog(CATALOG)
        .arg("--rls-domain")
        .arg("edge")
        .start()
        .await;
    let mut admin = node.admin().await;
    let mut e = node.enforcer().await;
    let mut c = rls(&node).await;
    subscribe(&mut admin, "acme", "daily").await;
    let ok = || calls("acme", &[]);

    // The default domain is not this node's.
    assert_refused(
        c.should_rate_limit(request("allot", vec![ok()], 0)).await,
        Code::InvalidArgument,
        "domain",
    );
    assert_refused(
        c.should_rate_limit(request("edge", vec![], 0)).await,
        Code::InvalidArgument,
        "descriptors",
    );
    assert_refused(
        c.should_rate_limit(request("edge", vec![descriptor(&[("metric", "calls")])], 0))
            .await,
        Code::InvalidArgument,
        "descriptors[0].entries.tenant",
    );
    assert_refused(
        c.should_rate_limit(request("edge", vec![descriptor(&[("tenant", "acme")])], 0))
            .await,
        Code::InvalidArgument,
        "descriptors[0].entries.metric",
    );
    assert_refused(
        c.should_rate_limit(request(
            "edge",
            vec![calls("acme", &[("metric", "reports")])],
            0,
        ))
        .await,
        Code::InvalidArgument,
        "descriptors[0].entries.metric",
    );
    assert_refused(
        c.should_rate_limit(request("edge", vec![calls("nobody", &[])], 0))
            .await,
        Code::NotFound,
        "descriptors[0].entries.tenant",
    );
    assert_refused(
        c.should_rate_limit(request(
            "edge",
            vec![descriptor(&[("tenant", "acme"), ("metric", "nope")])],
            0,
        ))
        .await,
        Code::NotFound,
        "descriptors[0].entries.metric",
    );
    // A bad second descriptor fails the call before the first one is counted.
    assert_refused(
        c.should_rate_limit(request("edge", vec![ok(), calls("nobody", &[])], 0))
            .await,
        Code::NotFound,
        "descriptors[1].entries.tenant",
    );
    assert_eq!(window_usage(&mut e, "acme", "calls", "day").await, (0, 0));

    // Denials are answers, not errors: a metric outside the plan, then a suspended
    // subscription, are OVER_LIMIT and count nothing.
    let r = ask(
        &mut c,
        request(
            "edge",
            vec![descriptor(&[("tenant", "acme"), ("metric", "reports")])],
            0,
        ),
    )
    .await;
    assert_eq!(r.overall_code(), RlsCode::OverLimit);
    assert_eq!(limit(&r.statuses[0]), None);
    // Suspended the legal way: active → past_due → grace → suspended.
    for status in ["past_due", "grace", "suspended"] {
        admin
            .change_subscription(allot_proto::v1::ChangeSubscriptionRequest {
                tenant: "acme".into(),
                status: status.into(),
                actor: "test".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let r = ask(&mut c, request("edge", vec![ok()], 0)).await;
    assert_eq!(r.overall_code(), RlsCode::OverLimit);
    assert_eq!(window_usage(&mut e, "acme", "calls", "day").await, (0, 0));

    // And the configured domain is served.
    subscribe(&mut admin, "initech", "daily").await;
    let r = ask(&mut c, request("edge", vec![calls("initech", &[])], 0)).await;
    assert_eq!(r.overall_code(), RlsCode::Ok);
    assert_eq!(
        window_usage(&mut e, "initech", "calls", "day").await,
        (1, 0)
    );
}
