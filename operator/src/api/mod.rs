//! The `ModelDeployment` custom resource (`kandle.dev/v1alpha1`).

mod spec;
mod status;

pub use spec::{
    AuthSpec, EngineSpec, ModelDeployment, ModelDeploymentSpec, ModelSource, PodTemplate, SamplingDefaults,
    SecretReference, SourceCache,
};
pub use status::{ModelDeploymentStatus, ModelInfo};

impl ModelDeployment {
    /// The name clients send: spec.model, else metadata.name.
    pub fn served_model(&self) -> String {
        self.spec.model.clone().or_else(|| self.metadata.name.clone()).unwrap_or_default()
    }
}
