//! `kandle-worker fetch URL --dest DIR`: brings a model to local disk (the
//! operator's init container), from the Hugging Face Hub or an https URL (an
//! http one when a sha256 pins it), or checks that a `file://` / `pvc://` model
//! is present.

mod download;
mod hub;
pub mod source;

use std::path::{Path, PathBuf};

use source::Source;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("invalid source {0}")]
    BadSource(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("Hugging Face Hub: {0}")]
    Hub(String),
    #[error("download failed: {0}")]
    Http(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("checksum mismatch for {file}: expected sha256 {expected}, got {actual}; the download was removed")]
    ChecksumMismatch { file: String, expected: String, actual: String },
}

impl FetchError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.display().to_string(), source }
    }
}

/// What to fetch and where.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    pub url: String,
    pub dest: PathBuf,
    /// Overrides a revision given in the URL (`@rev`); default `main`.
    pub revision: Option<String>,
    /// Expected SHA-256 of a single-file source.
    pub sha256: Option<String>,
    /// Hugging Face token (HF_TOKEN).
    pub token: Option<String>,
    /// Hub base URL (HF_ENDPOINT), `https://huggingface.co` by default.
    pub endpoint: String,
}

/// Fetches the model and returns the path to serve (a file, or a directory).
pub async fn run(config: &FetchConfig) -> Result<PathBuf, FetchError> {
    // reqwest is built without a default TLS provider; install ring's once.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| FetchError::Http(e.to_string()))?;
    match source::parse(&config.url, config.sha256.as_deref())? {
        Source::Local(path) => {
            if tokio::fs::metadata(&path).await.is_err() {
                return Err(FetchError::NotFound(format!("{} does not exist", path.display())));
            }
            Ok(path)
        }
        Source::Url(url) => {
            let name = url
                .split(['?', '#'])
                .next()
                .and_then(|u| u.rsplit('/').next())
                .filter(|n| !n.is_empty())
                .ok_or_else(|| FetchError::BadSource(format!("{url}: no file name in the URL")))?;
            let dest = config.dest.join(name);
            let d = download::Download {
                url: &url,
                token: None,
                dest: &dest,
                sha256: config.sha256.as_deref(),
                size: None,
            };
            download::run(&client, d).await?;
            Ok(dest)
        }
        Source::Hub { repo, file, revision } => {
            let revision = kandle_contract::source::hub_revision(revision.as_deref(), config.revision.as_deref())
                .map_err(|e| FetchError::BadSource(e.to_string()))?;
            let endpoint = config.endpoint.trim_end_matches('/');
            let listing_url = format!("{endpoint}/api/models/{repo}/revision/{revision}?blobs=true");
            let mut request = client.get(&listing_url);
            if let Some(token) = &config.token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.map_err(|e| FetchError::Hub(format!("{listing_url}: {e}")))?;
            if response.status() == reqwest::StatusCode::NOT_FOUND {
                return Err(FetchError::NotFound(format!("{repo}@{revision} on {endpoint}")));
            }
            if !response.status().is_success() {
                return Err(FetchError::Hub(format!("{listing_url}: {}", response.status())));
            }
            let body = response.bytes().await.map_err(|e| FetchError::Hub(e.to_string()))?;
            let files = hub::choose(&hub::parse_listing(&body)?, file.as_deref(), &repo)?;
            let single = files.len() == 1;
            for f in &files {
                let dest = config.dest.join(&f.name);
                let sha256 =
                    if single { config.sha256.as_deref().or(f.sha256.as_deref()) } else { f.sha256.as_deref() };
                let url = format!("{endpoint}/{repo}/resolve/{revision}/{}", f.name);
                let d =
                    download::Download { url: &url, token: config.token.as_deref(), dest: &dest, sha256, size: f.size };
                download::run(&client, d).await?;
            }
            Ok(if single { config.dest.join(&files[0].name) } else { config.dest.clone() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::hub::{choose, parse_listing};

    const LISTING: &str = r#"{"siblings": [
        {"rfilename": "README.md", "size": 10},
        {"rfilename": "config.json", "size": 600},
        {"rfilename": "tokenizer.json", "size": 2000},
        {"rfilename": "tokenizer_config.json", "size": 300},
        {"rfilename": "model.safetensors", "size": 100, "lfs": {"sha256": "ab", "size": 269060552}},
        {"rfilename": "onnx/model.onnx", "size": 5}
    ]}"#;

    #[test]
    fn a_checkpoint_is_its_config_tokenizer_and_weights() {
        let files = parse_listing(LISTING.as_bytes()).expect("parses");
        let chosen = choose(&files, None, "o/r").expect("chosen");
        let names: Vec<&str> = chosen.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"]);
        let weights = &chosen[3];
        assert_eq!((weights.size, weights.sha256.as_deref()), (Some(269060552), Some("ab")));
    }

    #[test]
    fn gguf_repositories_need_a_name_when_they_hold_several() {
        let files = parse_listing(br#"{"siblings": [{"rfilename": "m.Q4_K_M.gguf"}, {"rfilename": "m.Q8_0.gguf"}]}"#)
            .expect("parses");
        let err = choose(&files, None, "o/r").expect_err("ambiguous");
        assert!(err.to_string().contains("hf://o/r/m.Q4_K_M.gguf"), "{err}");
        assert_eq!(choose(&files, Some("m.Q8_0.gguf"), "o/r").expect("named").len(), 1);
        assert!(choose(&files, Some("missing.gguf"), "o/r").is_err());
    }
}
