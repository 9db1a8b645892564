//! Overrides (grants): time-boxed changes to one tenant's entitlements, made by a person
//! with a reason. They apply only inside `[valid_from, valid_to)` and so expire by
//! themselves; nothing has to delete them for enforcement to stop.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, FeatureKind, FeatureValue, MetricKind};
use crate::quota::RequestError;
use crate::window::Window;

/// A time-boxed change for one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Override {
    /// Unique id (used to revoke it, and as its provenance).
    pub id: String,
    /// The tenant it applies to.
    pub tenant: String,
    /// What it changes.
    pub change: Change,
    /// First instant it applies.
    pub valid_from: DateTime<Utc>,
    /// First instant it no longer applies; `None` is until revoked.
    pub valid_to: Option<DateTime<Utc>>,
    /// Who made it.
    pub actor: String,
    /// Why.
    pub reason: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
}

/// What an override changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// Turns a boolean or metered feature on (metered: unlimited unless limits apply).
    EnableFeature {
        /// Feature code.
        feature: String,
    },
    /// Turns a feature off, whatever the plan says.
    DisableFeature {
        /// Feature code.
        feature: String,
    },
    /// Sets a config feature's value (beats plan and add-ons).
    SetConfig {
        /// Feature code.
        feature: String,
        /// The value.
        value: FeatureValue,
    },
    /// Replaces a limit's amount (or rate, for rate windows).
    SetLimit {
        /// Metric code.
        metric: String,
        /// Which window's limit.
        window: Window,
        /// The new amount.
        amount: u64,
    },
    /// Adds to a limit's amount (or rate).
    RaiseLimit {
        /// Metric code.
        metric: String,
        /// Which window's limit.
        window: Window,
        /// Units added.
        by: u64,
    },
    /// One-time extra units on every quota window of a metric while the grant lasts
    /// (+10K API calls for 48h).
    ExtraUnits {
        /// Metric code.
        metric: String,
        /// Units added.
        amount: u64,
    },
}

impl Override {
    /// Whether it applies at `at`.
    pub fn active_at(&self, at: DateTime<Utc>) -> bool {
        self.valid_from <= at && self.valid_to.is_none_or(|to| at < to)
    }

    /// Checks the override against the catalog; errors name the request field.
    pub fn check_against(&self, catalog: &Catalog) -> Result<(), RequestError> {
        let invalid = |field: &str, reason: &str| RequestError::Invalid {
            field: field.into(),
            reason: reason.into(),
        };
        if self.valid_to.is_some_and(|to| to <= self.valid_from) {
            return Err(invalid("valid_to", "must be after valid_from"));
        }
        if self.actor.trim().is_empty() {
            return Err(invalid(
                "actor",
                "must not be empty: say who made the change",
            ));
        }
        if self.reason.trim().is_empty() {
            return Err(invalid("reason", "must not be empty: say why"));
        }
        let feature = |code: &str| {
            catalog
                .features
                .get(code)
                .ok_or_else(|| RequestError::NotFound {
                    field: "feature".into(),
                    reason: format!("unknown feature {code:?}"),
                })
        };
        let metric = |code: &str| {
            catalog
                .metrics
                .get(code)
                .ok_or_else(|| RequestError::NotFound {
                    field: "metric".into(),
                    reason: format!("unknown metric {code:?}"),
                })
        };
        let too_big = |v: u64| v > crate::catalog::MAX_AMOUNT;
        match &self.change {
            Change::EnableFeature { feature: f } => {
                if feature(f)?.kind == FeatureKind::Config {
                    return Err(invalid("feature", "a config feature takes set_config"));
                }
            }
            Change::DisableFeature { feature: f } => {
                feature(f)?;
            }
            Change::SetConfig { feature: f, value } => {
                if feature(f)?.kind != FeatureKind::Config {
                    return Err(invalid("feature", "only config features take set_config"));
                }
                if matches!(value, FeatureValue::Bool(_)) {
                    return Err(invalid(
                        "value",
                        "a config value is a number, string or list",
                    ));
                }
            }
            Change::SetLimit {
                metric: m,
                window,
                amount: v,
            }
            | Change::RaiseLimit {
                metric: m,
                window,
                by: v,
            } => {
                let def = metric(m)?;
                if (def.kind == MetricKind::Gauge) != (*window == Window::None) {
                    return Err(invalid(
                        "window",
                        "does not fit the metric (gauges take none)",
                    ));
                }
                if too_big(*v) {
                    return Err(invalid("amount", "is too large (at most 2^63-1)"));
                }
                if window.is_rate() && *v == 0 && matches!(self.change, Change::SetLimit { .. }) {
                    return Err(invalid(
                        "amount",
                        "a rate limit is at least 1; disable the feature to stop all use",
                    ));
                }
            }
            Change::ExtraUnits { metric: m, amount } => {
                metric(m)?;
                if *amount == 0 {
                    return Err(invalid("amount", "must be at least 1"));
                }
                if too_big(*amount) {
                    return Err(invalid("amount", "is too large (at most 2^63-1)"));
                }
            }
        }
        Ok(())
    }
}
