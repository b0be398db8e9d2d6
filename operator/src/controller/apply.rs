//! Writes the desired children with server-side apply under one field manager.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::Api;

use super::build::Children;
use crate::api::InferencePool;
use crate::{Error, Result, FIELD_MANAGER};

/// What the API server holds after an apply.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The Deployment as the API server has it (with status).
    pub deployment: Deployment,
    pub inference_pool: InferencePoolState,
}

/// Whether the InferencePool the spec asks for exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InferencePoolState {
    /// The spec asks for none.
    NotAsked,
    Applied,
    /// The API server has no InferencePool resource: the Gateway API Inference
    /// Extension's CRDs are not installed.
    CrdMissing,
    /// The operator may not write InferencePools (installed with the chart's
    /// `gateway.inferencePools` off).
    Forbidden,
    /// The API server refused it (the extension's own validation): its message.
    Rejected(String),
}

/// Applies every child. An InferencePool the spec no longer asks for is
/// deleted when `had_inference_pool` (the status says one was asked for).
pub async fn run(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    children: &Children,
    had_inference_pool: bool,
) -> Result<Applied> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let deployment = deployments
        .patch(name, &params, &Patch::Apply(&children.deployment))
        .await
        .map_err(|e| rejected("Deployment", e))?;
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    services.patch(name, &params, &Patch::Apply(&children.service)).await.map_err(|e| rejected("Service", e))?;
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), namespace);
    match &children.pdb {
        Some(pdb) => {
            pdbs.patch(name, &params, &Patch::Apply(pdb)).await.map_err(|e| rejected("PodDisruptionBudget", e))?;
        }
        None => match pdbs.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        },
    }
    let pools: Api<InferencePool> = Api::namespaced(client.clone(), namespace);
    let inference_pool = match &children.inference_pool {
        Some(pool) => match pools.patch(name, &params, &Patch::Apply(pool)).await {
            Ok(_) => InferencePoolState::Applied,
            // Applying creates a missing object, so a 404 means a missing resource type.
            Err(kube::Error::Api(s)) if s.code == 404 => InferencePoolState::CrdMissing,
            Err(kube::Error::Api(s)) if s.code == 403 => InferencePoolState::Forbidden,
            // The workers run all the same: the condition says what was refused.
            Err(kube::Error::Api(s)) if matches!(s.code, 400 | 422 | 500) => InferencePoolState::Rejected(s.message),
            Err(e) => return Err(e.into()),
        },
        None if had_inference_pool => match pools.delete(name, &DeleteParams::default()).await {
            // 404: already gone, or the CRD with it.
            Ok(_) => InferencePoolState::NotAsked,
            Err(kube::Error::Api(s)) if s.code == 404 => InferencePoolState::NotAsked,
            // Not allowed to delete (RBAC taken away since): said, and tried again.
            Err(kube::Error::Api(s)) if s.code == 403 => InferencePoolState::Forbidden,
            Err(e) => return Err(e.into()),
        },
        None => InferencePoolState::NotAsked,
    };
    Ok(Applied { deployment, inference_pool })
}

/// An answer that says the object itself is wrong (or not allowed) becomes
/// [`Error::ChildRejected`]: invalid (400, 422), forbidden (403), and 500, which
/// the API server answers for values it cannot convert (a quantity like `lots`).
/// Conflicts, throttling and unavailability stay transient.
fn rejected(child: &'static str, error: kube::Error) -> Error {
    match error {
        kube::Error::Api(s) if matches!(s.code, 400 | 403 | 404 | 422 | 500) => {
            Error::ChildRejected { child, code: s.code, message: s.message }
        }
        other => other.into(),
    }
}
