//! Keeps the routers' tenants file in step with the Tenant resources, on the
//! leader: on every Tenant change and every `interval` (key Secrets are read,
//! not watched, so the controller never lists Secrets), it compiles the Tenants
//! and their keys ([`compile`]) into one Secret in its own namespace (key
//! [`FILE_KEY`], mounted into the router pods as their `--tenants` file) and
//! writes each Tenant's status.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::ByteString;
use kube::api::{Patch, PatchParams};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::compile::{compile, Outcome};
use super::TenantSet;
use crate::api::{Tenant, TenantStatus};
use crate::{labels, Error, Result, FIELD_MANAGER};

/// The key of the compiled Secret that holds the tenants file.
pub const FILE_KEY: &str = "tenants.yaml";

#[derive(Debug, Clone)]
pub struct TenantsConfig {
    /// Tenants in this namespace, or in all of them.
    pub namespace: Option<String>,
    /// Where the compiled Secret goes (the operator's namespace) and its name.
    pub secret_namespace: String,
    pub secret_name: String,
    /// How often key Secrets are read again.
    pub interval: Duration,
}

/// What the last round wrote, so that unchanged things are not written again.
#[derive(Debug, Default)]
pub struct Written {
    file: Option<String>,
}

/// Runs until `shutdown` resolves.
pub async fn run(client: kube::Client, config: TenantsConfig, shutdown: impl std::future::Future<Output = ()>) {
    let api: Api<Tenant> = match &config.namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    };
    let (reader, writer) = reflector::store();
    let changes = Arc::new(tokio::sync::Notify::new());
    let notify = changes.clone();
    let watch = reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .touched_objects()
        .for_each(move |event| {
            if let Err(e) = event {
                tracing::warn!(error = %e, "watching Tenants");
            }
            notify.notify_one();
            async {}
        });
    let watch = tokio::spawn(watch);
    tokio::pin!(shutdown);
    // An empty file before the first list would lock every tenant out.
    tokio::select! {
        () = &mut shutdown => { watch.abort(); return; }
        ready = reader.wait_until_ready() => if ready.is_err() { watch.abort(); return; }
    }
    let mut written = Written::default();
    loop {
        let tenants: Vec<Tenant> = reader.state().iter().map(|t| (**t).clone()).collect();
        if let Err(e) = round(&client, &config, &tenants, &mut written).await {
            tracing::warn!(error = %e, "tenants round failed; retrying");
        }
        tokio::select! {
            () = &mut shutdown => break,
            () = changes.notified() => {}
            () = tokio::time::sleep(config.interval) => {}
        }
    }
    watch.abort();
}

/// Reads the key Secrets, writes the compiled Secret if it changed and each
/// Tenant's status if it changed.
pub async fn round(
    client: &kube::Client,
    config: &TenantsConfig,
    tenants: &[Tenant],
    written: &mut Written,
) -> Result<()> {
    let mut secrets = HashMap::new();
    for tenant in tenants {
        let namespace = tenant.namespace().ok_or(Error::MissingObjectKey("metadata.namespace"))?;
        let key = (namespace.clone(), tenant.spec.key_secret_ref.name.clone());
        if !secrets.contains_key(&key) {
            let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
            secrets.insert(key.clone(), api.get_opt(&key.1).await?);
        }
    }
    let (file, outcomes) = compile(tenants, &secrets);
    match TenantSet::build(&file) {
        Err(problems) => {
            // Not expected (compile leaves out what would not validate): the
            // routers keep the last file.
            tracing::error!(problems = problems.join("; "), "compiled tenants do not validate; not written");
        }
        Ok(_) => {
            // JSON, which YAML readers read as it is.
            let text = serde_json::to_string_pretty(&file)
                .map_err(|source| Error::Serialization { what: "the tenants file", source })?;
            if written.file.as_ref() != Some(&text) {
                write_file(client, config, &text).await?;
                tracing::info!(tenants = file.tenants.len(), secret = %config.secret_name, "tenants file written");
                written.file = Some(text);
            }
        }
    }
    for (tenant, outcome) in outcomes.iter().filter_map(|o| find(tenants, o).map(|t| (t, o))) {
        publish(client, tenant, outcome).await?;
    }
    Ok(())
}

fn find<'a>(tenants: &'a [Tenant], outcome: &Outcome) -> Option<&'a Tenant> {
    tenants.iter().find(|t| t.namespace().as_deref() == Some(&outcome.namespace) && t.name_any() == outcome.name)
}

async fn write_file(client: &kube::Client, config: &TenantsConfig, text: &str) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &config.secret_namespace);
    // k8s-openapi writes apiVersion and kind with the object, as apply needs.
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(config.secret_name.clone()),
            namespace: Some(config.secret_namespace.clone()),
            labels: Some([(labels::MANAGED_BY.to_string(), labels::MANAGER.to_string())].into()),
            ..Default::default()
        },
        data: Some([(FILE_KEY.to_string(), ByteString(text.as_bytes().to_vec()))].into()),
        ..Default::default()
    };
    api.patch(&config.secret_name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&secret)).await?;
    Ok(())
}

/// The Tenant's status for `outcome`, keeping the condition's transition time
/// while its state stays the same.
fn status(tenant: &Tenant, outcome: &Outcome, now: &Time) -> TenantStatus {
    let (state, reason, message) = match &outcome.problem {
        None => ("True", "InForce".to_string(), format!("{} keys in the routers' tenants file", outcome.keys)),
        Some(p) => ("False", p.reason.to_string(), p.message.clone()),
    };
    let previous = tenant.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    let since = previous.filter(|c| c.status == state).map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    TenantStatus {
        observed_generation: tenant.metadata.generation,
        keys: i32::try_from(outcome.keys).unwrap_or(i32::MAX),
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: state.into(),
            reason,
            message,
            last_transition_time: since,
            observed_generation: tenant.metadata.generation,
        }],
    }
}

async fn publish(client: &kube::Client, tenant: &Tenant, outcome: &Outcome) -> Result<()> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let status = status(tenant, outcome, &now);
    if tenant.status.as_ref() == Some(&status) {
        return Ok(());
    }
    if let Some(problem) = &outcome.problem {
        tracing::warn!(namespace = %outcome.namespace, tenant = %outcome.name, reason = problem.reason, "{}", problem.message);
    }
    let api: Api<Tenant> = Api::namespaced(client.clone(), &outcome.namespace);
    let patch = json!({
        "apiVersion": Tenant::api_version(&()),
        "kind": Tenant::kind(&()),
        "status": status,
    });
    api.patch_status(&outcome.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use http::Method;
    use serde_json::Value;

    use super::*;
    use crate::{fake_api, rbac};

    fn tenant(name: &str, secret: &str) -> Tenant {
        serde_json::from_value(json!({
            "apiVersion": "kandle.dev/v1alpha1", "kind": "Tenant",
            "metadata": {"name": name, "namespace": "team", "generation": 2, "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"keySecretRef": {"name": secret}, "tokensPerMinute": 1000, "models": ["*"]},
        }))
        .expect("tenant")
    }

    #[tokio::test]
    async fn a_round_writes_the_file_and_the_statuses_within_rbac() {
        let (client, log) = fake_api::client(|method, path, _| match (method, path) {
            (&Method::GET, "/api/v1/namespaces/team/secrets/keys") => (
                200,
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "keys"}, "data": {"a": "c2stb25l"}}),
            ),
            (&Method::GET, _) => {
                (404, json!({"kind": "Status", "code": 404, "reason": "NotFound", "status": "Failure"}))
            }
            (&Method::PATCH, path) if path.ends_with("/status") => (
                200,
                json!({"apiVersion": "kandle.dev/v1alpha1", "kind": "Tenant", "metadata": {"name": "t", "namespace": "team"},
                       "spec": {"keySecretRef": {"name": "keys"}, "models": ["*"]}}),
            ),
            (&Method::PATCH, _) => {
                (200, json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kandle-tenants"}}))
            }
            _ => (405, json!({})),
        });
        let config = TenantsConfig {
            namespace: None,
            secret_namespace: "kandle-system".into(),
            secret_name: "kandle-tenants".into(),
            interval: Duration::from_secs(10),
        };
        let tenants = [tenant("search", "keys"), tenant("lost", "missing")];
        let mut written = Written::default();
        round(&client, &config, &tenants, &mut written).await.expect("round");
        let calls = log.lock().expect("log").clone();
        let file = calls
            .iter()
            .find(|c| c.method == Method::PATCH && c.path == "/api/v1/namespaces/kandle-system/secrets/kandle-tenants")
            .expect("the compiled Secret is applied");
        assert!(file.query.contains("fieldManager=kandle-operator"), "{}", file.query);
        assert_eq!(
            (&file.body["apiVersion"], &file.body["kind"]),
            (&json!("v1"), &json!("Secret")),
            "apply needs both"
        );
        let encoded = file.body["data"][FILE_KEY].as_str().expect("file");
        let text = String::from_utf8(decode(encoded)).expect("text");
        let parsed: crate::tenants::TenantsFile = serde_yaml::from_str(&text).expect("a tenants file");
        assert_eq!(parsed.tenants.len(), 1);
        assert_eq!(parsed.tenants[0].keys, ["sk-one"]);
        assert_eq!(parsed.tenants[0].tokens_per_minute, Some(1000));
        let status = |name: &str| -> Value {
            calls
                .iter()
                .find(|c| c.path == format!("/apis/kandle.dev/v1alpha1/namespaces/team/tenants/{name}/status"))
                .map(|c| c.body["status"].clone())
                .expect("status written")
        };
        assert_eq!(status("search")["conditions"][0]["reason"], "InForce");
        assert_eq!(status("search")["keys"], 1);
        assert_eq!(status("lost")["conditions"][0]["reason"], "SecretMissing");
        assert_eq!(status("lost")["conditions"][0]["status"], "False");
        for call in &calls {
            let namespaced_own = call.path.starts_with("/api/v1/namespaces/kandle-system/");
            let rules = if namespaced_own { rbac::leader_election_rules() } else { rbac::controller_rules() };
            let (group, resource) = if call.path.contains("/tenants/") {
                ("kandle.dev", if call.path.ends_with("/status") { "tenants/status" } else { "tenants" })
            } else {
                ("", "secrets")
            };
            let verb = if call.method == Method::GET { "get" } else { "patch" };
            assert!(rbac::allows(&rules, group, resource, verb), "{verb} {}", call.path);
        }
        // Nothing changed: nothing is written again but what the fake did not keep.
        let before = log.lock().expect("log").len();
        round(&client, &config, &tenants, &mut written).await.expect("round");
        let again = log.lock().expect("log")[before..].to_vec();
        assert!(!again.iter().any(|c| c.path.ends_with("/kandle-tenants")), "the file is written once");
    }

    fn decode(text: &str) -> Vec<u8> {
        let value: ByteString = serde_json::from_value(Value::String(text.into())).expect("base64");
        value.0
    }
}
