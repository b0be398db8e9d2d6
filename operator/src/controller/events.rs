//! Kubernetes events about ModelDeployments: one new event per condition
//! transition, carrying that transition's own message. (kube's `Recorder` folds
//! repeats of a reason into one series that keeps the first message, so
//! `kubectl describe` would show a stale note.)

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::Api;
use kube::Resource;

use crate::telemetry::truncate;

/// The API server refuses notes longer than this (bytes).
const MAX_NOTE: usize = 1024;

/// The reference events about the ModelDeployment `meta` describes carry.
pub fn regarding(meta: &ObjectMeta) -> ObjectReference {
    ObjectReference {
        api_version: Some(crate::api::ModelDeployment::api_version(&()).into()),
        kind: Some(crate::api::ModelDeployment::kind(&()).into()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        ..ObjectReference::default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

/// Publishes events as `controller` (the field manager's name) from `instance`
/// (this replica).
#[derive(Clone)]
pub struct EventPublisher {
    client: kube::Client,
    controller: String,
    instance: String,
}

impl EventPublisher {
    pub fn new(client: kube::Client, controller: String, instance: String) -> Self {
        Self { client, controller, instance }
    }

    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let namespace = regarding.namespace.clone().unwrap_or_else(|| "default".into());
        let event = Event {
            metadata: ObjectMeta {
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_deref().unwrap_or(&self.controller),
                    now.as_nanosecond()
                )),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(format!("{type_:?}")),
            reason: Some(reason.to_string()),
            note: Some(truncate(note, MAX_NOTE).to_string()),
            action: Some("Reconcile".into()),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        };
        Api::<Event>::namespaced(self.client.clone(), &namespace).create(&PostParams::default(), &event).await?;
        Ok(())
    }
}
