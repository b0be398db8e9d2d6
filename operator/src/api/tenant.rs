//! The `Tenant` custom resource: a team that calls the routers, with the
//! Secret that holds its keys, its limits and the models it may call. The
//! controller compiles every Tenant (and its keys) into the routers' tenants
//! file ([`crate::tenants::TenantsFile`]).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::spec::SecretReference;

/// A team calling kandle's routers: its API keys, limits and models.
// The printer columns repeat `type_ = "string"`, which clippy takes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kandle.dev",
    version = "v1alpha1",
    kind = "Tenant",
    plural = "tenants",
    category = "kandle",
    namespaced,
    status = "TenantStatus",
    derive = "PartialEq",
    doc = "A team that calls kandle's routers: the Secret holding its API keys, its limits and the models it may call.",
    validation = Rule::new("size(self.metadata.name) <= 63 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')")
        .message("metadata.name names the tenant in the routers' metrics and logs, so it must be a DNS-1123 label: at most 63 lowercase letters, digits and '-'"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Keys", type_ = "integer", json_path = ".status.keys", description = "API keys in force"),
    printcolumn(name = "RPM", type_ = "integer", json_path = ".spec.requestsPerMinute", description = "Requests per minute"),
    printcolumn(name = "TPM", type_ = "integer", json_path = ".spec.tokensPerMinute", description = "Tokens per minute"),
    printcolumn(
        name = "Concurrent",
        type_ = "integer",
        json_path = ".spec.concurrentRequests",
        description = "Requests in flight at most"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct TenantSpec {
    /// The Secret (in the Tenant's namespace) whose every value is one API key
    /// of this tenant. Keys rotate by editing it.
    pub key_secret_ref: SecretReference,
    /// Requests admitted per minute (a bucket holding a minute's worth that
    /// refills continuously). Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests_per_minute: Option<i32>,
    /// Tokens (prompt + completion, charged from each answer's usage) per
    /// minute. Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_minute: Option<i64>,
    /// Requests in flight at once. Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub concurrent_requests: Option<i32>,
    /// Model names or aliases the tenant may call; `"*"` for every model.
    #[schemars(length(min = 1))]
    pub models: Vec<String>,
}

/// The tenant as the controller last compiled it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TenantStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// API keys of this tenant in the routers' tenants file.
    #[serde(default)]
    pub keys: i32,
    /// `Ready`: whether the tenant is in force at the routers, and why not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
