//! Which tenants are entitled to something right now, kept current: for background jobs
//! (say, reconfirming bookings) that must work only for entitled tenants and stop for one
//! the moment its entitlement ends.
//!
//! A watch first lists every tenant entitled now, then reports each change. A tenant is
//! looked at again when its entitlements change (an Admin change on this node, or one
//! announced by another node through Redis), at the instant its entitlements change by
//! themselves (a trial end, a scheduled downgrade, an expiring override: resolution says
//! when), and, for a metric's headroom, which usage moves all the time, every `recheck`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use meter::decision::Outcome;
use tokio::sync::{broadcast, mpsc};

use super::{Engine, EngineError};

/// What a watch is about.
#[derive(Debug, Clone)]
pub enum Want {
    /// The feature is on (and the subscription allows access).
    Feature(String),
    /// `amount` more units of the metric would be allowed now.
    Metric {
        /// Metric code.
        metric: String,
        /// Units.
        amount: i64,
    },
}

/// One report of a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// The tenant is (or is no longer) entitled; `reason` is the decision's reason code.
    Tenant {
        /// Tenant.
        tenant: String,
        /// Entitled now.
        entitled: bool,
        /// The decision's reason (`ok`, `feature_not_in_plan`, `limit_exceeded`…).
        reason: String,
        /// When this was found.
        at: DateTime<Utc>,
    },
    /// Every tenant entitled when the watch began has been listed.
    SnapshotDone,
}

/// The message on the change channel that means "every tenant".
pub const ALL: &str = "";

impl Engine {
    /// Tenants whose entitlements changed ([`ALL`]: maybe every one).
    pub fn changes(&self) -> broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    /// Drops a tenant's cached entitlements and tells the watches.
    pub(crate) fn changed(&self, tenant: &str) {
        self.cache.invalidate(tenant);
        let _ = self.changes.send(tenant.to_string());
    }

    /// Whether `tenant` has `want` now; the reason; and the next instant its
    /// entitlements change by themselves.
    pub async fn entitled(
        &self,
        tenant: &str,
        want: &Want,
    ) -> Result<(bool, String, Option<DateTime<Utc>>), EngineError> {
        let decision = match want {
            Want::Feature(f) => self.check_feature(tenant, f).await?.decision,
            Want::Metric { metric, amount } => {
                self.check_metric(tenant, metric, *amount, &BTreeMap::new())
                    .await?
                    .0
            }
        };
        let until = self
            .context(tenant, self.now())
            .await?
            .entitlements
            .valid_until;
        let ok = decision.outcome != Outcome::Deny;
        Ok((ok, decision.reason.as_str().to_string(), until))
    }

    /// Starts a watch of `want`; its reports arrive on the receiver until it is dropped.
    /// The first error (an unknown feature, say) is the last report.
    pub async fn watch(
        self: &Arc<Self>,
        want: Want,
        recheck: Duration,
    ) -> Result<mpsc::Receiver<Result<Report, EngineError>>, EngineError> {
        let catalog = self.catalog()?.1;
        match &want {
            Want::Feature(f) if !catalog.features.contains_key(f) => {
                return Err(EngineError::not_found(
                    "feature",
                    format!("unknown feature {f:?}"),
                ))
            }
            Want::Metric { metric, .. } if !catalog.metrics.contains_key(metric) => {
                return Err(EngineError::not_found(
                    "metric",
                    format!("unknown metric {metric:?}"),
                ))
            }
            Want::Metric { amount, .. } if *amount <= 0 => {
                return Err(EngineError::invalid("amount", "must be positive"))
            }
            _ => {}
        }
        let (tx, rx) = mpsc::channel(256);
        let engine = self.clone();
        tokio::spawn(async move {
            if let Err(e) = engine.run_watch(&want, recheck, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(rx)
    }

    async fn run_watch(
        &self,
        want: &Want,
        recheck: Duration,
        tx: &mpsc::Sender<Result<Report, EngineError>>,
    ) -> Result<(), EngineError> {
        // Subscribed before listing, so that no change between the two is missed.
        let mut changes = self.changes();
        let mut known: BTreeMap<String, (bool, Option<DateTime<Utc>>)> = BTreeMap::new();
        for tenant in self.control.tenants().await? {
            let (ok, reason, until) = self.entitled(&tenant, want).await?;
            if ok && !self.send(tx, &tenant, ok, &reason).await {
                return Ok(());
            }
            known.insert(tenant, (ok, until));
        }
        if tx.send(Ok(Report::SnapshotDone)).await.is_err() {
            return Ok(());
        }
        let periodic = matches!(want, Want::Metric { .. });
        loop {
            let now = self.now();
            let next_change = known.values().filter_map(|(_, u)| *u).min();
            let mut wait = if periodic {
                recheck
            } else {
                Duration::from_secs(3600)
            };
            if let Some(t) = next_change {
                wait = wait.min((t - now).to_std().unwrap_or(Duration::ZERO));
            }
            let due: Vec<String> = tokio::select! {
                _ = tx.closed() => return Ok(()),
                got = changes.recv() => match got {
                    Ok(t) if t != ALL => vec![t],
                    // Everything may have changed (a catalog, a lost announcement, a lag).
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.control.tenants().await?
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                _ = tokio::time::sleep(wait) => {
                    let now = self.now();
                    if periodic {
                        known.keys().cloned().collect()
                    } else {
                        known
                            .iter()
                            .filter(|(_, (_, u))| u.is_some_and(|u| u <= now))
                            .map(|(t, _)| t.clone())
                            .collect()
                    }
                }
            };
            for tenant in due {
                let (ok, reason, until) = match self.entitled(&tenant, want).await {
                    Ok(r) => r,
                    // A tenant removed meanwhile is no longer entitled.
                    Err(EngineError::NotFound { .. }) => (false, "unknown_tenant".into(), None),
                    Err(e) => return Err(e),
                };
                let was = known.insert(tenant.clone(), (ok, until)).map(|(o, _)| o);
                if was != Some(ok)
                    && (was.is_some() || ok)
                    && !self.send(tx, &tenant, ok, &reason).await
                {
                    return Ok(());
                }
            }
        }
    }

    async fn send(
        &self,
        tx: &mpsc::Sender<Result<Report, EngineError>>,
        tenant: &str,
        entitled: bool,
        reason: &str,
    ) -> bool {
        tx.send(Ok(Report::Tenant {
            tenant: tenant.to_string(),
            entitled,
            reason: reason.to_string(),
            at: self.now(),
        }))
        .await
        .is_ok()
    }
}
