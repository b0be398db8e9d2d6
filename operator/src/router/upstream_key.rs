//! The key the router shows workers (`--upstream-key-file`). With tenants on,
//! callers' keys are the router's to check and are not sent on; the router
//! authenticates to every worker with this one key instead (put it in each
//! pool's key Secret beside any keys callers use directly). Read again every
//! second, so it rotates as worker keys do.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::HeaderValue;

use super::file_watch;

#[derive(Debug, Default)]
pub struct UpstreamKey {
    header: RwLock<Option<HeaderValue>>,
}

impl UpstreamKey {
    /// `Authorization` for requests to workers; `None` until a key was read.
    pub fn authorization(&self) -> Option<HeaderValue> {
        self.header.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Takes a new reading of the file; a failure keeps the last key.
    fn load(&self, path: &Path, text: Result<String, String>) {
        let header = text.and_then(|text| {
            let key = text.trim();
            if key.is_empty() {
                return Err("the file is empty".to_string());
            }
            let mut value =
                HeaderValue::try_from(format!("Bearer {key}")).map_err(|_| "not a valid key".to_string())?;
            value.set_sensitive(true);
            Ok(value)
        });
        match header {
            Ok(value) => {
                let mut current = self.header.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                if current.as_ref() != Some(&value) {
                    tracing::info!(path = %path.display(), "upstream key loaded");
                    *current = Some(value);
                }
            }
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "upstream key not read; keeping the last one"),
        }
    }
}

/// Reads the key now and again whenever the file changes (checked every `interval`).
pub fn load_and_watch(path: PathBuf, interval: Duration) -> Arc<UpstreamKey> {
    let key = Arc::new(UpstreamKey::default());
    let loaded = key.clone();
    file_watch::watch(path, interval, move |path, text| loaded.load(path, text));
    key
}
