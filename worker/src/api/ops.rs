//! Operational endpoints and the model list.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kandle_contract::http::ReadyDocument;
use serde_json::json;

use super::error::ApiError;
use super::response::{ModelCard, ModelList};
use super::state::AppState;

/// Liveness: the process answers and, once the model is loaded, its engine
/// thread runs and no step is stuck (else Kubernetes should restart the pod).
pub async fn health(State(state): State<AppState>) -> Response {
    match state.model().map(|service| service.engine.health()) {
        Ok(Err(fault)) => ApiError::engine_fault(fault).into_response(),
        _ => Json(json!({"status": "ok"})).into_response(),
    }
}

/// Readiness: the model is loaded, the engine runs, and the worker is not stopping.
pub async fn ready(State(state): State<AppState>) -> Response {
    if state.lifecycle().is_draining() {
        return ApiError::shutting_down().into_response();
    }
    match state.model() {
        Ok(service) => match service.engine.health() {
            Err(fault) => ApiError::engine_fault(fault).into_response(),
            Ok(()) => Json(ReadyDocument {
                status: "ready".into(),
                model: service.info.clone(),
                compute: service.compute.clone(),
                chat_template: service.template_origin,
            })
            .into_response(),
        },
        Err(e) => e.into_response(),
    }
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    match state.metrics().encode() {
        Ok(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            text,
        )
            .into_response(),
        Err(_) => ApiError::internal("cannot encode metrics").into_response(),
    }
}

/// The served name and every alias, as OpenAI model objects.
pub async fn models(State(state): State<AppState>) -> Json<ModelList> {
    let settings = state.settings();
    let created = state.started_at();
    let data = std::iter::once(&settings.served_model_name)
        .chain(&settings.aliases)
        .map(|id| ModelCard { id: id.clone(), object: "model", created, owned_by: "kandle" })
        .collect();
    Json(ModelList { object: "list", data })
}
