//! Every failure a client can see, mapped once to an HTTP status and an OpenAI
//! error object.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kandle_contract::http::ErrorBody;

use crate::engine::EngineFault;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code: None, retry_after: None }
    }

    /// 400 for a request field, named in `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            code: Some("invalid_value"),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// 400 for a field of the wrong JSON type.
    pub fn wrong_type(param: &str, expected: &str, got: &serde_json::Value) -> Self {
        Self {
            code: Some("invalid_type"),
            ..Self::invalid(
                param,
                format!("Invalid type for '{param}': expected {expected}, but got {} instead.", json_kind(got)),
            )
        }
    }

    pub fn unknown_param(param: &str) -> Self {
        Self {
            code: Some("unknown_parameter"),
            ..Self::invalid(param, format!("Unrecognized request argument supplied: {param}"))
        }
    }

    pub fn unsupported(param: &str, message: impl Into<String>) -> Self {
        Self { code: Some("unsupported_parameter"), ..Self::invalid(param, message) }
    }

    pub fn missing(param: &str) -> Self {
        Self {
            code: Some("missing_required_parameter"),
            ..Self::invalid(param, format!("Missing required parameter: '{param}'."))
        }
    }

    pub fn bad_json(detail: impl std::fmt::Display) -> Self {
        Self {
            code: Some("invalid_json"),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("We could not parse the JSON body of your request: {detail}"),
            )
        }
    }

    pub fn context_length(param: &str, message: impl Into<String>) -> Self {
        Self { code: Some("context_length_exceeded"), ..Self::invalid(param, message) }
    }

    pub fn missing_key() -> Self {
        Self {
            code: Some("missing_api_key"),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "You didn't provide an API key. Send it in the Authorization header as `Bearer <key>`.",
            )
        }
    }

    pub fn invalid_key() -> Self {
        Self {
            code: Some("invalid_api_key"),
            ..Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", "Incorrect API key provided.")
        }
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("The model `{model}` does not exist or you do not have access to it."),
            )
        }
    }

    pub fn body_too_large(limit: usize) -> Self {
        Self {
            code: Some("request_too_large"),
            ..Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("The request body exceeds the limit of {limit} bytes."),
            )
        }
    }

    pub fn overloaded() -> Self {
        Self {
            code: Some("server_overloaded"),
            retry_after: Some(1),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "server_error",
                "The server is handling as many requests as it can. Retry shortly.",
            )
        }
    }

    pub fn not_ready() -> Self {
        Self {
            code: Some("model_loading"),
            retry_after: Some(5),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "The model is still loading.")
        }
    }

    /// The worker is stopping: it finishes what it took and takes nothing new.
    pub fn shutting_down() -> Self {
        Self {
            code: Some("shutting_down"),
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "This worker is shutting down; retry and another will answer.",
            )
        }
    }

    /// The engine thread is gone: the process cannot serve until restarted.
    /// The engine cannot serve (stopped or stuck): this worker must be restarted.
    pub fn engine_fault(fault: EngineFault) -> Self {
        let code = match fault {
            EngineFault::Stopped => "engine_stopped",
            EngineFault::Stalled(_) => "engine_stalled",
        };
        Self {
            code: Some(code),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                format!("{fault}; this worker must be restarted."),
            )
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn not_found_path(path: &str) -> Self {
        Self {
            code: Some("not_found"),
            ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("No route for {path}."))
        }
    }

    /// The OpenAI error object the client reads.
    pub fn body(&self) -> ErrorBody {
        ErrorBody::new(&self.message, self.kind, self.param.as_deref(), self.code)
    }

    /// Adds the headers that go with the status (Retry-After).
    pub fn decorate(&self, mut response: Response) -> Response {
        *response.status_mut() = self.status;
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// The engine's refusal of a request.
impl From<crate::engine::SubmitError> for ApiError {
    fn from(e: crate::engine::SubmitError) -> Self {
        match e {
            crate::engine::SubmitError::Overloaded => ApiError::overloaded(),
            crate::engine::SubmitError::Stopped => ApiError::internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.decorate(Json(self.body()).into_response())
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
