//! The key the router shows workers (`--upstream-key-file`). With tenants on,
//! callers' keys are the router's to check and are not sent on; the router
//! authenticates to every worker with this one key instead (put it in each
//! pool's key Secret beside any keys callers use directly). Read again every
//! second, so it rotates as worker keys do.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::HeaderValue;

#[derive(Debug, Default)]
pub struct UpstreamKey {
    header: RwLock<Option<HeaderValue>>,
    /// The last failure to read it, so that each is logged once.
    failure: RwLock<Option<String>>,
}

impl UpstreamKey {
    /// `Authorization` for requests to workers; `None` until a key was read.
    pub fn authorization(&self) -> Option<HeaderValue> {
        self.header.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn load(&self, path: &Path) {
        let header = std::fs::read_to_string(path).map_err(|e| e.to_string()).and_then(|text| {
            let key = text.trim();
            if key.is_empty() {
                return Err("the file is empty".to_string());
            }
            let mut value =
                HeaderValue::try_from(format!("Bearer {key}")).map_err(|_| "not a valid key".to_string())?;
            value.set_sensitive(true);
            Ok(value)
        });
        let failure = header.as_ref().err().cloned();
        let mut last = self.failure.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let repeated = *last == failure;
        *last = failure;
        match header {
            Ok(value) => {
                let mut current = self.header.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                if current.as_ref() != Some(&value) {
                    tracing::info!(path = %path.display(), "upstream key loaded");
                    *current = Some(value);
                }
            }
            Err(_) if repeated => {}
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "upstream key not read; keeping the last one"),
        }
    }
}

/// Reads the key now and every `interval` after.
pub fn load_and_watch(path: PathBuf, interval: Duration) -> Arc<UpstreamKey> {
    let key = Arc::new(UpstreamKey::default());
    key.load(&path);
    let watched = key.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            watched.load(&path);
        }
    });
    key
}
