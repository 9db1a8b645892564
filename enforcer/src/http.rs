//! The node's HTTP listener (`--http-listen`): Prometheus metrics, liveness and
//! readiness for load balancers and orchestrators, and billing-provider webhooks.
//!
//! - `GET /metrics`: Prometheus text format ([`crate::metrics`]).
//! - `GET /healthz`: 200 while the process serves HTTP at all (liveness: restart on failure).
//! - `GET /readyz`: 200 when the node can decide requests: a catalog is loaded, its disk
//!   store writes, and its shared store (Redis) answers a PING within the backend
//!   deadline; else 503 naming what is not. A node whose Redis is down still decides by
//!   each limit's failure policy, but a load balancer should prefer nodes that reach it.
//! - `POST /webhooks/stripe`: see [`crate::webhook::http`].

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::embedded::EmbeddedStore;
use crate::engine::Engine;
use crate::metrics;
use crate::peer::Peers;
use crate::redis::RedisStore;
use crate::webhook::http::StripeEndpoint;

/// What the probes and the scrape-time gauges read.
pub struct Probe {
    /// The engine (catalog, breaker).
    pub engine: Arc<Engine>,
    /// The node's disk store (the whole store when embedded).
    pub disk: EmbeddedStore,
    /// Whether the usage store is shared (Redis) rather than `disk`.
    pub shared: bool,
    /// Soft-limit peers.
    pub peers: Arc<Peers>,
    /// The shared store, pinged by readiness.
    pub redis: Option<RedisStore>,
}

impl Probe {
    /// Each readiness check and whether it passes.
    pub async fn checks(&self) -> Vec<(&'static str, bool)> {
        let mut checks = vec![
            ("catalog", self.engine.catalog().is_ok()),
            ("disk", self.disk.healthy()),
        ];
        if let Some(r) = &self.redis {
            checks.push(("redis", r.ping().await.is_ok()));
        }
        checks
    }

    /// Sets the gauges that describe a state, just before a scrape renders them.
    async fn refresh(&self) {
        if let Some(r) = &self.redis {
            let up = r.ping().await.is_ok();
            ::metrics::gauge!(metrics::BACKEND_UP).set(f64::from(u8::from(up)));
        }
        ::metrics::gauge!(metrics::NODES_LIVE).set(self.peers.live_count() as f64);
        for p in self.peers.status() {
            if let Some(age) = p.last_merge_age {
                let peer = if p.node.is_empty() { p.address } else { p.node };
                ::metrics::gauge!(metrics::PEER_MERGE_AGE, "peer" => peer).set(age.as_secs_f64());
            }
        }
        if !self.shared {
            ::metrics::gauge!(metrics::RESERVATIONS_OUTSTANDING)
                .set(self.disk.open_reservations() as f64);
        }
        if let Ok(n) = self.disk.spool_len() {
            ::metrics::gauge!(metrics::SPOOL_BACKLOG).set(n as f64);
        }
    }
}

/// The node's routes.
pub fn router(probe: Arc<Probe>, stripe: Option<Arc<StripeEndpoint>>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(probe)
        .merge(crate::webhook::http::router(stripe))
}

async fn scrape(axum::extract::State(p): axum::extract::State<Arc<Probe>>) -> Response {
    p.refresh().await;
    (
        [("content-type", "text/plain; version=0.0.4")],
        metrics::handle().render(),
    )
        .into_response()
}

async fn ready(axum::extract::State(p): axum::extract::State<Arc<Probe>>) -> Response {
    readiness(&p.checks().await)
}

/// 200 `ready` or 503 naming the failing checks, with every check as JSON.
pub fn readiness(checks: &[(&'static str, bool)]) -> Response {
    let failing: Vec<&str> = checks
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(n, _)| *n)
        .collect();
    let body = serde_json::json!({
        "ready": failing.is_empty(),
        "checks": checks.iter().map(|(n, ok)| (n.to_string(), serde_json::Value::Bool(*ok))).collect::<serde_json::Map<_, _>>(),
        "failing": failing,
    });
    let status = if failing.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}
