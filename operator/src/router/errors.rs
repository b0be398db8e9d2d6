//! The router's own error answers, in the OpenAI shape (and the envelope shape on
//! `/api/v1`). Errors a worker returns pass through untouched.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kandle_contract::http::ErrorBody;
use serde_json::json;

use super::quota::{Refusal, Which};

#[derive(Debug, Clone, PartialEq)]
pub struct RouterError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: &'static str,
    pub retry_after: Option<u64>,
}

impl RouterError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code, retry_after: None }
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            param: Some("model"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!("The model `{model}` does not exist or you do not have access to it."),
            )
        }
    }

    pub fn no_endpoint(model: &str) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "no_ready_endpoint",
                format!("No ready worker serves `{model}` right now. Retry shortly."),
            )
        }
    }

    /// The pool is coming up and its queue of held requests is full.
    pub fn hold_queue_full(model: &str, limit: usize) -> Self {
        Self {
            retry_after: Some(5),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "server_error",
                "server_overloaded",
                format!("`{model}` is starting and {limit} requests already wait for it. Retry shortly."),
            )
        }
    }

    /// No endpoint of the pool became ready while the request was held.
    pub fn hold_timeout(model: &str, waited: std::time::Duration) -> Self {
        Self {
            retry_after: Some(10),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "no_ready_endpoint",
                format!("No worker of `{model}` became ready within {} s. Retry later.", waited.as_secs()),
            )
        }
    }

    /// This router is stopping; another replica takes the request.
    pub fn shutting_down() -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "shutting_down",
                "This router is shutting down; retry and another will answer.",
            )
        }
    }

    pub fn upstream(detail: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "server_error", "upstream_error", format!("The worker failed: {detail}"))
    }

    pub fn bad_json(detail: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_json",
            format!("We could not parse the JSON body of your request: {detail}"),
        )
    }

    pub fn missing_model() -> Self {
        Self {
            param: Some("model"),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "missing_required_parameter",
                "Missing required parameter: 'model'.",
            )
        }
    }

    pub fn body_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("The request body exceeds the limit of {limit} bytes."),
        )
    }

    pub fn invalid_key() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", "invalid_api_key", "Incorrect API key provided.")
    }

    pub fn missing_key() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "missing_api_key",
            "You didn't provide an API key. Send it in the Authorization header as `Bearer <key>`.",
        )
    }

    /// A model the caller's tenant may not call: worded as for a model that
    /// does not exist, so a key learns nothing of models outside its list.
    pub fn model_forbidden(model: &str) -> Self {
        Self { status: StatusCode::FORBIDDEN, ..Self::model_not_found(model) }
    }

    /// The tenant is past one of its limits.
    pub fn rate_limited(tenant: &str, refusal: &Refusal, limit: u64) -> Self {
        let (kind, what) = match refusal.which {
            Which::Requests => ("requests", "requests per minute"),
            Which::Tokens => ("tokens", "tokens per minute"),
            Which::Concurrency => ("requests", "concurrent requests"),
        };
        let wait = refusal.retry_after.as_secs_f64().ceil().max(1.0) as u64;
        Self {
            retry_after: Some(wait),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                kind,
                "rate_limit_exceeded",
                format!(
                    "Rate limit reached for tenant `{tenant}` on {what}: limit {limit}. Please try again in {wait}s."
                ),
            )
        }
    }

    /// The shared quota store cannot be reached and the router fails closed.
    pub fn quota_store_unavailable() -> Self {
        Self {
            retry_after: Some(5),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "quota_store_unavailable",
                "Usage limits cannot be checked right now. Retry shortly.",
            )
        }
    }

    /// Tenants are configured but no valid tenants file was ever read.
    pub fn tenants_not_loaded() -> Self {
        Self {
            retry_after: Some(5),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "tenants_not_loaded",
                "The router has no valid tenant configuration yet. Retry shortly.",
            )
        }
    }

    pub fn not_ready() -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "not_ready",
                "Route discovery has not synced yet.",
            )
        }
    }

    pub fn json(&self) -> serde_json::Value {
        let body = ErrorBody::new(&self.message, self.kind, self.param, Some(self.code));
        serde_json::to_value(body).unwrap_or_default()
    }

    /// The `{success, code, message, data}` form of `/api/v1`.
    pub fn envelope(&self) -> serde_json::Value {
        json!({"success": false, "code": self.code, "message": self.message, "data": null})
    }

    pub fn respond(&self, envelope: bool) -> Response {
        let body = if envelope { self.envelope() } else { self.json() };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl IntoResponse for RouterError {
    fn into_response(self) -> Response {
        self.respond(false)
    }
}
