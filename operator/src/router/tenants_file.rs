//! The router's tenants, from `--tenants FILE` (YAML in the [`TenantsFile`]
//! shape: written by hand, or by the controller from Tenant resources into a
//! Secret mounted as the file), read again every second. A file that does not
//! parse or validate is refused whole and logged once: the last good set stays
//! in force. Until a first good set is read, API requests get 503: a router
//! told to enforce tenants never serves without them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::file_watch;
use crate::tenants::{TenantSet, TenantsFile};

#[derive(Debug, Default)]
pub struct Tenants {
    current: RwLock<Option<Arc<TenantSet>>>,
    /// Why the file's current text is not in force, if it is not.
    problem: RwLock<Option<String>>,
}

impl Tenants {
    /// The set in force; `None` until a good file was read.
    pub fn current(&self) -> Option<Arc<TenantSet>> {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// What is wrong with the file as it is now, if anything.
    pub fn problem(&self) -> Option<String> {
        self.problem.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn set_problem(&self, problem: Option<String>) {
        *self.problem.write().unwrap_or_else(std::sync::PoisonError::into_inner) = problem;
    }

    /// Takes the file's text: puts it in force, or keeps the last good set and says why.
    fn load(&self, path: &Path, text: Result<String, String>) {
        match text.and_then(|text| parse(&text)) {
            Ok(set) => {
                tracing::info!(
                    path = %path.display(),
                    tenants = set.tenants().len(),
                    keys = set.key_count(),
                    "tenants loaded"
                );
                *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(set));
                self.set_problem(None);
            }
            Err(problem) => {
                let kept = if self.current().is_some() {
                    "the last good set stays in force"
                } else {
                    "no set was ever loaded: API requests get 503"
                };
                tracing::error!(path = %path.display(), error = %problem, "tenants file refused; {kept}");
                self.set_problem(Some(problem));
            }
        }
    }
}

/// Parses and validates a tenants file; every problem in one message.
pub fn parse(text: &str) -> Result<TenantSet, String> {
    let file: TenantsFile =
        serde_yaml::from_str(text).map_err(|e| format!("not a tenants file: {}", shape_error(&e)))?;
    TenantSet::build(&file).map_err(|problems| problems.join("; "))
}

/// What is wrong with the file's shape, without any value from it (a value may
/// be a key): unknown and missing fields are named, anything else is placed.
fn shape_error(e: &serde_yaml::Error) -> String {
    let message = e.to_string();
    let field = ["unknown field `", "missing field `"].iter().find_map(|prefix| {
        let at = message.find(prefix)?;
        let name = &message[at + prefix.len()..];
        Some(format!("{}{}`", prefix, &name[..name.find('`')?]))
    });
    let place = e.location().map(|l| format!(" at line {} column {}", l.line(), l.column())).unwrap_or_default();
    match field {
        Some(field) => format!("{field}{place}"),
        None => format!("a value of the wrong type or an unreadable document{place}"),
    }
}

/// Loads the file now, then again whenever its text changes (checked every
/// `interval`). A missing or bad file does not stop the router: it answers
/// 503 until the file is good.
pub fn load_and_watch(path: PathBuf, tenants: Arc<Tenants>, interval: Duration) {
    file_watch::watch(path, interval, move |path, text| tenants.load(path, text));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_file_keeps_the_last_good_set() {
        let tenants = Tenants::default();
        let path = Path::new("tenants.yaml");
        tenants.load(path, Err("cannot read tenants.yaml: missing".into()));
        assert!(tenants.current().is_none());
        assert!(tenants.problem().is_some_and(|p| p.contains("missing")));
        tenants.load(path, Ok("tenants:\n  - {name: a, keys: [k1], models: ['*']}\n".into()));
        assert!(tenants.current().is_some_and(|s| s.authenticate("k1").is_some()));
        assert_eq!(tenants.problem(), None);
        tenants.load(path, Ok("tenants:\n  - {name: a, keys: [k2, k2], models: ['*']}\n".into()));
        assert!(tenants.current().is_some_and(|s| s.authenticate("k1").is_some()), "the good set stays");
        assert!(tenants.problem().is_some_and(|p| p.contains("listed twice")));
        tenants.load(path, Ok("tenants: {}".into()));
        assert!(tenants.problem().is_some_and(|p| p.starts_with("not a tenants file")));
        // A value is never repeated (a key pasted into the wrong field is still a key).
        tenants.load(path, Ok("tenants:\n  - {name: a, requestsPerMinute: sk-secret, models: ['*']}\n".into()));
        assert!(
            tenants.problem().is_some_and(|p| !p.contains("sk-secret") && p.contains("line 2")),
            "{:?}",
            tenants.problem()
        );
        tenants.load(path, Ok("tenants:\n  - {name: a, requestPerMinute: 5, models: ['*']}\n".into()));
        assert!(
            tenants.problem().is_some_and(|p| p.contains("unknown field `requestPerMinute`")),
            "{:?}",
            tenants.problem()
        );
    }
}
