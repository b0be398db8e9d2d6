//! API keys: every file in a directory (a mounted Secret) holds one key. The
//! directory is re-read periodically so rotated keys apply without a restart.
//! Keys are compared in constant time and never logged.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use subtle::ConstantTimeEq;

use crate::api::error::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read API key directory {dir}: {source}")]
    Unreadable {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no API keys in {0}: add a key file, or run with --no-auth")]
    Empty(String),
}

#[derive(Debug, Clone)]
pub struct KeyStore {
    dir: PathBuf,
    keys: Arc<RwLock<Vec<Vec<u8>>>>,
}

impl KeyStore {
    /// Reads the directory once; fails when it cannot be read or holds no key.
    pub fn open(dir: &Path) -> Result<Self, KeyError> {
        let keys = read_keys(dir)?;
        if keys.is_empty() {
            return Err(KeyError::Empty(dir.display().to_string()));
        }
        Ok(Self { dir: dir.to_path_buf(), keys: Arc::new(RwLock::new(keys)) })
    }

    /// Re-reads the directory every `interval` for as long as the store lives.
    pub fn watch(&self, interval: Duration) {
        let weak = Arc::downgrade(&self.keys);
        let dir = self.dir.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(keys) = weak.upgrade() else { return };
                let dir2 = dir.clone();
                let fresh = match tokio::task::spawn_blocking(move || read_keys(&dir2)).await {
                    Ok(Ok(fresh)) => fresh,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "keeping the current API keys");
                        continue;
                    }
                    Err(_) => continue,
                };
                let mut current = match keys.write() {
                    Ok(guard) => guard,
                    Err(poisoned) => poisoned.into_inner(),
                };
                if *current != fresh {
                    if fresh.is_empty() {
                        tracing::warn!(dir = %dir.display(), "API key directory is empty: every request will be refused");
                    } else {
                        tracing::info!(keys = fresh.len(), "API keys reloaded");
                    }
                    *current = fresh;
                }
            }
        });
    }

    /// Checks an `Authorization` header value.
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<(), ApiError> {
        let given = authorization
            .and_then(|h| h.strip_prefix(b"Bearer ").or_else(|| h.strip_prefix(b"bearer ")))
            .map(<[u8]>::trim_ascii)
            .filter(|k| !k.is_empty())
            .ok_or_else(ApiError::missing_key)?;
        let keys = match self.keys.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Every key is compared, so timing does not reveal which one matched.
        let matched = keys.iter().fold(subtle::Choice::from(0), |acc, k| acc | k.as_slice().ct_eq(given));
        if bool::from(matched) {
            Ok(())
        } else {
            Err(ApiError::invalid_key())
        }
    }
}

/// One key per regular file; Kubernetes' hidden `..data` entries are skipped and
/// the symlinks into them followed.
fn read_keys(dir: &Path) -> Result<Vec<Vec<u8>>, KeyError> {
    let unreadable = |source| KeyError::Unreadable { dir: dir.display().to_string(), source };
    let mut keys = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(unreadable)? {
        let entry = entry.map_err(unreadable)?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(unreadable)?;
        let key = bytes.trim_ascii();
        if !key.is_empty() {
            keys.push(key.to_vec());
        }
    }
    keys.sort();
    keys.dedup();
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(keys: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, key) in keys {
            std::fs::write(dir.path().join(name), key).expect("write key");
        }
        dir
    }

    #[test]
    fn accepts_any_key_and_rejects_others() {
        let dir = dir_with(&[("a", "sk-one\n"), ("b", "sk-two"), ("..data", "sk-hidden")]);
        let store = KeyStore::open(dir.path()).expect("opens");
        assert!(store.check(Some(b"Bearer sk-one")).is_ok());
        assert!(store.check(Some(b"Bearer sk-two")).is_ok());
        assert_eq!(store.check(Some(b"Bearer sk-hidden")), Err(ApiError::invalid_key()));
        assert_eq!(store.check(Some(b"Bearer sk-on")), Err(ApiError::invalid_key()));
        assert_eq!(store.check(Some(b"Basic sk-one")), Err(ApiError::missing_key()));
        assert_eq!(store.check(None), Err(ApiError::missing_key()));
    }

    #[test]
    fn empty_directory_refuses_to_start() {
        let dir = dir_with(&[("blank", "  \n")]);
        assert!(matches!(KeyStore::open(dir.path()), Err(KeyError::Empty(_))));
        assert!(KeyStore::open(&dir.path().join("missing")).is_err());
    }

    #[tokio::test]
    async fn rotation_on_disk_applies_without_restart() {
        let dir = dir_with(&[("key", "sk-old")]);
        let store = KeyStore::open(dir.path()).expect("opens");
        store.watch(Duration::from_millis(20));
        std::fs::write(dir.path().join("key"), "sk-new").expect("rotate");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store.check(Some(b"Bearer sk-new")).is_err() {
            assert!(std::time::Instant::now() < deadline, "rotation not picked up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(store.check(Some(b"Bearer sk-old")), Err(ApiError::invalid_key()));
    }
}
