//! `ModelDeployment.spec.gateway`, and the Gateway API Inference Extension's
//! `InferencePool` (`inference.networking.k8s.io/v1`) the controller makes of
//! it: the fields kandle writes, as the extension defines them.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How gateways outside kandle reach the pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// An InferencePool (inference.networking.k8s.io/v1, named after the
    /// ModelDeployment and owned by it) selecting the pool's ready workers,
    /// for Gateway API Inference Extension gateways. Needs the extension's
    /// CRDs; without them the InferencePoolReady condition says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_pool: Option<InferencePoolGateway>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolGateway {
    /// The endpoint picker the gateway asks which worker takes a request. Each
    /// field left out comes from the operator's defaults (the chart's
    /// `gateway.endpointPicker`: a Service named `<name>-epp`, port 9002,
    /// FailClose).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_picker_ref: Option<PickerRefSpec>,
}

/// An endpoint picker reference with every field optional.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PickerRefSpec {
    /// API group of the picker's object ("" for a Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub group: Option<String>,
    /// Kind of the picker's object (default Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"), length(max = 63))]
    pub kind: Option<String>,
    /// Name of the picker's object, in the ModelDeployment's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub name: Option<String>,
    /// The picker's port (its Service port, gRPC ext-proc).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortNumber>,
    /// What the gateway does when the picker cannot answer: FailClose refuses
    /// the request, FailOpen sends it to a worker of its own choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_mode: Option<FailureMode>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortNumber {
    /// The port number.
    #[schemars(range(min = 1, max = 65535))]
    pub number: i32,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FailureMode {
    FailOpen,
    #[default]
    FailClose,
}

impl std::str::FromStr for FailureMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "FailOpen" => Ok(Self::FailOpen),
            "FailClose" => Ok(Self::FailClose),
            other => Err(format!("`{other}` is neither FailOpen nor FailClose")),
        }
    }
}

/// The Gateway API Inference Extension's InferencePool: the model server
/// pods a gateway may send a request to, and the endpoint picker that says
/// which one.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "inference.networking.k8s.io",
    version = "v1",
    kind = "InferencePool",
    plural = "inferencepools",
    namespaced,
    derive = "PartialEq",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolSpec {
    /// Pods (in the pool's namespace) that serve the pool.
    pub selector: MatchLabels,
    /// The ports the model servers listen on.
    pub target_ports: Vec<PortNumber>,
    pub endpoint_picker_ref: EndpointPickerRef,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MatchLabels {
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPickerRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortNumber>,
    pub failure_mode: FailureMode,
}
