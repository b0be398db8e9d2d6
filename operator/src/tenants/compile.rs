//! Tenant resources and their key Secrets → the routers' tenants file and each
//! Tenant's status, as a pure function. A tenant that cannot be in force (its
//! Secret missing or without keys, its name taken in another namespace, a key
//! another tenant already holds) is left out of the file and says why in its
//! status; the others are not held back by it. Where two Tenants claim the same
//! name or key, the older one keeps it, so a newcomer cannot take a key or a
//! name away from a tenant in force.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;

use super::{key_problem, Limits, TenantEntry, TenantsFile};
use crate::api::Tenant;

/// Why a tenant is not in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

/// One Tenant's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub namespace: String,
    pub name: String,
    /// Keys of the tenant in the file (0 when it is left out).
    pub keys: usize,
    pub problem: Option<Problem>,
}

/// The keys a Secret holds: every value, trimmed, non-empty, UTF-8; in key order.
fn keys_of(secret: &Secret) -> Result<Vec<String>, Problem> {
    let mut keys = Vec::new();
    for (field, value) in secret.data.iter().flatten() {
        let text = std::str::from_utf8(&value.0).map_err(|_| Problem {
            reason: "InvalidKey",
            message: format!("the value of `{field}` in Secret {} is not text", secret.name_any()),
        })?;
        let key = text.trim();
        if key.is_empty() {
            continue;
        }
        if let Some(problem) = key_problem(key) {
            return Err(Problem {
                reason: "InvalidKey",
                message: format!("the value of `{field}` in Secret {} {problem}", secret.name_any()),
            });
        }
        if !keys.iter().any(|k| k == key) {
            keys.push(key.to_string());
        }
    }
    Ok(keys)
}

/// A Tenant's limits as the file has them: a limit below 1 (which the schema
/// refuses) leaves the tenant out rather than without that limit.
fn limits_of(tenant: &Tenant) -> Result<Limits, Problem> {
    let spec = &tenant.spec;
    let bad = |field: &str| Problem { reason: "InvalidLimit", message: format!("{field} must be at least 1") };
    let requests = spec
        .requests_per_minute
        .map(|n| u32::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| bad("requestsPerMinute")));
    let tokens =
        spec.tokens_per_minute.map(|n| u64::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| bad("tokensPerMinute")));
    let concurrent = spec
        .concurrent_requests
        .map(|n| u32::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| bad("concurrentRequests")));
    Ok(Limits {
        requests_per_minute: requests.transpose()?,
        tokens_per_minute: tokens.transpose()?,
        concurrent_requests: concurrent.transpose()?,
    })
}

/// Compiles `tenants` with their Secrets (by namespace and name; `None`: not found).
pub fn compile(tenants: &[Tenant], secrets: &HashMap<(String, String), Option<Secret>>) -> (TenantsFile, Vec<Outcome>) {
    // Oldest first: they keep names and keys others claim later.
    let mut ordered: Vec<&Tenant> = tenants.iter().collect();
    ordered.sort_by_key(|t| (t.metadata.creation_timestamp.as_ref().map(|t| t.0), t.namespace(), t.name_any()));
    let mut file = TenantsFile::default();
    let mut outcomes = Vec::new();
    let mut names: HashMap<String, String> = HashMap::new();
    let mut owners: BTreeMap<String, String> = BTreeMap::new();
    for tenant in ordered {
        let namespace = tenant.namespace().unwrap_or_default();
        let name = tenant.name_any();
        let mut outcome = Outcome { namespace: namespace.clone(), name: name.clone(), keys: 0, problem: None };
        let secret_name = &tenant.spec.key_secret_ref.name;
        let limits = limits_of(tenant);
        let problem = if let Some(other) = names.get(&name) {
            Some(Problem {
                reason: "NameConflict",
                message: format!(
                    "a Tenant named {name} in namespace {other} is older; tenant names are unique across namespaces"
                ),
            })
        } else {
            match (&limits, secrets.get(&(namespace.clone(), secret_name.clone()))) {
                (Err(problem), _) => Some(problem.clone()),
                (Ok(_), Some(Some(secret))) => match keys_of(secret) {
                    Err(problem) => Some(problem),
                    Ok(keys) if keys.is_empty() => Some(Problem {
                        reason: "NoKeys",
                        message: format!("Secret {secret_name} holds no key (every value is one key)"),
                    }),
                    Ok(keys) => match keys.iter().find_map(|k| owners.get(k)) {
                        Some(owner) => Some(Problem {
                            reason: "DuplicateKey",
                            message: format!(
                                "a key in Secret {secret_name} already belongs to the older tenant {owner}; keys are unique across tenants"
                            ),
                        }),
                        None => {
                            for key in &keys {
                                owners.insert(key.clone(), name.clone());
                            }
                            outcome.keys = keys.len();
                            names.insert(name.clone(), namespace.clone());
                            let limits = limits.clone().unwrap_or_default();
                            file.tenants.push(TenantEntry {
                                name: name.clone(),
                                keys,
                                requests_per_minute: limits.requests_per_minute,
                                tokens_per_minute: limits.tokens_per_minute,
                                concurrent_requests: limits.concurrent_requests,
                                models: tenant.spec.models.clone(),
                            });
                            None
                        }
                    },
                },
                (Ok(_), _) => Some(Problem {
                    reason: "SecretMissing",
                    message: format!("Secret {secret_name} not found in namespace {namespace}"),
                }),
            }
        };
        if problem.is_some() && !names.contains_key(&name) {
            // A tenant left out still holds its name against later ones.
            names.insert(name.clone(), namespace.clone());
        }
        outcome.problem = problem;
        outcomes.push(outcome);
    }
    file.tenants.sort_by(|a, b| a.name.cmp(&b.name));
    (file, outcomes)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::ByteString;
    use serde_json::json;

    use super::*;
    use crate::tenants::TenantSet;

    fn tenant(namespace: &str, name: &str, secret: &str, created: i64) -> Tenant {
        let mut t: Tenant = serde_json::from_value(json!({
            "apiVersion": "kandle.dev/v1alpha1", "kind": "Tenant",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"keySecretRef": {"name": secret}, "requestsPerMinute": 60, "models": ["smollm2"]},
        }))
        .expect("tenant");
        t.metadata.creation_timestamp =
            Some(Time(k8s_openapi::jiff::Timestamp::from_second(created).expect("timestamp")));
        t
    }

    fn secret(values: &[&[u8]]) -> Option<Secret> {
        let data = values.iter().enumerate().map(|(i, v)| (format!("k{i}"), ByteString(v.to_vec()))).collect();
        Some(Secret { data: Some(data), ..Default::default() })
    }

    fn reason(outcomes: &[Outcome], namespace: &str, name: &str) -> Option<&'static str> {
        outcomes
            .iter()
            .find(|o| o.namespace == namespace && o.name == name)
            .and_then(|o| o.problem.as_ref().map(|p| p.reason))
    }

    #[test]
    fn tenants_in_force_are_compiled_and_the_rest_say_why() {
        let tenants = [
            tenant("a", "search", "search-keys", 100),
            tenant("b", "search", "keys", 200), // the name is taken by the older one
            tenant("b", "batch", "batch-keys", 300), // holds a key of search
            tenant("c", "ops", "gone", 50),
            tenant("c", "empty", "blank", 60),
            tenant("c", "late", "late-keys", 400),
        ];
        let secrets: HashMap<(String, String), Option<Secret>> = [
            (("a".into(), "search-keys".into()), secret(&[b"sk-1\n", b"sk-2", b"sk-1"])),
            (("b".into(), "keys".into()), secret(&[b"sk-9"])),
            (("b".into(), "batch-keys".into()), secret(&[b"sk-3", b"sk-2"])),
            (("c".into(), "blank".into()), secret(&[b"  "])),
            (("c".into(), "late-keys".into()), secret(&[b"sk-4"])),
        ]
        .into_iter()
        .collect();
        let (file, outcomes) = compile(&tenants, &secrets);
        let names: Vec<&str> = file.tenants.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["late", "search"]);
        let search = &file.tenants[1];
        assert_eq!(search.keys, ["sk-1", "sk-2"], "trimmed, without repeats");
        assert_eq!(search.requests_per_minute, Some(60));
        assert_eq!(reason(&outcomes, "a", "search"), None);
        assert_eq!(reason(&outcomes, "b", "search"), Some("NameConflict"));
        assert_eq!(reason(&outcomes, "b", "batch"), Some("DuplicateKey"));
        assert_eq!(reason(&outcomes, "c", "ops"), Some("SecretMissing"));
        assert_eq!(reason(&outcomes, "c", "empty"), Some("NoKeys"));
        assert_eq!(outcomes.iter().find(|o| o.name == "search" && o.namespace == "a").map(|o| o.keys), Some(2));
        // What the routers read always validates.
        assert!(TenantSet::build(&file).is_ok());
        let problem = outcomes.iter().find(|o| o.name == "batch").and_then(|o| o.problem.clone()).expect("problem");
        assert!(!problem.message.contains("sk-"), "keys are never named: {}", problem.message);
    }

    #[test]
    fn a_limit_below_one_leaves_the_tenant_out() {
        let mut t = tenant("a", "t", "s", 1);
        t.spec.requests_per_minute = Some(0);
        let (file, outcomes) = compile(&[t], &[(("a".into(), "s".into()), secret(&[b"sk-1"]))].into_iter().collect());
        assert!(file.tenants.is_empty());
        assert_eq!(reason(&outcomes, "a", "t"), Some("InvalidLimit"));
    }

    #[test]
    fn a_value_that_is_not_one_key_leaves_the_tenant_out_and_the_others_in() {
        for bad in [&b"\xff\xfe"[..], b"sk-1\nsk-2", b"sk 1", "sk-\u{e9}".as_bytes()] {
            let (file, outcomes) = compile(
                &[tenant("a", "t", "s", 1), tenant("a", "u", "ok", 2)],
                &[(("a".into(), "s".into()), secret(&[bad])), (("a".into(), "ok".into()), secret(&[b"sk-2x"]))]
                    .into_iter()
                    .collect(),
            );
            assert_eq!(file.tenants.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["u"], "{bad:?}");
            assert_eq!(reason(&outcomes, "a", "t"), Some("InvalidKey"), "{bad:?}");
            assert!(TenantSet::build(&file).is_ok(), "what is written always validates");
        }
    }
}
