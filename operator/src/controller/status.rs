//! Status: computed from what was observed (a pure function), patched only when it
//! changed, with an event for each condition that flips.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::build::selector_string;
use super::validate::Problem;
use crate::api::{ModelDeployment, ModelDeploymentStatus};
use crate::{Error, Result, FIELD_MANAGER, WORKER_PORT};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// What the reconciler saw this round.
#[derive(Debug, Clone)]
pub enum Observed<'a> {
    /// The spec cannot run (missing Secret, name conflict, unsupported source).
    Invalid(&'a Problem),
    /// The children were applied; this is the Deployment as the API server has it.
    Applied(&'a Deployment),
}

/// Computes the status. Conditions whose status and reason did not change keep
/// their `lastTransitionTime`.
pub fn compute(
    md: &ModelDeployment,
    observed: Observed<'_>,
    cluster_domain: &str,
    now: &Time,
) -> ModelDeploymentStatus {
    let name = md.name_any();
    let namespace = md.namespace().unwrap_or_default();
    let desired = md.spec.replicas;
    let generation = md.metadata.generation;
    let previous = md.status.clone().unwrap_or_default();
    let cond = |type_: &str, status: bool, reason: &str, message: String| {
        let status = if status { "True" } else { "False" };
        let last = previous
            .conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status && c.reason == reason)
            .map(|c| c.last_transition_time.clone());
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: generation,
            last_transition_time: last.unwrap_or_else(|| now.clone()),
        }
    };

    let (replicas, ready, conditions) = match observed {
        Observed::Invalid(problem) => (
            previous.replicas,
            previous.ready_replicas,
            vec![
                cond(READY, false, problem.reason, problem.message.clone()),
                cond(PROGRESSING, false, problem.reason, "waiting for the spec to be fixed".into()),
                cond(DEGRADED, true, problem.reason, problem.message.clone()),
            ],
        ),
        Observed::Applied(deployment) => {
            let s = deployment.status.clone().unwrap_or_default();
            let ready = s.ready_replicas.unwrap_or(0);
            let updated = s.updated_replicas.unwrap_or(0);
            let current =
                deployment.metadata.generation.is_some() && s.observed_generation >= deployment.metadata.generation;
            let stalled = s.conditions.iter().flatten().find(|c| {
                c.type_ == "Progressing"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
            });
            let rolled_out = current && updated >= desired && ready >= desired && s.replicas.unwrap_or(0) == desired;
            let ready_cond = if desired == 0 {
                cond(READY, false, "ScaledToZero", "replicas is 0".into())
            } else if ready >= desired && rolled_out {
                cond(READY, true, "Available", format!("{ready}/{desired} workers ready"))
            } else if ready > 0 {
                cond(READY, true, "PartiallyAvailable", format!("{ready}/{desired} workers ready"))
            } else {
                cond(READY, false, "NoReadyWorkers", format!("0/{desired} workers ready"))
            };
            let progressing = if rolled_out {
                cond(PROGRESSING, false, "RolloutComplete", "all workers run the current spec".into())
            } else {
                cond(PROGRESSING, true, "Rollout", format!("{updated}/{desired} workers updated, {ready} ready"))
            };
            let degraded = match stalled {
                Some(c) => cond(DEGRADED, true, "RolloutStalled", c.message.clone().unwrap_or_default()),
                None => cond(DEGRADED, false, "AsExpected", String::new()),
            };
            (s.replicas.unwrap_or(0), ready, vec![ready_cond, progressing, degraded])
        }
    };
    let is_true = |t: &str| conditions.iter().any(|c| c.type_ == t && c.status == "True");
    let phase = if is_true(DEGRADED) {
        "Degraded"
    } else if is_true(PROGRESSING) {
        "Progressing"
    } else if is_true(READY) {
        "Ready"
    } else if desired == 0 {
        "ScaledToZero"
    } else {
        "Progressing"
    };
    ModelDeploymentStatus {
        observed_generation: generation,
        replicas,
        ready_replicas: ready,
        ready: Some(format!("{ready}/{desired}")),
        phase: Some(phase.into()),
        served_model: Some(md.served_model()),
        endpoint: Some(format!("http://{name}.{namespace}.svc.{cluster_domain}:{WORKER_PORT}")),
        selector: Some(selector_string(&name)),
        model: previous.model,
        conditions,
    }
}

/// Patches the status subresource when it differs, and publishes an event for each
/// condition whose status or reason changed.
pub async fn publish(
    md: &ModelDeployment,
    status: ModelDeploymentStatus,
    client: &kube::Client,
    recorder: &Recorder,
) -> Result<()> {
    let previous = md.status.clone().unwrap_or_default();
    if previous == status {
        return Ok(());
    }
    let namespace = md.namespace().ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &namespace);
    let patch = json!({
        "apiVersion": ModelDeployment::api_version(&()),
        "kind": ModelDeployment::kind(&()),
        "status": status,
    });
    api.patch_status(&md.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;

    // One event per new reason: an invalid spec flips all three conditions to one reason.
    let mut published: Vec<&str> = Vec::new();
    for c in &status.conditions {
        let changed =
            !previous.conditions.iter().any(|p| p.type_ == c.type_ && p.status == c.status && p.reason == c.reason);
        if !changed || published.contains(&c.reason.as_str()) {
            continue;
        }
        published.push(&c.reason);
        let warning = (c.type_ == DEGRADED && c.status == "True") || (c.type_ == READY && c.status == "False");
        let event = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: c.reason.clone(),
            note: Some(format!("{} is {}: {}", c.type_, c.status, c.message)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &md.object_ref(&())).await {
            tracing::warn!(error = %e, "cannot publish event");
        }
    }
    Ok(())
}
