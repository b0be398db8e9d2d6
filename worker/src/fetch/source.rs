//! Model sources as `kandle-worker fetch` acts on them; the URL grammar itself is
//! the shared contract's (`kandle_contract::source`), the one the CRD checks.

use kandle_contract::source::PVC_MOUNT;
use kandle_contract::SourceUrl;

use super::FetchError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Hub {
        repo: String,
        file: Option<String>,
        revision: Option<String>,
    },
    /// One file over https://, or over http:// when a sha256 pins it.
    Url(String),
    /// A path that must already exist (`file://`, or a `pvc://` path under its mount).
    Local(std::path::PathBuf),
}

/// The source `url` names, if it may be fetched with the expected `sha256`.
pub fn parse(url: &str, sha256: Option<&str>) -> Result<Source, FetchError> {
    let bad = |e: kandle_contract::SourceError| FetchError::BadSource(e.to_string());
    let url = SourceUrl::parse(url).map_err(bad)?;
    url.check_pinned(sha256).map_err(bad)?;
    Ok(match url {
        SourceUrl::Hub { org, repo, file, revision } => Source::Hub { repo: format!("{org}/{repo}"), file, revision },
        SourceUrl::Https(url) | SourceUrl::Http(url) => Source::Url(url),
        SourceUrl::File(path) => Source::Local(path.into()),
        SourceUrl::Pvc { path, .. } => Source::Local(std::path::Path::new(PVC_MOUNT).join(path)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_scheme() {
        assert_eq!(
            parse("hf://HuggingFaceTB/SmolLM2-135M-Instruct", None).expect("ok"),
            Source::Hub { repo: "HuggingFaceTB/SmolLM2-135M-Instruct".into(), file: None, revision: None }
        );
        assert_eq!(
            parse("hf://org/repo/sub/model.Q4_K_M.gguf@v1.0", None).expect("ok"),
            Source::Hub {
                repo: "org/repo".into(),
                file: Some("sub/model.Q4_K_M.gguf".into()),
                revision: Some("v1.0".into())
            }
        );
        assert_eq!(parse("https://h/m.gguf", None).expect("ok"), Source::Url("https://h/m.gguf".into()));
        let sha = "a".repeat(64);
        assert_eq!(parse("http://h/m.gguf", Some(&sha)).expect("ok"), Source::Url("http://h/m.gguf".into()));
        assert_eq!(parse("file:///models/m.gguf", None).expect("ok"), Source::Local("/models/m.gguf".into()));
        assert_eq!(
            parse("pvc://cache/a/m.gguf", None).expect("ok"),
            Source::Local("/var/lib/kandle/models/a/m.gguf".into())
        );
        assert_eq!(
            parse("pvc://cache.v2/m.gguf", None).expect("ok"),
            Source::Local("/var/lib/kandle/models/m.gguf".into())
        );
    }

    #[test]
    fn rejects_what_it_cannot_fetch() {
        for url in
            ["http://h/m.gguf", "hf://onlyorg", "hf://o/r@", "hf://o/r/../x", "file://rel", "pvc:///x", "s3://b/k"]
        {
            assert!(matches!(parse(url, None), Err(FetchError::BadSource(_))), "{url}");
        }
    }
}
