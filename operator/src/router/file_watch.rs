//! Files the router reads again while it runs (its tenants, its upstream key):
//! read now, then every `interval`; the handler gets each new reading (the
//! text, or why it could not be read) once, so an unchanged file, or the same
//! failure again, costs nothing and logs nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

type Reading = Result<String, String>;

fn read(path: &Path) -> Reading {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Hands the first reading to `on_change` now, later ones from a task (call
/// within a Tokio runtime).
pub fn watch(path: PathBuf, interval: Duration, mut on_change: impl FnMut(&Path, Reading) + Send + 'static) {
    let mut last = read(&path);
    on_change(&path, last.clone());
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            let now = read(&path);
            if now != last {
                on_change(&path, now.clone());
                last = now;
            }
        }
    });
}
