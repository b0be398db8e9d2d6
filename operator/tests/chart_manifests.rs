//! Every manifest the Helm chart renders (with default and non-default values,
//! by Helm's own engine through tests/helm_render.py) parses into its k8s-openapi
//! type with no field lost, and the RBAC it grants is exactly the rules the
//! controller and router are tested against.

use std::path::PathBuf;
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use kandle_operator::rbac;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde::Serialize;
use serde_json::Value;

fn render(values: &str) -> Vec<Value> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("python3")
        .arg(root.join("tests/helm_render.py"))
        .arg(values)
        .output()
        .expect("python3 runs (scripts/test.sh installs tests/requirements.txt)");
    assert!(out.status.success(), "rendering failed: {}", String::from_utf8_lossy(&out.stderr));
    let manifests: serde_json::Map<String, Value> =
        serde_json::from_slice(&out.stdout).expect("JSON from the renderer");
    let mut docs = Vec::new();
    for (path, text) in manifests {
        if path.ends_with("NOTES.txt") {
            continue;
        }
        for doc in serde_yaml::Deserializer::from_str(text.as_str().expect("manifest text")) {
            let yaml = serde_yaml::Value::deserialize(doc).expect("valid YAML");
            let json = serde_json::to_value(yaml).expect("YAML maps to JSON");
            if !json.is_null() {
                docs.push(json);
            }
        }
    }
    docs
}

/// Parses into `T` and back; the result must equal what was rendered.
fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value) -> T {
    let typed: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{e}: {doc}"));
    let back = serde_json::to_value(&typed).expect("serializes");
    assert_eq!(&back, doc, "fields lost in {} {}", doc["kind"], doc["metadata"]["name"]);
    typed
}

fn rules_of(docs: &[Value], kind: &str, name: &str) -> Vec<PolicyRule> {
    let doc = docs
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"));
    serde_json::from_value(doc["rules"].clone()).expect("rules")
}

/// `gateway_rules`: whether the chart grants the InferencePool rules (`gateway.inferencePools`).
fn check(values: &str, role_kind: &str, gateway_rules: bool) {
    let docs = render(values);
    assert!(!docs.is_empty());
    for doc in &docs {
        match doc["kind"].as_str().unwrap_or("") {
            "Deployment" => drop(round_trip::<Deployment>(doc)),
            "Service" => drop(round_trip::<Service>(doc)),
            "ServiceAccount" => drop(round_trip::<ServiceAccount>(doc)),
            "ClusterRole" => drop(round_trip::<ClusterRole>(doc)),
            "ClusterRoleBinding" => drop(round_trip::<ClusterRoleBinding>(doc)),
            "Role" => drop(round_trip::<Role>(doc)),
            "RoleBinding" => drop(round_trip::<RoleBinding>(doc)),
            // Not a core type: the Prometheus Operator's CRD.
            "ServiceMonitor" => assert_eq!(doc["apiVersion"], "monitoring.coreos.com/v1"),
            other => panic!("unexpected kind {other} rendered"),
        }
    }
    let mut controller = rbac::controller_rules();
    if gateway_rules {
        controller.extend(rbac::gateway_rules());
    }
    assert_eq!(rules_of(&docs, role_kind, "kandle-controller"), controller);
    assert_eq!(rules_of(&docs, role_kind, "kandle-router"), rbac::router_rules());
    assert_eq!(rules_of(&docs, "Role", "kandle-leader-election"), rbac::leader_election_rules());
}

#[test]
fn default_values_render_typed_manifests_with_exact_rbac() {
    check("{}", "ClusterRole", true);
}

#[test]
fn non_default_values_render_typed_manifests_with_exact_rbac() {
    check("\"non-default\"", "Role", false);
}
