//! The pure stage: a ModelDeployment (already validated) becomes the Deployment,
//! Service and PodDisruptionBudget that run it. No I/O, so every field is tested.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, DownwardAPIVolumeFile, DownwardAPIVolumeSource, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile,
    SecretKeySelector, SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, SleepAction, Volume,
    VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;

use kandle_contract::command_line::{FetchArgs, ServeArgs};
use kandle_contract::http::{HEALTH_PATH, READY_PATH};
use kandle_contract::source::{hub_dir, hub_revision, url_dir, PVC_MOUNT};
use kandle_contract::{SourceError, SourceUrl};

use crate::api::{
    EndpointPickerRef, FailureMode, InferencePool, InferencePoolSpec, MatchLabels, ModelDeployment, ModelSource,
    PortNumber,
};
use crate::{labels, Error, Result, WORKER_PORT};

pub const KEYS_DIR: &str = "/var/run/kandle/keys";
/// Where the init container downloads remote sources (emptyDir or the cache claim).
pub const CACHE_MOUNT: &str = "/var/lib/kandle/cache";
pub const TEMPLATE_DIR: &str = "/etc/kandle/template";
pub const TEMPLATE_FILE: &str = "chat_template.jinja";
/// The chat template travels as a pod annotation, mounted as a file by the downward API.
pub const TEMPLATE_ANNOTATION: &str = "kandle.dev/chat-template";
/// UID and GID the worker runs as (the image's non-root user).
pub const WORKER_UID: i64 = 65532;
const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Time a stopping worker pod gives its removal from the EndpointSlices to reach
/// every router before SIGTERM (the preStop sleep).
pub const PRE_STOP_SLEEP_SECONDS: i64 = 5;
/// Time a stopping worker has to finish its streams, unless the spec says otherwise.
pub const DEFAULT_TERMINATION_GRACE_SECONDS: i64 = 600;

/// Operator-wide settings the children depend on.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildSettings {
    /// Worker image when the spec names none.
    pub worker_image: String,
    /// Worker image for pods that request `nvidia.com/gpu`.
    pub worker_image_cuda: String,
    /// Cluster DNS domain, for the endpoint in status.
    pub cluster_domain: String,
    /// The endpoint picker of InferencePools whose spec leaves it out.
    pub endpoint_picker: PickerDefaults,
}

/// What an InferencePool's endpoint picker reference gets for the fields its
/// spec leaves out.
#[derive(Debug, Clone, PartialEq)]
pub struct PickerDefaults {
    /// The picker Service's name; `{name}` stands for the ModelDeployment's.
    pub name: String,
    /// Its port (the Gateway API Inference Extension picker's gRPC port is 9002).
    pub port: i32,
    pub failure_mode: FailureMode,
}

impl Default for PickerDefaults {
    fn default() -> Self {
        Self { name: "{name}-epp".into(), port: 9002, failure_mode: FailureMode::FailClose }
    }
}

impl Default for BuildSettings {
    fn default() -> Self {
        Self {
            worker_image: "ghcr.io/kandle-dev/kandle:latest".into(),
            worker_image_cuda: "ghcr.io/kandle-dev/kandle:latest-cuda".into(),
            cluster_domain: "cluster.local".into(),
            endpoint_picker: PickerDefaults::default(),
        }
    }
}

/// Where the worker finds the model, and what must be mounted for it.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelLocation {
    /// A path inside the container (baked into the image, or mounted by the user).
    Container(String),
    /// A path inside a PersistentVolumeClaim.
    Claim { claim: String, path: String },
    /// Downloaded by an init container (`kandle-worker fetch`) into `dir` under the
    /// cache mount; `file` when the source names one file.
    Download { dir: String, file: Option<String> },
}

impl ModelLocation {
    /// Where a source puts the model: `file://` and `pvc://` are mounted,
    /// `hf://`, `https://` and (pinned by a sha256) `http://` downloaded, each
    /// source into its own directory.
    pub fn of(source: &ModelSource) -> Result<Self, SourceError> {
        let url = SourceUrl::parse(&source.url)?;
        url.check_pinned(source.sha256.as_deref())?;
        let spec_revision = source.revision.as_deref();
        Ok(match url {
            SourceUrl::File(path) => Self::Container(path),
            SourceUrl::Pvc { claim, path } => Self::Claim { claim, path },
            // The directory names the revision `kandle-worker fetch` takes (the
            // contract's one rule), so revisions of a repository never share files.
            SourceUrl::Hub { org, repo, file, revision } => {
                let revision = hub_revision(revision.as_deref(), spec_revision)?;
                Self::Download { dir: hub_dir(&org, &repo, revision), file }
            }
            SourceUrl::Https(url) | SourceUrl::Http(url) => Self::Download { dir: url_dir(&url), file: None },
        })
    }

    fn container_path(&self) -> String {
        match self {
            Self::Container(path) => path.clone(),
            Self::Claim { path, .. } if path.is_empty() => PVC_MOUNT.to_string(),
            Self::Claim { path, .. } => format!("{PVC_MOUNT}/{path}"),
            Self::Download { dir, file: Some(file) } => format!("{CACHE_MOUNT}/{dir}/{file}"),
            Self::Download { dir, file: None } => format!("{CACHE_MOUNT}/{dir}"),
        }
    }
}

/// Everything the operator applies for one ModelDeployment.
#[derive(Debug, Clone, PartialEq)]
pub struct Children {
    pub deployment: Deployment,
    pub service: Service,
    /// Present when replicas > 1; otherwise any existing one is deleted.
    pub pdb: Option<PodDisruptionBudget>,
    /// Present when `spec.gateway.inferencePool` asks for one.
    pub inference_pool: Option<InferencePool>,
}

/// Labels that select the pool's pods (stable for the object's life).
pub fn selector_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::NAME.to_string(), labels::WORKER.to_string()),
        (labels::INSTANCE.to_string(), name.to_string()),
    ])
}

/// Every label kandle puts on a child.
pub fn child_labels(name: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(name);
    l.insert(labels::MANAGED_BY.into(), labels::MANAGER.into());
    l.insert(labels::MODEL.into(), name.into());
    l
}

/// The selector as a string, for the scale subresource.
pub fn selector_string(name: &str) -> String {
    selector_labels(name).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

pub fn children(md: &ModelDeployment, location: &ModelLocation, settings: &BuildSettings) -> Result<Children> {
    let name = md.metadata.name.clone().ok_or(Error::MissingObjectKey("metadata.name"))?;
    let namespace = md.metadata.namespace.clone().ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let owner = md.controller_owner_ref(&()).ok_or(Error::MissingObjectKey("metadata.uid"))?;
    let meta = ObjectMeta {
        name: Some(name.clone()),
        namespace: Some(namespace),
        labels: Some(child_labels(&name)),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    };
    let selector = LabelSelector { match_labels: Some(selector_labels(&name)), ..LabelSelector::default() };

    let deployment = Deployment {
        metadata: meta.clone(),
        spec: Some(DeploymentSpec {
            replicas: Some(md.spec.replicas),
            selector: selector.clone(),
            template: pod_template(md, &name, location, settings)?,
            ..DeploymentSpec::default()
        }),
        status: None,
    };
    let service = Service {
        metadata: meta.clone(),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(&name)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: WORKER_PORT,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                app_protocol: Some("http".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    };
    let inference_pool = inference_pool(md, &name, meta.clone(), &settings.endpoint_picker);
    let pdb = (md.spec.replicas > 1).then(|| PodDisruptionBudget {
        metadata: meta,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(selector),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    });
    Ok(Children { deployment, service, pdb, inference_pool })
}

/// The InferencePool `spec.gateway.inferencePool` asks for: the pool's pods on
/// the worker port, and the endpoint picker the spec names, completed from
/// the operator's defaults (a Service's port is required, other kinds' not).
fn inference_pool(
    md: &ModelDeployment,
    name: &str,
    metadata: ObjectMeta,
    defaults: &PickerDefaults,
) -> Option<InferencePool> {
    let asked = md.spec.gateway.as_ref()?.inference_pool.as_ref()?;
    let given = asked.endpoint_picker_ref.clone().unwrap_or_default();
    // The extension's rule: a Service (the default kind, whatever the group) needs a port.
    let is_service = given.kind.as_deref().is_none_or(|k| k == "Service");
    let port = given.port.or_else(|| is_service.then_some(PortNumber { number: defaults.port }));
    Some(InferencePool {
        metadata,
        spec: InferencePoolSpec {
            selector: MatchLabels { match_labels: selector_labels(name) },
            target_ports: vec![PortNumber { number: WORKER_PORT }],
            endpoint_picker_ref: EndpointPickerRef {
                group: given.group,
                kind: given.kind,
                name: given.name.unwrap_or_else(|| defaults.name.replace("{name}", name)),
                port,
                failure_mode: given.failure_mode.unwrap_or(defaults.failure_mode),
            },
        },
    })
}

/// The restricted pod security profile of every kandle container.
fn restricted_container() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
        ..SecurityContext::default()
    }
}

fn pod_template(
    md: &ModelDeployment,
    name: &str,
    location: &ModelLocation,
    settings: &BuildSettings,
) -> Result<PodTemplateSpec> {
    let spec = &md.spec;
    let pod = spec.pod.clone().unwrap_or_default();
    let mut pod_labels = pod.labels.clone();
    pod_labels.extend(child_labels(name));
    // Only behind a gateway: a label change rolls the pods.
    if spec.gateway.as_ref().is_some_and(|g| g.inference_pool.is_some()) {
        for key in labels::ENGINE_TYPE_KEYS {
            pod_labels.insert(key.into(), labels::ENGINE_TYPE.into());
        }
    }
    let mut annotations = pod.annotations.clone();

    let mut volumes =
        vec![Volume { name: "tmp".into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Volume::default() }];
    let mut mounts = vec![VolumeMount { name: "tmp".into(), mount_path: "/tmp".into(), ..VolumeMount::default() }];

    let engine = &spec.engine;
    let mut args = ServeArgs {
        model: location.container_path(),
        served_model_name: md.served_model(),
        aliases: spec.aliases.clone(),
        host: "0.0.0.0".into(),
        port: kandle_contract::http::PORT,
        max_context: engine.max_context_length,
        max_batch_size: engine.max_batch_size,
        max_batch_tokens: engine.max_batch_tokens,
        kv_cache_memory: engine.kv_cache_memory.clone(),
        no_prefix_cache: engine.prefix_cache == Some(false),
        threads: engine.threads,
        ..ServeArgs::default()
    };

    if let ModelLocation::Claim { claim, .. } = location {
        volumes.push(Volume {
            name: "model".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: Some(true),
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "model".into(),
            mount_path: PVC_MOUNT.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }

    let mut init_containers = Vec::new();
    if let ModelLocation::Download { dir, .. } = location {
        let source = &spec.source;
        volumes.push(Volume {
            name: "model-cache".into(),
            persistent_volume_claim: source.cache.as_ref().map(|c| PersistentVolumeClaimVolumeSource {
                claim_name: c.claim_name.clone(),
                read_only: Some(false),
            }),
            empty_dir: source.cache.is_none().then(EmptyDirVolumeSource::default),
            ..Volume::default()
        });
        let mount = |read_only: bool| VolumeMount {
            name: "model-cache".into(),
            mount_path: CACHE_MOUNT.into(),
            read_only: Some(read_only),
            ..VolumeMount::default()
        };
        mounts.push(mount(true));
        let fetch_args = FetchArgs {
            url: source.url.clone(),
            dest: format!("{CACHE_MOUNT}/{dir}"),
            revision: source.revision.clone(),
            sha256: source.sha256.clone(),
        };
        let mut env =
            vec![EnvVar { name: "KANDLE_LOG_FORMAT".into(), value: Some("json".into()), ..EnvVar::default() }];
        if let Some(secret) = &source.credentials_secret_ref {
            env.push(EnvVar {
                name: "HF_TOKEN".into(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: secret.name.clone(),
                        key: "token".into(),
                        optional: None,
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            });
        }
        init_containers.push(Container {
            name: "fetch".into(),
            args: Some(fetch_args.to_args()),
            env: Some(env),
            volume_mounts: Some(vec![
                mount(false),
                VolumeMount { name: "tmp".into(), mount_path: "/tmp".into(), ..VolumeMount::default() },
            ]),
            security_context: Some(restricted_container()),
            ..Container::default()
        });
    }

    match &spec.auth.api_key_secret_ref {
        Some(secret) => {
            volumes.push(Volume {
                name: "api-keys".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secret.name.clone()),
                    default_mode: Some(0o440),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            });
            mounts.push(VolumeMount {
                name: "api-keys".into(),
                mount_path: KEYS_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            });
            args.api_keys_dir = Some(KEYS_DIR.into());
        }
        None => args.api_keys_dir = None,
    }

    if let Some(defaults) = &engine.defaults {
        let json = serde_json::to_string(defaults)
            .map_err(|source| Error::Serialization { what: "engine.defaults", source })?;
        args.sampling_defaults = Some(json);
    }
    if let Some(template) = &engine.chat_template {
        annotations.insert(TEMPLATE_ANNOTATION.into(), template.clone());
        volumes.push(Volume {
            name: "chat-template".into(),
            downward_api: Some(DownwardAPIVolumeSource {
                items: Some(vec![DownwardAPIVolumeFile {
                    path: TEMPLATE_FILE.into(),
                    field_ref: Some(ObjectFieldSelector {
                        field_path: format!("metadata.annotations['{TEMPLATE_ANNOTATION}']"),
                        ..ObjectFieldSelector::default()
                    }),
                    ..DownwardAPIVolumeFile::default()
                }]),
                ..DownwardAPIVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "chat-template".into(),
            mount_path: TEMPLATE_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        args.chat_template = Some(format!("{TEMPLATE_DIR}/{TEMPLATE_FILE}"));
    }

    let wants_gpu =
        spec.resources.as_ref().and_then(|r| r.limits.as_ref()).is_some_and(|limits| limits.contains_key(GPU_RESOURCE));
    let image = spec.image.clone().unwrap_or_else(|| {
        if wants_gpu {
            settings.worker_image_cuda.clone()
        } else {
            settings.worker_image.clone()
        }
    });

    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    };
    let container = Container {
        name: "worker".into(),
        image: Some(image),
        args: Some(args.to_args()),
        env: Some(vec![EnvVar { name: "KANDLE_LOG_FORMAT".into(), value: Some("json".into()), ..EnvVar::default() }]),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: WORKER_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        resources: spec.resources.clone(),
        // Loading a large model takes minutes: up to 30 before liveness applies.
        startup_probe: Some(probe(READY_PATH, 5, 360)),
        readiness_probe: Some(probe(READY_PATH, 5, 3)),
        liveness_probe: Some(probe(HEALTH_PATH, 10, 3)),
        security_context: Some(restricted_container()),
        volume_mounts: Some(mounts),
        // Kubernetes takes a stopping pod out of its EndpointSlices while this
        // runs, and only then sends SIGTERM: every router hears of it before
        // the worker stops taking requests.
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction { seconds: PRE_STOP_SLEEP_SECONDS }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        ..Container::default()
    };
    for init in &mut init_containers {
        init.image = container.image.clone();
    }

    Ok(PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            init_containers: (!init_containers.is_empty()).then_some(init_containers),
            volumes: Some(volumes),
            node_selector: (!pod.node_selector.is_empty()).then_some(pod.node_selector),
            tolerations: (!pod.tolerations.is_empty()).then_some(pod.tolerations),
            affinity: pod.affinity,
            service_account_name: pod.service_account_name,
            priority_class_name: pod.priority_class_name,
            termination_grace_period_seconds: Some(
                pod.termination_grace_period_seconds.unwrap_or(DEFAULT_TERMINATION_GRACE_SECONDS),
            ),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(WORKER_UID),
                run_as_group: Some(WORKER_UID),
                fs_group: Some(WORKER_UID),
                seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
                ..PodSecurityContext::default()
            }),
            ..PodSpec::default()
        }),
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Container;
    use serde_json::json;

    use super::*;

    fn md(spec: serde_json::Value) -> ModelDeployment {
        serde_json::from_value(json!({
            "apiVersion": "kandle.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "chat", "namespace": "ml", "uid": "u-1"},
            "spec": spec,
        }))
        .expect("valid")
    }

    fn base() -> serde_json::Value {
        json!({"source": {"url": "file:///models/m.gguf"}, "auth": {"apiKeySecretRef": {"name": "keys"}}})
    }

    fn build(spec: serde_json::Value) -> Children {
        let md = md(spec);
        let location = ModelLocation::of(&md.spec.source).expect("servable");
        children(&md, &location, &BuildSettings::default()).expect("builds")
    }

    fn pod(c: &Children) -> PodSpec {
        c.deployment.spec.clone().and_then(|s| s.template.spec).expect("pod spec")
    }

    fn worker(c: &Children) -> Container {
        pod(c).containers.into_iter().next().expect("container")
    }

    fn args(c: &Children) -> Vec<String> {
        worker(c).args.expect("args")
    }

    fn flag(c: &Children, name: &str) -> Option<String> {
        let args = args(c);
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
    }

    #[test]
    fn defaults_give_a_restricted_single_worker_pool() {
        let c = build(base());
        assert_eq!(c.deployment.metadata.name.as_deref(), Some("chat"));
        assert_eq!(c.deployment.metadata.namespace.as_deref(), Some("ml"));
        let labels = c.deployment.metadata.labels.clone().expect("labels");
        assert_eq!(labels.get("app.kubernetes.io/name").map(String::as_str), Some("kandle-worker"));
        assert_eq!(labels.get("app.kubernetes.io/instance").map(String::as_str), Some("chat"));
        assert_eq!(labels.get("app.kubernetes.io/managed-by").map(String::as_str), Some("kandle"));
        assert_eq!(labels.get("kandle.dev/model").map(String::as_str), Some("chat"));
        let spec = c.deployment.spec.clone().expect("spec");
        assert_eq!(spec.replicas, Some(1));
        assert_eq!(spec.selector.match_labels, Some(selector_labels("chat")));
        assert!(c.pdb.is_none(), "no PDB for one replica");

        assert_eq!(
            args(&c),
            [
                "serve",
                "--model",
                "/models/m.gguf",
                "--served-model-name",
                "chat",
                "--host",
                "0.0.0.0",
                "--port",
                "8080",
                "--api-keys-dir",
                KEYS_DIR
            ]
        );
        let w = worker(&c);
        assert_eq!(w.image.as_deref(), Some(BuildSettings::default().worker_image.as_str()));
        let sc = w.security_context.expect("container security");
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.capabilities.and_then(|c| c.drop), Some(vec!["ALL".to_string()]));
        let p = pod(&c);
        let psc = p.security_context.clone().expect("pod security");
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.seccomp_profile.map(|s| s.type_), Some("RuntimeDefault".to_string()));
        assert_eq!(p.automount_service_account_token, Some(false));
        let probe_path = |p: Option<Probe>| p.and_then(|p| p.http_get).and_then(|h| h.path);
        assert_eq!(probe_path(w.readiness_probe), Some("/ready".into()));
        assert_eq!(probe_path(w.liveness_probe.clone()), Some("/health".into()));
        let startup = w.startup_probe.expect("startup probe");
        let budget = startup.period_seconds.unwrap_or(10) * startup.failure_threshold.unwrap_or(3);
        assert!(budget >= 600, "startup probe allows only {budget}s for model loading");
        // A stopping worker has time to finish long streams, and routers hear of
        // it (EndpointSlices) before it stops taking requests.
        assert_eq!(p.termination_grace_period_seconds, Some(DEFAULT_TERMINATION_GRACE_SECONDS));
        let pre_stop = w.lifecycle.clone().and_then(|l| l.pre_stop).and_then(|h| h.sleep).map(|s| s.seconds);
        assert_eq!(pre_stop, Some(PRE_STOP_SLEEP_SECONDS));

        // Keys are a read-only Secret volume, never environment variables.
        let keys = p.volumes.iter().flatten().find(|v| v.name == "api-keys").expect("key volume");
        assert_eq!(keys.secret.as_ref().and_then(|s| s.secret_name.as_deref()), Some("keys"));
        let mount = w.volume_mounts.iter().flatten().find(|m| m.name == "api-keys").expect("key mount");
        assert_eq!((mount.mount_path.as_str(), mount.read_only), (KEYS_DIR, Some(true)));
        assert!(w.env.iter().flatten().all(|e| e.value_from.is_none()));

        let svc = c.service.spec.clone().expect("service spec");
        assert_eq!(svc.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(svc.selector, Some(selector_labels("chat")));
        let port = &svc.ports.expect("ports")[0];
        assert_eq!((port.port, port.target_port.clone()), (8080, Some(IntOrString::String("http".into()))));
    }

    #[test]
    fn pvc_source_is_mounted_read_only() {
        let mut spec = base();
        spec["source"] = json!({"url": "pvc://model-cache/smollm2/model.gguf"});
        let c = build(spec);
        assert_eq!(flag(&c, "--model").as_deref(), Some("/var/lib/kandle/models/smollm2/model.gguf"));
        let p = pod(&c);
        let claim = p.volumes.iter().flatten().find_map(|v| v.persistent_volume_claim.clone()).expect("pvc volume");
        assert_eq!((claim.claim_name.as_str(), claim.read_only), ("model-cache", Some(true)));
        let mount = worker(&c).volume_mounts.into_iter().flatten().find(|m| m.name == "model").expect("mount");
        assert_eq!((mount.mount_path.as_str(), mount.read_only), (PVC_MOUNT, Some(true)));
    }

    #[test]
    fn remote_sources_are_fetched_by_an_init_container() {
        let mut spec = base();
        spec["source"] = json!({"url": "hf://HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "main",
                                "credentialsSecretRef": {"name": "hf-token"}});
        let c = build(spec.clone());
        let p = pod(&c);
        let init = p.init_containers.clone().and_then(|i| i.into_iter().next()).expect("init container");
        let dir = "/var/lib/kandle/cache/hf/HuggingFaceTB/SmolLM2-135M-Instruct/main";
        assert_eq!(
            init.args.clone().expect("args"),
            ["fetch", "hf://HuggingFaceTB/SmolLM2-135M-Instruct", "--dest", dir, "--revision", "main"]
        );
        assert_eq!(init.image, worker(&c).image, "the fetcher is the worker image");
        let token = init.env.iter().flatten().find(|e| e.name == "HF_TOKEN").expect("token env");
        let key = token.value_from.clone().and_then(|v| v.secret_key_ref).expect("secret ref");
        assert_eq!((key.name.as_str(), key.key.as_str()), ("hf-token", "token"));
        assert_eq!(init.security_context.and_then(|s| s.read_only_root_filesystem), Some(true));
        let rw = init.volume_mounts.iter().flatten().find(|m| m.name == "model-cache").expect("cache mount");
        assert_eq!(rw.read_only, Some(false));
        let ro = worker(&c).volume_mounts.into_iter().flatten().find(|m| m.name == "model-cache").expect("mount");
        assert_eq!(ro.read_only, Some(true));
        assert_eq!(flag(&c, "--model").as_deref(), Some(dir));
        let cache = p.volumes.iter().flatten().find(|v| v.name == "model-cache").expect("cache volume");
        assert!(cache.empty_dir.is_some() && cache.persistent_volume_claim.is_none());

        // A shared cache claim replaces the per-pod emptyDir; a named file is served directly.
        spec["source"] = json!({"url": "hf://org/repo/m.Q4_K_M.gguf", "sha256": "a".repeat(64),
                                "cache": {"claimName": "model-cache"}});
        let c = build(spec);
        let p = pod(&c);
        let cache = p.volumes.iter().flatten().find(|v| v.name == "model-cache").expect("cache volume");
        assert_eq!(cache.persistent_volume_claim.as_ref().map(|c| c.claim_name.as_str()), Some("model-cache"));
        assert_eq!(flag(&c, "--model").as_deref(), Some("/var/lib/kandle/cache/hf/org/repo/main/m.Q4_K_M.gguf"));
        let init = p.init_containers.and_then(|i| i.into_iter().next()).expect("init container");
        assert!(init.args.expect("args").windows(2).any(|w| w[0] == "--sha256" && w[1] == "a".repeat(64)));
    }

    #[test]
    fn gpu_limits_pick_the_cuda_image_and_carry_resources() {
        let mut spec = base();
        spec["resources"] = json!({"limits": {"nvidia.com/gpu": "1", "memory": "8Gi"}, "requests": {"cpu": "2"}});
        let c = build(spec.clone());
        let w = worker(&c);
        assert_eq!(w.image.as_deref(), Some(BuildSettings::default().worker_image_cuda.as_str()));
        let limits = w.resources.and_then(|r| r.limits).expect("limits");
        assert_eq!(limits.get("nvidia.com/gpu").map(|q| q.0.as_str()), Some("1"));
        assert_eq!(limits.get("memory").map(|q| q.0.as_str()), Some("8Gi"));
        spec["image"] = json!("registry.local/kandle:dev");
        assert_eq!(worker(&build(spec)).image.as_deref(), Some("registry.local/kandle:dev"));
    }

    #[test]
    fn names_aliases_engine_settings_and_template_become_flags() {
        let mut spec = base();
        spec["model"] = json!("Qwen/Qwen3-0.6B");
        spec["aliases"] = json!(["gpt-4o-mini", "qwen"]);
        spec["engine"] = json!({"maxBatchSize": 4, "maxContextLength": 2048, "threads": 6,
            "maxBatchTokens": 128, "kvCacheMemory": "2Gi", "prefixCache": false,
            "chatTemplate": "{{ messages }}", "defaults": {"temperature": 0.7, "top_p": 0.8}});
        let c = build(spec);
        assert_eq!(flag(&c, "--served-model-name").as_deref(), Some("Qwen/Qwen3-0.6B"));
        let aliases: Vec<String> = args(&c).windows(2).filter(|w| w[0] == "--alias").map(|w| w[1].clone()).collect();
        assert_eq!(aliases, ["gpt-4o-mini", "qwen"]);
        assert_eq!(flag(&c, "--max-batch-size").as_deref(), Some("4"));
        assert_eq!(flag(&c, "--max-context").as_deref(), Some("2048"));
        assert_eq!(flag(&c, "--threads").as_deref(), Some("6"));
        assert_eq!(flag(&c, "--max-batch-tokens").as_deref(), Some("128"));
        assert_eq!(flag(&c, "--kv-cache-memory").as_deref(), Some("2Gi"));
        assert!(args(&c).contains(&"--no-prefix-cache".to_string()));
        assert_eq!(flag(&c, "--sampling-defaults").as_deref(), Some(r#"{"temperature":0.7,"topP":0.8}"#));
        assert_eq!(flag(&c, "--chat-template").as_deref(), Some("/etc/kandle/template/chat_template.jinja"));
        // The whole line in the order pods have always had: a reordering would
        // restart every worker on an operator upgrade.
        let tail = args(&c).split_off(13);
        assert_eq!(
            tail,
            [
                "--api-keys-dir",
                KEYS_DIR,
                "--max-context",
                "2048",
                "--max-batch-size",
                "4",
                "--max-batch-tokens",
                "128",
                "--kv-cache-memory",
                "2Gi",
                "--no-prefix-cache",
                "--threads",
                "6",
                "--sampling-defaults",
                r#"{"temperature":0.7,"topP":0.8}"#,
                "--chat-template",
                "/etc/kandle/template/chat_template.jinja"
            ]
        );
        let template = c.deployment.spec.clone().and_then(|s| s.template.metadata).and_then(|m| m.annotations);
        assert_eq!(template.and_then(|a| a.get(TEMPLATE_ANNOTATION).cloned()).as_deref(), Some("{{ messages }}"));
        // Label values cannot hold every model name; the label carries the object's name.
        let labels = c.deployment.metadata.labels.clone().expect("labels");
        assert_eq!(labels.get("kandle.dev/model").map(String::as_str), Some("chat"));
    }

    #[test]
    fn auth_disabled_means_no_key_volume() {
        let mut spec = base();
        spec["auth"] = json!({"disabled": true});
        let c = build(spec);
        assert!(args(&c).contains(&"--no-auth".to_string()));
        assert!(!args(&c).contains(&"--api-keys-dir".to_string()));
        assert!(pod(&c).volumes.iter().flatten().all(|v| v.secret.is_none()));
    }

    #[test]
    fn custom_pod_fields_are_carried_and_kandle_labels_win() {
        let mut spec = base();
        spec["replicas"] = json!(3);
        spec["pod"] = json!({
            "nodeSelector": {"pool": "cpu"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
            "labels": {"team": "search", "app.kubernetes.io/name": "spoofed"},
            "annotations": {"prometheus.io/scrape": "true"},
            "serviceAccountName": "model-reader",
            "priorityClassName": "high",
            "terminationGracePeriodSeconds": 1800,
        });
        let c = build(spec);
        let p = pod(&c);
        assert_eq!(p.termination_grace_period_seconds, Some(1800));
        assert_eq!(p.node_selector.and_then(|n| n.get("pool").cloned()).as_deref(), Some("cpu"));
        assert_eq!(p.tolerations.map(|t| t.len()), Some(1));
        assert!(p.affinity.and_then(|a| a.node_affinity).is_some());
        assert_eq!(p.service_account_name.as_deref(), Some("model-reader"));
        assert_eq!(p.priority_class_name.as_deref(), Some("high"));
        let meta = c.deployment.spec.clone().and_then(|s| s.template.metadata).expect("template meta");
        let labels = meta.labels.expect("labels");
        assert_eq!(labels.get("team").map(String::as_str), Some("search"));
        assert_eq!(labels.get("app.kubernetes.io/name").map(String::as_str), Some("kandle-worker"));
        assert_eq!(meta.annotations.and_then(|a| a.get("prometheus.io/scrape").cloned()).as_deref(), Some("true"));

        let pdb = c.pdb.expect("PDB for 3 replicas").spec.expect("pdb spec");
        assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(pdb.selector.and_then(|s| s.match_labels), Some(selector_labels("chat")));
    }

    fn location(url: &str) -> Result<ModelLocation, SourceError> {
        ModelLocation::of(&ModelSource { url: url.into(), ..ModelSource::default() })
    }

    #[test]
    fn locations_of_every_source() {
        assert_eq!(
            location("hf://org/repo/m.gguf@v2"),
            Ok(ModelLocation::Download { dir: "hf/org/repo/v2".into(), file: Some("m.gguf".into()) })
        );
        let a = location("https://h/a.gguf");
        assert!(matches!(&a, Ok(ModelLocation::Download { dir, file: None }) if dir.starts_with("url/")));
        assert_ne!(a, location("https://h/b.gguf"), "each URL gets its own directory");
        assert!(location("file://relative").is_err());
        assert!(location("hf://org").is_err());
        assert!(location("hf://org/repo/../../etc").is_err());
        assert!(location("ftp://h/m.gguf").is_err());
        assert_eq!(location("pvc://claim"), Ok(ModelLocation::Claim { claim: "claim".into(), path: String::new() }));
    }

    #[test]
    fn the_download_directory_names_the_revision_fetched() {
        let at = |url: &str, revision: Option<&str>| {
            let source = ModelSource { url: url.into(), revision: revision.map(Into::into), ..ModelSource::default() };
            match ModelLocation::of(&source) {
                Ok(ModelLocation::Download { dir, .. }) => Ok(dir),
                other => Err(format!("{other:?}")),
            }
        };
        assert_eq!(at("hf://org/repo", None).as_deref(), Ok("hf/org/repo/main"));
        assert_eq!(at("hf://org/repo", Some("v2")).as_deref(), Ok("hf/org/repo/v2"));
        // spec.source.revision wins over the URL's, as in `kandle-worker fetch --revision`.
        assert_eq!(at("hf://org/repo@v1", Some("v2")).as_deref(), Ok("hf/org/repo/v2"));
        assert!(at("hf://org/repo", Some("../../x")).is_err());
    }

    #[test]
    fn plain_http_sources_are_downloaded_only_when_pinned() {
        let pinned = ModelSource {
            url: "http://mirror.internal/m.gguf".into(),
            sha256: Some("a".repeat(64)),
            ..ModelSource::default()
        };
        assert!(matches!(ModelLocation::of(&pinned), Ok(ModelLocation::Download { file: None, .. })));
        let err = location("http://mirror.internal/m.gguf").expect_err("unpinned");
        assert!(err.to_string().contains("needs sha256"), "{err}");
    }

    #[test]
    fn an_inference_pool_selects_the_workers_and_names_the_picker() {
        assert!(build(base()).inference_pool.is_none(), "none unless asked");
        let mut spec = base();
        spec["gateway"] = json!({"inferencePool": {}});
        let c = build(spec);
        let pool = c.inference_pool.clone().expect("an InferencePool");
        let value = serde_json::to_value(&pool).expect("serializes");
        assert_eq!(value["apiVersion"], "inference.networking.k8s.io/v1");
        assert_eq!(value["kind"], "InferencePool");
        // Named and labelled as the other children, owned by the ModelDeployment.
        assert_eq!(pool.metadata, c.service.metadata);
        let owner = &pool.metadata.owner_references.clone().expect("owner")[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str(), owner.controller), ("ModelDeployment", "u-1", Some(true)));
        // The selector is the Deployment's: every worker pod, and only those.
        let selector = c.deployment.spec.clone().expect("spec").selector.match_labels.expect("labels");
        assert_eq!(value["spec"]["selector"], json!({"matchLabels": selector}));
        let template =
            c.deployment.spec.clone().and_then(|s| s.template.metadata).and_then(|m| m.labels).expect("pod labels");
        assert!(selector.iter().all(|(k, v)| template.get(k) == Some(v)));
        assert_eq!(value["spec"]["targetPorts"], json!([{"number": 8080}]));
        assert_eq!(
            value["spec"]["endpointPickerRef"],
            json!({"name": "chat-epp", "port": {"number": 9002}, "failureMode": "FailClose"})
        );

        // The spec's picker wins field by field; a kind other than Service needs no port.
        let mut spec = base();
        spec["gateway"] =
            json!({"inferencePool": {"endpointPickerRef": {"name": "shared-epp", "failureMode": "FailOpen"}}});
        let value = serde_json::to_value(build(spec).inference_pool).expect("serializes");
        assert_eq!(
            value["spec"]["endpointPickerRef"],
            json!({"name": "shared-epp", "port": {"number": 9002}, "failureMode": "FailOpen"})
        );
        let mut spec = base();
        spec["gateway"] =
            json!({"inferencePool": {"endpointPickerRef": {"group": "picker.example.com", "kind": "Picker"}}});
        let value = serde_json::to_value(build(spec).inference_pool).expect("serializes");
        assert_eq!(
            value["spec"]["endpointPickerRef"],
            json!({"group": "picker.example.com", "kind": "Picker", "name": "chat-epp", "failureMode": "FailClose"})
        );
        // Without a kind it is a Service (the extension's default), whose port is required.
        let mut spec = base();
        spec["gateway"] = json!({"inferencePool": {"endpointPickerRef": {"group": "x.example.com"}}});
        let pool = build(spec).inference_pool.expect("pool");
        assert_eq!(pool.spec.endpoint_picker_ref.port, Some(PortNumber { number: 9002 }));
        // The operator's defaults fill what the spec leaves out.
        let mut spec = base();
        spec["gateway"] = json!({"inferencePool": {"endpointPickerRef": {"port": {"number": 9100}}}});
        let md = md(spec);
        let location = ModelLocation::of(&md.spec.source).expect("servable");
        let settings = BuildSettings {
            endpoint_picker: PickerDefaults {
                name: "epp-{name}-v1".into(),
                port: 1,
                failure_mode: FailureMode::FailOpen,
            },
            ..BuildSettings::default()
        };
        let pool = children(&md, &location, &settings).expect("builds").inference_pool.expect("pool");
        let picker = pool.spec.endpoint_picker_ref;
        assert_eq!(
            (picker.name.as_str(), picker.port, picker.failure_mode),
            ("epp-chat-v1", Some(PortNumber { number: 9100 }), FailureMode::FailOpen)
        );
    }

    #[test]
    fn worker_pods_behind_a_gateway_tell_endpoint_pickers_their_metric_names() {
        let pod_labels = |c: Children| c.deployment.spec.and_then(|s| s.template.metadata).and_then(|m| m.labels);
        let mut spec = base();
        spec["gateway"] = json!({"inferencePool": {}});
        let labels = pod_labels(build(spec)).expect("pod labels");
        for key in ["inference.networking.k8s.io/engine-type", "llm-d.ai/engine-type"] {
            assert_eq!(labels.get(key).map(String::as_str), Some("vllm"), "{key}");
        }
        // Not otherwise: an operator upgrade does not roll every pool.
        let labels = pod_labels(build(base())).expect("pod labels");
        assert!(!labels.keys().any(|k| k.ends_with("/engine-type")), "{labels:?}");
    }
}
