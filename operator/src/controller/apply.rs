//! Writes the desired children with server-side apply under one field manager.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::Api;

use super::build::Children;
use crate::{Error, Result, FIELD_MANAGER};

/// Applies every child and returns the Deployment as the API server has it (with status).
pub async fn run(client: &kube::Client, namespace: &str, name: &str, children: &Children) -> Result<Deployment> {
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
    Ok(deployment)
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
