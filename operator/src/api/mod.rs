//! The `ModelDeployment` custom resource (`kandle.dev/v1alpha1`).

mod checked;
mod spec;
mod status;

pub use checked::{Checked, Undecodable};
pub use kandle_contract::SamplingDefaults;
pub use spec::{
    AuthSpec, EngineSpec, ModelDeployment, ModelDeploymentSpec, ModelSource, PodTemplate, SecretReference, SourceCache,
    LABEL_VALUE,
};
pub use status::{ModelDeploymentStatus, ModelInfo};

impl ModelDeployment {
    /// The name clients send: spec.model, else metadata.name.
    pub fn served_model(&self) -> String {
        self.spec.model.clone().or_else(|| self.metadata.name.clone()).unwrap_or_default()
    }
}
