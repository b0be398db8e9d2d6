//! The model a worker loaded, as its `/ready` reports it and the
//! ModelDeployment's status repeats it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The loaded model, as a worker's /ready reports it.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelInfo {
    /// Model architecture, e.g. llama.
    pub architecture: String,
    /// Weight format, e.g. Q4_1 or BF16.
    pub quantization: String,
    /// Tokens per sequence the worker accepts.
    #[schemars(transform = crate::schema::count)]
    pub context_length: u64,
    /// Number of weights.
    #[schemars(transform = crate::schema::count)]
    pub parameters: u64,
}
