//! Tenants: who may call the router, which models, under which limits.
//!
//! One definition of the tenants file: what `kandle-operator router --tenants
//! FILE` reads and what the controller writes from Tenant resources and their
//! Secrets. [`TenantSet::build`] validates a file whole (a key listed twice, a
//! name used twice, a limit of zero: the file is refused, never half-used) and
//! finds the tenant of a key by comparing SHA-256 digests in constant time.

pub mod compile;
pub mod controller;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The model list entry that lets a tenant call every model.
pub const ALL_MODELS: &str = "*";

/// The tenants file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantsFile {
    pub tenants: Vec<TenantEntry>,
}

/// One tenant in the file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantEntry {
    pub name: String,
    /// API keys; each one authenticates as this tenant.
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrent_requests: Option<u32>,
    /// Model names or aliases the tenant may call; `"*"` for all.
    pub models: Vec<String>,
}

/// A tenant's limits; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Limits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub concurrent_requests: Option<u32>,
}

/// Which models a tenant may call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Models {
    All,
    /// Names or aliases: a pool is open to the tenant when any of its names is here.
    Only(BTreeSet<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub name: String,
    pub limits: Limits,
    pub models: Models,
}

impl Tenant {
    /// Whether the tenant may call a pool known by `names` (its served name and aliases).
    pub fn may_call<'a>(&self, mut names: impl Iterator<Item = &'a str>) -> bool {
        match &self.models {
            Models::All => true,
            Models::Only(allowed) => names.any(|name| allowed.contains(name)),
        }
    }
}

/// A validated set of tenants, with their keys as digests.
#[derive(Debug, Default)]
pub struct TenantSet {
    tenants: Vec<Arc<Tenant>>,
    /// (SHA-256 of a key, index into `tenants`).
    keys: Vec<([u8; 32], usize)>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl TenantSet {
    /// Validates every entry; any problem refuses the whole file, with every
    /// problem found (keys are never named in them).
    pub fn build(file: &TenantsFile) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let mut set = Self::default();
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut owners: HashMap<[u8; 32], &str> = HashMap::new();
        for (i, entry) in file.tenants.iter().enumerate() {
            let name = entry.name.as_str();
            if !is_label_value(name) {
                problems.push(format!(
                    "tenant {}: the name must be 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
                    i + 1
                ));
            }
            if names.insert(name, i).is_some() {
                problems.push(format!("tenant {name}: the name is used twice"));
            }
            for (field, value) in [
                ("requestsPerMinute", entry.requests_per_minute.map(u64::from)),
                ("tokensPerMinute", entry.tokens_per_minute),
                ("concurrentRequests", entry.concurrent_requests.map(u64::from)),
            ] {
                if value == Some(0) {
                    problems.push(format!("tenant {name}: {field} must be at least 1 (leave it out for no limit)"));
                }
            }
            if entry.models.is_empty() {
                problems.push(format!("tenant {name}: models is empty (list names or aliases, or \"*\" for all)"));
            }
            for (k, key) in entry.keys.iter().enumerate() {
                if let Some(problem) = key_problem(key) {
                    problems.push(format!("tenant {name}: key {} {problem}", k + 1));
                    continue;
                }
                let hash = digest(key);
                match owners.insert(hash, name) {
                    Some(other) if other == name => problems.push(format!("tenant {name}: a key is listed twice")),
                    Some(other) => problems.push(format!("tenants {other} and {name} share a key")),
                    None => set.keys.push((hash, i)),
                }
            }
            let models = if entry.models.iter().any(|m| m == ALL_MODELS) {
                Models::All
            } else {
                Models::Only(entry.models.iter().cloned().collect())
            };
            let limits = Limits {
                requests_per_minute: entry.requests_per_minute,
                tokens_per_minute: entry.tokens_per_minute,
                concurrent_requests: entry.concurrent_requests,
            };
            set.tenants.push(Arc::new(Tenant { name: entry.name.clone(), limits, models }));
        }
        if problems.is_empty() {
            Ok(set)
        } else {
            Err(problems)
        }
    }

    /// The tenant whose key this is. Every key's digest is compared, in
    /// constant time, whatever matches: the time taken says nothing of which
    /// key (or how much of one) was right.
    pub fn authenticate(&self, key: &str) -> Option<Arc<Tenant>> {
        let presented = digest(key);
        let mut found = None;
        for (hash, index) in &self.keys {
            if bool::from(hash.ct_eq(&presented)) {
                found = Some(*index);
            }
        }
        found.and_then(|i| self.tenants.get(i).cloned())
    }

    pub fn tenants(&self) -> &[Arc<Tenant>] {
        &self.tenants
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }
}

/// Why `key` cannot be an API key, if it cannot: keys are what an
/// `Authorization: Bearer` header carries, printable ASCII without spaces.
pub fn key_problem(key: &str) -> Option<&'static str> {
    if key.is_empty() {
        Some("is empty")
    } else if !key.bytes().all(|b| b.is_ascii_graphic()) {
        Some("has spaces, control characters or characters outside ASCII")
    } else {
        None
    }
}

/// Tenant names become metric labels and log fields: the rules of a Kubernetes label value.
fn is_label_value(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> TenantsFile {
        serde_yaml::from_str(text).expect("test YAML")
    }

    #[test]
    fn keys_find_their_tenant_and_models_are_checked_by_any_name() {
        let set = TenantSet::build(&file(
            "tenants:
  - name: team-a
    keys: [sk-a1, sk-a2]
    requestsPerMinute: 60
    models: [smollm2, fast]
  - name: ops
    keys: [sk-ops]
    tokensPerMinute: 1000
    concurrentRequests: 2
    models: ['*']
",
        ))
        .expect("valid");
        assert_eq!(set.key_count(), 3);
        let a = set.authenticate("sk-a2").expect("team-a key");
        assert_eq!(a.name, "team-a");
        assert_eq!(a.limits, Limits { requests_per_minute: Some(60), ..Default::default() });
        assert!(a.may_call(["smollm2"].into_iter()));
        assert!(a.may_call(["big", "fast"].into_iter()), "an alias opens its pool");
        assert!(!a.may_call(["big", "huge"].into_iter()));
        let ops = set.authenticate("sk-ops").expect("ops key");
        assert_eq!(ops.limits.concurrent_requests, Some(2));
        assert!(ops.may_call(["anything"].into_iter()));
        assert!(set.authenticate("sk-a").is_none(), "a prefix of a key is not a key");
        assert!(set.authenticate("").is_none());
    }

    #[test]
    fn a_bad_file_is_refused_whole_with_every_problem() {
        let problems = TenantSet::build(&file(
            "tenants:
  - name: a
    keys: [k1, k1, ' k2']
    requestsPerMinute: 0
    models: []
  - name: b
    keys: [k1]
    models: [m]
  - name: b
    models: [m]
  - name: -bad
    models: [m]
",
        ))
        .expect_err("invalid");
        let text = problems.join("\n");
        for expected in [
            "tenant a: a key is listed twice",
            "tenant a: key 3 has spaces",
            "tenant a: requestsPerMinute must be at least 1",
            "tenant a: models is empty",
            "tenants a and b share a key",
            "tenant b: the name is used twice",
            "tenant 4: the name must be",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        assert!(!text.contains("k1"), "keys are never named: {text}");
    }

    #[test]
    fn unknown_fields_are_refused_so_a_misspelt_limit_never_lifts_it() {
        let e =
            serde_yaml::from_str::<TenantsFile>("tenants:\n  - name: a\n    requestPerMinute: 5\n    models: ['*']\n")
                .expect_err("unknown field");
        assert!(e.to_string().contains("requestPerMinute"), "{e}");
    }
}
