//! The `allot.v1.Enforcer` service: proto in, engine call, proto out.

use std::sync::Arc;

use allot_proto::v1 as pb;
use pb::enforcer_server::Enforcer;
use tonic::{Request, Response, Status};

use super::convert::{self, ts};
use super::status::invalid;
use crate::engine::enforce::committed_amount;
use crate::engine::Engine;

/// The Enforcer service over an engine.
pub struct EnforcerService {
    engine: Arc<Engine>,
}

impl EnforcerService {
    /// A service over `engine`.
    pub fn new(engine: Arc<Engine>) -> Self {
        EnforcerService { engine }
    }
}

impl EnforcerService {
    /// Counts a reserve's or record's decision, and keeps a refusal for the support view.
    fn decided(
        &self,
        request: &'static str,
        tenant: &str,
        metric: &str,
        amount: i64,
        d: &meter::decision::Decision,
    ) {
        count(request, d);
        if d.outcome == meter::decision::Outcome::Deny {
            self.engine.denials.note(
                tenant,
                crate::engine::denials::Denial {
                    at: self.engine.now(),
                    request,
                    metric: metric.to_string(),
                    amount,
                    reason: d.reason.as_str().to_string(),
                    message: d.message.clone(),
                },
            );
        }
    }
}

/// Counts a decision by operation, outcome and reason.
pub fn count(op: &'static str, d: &meter::decision::Decision) {
    metrics::counter!(
        crate::metrics::DECISIONS,
        "op" => op,
        "outcome" => d.outcome.as_str(),
        "reason" => d.reason.as_str(),
    )
    .increment(1);
}

#[tonic::async_trait]
impl Enforcer for EnforcerService {
    async fn check(
        &self,
        req: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let r = req.into_inner();
        let resp = match (r.feature.is_empty(), r.metric.is_empty()) {
            (false, true) => {
                let c = self.engine.check_feature(&r.tenant, &r.feature).await?;
                count("check", &c.decision);
                pb::CheckResponse {
                    decision: Some(convert::decision(&c.decision)),
                    value: Some(convert::value(&c.grant.value)),
                    entitlements_version: c.version,
                }
            }
            (true, false) => {
                let dims = convert::dimensions(r.dimensions);
                let (d, version) = self
                    .engine
                    .check_metric(&r.tenant, &r.metric, r.amount, &dims)
                    .await?;
                count("check", &d);
                pb::CheckResponse {
                    decision: Some(convert::decision(&d)),
                    value: None,
                    entitlements_version: version,
                }
            }
            (true, true) => return Err(invalid("feature", "give a feature or a metric")),
            (false, false) => {
                return Err(invalid("metric", "give a feature or a metric, not both"))
            }
        };
        Ok(Response::new(resp))
    }

    async fn reserve(
        &self,
        req: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveResponse>, Status> {
        let r = req.into_inner();
        let ttl = convert::from_duration("ttl", r.ttl)?;
        let dims = convert::dimensions(r.dimensions);
        let id = uuid::Uuid::now_v7().to_string();
        let out = self
            .engine
            .reserve(
                &r.tenant,
                &r.metric,
                r.amount,
                &r.idempotency_key,
                ttl,
                &dims,
                id,
            )
            .await?;
        self.decided("reserve", &r.tenant, &r.metric, r.amount, &out.decision);
        Ok(Response::new(pb::ReserveResponse {
            reservation_id: out.reservation_id.unwrap_or_default(),
            decision: Some(convert::decision(&out.decision)),
            expires_at: out.expires_at.map(ts),
            replayed: out.replayed,
        }))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        let r = req.into_inner();
        let out = self
            .engine
            .commit(&r.tenant, &r.reservation_id, r.actual_amount)
            .await?;
        let committed = committed_amount(out.settlement);
        Ok(Response::new(pb::CommitResponse {
            reserved: out.reserved,
            committed,
            refunded: out.reserved - committed,
            replayed: out.replayed,
        }))
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let r = req.into_inner();
        let out = self.engine.release(&r.tenant, &r.reservation_id).await?;
        Ok(Response::new(pb::ReleaseResponse {
            released: out.reserved,
            replayed: out.replayed,
        }))
    }

    async fn record(
        &self,
        req: Request<pb::RecordRequest>,
    ) -> Result<Response<pb::RecordResponse>, Status> {
        let r = req.into_inner();
        let dims = convert::dimensions(r.dimensions);
        let event_time = convert::from_ts("event_time", r.event_time)?;
        let out = self
            .engine
            .record(
                &r.tenant,
                &r.metric,
                r.amount,
                &r.event_id,
                &dims,
                event_time,
            )
            .await?;
        self.decided("record", &r.tenant, &r.metric, r.amount, &out.decision);
        Ok(Response::new(pb::RecordResponse {
            decision: Some(convert::decision(&out.decision)),
            recorded: out.recorded,
            replayed: out.replayed,
        }))
    }

    type WatchEntitledStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::EntitlementChange, Status>> + Send>,
    >;

    async fn watch_entitled(
        &self,
        req: Request<pb::WatchEntitledRequest>,
    ) -> Result<Response<Self::WatchEntitledStream>, Status> {
        use crate::engine::watch::{Report, Want};
        use tokio_stream::StreamExt as _;
        let r = req.into_inner();
        let want = match (r.feature.is_empty(), r.metric.is_empty()) {
            (false, true) => Want::Feature(r.feature),
            (true, false) => Want::Metric {
                metric: r.metric,
                amount: if r.amount == 0 { 1 } else { r.amount },
            },
            _ => return Err(invalid("feature", "give a feature or a metric, not both")),
        };
        let recheck = convert::from_duration("recheck", r.recheck)?
            .unwrap_or(std::time::Duration::from_secs(5))
            .max(std::time::Duration::from_millis(100));
        let rx = self.engine.watch(want, recheck).await?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|m| match m {
            Ok(Report::Tenant {
                tenant,
                entitled,
                reason,
                at,
            }) => Ok(pb::EntitlementChange {
                tenant,
                entitled,
                reason,
                at: Some(ts(at)),
                snapshot_done: false,
            }),
            Ok(Report::SnapshotDone) => Ok(pb::EntitlementChange {
                snapshot_done: true,
                ..Default::default()
            }),
            Err(e) => Err(Status::from(e)),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_usage(
        &self,
        req: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let r = req.into_inner();
        let Some(rows) = self.engine.usage(&r.tenant, &r.metric).await? else {
            return Ok(Response::new(pb::GetUsageResponse {
                windows: vec![],
                granted: false,
            }));
        };
        let windows = rows
            .into_iter()
            .map(|w| pb::WindowUsage {
                window: w.limit.window.as_str().into(),
                limit: w.limit.amount,
                used: w.usage.used,
                reserved: w.usage.reserved,
                remaining: w
                    .limit
                    .amount
                    .saturating_sub(w.usage.used.saturating_add(w.usage.reserved)),
                period_start: Some(ts(w.period_start)),
                resets_at: w.resets_at.map(ts),
                enforcement: convert::enum_name(&w.limit.enforcement),
                burst: w.limit.burst.unwrap_or(0),
                scope: convert::scope(&w.limit),
                per: w.limit.per.unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::GetUsageResponse {
            windows,
            granted: true,
        }))
    }
}
