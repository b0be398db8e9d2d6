//! `ModelDeployment.spec`: what a platform team declares about a model pool.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use kandle_contract::engine::{KV_CACHE_MEMORY_PATTERN, MAX_BATCH_SIZE, MAX_BATCH_TOKENS, MAX_CONTEXT_LENGTH, THREADS};
use kandle_contract::source::{
    HTTP_NEEDS_SHA256, HTTP_NEEDS_SHA256_MESSAGE, PATTERN as SOURCE_URL, REVISION_PATTERN as REVISION,
};
use kandle_contract::SamplingDefaults;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::gateway::GatewaySpec;
use super::status::ModelDeploymentStatus;

/// A pool of kandle workers serving one model behind the OpenAI-compatible API.
// The printer columns repeat `type_ = "string"`, which clippy takes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kandle.dev",
    version = "v1alpha1",
    kind = "ModelDeployment",
    plural = "modeldeployments",
    shortname = "md",
    category = "kandle",
    namespaced,
    status = "ModelDeploymentStatus",
    derive = "PartialEq",
    doc = "A pool of kandle workers serving one language model behind an OpenAI-compatible API.",
    validation = Rule::new("size(self.metadata.name) <= 63 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("metadata.name names the workers' Service, so it must be a DNS-1035 label: at most 63 lowercase letters, digits and '-', starting with a letter (dots go in spec.model)"),
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Model",
        type_ = "string",
        json_path = ".status.servedModel",
        description = "Name clients send"
    ),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.ready", description = "Ready/desired workers"),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.phase",
        description = "Ready, Progressing or Degraded"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(
        name = "Architecture",
        type_ = "string",
        json_path = ".status.model.architecture",
        description = "Architecture of the loaded model",
        priority = 1
    ),
    printcolumn(
        name = "Quantization",
        type_ = "string",
        json_path = ".status.model.quantization",
        description = "Weight format of the loaded model",
        priority = 1
    ),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".status.endpoint",
        description = "In-cluster URL of the pool's Service",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentSpec {
    /// The name clients send as `model`. Defaults to metadata.name. Unique across the
    /// cluster: two ModelDeployments claiming one name are both reported Degraded
    /// (ModelNameConflict) except the oldest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"))]
    pub model: Option<String>,

    /// Extra names routed to this pool (for example a hosted model's name that
    /// existing clients already send).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")))]
    pub aliases: Vec<String>,

    /// Where the model comes from.
    pub source: ModelSource,

    /// How each worker runs the model.
    #[serde(default)]
    pub engine: EngineSpec,

    /// Number of worker pods. With `scaling` set, the controller sets it from
    /// demand (through the scale subresource, as an autoscaler does).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// Autoscaling from demand: requests in flight and waiting at the workers and
    /// held by the routers. Without it the pool keeps `replicas` workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<ScalingSpec>,

    /// CPU, memory and accelerator requests and limits of each worker container.
    /// A `nvidia.com/gpu` limit selects the CUDA worker image (CUDA 13 runtime:
    /// nodes need an NVIDIA driver 580 or newer; kernels for compute capability
    /// 8.0 and up by default, i.e. A100, A10, A30, L4, L40S; an image built with
    /// CUDA_COMPUTE_CAP=90 for H100/H200), whose worker then runs on the GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Who may call the model.
    pub auth: AuthSpec,

    /// Worker image; defaults to the image the operator was installed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,

    /// Scheduling and metadata of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodTemplate>,

    /// How gateways outside kandle reach the pool (the Gateway API Inference
    /// Extension's InferencePool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewaySpec>,
}

fn default_replicas() -> i32 {
    1
}

impl ModelDeploymentSpec {
    /// The most workers the pool may run without a spec change.
    pub fn max_replicas(&self) -> i32 {
        self.scaling.as_ref().map_or(self.replicas, |s| s.max_replicas)
    }
}

/// Go-style durations: `90s`, `5m`, `1h30m`.
pub const DURATION: &str = kandle_contract::duration::PATTERN;

/// How the controller sizes the pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas")
    .message("scaling.minReplicas must not exceed scaling.maxReplicas"))]
pub struct ScalingSpec {
    /// Fewest workers. 0 lets an idle pool scale to zero: the routers hold its
    /// requests while it comes back.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,
    /// Most workers.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Requests one worker should carry (in flight and waiting): the pool gets
    /// ceil(demand / targetRequests) workers. Default 4.
    #[serde(default = "default_target_requests")]
    #[schemars(range(min = 1, max = 10000))]
    pub target_requests: i32,
    /// How long a lower demand must last before the pool shrinks (scale-up is
    /// at once). Default 5m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION))]
    pub scale_down_delay: Option<String>,
    /// How long a pool with minReplicas 0 must see no request at all before it
    /// goes to zero. Default 15m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION))]
    pub scale_to_zero_after: Option<String>,
}

fn default_min_replicas() -> i32 {
    1
}

fn default_target_requests() -> i32 {
    4
}

/// The model's location and integrity.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(HTTP_NEEDS_SHA256).message(HTTP_NEEDS_SHA256_MESSAGE))]
pub struct ModelSource {
    /// `hf://org/repo[/file][@revision]` (Hugging Face Hub), `https://host/path/model.gguf`,
    /// `http://host/path/model.gguf` (only with `sha256`, which makes a download
    /// without TLS safe), `pvc://claim/path/in/claim` (a PersistentVolumeClaim in this namespace) or
    /// `file:///path/in/the/worker/image` (a path inside the worker container, for
    /// images with the model baked in; not a path on the node). Path segments may
    /// not be `.` or `..`.
    #[schemars(regex(pattern = SOURCE_URL))]
    pub url: String,

    /// Revision (branch, tag or commit) of an `hf://` source; wins over an
    /// `@revision` in the URL. Default `main`. Downloads are cached per revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = REVISION))]
    pub revision: Option<String>,

    /// Expected SHA-256 of a single-file source, as 64 lowercase hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-f0-9]{64}$"))]
    pub sha256: Option<String>,

    /// Secret with a token for private sources (key `token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretReference>,

    /// A PersistentVolumeClaim the workers share for downloaded models (ReadWriteMany
    /// when pods run on several nodes). Without it each pod downloads into its own
    /// emptyDir volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<SourceCache>,
}

/// Where `hf://` and `https://` sources are downloaded to.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SourceCache {
    /// Name of a PersistentVolumeClaim in the ModelDeployment's namespace.
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(max = 253))]
    pub claim_name: String,
}

/// A Secret in the ModelDeployment's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct SecretReference {
    /// Name of the Secret.
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(max = 253))]
    pub name: String,
}

/// Settings of the inference engine in each worker.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EngineSpec {
    /// Sequences in one forward pass: how many requests' choices each worker
    /// decodes together (default 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = *MAX_BATCH_SIZE.start(), max = *MAX_BATCH_SIZE.end()))]
    pub max_batch_size: Option<i32>,

    /// Tokens in one forward pass: a decode token per running sequence, then
    /// chunks of new prompts (default 256). A long prompt delays running streams
    /// by at most one such step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = *MAX_BATCH_TOKENS.start(), max = *MAX_BATCH_TOKENS.end()))]
    pub max_batch_tokens: Option<i32>,

    /// Memory of the KV block pool: bytes as a quantity (`2Gi`, `512M`) or a
    /// fraction of the container's memory limit (`0.25`). Default: enough for
    /// maxBatchSize sequences of the whole context, at most a quarter of the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = KV_CACHE_MEMORY_PATTERN))]
    pub kv_cache_memory: Option<String>,

    /// Reuse the KV blocks of prompt prefixes requests share (system prompts,
    /// conversation history), and keep them after a request ends (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_cache: Option<bool>,

    /// Tokens per sequence, prompt and completion together; clipped to the model's own context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = *MAX_CONTEXT_LENGTH.start(), max = *MAX_CONTEXT_LENGTH.end()))]
    pub max_context_length: Option<i32>,

    /// CPU threads for inference; 0 uses every core available to the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = *THREADS.start(), max = *THREADS.end()))]
    pub threads: Option<i32>,

    /// A Jinja chat template replacing the model's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    pub chat_template: Option<String>,

    /// Sampling values for requests that leave them out (a request's own values win).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = kandle_contract::sampling::one_spelling_each)]
    pub defaults: Option<SamplingDefaults>,
}

/// API keys, or none.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.apiKeySecretRef) != (has(self.disabled) && self.disabled)")
    .message("set exactly one of auth.apiKeySecretRef or auth.disabled: true"))]
pub struct AuthSpec {
    /// Secret whose every value is an accepted API key; rotated keys apply without restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretReference>,

    /// Serve without API keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
}

/// What the worker pods get beyond what kandle sets.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplate {
    /// Node labels the pods must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = label_values)]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node and pod affinity of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Extra pod labels (kandle's own labels win).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = label_values)]
    pub labels: BTreeMap<String, String>,
    /// Extra pod annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Service account the pods run as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(max = 253))]
    pub service_account_name: Option<String>,
    /// Priority class of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(max = 253))]
    pub priority_class_name: Option<String>,
    /// Seconds a stopping worker has to finish its streams before it is killed
    /// (default 600: a long CPU stream finishes on a rollout, scale-down or drain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub termination_grace_period_seconds: Option<i64>,
}

/// Kubernetes object names that are DNS subdomains (RFC 1123).
const DNS_SUBDOMAIN: &str = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$";
/// Label values: at most 63 characters, alphanumeric at both ends.
pub const LABEL_VALUE: &str = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$";

/// Label maps: every value a valid label value. (Keys are checked by the
/// controller: a schema cannot constrain map keys without a CEL rule whose
/// cost the API server cannot bound.)
fn label_values(schema: &mut schemars::Schema) {
    schema.insert(
        "additionalProperties".into(),
        serde_json::json!({"type": "string", "maxLength": 63, "pattern": LABEL_VALUE}),
    );
}
