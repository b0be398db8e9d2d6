//! What every reconcile shares.

use std::sync::Arc;

use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;

use super::build::BuildSettings;
use super::model_info::ModelProbe;
use crate::api::ModelDeployment;
use crate::telemetry::Metrics;

pub struct Context {
    pub client: kube::Client,
    pub settings: BuildSettings,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Every ModelDeployment the controller watches, for model-name conflicts.
    pub store: Store<ModelDeployment>,
    /// Asks a ready pool which model it loaded.
    pub model_probe: ModelProbe,
}
