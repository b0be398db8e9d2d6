//! The `ModelDeployment` custom resource (`kandle.dev/v1alpha1`).

mod checked;
mod gateway;
mod spec;
mod status;
mod tenant;

pub use checked::{Checked, Undecodable};
pub use gateway::{
    EndpointPickerRef, FailureMode, GatewaySpec, InferencePool, InferencePoolGateway, InferencePoolSpec, MatchLabels,
    PickerRefSpec, PortNumber,
};
pub use kandle_contract::SamplingDefaults;
pub use spec::{
    AuthSpec, EngineSpec, ModelDeployment, ModelDeploymentSpec, ModelSource, PodTemplate, ScalingSpec, SecretReference,
    SourceCache, DURATION, LABEL_VALUE,
};
pub use status::{ModelDeploymentStatus, ModelInfo, ScalingStatus};
pub use tenant::{Tenant, TenantSpec, TenantStatus};

impl ModelDeployment {
    /// The name clients send: spec.model, else metadata.name.
    pub fn served_model(&self) -> String {
        self.spec.model.clone().or_else(|| self.metadata.name.clone()).unwrap_or_default()
    }

    /// Whether the pool can get a ready worker without a change to its spec: it
    /// may run pods and is not Degraded. Requests for such a pool are held
    /// while it has none.
    pub fn can_come_up(&self) -> bool {
        let degraded = self.status.as_ref().is_some_and(|s| {
            s.conditions.iter().any(|c| c.type_ == crate::controller::status::DEGRADED && c.status == "True")
        });
        self.spec.max_replicas() > 0 && !degraded
    }
}
