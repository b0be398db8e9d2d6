//! Discovery outside Kubernetes: a YAML route file, reloaded when it changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::table::{PoolSpec, Routes};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    models: Vec<PoolSpec>,
}

#[derive(Debug, thiserror::Error)]
pub enum RouteFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid route file: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

pub fn parse(path: &Path, text: &str) -> Result<Vec<PoolSpec>, RouteFileError> {
    let file: RouteFile = serde_yaml::from_str(text)
        .map_err(|source| RouteFileError::Parse { path: path.display().to_string(), source })?;
    for pool in &file.models {
        for url in &pool.endpoints {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(RouteFileError::Invalid {
                    path: path.display().to_string(),
                    message: format!("endpoint `{url}` of model {} is not an http(s) URL", pool.model),
                });
            }
        }
    }
    Ok(file.models)
}

fn read(path: &Path) -> Result<String, RouteFileError> {
    std::fs::read_to_string(path).map_err(|source| RouteFileError::Read { path: path.display().to_string(), source })
}

/// Loads the file once (failing start-up if it is broken), then re-reads it every
/// `interval`; a broken edit keeps the previous table.
pub fn load_and_watch(path: PathBuf, routes: Arc<Routes>, interval: Duration) -> Result<(), RouteFileError> {
    let mut last = read(&path)?;
    routes.update(parse(&path, &last)?);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            let text = match read(&path) {
                Ok(text) => text,
                Err(e) => {
                    tracing::warn!(error = %e, "keeping the current routes");
                    continue;
                }
            };
            if text == last {
                continue;
            }
            match parse(&path, &text) {
                Ok(specs) => {
                    tracing::info!(pools = specs.len(), "route file reloaded");
                    routes.update(specs);
                }
                Err(e) => tracing::warn!(error = %e, "keeping the current routes"),
            }
            last = text;
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_format() {
        let text = "models:\n  - model: smollm2\n    aliases: [gpt-4o-mini]\n    endpoints: [\"http://127.0.0.1:8081\", \"http://127.0.0.1:8082\"]\n  - model: other\n    endpoints: []\n";
        let specs = parse(Path::new("routes.yaml"), text).expect("parses");
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].aliases, ["gpt-4o-mini"]);
        assert_eq!(specs[0].endpoints.len(), 2);
    }

    #[test]
    fn rejects_typos_and_bad_urls() {
        assert!(parse(Path::new("r"), "models:\n  - model: a\n    endpoint: [\"http://x\"]\n").is_err());
        assert!(parse(Path::new("r"), "models:\n  - model: a\n    endpoints: [\"127.0.0.1:8080\"]\n").is_err());
        assert!(parse(Path::new("r"), "nope").is_err());
    }
}
