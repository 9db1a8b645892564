//! Decisions: what Allot answers, and why.
//!
//! A [`Decision`] is built from a request plan ([`crate::quota::RequestPlan`]) and the
//! usage a store reported; the reason codes here are the API's vocabulary and must stay
//! stable (services branch on them).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::window::Window;

/// Allowed, allowed with a warning, or denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Outcome {
    /// Go ahead.
    Allow,
    /// Go ahead, but a threshold or soft limit was passed.
    AllowWithWarning,
    /// Do not.
    Deny,
}

impl Outcome {
    /// Whether the request may go ahead.
    pub fn allowed(self) -> bool {
        !matches!(self, Outcome::Deny)
    }

    /// The name used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::AllowWithWarning => "allow_with_warning",
            Outcome::Deny => "deny",
        }
    }
}

/// Why a decision came out as it did. Stable codes: see [`Reason::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Within every limit.
    Ok,
    /// Allowed, and a warning threshold (e.g. 80%) of a limit is passed.
    NearLimit,
    /// Allowed past a soft limit, within its overage allowance.
    Overage,
    /// The plan (with add-ons and overrides) does not include the feature or metric.
    FeatureNotInPlan,
    /// The request would pass a limit.
    LimitExceeded,
    /// A gauge is already above its limit (e.g. after a downgrade): what exists stays, new
    /// additions are refused.
    AboveLimitAfterDowngrade,
    /// One request asks for more than a limit's per-request maximum.
    PerRequestMaxExceeded,
    /// A token bucket (per second or minute) is empty; see `retry_after`.
    RateLimited,
    /// The amount can never fit the rate limit's burst.
    ExceedsBurst,
    /// The subscription's status gives no access (suspended, canceled…).
    SubscriptionInactive,
    /// The subscription's status gives read-only access: nothing can be consumed (but the
    /// metrics the catalog's rule keeps consumable).
    SubscriptionReadOnly,
    /// The catalog's access rule for the subscription's status turns this feature (or
    /// the metered feature of this metric) off.
    SubscriptionRestricted,
    /// The backend could not be reached and the limit fails open: allowed, reconciled later.
    DegradedFailOpen,
    /// The backend could not be reached and the limit fails closed.
    BackendUnavailable,
}

impl Reason {
    /// The wire code.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Ok => "ok",
            Reason::NearLimit => "near_limit",
            Reason::Overage => "overage",
            Reason::FeatureNotInPlan => "feature_not_in_plan",
            Reason::LimitExceeded => "limit_exceeded",
            Reason::AboveLimitAfterDowngrade => "above_limit_after_downgrade",
            Reason::PerRequestMaxExceeded => "per_request_max_exceeded",
            Reason::RateLimited => "rate_limited",
            Reason::ExceedsBurst => "exceeds_burst",
            Reason::SubscriptionInactive => "subscription_inactive",
            Reason::SubscriptionReadOnly => "subscription_read_only",
            Reason::SubscriptionRestricted => "subscription_restricted",
            Reason::DegradedFailOpen => "degraded_fail_open",
            Reason::BackendUnavailable => "backend_unavailable",
        }
    }
}

/// A way to be allowed: a plan to move to, or an add-on to buy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum UpgradeOption {
    /// Move to this plan version.
    Plan {
        /// Plan code.
        code: String,
        /// Its newest published version.
        version: u32,
    },
    /// Add this add-on.
    Addon {
        /// Add-on code.
        code: String,
    },
}

/// The answer to a check, reserve or record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Allow, warn or deny.
    pub outcome: Outcome,
    /// Why.
    pub reason: Reason,
    /// One sentence for people (logs, support).
    pub message: String,
    /// The window that decided (the tightest one when allowed).
    pub window: Option<Window>,
    /// That window's limit (`None`: unlimited).
    pub limit: Option<u64>,
    /// Units used in that window before this request (committed).
    pub used: u64,
    /// Units held by open reservations in that window before this request.
    pub reserved: u64,
    /// Units still available in that window after this request (before it, when denied).
    pub remaining: Option<u64>,
    /// When a denied request may be retried with a chance of success.
    pub retry_after: Option<Duration>,
    /// When that window starts over.
    pub resets_at: Option<DateTime<Utc>>,
    /// The highest warning threshold passed, in percent.
    pub warning_percent: Option<u8>,
    /// The request was allowed as overage past a soft limit.
    pub overage: bool,
    /// What would allow a denied request.
    pub upgrade: Vec<UpgradeOption>,
}

impl Decision {
    /// A decision with no window involved.
    pub fn simple(outcome: Outcome, reason: Reason, message: impl Into<String>) -> Decision {
        Decision {
            outcome,
            reason,
            message: message.into(),
            window: None,
            limit: None,
            used: 0,
            reserved: 0,
            remaining: None,
            retry_after: None,
            resets_at: None,
            warning_percent: None,
            overage: false,
            upgrade: Vec::new(),
        }
    }

    /// Allowed with nothing to say.
    pub fn allow() -> Decision {
        Decision::simple(Outcome::Allow, Reason::Ok, "allowed")
    }

    /// Denied for `reason`.
    pub fn deny(reason: Reason, message: impl Into<String>) -> Decision {
        Decision::simple(Outcome::Deny, reason, message)
    }
}
