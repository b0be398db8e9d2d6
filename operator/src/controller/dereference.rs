//! Fetches what a ModelDeployment points to, so validation can be pure.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use crate::api::ModelDeployment;
use crate::Result;

/// What the referenced objects turned out to be.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct References {
    /// Names of referenced Secrets that do not exist.
    pub missing_secrets: Vec<String>,
}

pub async fn run(md: &ModelDeployment, client: &kube::Client) -> Result<References> {
    let namespace = md.metadata.namespace.as_deref().unwrap_or("default");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let referenced = [md.spec.auth.api_key_secret_ref.as_ref(), md.spec.source.credentials_secret_ref.as_ref()];
    let mut missing = Vec::new();
    for secret in referenced.into_iter().flatten() {
        // Only existence matters here; the values stay in the API server.
        if secrets.get_metadata_opt(&secret.name).await?.is_none() {
            missing.push(secret.name.clone());
        }
    }
    Ok(References { missing_secrets: missing })
}
