//! The ModelDeployment controller. `reconcile` reads like a table of contents:
//! dereference, validate, build (pure), apply, status.

pub mod apply;
pub mod backoff;
pub mod build;
pub mod context;
pub mod dereference;
pub mod events;
pub mod model_info;
pub mod status;
pub mod validate;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action;
use kube::runtime::{watcher, Controller};
use kube::{Api, ResourceExt};

pub use context::Context;

#[cfg(test)]
mod tests;

use crate::api::{Checked, ModelDeployment, ModelDeploymentStatus, ModelInfo, Undecodable};
use crate::telemetry::Metrics;
use crate::{Error, Result};

/// How often a healthy ModelDeployment is looked at again without any change.
const RESYNC: Duration = Duration::from_secs(300);
/// How soon an invalid one is retried (a missing Secret may appear: Secrets are
/// not watched, so that the controller needs no list or watch on them).
const RETRY_INVALID: Duration = Duration::from_secs(30);
/// How often Tenants' key Secrets are read again (they are not watched).
const TENANT_KEYS_INTERVAL: Duration = Duration::from_secs(10);

pub async fn reconcile(object: Arc<Checked<ModelDeployment>>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = match &object.0 {
        Ok(md) => reconcile_valid(md, &ctx).await,
        Err(bad) => report_undecodable(bad, &ctx).await,
    };
    ctx.metrics.observe_reconcile(started.elapsed(), result.as_ref().err());
    if result.is_ok() {
        ctx.backoff.succeeded(&key(&object));
    }
    result
}

async fn reconcile_valid(md: &ModelDeployment, ctx: &Context) -> Result<Action> {
    let namespace = md.namespace().ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let name = md.name_any();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let previous = md.status.clone().unwrap_or_default();

    let refs = dereference::run(md, &ctx.client).await?;
    let others: Vec<ModelDeployment> = ctx.store.state().iter().filter_map(|o| o.valid().cloned()).collect();
    let location = match validate::check(md, &refs, &others) {
        Ok(location) => location,
        Err(problem) => {
            tracing::info!(%namespace, %name, reason = problem.reason, "cannot run: {}", problem.message);
            let status = status::compute(md, status::Observed::Invalid(&problem), &ctx.settings.cluster_domain, &now);
            status::publish(&md.metadata, &previous, status, &ctx.client, &ctx.events).await?;
            return Ok(Action::requeue(RETRY_INVALID));
        }
    };
    let children = build::children(md, &location, &ctx.settings)?;
    let had_inference_pool = previous.conditions.iter().any(|c| c.type_ == status::INFERENCE_POOL_READY);
    let applied = match apply::run(&ctx.client, &namespace, &name, &children, had_inference_pool).await {
        Ok(applied) => applied,
        Err(error @ Error::ChildRejected { .. }) => {
            // Only the API server can judge some fields: say what it said, on the object.
            let problem = validate::Problem { reason: "ChildRejected", message: error.to_string() };
            let status = status::compute(md, status::Observed::Invalid(&problem), &ctx.settings.cluster_domain, &now);
            status::publish(&md.metadata, &previous, status, &ctx.client, &ctx.events).await?;
            return Err(error);
        }
        Err(error) => return Err(error),
    };
    let mut status = status::compute(md, status::Observed::Applied(&applied), &ctx.settings.cluster_domain, &now);
    status.model = model(md, &status, ctx).await;
    status::publish(&md.metadata, &previous, status, &ctx.client, &ctx.events).await?;
    Ok(Action::requeue(RESYNC))
}

/// An object the controller cannot decode: Degraded with the field at fault.
/// Nothing is applied; an edit of the object triggers the next round.
async fn report_undecodable(bad: &Undecodable, ctx: &Context) -> Result<Action> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let previous = status::stored_status(bad);
    let status = status::undecodable(bad, &now);
    if status != previous {
        tracing::warn!(
            namespace = bad.metadata.namespace.as_deref().unwrap_or(""),
            name = bad.metadata.name.as_deref().unwrap_or(""),
            "cannot decode the ModelDeployment: {}",
            bad.error
        );
    }
    status::publish(&bad.metadata, &previous, status, &ctx.client, &ctx.events).await?;
    Ok(Action::await_change())
}

fn key(object: &Checked<ModelDeployment>) -> String {
    format!("{}/{}", object.namespace().unwrap_or_default(), object.name_any())
}

/// The model the workers report: kept while the spec is unchanged, asked again
/// once workers of a new spec are ready, dropped while none is.
async fn model(md: &ModelDeployment, status: &ModelDeploymentStatus, ctx: &Context) -> Option<ModelInfo> {
    let previous = md.status.as_ref();
    let same_spec = previous.and_then(|p| p.observed_generation) == md.metadata.generation;
    let known = previous.and_then(|p| p.model.clone()).filter(|_| same_spec);
    match (status.ready_replicas > 0, known) {
        (true, Some(info)) => Some(info),
        (true, None) => match &status.endpoint {
            Some(endpoint) => (ctx.model_probe)(endpoint.clone()).await,
            None => None,
        },
        (false, known) => known,
    }
}

/// Backs off per object by error kind, doubling while the failure repeats; a
/// failure is logged when it is new, not on every retry.
pub fn error_policy(object: Arc<Checked<ModelDeployment>>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = key(&object);
    let retry = ctx.backoff.failed(&key, error);
    let message = crate::telemetry::short(&error.to_string());
    if retry.news {
        tracing::warn!(object = %key, kind = error.kind(), retry_in_s = retry.after.as_secs(), "reconcile failed: {message}");
    } else {
        tracing::debug!(object = %key, kind = error.kind(), failures = retry.failures, "reconcile failed again: {message}");
    }
    Action::requeue(retry.after)
}

/// Where the controller looks and how it names itself.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Watch one namespace, or all of them.
    pub namespace: Option<String>,
    pub settings: build::BuildSettings,
    /// This replica's identity (its pod name), for events.
    pub identity: String,
    /// Where the routers run and how often pools with `spec.scaling` are sized.
    pub router_namespace: String,
    pub router_selector: String,
    pub scale_interval: Duration,
    /// The Secret (in `router_namespace`) the Tenants are compiled into;
    /// `None`: Tenants are not compiled.
    pub tenants_secret: Option<String>,
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: kube::Client,
    config: ControllerConfig,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown = futures::FutureExt::shared(shutdown);
    // `Checked`: one object that does not decode is reported on itself and does
    // not stop the list and watch that every other object depends on.
    let mds: Api<Checked<ModelDeployment>> = scoped(&client, config.namespace.as_deref());
    let controller = Controller::new(mds, watcher::Config::default());
    let owned = watcher::Config::default().labels(&format!("{}={}", crate::labels::MANAGED_BY, crate::labels::MANAGER));
    let events = events::EventPublisher::new(client.clone(), crate::FIELD_MANAGER.into(), config.identity);
    let tenants = config.tenants_secret.clone().map(|secret_name| {
        tokio::spawn(crate::tenants::controller::run(
            client.clone(),
            crate::tenants::controller::TenantsConfig {
                namespace: config.namespace.clone(),
                secret_namespace: config.router_namespace.clone(),
                secret_name,
                interval: TENANT_KEYS_INTERVAL,
            },
            shutdown.clone(),
        ))
    });
    let autoscaler = tokio::spawn(crate::autoscaler::run(
        client.clone(),
        crate::autoscaler::AutoscalerConfig {
            namespace: config.namespace.clone(),
            router_namespace: config.router_namespace,
            router_selector: config.router_selector,
            interval: config.scale_interval,
        },
        events.clone(),
        shutdown.clone(),
    ));
    let ctx = Arc::new(Context {
        client: client.clone(),
        settings: config.settings,
        events,
        metrics,
        store: controller.store(),
        model_probe: model_info::http_probe(reqwest::Client::new()),
        backoff: backoff::Backoff::default(),
    });
    controller
        .owns::<Deployment>(scoped(&client, config.namespace.as_deref()), owned.clone())
        .owns::<Service>(scoped(&client, config.namespace.as_deref()), owned.clone())
        .owns::<PodDisruptionBudget>(scoped(&client, config.namespace.as_deref()), owned)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
    if let Err(e) = autoscaler.await {
        tracing::error!(error = %e, "autoscaler task failed");
    }
    if let Some(Err(e)) = match tenants {
        Some(task) => Some(task.await),
        None => None,
    } {
        tracing::error!(error = %e, "tenants task failed");
    }
}

fn scoped<K>(client: &kube::Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}
