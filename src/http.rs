//! `/healthz` (the process is alive), `/readyz` (connected to both ends, slot lag under
//! `monitor.lag_fail_bytes`), `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::error::{Error, Result};
use crate::metrics::Health;

/// Bind and serve until `shutdown` fires. Binding errors are fatal (the address is
/// configuration).
pub async fn serve(
    listen: SocketAddr,
    health: Arc<Health>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        Error::fatal(format!("http.listen {listen}: {e}"))
            .hint("choose a free address for [http] listen, or \"\" to disable it")
    })?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(health);
    Ok(tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "http server ended");
        }
    }))
}

async fn readyz(State(h): State<Arc<Health>>) -> (StatusCode, String) {
    match h.not_ready() {
        None => (StatusCode::OK, "ready\n".into()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// Readiness and the last error as JSON, for `outbox-relay status` (errors never carry
/// secrets: URLs in them are redacted where they are made).
async fn status(State(h): State<Arc<Health>>) -> axum::Json<serde_json::Value> {
    let (last_error, age) = h.last_error_seen().unzip();
    axum::Json(serde_json::json!({
        "ready": h.ready(),
        "role": h.role(),
        "not_ready": h.not_ready(),
        "last_error": last_error,
        "last_error_age_seconds": age,
    }))
}

async fn metrics(
    State(h): State<Arc<Health>>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        h.render(),
    )
}
