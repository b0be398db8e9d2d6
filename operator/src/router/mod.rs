//! The routing Service: discovery (Kubernetes, or a route file) → route table →
//! balancer → proxy.

mod access_log;
mod balancer;
mod cache_salt;
pub mod discovery;
mod errors;
mod file_watch;
mod hold;
mod json_body;
mod metrics;
mod model_list;
mod model_name;
mod prefix;
mod prefix_index;
pub mod proxy;
pub mod quota;
pub mod routes_file;
pub mod table;
pub mod tenants_file;
#[cfg(test)]
mod tests;
pub mod upstream_key;
mod usage;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;

use errors::RouterError;
use kandle_contract::stopping::{self, Tracker};
use proxy::{RouterSettings, RouterState, Tenancy};
use quota::{FailureMode, Quotas};
use table::Routes;
use tenants_file::Tenants;

/// Where the pools come from.
#[derive(Debug, Clone)]
pub enum Discovery {
    RouteFile(PathBuf),
    Kubernetes { namespace: Option<String> },
}

#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub address: SocketAddr,
    pub discovery: Discovery,
    pub settings: RouterSettings,
    /// Upper bound on the time to connect to a worker.
    pub connect_timeout: Duration,
    pub tenancy: TenancyConfig,
}

/// Where tenants, their limits and the router's own worker key come from.
#[derive(Debug, Clone)]
pub struct TenancyConfig {
    /// `--tenants FILE`: without it, no tenants (workers check callers' keys).
    pub tenants_file: Option<PathBuf>,
    /// `redis://…` to share limits between router replicas; without it, in process.
    pub quota_store: Option<String>,
    pub quota_store_failure: FailureMode,
    /// Time one call to the quota store may take.
    pub quota_store_timeout: Duration,
    pub upstream_key_file: Option<PathBuf>,
    /// How long a request past its tenant's limit waits for its budget before a 429.
    pub quota_wait: Duration,
}

impl TenancyConfig {
    /// Starts reading the files it names (call within a Tokio runtime).
    fn start(&self) -> anyhow::Result<Tenancy> {
        let tenants = self.tenants_file.as_ref().map(|path| {
            let tenants = Arc::new(Tenants::default());
            tenants_file::load_and_watch(path.clone(), tenants.clone(), Duration::from_secs(1));
            tenants
        });
        let quotas = match &self.quota_store {
            Some(url) => {
                Quotas::redis(url, self.quota_store_failure, self.quota_store_timeout).map_err(anyhow::Error::msg)?
            }
            None => Quotas::local(),
        };
        let upstream_key = self
            .upstream_key_file
            .as_ref()
            .map(|path| upstream_key::load_and_watch(path.clone(), Duration::from_secs(1)));
        Ok(Tenancy { tenants, quotas, upstream_key, quota_wait: self.quota_wait })
    }
}

pub fn app(state: RouterState) -> Router {
    let max_body_bytes = state.settings().max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(proxy::generate))
        .route("/compatible-mode/v1/chat/completions", post(proxy::generate))
        .route("/api/v1/chat/completions", post(proxy::generate))
        .route("/v1/completions", post(proxy::generate))
        .route("/compatible-mode/v1/completions", post(proxy::generate))
        .route("/v1/responses", post(proxy::generate))
        .route("/compatible-mode/v1/responses", post(proxy::generate))
        .route("/v1/models", get(model_list::models))
        .route("/compatible-mode/v1/models", get(model_list::models))
        .route_layer(axum::middleware::from_fn_with_state(
            Tracker { lifecycle: state.lifecycle().clone(), refuse: || RouterError::shutting_down().into_response() },
            stopping::track,
        ))
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|req: Request| async move {
            let mut e = RouterError::model_not_found("");
            e.message = format!("No route for {}.", req.uri().path());
            e.code = "not_found";
            e.param = None;
            e.into_response()
        })
        // A body past the limit is drained before the 413, so the client reads it.
        .layer(axum::middleware::from_fn_with_state(max_body_bytes, kandle_contract::drain::drain_unread))
        .layer(axum::middleware::from_fn(access_log::access_log))
        .with_state(state)
}

/// 200 once routes are synced (and, with tenants on, a tenants file was
/// loaded); the body notes a refused tenants file or an unreachable quota
/// store, which leave the router serving as it was configured to.
async fn ready(State(state): State<RouterState>) -> axum::response::Response {
    if state.lifecycle().is_draining() {
        return RouterError::shutting_down().into_response();
    }
    if !state.is_synced() {
        return RouterError::not_ready().into_response();
    }
    let tenancy = state.tenancy();
    let mut notes = Vec::new();
    if let Some(tenants) = &tenancy.tenants {
        match (tenants.current(), tenants.problem()) {
            (None, problem) => {
                let mut e = RouterError::tenants_not_loaded();
                if let Some(problem) = problem {
                    e.message = format!("{} ({problem})", e.message);
                }
                return e.into_response();
            }
            (Some(_), Some(problem)) => {
                notes.push(format!("tenants file refused, the last good set is in force: {problem}"))
            }
            (Some(_), None) => {}
        }
    }
    if !tenancy.quotas.check().await {
        notes.push(match tenancy.quotas.failure_mode() {
            FailureMode::Open => "quota store unreachable: serving without limits".to_string(),
            FailureMode::Closed => "quota store unreachable: refusing requests of tenants with limits".to_string(),
        });
    }
    let body = std::iter::once("ready".to_string()).chain(notes).collect::<Vec<_>>().join("\n");
    (StatusCode::OK, body).into_response()
}

async fn metrics(State(state): State<RouterState>) -> axum::response::Response {
    crate::http::exposition(state.metrics().encode())
}

/// Serves until `shutdown` resolves, then drains in-flight streams.
pub async fn run(
    config: RouterConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let routes = Arc::new(Routes::default());
    let client = reqwest::Client::builder()
        .connect_timeout(config.connect_timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .context("building the HTTP client")?;
    let tenancy = config.tenancy.start()?;
    let state = RouterState::new(routes.clone(), client, config.settings.clone(), tenancy);
    match &config.discovery {
        Discovery::RouteFile(path) => {
            routes_file::load_and_watch(path.clone(), routes.clone(), Duration::from_secs(1))?;
            state.set_synced();
        }
        Discovery::Kubernetes { namespace } => {
            let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
            let synced = Arc::new(tokio::sync::Notify::new());
            let notified = synced.clone().notified_owned();
            tokio::spawn(discovery::run(client, namespace.clone(), routes.clone(), synced));
            let state = state.clone();
            tokio::spawn(async move {
                notified.await;
                state.set_synced();
            });
        }
    }
    let listener =
        tokio::net::TcpListener::bind(config.address).await.with_context(|| format!("binding {}", config.address))?;
    let address = listener.local_addr()?;
    tracing::info!(%address, "router listening");
    // On SIGTERM /ready turns 503 and new requests get a 503 a client retries on
    // another replica; relayed streams finish; then the listener closes.
    let lifecycle = state.lifecycle().clone();
    let stopped = async move {
        shutdown.await;
        tracing::info!("shutting down: /ready answers 503, new requests are refused, taken ones finish");
        lifecycle.begin_draining();
        lifecycle.drained().await;
    };
    axum::serve(listener, app(state)).with_graceful_shutdown(stopped).await?;
    tracing::info!("router stopped");
    Ok(())
}
