//! Start-up: keys, listener, model loading in the background, graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kandle_contract::SamplingDefaults;
use tokio::net::TcpListener;

use crate::api::request::SamplingOverrides;
use crate::api::state::{AppState, HttpSettings};
use crate::auth::KeyStore;
use crate::config::ServeConfig;
use crate::metrics::Metrics;
use crate::model::LoadOptions;
use crate::service::{EngineLimits, ModelService};
use crate::startup::Phases;

const KEY_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Serves until SIGTERM or Ctrl-C; fails if the model cannot be loaded.
pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let mut phases = Phases::default();
    let defaults = parse_defaults(config.sampling_defaults.as_deref())?;
    let keys = match &config.api_keys_dir {
        Some(dir) if !config.no_auth => {
            let keys = KeyStore::open(dir)?;
            keys.watch(KEY_RELOAD_INTERVAL);
            Some(keys)
        }
        _ => {
            tracing::warn!("authentication is disabled (--no-auth)");
            None
        }
    };
    let template = match &config.chat_template {
        Some(path) => {
            Some(std::fs::read_to_string(path).with_context(|| format!("reading chat template {}", path.display()))?)
        }
        None => None,
    };
    let served_model_name = config.served_model_name.clone().unwrap_or_else(|| default_name(&config));
    let metrics = Arc::new(Metrics::default());
    let state = AppState::new(
        HttpSettings {
            served_model_name: served_model_name.clone(),
            aliases: config.aliases.clone(),
            max_body_bytes: config.max_body_bytes,
            defaults: defaults.clone(),
        },
        keys,
        metrics.clone(),
    );

    let listener = TcpListener::bind((config.host, config.port))
        .await
        .with_context(|| format!("binding {}:{}", config.host, config.port))?;
    let address = listener.local_addr()?;
    tracing::info!(%address, model = %served_model_name, "listening; loading the model");

    phases.end("listen");
    let loader = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || {
            load(&config, template.as_deref(), defaults, metrics, phases).map(|(service, phases)| {
                state.set_model(service);
                phases
            })
        })
    };
    // On SIGTERM the listener stays open: requests that reach a stopping worker
    // (a router that has not yet seen the EndpointSlice change) get a 503 it
    // retries elsewhere rather than a refused connection. It closes once every
    // taken request has finished.
    let lifecycle = state.lifecycle().clone();
    let stopped = async move {
        shutdown_signal().await;
        lifecycle.begin_draining();
        lifecycle.drained().await;
        tracing::info!("every request finished; closing the listener");
    };
    let server = axum::serve(listener, crate::api::router(state.clone())).with_graceful_shutdown(stopped);
    let server = tokio::spawn(async move { server.await });
    let phases = loader.await.context("model loader panicked")??;
    tracing::info!(
        %address,
        startup_seconds = phases.total().as_secs_f64(),
        "ready {:.3} s after start: {phases}",
        phases.total().as_secs_f64()
    );
    server.await.context("server task failed")??;
    tracing::info!("stopped");
    Ok(())
}

/// Loads the model and starts its engine; returns the service and the start-up
/// phases so far (`phases`, ended with loading's own and the engine's).
fn load(
    config: &ServeConfig,
    template: Option<&str>,
    defaults: SamplingOverrides,
    metrics: Arc<Metrics>,
    mut phases: Phases,
) -> anyhow::Result<(ModelService, Phases)> {
    let started = std::time::Instant::now();
    let options = LoadOptions {
        chat_template: template,
        context_limit: config.max_context,
        quantize: config.quantize,
        threads: config.threads,
        device: config.device,
        kernels: config.kernels,
    };
    let loaded =
        crate::model::load(&config.model, &options).with_context(|| format!("loading {}", config.model.display()))?;
    tracing::info!(
        architecture = %loaded.info.architecture,
        quantization = %loaded.info.quantization,
        parameters = loaded.info.parameters,
        context = loaded.info.context_length,
        kernels = loaded.model.kernels(),
        threads = loaded.model.threads(),
        seconds = started.elapsed().as_secs_f32(),
        "model loaded"
    );
    let service = ModelService::start(
        loaded,
        EngineLimits {
            max_batch_size: config.max_batch_size,
            max_batch_tokens: config.max_batch_tokens,
            kv_cache_memory: config.kv_cache_memory,
            prefix_cache: !config.no_prefix_cache,
            max_waiting: config.max_waiting,
            max_context: config.max_context,
            step_timeout: config.step_timeout,
        },
        defaults,
        metrics,
    )?;
    phases.extend(service.startup.clone());
    Ok((service, phases))
}

/// The model's sampling defaults, in the shared contract's form (the one the
/// CRD's `engine.defaults` has), checked against the same ranges.
fn parse_defaults(json: Option<&str>) -> anyhow::Result<SamplingOverrides> {
    let Some(json) = json else { return Ok(SamplingOverrides::default()) };
    let defaults: SamplingDefaults = serde_json::from_str(json).context("--sampling-defaults")?;
    defaults.validate().context("--sampling-defaults")?;
    Ok(SamplingOverrides::from(&defaults))
}

/// The file name without extension, or the directory name.
fn default_name(config: &ServeConfig) -> String {
    let path = &config.model;
    let name = if path.is_dir() { path.file_name() } else { path.file_stem() };
    name.map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".to_string())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down: /ready answers 503, new requests are refused, taken ones finish");
}
