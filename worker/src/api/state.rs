//! Shared state of the HTTP layer, handed to handlers through `Router::with_state`.

use std::sync::{Arc, OnceLock};

use super::error::ApiError;
use super::request::SamplingOverrides;
use crate::auth::KeyStore;
use crate::metrics::Metrics;
use crate::service::ModelService;
use kandle_contract::stopping::Lifecycle;

/// Settings the HTTP layer needs, fixed at start-up.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub served_model_name: String,
    pub aliases: Vec<String>,
    pub max_body_bytes: usize,
    pub defaults: SamplingOverrides,
}

impl HttpSettings {
    /// Whether `model` names this worker's model (its name or an alias).
    pub fn serves(&self, model: &str) -> bool {
        self.served_model_name == model || self.aliases.iter().any(|a| a == model)
    }
}

#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    settings: HttpSettings,
    keys: Option<KeyStore>,
    metrics: Arc<Metrics>,
    /// Set once the model has loaded; until then chat requests get 503.
    model: OnceLock<Arc<ModelService>>,
    /// Unix time the worker started, reported as the models' `created`.
    started_at: u64,
    lifecycle: Arc<Lifecycle>,
}

impl AppState {
    pub fn new(settings: HttpSettings, keys: Option<KeyStore>, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                keys,
                metrics,
                model: OnceLock::new(),
                started_at: super::unix_now(),
                lifecycle: Arc::default(),
            }),
        }
    }

    pub fn settings(&self) -> &HttpSettings {
        &self.inner.settings
    }

    pub fn keys(&self) -> Option<&KeyStore> {
        self.inner.keys.as_ref()
    }

    pub fn started_at(&self) -> u64 {
        self.inner.started_at
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Draining and open requests, for a stop that finishes what it took.
    pub fn lifecycle(&self) -> &Arc<Lifecycle> {
        &self.inner.lifecycle
    }

    pub fn model(&self) -> Result<&Arc<ModelService>, ApiError> {
        self.inner.model.get().ok_or_else(ApiError::not_ready)
    }

    pub fn is_ready(&self) -> bool {
        self.inner.model.get().is_some()
    }

    /// Publishes the loaded model; later calls are ignored.
    pub fn set_model(&self, service: ModelService) {
        let _ = self.inner.model.set(Arc::new(service));
    }
}
