//! Checks what the CRD schema cannot: referenced Secrets exist, the source can be
//! served, no other ModelDeployment already claims the same model name, and the
//! pod's label and annotation keys are valid (a schema cannot constrain map keys
//! at a cost the API server accepts).

use super::build::ModelLocation;
use super::dereference::References;
use crate::api::ModelDeployment;

/// Why a ModelDeployment cannot run; becomes the reason of its Degraded condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

/// Returns where the model comes from, or the first problem found.
pub fn check(md: &ModelDeployment, refs: &References, others: &[ModelDeployment]) -> Result<ModelLocation, Problem> {
    if let Some(secret) = refs.missing_secrets.first() {
        return Err(Problem {
            reason: "SecretNotFound",
            message: format!(
                "Secret {secret} does not exist in namespace {}",
                md.metadata.namespace.as_deref().unwrap_or("")
            ),
        });
    }
    if let Some(conflict) = name_conflict(md, others) {
        return Err(conflict);
    }
    if let Some(problem) = pod_metadata_problem(md) {
        return Err(problem);
    }
    ModelLocation::of(&md.spec.source)
        .map_err(|e| Problem { reason: "SourceNotSupported", message: format!("source {e}") })
}

/// The first label, node-selector or annotation key that Kubernetes would refuse.
fn pod_metadata_problem(md: &ModelDeployment) -> Option<Problem> {
    let pod = md.spec.pod.as_ref()?;
    let maps = [("labels", &pod.labels), ("nodeSelector", &pod.node_selector), ("annotations", &pod.annotations)];
    maps.into_iter().find_map(|(field, map)| {
        let key = map.keys().find(|k| !is_qualified_name(k))?;
        Some(Problem {
            reason: "InvalidSpec",
            message: format!(
                "spec.pod.{field} key {key:?} is not a valid Kubernetes key: an optional DNS subdomain prefix and '/', \
                 then at most 63 letters, digits, '-', '_' or '.', alphanumeric at both ends"
            ),
        })
    })
}

/// Kubernetes' qualified names (label and annotation keys): `[prefix/]name`.
pub fn is_qualified_name(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    let name_ok = name.len() <= 63
        && alnum(name.chars().next())
        && alnum(name.chars().last())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    let prefix_ok = prefix.is_none_or(|p| {
        let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        p.len() <= 253
            && edge(p.chars().next())
            && edge(p.chars().last())
            && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    });
    name_ok && prefix_ok
}

/// Every name a deployment answers to.
fn names(md: &ModelDeployment) -> Vec<String> {
    let mut names = vec![md.served_model()];
    names.extend(md.spec.aliases.iter().cloned());
    names
}

/// The oldest deployment keeps a contested name; the others are in conflict.
fn name_conflict(md: &ModelDeployment, others: &[ModelDeployment]) -> Option<Problem> {
    let mine = names(md);
    let key = |d: &ModelDeployment| {
        (
            d.metadata.creation_timestamp.clone().map(|t| t.0),
            d.metadata.namespace.clone().unwrap_or_default(),
            d.metadata.name.clone().unwrap_or_default(),
        )
    };
    others.iter().filter(|o| o.metadata.uid != md.metadata.uid).filter(|o| key(o) < key(md)).find_map(|o| {
        let theirs = names(o);
        let shared = mine.iter().find(|n| theirs.contains(n))?;
        Some(Problem {
            reason: "ModelNameConflict",
            message: format!(
                "model name {shared} is already served by ModelDeployment {}/{}",
                o.metadata.namespace.as_deref().unwrap_or(""),
                o.metadata.name.as_deref().unwrap_or("")
            ),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::is_qualified_name;

    #[test]
    fn qualified_names() {
        for ok in ["team", "app.kubernetes.io/name", "a", "A_b-c.d", &"x".repeat(63)] {
            assert!(is_qualified_name(ok), "{ok}");
        }
        for bad in ["", "-team", "team-", "has space", "Example.com/x", "a/b/c", "/x", "x/", &"x".repeat(64)] {
            assert!(!is_qualified_name(bad), "{bad}");
        }
    }
}
