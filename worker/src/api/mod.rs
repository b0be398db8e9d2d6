//! The OpenAI-compatible HTTP API: routes, middleware, request and response types.

mod access_log;
pub mod chat;
mod completion_request;
pub mod completions;
pub mod error;
mod messages;
mod ops;
pub mod request;
pub mod response;
pub mod responses;
mod responses_request;
mod sse;
pub mod state;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderName};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use kandle_contract::drain::drain_unread;
use kandle_contract::stopping::{self, Tracker};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

use error::ApiError;
use state::AppState;

const REQUEST_ID: HeaderName = HeaderName::from_static(kandle_contract::http::REQUEST_ID_HEADER);

/// Every route of DESIGN.md's HTTP API.
pub fn router(state: AppState) -> Router {
    let authenticated = Router::new()
        .route("/v1/chat/completions", post(chat::openai))
        .route("/compatible-mode/v1/chat/completions", post(chat::openai))
        .route("/api/v1/chat/completions", post(chat::envelope))
        .route("/v1/completions", post(completions::handle))
        .route("/v1/responses", post(responses::handle))
        .route("/compatible-mode/v1/responses", post(responses::handle))
        .route("/compatible-mode/v1/completions", post(completions::handle))
        .route("/v1/models", get(ops::models))
        .route("/compatible-mode/v1/models", get(ops::models))
        .route_layer(middleware::from_fn_with_state(
            Tracker { lifecycle: state.lifecycle().clone(), refuse: || ApiError::shutting_down().into_response() },
            stopping::track,
        ))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .merge(authenticated)
        .route(kandle_contract::http::HEALTH_PATH, get(ops::health))
        .route(kandle_contract::http::READY_PATH, get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .fallback(|req: Request| async move { ApiError::not_found_path(req.uri().path()) })
        .layer(middleware::from_fn_with_state(state.settings().max_body_bytes, drain_unread))
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .layer(middleware::from_fn(access_log::access_log))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(state)
}

async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(keys) = state.keys() {
        let header = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
        if let Err(e) = keys.check(header) {
            return e.into_response();
        }
    }
    next.run(req).await
}

/// Counts responses by route template (not raw path, to bound cardinality) and status.
async fn count_requests(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let response = next.run(req).await;
    let labels = crate::metrics::RequestLabels { path, status: response.status().as_u16() };
    state.metrics().requests.get_or_create(&labels).inc();
    response
}

/// A generation request's body (at most `--max-body-bytes`) and the model
/// that will answer it (503 while none is loaded).
async fn body_and_model(
    state: &AppState,
    body: axum::body::Body,
) -> Result<(axum::body::Bytes, std::sync::Arc<crate::service::ModelService>), ApiError> {
    let limit = state.settings().max_body_bytes;
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| ApiError::body_too_large(limit))?;
    Ok((bytes, state.model()?.clone()))
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub fn system_fingerprint() -> String {
    format!("fp_kandle_{}", env!("CARGO_PKG_VERSION"))
}
