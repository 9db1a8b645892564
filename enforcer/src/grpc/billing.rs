//! The `allot.v1.Billing` service: overage and exports of billing periods, computed by
//! [`aggregator::billing`] from the usage events in ClickHouse and priced by the node's
//! catalog.

use std::sync::Arc;

use aggregator::billing::{BillLine, Billing, BillingError, ExportLine, LineKind, Period};
use aggregator::SinkError;
use allot_proto::v1 as pb;
use meter::billing::decimal;
use tonic::{Request, Response, Status};

use super::convert::ts;
use super::status::invalid;
use crate::engine::Engine;

/// The Billing service; without ClickHouse it answers FAILED_PRECONDITION.
pub struct BillingService {
    engine: Arc<Engine>,
    billing: Option<Billing>,
    /// One export at a time: an export reads what was exported before it.
    exporting: tokio::sync::Mutex<()>,
}

impl BillingService {
    /// The service over `billing` (None: the node has no --clickhouse).
    pub fn new(engine: Arc<Engine>, billing: Option<Billing>) -> Self {
        BillingService {
            engine,
            billing,
            exporting: tokio::sync::Mutex::new(()),
        }
    }

    fn billing(&self) -> Result<&Billing, Status> {
        self.billing.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "billing reads the usage events in ClickHouse: start the node with --clickhouse http://host:8123",
            )
        })
    }
}

fn period(s: &str) -> Result<Period, Status> {
    s.parse().map_err(to_status)
}

fn to_status(e: BillingError) -> Status {
    match e {
        BillingError::Invalid { field, reason } => invalid(field, reason),
        BillingError::NotEnded { .. } => Status::failed_precondition(e.to_string()),
        BillingError::Overflow { .. } => Status::out_of_range(e.to_string()),
        BillingError::ClickHouse(SinkError::Unreachable(_) | SinkError::Busy { .. }) => {
            Status::unavailable(e.to_string())
        }
        BillingError::ClickHouse(_) => {
            tracing::warn!(error = %e, "billing query failed");
            Status::internal(e.to_string())
        }
    }
}

fn overage_line(period: &str, l: BillLine) -> pb::BillingLine {
    pb::BillingLine {
        kind: pb::BillingLineKind::Period as i32,
        period: period.to_string(),
        amount: decimal(l.amount_micros),
        amount_micros: i64::try_from(l.amount_micros).unwrap_or(i64::MAX),
        tenant: l.tenant,
        metric: l.metric,
        plan: l.plan,
        plan_version: l.plan_version,
        included: l.included,
        used: i64::try_from(l.used).unwrap_or(i64::MAX),
        overage: i64::try_from(l.overage).unwrap_or(i64::MAX),
        unpriced: i64::try_from(l.unpriced).unwrap_or(i64::MAX),
    }
}

fn export_line(l: ExportLine) -> pb::BillingLine {
    let sign = if l.amount_micros < 0 { "-" } else { "" };
    pb::BillingLine {
        kind: match l.kind {
            LineKind::Period => pb::BillingLineKind::Period,
            LineKind::Adjustment => pb::BillingLineKind::Adjustment,
        } as i32,
        amount: format!(
            "{sign}{}",
            decimal(u128::from(l.amount_micros.unsigned_abs()))
        ),
        period: l.for_period,
        tenant: l.tenant,
        metric: l.metric,
        plan: String::new(),
        plan_version: 0,
        included: l.included,
        used: l.used,
        overage: l.overage,
        amount_micros: l.amount_micros,
        unpriced: l.unpriced,
    }
}

#[tonic::async_trait]
impl pb::billing_server::Billing for BillingService {
    async fn overage(
        &self,
        req: Request<pb::OverageRequest>,
    ) -> Result<Response<pb::OverageResponse>, Status> {
        let r = req.into_inner();
        let p = period(&r.period)?;
        let billing = self.billing()?;
        let (_, catalog) = self.engine.catalog()?;
        let tenant = (!r.tenant.is_empty()).then_some(r.tenant.as_str());
        let lines = billing
            .overage(p, tenant, catalog.as_ref())
            .await
            .map_err(to_status)?;
        let label = p.to_string();
        Ok(Response::new(pb::OverageResponse {
            currency: catalog.currency.clone().unwrap_or_default(),
            lines: lines.into_iter().map(|l| overage_line(&label, l)).collect(),
            period: label,
        }))
    }

    async fn export(
        &self,
        req: Request<pb::ExportRequest>,
    ) -> Result<Response<pb::ExportResponse>, Status> {
        let p = period(&req.into_inner().period)?;
        let billing = self.billing()?;
        let (_, catalog) = self.engine.catalog()?;
        let _one = self.exporting.lock().await;
        let e = billing
            .export(p, self.engine.now(), catalog.as_ref())
            .await
            .map_err(to_status)?;
        tracing::info!(
            period = %e.period,
            lines = e.lines.len(),
            already_exported = e.already_exported,
            "billing period exported"
        );
        Ok(Response::new(pb::ExportResponse {
            period: e.period,
            exported_at: Some(ts(e.exported_at)),
            already_exported: e.already_exported,
            currency: e.currency,
            lines: e.lines.into_iter().map(export_line).collect(),
        }))
    }
}
