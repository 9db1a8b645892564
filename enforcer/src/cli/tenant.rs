//! `allot tenant show`: the support view of one tenant, from GetTenant plus the current
//! usage of each limited metric; `allot tenant history`: its entitlement ledger.

use super::rpc::Conn;
use allot_proto::v1::admin_client::AdminClient;
use allot_proto::v1::enforcer_client::EnforcerClient;
use allot_proto::v1::{
    GetTenantHistoryRequest, GetTenantRequest, GetTenantResponse, GetUsageRequest, GetUsageResponse,
};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};

use super::output::Output;
use super::rpc::status_error;
use super::{convert, json, parse, render};

/// `allot tenant` commands.
#[derive(Debug, Clone, Subcommand)]
pub enum TenantCommand {
    /// Show what a tenant has and why: plan, status, access, every feature and limit with
    /// the grants that made it and since when, overrides, and current usage.
    Show(ShowArgs),
    /// Print a tenant's audit trail: every change of its entitlements (Admin API,
    /// webhooks, trial ends, scheduled changes, expiring overrides) with when, source,
    /// actor, reason and correlation id, and refused requests; oldest first.
    History(HistoryArgs),
}

/// Options of `allot tenant history`.
#[derive(Debug, Clone, Args)]
pub struct HistoryArgs {
    /// Tenant id; `-` for catalog changes.
    pub tenant: String,
    /// How many of the newest entries to show (at most 10000).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Also print each entry's state before and after (JSON).
    #[arg(long)]
    pub diff: bool,
}

/// Options of `allot tenant show`.
#[derive(Debug, Clone, Args)]
pub struct ShowArgs {
    /// Tenant id.
    pub tenant: String,
    /// Resolve the entitlements at this instant instead of now, e.g. to preview a
    /// scheduled change or a trial end: RFC 3339 (2025-07-01T00:00:00Z) or
    /// now[+-DURATION] (now+30d). Usage is then left out, as it only exists for now.
    #[arg(long, value_name = "INSTANT", value_parser = parse::instant)]
    pub at: Option<DateTime<Utc>>,
    /// Leave out current usage (which costs one extra request per limited metric).
    #[arg(long)]
    pub no_usage: bool,
}

/// Usage per metric, each the answer or the error line of its own request.
type UsageByMetric = Vec<(String, Result<GetUsageResponse, String>)>;

/// Runs `allot tenant show`.
pub async fn run(channel: &Conn, out: Output, cmd: TenantCommand) -> anyhow::Result<()> {
    let args = match cmd {
        TenantCommand::Show(args) => args,
        TenantCommand::History(args) => return history(channel, out, args).await,
    };
    let request = GetTenantRequest {
        tenant: args.tenant.clone(),
        at: args.at.map(convert::to_timestamp),
    };
    let response = AdminClient::new(channel.clone())
        .get_tenant(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let usage = if args.at.is_some() || args.no_usage {
        None
    } else {
        Some(fetch_usage(channel, &args.tenant, &response).await)
    };
    let usage = usage.as_deref();
    out.emit(
        || json::tenant(&args.tenant, &response, usage),
        || render::tenant(&args.tenant, &response, usage),
    )
}

/// Runs `allot tenant history`.
async fn history(channel: &Conn, out: Output, args: HistoryArgs) -> anyhow::Result<()> {
    let tenant = if args.tenant == "-" {
        String::new()
    } else {
        args.tenant.clone()
    };
    let entries = AdminClient::new(channel.clone())
        .get_tenant_history(GetTenantHistoryRequest {
            tenant,
            limit: args.limit,
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .entries;
    out.emit(
        || json::history(&entries),
        || render::history(&args.tenant, &entries, args.diff),
    )
}

/// Metrics with at least one real limit, in the order GetTenant lists them.
fn limited_metrics(r: &GetTenantResponse) -> Vec<String> {
    let mut metrics: Vec<String> = Vec::new();
    for l in &r.limits {
        if l.window != "unlimited" && !metrics.contains(&l.metric) {
            metrics.push(l.metric.clone());
        }
    }
    metrics
}

/// GetUsage for each limited metric. A failure is kept next to its metric instead of
/// failing the whole view: the entitlements are still worth showing.
async fn fetch_usage(channel: &Conn, tenant: &str, r: &GetTenantResponse) -> UsageByMetric {
    let mut client = EnforcerClient::new(channel.clone());
    let mut all = Vec::new();
    for metric in limited_metrics(r) {
        let request = GetUsageRequest {
            tenant: tenant.to_string(),
            metric: metric.clone(),
        };
        let answer = client
            .get_usage(request)
            .await
            .map(tonic::Response::into_inner)
            // The line without its `error: ` prefix: it is shown as a note, not an error.
            .map_err(|s| {
                let line = status_error(s).to_string();
                line.strip_prefix("error: ").unwrap_or(&line).to_string()
            });
        all.push((metric, answer));
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use allot_proto::v1::LimitEntitlement;

    #[test]
    fn usage_is_fetched_once_per_limited_metric() {
        let limit = |metric: &str, window: &str| LimitEntitlement {
            metric: metric.into(),
            window: window.into(),
            ..Default::default()
        };
        let r = GetTenantResponse {
            limits: vec![
                limit("api_calls", "second"),
                limit("api_calls", "month"),
                limit("seats", "none"),
                limit("storage", "unlimited"),
            ],
            ..Default::default()
        };
        assert_eq!(limited_metrics(&r), ["api_calls", "seats"]);
    }
}
