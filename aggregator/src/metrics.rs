//! The aggregator's Prometheus metrics (served by `allot aggregate --http-listen` at
//! `/metrics`); docs/operations.md says what each means and when to alert.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::sink::ClickHouse;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// ClickHouse inserts of usage events by result (`ok`, `failed`), in seconds.
pub const INSERT_SECONDS: &str = "allot_aggregator_insert_duration_seconds";
/// Usage-event rows inserted into ClickHouse.
pub const ROWS_INSERTED: &str = "allot_aggregator_rows_inserted_total";
/// Entries moved to the dead letters.
pub const DEAD_LETTERS: &str = "allot_aggregator_dead_letters_total";
/// Entries in each held partition's stream after its last batch (not yet acknowledged).
pub const BACKLOG: &str = "allot_aggregator_backlog_events";
/// Partitions this aggregator holds.
pub const PARTITIONS: &str = "allot_aggregator_partitions_held";

const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The process's recorder, installed on first use with `buckets` (seconds) and the
/// `describe` of the binary's metrics; later calls return the same handle, whoever made
/// it (one process is a node or an aggregator, never both).
pub fn install(buckets: &[f64], describe: fn()) -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(buckets)
            .expect("buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder already installed (a test harness) keeps its place.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

/// The aggregator's recorder (see [`install`]).
pub fn handle() -> &'static PrometheusHandle {
    install(BUCKETS, describe)
}

fn describe() {
    describe_histogram!(
        INSERT_SECONDS,
        Unit::Seconds,
        "ClickHouse inserts by result"
    );
    describe_counter!(ROWS_INSERTED, "usage-event rows inserted");
    describe_counter!(DEAD_LETTERS, "entries moved to the dead letters");
    describe_gauge!(BACKLOG, "entries left in each held partition's stream");
    describe_gauge!(PARTITIONS, "partitions this aggregator holds");
}

/// Whether the source (Redis, or the nodes' spools) answered the last heartbeat.
pub static SOURCE_UP: AtomicBool = AtomicBool::new(false);

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until the process ends.
/// Readiness: ClickHouse answers a query and the source answered its last heartbeat.
pub async fn serve(addr: SocketAddr, sink: ClickHouse) -> std::io::Result<()> {
    handle();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = Router::new()
        .route(
            "/metrics",
            get(|| async {
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    handle().render(),
                )
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let sink = sink.clone();
                async move {
                    let clickhouse = sink.ping().await.is_ok();
                    let source = SOURCE_UP.load(Ordering::Relaxed);
                    let ready = clickhouse && source;
                    let body = serde_json::json!({
                        "ready": ready,
                        "checks": {"clickhouse": clickhouse, "source": source},
                    });
                    let status = if ready {
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
            }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP listener stopped");
        }
    });
    Ok(())
}
