//! The ModelDeployment controller. `reconcile` reads like a table of contents:
//! dereference, validate, build (pure), apply, status.

pub mod apply;
pub mod build;
pub mod context;
pub mod dereference;
pub mod model_info;
pub mod status;
pub mod validate;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{watcher, Controller};
use kube::{Api, ResourceExt};

pub use context::Context;

#[cfg(test)]
mod tests;

use crate::api::{ModelDeployment, ModelDeploymentStatus, ModelInfo};
use crate::telemetry::Metrics;
use crate::{Error, Result};

/// How often a healthy ModelDeployment is looked at again without any change.
const RESYNC: Duration = Duration::from_secs(300);
/// How soon an invalid one is retried (a missing Secret may appear).
const RETRY_INVALID: Duration = Duration::from_secs(30);

pub async fn reconcile(md: Arc<ModelDeployment>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_inner(&md, &ctx).await;
    ctx.metrics.observe_reconcile(started.elapsed(), result.as_ref().err());
    result
}

async fn reconcile_inner(md: &ModelDeployment, ctx: &Context) -> Result<Action> {
    let namespace = md.namespace().ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let name = md.name_any();
    let now = Time(k8s_openapi::jiff::Timestamp::now());

    let refs = dereference::run(md, &ctx.client).await?;
    let others: Vec<ModelDeployment> = ctx.store.state().iter().map(|o| o.as_ref().clone()).collect();
    let location = match validate::check(md, &refs, &others) {
        Ok(location) => location,
        Err(problem) => {
            tracing::info!(%namespace, %name, reason = problem.reason, "cannot run: {}", problem.message);
            let status = status::compute(md, status::Observed::Invalid(&problem), &ctx.settings.cluster_domain, &now);
            status::publish(md, status, &ctx.client, &ctx.recorder).await?;
            return Ok(Action::requeue(RETRY_INVALID));
        }
    };
    let children = build::children(md, &location, &ctx.settings)?;
    let deployment = apply::run(&ctx.client, &namespace, &name, &children).await?;
    let mut status = status::compute(md, status::Observed::Applied(&deployment), &ctx.settings.cluster_domain, &now);
    status.model = model(md, &status, ctx).await;
    status::publish(md, status, &ctx.client, &ctx.recorder).await?;
    Ok(Action::requeue(RESYNC))
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

/// Backs off by error kind: conflicts resolve quickly, a rejected object does not.
pub fn error_policy(md: Arc<ModelDeployment>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(name = %md.name_any(), kind = error.kind(), %error, "reconcile failed");
    Action::requeue(match error.kind() {
        "conflict" => Duration::from_secs(1),
        "transport" | "api_server" => Duration::from_secs(5),
        "api_rejected" => Duration::from_secs(60),
        _ => Duration::from_secs(300),
    })
}

/// Where the controller looks and how it names itself.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Watch one namespace, or all of them.
    pub namespace: Option<String>,
    pub settings: build::BuildSettings,
    /// This replica's identity (its pod name), for events.
    pub identity: String,
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: kube::Client,
    config: ControllerConfig,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let mds: Api<ModelDeployment> = scoped(&client, config.namespace.as_deref());
    let controller = Controller::new(mds, watcher::Config::default());
    let store = controller.store();
    let owned = watcher::Config::default().labels(&format!("{}={}", crate::labels::MANAGED_BY, crate::labels::MANAGER));
    let secrets_store = store.clone();
    let ctx = Arc::new(Context {
        client: client.clone(),
        settings: config.settings,
        recorder: Recorder::new(
            client.clone(),
            Reporter { controller: crate::FIELD_MANAGER.into(), instance: Some(config.identity) },
        ),
        metrics,
        store,
        model_probe: model_info::http_probe(reqwest::Client::new()),
    });
    controller
        .owns::<Deployment>(scoped(&client, config.namespace.as_deref()), owned.clone())
        .owns::<Service>(scoped(&client, config.namespace.as_deref()), owned.clone())
        .owns::<PodDisruptionBudget>(scoped(&client, config.namespace.as_deref()), owned)
        // Metadata only: the operator never reads key values.
        .watches::<PartialObjectMeta<Secret>, _>(
            scoped(&client, config.namespace.as_deref()),
            watcher::Config::default(),
            move |secret| referencing(&secrets_store.state(), &secret),
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// ModelDeployments that point at `secret`, so a Secret appearing or changing
/// re-runs them at once.
fn referencing(mds: &[Arc<ModelDeployment>], secret: &PartialObjectMeta<Secret>) -> Vec<ObjectRef<ModelDeployment>> {
    let (name, namespace) = (secret.name_any(), secret.namespace());
    mds.iter()
        .filter(|md| md.namespace() == namespace)
        .filter(|md| {
            let refs = [md.spec.auth.api_key_secret_ref.as_ref(), md.spec.source.credentials_secret_ref.as_ref()];
            refs.into_iter().flatten().any(|r| r.name == name)
        })
        .map(|md| ObjectRef::from_obj(md.as_ref()))
        .collect()
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
