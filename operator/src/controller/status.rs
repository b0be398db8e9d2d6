//! Status: computed from what was observed (a pure function), patched only when it
//! changed, with an event for each condition that flips.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::apply::{Applied, InferencePoolState};
use super::build::selector_string;
use super::events::{EventPublisher, EventType};
use super::validate::Problem;
use crate::api::{ModelDeployment, ModelDeploymentStatus, Undecodable};
use crate::{Error, Result, FIELD_MANAGER, WORKER_PORT};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
/// Present while `spec.gateway.inferencePool` asks for an InferencePool.
pub const INFERENCE_POOL_READY: &str = "InferencePoolReady";

/// What the reconciler saw this round.
#[derive(Debug, Clone)]
pub enum Observed<'a> {
    /// The spec cannot run (missing Secret, name conflict, unsupported source).
    Invalid(&'a Problem),
    /// The children were applied.
    Applied(&'a Applied),
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
    let builder = Conditions { previous: &previous.conditions, generation, now };
    let cond = |type_: &str, status: bool, reason: &str, message: String| builder.make(type_, status, reason, message);

    let (replicas, ready, conditions) = match observed {
        Observed::Invalid(problem) => (previous.replicas, previous.ready_replicas, builder.problem(problem)),
        Observed::Applied(Applied { deployment, inference_pool }) => {
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
            } else if ready >= desired {
                let rolling =
                    if rolled_out { String::new() } else { format!("; rolling out, {updated}/{desired} updated") };
                cond(READY, true, "Available", format!("{ready}/{desired} workers ready{rolling}"))
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
                None => cond(DEGRADED, false, "AsExpected", "the spec is valid and its children are applied".into()),
            };
            let mut conditions = vec![ready_cond, progressing, degraded];
            match inference_pool {
                InferencePoolState::NotAsked => {}
                InferencePoolState::Applied => conditions.push(cond(
                    INFERENCE_POOL_READY,
                    true,
                    "Applied",
                    format!("InferencePool {name} (inference.networking.k8s.io/v1) selects the ready workers"),
                )),
                InferencePoolState::CrdMissing => conditions.push(cond(
                    INFERENCE_POOL_READY,
                    false,
                    "InferencePoolCRDMissing",
                    "the InferencePool CRD (inferencepools.inference.networking.k8s.io/v1) is not installed: install \
                     the Gateway API Inference Extension's CRDs; kandle's router serves the pool meanwhile"
                        .into(),
                )),
                InferencePoolState::Forbidden => conditions.push(cond(
                    INFERENCE_POOL_READY,
                    false,
                    "InferencePoolForbidden",
                    "the operator may not write InferencePools: install the chart with gateway.inferencePools=true"
                        .into(),
                )),
                InferencePoolState::Rejected(message) => conditions.push(cond(
                    INFERENCE_POOL_READY,
                    false,
                    "InferencePoolRejected",
                    format!("the API server refused the InferencePool: {message}"),
                )),
            }
            (s.replicas.unwrap_or(0), ready, conditions)
        }
    };
    let phase = phase(&conditions, desired);
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
        scaling: previous.scaling,
    }
}

/// The status of an object whose spec cannot be decoded: Degraded, naming the
/// field; everything else as it was.
pub fn undecodable(bad: &Undecodable, now: &Time) -> ModelDeploymentStatus {
    let previous = stored_status(bad);
    let problem = Problem { reason: "InvalidSpec", message: format!("cannot read the spec: {}", bad.error) };
    let conditions =
        Conditions { previous: &previous.conditions, generation: bad.metadata.generation, now }.problem(&problem);
    ModelDeploymentStatus {
        observed_generation: bad.metadata.generation,
        phase: Some("Degraded".into()),
        conditions,
        ..previous
    }
}

/// The status stored with an undecodable object (empty if it too cannot be read).
pub fn stored_status(bad: &Undecodable) -> ModelDeploymentStatus {
    bad.status.clone().and_then(|s| serde_json::from_value(s).ok()).unwrap_or_default()
}

/// Builds conditions that keep their `lastTransitionTime` while status and reason stay.
struct Conditions<'a> {
    previous: &'a [Condition],
    generation: Option<i64>,
    now: &'a Time,
}

impl Conditions<'_> {
    fn make(&self, type_: &str, status: bool, reason: &str, message: String) -> Condition {
        let status = if status { "True" } else { "False" };
        let last = self
            .previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status && c.reason == reason)
            .map(|c| c.last_transition_time.clone());
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: self.generation,
            last_transition_time: last.unwrap_or_else(|| self.now.clone()),
        }
    }

    /// All three conditions for a spec that cannot run; the InferencePool's
    /// stays as it was until the spec can be applied again (the controller
    /// deletes a pool the spec no longer asks for only while it is there).
    fn problem(&self, problem: &Problem) -> Vec<Condition> {
        let mut conditions = vec![
            self.make(READY, false, problem.reason, problem.message.clone()),
            self.make(PROGRESSING, false, problem.reason, "waiting for the spec to be fixed".into()),
            self.make(DEGRADED, true, problem.reason, problem.message.clone()),
        ];
        conditions.extend(self.previous.iter().filter(|c| c.type_ == INFERENCE_POOL_READY).cloned());
        conditions
    }
}

fn phase(conditions: &[Condition], desired: i32) -> &'static str {
    let is_true = |t: &str| conditions.iter().any(|c| c.type_ == t && c.status == "True");
    if is_true(DEGRADED) {
        "Degraded"
    } else if is_true(PROGRESSING) {
        "Progressing"
    } else if is_true(READY) {
        "Ready"
    } else if desired == 0 {
        "ScaledToZero"
    } else {
        "Progressing"
    }
}

/// Patches the status subresource of the object `meta` names when the status
/// differs from `previous`, and publishes an event for each condition whose
/// status or reason changed.
pub async fn publish(
    meta: &ObjectMeta,
    previous: &ModelDeploymentStatus,
    status: ModelDeploymentStatus,
    client: &kube::Client,
    events: &EventPublisher,
) -> Result<()> {
    if *previous == status {
        return Ok(());
    }
    let namespace = meta.namespace.clone().ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let name = meta.name.clone().ok_or(Error::MissingObjectKey("metadata.name"))?;
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &namespace);
    // `scaling` is the autoscaler's, applied under its own field manager.
    let owned = ModelDeploymentStatus { scaling: None, ..status.clone() };
    let patch = json!({
        "apiVersion": ModelDeployment::api_version(&()),
        "kind": ModelDeployment::kind(&()),
        "status": owned,
    });
    api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;

    let regarding = super::events::regarding(meta);
    // One event per new reason: an invalid spec flips all three conditions to one reason.
    let mut published: Vec<&str> = Vec::new();
    for c in &status.conditions {
        let changed =
            !previous.conditions.iter().any(|p| p.type_ == c.type_ && p.status == c.status && p.reason == c.reason);
        if !changed || published.contains(&c.reason.as_str()) {
            continue;
        }
        published.push(&c.reason);
        let warning = (c.type_ == DEGRADED && c.status == "True")
            || ((c.type_ == READY || c.type_ == INFERENCE_POOL_READY) && c.status == "False");
        let type_ = if warning { EventType::Warning } else { EventType::Normal };
        let note = format!("{} is {}: {}", c.type_, c.status, c.message);
        if let Err(e) = events.publish(&regarding, type_, &c.reason, &note).await {
            tracing::warn!(error = %e, "cannot publish event");
        }
    }
    Ok(())
}
