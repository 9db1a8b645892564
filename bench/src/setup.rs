//! Connecting to the targets and preparing the node: catalog, subscriptions, and a probe
//! Check that proves the setup works before anything is measured.

use std::net::IpAddr;
use std::time::Duration;

use allot_proto::v1::admin_client::AdminClient;
use allot_proto::v1::enforcer_client::EnforcerClient;
use allot_proto::v1::{
    ApplyCatalogRequest, CheckRequest, CheckResponse, CommitRequest, GetCatalogRequest, Outcome,
    PutSubscriptionRequest, ReserveRequest,
};
use anyhow::{bail, Context as _};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::node::CATALOG_YAML;
use crate::scenario::authed;

/// The plan every bench tenant is subscribed to (see `catalog.yaml`).
pub const PLAN: &str = "bench";
/// The same plan without feature `reports` (propagation flips between the two).
pub const PLAN_PLAIN: &str = "bench_plain";
/// The metric the check, reserve-commit and hard-reserve scenarios consume (hard limits).
pub const METRIC: &str = "api_calls";
/// The metric of the soft-reserve scenario: the same windows as [`METRIC`], all soft.
pub const SOFT_METRIC: &str = "soft_calls";
/// How the ids of reservations kept in a node's local store begin (soft-only requests on
/// a node with `--redis`; `enforcer/src/engine/soft_route.rs`).
pub const LOCAL_PREFIX: &str = "sf-";

/// Whether a reservation id was made by the node's local store, not by Redis.
pub fn is_local_reservation(id: &str) -> bool {
    id.starts_with(LOCAL_PREFIX)
}
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
/// A node the bench started gets the bench catalog as it is. A running node
/// (`--endpoint`) keeps its own catalog: the bench's metrics, features and plans are
/// added to it where missing (published plan versions cannot be removed), and nothing is
/// applied when they are all there already. `bearer` is the `authorization` of a token
/// with scope `admin`, for nodes that check tokens.
pub async fn prepare(
    channel: Channel,
    tenants: usize,
    spawned: bool,
    bearer: Option<&MetadataValue<Ascii>>,
) -> anyhow::Result<()> {
    let mut admin = AdminClient::new(channel);
    let yaml = if spawned {
        Some(CATALOG_YAML.to_owned())
    } else {
        let current = admin
            .get_catalog(authed(bearer, GetCatalogRequest {}))
            .await
            .map_err(|s| status_error("Admin.GetCatalog", &s))?
            .into_inner()
            .yaml;
        merge_catalog(&current, CATALOG_YAML)?
    };
    if let Some(yaml) = yaml {
        admin
            .apply_catalog(authed(
                bearer,
                ApplyCatalogRequest {
                    yaml,
                    source_name: "bench/catalog.yaml".to_owned(),
                    dry_run: false,
                    actor: "bench".to_owned(),
                    reason: "bench setup".to_owned(),
                },
            ))
            .await
            .map_err(|s| status_error("Admin.ApplyCatalog", &s))?;
    }
    for i in 0..tenants {
        admin
            .put_subscription(authed(
                bearer,
                PutSubscriptionRequest {
                    tenant: tenant(i),
                    plan: PLAN.to_owned(),
                    actor: "bench".to_owned(),
                    ..Default::default()
                },
            ))
            .await
            .map_err(|s| {
                status_error(
                    &format!("Admin.PutSubscription({}, plan {PLAN})", tenant(i)),
                    &s,
                )
            })?;
    }
    Ok(())
}

/// An error for a failed gRPC call made while preparing.
pub fn status_error(call: &str, s: &tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{call} failed: {:?}: {}", s.code(), s.message())
}

/// `current` with the entries of `ours` it lacks under `metrics`, `features` and `plans`
/// added (existing entries win); `None` when nothing is missing.
fn merge_catalog(current: &str, ours: &str) -> anyhow::Result<Option<String>> {
    use serde_yaml_ng::{Mapping, Value};
    if current.trim().is_empty() {
        return Ok(Some(ours.to_owned()));
    }
    let mut merged: Value =
        serde_yaml_ng::from_str(current).context("parsing the node's catalog")?;
    let ours: Value = serde_yaml_ng::from_str(ours).context("parsing the bench catalog")?;
    let root = merged
        .as_mapping_mut()
        .context("the node's catalog is not a mapping")?;
    let mut changed = false;
    for section in ["metrics", "features", "plans"] {
        let Some(entries) = ours.get(section).and_then(Value::as_mapping) else {
            continue;
        };
        let target = root
            .entry(Value::from(section))
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        let target = target
            .as_mapping_mut()
            .with_context(|| format!("the node's catalog: {section} is not a mapping"))?;
        for (code, def) in entries {
            if !target.contains_key(code) {
                target.insert(code.clone(), def.clone());
                changed = true;
            }
        }
    }
    Ok(changed
        .then(|| serde_yaml_ng::to_string(&merged))
        .transpose()?)
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
pub async fn probe(
    channel: Channel,
    bearer: Option<&MetadataValue<Ascii>>,
) -> anyhow::Result<CheckResponse> {
    let mut enforcer = EnforcerClient::new(channel);
    let response = enforcer
        .check(authed(bearer, check_request(0)))
        .await
        .map_err(|s| status_error("probe Enforcer.Check", &s))?
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

/// One Reserve of `metric` (amount 1, idempotency key `key`) for tenant 0, which must be
/// allowed, then its Commit: proves the write path works before anything is measured.
/// Returns the reservation id.
pub async fn probe_reserve(
    channel: Channel,
    metric: &str,
    key: &str,
    bearer: Option<&MetadataValue<Ascii>>,
) -> anyhow::Result<String> {
    let mut enforcer = EnforcerClient::new(channel);
    let reserved = enforcer
        .reserve(authed(
            bearer,
            ReserveRequest {
                tenant: tenant(0),
                metric: metric.to_owned(),
                amount: 1,
                idempotency_key: key.to_owned(),
                ..Default::default()
            },
        ))
        .await
        .map_err(|s| status_error("probe Enforcer.Reserve", &s))?
        .into_inner();
    if let Err(f) = crate::scenario::allowed(reserved.decision.as_ref()) {
        bail!(
            "probe Enforcer.Reserve of {metric} was not allowed: {}",
            f.detail
        );
    }
    let id = reserved.reservation_id;
    enforcer
        .commit(authed(
            bearer,
            CommitRequest {
                tenant: tenant(0),
                reservation_id: id.clone(),
                actual_amount: 1,
            },
        ))
        .await
        .map_err(|s| status_error("probe Enforcer.Commit", &s))?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_missing_entries_only() {
        assert_eq!(
            merge_catalog("", CATALOG_YAML).unwrap().as_deref(),
            Some(CATALOG_YAML)
        );
        let theirs = "version: 1\nmetrics:\n  api_calls: { unit: request }\nplans:\n  free:\n    versions:\n      1: {}\n";
        let merged = merge_catalog(theirs, CATALOG_YAML).unwrap().unwrap();
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&merged).unwrap();
        assert_eq!(v["metrics"]["api_calls"]["unit"], "request");
        assert_eq!(v["features"]["reports"]["kind"], "boolean");
        assert!(v["plans"]["free"].is_mapping() && v["plans"]["bench"].is_mapping());
        assert_eq!(merge_catalog(&merged, CATALOG_YAML).unwrap(), None);
    }

    #[test]
    fn soft_metric_is_soft_only() {
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(CATALOG_YAML).unwrap();
        assert!(v["metrics"][SOFT_METRIC].is_mapping());
        for plan in [PLAN, PLAN_PLAIN] {
            let limits = &v["plans"][plan]["versions"][1]["limits"];
            let soft = limits[SOFT_METRIC].as_sequence().unwrap();
            let hard = limits[METRIC].as_sequence().unwrap();
            // The same windows as the hard metric, so that both paths count two slots.
            let windows = |ls: &[serde_yaml_ng::Value]| -> Vec<_> {
                ls.iter().map(|l| l["window"].clone()).collect()
            };
            assert_eq!(windows(soft), windows(hard), "{plan}");
            for l in soft {
                assert_eq!(l["enforcement"], "soft", "{plan}: {l:?}");
            }
            for l in hard {
                assert!(l.get("enforcement").is_none_or(|e| e == "hard"), "{plan}");
            }
        }
    }

    #[test]
    fn local_reservation_ids() {
        assert!(is_local_reservation("sf-0193c0de-1234@127.0.0.1:4242"));
        assert!(!is_local_reservation("0193c0de-1234"));
        assert!(!is_local_reservation("dg-0193c0de@node"));
        assert!(!is_local_reservation(""));
    }

    #[test]
    fn loopback_only() {
        assert!(ensure_loopback("http://127.0.0.1:50051").is_ok());
        assert!(ensure_loopback("http://localhost:50051").is_ok());
        assert!(ensure_loopback("http://[::1]:50051").is_ok());
        assert!(ensure_loopback("http://10.0.0.1:50051").is_err());
        assert!(ensure_loopback("http://example.com:50051").is_err());
    }
}
