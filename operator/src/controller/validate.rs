//! Checks what the CRD schema cannot: referenced Secrets exist, the source can be
//! served, and no other ModelDeployment already claims the same model name.

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
    ModelLocation::parse(&md.spec.source.url).ok_or_else(|| Problem {
        reason: "SourceNotSupported",
        message: format!(
            "source {} cannot be served (expected hf://org/repo, https://, pvc://claim/path or file:///path)",
            md.spec.source.url
        ),
    })
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
