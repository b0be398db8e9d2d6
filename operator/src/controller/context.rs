//! What every reconcile shares.

use std::sync::Arc;

use kube::runtime::reflector::Store;

use super::backoff::Backoff;
use super::build::BuildSettings;
use super::events::EventPublisher;
use super::model_info::ModelProbe;
use crate::api::{Checked, ModelDeployment};
use crate::telemetry::Metrics;

pub struct Context {
    pub client: kube::Client,
    pub settings: BuildSettings,
    pub events: EventPublisher,
    pub metrics: Arc<Metrics>,
    /// Every ModelDeployment the controller watches, for model-name conflicts.
    pub store: Store<Checked<ModelDeployment>>,
    /// Asks a ready pool which model it loaded.
    pub model_probe: ModelProbe,
    /// Failure streaks per object.
    pub backoff: Backoff,
}
