//! The RBAC rules the controller needs, in one place: the Helm chart renders them
//! (charts/kandle/files/controller-rbac.yaml is generated from here and checked
//! for drift), and the controller tests check that every API call is covered.

use k8s_openapi::api::rbac::v1::PolicyRule;
use serde::Serialize;

fn rule(group: &str, resources: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.to_string()]),
        resources: Some(resources.iter().map(|r| r.to_string()).collect()),
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        ..PolicyRule::default()
    }
}

/// Cluster-wide (or per watched namespace) rules of `kandle-operator controller`.
pub fn controller_rules() -> Vec<PolicyRule> {
    vec![
        rule("kandle.dev", &["modeldeployments"], &["get", "list", "watch"]),
        rule("kandle.dev", &["modeldeployments/status"], &["get", "patch"]),
        // The autoscaler sizes pools with spec.scaling, as any autoscaler does.
        rule("kandle.dev", &["modeldeployments/scale"], &["get", "patch"]),
        // ... from the /metrics of their worker pods.
        rule("", &["pods"], &["get", "list"]),
        rule("apps", &["deployments"], &["get", "list", "watch", "create", "patch"]),
        rule("", &["services"], &["get", "list", "watch", "create", "patch"]),
        rule("policy", &["poddisruptionbudgets"], &["get", "list", "watch", "create", "patch", "delete"]),
        // Existence checks of the Secrets a ModelDeployment names (metadata only):
        // no list or watch, so the controller cannot enumerate Secrets.
        rule("", &["secrets"], &["get"]),
        rule("events.k8s.io", &["events"], &["create", "patch"]),
        // Tenants are compiled, with their key Secrets (read by name, above),
        // into the routers' tenants file.
        rule("kandle.dev", &["tenants"], &["get", "list", "watch"]),
        rule("kandle.dev", &["tenants/status"], &["get", "patch"]),
    ]
}

/// The controller's rules for `spec.gateway.inferencePool` (the chart's
/// `gateway.inferencePools`): InferencePools applied and deleted by name,
/// never listed or watched.
pub fn gateway_rules() -> Vec<PolicyRule> {
    vec![rule("inference.networking.k8s.io", &["inferencepools"], &["get", "create", "patch", "delete"])]
}

/// Cluster-wide (or per watched namespace) rules of `kandle-operator router`
/// discovering pools in Kubernetes.
pub fn router_rules() -> Vec<PolicyRule> {
    vec![
        rule("kandle.dev", &["modeldeployments"], &["get", "list", "watch"]),
        rule("discovery.k8s.io", &["endpointslices"], &["get", "list", "watch"]),
    ]
}

/// Rules in the operator's own namespace: the leader-election Lease, the
/// router pods whose `/metrics` the autoscaler reads, and the Secret holding
/// the routers' tenants file.
pub fn leader_election_rules() -> Vec<PolicyRule> {
    vec![
        rule("coordination.k8s.io", &["leases"], &["get", "create", "update"]),
        rule("", &["pods"], &["get", "list"]),
        rule("", &["secrets"], &["get", "create", "patch"]),
    ]
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RulesFile {
    controller: Vec<PolicyRule>,
    gateway: Vec<PolicyRule>,
    leader_election: Vec<PolicyRule>,
    router: Vec<PolicyRule>,
}

/// The YAML the chart reads.
pub fn yaml() -> Result<String, serde_yaml::Error> {
    let file = RulesFile {
        controller: controller_rules(),
        gateway: gateway_rules(),
        leader_election: leader_election_rules(),
        router: router_rules(),
    };
    Ok(format!("# Generated from operator/src/rbac.rs; do not edit.\n{}", serde_yaml::to_string(&file)?))
}

/// Whether `rules` allow `verb` on `group`/`resource`.
pub fn allows(rules: &[PolicyRule], group: &str, resource: &str, verb: &str) -> bool {
    rules.iter().any(|r| {
        r.api_groups.iter().flatten().any(|g| g == group)
            && r.resources.iter().flatten().any(|x| x == resource)
            && r.verbs.iter().any(|v| v == verb)
    })
}
