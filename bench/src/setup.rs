//! Connecting to the targets and preparing the node: catalog, subscriptions, and a probe
//! Check that proves the setup works before anything is measured.

use std::net::IpAddr;
use std::time::Duration;

use allot_proto::v1::admin_client::AdminClient;
use allot_proto::v1::enforcer_client::EnforcerClient;
use allot_proto::v1::{
    ApplyCatalogRequest, CheckRequest, CheckResponse, Outcome, PutSubscriptionRequest,
};
use anyhow::{bail, Context as _};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::node::CATALOG_YAML;

/// The plan every bench tenant is subscribed to (see `catalog.yaml`).
pub const PLAN: &str = "bench";
/// The metric the check and reserve-commit scenarios consume.
pub const METRIC: &str = "api_calls";
/// The boolean feature of the check-feature scenario.
pub const FEATURE: &str = "reports";

/// Name of tenant number `i`.
pub fn tenant(i: usize) -> String {
    format!("bench-{i}")
}

/// Refuses any URL whose host is not a loopback address: the bench only loads this machine.
pub fn ensure_loopback(url: &str) -> anyhow::Result<()> {
    let uri: Uri = url
        .parse()
        .with_context(|| format!("--endpoint {url:?} is not a URL"))?;
    let host = uri
        .host()
        .with_context(|| format!("--endpoint {url:?} has no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        bail!("--endpoint {url:?}: the bench only targets loopback (127.0.0.1, ::1, localhost)");
    }
    Ok(())
}

/// Opens `n` separate HTTP/2 connections to `url`.
pub async fn connect(url: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("bad URL {url:?}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5));
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to {url}"))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// Applies the bench catalog and subscribes tenants `bench-0 … bench-{tenants-1}` to
/// plan `bench`.
///
/// On a node that already has another catalog (`--endpoint`), a refused catalog is only
/// a warning: the subscriptions then tell whether plan `bench` exists there.
pub async fn prepare(channel: Channel, tenants: usize, spawned: bool) -> anyhow::Result<()> {
    let mut admin = AdminClient::new(channel);
    let applied = admin
        .apply_catalog(ApplyCatalogRequest {
            yaml: CATALOG_YAML.to_owned(),
            source_name: "bench/catalog.yaml".to_owned(),
            dry_run: false,
            actor: "bench".to_owned(),
        })
        .await;
    match applied {
        Ok(_) => {}
        Err(status) if !spawned && status.code() == tonic::Code::FailedPrecondition => {
            eprintln!(
                "warning: the node refused the bench catalog ({}); going on with its own \
                 catalog, which must have plan `{PLAN}` granting `{METRIC}` and `{FEATURE}`",
                status.message()
            );
        }
        Err(status) => bail!(
            "Admin.ApplyCatalog failed: {:?}: {}",
            status.code(),
            status.message()
        ),
    }
    for i in 0..tenants {
        admin
            .put_subscription(PutSubscriptionRequest {
                tenant: tenant(i),
                plan: PLAN.to_owned(),
                actor: "bench".to_owned(),
                ..Default::default()
            })
            .await
            .map_err(|s| {
                anyhow::anyhow!(
                    "Admin.PutSubscription({}, plan {PLAN}) failed: {:?}: {}",
                    tenant(i),
                    s.code(),
                    s.message()
                )
            })?;
    }
    Ok(())
}

/// The request of the `check` scenario for tenant `i`.
pub fn check_request(i: usize) -> CheckRequest {
    CheckRequest {
        tenant: tenant(i),
        metric: METRIC.to_owned(),
        amount: 1,
        ..Default::default()
    }
}

/// One Check of the `check` scenario, which must be allowed; its answer becomes the
/// ceiling's canned response so both move the same bytes.
pub async fn probe(channel: Channel) -> anyhow::Result<CheckResponse> {
    let mut enforcer = EnforcerClient::new(channel);
    let response = enforcer
        .check(check_request(0))
        .await
        .map_err(|s| {
            anyhow::anyhow!(
                "probe Enforcer.Check failed: {:?}: {}",
                s.code(),
                s.message()
            )
        })?
        .into_inner();
    let decision = response.decision.clone().unwrap_or_default();
    if !matches!(
        decision.outcome(),
        Outcome::Allow | Outcome::AllowWithWarning
    ) {
        bail!(
            "probe Enforcer.Check was not allowed: {:?} {} ({})",
            decision.outcome(),
            decision.reason,
            decision.message
        );
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_only() {
        assert!(ensure_loopback("http://127.0.0.1:50051").is_ok());
        assert!(ensure_loopback("http://localhost:50051").is_ok());
        assert!(ensure_loopback("http://[::1]:50051").is_ok());
        assert!(ensure_loopback("http://10.0.0.1:50051").is_err());
        assert!(ensure_loopback("http://example.com:50051").is_err());
    }
}
