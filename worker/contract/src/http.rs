//! The HTTP surface the worker serves and the operator and router rely on:
//! its port, probe paths, header names, the OpenAI error object and the
//! `/ready` document.

use serde::{Deserialize, Serialize};

use crate::ModelInfo;

/// The port a worker listens on by default (and in every pod the operator builds).
pub const PORT: u16 = 8080;

/// Liveness: the process answers, its engine runs and no step is stuck.
pub const HEALTH_PATH: &str = "/health";

/// Readiness: the model is loaded; the body is a [`ReadyDocument`].
pub const READY_PATH: &str = "/ready";

/// Every answer carries the caller's request id, or a new one.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Response header of a worker's chat completion: the prompt's token count.
/// The router charges it to a tenant whose answer is cut short before its usage.
pub const PROMPT_TOKENS_HEADER: &str = "x-kandle-prompt-tokens";

/// An OpenAI error answer: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorObject,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorObject {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ErrorBody {
    pub fn new(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Self {
        Self {
            error: ErrorObject {
                message: message.to_string(),
                kind: kind.to_string(),
                param: param.map(str::to_string),
                code: code.map(str::to_string),
            },
        }
    }
}

/// A ready worker's `/ready` answer. Read leniently: a worker older than a
/// field still reports its model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadyDocument {
    /// `ready`.
    #[serde(default)]
    pub status: String,
    pub model: ModelInfo,
    #[serde(default)]
    pub compute: Compute,
    /// Where the chat template comes from.
    #[serde(default)]
    pub chat_template: TemplateOrigin,
}

/// Where the chat template a worker renders comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateOrigin {
    /// The model's own: GGUF `tokenizer.chat_template`, `tokenizer_config.json`
    /// or `chat_template.jinja`.
    #[default]
    Model,
    /// `--chat-template` (a ModelDeployment's `engine.chatTemplate`).
    Flag,
    /// The model has none: ChatML, kandle's documented default.
    Default,
    /// A value this reader does not know (from a newer worker).
    #[serde(other)]
    Unknown,
}

/// How the forward pass runs.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Compute {
    /// The CPU dispatch level of kandle's kernels (`avx512-vnni`, `avx-vnni`,
    /// `avx512`, `avx2`, `scalar`), or `candle` where candle's operations run the model.
    pub kernels: String,
    pub threads: usize,
    /// Where the model runs: `cpu`, `cuda:N`.
    pub device: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_object_is_openais() {
        let body = ErrorBody::new("No.", "invalid_request_error", Some("model"), None);
        let json = serde_json::to_value(&body).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({"error": {"message": "No.", "type": "invalid_request_error", "param": "model", "code": null}})
        );
        assert_eq!(serde_json::from_value::<ErrorBody>(json).expect("reads back"), body);
    }

    #[test]
    fn an_older_workers_ready_document_still_gives_its_model() {
        let old = serde_json::json!({"status": "ready", "model": {"architecture": "llama", "quantization": "Q4_1",
            "contextLength": 8192, "parameters": 1}});
        let ready: ReadyDocument = serde_json::from_value(old).expect("reads");
        assert_eq!(ready.model.architecture, "llama");
        assert_eq!(ready.compute, Compute::default());
    }
}
