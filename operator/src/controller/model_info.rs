//! What the workers say about the model they loaded (their `/ready` answer), for
//! the ModelDeployment's status.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use kandle_contract::http::{ReadyDocument, READY_PATH};

use crate::api::ModelInfo;

/// Asks a pool's Service for its model; `None` when it cannot tell.
pub type ModelProbe = Arc<dyn Fn(String) -> BoxFuture<'static, Option<ModelInfo>> + Send + Sync>;

/// Probes `GET {endpoint}/ready` over HTTP.
pub fn http_probe(client: reqwest::Client) -> ModelProbe {
    Arc::new(move |endpoint: String| {
        let client = client.clone();
        Box::pin(async move {
            let response = client.get(format!("{endpoint}{READY_PATH}")).timeout(Duration::from_secs(3)).send().await;
            let bytes = match response {
                Ok(r) if r.status().is_success() => r.bytes().await.ok()?,
                Ok(r) => {
                    tracing::debug!(%endpoint, status = %r.status(), "worker not ready for a model probe");
                    return None;
                }
                Err(e) => {
                    tracing::debug!(%endpoint, error = %e, "model probe failed");
                    return None;
                }
            };
            serde_json::from_slice::<ReadyDocument>(&bytes).ok().map(|r| r.model)
        })
    })
}
