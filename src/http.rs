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
