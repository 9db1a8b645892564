//! The webhook endpoint: `POST /webhooks/stripe` on the node's HTTP listener
//! (`--http-listen`).
//!
//! The provider's signature is the credential: a delivery is read only after its
//! `Stripe-Signature` checks out against the configured secret within the tolerance.
//! Answers follow what makes Stripe do the right thing (see [`super::stripe`]):
//!
//! | delivery | answer | ledger |
//! |---|---|---|
//! | applied, no effect, refused transition, stale, duplicate | 200, JSON report | tenant's entry saying which and why |
//! | unknown or unhandled type, not about a subscription | 200 | provider-wide (`""`) entry `stripe.ignored` |
//! | bad or missing signature, timestamp outside the tolerance | 400 | provider-wide entry `stripe.refused` |
//! | unreadable payload, unmapped price | 500 (Stripe retries once the config is fixed) | provider-wide entry `stripe.unreadable` |
//! | a refund or dispute of a payment not seen yet | 503 (Stripe redelivers) | none yet |
//! | the store unreachable | 503 | none |
//! | body over 1 MiB | 413 | none |

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;

use super::stripe::{Parsed, StripeAdapter, WebhookError};
use super::sync::{ProviderSync, Report};
use crate::engine::EngineError;

/// Largest delivery read; Stripe's events are a few kilobytes.
pub const MAX_BODY: usize = 1 << 20;

/// What the Stripe route needs.
pub struct StripeEndpoint {
    /// Verifies and parses deliveries.
    pub adapter: StripeAdapter,
    /// Applies them.
    pub sync: ProviderSync,
}

/// The routes of the webhook endpoint.
pub fn router(stripe: Option<Arc<StripeEndpoint>>) -> Router {
    let mut app = Router::new();
    if let Some(s) = stripe {
        app = app.route("/webhooks/stripe", post(stripe_delivery).with_state(s));
    }
    app.layer(DefaultBodyLimit::max(MAX_BODY))
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn failed(e: EngineError) -> Response {
    let status = match e {
        EngineError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    tracing::warn!(error = %e, "webhook delivery not applied; the provider will redeliver");
    answer(status, serde_json::json!({ "error": e.to_string() }))
}

fn counted(verdict: &'static str) {
    metrics::counter!(crate::metrics::WEBHOOKS, "provider" => "stripe", "verdict" => verdict)
        .increment(1);
}

fn reported(r: &Report) -> Response {
    counted(r.verdict);
    tracing::info!(
        event = %r.event_id, object = %r.object_id, tenant = r.tenant.as_deref().unwrap_or(""),
        verdict = r.verdict, changed = r.changed, reason = %r.reason, "stripe event"
    );
    answer(StatusCode::OK, serde_json::to_value(r).unwrap_or_default())
}

/// The event id of a payload we could not parse, if it has one (for the audit trail).
fn event_id_of(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_string))
        .unwrap_or_default()
}

async fn stripe_delivery(
    State(s): State<Arc<StripeEndpoint>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let sync = &s.sync;
    let now = sync.engine().now();
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let parsed = match s.adapter.receive(signature, &body, now) {
        Ok(p) => p,
        Err(e) => {
            let (status, action) = match &e {
                WebhookError::Signature(_) => (StatusCode::BAD_REQUEST, "stripe.refused"),
                WebhookError::Parse(_) => (StatusCode::INTERNAL_SERVER_ERROR, "stripe.unreadable"),
            };
            counted(if status == StatusCode::BAD_REQUEST {
                "refused"
            } else {
                "unreadable"
            });
            tracing::warn!(error = %e, "stripe delivery refused");
            // Unverified deliveries name no tenant we could trust: recorded provider-wide.
            let id = format!("stripe:{}:{}", action, uuid::Uuid::now_v7().simple());
            let claimed = event_id_of(&body);
            if let Err(e) = sync
                .record_refusal(id, "", action, e.to_string(), &claimed)
                .await
            {
                return failed(e);
            }
            return answer(status, serde_json::json!({ "error": e.to_string() }));
        }
    };
    match parsed {
        Parsed::Ignored(i) => {
            counted("ignored");
            tracing::info!(event = %i.event_id, kind = %i.event_type, reason = %i.reason, "stripe event ignored");
            let reason = format!(
                "{}: {}; acknowledged, nothing changed",
                i.event_type, i.reason
            );
            if let Err(e) = sync
                .record_refusal(
                    format!("stripe:{}", i.event_id),
                    "",
                    "stripe.ignored",
                    reason.clone(),
                    &i.event_id,
                )
                .await
            {
                return failed(e);
            }
            answer(
                StatusCode::OK,
                serde_json::json!({ "event_id": i.event_id, "verdict": "ignored", "reason": reason }),
            )
        }
        Parsed::Event(r) => {
            if let Err(e) = sync.link(&r.event.object_id, &r.links).await {
                return failed(e);
            }
            match sync.apply(r.event).await {
                Ok(report) => reported(&report),
                Err(e) => failed(e),
            }
        }
        Parsed::NeedsSubscription(u) => match sync.linked(&u.payments).await {
            Ok(Some(object)) => match sync.apply(u.link(object)).await {
                Ok(report) => reported(&report),
                Err(e) => failed(e),
            },
            Ok(None) => {
                let reason = format!(
                    "{} {}: no subscription known yet for payment {}; redeliver once its invoice event has arrived",
                    u.event_type,
                    u.event_id,
                    u.payments.join(", ")
                );
                tracing::warn!("{reason}");
                answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({ "error": reason }),
                )
            }
            Err(e) => failed(e),
        },
    }
}
