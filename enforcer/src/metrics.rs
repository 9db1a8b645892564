//! The node's Prometheus metrics: their names and meanings, the process-wide recorder,
//! and the tower layer that times every gRPC call. Served at `/metrics` on
//! `--http-listen`; docs/operations.md says what each means and when to alert.
//!
//! Values that are states rather than events (peer lag, outstanding reservations, the
//! backend's breaker) are gauges refreshed when Prometheus scrapes, so they are never
//! older than the scrape.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::PrometheusHandle;

/// gRPC calls by method and status code (histogram of seconds, and a count).
pub const RPC_SECONDS: &str = "allot_rpc_duration_seconds";
/// Decisions by operation, outcome and reason.
pub const DECISIONS: &str = "allot_decisions_total";
/// Entitlement lookups by result: `hit`, `miss` (resolved from the store), `stale`
/// (served past its TTL because the shared store is down).
pub const CACHE: &str = "allot_entitlement_cache_total";
/// Redis script calls by script (histogram of seconds).
pub const REDIS_SECONDS: &str = "allot_redis_script_duration_seconds";
/// Redis script calls by script that got no answer: failed, or given up at the backend
/// deadline.
pub const REDIS_ERRORS: &str = "allot_redis_script_errors_total";
/// 1 when the shared store answered a PING at scrape time, else 0.
pub const BACKEND_UP: &str = "allot_backend_up";
/// Seconds since the last soft-counter merge from each peer.
pub const PEER_MERGE_AGE: &str = "allot_peer_merge_age_seconds";
/// Live nodes sharing node-scope rate limits, this one included.
pub const NODES_LIVE: &str = "allot_nodes_live";
/// Reservations released at their TTL by this node's sweeper.
pub const RESERVATIONS_EXPIRED: &str = "allot_reservations_expired_total";
/// Open reservations in this node's store (embedded store only).
pub const RESERVATIONS_OUTSTANDING: &str = "allot_reservations_outstanding";
/// Usage events in this node's local spool not yet taken (embedded: by an aggregator;
/// with Redis: shipped to the streams).
pub const SPOOL_BACKLOG: &str = "allot_spool_backlog_events";
/// Billing-provider deliveries by provider and verdict.
pub const WEBHOOKS: &str = "allot_webhook_deliveries_total";

/// Histogram buckets (seconds): 100 µs to 2.5 s, dense where decisions live.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The process's recorder, installed on first use; later calls return the same handle.
pub fn handle() -> &'static PrometheusHandle {
    aggregator::metrics::install(BUCKETS, describe)
}

fn describe() {
    describe_histogram!(RPC_SECONDS, Unit::Seconds, "gRPC calls by method and code");
    describe_counter!(DECISIONS, "decisions by operation, outcome and reason");
    describe_counter!(CACHE, "entitlement lookups by result (hit, miss, stale)");
    describe_histogram!(REDIS_SECONDS, Unit::Seconds, "Redis script calls by script");
    describe_counter!(
        REDIS_ERRORS,
        "Redis script calls that failed or passed the backend deadline, by script"
    );
    describe_gauge!(
        BACKEND_UP,
        "1 when the shared store answered a PING at scrape time"
    );
    describe_gauge!(
        PEER_MERGE_AGE,
        Unit::Seconds,
        "age of the last soft-counter merge per peer"
    );
    describe_gauge!(NODES_LIVE, "live nodes, this one included");
    describe_counter!(RESERVATIONS_EXPIRED, "reservations released at their TTL");
    describe_gauge!(
        RESERVATIONS_OUTSTANDING,
        "open reservations (embedded store)"
    );
    describe_gauge!(
        SPOOL_BACKLOG,
        "usage events in the local spool not yet taken"
    );
    describe_counter!(
        WEBHOOKS,
        "billing-provider deliveries by provider and verdict"
    );
}

/// Times every call through the gRPC server.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcMetricsLayer;

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner }
    }
}

/// See [`RpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_string();
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            // Errors answer with the status in the headers (trailers-only); a success
            // carries it in the trailers, after this point: absent means OK.
            let code = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("0")
                .to_string();
            metrics::histogram!(RPC_SECONDS, "method" => method, "code" => code)
                .record(started.elapsed().as_secs_f64());
            Ok(resp)
        })
    }
}
