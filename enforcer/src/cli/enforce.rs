//! The Enforcer commands: `check`, `reserve`, `commit`, `release`, `record` and `usage`,
//! their options and the calls they make.

use std::time::Duration;

use super::rpc::Conn;
use allot_proto::v1::enforcer_client::EnforcerClient;
use allot_proto::v1::{
    CheckRequest, CommitRequest, GetUsageRequest, Outcome, RecordRequest, ReleaseRequest,
    ReserveRequest,
};
use clap::{ArgGroup, Args};

use super::output::Output;
use super::rpc::{fail, status_error};
use super::{convert, json, parse, render};

/// Request dimensions, shared by the commands that take them.
#[derive(Debug, Clone, Args)]
pub struct DimArgs {
    /// A request dimension as KEY=VALUE, e.g. api_key=k1 for per-key rate limits;
    /// repeat for several.
    #[arg(long = "dim", value_name = "KEY=VALUE", value_parser = parse::dimension)]
    pub dims: Vec<(String, String)>,
}

impl DimArgs {
    fn map(&self) -> anyhow::Result<std::collections::HashMap<String, String>> {
        parse::dimensions(&self.dims).map_err(fail)
    }
}

/// Options of `allot check`.
#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["feature", "metric"])))]
pub struct CheckArgs {
    /// Tenant id.
    #[arg(long)]
    pub tenant: String,
    /// Feature to check: whether it is on for the tenant, and its value for config
    /// features.
    #[arg(long)]
    pub feature: Option<String>,
    /// Metric to check: whether --amount more units would fit every limit now.
    #[arg(long)]
    pub metric: Option<String>,
    /// Units to check for (default 0: only whether the metric is granted at all).
    #[arg(long, conflicts_with = "feature", allow_negative_numbers = true)]
    pub amount: Option<i64>,
    #[command(flatten)]
    pub dims: DimArgs,
}

/// Options of `allot reserve`.
#[derive(Debug, Clone, Args)]
pub struct ReserveArgs {
    /// Tenant id.
    #[arg(long)]
    pub tenant: String,
    /// Metric to hold units of.
    #[arg(long)]
    pub metric: String,
    /// Units to hold (at least 1), in every applicable window or in none.
    #[arg(long, allow_negative_numbers = true)]
    pub amount: i64,
    /// Idempotency key: a retry with the same key returns the first grant instead of
    /// reserving again. Default: a new random UUID, printed so that you can retry with it.
    #[arg(long)]
    pub key: Option<String>,
    /// How long the hold lasts if neither committed nor released, e.g. 30s, 5m (at most
    /// 24h). Default: the node's, 60s.
    #[arg(long, value_parser = parse::duration)]
    pub ttl: Option<Duration>,
    #[command(flatten)]
    pub dims: DimArgs,
}

/// Options of `allot commit`.
#[derive(Debug, Clone, Args)]
pub struct CommitArgs {
    /// Tenant id (the one that reserved).
    #[arg(long)]
    pub tenant: String,
    /// Reservation id, as printed by `allot reserve`.
    #[arg(long)]
    pub reservation: String,
    /// Units actually used: from 0 up to the amount reserved; the rest is returned. To
    /// count more than was reserved, `allot record` the excess.
    #[arg(long, allow_negative_numbers = true)]
    pub amount: i64,
}

/// Options of `allot release`.
#[derive(Debug, Clone, Args)]
pub struct ReleaseArgs {
    /// Tenant id (the one that reserved).
    #[arg(long)]
    pub tenant: String,
    /// Reservation id, as printed by `allot reserve`.
    #[arg(long)]
    pub reservation: String,
}

/// Options of `allot record`.
#[derive(Debug, Clone, Args)]
pub struct RecordArgs {
    /// Tenant id.
    #[arg(long)]
    pub tenant: String,
    /// Metric to count.
    #[arg(long)]
    pub metric: String,
    /// Units to count. Gauges (seats, credit exposure) also take negative amounts, e.g.
    /// --amount -1 when a seat is freed; a gauge never goes below zero.
    #[arg(long, allow_negative_numbers = true)]
    pub amount: i64,
    /// Event id: a second record with the same id counts nothing and returns the first
    /// answer. Default: a new random UUID, printed so that you can retry with it.
    #[arg(long)]
    pub event_id: Option<String>,
    /// When the usage happened, RFC 3339 or now-DURATION (e.g. now-3days). A late event
    /// counts in the windows of its time; one older than the node's --max-lateness is
    /// refused. Default: now.
    #[arg(long, value_name = "INSTANT", value_parser = super::parse::instant)]
    pub at: Option<chrono::DateTime<chrono::Utc>>,
    #[command(flatten)]
    pub dims: DimArgs,
}

/// Options of `allot usage`.
#[derive(Debug, Clone, Args)]
pub struct UsageArgs {
    /// Tenant id.
    #[arg(long)]
    pub tenant: String,
    /// Metric whose windows to show.
    #[arg(long)]
    pub metric: String,
}

fn client(channel: &Conn) -> EnforcerClient<Conn> {
    EnforcerClient::new(channel.clone())
}

/// Runs `allot check`; returns whether the decision was DENY, for the exit status.
pub async fn check(channel: &Conn, out: Output, args: CheckArgs) -> anyhow::Result<bool> {
    let request = CheckRequest {
        tenant: args.tenant,
        feature: args.feature.unwrap_or_default(),
        metric: args.metric.unwrap_or_default(),
        amount: args.amount.unwrap_or(0),
        dimensions: args.dims.map()?,
    };
    let response = client(channel)
        .check(request)
        .await
        .map_err(status_error)?
        .into_inner();
    out.emit(|| json::check(&response), || render::check(&response))?;
    Ok(response
        .decision
        .is_some_and(|d| d.outcome() == Outcome::Deny))
}

/// Runs `allot reserve`.
pub async fn reserve(channel: &Conn, out: Output, args: ReserveArgs) -> anyhow::Result<()> {
    let key = args.key.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let request = ReserveRequest {
        tenant: args.tenant,
        metric: args.metric,
        amount: args.amount,
        idempotency_key: key.clone(),
        ttl: args.ttl.map(convert::to_duration),
        dimensions: args.dims.map()?,
    };
    let response = client(channel)
        .reserve(request)
        .await
        .map_err(status_error)?
        .into_inner();
    out.emit(
        || json::reserve(&response, &key),
        || render::reserve(&response, &key),
    )
}

/// Runs `allot commit`.
pub async fn commit(channel: &Conn, out: Output, args: CommitArgs) -> anyhow::Result<()> {
    let request = CommitRequest {
        tenant: args.tenant,
        reservation_id: args.reservation,
        actual_amount: args.amount,
    };
    let response = client(channel)
        .commit(request)
        .await
        .map_err(status_error)?
        .into_inner();
    out.emit(|| json::commit(&response), || render::commit(&response))
}

/// Runs `allot release`.
pub async fn release(channel: &Conn, out: Output, args: ReleaseArgs) -> anyhow::Result<()> {
    let request = ReleaseRequest {
        tenant: args.tenant,
        reservation_id: args.reservation,
    };
    let response = client(channel)
        .release(request)
        .await
        .map_err(status_error)?
        .into_inner();
    out.emit(|| json::release(&response), || render::release(&response))
}

/// Runs `allot record`.
pub async fn record(channel: &Conn, out: Output, args: RecordArgs) -> anyhow::Result<()> {
    let event_id = args
        .event_id
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let request = RecordRequest {
        tenant: args.tenant,
        metric: args.metric,
        amount: args.amount,
        event_id: event_id.clone(),
        dimensions: args.dims.map()?,
        event_time: args.at.map(super::convert::to_timestamp),
    };
    let response = client(channel)
        .record(request)
        .await
        .map_err(status_error)?
        .into_inner();
    out.emit(
        || json::record(&response, &event_id),
        || render::record(&response, &event_id),
    )
}

/// Runs `allot usage`.
pub async fn usage(channel: &Conn, out: Output, args: UsageArgs) -> anyhow::Result<()> {
    let request = GetUsageRequest {
        tenant: args.tenant,
        metric: args.metric,
    };
    let response = client(channel)
        .get_usage(request)
        .await
        .map_err(status_error)?
        .into_inner();
    out.emit(|| json::usage(&response), || render::usage(&response))
}
