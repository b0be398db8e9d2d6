//! kandle-operator: the ModelDeployment CRD and the controller that turns each one
//! into a pool of workers.

pub mod api;
pub mod autoscaler;
pub mod controller;
pub mod crd;
pub use kandle_contract::duration;
#[cfg(test)]
mod fake_api;
pub mod http;
pub mod leader;
pub mod rbac;
pub mod router;
pub mod telemetry;
pub mod tenants;

/// Server-side apply field manager for everything the operator writes.
pub const FIELD_MANAGER: &str = "kandle-operator";
/// Port the workers (and their Service) serve on.
pub const WORKER_PORT: i32 = kandle_contract::http::PORT as i32;

/// Labels on every object the operator makes for a ModelDeployment.
pub mod labels {
    pub const NAME: &str = "app.kubernetes.io/name";
    pub const INSTANCE: &str = "app.kubernetes.io/instance";
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    pub const MODEL: &str = "kandle.dev/model";
    pub const WORKER: &str = "kandle-worker";
    pub const MANAGER: &str = "kandle";
    /// Which metric names a pod's model server exposes, as Gateway API
    /// Inference Extension endpoint pickers read it: the extension's own key
    /// (its pickers up to v1.5) and llm-d's (llm-d's picker from v0.9).
    pub const ENGINE_TYPE_KEYS: [&str; 2] = ["inference.networking.k8s.io/engine-type", "llm-d.ai/engine-type"];
    /// kandle workers expose vLLM's names (`vllm:num_requests_waiting`, ...).
    pub const ENGINE_TYPE: &str = "vllm";
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot serialize {what}: {source}")]
    Serialization {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("the ModelDeployment has no {0}")]
    MissingObjectKey(&'static str),
    /// The API server refused a child object: only the API server can judge some
    /// fields (quantities, embedded pod fields). Reported in status; retried slowly.
    #[error("the API server rejected the {child} (HTTP {code}): {message}")]
    ChildRejected { child: &'static str, code: u16, message: String },
}

impl Error {
    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Self::Kube(kube::Error::Api(s)) if s.code >= 500 => "api_server",
            Self::Kube(kube::Error::Api(_)) => "api_rejected",
            Self::Kube(_) => "transport",
            Self::Serialization { .. } => "serialization",
            Self::MissingObjectKey(_) => "invalid_object",
            Self::ChildRejected { .. } => "rejected",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
