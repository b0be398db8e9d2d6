//! `/metrics`, `/health` and `/ready` of a long-running operator role.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::telemetry::Metrics;

/// Shared by the probes: readiness flips once the role has started its work.
#[derive(Debug, Clone, Default)]
pub struct Probes {
    ready: Arc<AtomicBool>,
}

impl Probes {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
}

#[derive(Clone)]
struct OpsState {
    metrics: Arc<Metrics>,
    probes: Probes,
}

pub fn router(metrics: Arc<Metrics>, probes: Probes) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .with_state(OpsState { metrics, probes })
}

async fn ready(State(state): State<OpsState>) -> impl IntoResponse {
    if state.probes.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics_text(State(state): State<OpsState>) -> Response {
    exposition(state.metrics.encode())
}

/// A Prometheus registry's text as a `/metrics` response.
pub fn exposition(encoded: Result<String, std::fmt::Error>) -> Response {
    match encoded {
        Ok(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
