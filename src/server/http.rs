//! HTTP: `GET /health` and Prometheus text at `GET /metrics`.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use super::TaskHandle;
use crate::engine::Weir;

pub(super) fn serve(listener: TcpListener, weir: Weir) -> TaskHandle {
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(weir);
    TaskHandle::spawn("http", async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "http server stopped");
        }
    })
}

async fn health() -> &'static str {
    "ok\n"
}

async fn metrics(State(weir): State<Weir>) -> impl IntoResponse {
    let m = weir.metrics();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    metric(
        "weir_connections_total",
        "counter",
        "pgwire sessions opened since start",
        m.connections_total.load(Ordering::Relaxed),
    );
    metric(
        "weir_connections_active",
        "gauge",
        "pgwire sessions open now",
        m.connections_active.load(Ordering::Relaxed),
    );
    metric(
        "weir_statements_total",
        "counter",
        "statements run since start",
        m.statements_total.load(Ordering::Relaxed),
    );
    metric(
        "weir_errors_total",
        "counter",
        "statements that ended in an error since start",
        m.errors_total.load(Ordering::Relaxed),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
