//! Envoy's rate limit service protocol (`envoy.service.ratelimit.v3.RateLimitService`,
//! one RPC: `ShouldRateLimit`), served on the node's gRPC listener beside `allot.v1`, so
//! that Envoy, Istio and other gateways apply per-plan limits with no code of their own.
//!
//! # Mapping (docs/envoy.md says the same for operators)
//!
//! - `domain` must equal the node's RLS domain (`--rls-domain`, `ALLOT_RLS_DOMAIN`, TOML
//!   `rls_domain`, default `allot`); any other domain is INVALID_ARGUMENT naming `domain`.
//!   `descriptors` must hold 1 to [`MAX_DESCRIPTORS`] descriptors.
//! - Each descriptor is one demand. Its entries: key `tenant` → the tenant (required),
//!   key `metric` → the metric code (required), every other entry → a request dimension
//!   (key → value), which is how per-dimension rate limits (`per: api_key`) find their
//!   bucket. A missing `tenant` or `metric` is INVALID_ARGUMENT naming
//!   `descriptors[i].entries.tenant` (or `.metric`); a key given twice in one descriptor,
//!   or more than [`MAX_DIMENSIONS`] dimension entries, is INVALID_ARGUMENT too.
//! - Amount: the descriptor's own `hits_addend` when set, else the request's
//!   `hits_addend`; 0 means 1, as Envoy does. `is_negative_hits` (giving tokens back) is
//!   refused: Allot counts usage for billing, and a refund without the original event
//!   cannot be reconciled. The descriptor's `limit` override is ignored: limits come from
//!   the tenant's plan, never from the gateway.
//! - Each descriptor is counted like `Engine::record` (Enforcer `Record`) with a fresh
//!   UUIDv7 event id (the protocol has no idempotency key, so a retry by Envoy counts
//!   again) and the descriptor's dimensions. Counted → `OK`; refused for any reason
//!   (`limit_exceeded`, `rate_limited`, `feature_not_in_plan`, `subscription_inactive`,
//!   `backend_unavailable`…) → `OVER_LIMIT`. An allowance with a warning (soft-limit
//!   overage, near limit, degraded fail-open) is `OK`.
//! - Descriptors are evaluated in order and each counts on its own, like the reference
//!   Envoy ratelimit service: a descriptor that is `OK` stays counted even when a later one
//!   is `OVER_LIMIT`. `overall_code` is `OVER_LIMIT` when any descriptor is.
//! - Every descriptor's tenant and metric are resolved before the first one is counted,
//!   so input errors (unknown tenant or metric, a missing per-dimension entry) fail the
//!   call with nothing counted. Errors are the Enforcer service's (`grpc::status`), with
//!   field names translated to where they sit in the RLS request.
//! - Each `DescriptorStatus` carries the deciding window's limit as `current_limit`
//!   (`requests_per_unit` and a unit for `second`/`minute`/`hour`/`day`/`month`;
//!   `billing_period` and gauges have no Envoy unit, so no `current_limit`), the units
//!   left in it as `limit_remaining`, and `duration_until_reset`: the rate limit's
//!   `retry_after` when a bucket refused, else the time until the window resets.
//!
//! This service is not in the reflection registry: `envoy-types` compiles Envoy's protos
//! ahead of time and exports no encoded file descriptor set.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    rate_limit::Unit, Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use meter::decision::Decision;
use meter::keys;
use meter::quota::{self, Demand, Intent};
use meter::window::Window;
use tonic::{Request, Response, Status};

use super::status::invalid;
use crate::engine::enforce::MAX_DIMENSIONS;
use crate::engine::{Engine, EngineError};

/// The descriptor entry key that names the tenant.
pub const TENANT_KEY: &str = "tenant";
/// The descriptor entry key that names the metric.
pub const METRIC_KEY: &str = "metric";
/// Most descriptors in one request: each is a counted write, so one call must stay bounded.
pub const MAX_DESCRIPTORS: usize = 64;

/// One descriptor read as an Allot demand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescriptorDemand {
    /// The tenant (entry `tenant`).
    pub tenant: String,
    /// The metric code (entry `metric`).
    pub metric: String,
    /// Units to count (at least 1).
    pub amount: i64,
    /// Every other entry.
    pub dimensions: BTreeMap<String, String>,
    /// The request field the amount came from, for errors about it.
    pub amount_field: String,
}

/// Refuses a request for a domain this node does not serve.
pub fn check_domain(served: &str, domain: &str) -> Result<(), Status> {
    if domain == served {
        return Ok(());
    }
    Err(invalid(
        "domain",
        format!("is {domain:?}; this node answers the rate limit domain {served:?}"),
    ))
}

/// Reads descriptor `i` as a demand, with the request-level `hits_addend` as the default
/// amount. Validates every entry, so an error names the entry it is about.
pub fn demand(
    i: usize,
    d: &RateLimitDescriptor,
    request_hits: u32,
) -> Result<DescriptorDemand, Status> {
    let at = |rest: &str| format!("descriptors[{i}].{rest}");
    if d.is_negative_hits {
        return Err(invalid(
            &at("is_negative_hits"),
            "not supported: Allot counts usage for billing and does not give units back",
        ));
    }
    let (hits, amount_field) = match &d.hits_addend {
        Some(h) => (h.value, at("hits_addend")),
        None => (u64::from(request_hits), "hits_addend".to_string()),
    };
    // Envoy's convention: an unset or zero hits_addend is one hit.
    let amount = i64::try_from(hits.max(1))
        .map_err(|_| invalid(&amount_field, format!("{hits} is too large")))?;

    let mut tenant = None;
    let mut metric = None;
    let mut dimensions = BTreeMap::new();
    for (j, e) in d.entries.iter().enumerate() {
        let field = at(&format!("entries.{}", e.key));
        let fresh = match e.key.as_str() {
            TENANT_KEY => {
                keys::check_tenant(&e.value).map_err(|r| invalid(&field, r))?;
                tenant.replace(e.value.clone()).is_none()
            }
            METRIC_KEY => {
                keys::check_code(&e.value).map_err(|r| invalid(&field, r))?;
                metric.replace(e.value.clone()).is_none()
            }
            key => {
                // A key that is not a valid dimension name cannot be shown as a path.
                keys::check_code(key).map_err(|r| invalid(&at(&format!("entries[{j}].key")), r))?;
                keys::check_key(&e.value).map_err(|r| invalid(&field, r))?;
                dimensions
                    .insert(key.to_string(), e.value.clone())
                    .is_none()
            }
        };
        if !fresh {
            return Err(invalid(
                &field,
                "given twice in one descriptor; each key names one thing",
            ));
        }
    }
    if dimensions.len() > MAX_DIMENSIONS {
        return Err(invalid(
            &at("entries"),
            format!(
                "{} dimension entries; at most {MAX_DIMENSIONS} are allowed besides {TENANT_KEY} and {METRIC_KEY}",
                dimensions.len()
            ),
        ));
    }
    let required = |v: Option<String>, key: &str| {
        v.ok_or_else(|| {
            invalid(
                &at(&format!("entries.{key}")),
                format!("required: every descriptor names its {key}"),
            )
        })
    };
    Ok(DescriptorDemand {
        tenant: required(tenant, TENANT_KEY)?,
        metric: required(metric, METRIC_KEY)?,
        amount,
        dimensions,
        amount_field,
    })
}

/// Every descriptor of a request as a demand, after the domain check.
pub fn demands(served: &str, r: &RateLimitRequest) -> Result<Vec<DescriptorDemand>, Status> {
    check_domain(served, &r.domain)?;
    if r.descriptors.is_empty() {
        return Err(invalid("descriptors", "must not be empty"));
    }
    if r.descriptors.len() > MAX_DESCRIPTORS {
        return Err(invalid(
            "descriptors",
            format!(
                "{} given; at most {MAX_DESCRIPTORS} are allowed",
                r.descriptors.len()
            ),
        ));
    }
    r.descriptors
        .iter()
        .enumerate()
        .map(|(i, d)| demand(i, d, r.hits_addend))
        .collect()
}

/// An engine error about descriptor `i`, with its field renamed to where the value sits in
/// the RLS request (the engine speaks of `tenant`, `metric`, `amount`, `dimensions.K`).
pub fn locate(i: usize, d: &DescriptorDemand, e: EngineError) -> EngineError {
    let rename = |field: String| match field.as_str() {
        "tenant" | "metric" => format!("descriptors[{i}].entries.{field}"),
        "amount" => d.amount_field.clone(),
        "dimensions" => format!("descriptors[{i}].entries"),
        f => match f.strip_prefix("dimensions.") {
            Some(key) => format!("descriptors[{i}].entries.{key}"),
            None => format!("descriptors[{i}]: {f}"),
        },
    };
    match e {
        EngineError::Invalid { field, reason } => EngineError::Invalid {
            field: rename(field),
            reason,
        },
        EngineError::NotFound { field, reason } => EngineError::NotFound {
            field: rename(field),
            reason,
        },
        other => other,
    }
}

/// The Envoy unit of a window, where one exists.
pub fn unit(w: Window) -> Option<Unit> {
    match w {
        Window::Second => Some(Unit::Second),
        Window::Minute => Some(Unit::Minute),
        Window::Hour => Some(Unit::Hour),
        Window::Day => Some(Unit::Day),
        Window::Month => Some(Unit::Month),
        // A billing period is anchored to the subscription and a gauge never resets:
        // neither is a fixed unit of time.
        Window::BillingPeriod | Window::None => None,
    }
}

/// A decision as Envoy's per-descriptor answer, at `now` (for the time until reset).
pub fn descriptor_status(d: &Decision, now: DateTime<Utc>) -> DescriptorStatus {
    let code = if d.outcome.allowed() {
        Code::Ok
    } else {
        Code::OverLimit
    };
    let current_limit = match (d.limit, d.window.and_then(unit)) {
        (Some(limit), Some(u)) => Some(RateLimit {
            name: String::new(),
            requests_per_unit: saturate(limit),
            unit: u as i32,
        }),
        _ => None,
    };
    // A refused token bucket knows when a retry can pass; a quota window only when it
    // starts over.
    let until_reset = d.retry_after.or_else(|| {
        d.resets_at
            .map(|t| (t - now).to_std().unwrap_or(std::time::Duration::ZERO))
    });
    DescriptorStatus {
        code: code as i32,
        current_limit,
        limit_remaining: d.remaining.map_or(0, saturate),
        duration_until_reset: until_reset.map(|t| PbDuration {
            seconds: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
            nanos: t.subsec_nanos() as i32,
        }),
        quota: None,
    }
}

/// The wire fields are 32-bit; a larger limit reads as "at least this many".
fn saturate(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// `OVER_LIMIT` when any descriptor is.
pub fn overall(statuses: &[DescriptorStatus]) -> Code {
    if statuses.iter().any(|s| s.code == Code::OverLimit as i32) {
        Code::OverLimit
    } else {
        Code::Ok
    }
}

/// The rate limit service over an engine.
pub struct EnvoyRlsService {
    engine: Arc<Engine>,
    domain: String,
}

impl EnvoyRlsService {
    /// A service answering requests for `domain`.
    pub fn new(engine: Arc<Engine>, domain: impl Into<String>) -> Self {
        EnvoyRlsService {
            engine,
            domain: domain.into(),
        }
    }
}

/// The service, ready for the tonic router.
pub fn server(engine: Arc<Engine>, domain: &str) -> RateLimitServiceServer<EnvoyRlsService> {
    RateLimitServiceServer::new(EnvoyRlsService::new(engine, domain))
}

impl EnvoyRlsService {
    /// Resolves every descriptor's tenant and plans its demand, counting nothing, so a bad
    /// descriptor fails the call before an earlier one is counted.
    async fn preflight(&self, demands: &[DescriptorDemand]) -> Result<(), Status> {
        let now = self.engine.now();
        for (i, d) in demands.iter().enumerate() {
            let ctx = self
                .engine
                .context(&d.tenant, now)
                .await
                .map_err(|e| locate(i, d, e))?;
            let demand = Demand {
                metric: &d.metric,
                amount: d.amount,
                dimensions: &d.dimensions,
                intent: Intent::Record,
            };
            quota::plan_request(&ctx.catalog, &ctx.entitlements, &demand, now)
                .map_err(|e| locate(i, d, e.into()))?;
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl RateLimitService for EnvoyRlsService {
    async fn should_rate_limit(
        &self,
        req: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let demands = demands(&self.domain, &req.into_inner())?;
        self.preflight(&demands).await?;
        let mut statuses = Vec::with_capacity(demands.len());
        for (i, d) in demands.iter().enumerate() {
            let event_id = uuid::Uuid::now_v7().to_string();
            let out = self
                .engine
                .record(
                    &d.tenant,
                    &d.metric,
                    d.amount,
                    &event_id,
                    &d.dimensions,
                    None,
                )
                .await
                .map_err(|e| locate(i, d, e))?;
            super::enforcer::count("rls", &out.decision);
            statuses.push(descriptor_status(&out.decision, self.engine.now()));
        }
        Ok(Response::new(RateLimitResponse {
            overall_code: overall(&statuses) as i32,
            statuses,
            ..Default::default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
    use envoy_types::pb::google::protobuf::UInt64Value;
    use meter::decision::{Outcome, Reason};

    use super::*;

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

    fn message(r: Result<DescriptorDemand, Status>) -> String {
        let s = r.expect_err("must be refused");
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        s.message().to_string()
    }

    #[test]
    fn entries_become_tenant_metric_and_dimensions() {
        let d = descriptor(&[
            ("tenant", "acme"),
            ("api_key", "k-1"),
            ("metric", "api_calls"),
            ("route", "/v1/search"),
        ]);
        let got = demand(0, &d, 0).unwrap();
        assert_eq!(
            got,
            DescriptorDemand {
                tenant: "acme".into(),
                metric: "api_calls".into(),
                amount: 1,
                dimensions: [("api_key", "k-1"), ("route", "/v1/search")]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                amount_field: "hits_addend".into(),
            }
        );
    }

    #[test]
    fn hits_addend_zero_is_one_and_the_descriptor_wins() {
        let mut d = descriptor(&[("tenant", "acme"), ("metric", "api_calls")]);
        assert_eq!(demand(0, &d, 0).unwrap().amount, 1);
        assert_eq!(demand(0, &d, 5).unwrap().amount, 5);
        d.hits_addend = Some(UInt64Value { value: 3 });
        let got = demand(2, &d, 5).unwrap();
        assert_eq!(
            (got.amount, got.amount_field.as_str()),
            (3, "descriptors[2].hits_addend")
        );
        d.hits_addend = Some(UInt64Value { value: 0 });
        assert_eq!(demand(0, &d, 5).unwrap().amount, 1);
        d.hits_addend = Some(UInt64Value { value: u64::MAX });
        assert!(message(demand(1, &d, 0)).starts_with("descriptors[1].hits_addend:"));
    }

    #[test]
    fn missing_duplicate_and_malformed_entries_name_the_field() {
        let m = message(demand(3, &descriptor(&[("metric", "api_calls")]), 0));
        assert!(
            m.starts_with("descriptors[3].entries.tenant: required"),
            "{m}"
        );
        let m = message(demand(0, &descriptor(&[("tenant", "acme")]), 0));
        assert!(
            m.starts_with("descriptors[0].entries.metric: required"),
            "{m}"
        );
        let m = message(demand(
            0,
            &descriptor(&[("tenant", "acme"), ("metric", "a"), ("tenant", "b")]),
            0,
        ));
        assert!(
            m.starts_with("descriptors[0].entries.tenant: given twice"),
            "{m}"
        );
        let m = message(demand(
            0,
            &descriptor(&[("tenant", "a"), ("metric", "m"), ("k", "1"), ("k", "2")]),
            0,
        ));
        assert!(
            m.starts_with("descriptors[0].entries.k: given twice"),
            "{m}"
        );
        let m = message(demand(
            0,
            &descriptor(&[("tenant", "a"), ("metric", "m"), ("bad key", "1")]),
            0,
        ));
        assert!(m.starts_with("descriptors[0].entries[2].key:"), "{m}");
        let m = message(demand(
            0,
            &descriptor(&[("tenant", "a"), ("metric", "m"), ("ip", "")]),
            0,
        ));
        assert!(
            m.starts_with("descriptors[0].entries.ip: must not be empty"),
            "{m}"
        );
        let m = message(demand(
            0,
            &descriptor(&[("tenant", "a/b"), ("metric", "m")]),
            0,
        ));
        assert!(m.starts_with("descriptors[0].entries.tenant:"), "{m}");
        let mut neg = descriptor(&[("tenant", "a"), ("metric", "m")]);
        neg.is_negative_hits = true;
        assert!(message(demand(0, &neg, 0)).starts_with("descriptors[0].is_negative_hits:"));
    }

    #[test]
    fn domain_and_descriptor_count_are_checked() {
        let mut r = RateLimitRequest {
            domain: "edge".into(),
            descriptors: vec![descriptor(&[("tenant", "a"), ("metric", "m")])],
            hits_addend: 0,
        };
        let s = demands("allot", &r).unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(s.message().starts_with("domain:"), "{}", s.message());
        r.domain = "allot".into();
        assert_eq!(demands("allot", &r).unwrap().len(), 1);
        r.descriptors.clear();
        assert!(demands("allot", &r)
            .unwrap_err()
            .message()
            .starts_with("descriptors:"));
        r.descriptors = vec![descriptor(&[("tenant", "a"), ("metric", "m")]); MAX_DESCRIPTORS + 1];
        assert!(demands("allot", &r)
            .unwrap_err()
            .message()
            .starts_with("descriptors:"));
    }

    #[test]
    fn engine_errors_are_renamed_to_rls_fields() {
        let d = DescriptorDemand {
            tenant: "t".into(),
            metric: "m".into(),
            amount: 1,
            dimensions: BTreeMap::new(),
            amount_field: "descriptors[1].hits_addend".into(),
        };
        let cases = [
            (
                EngineError::not_found("tenant", "unknown tenant"),
                "descriptors[1].entries.tenant: unknown tenant",
            ),
            (
                EngineError::not_found("metric", "unknown metric"),
                "descriptors[1].entries.metric: unknown metric",
            ),
            (
                EngineError::invalid("dimensions.api_key", "required"),
                "descriptors[1].entries.api_key: required",
            ),
            (
                EngineError::invalid("amount", "too large"),
                "descriptors[1].hits_addend: too large",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(locate(1, &d, e).to_string(), want);
        }
        let kept = EngineError::Unavailable("store down".into());
        assert_eq!(locate(1, &d, kept.clone()), kept);
        let status = Status::from(locate(1, &d, EngineError::not_found("tenant", "x")));
        assert_eq!(status.code(), tonic::Code::NotFound);
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn an_allowed_quota_decision_is_ok_with_limit_remaining_and_reset() {
        let now = at("2025-03-10T12:00:00Z");
        let mut d = Decision::allow();
        d.window = Some(Window::Day);
        d.limit = Some(5);
        d.remaining = Some(2);
        d.resets_at = Some(at("2025-03-11T00:00:00Z"));
        let s = descriptor_status(&d, now);
        assert_eq!(s.code, Code::Ok as i32);
        assert_eq!(
            s.current_limit,
            Some(RateLimit {
                name: String::new(),
                requests_per_unit: 5,
                unit: Unit::Day as i32
            })
        );
        assert_eq!(s.limit_remaining, 2);
        assert_eq!(
            s.duration_until_reset,
            Some(PbDuration {
                seconds: 12 * 3600,
                nanos: 0
            })
        );
        // A warning is still an allowance.
        d.outcome = Outcome::AllowWithWarning;
        d.reason = Reason::NearLimit;
        assert_eq!(descriptor_status(&d, now).code, Code::Ok as i32);
    }

    #[test]
    fn a_rate_limited_decision_is_over_limit_with_retry_after() {
        let mut d = Decision::deny(Reason::RateLimited, "rate limit of 5 per minute reached");
        d.window = Some(Window::Minute);
        d.limit = Some(5);
        d.retry_after = Some(Duration::from_millis(12_500));
        let s = descriptor_status(&d, at("2025-03-10T12:00:00Z"));
        assert_eq!(s.code, Code::OverLimit as i32);
        assert_eq!(
            s.current_limit.map(|l| (l.requests_per_unit, l.unit)),
            Some((5, Unit::Minute as i32))
        );
        assert_eq!(s.limit_remaining, 0);
        assert_eq!(
            s.duration_until_reset,
            Some(PbDuration {
                seconds: 12,
                nanos: 500_000_000
            })
        );
    }

    #[test]
    fn windows_without_an_envoy_unit_and_denials_without_a_window() {
        let now = at("2025-03-10T12:00:00Z");
        let mut d = Decision::deny(Reason::LimitExceeded, "over");
        d.window = Some(Window::BillingPeriod);
        d.limit = Some(10_000_000_000);
        d.remaining = Some(u64::MAX);
        d.resets_at = Some(at("2025-03-01T00:00:00Z")); // already past: no negative time
        let s = descriptor_status(&d, now);
        assert_eq!(s.code, Code::OverLimit as i32);
        assert_eq!(s.current_limit, None);
        assert_eq!(s.limit_remaining, u32::MAX);
        assert_eq!(s.duration_until_reset, Some(PbDuration::default()));
        for reason in [Reason::FeatureNotInPlan, Reason::SubscriptionInactive] {
            let s = descriptor_status(&Decision::deny(reason, "no"), now);
            assert_eq!(s.code, Code::OverLimit as i32);
            assert_eq!((s.current_limit, s.duration_until_reset), (None, None));
        }
        assert_eq!(unit(Window::Month), Some(Unit::Month));
        assert_eq!(unit(Window::None), None);
    }

    #[test]
    fn overall_is_over_limit_when_any_descriptor_is() {
        let ok = descriptor_status(&Decision::allow(), Utc::now());
        let over = descriptor_status(&Decision::deny(Reason::RateLimited, "x"), Utc::now());
        assert_eq!(overall(&[ok.clone(), ok.clone()]), Code::Ok);
        assert_eq!(overall(&[ok, over]), Code::OverLimit);
    }
}
